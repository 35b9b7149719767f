"""Plots and report.html from hand-made results, in-process: the series each figure was built from,
the PNGs on disk, and a report that needs nothing but itself."""

import json
import re

import pytest
from PIL import Image

from sweep import plots
from sweep.plan import PlannedTrial
from sweep.report import write_report
from sweep.summary import build_rows
from sweep.sweepdir import TrialOutcome
from tests.conftest import make_result
from trainers.config import EvalReport, StepReport, TrialConfig


def cfg(name: str, r: int = 8, bits: int = 4, baseline: bool = False, **kw) -> TrialConfig:
    return TrialConfig(model="random:tiny-llama", dataset="bundled:products-400", device="cpu", name=name, index=0,
                       r=r, targets="attention", bits=bits, target_modules=("q_proj", "v_proj"), baseline=baseline,
                       **kw)


@pytest.fixture
def sweep(tmp_path):
    """base + three trials (one failed), with Tune result logs for the curves."""
    planned = [PlannedTrial(cfg("base", baseline=True), 0, 217408), PlannedTrial(cfg("r8", 8, 4), 4096, 221504),
               PlannedTrial(cfg("r16", 16, 8), 8192, 225600), PlannedTrial(cfg("bad", 4, 16), 2048, 219456)]
    outcomes = {"base": TrialOutcome("TERMINATED", make_result(eval_loss=6.9, trainable_params=0)),
                "r8": TrialOutcome("TERMINATED", make_result(eval_loss=6.5, trainable_params=4096)),
                "r16": TrialOutcome("TERMINATED", make_result(eval_loss=5.5, trainable_params=8192)),
                "bad": TrialOutcome("ERROR", error="RuntimeError: <boom> & co")}
    for name, losses in {"r8": [7.0, 6.8, 6.6], "r16": [7.0, 6.0, 5.6], "bad": [7.0]}.items():
        d = tmp_path / "tune" / name
        d.mkdir(parents=True)
        lines = [json.dumps(StepReport(step=4 * i + 1, epoch=0.1, loss=x, learning_rate=1e-3).to_report())
                 for i, x in enumerate(losses)]
        lines.insert(1, lines[0].replace(str(losses[0]), "7.5"))  # step 1 again (a retry): the later value wins
        if name != "bad":
            lines.append(json.dumps(EvalReport(train_steps=5, epoch=0.5, eval_loss=losses[1] - 0.1).to_report()))
            lines.append(json.dumps({**make_result(eval_loss=losses[-1] - 0.1, train_steps=9).to_report()}))
        lines.append('{"report": "step", "st')  # cut short by a killed driver
        (d / "result.json").write_text("\n".join(lines) + "\n")
    return tmp_path, planned, build_rows(planned, outcomes)


def test_quality_vs_cost_has_one_point_per_finished_trial_and_the_base_line(sweep):
    _, _, rows = sweep
    ax = plots.quality_vs_cost(rows).axes[0]
    points = [tuple(c.get_offsets()[0]) for c in ax.collections]
    assert points == [(4096.0, 6.5), (8192.0, 5.5)]  # the failed trial and the base row are not points
    assert [c.get_label() for c in ax.collections] == ["r8", "r16"]
    base = [ln for ln in ax.get_lines() if ln.get_label().startswith("base")]
    assert len(base) == 1 and tuple(base[0].get_ydata()) == (6.9, 6.9)
    assert ax.get_xscale() == "log"


def test_loss_curves_come_from_every_report_in_tunes_result_logs(sweep):
    out, _, rows = sweep
    curves = plots.read_curves(out, [r["trial_id"] for r in rows])
    assert curves["r16"] == {"train": [(1, 7.5), (5, 6.0), (9, 5.6)], "eval": [(5, 5.9), (9, 5.5)]}
    assert curves["base"] == {"train": [], "eval": []}
    lines = {ln.get_label(): ln.get_xydata().tolist() for ln in plots.loss_curves(curves, rows).axes[0].get_lines()}
    assert lines["r8 train"] == [[1, 7.5], [5, 6.8], [9, 6.6]] and lines["r8 eval"] == [[5, 6.7], [9, 6.5]]
    assert lines["bad train"] == [[1, 7.5]] and "bad eval" not in lines
    assert len(lines) == 6  # three trials' training curves, two eval curves, the base line


def test_write_plots_writes_valid_pngs_and_the_search_plots_only_for_searches(sweep, tmp_path):
    out, planned, rows = sweep
    paths = plots.write_plots(out, rows)
    assert sorted(paths) == ["loss_curves", "quality_vs_cost"]
    for path in paths.values():
        with Image.open(path) as img:
            assert (img.format, img.size) == ("PNG", (800, 500))
    searched = plots.write_plots(out, rows, search=True, order=["r16", "r8"])
    assert sorted(searched) == ["loss_curves", "quality_vs_cost", "search_history"]  # no importance measured
    history = plots.search_history(rows, ["r16", "r8"]).axes[0]
    assert [tuple(p) for p in history.collections[0].get_offsets()] == [(1, 5.5), (2, 6.5)]
    assert history.get_lines()[0].get_ydata().tolist() == [5.5, 5.5]  # best so far


def test_parameter_importance_plots_the_searchs_importances_most_important_on_top(sweep):
    out, _, rows = sweep
    paths = plots.write_plots(out, rows, search=True, importance={"r": 0.25, "learning_rate": 0.7, "bits": 0.05})
    assert "param_importance" in paths  # the numbers come from sweep/search_summary.py, measured once
    ax = plots.param_importance({"learning_rate": 0.7, "r": 0.25, "bits": 0.05}).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["bits", "r", "learning_rate"]
    assert [round(b.get_width(), 2) for b in ax.patches] == [0.05, 0.25, 0.7]


def test_report_is_self_contained_and_escapes_what_it_shows(sweep):
    out, planned, rows = sweep
    (out / "logs").mkdir()
    (out / "logs" / "r8.log").write_text("log")
    adapter = out / "trials" / "r8" / "adapter"
    adapter.mkdir(parents=True)
    gens = [{"title": "Mouse (Optical Mouse)", "prompt": "Describe: Mouse", "source": "space",
             "generation": "A <b>mouse</b>", "ended": True, "reference": ""}]
    for name in ("base", "r8", "r16"):
        (out / "trials" / name).mkdir(parents=True, exist_ok=True)
        (out / "trials" / name / "generations.json").write_text(json.dumps(gens))
    page = write_report(out, {"name": "demo", "sweep_id": "abc", "space": "s.py"}, planned, rows,
                        plots.write_plots(out, rows), metric="eval_loss").read_text()
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched
    assert page.count('src="data:image/png;base64,') == 2
    assert page.count("<tr class=") == 4  # one table row per trial, base first
    assert "RuntimeError: &lt;boom&gt; &amp; co" in page and "A &lt;b&gt;mouse&lt;/b&gt;" in page
    assert page.count('<div class="gen">') == 3  # the prompt's generations side by side: base, r8, r16
    assert "<h3>Mouse (Optical Mouse)</h3>" in page
    assert 'href="trials/r8/adapter"' in page and 'href="logs/r8.log"' in page
    assert 'href="logs/r16.log"' not in page  # links only to files that exist
