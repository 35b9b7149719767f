"""The summary table: quality rule, best marker, csv columns, loss_on, what max_seq_length cut."""

import csv
import json

import pytest

from sweep.plan import PlannedTrial
from sweep.summary import CSV_COLUMNS, build_rows, quality_rule, to_markdown, write_csv
from sweep.sweepdir import ERROR, TERMINATED, TrialOutcome
from tests.conftest import make_result, read_csv
from trainers.config import TrialConfig
from trainers.stats import ratio_se


def planned(name, r=8, baseline=False, loss_on="all"):
    cfg = TrialConfig(name=name, index=0, model="m", dataset="d", r=r, targets="attention", bits=4,
                      target_modules=("q_proj", "v_proj"), baseline=baseline, loss_on=loss_on)
    return PlannedTrial(cfg, 0 if baseline else 100, 1000)


def done(loss, repeat=0.1, words=40.0, rouge=0.2, trainable=100, **more) -> TrialOutcome:
    return TrialOutcome(TERMINATED, make_result(eval_loss=loss, perplexity=2.0, repeat_ngram_rate=repeat,
                                                gen_mean_words=words, rouge_l=rouge, trainable_params=trainable,
                                                **more))


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
    assert "| base | - | (no adapter) | 4 | all | base | 0.000 (0) |" in md and "best by rouge_l" in md
    assert "| -1.0000 ± 0.0141 |" in md  # no heldout.json here: unpaired, sqrt(0.01^2 + 0.01^2)


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


def seeded(config, k, seeds=3):
    cfg = TrialConfig(name=f"{config}-seed{42 + k}", index=0, model="m", dataset="d", r=8, targets="attention", bits=4,
                      target_modules=("q_proj", "v_proj"), seeds=seeds, replicate=k, config_name=config)
    return PlannedTrial(cfg, 100, 1000)


def heldout_json(sums, counts, loss="eval_loss") -> dict:
    """A trial's heldout.json holding one loss."""
    return {"row_ids": list(range(len(sums))), "losses": {loss: {"sums": sums, "counts": counts}}}


@pytest.mark.parametrize("loss", ["eval_loss", "response_loss"])
def test_paired_heldout_losses_separate_what_unpaired_errors_cannot(loss):
    """Same 40 held-out examples for both trials: example difficulty cancels in the paired difference. When the
    trials' loss_on differs the table compares them on the response loss, and pairs them on that loss."""
    import random

    rng = random.Random(0)
    counts = [rng.randint(50, 200) for _ in range(40)]
    hard = [rng.uniform(1.0, 3.0) for _ in counts]
    sums = {name: [c * (h + shift + rng.gauss(0, 0.01)) for c, h in zip(counts, hard)]
            for name, shift in (("a", 0.0), ("b", 0.06))}
    heldout = {n: heldout_json(s, counts, loss) for n, s in sums.items()}
    value = {n: sum(s) / sum(counts) for n, s in sums.items()}
    other = "response_loss" if loss == "eval_loss" else "eval_loss"  # not compared: b's far lower one is ignored
    outcomes = {n: TrialOutcome(TERMINATED, make_result(**{loss: value[n], f"{loss}_se": 0.08,
                                                          other: 3.0 if n == "a" else 1.0}))
                for n in sums}
    ps = [planned("a"), planned("b", loss_on="completion" if loss == "response_loss" else "all")]
    assert 0.02 < (value["b"] - value["a"]) / value["a"] < 0.10  # medium by its gap, if the gap is real
    unpaired = build_rows(ps, outcomes)
    assert [r["quality"] for r in unpaired] == ["high", "high"]  # SEs of 0.08 each: within noise
    assert unpaired[1]["tied_with_best"] and unpaired[1]["vs_best_se"] == pytest.approx(0.08 * 2 ** 0.5)
    paired = build_rows(ps, outcomes, heldout=heldout)
    assert [r["quality"] for r in paired] == ["high", "medium"] and [r["best"] for r in paired] == [True, False]
    assert paired[1]["vs_best"] == pytest.approx(value["b"] - value["a"])
    assert paired[1]["vs_best_se"] < 0.01 and not paired[1]["tied_with_best"]
    # the configuration's own SE comes from the per-example losses, not the trial's reported one
    assert paired[0][f"config_{loss}_se"] == pytest.approx(ratio_se(sums["a"], counts))
    md = to_markdown(paired, "t")
    assert f"| {value['a']:.4f} ± {ratio_se(sums['a'], counts):.4f} |" in md  # the compared loss's column
    assert f"paired example by example for vs base (on the {loss.replace('_', ' ')})" in md
    # per-example losses of the other loss only: nothing to pair this comparison on
    wrong = {n: heldout_json(s, counts, other) for n, s in sums.items()}
    assert build_rows(ps, outcomes, heldout=wrong)[1]["vs_best_se"] == pytest.approx(0.08 * 2 ** 0.5)


def test_seeds_give_one_line_per_configuration_with_mean_and_spread(tmp_path):
    losses = {"A": [2.00, 2.01, 2.02], "B": [2.02, 2.12, 2.07], "C": [2.30, 2.31, 2.29]}
    ps = [planned("base", baseline=True)] + [seeded(c, k) for c in losses for k in range(3)]
    outcomes = {"base": done(3.0, trainable=0)}
    outcomes |= {f"{c}-seed{42 + k}": done(v) for c, vs in losses.items() for k, v in enumerate(vs)}
    rows = build_rows(ps, outcomes)
    by_id = {r["trial_id"]: r for r in rows}
    # A and B differ by 0.06 (3%), but B's seeds spread 0.05: within noise, so B is not worse than A
    assert {c: by_id[f"{c}-seed42"]["quality"] for c in losses} == {"A": "high", "B": "high", "C": "low"}
    assert [r["trial_id"] for r in rows if r["best"]] == ["A-seed42"]  # best configuration, its best seed
    a = by_id["A-seed43"]
    assert (a["config"], a["seed"], a["seeds"]) == ("A", 43, 3)
    assert a["config_eval_loss"] == pytest.approx(2.01) and a["config_eval_loss_sd"] == pytest.approx(0.01)
    assert a["config_eval_loss_se"] == pytest.approx(0.01)  # no heldout.json: the mean of the trials' SEs
    assert by_id["B-seed42"]["vs_best_se"] == pytest.approx((0.01 ** 2 * 2 + 0.01 ** 2 / 3 + 0.05 ** 2 / 3) ** 0.5)
    md = to_markdown(rows, "t")
    assert sum(line.startswith("| ") for line in md.splitlines()) == 1 + 4  # header + base + three configurations
    assert "| A (3 seeds) * |" in md and "2.0100 ± 0.0100 (sd 0.0100)" in md
    assert "- B: 2.0200 (seed 42), 2.1200 (seed 43), 2.0700 (seed 44)" in md
    assert "Eval loss within noise of the lowest: B." in md
    write_csv(rows, tmp_path / "summary.csv")
    table = read_csv(tmp_path / "summary.csv")
    assert len(table) == 10 and table["C-seed44"]["config"] == "C" and table["C-seed44"]["seeds"] == "3"
    assert float(table["C-seed44"]["config_eval_loss"]) == pytest.approx(2.30)


def test_labels_never_rank_a_noisier_configuration_above_a_better_one():
    rows = build_rows([planned("a"), planned("b"), planned("c")], {
        "a": TrialOutcome(TERMINATED, make_result(eval_loss=2.00, eval_loss_se=0.001)),
        "b": TrialOutcome(TERMINATED, make_result(eval_loss=2.10, eval_loss_se=0.001)),  # 5% worse, precise: medium
        "c": TrialOutcome(TERMINATED, make_result(eval_loss=2.15, eval_loss_se=0.2)),  # worse still, but noisy
    })
    assert [r["quality"] for r in rows] == ["high", "medium", "medium"]  # c alone would be "high" (within noise)


@pytest.mark.parametrize("content", [
    '{"row_ids": [0, 1], "losses": {', '[]',
    '{"row_ids": [0, 1], "losses": {"eval_loss": {"sums": [1.0], "counts": [1, 1]}}}',
    '{"row_ids": [0], "losses": {"eval_loss": {"sums": ["x"], "counts": [1]}}}',
    '{"row_ids": [0, 1], "sums": [1.0, 2.0], "counts": [1, 1]}', "\udcff"])
def test_a_damaged_heldout_json_falls_back_to_unpaired_errors(tmp_path, content):
    from sweep.summary import load_heldout

    good = heldout_json([2.0, 4.0], [1, 2])
    for name, text in (("a", json.dumps(good)), ("b", content)):
        (tmp_path / "trials" / name).mkdir(parents=True)
        (tmp_path / "trials" / name / "heldout.json").write_text(text, errors="surrogateescape")
    outcomes = {"a": done(2.0), "b": done(2.1)}
    assert load_heldout(tmp_path, outcomes) == {"a": good}
    rows = build_rows([planned("a"), planned("b")], outcomes, heldout=load_heldout(tmp_path, outcomes))
    assert rows[0]["config_eval_loss_se"] == pytest.approx(ratio_se([2.0, 4.0], [1, 2]))
    assert rows[1]["config_eval_loss_se"] == pytest.approx(0.01)  # unpaired: the trial's own SE (metrics.json)
def test_trials_with_different_loss_on_are_compared_on_the_response_loss(tmp_path):
    """A completion-only trial's eval loss is taken on other tokens than a whole-text trial's: the star, the
    quality and vs base then come from the response loss, which all of them measure on the same tokens."""
    ps = [planned("base", baseline=True), planned("whole"), planned("answer", loss_on="completion")]
    precise = dict(response_loss_se=0.001)  # differences far beyond noise: the gaps alone decide
    rows = build_rows(ps, {"base": done(3.0, response_loss=3.5, **precise),
                           "whole": done(1.0, response_loss=2.0, **precise),
                           "answer": done(1.9, response_loss=1.8, **precise)})
    assert [r["best"] for r in rows] == [False, False, True]  # not "whole", whose eval loss is lowest
    assert [r["quality"] for r in rows] == ["base", "low", "high"]  # 2.0 is 11% above the best 1.8
    assert [r["vs_base"] for r in rows][1:] == [2.0 - 3.5, 1.8 - 3.5]
    md = to_markdown(rows, "t")
    assert "best by response_loss" in md and "| answer * |" in md
    assert "vs base is computed, on the response loss" in md
    assert "| whole | 8 | attention (q_proj, v_proj) | 4 | all |" in md
    assert "| answer * | 8 | attention (q_proj, v_proj) | 4 | completion |" in md
    write_csv(rows, tmp_path / "s.csv")
    table = read_csv(tmp_path / "s.csv")
    assert [table[n]["loss_on"] for n in ("base", "whole", "answer")] == ["all", "all", "completion"]
    assert table["answer"]["response_loss"] == "1.8"
    same = build_rows([planned("a"), planned("b")],
                      {"a": done(1.0, response_loss=2.0), "b": done(1.1, response_loss=1.0)})
    assert [r["best"] for r in same] == [True, False]  # one loss_on: eval loss, as the post


def test_a_cut_of_more_than_two_percent_is_a_warning_line():
    from sweep.summary import truncation_warnings

    ps = [planned("base", baseline=True), planned("a"), planned("b", r=16)]
    cut = dict(truncated_rows=151, truncated_pct=100 * 151 / 4500, train_examples=4500, response_tokens_lost=3896,
               response_lost_pct=0.93)
    rows = build_rows(ps, {"base": done(3.0, **cut), "a": done(2.0, **cut), "b": done(2.1, **cut)})
    assert truncation_warnings(rows) == [
        "max_seq_length=256 cuts 151 of 4,500 train rows (3.4%), 0.9% of their response tokens, and the cut rows "
        "lose their endings (base, a, b); raise max_seq_length or shorten the data"]
    md = to_markdown(rows, "t")
    assert "| 151 (3.4%) | 0.9% |" in md and "Warnings:\n- max_seq_length=256 cuts 151 of 4,500" in md
    small = dict(cut, truncated_rows=40, truncated_pct=100 * 40 / 4500)
    assert truncation_warnings(build_rows(ps, {"a": done(2.0, **small)})) == []
    assert "Warnings" not in to_markdown(build_rows(ps, {"a": done(2.0, **small)}), "t")


@pytest.mark.parametrize("loss_on, says", [(("all", "all"), "eval loss"), (("all", "completion"), "response loss")])
def test_the_quality_rule_names_the_loss_it_compares_on(loss_on, says):
    rows = [{"loss_on": lo, "config": f"c{i}", "baseline": False} for i, lo in enumerate(loss_on)]
    rule = quality_rule("eval_loss", rows)
    assert "{" not in rule and f"one whose {says} is not better than base" in rule
    assert f"No configuration is labelled above one with a lower {says}." in rule


def test_the_device_cell_says_how_a_trial_shared_its_gpu(tmp_path):
    """A packed trial's tokens/s depends on its neighbours and on MPS: the table says which it had."""
    gpu = dict(device_name="NVIDIA H200", gpu_uuid="ce9d68a3-5495-4c1f-8a1e-000000000000")
    rows = build_rows([planned("a"), planned("b"), planned("c")], {
        "a": TrialOutcome(TERMINATED, make_result(gpu_sharing="mps", **gpu)),
        "b": TrialOutcome(TERMINATED, make_result(gpu_sharing="time-sliced", **gpu)),
        "c": TrialOutcome(TERMINATED, make_result(gpu_sharing="whole", **gpu)),
    })
    cells = [line.split(" | ")[-2] for line in to_markdown(rows, "t").splitlines() if line.startswith("| ")][1:]
    assert cells == ["NVIDIA H200 ce9d68a3-5495 (shared, mps)", "NVIDIA H200 ce9d68a3-5495 (shared, time-sliced)",
                     "NVIDIA H200 ce9d68a3-5495"]
    write_csv(rows, tmp_path / "summary.csv")
    assert [r["gpu_sharing"] for r in read_csv(tmp_path / "summary.csv").values()] == ["mps", "time-sliced", "whole"]
