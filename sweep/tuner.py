"""Ray Tune for one sweep: build each experiment's Tuner (or restore it to resume), and collect every
trial's outcome, copying its result files to ``DIR/trials/<trial>/`` where people look for them."""

from __future__ import annotations

import functools
import math
import os
import shutil
from pathlib import Path

from sweep import mps, sweepdir
from sweep.cluster import trial_resources
from sweep.plan import SweepPlan
from sweep.sweepdir import TrialOutcome
from trainers.checkpoints import download, evals, final_result, read_json, read_seal
from trainers.config import ADAPTER_DIR, CONFIG_FILE, METRICS_FILE, TUNE_POINT, EvalReport, TrialResult, \
    report_kind, search_param


SEARCH_SHARE = "search samples"  # the key of a search's trials in the GPU shares (one estimate for all)


def experiment_space(out: Path, exp: dict, plan: SweepPlan, evaluated: list[tuple[dict, float]],
                     shares: dict[str, float]):
    """(param space, search algorithm, trial namer, num_samples) of one of the sweep's experiments."""
    from ray import tune

    from sweep import searchers

    logs = out / sweepdir.LOGS_DIR
    if "samples" not in exp:  # explicit trials: Ray's grid over their configs
        priorities = mps.client_priorities(plan.planned, shares)
        configs = [{**p.cfg.to_param(), "gpu_share": shares.get(p.cfg.name, 0.0),
                    "mps_priority": priorities.get(p.cfg.name, mps.NORMAL)} for p in plan.planned
                   if exp["trials"] is None or p.cfg.fingerprint in exp["trials"]]
        return searchers.param_space(tune.grid_search(configs), logs), None, searchers.grid_name, 1
    alg, namer, point = searchers.searcher(plan.spec, samples_offset=exp["offset"], seeds=exp["seeds"],
                                           evaluated=evaluated)
    shared = {**search_param(plan.spec.fixed, plan.shapes.modules), "gpu_share": shares.get(SEARCH_SHARE, 0.0)}
    return searchers.param_space(shared, logs, point), alg, namer, exp["samples"]


def sweep_root(out: Path) -> tuple[object, str]:
    """(filesystem or None, path) under which Ray Tune keeps the sweep's experiments (its manifest says)."""
    from sweep.storage import sweep_root as root

    return root(sweepdir.read_json(out / sweepdir.SWEEP_MANIFEST), out)


def build_tuner(out: Path, exp: dict, plan: SweepPlan, *, shares: dict[str, float], max_failures: int,
                callbacks: list, earlier: dict[str, TrialOutcome] | None = None,
                resources: dict[str, float] | None = None):
    """A new Tuner for the experiment, or Ray Tune's own restore of it: finished trials stay finished, the
    others continue from their checkpoints, a search continues from its searcher's saved state. ``earlier``:
    the outcomes of the sweep's experiments before this one, which its searcher and scheduler start from."""
    from ray import tune

    from sweep import searchers
    from trainers.entry import tune_trainable

    # Our reports come in kinds and only evals and final results carry the eval loss that the scheduler and the
    # searcher read (they skip the rest); Tune's own check would otherwise reject the first step report.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    fs, root = sweep_root(out)  # the sweep directory, or the sweep's place in --storage
    tune_dir = f"{root}/{exp['name']}"
    trainable = tune.with_resources(tune_trainable, trial_resources(shares, resources))
    earlier = earlier or {}
    space, alg, namer, num_samples = experiment_space(out, exp, plan, evaluated_points(earlier), shares)
    if tune.Tuner.can_restore(tune_dir, storage_filesystem=fs):
        return tune.Tuner.restore(tune_dir, trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=space, storage_filesystem=fs)
    stop, budget = plan.space.early_stopping, plan.space.budget
    stopper = None
    if budget is not None and (budget.wall_hours or budget.gpu_hours):
        on_end = functools.partial(sweepdir.record_budget_end, str(out), exp["name"])  # picklable, as Ray needs
        devices = (shares.get(SEARCH_SHARE) or max(shares.values(), default=1)) if plan.device == "cuda" else 1
        stopper = searchers.BudgetStopper(on_end, budget.wall_hours, budget.gpu_hours, devices_per_trial=devices)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=alg, num_samples=num_samples, trial_name_creator=namer,
                                    trial_dirname_creator=namer,
                                    scheduler=searchers.scheduler(stop, plan.max_steps, eval_history(earlier))),
        run_config=tune.RunConfig(
            # verbose=0: our console (sweep/console.py) reports progress; Tune's tables would repeat it
            name=exp["name"], storage_path=root, storage_filesystem=fs, callbacks=callbacks, verbose=0, stop=stopper,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            # Keep every checkpoint: with num_to_keep, Ray restored from a stale snapshot deletes checkpoints
            # it remembers and fails on ones already gone; trial checkpoints are adapter-sized anyway.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        ),
    )


def copy_result(checkpoint, out: Path, name: str) -> Path:
    """A finished trial's final checkpoint (adapter, generations, metrics), from wherever Ray stored it, into
    DIR/trials/<name>/; once: the callback copies it when the trial ends, ``collect`` after a resume (or
    again, when a killed driver left the copy without its seal: incomplete)."""
    dest = out / sweepdir.TRIALS_DIR / name
    if read_seal(dest) is None:
        checkpoint.to_directory(str(dest))
    return dest


def collect(out: Path, experiments: list[dict]) -> dict[str, TrialOutcome]:
    """Trial name -> outcome, over every experiment of the sweep, read back from Ray Tune's own records
    (in the sweep directory or in --storage)."""
    from ray.tune import ExperimentAnalysis

    fs, root = sweep_root(out)
    ledger, ends, outcomes = sweepdir.ledger(out), sweepdir.budget_ends(out), {}
    for exp in experiments:
        tune_dir = f"{root}/{exp['name']}"
        try:
            trials = ExperimentAnalysis(tune_dir, storage_filesystem=fs).trials
        except (ValueError, FileNotFoundError):  # never got as far as its first saved state
            continue
        for trial in trials:
            o = outcome(trial, (fs, tune_dir), out, ledger, ends.get(exp["name"], ""))
            outcomes[o.cfg.name] = o
    return outcomes


def outcome(trial, tune_dir: tuple, out: Path, ledger: dict, budget_end: str) -> TrialOutcome:
    """How one Ray Tune trial ended; a finished one's result files (a stopped one's adapter) copied out.
    ``tune_dir``: (filesystem or None, path) of its experiment."""
    from ray.tune.experiment import Trial

    from sweep.callbacks import error_line
    from sweep.searchers import trial_config

    cfg = trial_config(trial)
    fp, last, (fs, exp_dir) = cfg.fingerprint, trial.last_result or {}, tune_dir
    trial_dir, dest = f"{exp_dir}/{cfg.name}", out / sweepdir.TRIALS_DIR / cfg.name
    found = evals(trial_dir, fp, fs)
    common = dict(cfg=cfg, point=trial.config.get(TUNE_POINT), seconds=last.get("time_total_s"),
                  evals=tuple((e["train_steps"], e["eval_loss"]) for _, e in found))
    if trial.status == Trial.ERROR:
        return TrialOutcome(sweepdir.ERROR, error=error_line(trial.error_file), **common)
    final = final_result(trial_dir, fp, fs)
    # Tune's saved state can lag a trial's end (it is written every few seconds, and not at all on a full
    # disk); the trial's sealed final checkpoint, with the ledger's entry for it, says it finished all the same
    ended = final is not None and ledger.get(fp, {}).get("status") == sweepdir.TERMINATED
    if report_kind(last) == TrialResult.KIND or ended:
        if read_seal(dest) is None:  # not copied yet, or only in part
            if final is not None:
                copy_out(lambda: download(final, fs, dest), dest)
            elif trial.checkpoint is not None:
                copy_out(lambda: copy_result(trial.checkpoint, out, cfg.name), dest)
        result = TrialResult.from_dict(last if report_kind(last) == TrialResult.KIND
                                       else read_json(final, METRICS_FILE, fs))
        return TrialOutcome(sweepdir.TERMINATED, result, steps=result.train_steps, **common)
    if trial.status != Trial.TERMINATED:  # the sweep was interrupted (Ctrl-C, a killed driver)
        return TrialOutcome(sweepdir.INTERRUPTED if last else sweepdir.NOT_RUN, **common)
    # Ray ended it before its end: early stopping (the ledger says so) or a budget.
    evaluated = found[-1] if found else None
    if evaluated is None and not last:
        return TrialOutcome(sweepdir.NOT_RUN, reason=budget_end, **common)
    reason = ledger.get(fp, {}).get("reason") or budget_end or "stopped"
    if evaluated is None:
        return TrialOutcome(sweepdir.STOPPED, reason=reason, **common)
    checkpoint, report = evaluated[0], EvalReport.from_report(evaluated[1])
    if not (dest / ADAPTER_DIR).is_dir():
        copy_out(lambda: download(checkpoint, fs, dest, only=(ADAPTER_DIR, CONFIG_FILE)), dest / ADAPTER_DIR)
    return TrialOutcome(sweepdir.STOPPED, steps=report.train_steps, eval_loss=report.eval_loss, reason=reason,
                        **common)


def copy_out(copy, dest: Path) -> None:
    """Copy a trial's files out to DIR/trials/. A full disk must not lose the outcome (Tune's records hold
    it): the half-made copy is removed, so the next run copies again, and the failure is noted for the
    driver, which stops the sweep with it (``sweep/guard.py``)."""
    from sweep import guard

    try:
        copy()
    except OSError as e:
        shutil.rmtree(dest, ignore_errors=True)
        guard.FAILURES.append(guard.describe(e))


def eval_history(outcomes: dict[str, TrialOutcome]) -> list[list[tuple[int, float]]]:
    """Each trial's (step, eval loss) evals, its final eval included: where early stopping's rungs start."""
    history = []
    for o in outcomes.values():
        evals = list(o.evals)
        if o.result is not None and math.isfinite(o.result.eval_loss) and o.result.train_steps:
            evals.append((o.result.train_steps, o.result.eval_loss))
        if evals:
            history.append(evals)
    return history


def evaluated_points(outcomes: dict[str, TrialOutcome]) -> list[tuple[dict, float]]:
    """Every searched trial's point and the eval loss it reached (a stopped trial's last one, as Ray's
    OptunaSearch itself records a stopped trial): what a later search is told before it proposes."""
    out = []
    for o in outcomes.values():
        loss = o.result.eval_loss if o.result is not None else o.eval_loss
        if o.point and loss is not None and math.isfinite(loss) and o.status in (sweepdir.TERMINATED, sweepdir.STOPPED):
            out.append((o.point, loss))
    return out
