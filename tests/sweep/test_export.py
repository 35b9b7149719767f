"""sweep.export on a real (tiny) sweep: adapters and merged models from 4/8/16-bit trials, losses re-checked."""

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from sweep.export import main
from sweep.plan import PlannedTrial
from sweep.summary import build_rows, write_csv
from sweep.sweepdir import ERROR, TERMINATED, TrialOutcome
from trainers.config import TrialConfig
from tests.conftest import REPO, make_result
from trainers import merge as M
from trainers.models import checkpoint_path, load_base, load_config, load_tokenizer, meta_model, resolve_targets
from trainers.trial import run_trial

pytestmark = pytest.mark.slow  # real Ray sweeps / trained trials

BITS = (4, 8, 16)
# Hand-written table losses: the 8-bit trial is best; 'base' and the failed row are lower still and
# must never be picked.
TABLE = {"base": 1.0, "r4-4bit": 2.5, "r4-8bit": 2.1, "r4-16bit": 2.3, "r4-crashed": 0.5}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, model_cache):
    d = tmp_path_factory.mktemp("sweep")
    modules = resolve_targets(meta_model(load_config("random:tiny-llama")), "all_linear")
    for i, bits in enumerate(BITS):
        cfg = TrialConfig(name=f"r4-{bits}bit", index=i, model="random:tiny-llama", dataset="bundled:products-400",
                          device="cpu", r=4, targets="all_linear", target_modules=modules, bits=bits,
                          learning_rate=3e-3, epochs=1, batch_size=8, train_samples=80, logging_steps=2,
                          max_new_tokens=8, heldout_prompts=1,
                          loss_on="completion" if bits == 16 else "all")  # export re-measures on the trial's tokens
        run_trial(cfg, d / "trials" / cfg.name)
    (d / "trials" / "base").mkdir()  # a real baseline dir: results but no adapter
    (d / "trials" / "base" / "metrics.json").write_text(json.dumps({"eval_loss": TABLE["base"]}))
    # The table as the sweep writes it (same rule for its "best" column), with hand-set losses.
    planned = [PlannedTrial(TrialConfig(name=tid, index=i, model="m", dataset="d", r=4, targets="all_linear", bits=4,
                                        baseline=tid == "base"), 100, 1000) for i, tid in enumerate(TABLE)]
    outcomes = {tid: TrialOutcome(ERROR) if tid == "r4-crashed" else TrialOutcome(TERMINATED, make_result(eval_loss=loss))
                for tid, loss in TABLE.items()}
    write_csv(build_rows(planned, outcomes), d / "summary.csv")
    return d


def run_main(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


# Exports made once for the tests below: (bits, how) -> (rc, out dir, stdout, stderr).
EXPORTS = {
    **{(bits, "adapter"): [] for bits in BITS},
    **{(bits, "merged"): ["--merge"] for bits in BITS},  # default: into the trial's own base, stored fp32
    **{(bits, "original"): ["--merge", "--merge-base", "original"] for bits in (4, 8)},
    (4, "bf16"): ["--merge", "--dtype", "bfloat16"],
}


@pytest.fixture(scope="module")
def exports(sweep, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    done = {}
    for (bits, how), flags in EXPORTS.items():
        out = root / f"{bits}-{how}"
        rc, stdout, stderr = run_main(sweep, "--trial", f"r4-{bits}bit", "--out", out, *flags)
        done[bits, how] = (rc, out, stdout, stderr)
    return done


def trial_cfg(sweep, bits) -> TrialConfig:
    return TrialConfig.from_dict(json.loads((sweep / "trials" / f"r4-{bits}bit" / "config.json").read_text()))


def trial_loss(sweep, bits) -> float:
    return json.loads((sweep / "trials" / f"r4-{bits}bit" / "metrics.json").read_text())["eval_loss"]


@pytest.mark.parametrize("bits", BITS)
def test_adapter_export_reloads_with_peft_and_reproduces_the_trial(sweep, exports, bits):
    rc, out, stdout, stderr = exports[bits, "adapter"]
    assert rc == 0, stderr[-2000:]
    info = json.loads((out / "export.json").read_text())
    assert (info["trial_id"], info["base_model"], info["bits"], info["merged"]) == \
        (f"r4-{bits}bit", "random:tiny-llama", bits, False)
    # Same quantized base, same adapter, same split: the trial's own number comes back.
    assert info["eval_loss_trial"] == trial_loss(sweep, bits)
    assert info["eval_loss_adapter"] == pytest.approx(info["eval_loss_trial"], rel=1e-5)
    assert f"r4-{bits}bit" in stdout and str(out.resolve()) in stdout
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging directory left behind

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys())  # LoRA factors only, no base lm_head copy
    cfg = trial_cfg(sweep, bits)
    model = PeftModel.from_pretrained(load_base(cfg, checkpoint_path(cfg)), str(out))
    loss = M.eval_loss(cfg, model, load_tokenizer(str(out)), M.rebuild_splits(cfg))
    assert loss == pytest.approx(info["eval_loss_adapter"], rel=1e-6)


def reload_plain(out):
    """The merged export as a user loads it, checked to be a plain LLaMA with no PEFT layer left."""
    assert not (out / "adapter_config.json").exists()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and "quantization_config" not in model.config.to_dict()
    assert not [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    return model


def expected_weights(sweep, bits, base: str) -> dict[str, torch.Tensor]:
    """Each adapted Linear's weight computed here, independently of export: W + scale * B @ A in fp32, with W the
    bitsandbytes-dequantized trial base (``trial``) or the checkpoint's own weights (``original``)."""
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    cfg = trial_cfg(sweep, bits)
    quantized = load_base(dataclasses.replace(cfg, trainer="reference"), checkpoint_path(cfg))  # stock bnb layers
    plain = AutoModelForCausalLM.from_pretrained(checkpoint_path(cfg), dtype=torch.float32)
    factors = load_file(sweep / "trials" / cfg.name / "adapter" / "adapter_model.safetensors")
    scale = cfg.lora_alpha / cfg.r
    out = {}
    for name, layer in quantized.named_modules():
        if not hasattr(layer, "weight") or not any(name.endswith(t) for t in cfg.target_modules):
            continue
        if base == "original" or bits == 16 or name.endswith("lm_head"):  # lm_head is never quantized
            w = plain.get_submodule(name).weight.detach().float()
        elif bits == 4:
            w = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        else:
            w = layer.weight.data.float() * layer.weight.SCB.unsqueeze(1).float() / 127
        a, b = (factors[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
        out[name] = w + scale * (b.float() @ a.float())
    return out


@pytest.mark.parametrize("bits", BITS)
def test_merged_export_reproduces_the_trial_and_reloads_as_a_plain_model(sweep, exports, bits):
    rc, out, stdout, stderr = exports[bits, "merged"]
    assert rc == 0, stderr[-2000:]
    info = json.loads((out / "export.json").read_text())
    print(f"{bits}-bit into the trial's base: trial {info['eval_loss_trial']!r} merged {info['eval_loss_merged']!r} "
          f"rel {info['merge_rel_diff']:.1e}")
    assert (info["merged"], info["merge_base"], info["dtype"]) == (True, "trial", "float32")
    assert info["merged_into"] == M.describe_base(trial_cfg(sweep, bits), "trial")
    assert {4: "dequantize_4bit", 8: "CB * SCB / 127", 16: "16-bit base"}[bits] in info["merged_into"]
    # checked against the trial's own eval loss, within the tolerance for this base
    assert info["checked_against"] == "the trial's eval loss"
    assert info["reference_loss"] == info["eval_loss_trial"] == trial_loss(sweep, bits)
    assert info["merge_tolerance"] == (M.TOLERANCE_INT8 if bits == 8 else M.TOLERANCE_FP32)
    assert info["merge_rel_diff"] == pytest.approx(M.relative_gap(info["eval_loss_merged"], trial_loss(sweep, bits)))
    assert info["merge_rel_diff"] <= info["merge_tolerance"]
    assert info["diff_vs_trial"] == pytest.approx(info["eval_loss_merged"] - info["eval_loss_trial"])
    assert "merged model, reloaded" in stdout and f"{info['eval_loss_merged']:.6f}" in stdout
    assert "merged into " + info["merged_into"] in stdout

    model = reload_plain(out)
    cfg = trial_cfg(sweep, bits)
    loss = M.eval_loss(cfg, model, load_tokenizer(str(out)), M.rebuild_splits(cfg))
    assert loss == pytest.approx(info["eval_loss_merged"], rel=1e-6)
    if cfg.loss_on == "completion":  # the check is on the trial's tokens: all of them would be far off
        every = M.eval_loss(dataclasses.replace(cfg, loss_on="all"), model, load_tokenizer(str(out)),
                            M.rebuild_splits(cfg))
        assert M.relative_gap(every, info["eval_loss_trial"]) > 10 * info["merge_tolerance"]  # 2e-3 on random weights
    # The weights are exactly the dequantized base plus the update, computed here independently
    for name, w in expected_weights(sweep, bits, "trial").items():
        torch.testing.assert_close(model.get_submodule(name).weight, w, rtol=0, atol=2e-6, msg=name)


@pytest.mark.parametrize("bits", (4, 8))
def test_merge_into_original_weights_is_checked_against_the_adapter_there(sweep, exports, bits):
    rc, out, stdout, stderr = exports[bits, "original"]
    assert rc == 0, stderr[-2000:]
    info = json.loads((out / "export.json").read_text())
    assert (info["merge_base"], info["dtype"]) == ("original", "float32")
    assert info["merged_into"] == "the checkpoint's original weights (fp32)" and info["merged_into"] in stdout
    assert info["checked_against"] == "the adapter on the original weights"
    assert info["reference_loss"] == info["eval_loss_adapter"] and info["adapter_eval_base"] == "original weights, fp32"
    assert info["merge_rel_diff"] <= M.TOLERANCE_FP32
    model = reload_plain(out)
    for name, w in expected_weights(sweep, bits, "original").items():
        torch.testing.assert_close(model.get_submodule(name).weight, w, rtol=0, atol=2e-6, msg=name)
    # Not the trial's model: the adapter was trained against the NF4 weights, and on the original ones the loss
    # moves by far more than the trial-base merge's own gap. (int8 rounding of tiny-llama's random weights is too
    # small to move its near-uniform loss visibly.)
    trial_base = json.loads((exports[bits, "merged"][1] / "export.json").read_text())
    assert bits == 8 or abs(info["eval_loss_merged"] - info["eval_loss_trial"]) > \
        10 * abs(trial_base["eval_loss_merged"] - trial_base["eval_loss_trial"])


def test_bf16_storage_is_explicit_and_still_checked(sweep, exports):
    rc, out, stdout, stderr = exports[4, "bf16"]
    assert rc == 0, stderr[-2000:]
    info = json.loads((out / "export.json").read_text())
    assert (info["dtype"], info["merge_tolerance"]) == ("bfloat16", M.TOLERANCE_16BIT)
    assert "stored as bfloat16" in stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    fp32 = AutoModelForCausalLM.from_pretrained(exports[4, "merged"][1])
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, fp32.model.layers[0].mlp.up_proj.weight.bfloat16())


def test_an_existing_empty_out_directory_is_filled(sweep, tmp_path):
    (tmp_path / "out").mkdir()
    rc, stdout, stderr = run_main(sweep, "--trial", "r4-16bit", "--out", tmp_path / "out")
    assert rc == 0, stderr[-2000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and (tmp_path / "out" / "export.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the staging directory was beside it, and is gone


def test_best_is_the_lowest_finished_trial_never_base(sweep):
    rc, stdout, stderr = run_main(sweep)
    assert rc == 0, stderr[-2000:]
    assert "best trial: r4-8bit" in stdout
    out = sweep / "export" / "r4-8bit"  # the default --out
    assert json.loads((out / "export.json").read_text())["trial_id"] == "r4-8bit"


def test_a_merge_that_changes_the_loss_is_refused_and_nothing_is_written(sweep, tmp_path, monkeypatch):
    monkeypatch.setattr(M, "merge", lambda model, dtype: model.unload())  # drops the adapter instead of merging it
    rc, stdout, stderr = run_main(sweep, "--trial", "r4-4bit", "--merge", "--out", tmp_path / "new" / "out")
    assert rc == 1
    assert "MERGE CHECK FAILED" in stderr and "Traceback" not in stderr
    assert "merged into the trial's 4-bit NF4 base" in stderr and "vs the trial's eval loss" in stderr
    assert list(tmp_path.iterdir()) == []  # no staging directory, no parent created


@pytest.mark.parametrize("args, message", [
    (["--trial", "nope"], "unknown trial 'nope' (known: base, r4-4bit, r4-8bit, r4-16bit, r4-crashed)"),
    (["--trial", "base"], "trial 'base' is the baseline without an adapter"),
    (["--trial", "r4-crashed"], "trial 'r4-crashed' has no adapter (status ERROR)"),
    (["--trial", "r4-4bit", "--out", "{dir}/summary.csv/x"], "cannot write to"),
    (["--trial", "r4-4bit", "--out", "{dir}/trials"], "already exists and is not empty"),
    (["--trial", "r4-4bit", "--dtype", "bfloat16"], "--merge-base and --dtype apply to merged exports only"),
])
def test_bad_trial_or_out_exits_2_with_one_line(sweep, args, message):
    rc, stdout, stderr = run_main(sweep, *[a.format(dir=sweep) for a in args])
    assert rc == 2
    assert message in stderr and stderr.startswith("error: ") and stderr.count("\n") == 1


def test_missing_or_non_sweep_dir_exits_2(tmp_path):
    rc, _, stderr = run_main(tmp_path / "missing")
    assert rc == 2 and stderr == f"error: sweep directory not found: {tmp_path / 'missing'}\n"
    rc, _, stderr = run_main(tmp_path)
    assert rc == 2 and "is not a sweep directory" in stderr
    (tmp_path / "summary.csv").write_text("trial_id,eval_loss,status\nbase,1.0,TERMINATED\nx,,ERROR\n")
    rc, _, stderr = run_main(tmp_path)
    assert rc == 2 and "summary.csv marks no best trial" in stderr


def test_module_entry_point(sweep, model_cache):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "LORA_SWEEP_CACHE": str(model_cache)}
    proc = subprocess.run([sys.executable, "-m", "sweep.export", str(sweep), "--trial", "r4-16bit", "--merge"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exported trial r4-16bit" in proc.stdout
    assert (sweep / "export" / "r4-16bit-merged" / "model.safetensors").is_file()
    proc = subprocess.run([sys.executable, "-m", "sweep.export", str(sweep), "--trial", "nope"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown trial 'nope'" in proc.stderr and "Traceback" not in proc.stderr
