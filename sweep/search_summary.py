"""What a search user reads: the search as declared (``--dry-run``), and after it how the best trial was
chosen, which trials stopped early, and which axes mattered.

Importance is Optuna's fANOVA (``optuna.importance``, seeded) over every searched trial with an eval
loss, on the distributions the searcher sampled; a stopped trial counts with its last eval loss, as
Ray's OptunaSearch itself recorded it when the scheduler stopped it. With few trials it is a hint, and
the section says over how many trials it was measured.
"""

from __future__ import annotations

from pathlib import Path

from sweep import sweepdir
from sweep.axes import ASHA, Choice, MedianStopping
from sweep.plan import TargetShapes
from sweep.search import SearchSpec, axis_values, max_steps
from sweep.space import Space
from sweep.summary import METRICS
from sweep.sweepdir import TrialOutcome

MIN_TRIALS_FOR_IMPORTANCE = 3


def importances(spec: SearchSpec, outcomes: dict[str, TrialOutcome]) -> tuple[dict[str, float], int]:
    """Axis -> importance (summing to 1), and how many trials it was measured over ({} when too few)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from sweep.searchers import domain
    from sweep.tuner import evaluated_points

    points = evaluated_points(outcomes)
    if len(points) < MIN_TRIALS_FOR_IMPORTANCE:
        return {}, len(points)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = OptunaSearch.convert_search_space({n: domain(a) for n, a in spec.axes.items()})
    study = optuna.create_study(direction="minimize")
    for point, value in points:
        study.add_trial(optuna.trial.create_trial(params=point, distributions=distributions, value=value))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {name: float(found.get(name, 0.0)) for name in spec.axes}, len(points)


def _axis(axis) -> str:
    if isinstance(axis, Choice):
        return "one of " + ", ".join(map(str, axis.values))
    return f"{axis.low:g} to {axis.high:g}" + (", log scale" if axis.log else "")


def _stopping(space: Space) -> str:
    stop = space.early_stopping
    if isinstance(stop, ASHA):
        return (f"ASHA (grace {stop.grace_period} steps, reduction factor {stop.reduction_factor:g}, "
                f"{stop.brackets} bracket(s))")
    if isinstance(stop, MedianStopping):
        return f"median stopping (grace {stop.grace_period} steps, at least {stop.min_samples} others)"
    return "none"


def describe(spec: SearchSpec, space: Space, num_samples: int) -> list[str]:
    s, b = spec.search, space.budget
    algorithm = {"tpe": "Optuna TPE", "random": "random"}[s.algorithm]
    lines = [f"search: {algorithm} (seed {s.seed}), {num_samples} samples ({len(spec.seeds)} seeds), "
             f"{s.max_concurrent or 'as many as fit'} at once; early stopping: {_stopping(space)} on the eval loss "
             f"every {spec.fixed['eval_every']} steps"]
    if b is not None:
        limits = [f"{b.max_trials} trials" if b.max_trials else "", f"{b.wall_hours:g} h wall" if b.wall_hours else "",
                  f"{b.gpu_hours:g} GPU h" if b.gpu_hours else ""]
        lines.append("budget: " + ", ".join(x for x in limits if x))
    return lines


def dry_run_search(spec: SearchSpec, shapes: TargetShapes, space: Space, num_samples: int) -> str:
    """The axes, their ranges and the trainable-parameter range they imply (exact: linear in r)."""
    lines = describe(spec, space, num_samples) + ["", "| axis | searched over |", "|---|---|"]
    lines += [f"| {n} | {_axis(a)} |" for n, a in spec.axes.items()]
    r = spec.axes.get("r")
    rs = [min(axis_values(r)), max(axis_values(r))] if r else [spec.fixed["r"]]
    counts = [(rv * shapes.per_r[label], label, rv) for label in spec.target_labels for rv in rs]
    (low, lo_label, lo_r), (high, hi_label, hi_r) = min(counts), max(counts)
    lines += ["", f"trainable parameters: {low:,} (r={lo_r}, {lo_label}) to {high:,} (r={hi_r}, {hi_label}) "
                  f"of {shapes.base_total:,} in the base model"]
    return "\n".join(lines) + "\n"


def time_saved(outcomes: dict[str, TrialOutcome], devices: float) -> tuple[float, float, float] | None:
    """(device-seconds the searched trials ran, by Ray's time_total_s x their share of a device; device-seconds
    early stopping saved; steps it skipped), the saving at the finished trials' pace: training seconds per
    step, of the same targets and bits where any."""
    trials = [o for o in outcomes.values() if o.point is not None]
    done = [o for o in trials if o.result is not None and o.result.train_steps]
    if not done:
        return None
    pace: dict[tuple, list[float]] = {}
    for o in done:
        pace.setdefault((o.cfg.targets_label, o.cfg.bits), []).append(o.result.train_seconds / o.result.train_steps)
    overall = [v for values in pace.values() for v in values]
    saved = skipped = 0.0
    for o in trials:
        if o.status == sweepdir.STOPPED and o.steps is not None:
            left = max(0, max_steps(o.cfg.to_dict()) - o.steps)
            similar = pace.get((o.cfg.targets_label, o.cfg.bits), overall)
            saved += left * sum(similar) / len(similar) * devices
            skipped += left
    return sum(o.seconds or 0.0 for o in trials) * devices, saved, skipped


def search_section(spec: SearchSpec, space: Space, rows: list[dict], metric: str, num_samples: int,
                   importance: dict[str, float], measured: int, saving) -> str:
    """The summary's search section: as run, the best and how it was chosen, the stopped, the importances."""
    trials = [r for r in rows if not r["baseline"]]
    done = [r for r in trials if r["status"] == sweepdir.TERMINATED]
    stopped = [r for r in trials if r["status"] == sweepdir.STOPPED]
    lines = ["", "## Search", "", *describe(spec, space, num_samples),
             f"ran {len(trials)} of {num_samples} samples: {len(done)} finished, {len(stopped)} stopped early"]
    if saving is not None:
        unit = "GPU" if spec.fixed["device"] == "cuda" else "CPU-trial"
        held, saved, skipped = saving
        lines.append(f"{unit} time: the searched trials ran {held / 60:.1f} {unit}-min; early stopping skipped "
                     f"{skipped:.0f} optimizer steps, about {saved / 60:.1f} {unit}-min at the finished trials' pace "
                     f"({100 * saved / (held + saved) if held + saved else 0:.0f}% of running every trial to its end)")
    best = next((r for r in rows if r["best"]), None)
    way = "lowest" if METRICS[metric] is min else "highest"
    if best is not None:
        values = ", ".join(f"{n}={best[n]}" for n in spec.axes)
        lines += ["", f"**Best**: {best['trial_id']} ({values}): the {way} {metric} ({best[metric]:.4g}) of the "
                      f"{len(done)} trials that ran to the end; stopped trials are not ranked (fewer steps)."]
    if stopped:
        lines += ["", f"**Stopped early** ({len(stopped)}):"]
        lines += [f"- {r['trial_id']}: at step {r['steps']}, eval loss {r['eval_loss']:.4f} ({r['stop_reason']})"
                  if r["eval_loss"] is not None else f"- {r['trial_id']}: {r['stop_reason']}" for r in stopped]
    if importance:
        lines += ["", f"**Which axes mattered** (Optuna fANOVA importance of each axis for the eval loss, over "
                      f"{measured} trials; stopped ones at their last eval):", "", "| axis | importance |", "|---|---|"]
        lines += [f"| {n} | {v:.2f} |" for n, v in sorted(importance.items(), key=lambda kv: -kv[1])]
    else:
        lines += ["", f"Axis importance needs {MIN_TRIALS_FOR_IMPORTANCE} or more trials with an eval loss "
                      f"({measured} here)."]
    return "\n".join(lines) + "\n"


def report_search(out: Path, plan, rows: list[dict], outcomes: dict[str, TrialOutcome], metric: str,
                  experiments: list[dict], shares: dict[str, float]) -> tuple[str, dict[str, float]]:
    """The search section, appended to summary.md; returns it with the axes' importances."""
    from sweep.tuner import SEARCH_SHARE

    importance, measured = importances(plan.spec, outcomes)
    saving = time_saved(outcomes, shares.get(SEARCH_SHARE, 1.0) if plan.device == "cuda" else 1)
    section = search_section(plan.spec, plan.space, rows, metric, sum(e.get("samples", 0) for e in experiments),
                             importance, measured, saving)
    with open(out / "summary.md", "a") as f:
        f.write(section)
    return section, importance


def budget_note(out: Path, rows: list[dict], experiments: list[dict]) -> str:
    """Which budget ended the sweep and what it left, appended to summary.md ("" when none did)."""
    ends = sweepdir.budget_ends(out)
    reasons = [ends[e["name"]] for e in experiments if e["name"] in ends]
    capped = [r for r in rows if r["status"] == sweepdir.NOT_RUN and r["stop_reason"]]
    if not reasons and not capped:
        return ""
    stopped = sum(r["status"] == sweepdir.STOPPED and r["stop_reason"] in reasons for r in rows)
    what = "; ".join(f"the {x} ended it" for x in reasons) or "Budget.max_trials capped it"
    note = f"\nBudget: {what}: {stopped} trial(s) stopped, {len(capped)} not run.\n"
    with open(out / "summary.md", "a") as f:
        f.write(note)
    return note
