"""Held-out evals during training: every eval_every steps, each sent with the checkpoint of that step."""

import json

import pytest
from safetensors.torch import load_file

from trainers.checkpoints import evals, seal
from trainers.config import EvalReport, TrialConfig
from trainers.trial import run_trial

pytestmark = pytest.mark.slow  # trains


def test_evals_travel_with_their_checkpoint_and_adapter(model_cache, tmp_path):
    # 60 rows -> 54 train / 6 test -> 7 steps an epoch x 2 = 14 steps: evals at 3, 6, 9 and 12, not at 14
    # (the final eval follows); checkpoint_every is past the end, so the checkpoints are the evals' and the
    # Trainer's own at the last step.
    cfg = TrialConfig(name="t", index=0, model="random:tiny-llama", dataset="bundled:products-400", device="cpu",
                      r=4, targets="attention", bits=16, target_modules=("q_proj", "v_proj"), learning_rate=3e-3,
                      epochs=2, batch_size=8, train_samples=60, logging_steps=2, eval_every=3, checkpoint_every=100,
                      max_new_tokens=4, heldout_prompts=0)
    reports, saved = [], []

    def on_checkpoint(path, step, evaluated):
        if evaluated is None:
            assert step == 14 and not (path / "adapter").exists()
            return
        saved.append((step, evaluated, load_file(path / "adapter" / "adapter_model.safetensors")))
        seal(path, step=step, final=False, fingerprint=cfg.fingerprint, eval=evaluated.to_report())
        (tmp_path / "kept").mkdir(exist_ok=True)
        path.rename(tmp_path / "kept" / f"checkpoint_{step:06d}")  # as Ray keeps each one

    result = run_trial(cfg, tmp_path / "out", report=reports.append, on_checkpoint=on_checkpoint)
    assert [step for step, _, _ in saved] == [3, 6, 9, 12] and result.train_steps == 14
    assert all(isinstance(e, EvalReport) and e.train_steps == step for step, e, _ in saved)
    losses = [e.eval_loss for _, e, _ in saved] + [result.eval_loss]
    assert losses == sorted(losses, reverse=True), losses  # the held-out loss falls as the adapter trains
    # each checkpoint holds the adapter of its step, LoRA factors only
    b = [sum(v.abs().sum().item() for k, v in a.items() if "lora_B" in k) for _, _, a in saved]
    assert 0 < b[0] != b[-1] and not any("base_layer" in k for k in saved[0][2])
    assert not [r for r in reports if r["report"] == "eval"]  # with checkpoints, evals go with them
    found = evals(tmp_path / "kept", cfg.fingerprint)
    assert [e["train_steps"] for _, e in found] == [3, 6, 9, 12] and evals(tmp_path / "kept", "other") == []
    assert json.loads((found[-1][0] / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert (found[-1][0] / "adapter" / "tokenizer.json").is_file()  # what export loads beside the adapter
