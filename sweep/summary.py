"""The table that says which configuration to ship: summary.csv (machine) and summary.md (people).

The first row, ``base``, is the model before fine-tuning (same bits as the first trial), so the
table shows what each configuration bought. Quality is derived from held-out measures, not read by
a human:
  high    eval loss within 2% of the sweep's best, generations not looping (under half of their
          token 3-grams repeated) and not very short (5 words or more on average)
  medium  eval loss within 10% of the best, not looping, not very short
  low     everything else that finished: a repetition loop or very short answers alone make a trial
          low, the two failure modes the post reads generations for; so does an eval loss no better
          than the base model's
The best trial by ``--metric`` (default: lowest eval loss) is marked with ``*``. A trial that early stopping
or a budget ended (STOPPED) shows its last eval loss and the step of it, but is never "best" and gets no
quality: it trained fewer steps and made no generations.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from sweep import sweepdir
from sweep.plan import PlannedTrial
from sweep.sweepdir import TrialOutcome
from trainers.config import GENERATIONS_JSON, perplexity

# Settings besides r, targets and bits that a search may vary: in summary.csv always, in summary.md when they vary.
HYPER = ("lora_alpha", "alpha_rule", "lora_dropout", "learning_rate", "epochs", "batch_size", "grad_accum",
         "gradient_checkpointing")
CSV_COLUMNS = [
    "trial_id", "r", "target_modules", "bits", *HYPER, "trainable_params", "total_params", "trainable_pct",
    "eval_loss", "perplexity", "rouge_l", "repeat_ngram_rate", "end_marker_rate", "train_seconds", "tokens_per_second",
    "peak_gpu_mem_gb", "status", "steps", "stop_reason", "quality", "best", "device", "gpu_uuid", "error",
]
# --metric choices: which way is better for each
METRICS = {"eval_loss": min, "perplexity": min, "rouge_l": max, "repeat_ngram_rate": min, "end_marker_rate": max}
HIGH_GAP, MEDIUM_GAP, LOOP_RATE, SHORT_WORDS = 0.02, 0.10, 0.5, 5
# Measures shown as they are named in TrialResult, and those whose column is named differently.
MEASURES = ("eval_loss", "perplexity", "rouge_l", "repeat_ngram_rate", "end_marker_rate", "gen_mean_words",
            "train_seconds", "peak_gpu_mem_gb", "gpu_uuid")
RENAMED = {"tokens_per_second": "train_tokens_per_second", "device": "device_name"}


def _measures(res) -> dict:
    if res is None:
        return {**dict.fromkeys(MEASURES), **dict.fromkeys(RENAMED), "device": "", "gpu_uuid": ""}
    return {**{m: getattr(res, m) for m in MEASURES}, **{col: getattr(res, f) for col, f in RENAMED.items()}}


def build_rows(planned: list[PlannedTrial], outcomes: dict[str, TrialOutcome], metric: str = "eval_loss") -> list[dict]:
    """One row per planned trial, in plan order; a trial without an outcome never ran (NOT_RUN)."""
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
            "targets": p.cfg.targets_label, "bits": p.cfg.bits, **{h: getattr(p.cfg, h) for h in HYPER},
            "trainable_params": trainable, "total_params": total,
            "trainable_pct": res.trainable_pct if res else 100.0 * trainable / total,
            **measures, "status": o.status, "steps": o.steps, "stop_reason": o.reason, "error": o.error,
            "baseline": p.cfg.baseline,
        })
    _add_quality(rows, metric)
    return rows


def pick_best(rows: list[dict], metric: str) -> dict | None:
    """The one rule for "best": the finished trial (never the base row) best by ``metric``. The table
    marks it and summary.csv records it, so export ships the trial the table starred."""
    ranked = [r for r in rows if not r["baseline"] and r["status"] == sweepdir.TERMINATED
              and _finite(r["eval_loss"]) and _finite(r[metric])]
    return METRICS[metric](ranked, key=lambda r: r[metric]) if ranked else None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _add_quality(rows: list[dict], metric: str) -> None:
    base = next((r for r in rows if r["baseline"] and r["status"] == sweepdir.TERMINATED), None)
    done = [r for r in rows if not r["baseline"] and r["status"] == sweepdir.TERMINATED and _finite(r["eval_loss"])]
    best_loss = min((r["eval_loss"] for r in done), default=None)
    best = pick_best(rows, metric)
    for r in rows:
        r["best"] = r is best
        r["vs_base"] = r["eval_loss"] - base["eval_loss"] if base and r is not base and _finite(r["eval_loss"]) else None
        if r["baseline"]:
            r["quality"] = "base"
            continue
        if r not in done:
            r["quality"] = "-"
            continue
        gap = (r["eval_loss"] - best_loss) / abs(best_loss) if best_loss else 0.0
        degenerate = (r["repeat_ngram_rate"] or 0.0) >= LOOP_RATE or (r["gen_mean_words"] or 0.0) < SHORT_WORDS
        no_gain = base is not None and r["eval_loss"] >= base["eval_loss"]
        r["quality"] = ("low" if degenerate or no_gain else "high" if gap <= HIGH_GAP
                        else "medium" if gap <= MEDIUM_GAP else "low")


def write_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, "best": "true" if r["best"] else "false"} for r in rows)
    sweepdir.write_text(path, buffer.getvalue())  # atomic: a full disk leaves the previous table, not half of one


def _fmt(x, spec: str) -> str:
    return format(x, spec) if _finite(x) else "-"


def table_head(extra: list[str] = ()) -> list[str]:
    """The table's columns; ``extra``: settings that vary between the trials (``varied``), after base bits."""
    return ["trial", "r", "target_modules", "base bits", *extra, "quality", "params updated (M)", "eval loss",
            "vs base", "perplexity", "ROUGE-L", "repeat 3-grams", "end marker", "train time (s)", "tokens/s",
            "peak GPU GiB", "device", "status"]


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


def table_cells(r: dict, extra: list[str] = ()) -> list[str]:
    """One row of the table as text, in ``table_head(extra)``'s order (summary.md, report.html, sweep.status)."""
    targets = r["targets"] if r["targets"] == r["target_modules"].replace(" ", ",") else \
        f"{r['targets']} ({', '.join(r['target_modules'].split())})"
    device = (r["device"] or "") + (f" {r['gpu_uuid'][:13]}" if r["gpu_uuid"] else "")
    return [
        r["trial_id"] + (" *" if r["best"] else ""), "-" if r["baseline"] else str(r["r"]),
        "(no adapter)" if r["baseline"] else targets, str(r["bits"]),
        *("-" if r["baseline"] else format(r[h], ".3g") if isinstance(r[h], float) else str(r[h]) for h in extra),
        r["quality"],
        f"{r['trainable_params'] / 1e6:.3f} ({r['trainable_params']:,})", _fmt(r["eval_loss"], ".4f"),
        _fmt(r["vs_base"], "+.4f"), _fmt(r["perplexity"], ".2f"), _fmt(r["rouge_l"], ".3f"),
        _fmt(r["repeat_ngram_rate"], ".2f"), _fmt(r["end_marker_rate"], ".2f"), _fmt(r["train_seconds"], ".1f"),
        _fmt(r["tokens_per_second"], ",.0f"), _fmt(r["peak_gpu_mem_gb"], ".2f"), device or "-", _status(r),
    ]


def quality_rule(metric: str) -> str:
    return (f"`*` best by {metric}. quality: high = eval loss within 2% of the best trial's; medium = within "
            "10%; low = the rest, an eval loss no better than base, or generations that loop (>= 50% repeated "
            "token 3-grams) or are very short (< 5 words). STOPPED trials (early stopping or a budget) show their "
            "last eval loss @ its step and are not ranked.")


def to_markdown(rows: list[dict], title: str, metric: str = "eval_loss") -> str:
    extra = varied(rows)
    head = table_head(extra)
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(table_cells(r, extra)) + " |" for r in rows]
    errors = [f"- {r['trial_id']}: {r['error']}" for r in rows if r["status"] != sweepdir.TERMINATED and r["error"]]
    if errors:
        lines += ["", "Errors:", *errors]
    lines += ["", quality_rule(metric)]
    return "\n".join(lines) + "\n"


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


def samples_markdown(rows: list[dict], generations: dict[str, list[dict]], max_new_tokens: int) -> str:
    """Every prompt, with the base model's and each trial's generation side by side (DIR/samples.md)."""
    order = [r for r in rows if r["trial_id"] in generations]
    if not order:
        return "# Samples\n\nNo trial produced generations.\n"
    lines = ["# Samples", "", f"Greedy decoding, max_new_tokens={max_new_tokens}, stopping at `### End`.", ""]
    for i, item in enumerate(generations[order[0]["trial_id"]]):
        lines += [f"## {item['product']} ({item['category']})" + ("" if item["source"] == "post" else " [held-out]"), ""]
        if item.get("reference"):
            lines += ["**reference**", "", "> " + item["reference"].replace("\n", "\n> "), ""]
        for r in order:
            gen = generations[r["trial_id"]][i]
            who = "base model" if r["baseline"] else f"r={r['r']}, {r['targets']}, {r['bits']}-bit"
            end = "" if gen["ended"] else " _(no end marker)_"
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


def write_reports(out: Path, planned: list[PlannedTrial], outcomes: dict[str, TrialOutcome], *, title: str,
                  metric: str, max_new_tokens: int) -> tuple[list[dict], str]:
    """summary.csv, summary.md and samples.md in the sweep directory; returns the rows and the markdown."""
    rows = build_rows(planned, outcomes, metric)
    write_csv(rows, out / "summary.csv")
    md = to_markdown(rows, title, metric)
    sweepdir.write_text(out / "summary.md", md)
    sweepdir.write_text(out / "samples.md", samples_markdown(rows, load_generations(out, rows), max_new_tokens))
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
