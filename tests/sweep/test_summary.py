"""The summary table: quality rule, best marker, csv columns."""

import csv

from sweep.plan import PlannedTrial
from sweep.summary import CSV_COLUMNS, build_rows, to_markdown, write_csv
from sweep.sweepdir import ERROR, TERMINATED, TrialOutcome
from tests.conftest import make_result, read_csv
from trainers.config import TrialConfig


def planned(name, r=8, baseline=False):
    cfg = TrialConfig(name=name, index=0, model="m", dataset="d", r=r, targets="attention", bits=4,
                      target_modules=("q_proj", "v_proj"), baseline=baseline)
    return PlannedTrial(cfg, 0 if baseline else 100, 1000)


def done(loss, repeat=0.1, words=40.0, rouge=0.2, trainable=100) -> TrialOutcome:
    return TrialOutcome(TERMINATED, make_result(eval_loss=loss, perplexity=2.0, repeat_ngram_rate=repeat,
                                                gen_mean_words=words, rouge_l=rouge, trainable_params=trainable))


def test_quality_rule_and_best_marker(tmp_path):
    ps = [planned(n) for n in ("best", "close", "mid", "far", "loop", "short", "dead")]
    rows = build_rows(ps, {
        "best": done(2.00),
        "close": done(2.03),   # +1.5%: high
        "mid": done(2.10),     # +5%: medium
        "far": done(2.50),     # +25%: low
        "loop": done(2.01, repeat=0.8),
        "short": done(2.01, words=2.0),
        "dead": TrialOutcome(ERROR),
    })
    assert [r["quality"] for r in rows] == ["high", "high", "medium", "low", "low", "low", "-"]
    assert [r["best"] for r in rows] == [True] + [False] * 6
    md = to_markdown(rows, "t")
    assert "| best * |" in md and "| dead |" in md and "ERROR" in md
    write_csv(rows, tmp_path / "s.csv")
    with open(tmp_path / "s.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        assert [r["status"] for r in reader] == ["TERMINATED"] * 6 + ["ERROR"]


def test_trials_that_never_ran_keep_their_planned_counts():
    (row,) = build_rows([planned("x")], {})
    assert (row["status"], row["trainable_params"], row["quality"]) == ("NOT_RUN", 100, "-")


def test_baseline_row_gives_deltas_and_caps_quality():
    ps = [planned("base", baseline=True), planned("good"), planned("useless"), planned("wordy")]
    rows = build_rows(ps, {
        "base": done(3.0, trainable=0),  # what a baseline reports: no adapter trained
        "good": done(2.0, rouge=0.1),
        "useless": done(3.01),       # worse than the base model: bought nothing
        "wordy": done(2.02, rouge=0.4),
    }, metric="rouge_l")
    assert [r["quality"] for r in rows] == ["base", "high", "low", "high"]
    assert [r["vs_base"] for r in rows][1:] == [-1.0, 3.01 - 3.0, 2.02 - 3.0]
    assert rows[0]["vs_base"] is None
    assert [r["best"] for r in rows] == [False, False, False, True]  # best by ROUGE-L, never the base row
    md = to_markdown(rows, "t", "rouge_l")
    assert "| base | - | (no adapter) | 4 | base | 0.000 (0) |" in md and "best by rouge_l" in md
    assert "| -1.0000 |" in md


def test_csv_records_best_and_quality_and_export_ships_the_starred_trial(tmp_path):
    """One rule for "best": the table's star by --metric is what summary.csv records and export picks."""
    from sweep.export import pick_trial, read_sweep

    ps = [planned("base", baseline=True), planned("good"), planned("useless"), planned("wordy")]
    rows = build_rows(ps, {"base": done(3.0), "good": done(2.0, rouge=0.1), "useless": done(3.01),
                           "wordy": done(2.02, rouge=0.4)}, metric="rouge_l")
    write_csv(rows, tmp_path / "summary.csv")
    table = read_csv(tmp_path / "summary.csv")
    assert {t: r["best"] for t, r in table.items()} == {"base": "false", "good": "false", "useless": "false",
                                                         "wordy": "true"}
    assert [r["quality"] for r in table.values()] == ["base", "high", "low", "high"]
    assert pick_trial(read_sweep(tmp_path), "best") == "wordy"  # not "good", which has the lowest eval loss
