"""A sweep's plots (matplotlib, headless): written to ``DIR/plots/``, embedded in ``report.html`` and
logged to the parent MLflow run.

  quality_vs_cost    eval loss against parameters updated, one point per trial (marker by base bits),
                     the base row as a horizontal line
  loss_curves        training loss (lines) and eval loss (markers) against the optimizer step, one
                     colour per trial, the base row's eval loss as a line
  search_history     (searches) each trial's eval loss in the order it finished, and the best so far
  param_importance   (searches) how much each searched axis explains the eval loss (Optuna's fANOVA, as
                     ``sweep/search_summary.py`` measures it for the summary and MLflow)

Each builder returns a matplotlib ``Figure`` built from plain data (tests read the series back);
``write_plots`` reads that data from the sweep directory. No pyplot: figures are plain objects with
the Agg canvas, so nothing needs a display and nothing global is touched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sweep import sweepdir
from sweep.summary import compared_on
from trainers.config import REPORT_KIND, EvalReport, StepReport, TrialResult

PLOTS_DIR = "plots"
SIZE, DPI = (8, 5), 100  # 800 x 500 pixels
BIT_MARKERS = {4: "o", 8: "s", 16: "^"}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _figure(title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def colours(names: list[str]) -> dict[str, tuple]:
    """One colour per trial, the same in every plot."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def finished(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r["baseline"] and r["status"] == sweepdir.TERMINATED and _finite(r["eval_loss"])]


def base_loss(rows: list[dict], key: str = "eval_loss") -> float | None:
    return next((r[key] for r in rows if r["baseline"] and _finite(r[key])), None)


def quality_vs_cost(rows: list[dict]):
    """Eval loss (y; the response loss when the trials' loss_on differ, as the table compares them) against
    trainable parameters (x, log scale): what each configuration buys."""
    fig, ax = _figure("Quality against cost")
    loss = compared_on(rows)
    done, colour = [r for r in finished(rows) if _finite(r[loss])], colours([r["trial_id"] for r in rows])
    for i, r in enumerate(done):
        ax.scatter([r["trainable_params"]], [r[loss]], marker=BIT_MARKERS.get(r["bits"], "D"), s=90,
                   color=colour[r["trial_id"]], edgecolors="black" if r["best"] else "none", linewidths=1.5,
                   label=r["trial_id"], zorder=3)
        if len(done) <= 15:  # labels alternate above and below: same-size trials sit on one vertical
            ax.annotate(r["trial_id"] + (" *" if r["best"] else ""), (r["trainable_params"], r[loss]),
                        textcoords="offset points", xytext=(8, 6 if i % 2 else -12), fontsize=8)
    if (base := base_loss(rows, loss)) is not None:
        ax.axhline(base, color="grey", linestyle="--", label=f"base (no adapter): {base:.4f}")
    if done:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.margins(x=0.25, y=0.12)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: _minor_label(x, ax.get_xlim())))
    ax.set_xlabel("parameters updated (log scale)")
    ax.set_ylabel(f"{loss.replace('_', ' ')} (held-out test split)")
    from matplotlib.lines import Line2D

    shapes = [Line2D([], [], marker=m, linestyle="", color="black", label=f"{b}-bit base")
              for b, m in BIT_MARKERS.items() if any(r["bits"] == b for r in done)]
    ax.legend(handles=shapes + [h for h in ax.get_lines() if h.get_label().startswith("base")], loc="best",
              fontsize=8)
    return fig


def _minor_label(x: float, xlim: tuple[float, float]) -> str:
    """2s and 5s between the powers of ten, on axes short enough (under two decades) to have room."""
    return f"{x:,.0f}" if xlim[1] / max(xlim[0], 1e-9) < 100 and f"{x:.0e}"[0] in "25" else ""


def read_curves(out: Path, names: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Each trial's training and eval losses by step, from Ray Tune's per-trial result log (every report
    a trial made, across restarts; a repeated step keeps its latest value), in whichever of the sweep's
    experiments (``tune/``, ``tune-search/``, ...) the trial ran, wherever the sweep's storage keeps them."""
    from sweep.storage import read_file, trial_dirs

    curves = {}
    for name in names:
        train, evals = {}, {}
        fs, dirs = trial_dirs(out, name)  # the sweep directory, or its --storage
        lines = next(filter(None, (read_file(fs, d, "result.json") for d in dirs)), "").splitlines()
        for line in lines:
            try:
                rep = json.loads(line)
            except ValueError:  # a line cut short by a killed driver
                continue
            if rep.get(REPORT_KIND) == StepReport.KIND and _finite(rep.get("loss")):
                train[rep["step"]] = rep["loss"]
            elif rep.get(REPORT_KIND) in (TrialResult.KIND, EvalReport.KIND) and _finite(rep.get("eval_loss")):
                evals[rep["train_steps"]] = rep["eval_loss"]  # the final eval, or one every eval_every steps
        curves[name] = {"train": sorted(train.items()), "eval": sorted(evals.items())}
    return curves


def loss_curves(curves: dict[str, dict], rows: list[dict]):
    """Training loss (lines) and eval loss (markers, joined when there are several) by optimizer step."""
    fig, ax = _figure("Training and eval loss")
    colour = colours([r["trial_id"] for r in rows])
    for r in rows:
        c = curves.get(r["trial_id"], {})
        if r["baseline"] or not c.get("train"):
            continue
        steps, losses = zip(*c["train"])
        ax.plot(steps, losses, color=colour[r["trial_id"]], label=f"{r['trial_id']} train")
        if c.get("eval"):
            steps, losses = zip(*c["eval"])
            ax.plot(steps, losses, color=colour[r["trial_id"]], linestyle=":", marker="o",
                    label=f"{r['trial_id']} eval")
    if (base := base_loss(rows)) is not None:
        ax.axhline(base, color="grey", linestyle="--", label=f"base eval loss: {base:.4f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(loc="best", fontsize=8, ncol=2)
    return fig


def search_history(rows: list[dict], order: list[str]):
    """Eval loss of each finished trial in the order it finished (``order``), and the best so far."""
    fig, ax = _figure("Search history")
    by_name = {r["trial_id"]: r for r in finished(rows)}
    done = [by_name[n] for n in order if n in by_name]
    xs, ys = list(range(1, len(done) + 1)), [r["eval_loss"] for r in done]
    ax.scatter(xs, ys, color="tab:blue", label="trial", zorder=3)
    best = [min(ys[: i + 1]) for i in range(len(ys))]
    ax.plot(xs, best, color="tab:red", drawstyle="steps-post", label="best so far")
    if (base := base_loss(rows)) is not None:
        ax.axhline(base, color="grey", linestyle="--", label=f"base: {base:.4f}")
    ax.set_xlabel("trials finished")
    ax.set_ylabel("eval loss")
    ax.legend(loc="best", fontsize=8)
    return fig


def param_importance(scores: dict[str, float]):
    fig, ax = _figure("Parameter importance for eval loss (fANOVA)")
    names = list(scores)[::-1]  # most important on top
    ax.barh(names, [scores[n] for n in names], color="tab:blue")
    ax.set_xlabel("share of eval loss variance explained")
    return fig


def write_plots(out: Path, rows: list[dict], *, search: bool = False, order: list[str] | None = None,
                importance: dict[str, float] | None = None) -> dict[str, Path]:
    """Every plot that has data, as DIR/plots/<name>.png; returns name -> path. ``search``: the sweep was a
    search, so its history is plotted too, and the axes' ``importance`` when it could be measured."""
    figures = {"quality_vs_cost": quality_vs_cost(rows),
               "loss_curves": loss_curves(read_curves(out, [r["trial_id"] for r in rows]), rows)}
    if search and len(finished(rows)) >= 2:
        figures["search_history"] = search_history(rows, order or [r["trial_id"] for r in rows])
        if importance:
            figures["param_importance"] = param_importance(dict(sorted(importance.items(), key=lambda kv: -kv[1])))
    (out / PLOTS_DIR).mkdir(exist_ok=True)
    paths = {}
    for name, fig in figures.items():
        paths[name] = out / PLOTS_DIR / f"{name}.png"
        fig.savefig(paths[name], dpi=DPI, metadata={"Software": None})  # no version string: same data, same bytes
    return paths
