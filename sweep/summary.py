"""The table that says which configuration to ship: summary.csv (machine) and summary.md (people).

The first row, ``base``, is the model before fine-tuning (same bits as the first trial), so the
table shows what each configuration bought. Quality is derived from held-out measures and their noise,
not read by a human (``sweep/quality.py`` has the rule). A sweep with ``seeds`` > 1 shows one line per
configuration (mean over its seeds); summary.csv keeps one row per trial, with its configuration's numbers
beside it. The best trial by ``--metric`` (default: lowest eval loss) is marked with ``*``. A trial that early stopping
or a budget ended (STOPPED) shows its last eval loss and the step of it, but is never "best" and gets no
quality: it trained fewer steps and made no generations. When the trials take their loss on different
tokens (``loss_on`` differs), their eval losses are not comparable, and the rules above use the response
loss instead, which every trial measures on the same tokens.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from sweep import sweepdir
from sweep.plan import PlannedTrial
from sweep.quality import Group, assess
from sweep.quality import finite as _finite
from sweep.sweepdir import TrialOutcome
from trainers.config import GENERATIONS_JSON, HELDOUT_FILE, POST_END_MARKER, perplexity

# Settings besides r, targets and bits that a search may vary: in summary.csv always, in summary.md when they vary.
HYPER = ("lora_alpha", "alpha_rule", "lora_dropout", "learning_rate", "epochs", "batch_size", "grad_accum",
         "gradient_checkpointing")
CSV_COLUMNS = [
    "trial_id", "r", "target_modules", "bits", "loss_on", *HYPER, "trainable_params", "total_params",
    "trainable_pct", "eval_loss", "eval_loss_se", "response_loss", "response_loss_se", "perplexity", "rouge_l",
    "rouge_l_se", "repeat_ngram_rate", "end_marker_rate", "truncated_rows", "truncated_pct", "response_lost_pct",
    "train_seconds", "tokens_per_second", "peak_gpu_mem_gb", "status", "steps", "stop_reason", "quality", "best",
    "device", "gpu_uuid", "gpu_sharing", "error",
    # the trial's configuration (all its seeds): what the quality rule judges
    "config", "seed", "seeds", "config_eval_loss", "config_eval_loss_se", "config_eval_loss_sd",
    "config_response_loss", "config_response_loss_se", "config_response_loss_sd", "config_rouge_l",
    "config_rouge_l_sd", "vs_best", "vs_best_se", "vs_base", "vs_base_se",
]
# --metric choices: which way is better for each
METRICS = {"eval_loss": min, "response_loss": min, "perplexity": min, "rouge_l": max, "repeat_ngram_rate": min,
           "end_marker_rate": max}
# A trial whose max_seq_length cuts more than this share of its train rows or of their response tokens gets
# a warning line (the post's data cuts 3.4% of rows at 256 tokens with the 32k tokenizer; each cut row also
# loses its end marker, the post's measure of a finished answer).
TRUNCATION_WARN_PCT = 2.0
# Measures shown as they are named in TrialResult, and those whose column is named differently.
MEASURES = ("eval_loss", "eval_loss_se", "response_loss", "response_loss_se", "perplexity", "rouge_l", "rouge_l_se",
            "repeat_ngram_rate", "end_marker_rate", "gen_mean_words", "truncated_rows", "truncated_pct",
            "response_tokens_lost", "response_lost_pct", "dropped_rows", "train_examples", "train_seconds",
            "peak_gpu_mem_gb", "gpu_uuid", "gpu_sharing")
LOSSES = ("eval_loss", "response_loss")  # each with its error bars per configuration; compared_on picks one
RENAMED = {"tokens_per_second": "train_tokens_per_second", "device": "device_name"}


def _measures(res) -> dict:
    if res is None:
        return {**dict.fromkeys(MEASURES), **dict.fromkeys(RENAMED), "device": "", "gpu_uuid": "", "gpu_sharing": ""}
    return {**{m: getattr(res, m) for m in MEASURES}, **{col: getattr(res, f) for col, f in RENAMED.items()}}


def build_rows(planned: list[PlannedTrial], outcomes: dict[str, TrialOutcome], metric: str = "eval_loss",
               heldout: dict[str, dict] | None = None) -> list[dict]:
    """One row per planned trial, in plan order; a trial without an outcome never ran (NOT_RUN).
    ``heldout``: trial id -> its per-example held-out losses (heldout.json), for paired comparisons."""
    rows = []
    for p in planned:
        o = outcomes.get(p.cfg.name, TrialOutcome(sweepdir.NOT_RUN))
        res = o.result
        trainable = res.trainable_params if res else p.trainable_params
        total = res.total_params if res else p.total_params
        measures = _measures(res)
        if res is None and o.eval_loss is not None:  # stopped: its last eval
            measures.update(eval_loss=o.eval_loss, perplexity=perplexity(o.eval_loss))
        rows.append({
            "trial_id": p.cfg.name, "r": p.cfg.r, "target_modules": " ".join(p.cfg.target_modules),
            "targets": p.cfg.targets_label, "bits": p.cfg.bits, "loss_on": p.cfg.loss_on,
            "max_seq_length": p.cfg.max_seq_length, **{h: getattr(p.cfg, h) for h in HYPER},
            "trainable_params": trainable, "total_params": total,
            "trainable_pct": res.trainable_pct if res else 100.0 * trainable / total,
            **measures, "status": o.status, "steps": o.steps, "stop_reason": o.reason, "error": o.error,
            "baseline": p.cfg.baseline, "config": p.cfg.group, "seed": p.cfg.train_seed,
        })
    _add_quality(rows, metric, heldout or {})
    return rows


def compared_on(rows: list[dict], metric: str = "eval_loss") -> str:
    """The loss trials are compared on: ``metric``, except that eval losses taken on different tokens (the
    trials' loss_on differs) are not comparable, and then it is the response loss."""
    mixed = len({r["loss_on"] for r in rows if not r["baseline"]}) > 1
    return "response_loss" if mixed and metric in ("eval_loss", "perplexity") else metric


def pick_best(rows: list[dict], metric: str) -> dict | None:
    """The one rule for "best": among finished trials (never the base row), the configuration best by
    ``metric`` (as ``compared_on`` reads it) on average over its seeds, and its seed best by it. The table marks
    it and summary.csv records it, so export ships the trial the table starred."""
    metric, loss = compared_on(rows, metric), compared_on(rows)
    ranked = [r for r in rows if not r["baseline"] and r["status"] == sweepdir.TERMINATED
              and _finite(r[loss]) and _finite(r[metric])]
    if not ranked:
        return None
    configs: dict[str, list[dict]] = {}
    for r in ranked:
        configs.setdefault(r["config"], []).append(r)
    best = METRICS[metric](configs.values(), key=lambda rs: sum(r[metric] for r in rs) / len(rs))
    return METRICS[metric](best, key=lambda r: r[metric])


def _groups(rows: list[dict], heldout: dict[str, dict], loss: str) -> tuple[Group | None, dict[str, Group]]:
    """The base model's group and each configuration's, over their finished trials with a finite ``loss``."""
    finished = [r for r in rows if r["status"] == sweepdir.TERMINATED and _finite(r[loss])]
    base_rows = [r for r in finished if r["baseline"]]
    base = Group("base", base_rows[:1], heldout, loss) if base_rows else None
    names = list(dict.fromkeys(r["config"] for r in rows if not r["baseline"]))
    return base, {n: Group(n, [r for r in finished if r["config"] == n and not r["baseline"]], heldout, loss)
                  for n in names}


def _add_quality(rows: list[dict], metric: str, heldout: dict[str, dict]) -> None:
    loss = compared_on(rows)  # the eval loss, or the response loss when the trials' loss_on differs
    by_loss = {key: _groups(rows, heldout, key) for key in LOSSES}
    base, groups = by_loss[loss]
    verdicts = assess([g for g in groups.values() if g.n], base)
    best = pick_best(rows, metric)
    for r in rows:
        stats = {}
        for key, (base_group, config_groups) in by_loss.items():
            g = base_group if r["baseline"] else config_groups[r["config"]]
            known = g is not None and g.n > 0  # a configuration with a finished trial (not STOPPED / failed only)
            stats.update({f"config_{key}": g.loss if known else None, f"config_{key}_se": g.loss_se if known else None,
                          f"config_{key}_sd": g.loss_sd if known else None})
            if key == "eval_loss":
                stats.update(seeds=g.n if known else 0, config_rouge_l=g.rouge if known else None,
                             config_rouge_l_sd=g.rouge_sd if known else None,
                             config_rouge_l_se=g.rouge_se if known else None)
        verdict = {} if r["baseline"] else verdicts.get(r["config"], {})
        r.update(best=r is best, quality="base" if r["baseline"] else verdict.get("quality", "-"), **stats,
                 tied_with_best=verdict.get("tied_with_best", False),
                 **{k: verdict.get(k) for k in ("vs_best", "vs_best_se", "vs_base", "vs_base_se")})


def write_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, "best": "true" if r["best"] else "false"} for r in rows)
    sweepdir.write_text(path, buffer.getvalue())  # atomic: a full disk leaves the previous table, not half of one


def _fmt(x, spec: str) -> str:
    return format(x, spec) if _finite(x) else "-"


def table_head(extra: list[str] = ()) -> list[str]:
    """The table's columns; ``extra``: settings that vary between the trials (``varied``), after loss on."""
    return ["trial", "r", "target_modules", "base bits", "loss on", *extra, "quality", "params updated (M)",
            "eval loss ± SE", "response loss ± SE", "vs base", "perplexity", "ROUGE-L ± SE", "repeat 3-grams",
            "end marker", "truncated rows", "response lost", "train time (s)", "tokens/s", "peak GPU GiB", "device",
            "status"]


TABLE_HEAD = table_head()


def _status(r: dict) -> str:
    """STOPPED at its step and why; NOT_RUN with the budget that kept it from starting."""
    if r["status"] == sweepdir.STOPPED:
        at = f" @ {r['steps']}" if r.get("steps") is not None else ""
        return f"STOPPED{at} ({r['stop_reason']})" if r.get("stop_reason") else f"STOPPED{at}"
    return f"{r['status']} ({r['stop_reason']})" if r.get("stop_reason") else r["status"]


def varied(rows: list[dict]) -> list[str]:
    """The HYPER settings whose value differs between the trials: the ones worth a column in summary.md."""
    trials = [r for r in rows if not r["baseline"]]
    return [h for h in HYPER if len({repr(r[h]) for r in trials}) > 1]


def _pm(x, se, spec: str) -> str:
    """``x +- se`` (the standard error left out where it is unknown)."""
    return _fmt(x, spec) + (f" ± {format(se, spec.lstrip('+'))}" if _finite(x) and _finite(se) else "")


def config_rows(rows: list[dict]) -> list[dict]:
    """One row per configuration: a trial's own row, or its seeds' first row standing for them all."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["config"] not in out:
            out[r["config"]] = {**r, "label": r["trial_id"], "statuses": [r["status"]]}
            continue
        shown = out[r["config"]]
        shown["statuses"].append(r["status"])
        shown["best"] |= r["best"]
        shown["label"] = f"{r['config']} ({len(shown['statuses'])} seeds)"
    for shown in out.values():
        done = shown["statuses"].count(sweepdir.TERMINATED)
        if len(shown["statuses"]) > 1:
            shown["status"] = sweepdir.TERMINATED if done == len(shown["statuses"]) else \
                f"{done}/{len(shown['statuses'])} {sweepdir.TERMINATED}"
    return list(out.values())


def _config_loss(r: dict, key: str) -> str:
    """A configuration's ``key`` loss +- its SE (sd over seeds); a STOPPED trial's own last value."""
    if not _finite(r.get(f"config_{key}")):
        return _fmt(r[key], ".4f")
    spread = r[f"config_{key}_sd"]
    return _pm(r[f"config_{key}"], r[f"config_{key}_se"], ".4f") + (f" (sd {spread:.4f})" if _finite(spread) else "")


def table_cells(r: dict, extra: list[str] = ()) -> list[str]:
    """One line of the table as text, in ``table_head(extra)``'s order (summary.md, report.html, sweep.status):
    a configuration (``config_rows``), its eval loss and ROUGE-L with their standard errors and seed spread (a
    STOPPED trial, outside the rule, with its own last eval loss)."""
    targets = r["targets"] if r["targets"] == r["target_modules"].replace(" ", ",") else \
        f"{r['targets']} ({', '.join(r['target_modules'].split())})"
    device = (r["device"] or "") + (f" {r['gpu_uuid'][:13]}" if r["gpu_uuid"] else "") + \
        (f" (shared, {r['gpu_sharing']})" if r.get("gpu_sharing") not in (None, "", "whole") else "")
    grouped = _finite(r.get("config_eval_loss"))
    loss = r["config_eval_loss"] if grouped else r["eval_loss"]
    cut = f"{r['truncated_rows']:,} ({r['truncated_pct']:.1f}%)" if _finite(r["truncated_pct"]) else "-"
    return [
        r.get("label", r["trial_id"]) + (" *" if r["best"] else ""), "-" if r["baseline"] else str(r["r"]),
        "(no adapter)" if r["baseline"] else targets, str(r["bits"]), r["loss_on"],
        *("-" if r["baseline"] else format(r[h], ".3g") if isinstance(r[h], float) else str(r[h]) for h in extra),
        r["quality"],
        f"{r['trainable_params'] / 1e6:.3f} ({r['trainable_params']:,})",
        *(_config_loss(r, key) for key in LOSSES),
        _pm(r["vs_base"], r.get("vs_base_se"), "+.4f"), _fmt(perplexity(loss) if _finite(loss) else None, ".2f"),
        _pm(r["config_rouge_l"] if grouped else r["rouge_l"], r.get("config_rouge_l_se"), ".3f"),
        _fmt(r["repeat_ngram_rate"], ".2f"), _fmt(r["end_marker_rate"], ".2f"), cut,
        _fmt(r["response_lost_pct"], ".1f") + ("%" if _finite(r["response_lost_pct"]) else ""),
        _fmt(r["train_seconds"], ".1f"), _fmt(r["tokens_per_second"], ",.0f"), _fmt(r["peak_gpu_mem_gb"], ".2f"),
        device or "-", _status(r),
    ]


def quality_rule(metric: str, rows: list[dict] = ()) -> str:
    loss = compared_on(rows)
    name = loss.replace("_", " ")
    mixed = (f" The trials take their loss on different tokens (loss on), so they are compared, and vs base is "
             f"computed, on the {name}, which each measures on the response's tokens.") if loss != "eval_loss" else ""
    tied = sorted({r["config"] for r in rows if r.get("tied_with_best")})
    return (f"`*` best by {compared_on(rows, metric)} (with several seeds: the best configuration on average, and "
            f"its best seed). ± is one standard error: over held-out examples for the eval and response losses, and "
            f"paired example by example for vs base (on the {name}); over the rows generated for ROUGE-L (over "
            f"seeds when there are several); sd is the spread over seeds. quality: high = {name} within 2% of the "
            "best configuration's, or within noise of it "
            "(2 standard errors of the difference, seed spread included); medium = within 10%, likewise; low = "
            f"the rest, one whose {name} is not better than base beyond noise, or generations that loop (>= 50% "
            f"repeated token 3-grams) or are very short (< 5 words). No configuration is labelled above one with a "
            f"lower {name}. "
            "STOPPED trials (early stopping or a budget) show their last eval loss @ its step and are not ranked."
            + mixed + (f" {name.capitalize()} within noise of the lowest: {', '.join(tied)}." if tied else ""))


def to_markdown(rows: list[dict], title: str, metric: str = "eval_loss") -> str:
    extra = varied(rows)
    head = table_head(extra)
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(table_cells(r, extra)) + " |" for r in config_rows(rows)]
    errors = [f"- {r['trial_id']}: {r['error']}" for r in rows if r["status"] != sweepdir.TERMINATED and r["error"]]
    if errors:
        lines += ["", "Errors:", *errors]
    if any(r["seeds"] > 1 for r in rows):
        loss = compared_on(rows)
        lines += ["", f"Seeds ({loss.replace('_', ' ')} of each):", *[
            f"- {c}: " + ", ".join(f"{r[loss]:.4f} (seed {r['seed']})" for r in rows
                                   if r["config"] == c and _finite(r[loss]))
            for c in dict.fromkeys(r["config"] for r in rows if r["seeds"] > 1)]]
    if warnings := truncation_warnings(rows):
        lines += ["", "Warnings:", *(f"- {w}" for w in warnings)]
    lines += ["", quality_rule(metric, rows)]
    return "\n".join(lines) + "\n"


def truncation_warnings(rows: list[dict]) -> list[str]:
    """One line per distinct cut (trials on the same data, tokenizer and max_seq_length share theirs) that
    loses more than TRUNCATION_WARN_PCT of the train rows or of their response tokens."""
    found: dict[tuple, list[str]] = {}
    for r in rows:
        pcts = [x for x in (r["truncated_pct"], r["response_lost_pct"]) if _finite(x)]
        if pcts and max(pcts) > TRUNCATION_WARN_PCT:
            key = (r["max_seq_length"], r["truncated_rows"], r["train_examples"], r["response_lost_pct"],
                   r["dropped_rows"])
            found.setdefault(key, []).append(r["trial_id"])
    out = []
    for (length, cut, rows_, lost, dropped), names in found.items():
        lost_text = f", {lost:.1f}% of their response tokens" if _finite(lost) else ""
        drop_text = f"; {dropped:,} rows kept nothing to learn from and were dropped" if dropped else ""
        out.append(f"max_seq_length={length} cuts {cut:,} of {rows_:,} train rows ({100 * cut / rows_:.1f}%)"
                   f"{lost_text}, and the cut rows lose their endings{drop_text} ({', '.join(names)}); raise "
                   "max_seq_length or shorten the data")
    return out


def dry_run_table(planned: list[PlannedTrial]) -> str:
    head = ["trial", "r", "targets", "modules", "bits", "trainable params", "total params", "trainable %",
            "est. GPU GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in planned:
        c = p.cfg
        gpu = f"{p.gpu_gb:.1f}" if c.device == "cuda" else "-"
        if c.baseline:
            lines.append(f"| {c.name} | - | (no adapter) | - | {c.bits} | 0 | {p.total_params:,} | 0 | {gpu} |")
            continue
        lines.append(f"| {c.name} | {c.r} | {c.targets_label} | {', '.join(c.target_modules)} | {c.bits} | "
                     f"{p.trainable_params:,} | {p.total_params:,} | {100 * p.trainable_params / p.total_params:.4f} | "
                     f"{gpu} |")
    return "\n".join(lines) + "\n"


def samples_markdown(rows: list[dict], generations: dict[str, list[dict]], max_new_tokens: int,
                     end_marker: str = POST_END_MARKER) -> str:
    """Every prompt, with the base model's and each trial's generation side by side (DIR/samples.md)."""
    order = [r for r in rows if r["trial_id"] in generations]
    if not any(generations[r["trial_id"]] for r in order):
        return "# Samples\n\nNo trial produced generations.\n"
    stop = f"`{end_marker}`" if end_marker else "EOS"
    lines = ["# Samples", "", f"Greedy decoding, max_new_tokens={max_new_tokens}, stopping at {stop}.", ""]
    for i, item in enumerate(generations[order[0]["trial_id"]]):
        lines += [f"## {item['title']}" + (" [held-out]" if item["source"] == "test" else ""), ""]
        if item.get("reference"):
            lines += ["**reference**", "", "> " + item["reference"].replace("\n", "\n> "), ""]
        for r in order:
            if i >= len(generations[r["trial_id"]]):
                continue
            gen = generations[r["trial_id"]][i]
            who = "base model" if r["baseline"] else \
                f"r={r['r']}, {r['targets']}, {r['bits']}-bit, loss on {r['loss_on']}"
            end = "" if gen["ended"] else f" _(no {'end marker' if end_marker else 'end'})_"
            text = gen["generation"].replace("\n", "\n> ") or "(empty)"
            lines += [f"**{r['trial_id']}** ({who}){end}", "", "> " + text, ""]
    return "\n".join(lines)


def load_generations(out: Path, rows: list[dict]) -> dict[str, list[dict]]:
    """Each finished trial's generations, from the result files collected into DIR/trials/."""
    found = {}
    for r in rows:
        path = out / sweepdir.TRIALS_DIR / r["trial_id"] / GENERATIONS_JSON
        if r["status"] == sweepdir.TERMINATED and path.is_file():
            found[r["trial_id"]] = json.loads(path.read_text())
    return found


def load_heldout(out: Path, outcomes: dict[str, TrialOutcome]) -> dict[str, dict]:
    """Each finished trial's per-example held-out losses (DIR/trials/<id>/heldout.json)."""
    found = {}
    for name, o in outcomes.items():
        path = out / sweepdir.TRIALS_DIR / name / HELDOUT_FILE
        if o.status == sweepdir.TERMINATED and path.is_file() and (losses := _read_heldout(path)) is not None:
            found[name] = losses
    return found


def _read_heldout(path: Path) -> dict | None:
    """heldout.json (``row_ids`` and, per loss, each example's ``sums`` and ``counts``), or None when it is
    damaged: the trial is then compared unpaired, from its metrics."""
    try:
        held = json.loads(path.read_text())
        n = len(held["row_ids"])
        ok = isinstance(held["row_ids"], list) and isinstance(held["losses"], dict) and all(
            isinstance(one[k], list) and len(one[k]) == n and all(_number(x) for x in one[k])
            for one in held["losses"].values() for k in ("sums", "counts"))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return held if ok else None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def write_reports(out: Path, planned: list[PlannedTrial], outcomes: dict[str, TrialOutcome], *, title: str,
                  metric: str) -> tuple[list[dict], str]:
    """summary.csv, summary.md and samples.md in the sweep directory; returns the rows and the markdown."""
    rows = build_rows(planned, outcomes, metric, load_heldout(out, outcomes))
    write_csv(rows, out / "summary.csv")
    md = to_markdown(rows, title, metric)
    sweepdir.write_text(out / "summary.md", md)
    first = planned[0].cfg
    sweepdir.write_text(out / "samples.md", samples_markdown(rows, load_generations(out, rows), first.max_new_tokens,
                                                             first.marker))
    return rows, md


def table_trials(plan, outcomes: dict[str, TrialOutcome], experiments: list[dict]) -> list[PlannedTrial]:
    """The table's trials, in order: the planned ones (``plan``, a ``SweepPlan``), then a search's samples by
    number. Planned trials Budget.max_trials kept out of every experiment get a NOT_RUN outcome saying so."""
    listed = None
    if all("trials" not in e or e["trials"] is not None for e in experiments):
        listed = {fp for e in experiments for fp in e.get("trials") or []}
    for p in plan.planned:
        if listed is not None and p.cfg.fingerprint not in listed and p.cfg.name not in outcomes:
            outcomes[p.cfg.name] = TrialOutcome(sweepdir.NOT_RUN, reason="max_trials budget")
    names = {p.cfg.name for p in plan.planned}
    sampled = sorted((o for o in outcomes.values() if o.point is not None and o.cfg.name not in names),
                     key=lambda o: o.cfg.index)
    return plan.planned + [plan.shapes.planned(o.cfg) for o in sampled]
