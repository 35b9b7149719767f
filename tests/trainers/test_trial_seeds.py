"""A trial's error bars and seed repeats, from real (tiny) training runs."""

import dataclasses
import json

import pytest

from trainers.config import HELDOUT_FILE, TrialConfig
from trainers.stats import ratio_se
from trainers.trial import run_trial

pytestmark = pytest.mark.slow  # trains


@pytest.fixture(scope="module")
def repeats(tmp_path_factory, model_cache):
    root = tmp_path_factory.mktemp("seeds")
    cfg = TrialConfig(name="r4-seed42", index=0, model="random:tiny-llama", dataset="bundled:products-400",
                      device="cpu", r=4, targets="attention", target_modules=("q_proj", "v_proj"), bits=16,
                      learning_rate=3e-3, epochs=1, batch_size=8, train_samples=60, max_steps=3, max_new_tokens=4,
                      heldout_prompts=3, seeds=2, config_name="r4")
    second = dataclasses.replace(cfg, name="r4-seed43", replicate=1)
    return {c.replicate: (run_trial(c, root / c.name), root / c.name) for c in (cfg, second)}


def test_heldout_file_and_standard_errors(repeats):
    result, out = repeats[0]
    saved = json.loads((out / HELDOUT_FILE).read_text())
    assert sorted(saved["losses"]) == ["eval_loss", "response_loss"]
    assert len(saved["row_ids"]) == result.test_examples == 6
    for loss, heldout in saved["losses"].items():  # the eval loss (loss_on's tokens) and the response loss
        assert len(heldout["sums"]) == len(heldout["counts"]) == 6
        assert sum(heldout["sums"]) / sum(heldout["counts"]) == pytest.approx(getattr(result, loss), rel=1e-12)
        assert getattr(result, f"{loss}_se") == pytest.approx(ratio_se(heldout["sums"], heldout["counts"]), rel=1e-12)
    assert 0 < result.eval_loss_se < 0.2 * result.eval_loss
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss_se"] == result.eval_loss_se and metrics["rouge_l_se"] == result.rouge_l_se


def test_seed_repeats_train_differently_on_the_same_split(repeats):
    (a, a_dir), (b, b_dir) = repeats[0], repeats[1]
    assert a.dataset_fingerprint == b.dataset_fingerprint  # same rows in train and test
    ids = [json.loads((d / HELDOUT_FILE).read_text())["row_ids"] for d in (a_dir, b_dir)]
    assert ids[0] == ids[1]
    assert a.train_loss_first != b.train_loss_first and a.eval_loss != b.eval_loss  # other init and data order
