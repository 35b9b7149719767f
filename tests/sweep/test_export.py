"""sweep.export on a real (tiny) sweep: adapters and merged models from 4/8/16-bit trials, losses re-checked."""

import contextlib
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
                          max_new_tokens=8, heldout_prompts=1)
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


@pytest.fixture(scope="module")
def exports(sweep, tmp_path_factory):
    """Every trial exported both ways, once: (bits, merged) -> (rc, out dir, stdout, stderr)."""
    root = tmp_path_factory.mktemp("exports")
    done = {}
    for bits in BITS:
        for merged in (False, True):
            out = root / f"{bits}-{'merged' if merged else 'adapter'}"
            merge = ["--merge"] if merged else []
            rc, stdout, stderr = run_main(sweep, "--trial", f"r4-{bits}bit", "--out", out, *merge)
            done[bits, merged] = (rc, out, stdout, stderr)
    return done


def trial_cfg(sweep, bits) -> TrialConfig:
    return TrialConfig.from_dict(json.loads((sweep / "trials" / f"r4-{bits}bit" / "config.json").read_text()))


def trial_loss(sweep, bits) -> float:
    return json.loads((sweep / "trials" / f"r4-{bits}bit" / "metrics.json").read_text())["eval_loss"]


@pytest.mark.parametrize("bits", BITS)
def test_adapter_export_reloads_with_peft_and_reproduces_the_trial(sweep, exports, bits):
    rc, out, stdout, stderr = exports[bits, False]
    assert rc == 0, stderr[-2000:]
    info = json.loads((out / "export.json").read_text())
    assert (info["trial_id"], info["base_model"], info["bits"], info["merged"]) == \
        (f"r4-{bits}bit", "random:tiny-llama", bits, False)
    # Same quantized base, same adapter, same split: the trial's own number comes back.
    assert info["eval_loss_trial"] == trial_loss(sweep, bits)
    assert info["eval_loss_adapter"] == pytest.approx(info["eval_loss_trial"], rel=1e-4)
    assert f"r4-{bits}bit" in stdout and str(out.resolve()) in stdout

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys())  # LoRA factors only, no base lm_head copy
    cfg = trial_cfg(sweep, bits)
    model = PeftModel.from_pretrained(load_base(cfg, checkpoint_path(cfg)), str(out))
    loss = M.eval_loss(cfg, model, load_tokenizer(str(out)), M.rebuild_splits(cfg))
    assert loss == pytest.approx(info["eval_loss_adapter"], rel=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_merged_export_is_a_plain_model_with_the_adapters_loss(sweep, exports, bits):
    rc, out, stdout, stderr = exports[bits, True]
    assert rc == 0, stderr[-2000:]
    info = json.loads((out / "export.json").read_text())
    tol = M.MERGE_TOLERANCE[torch.float32]
    print(f"{bits}-bit: adapter {info['eval_loss_adapter']!r} merged {info['eval_loss_merged']!r} "
          f"rel {info['merge_rel_diff']:.1e}")
    assert info["merged"] and info["dtype"] == "float32" and info["merge_tolerance"] == tol
    assert info["merge_rel_diff"] <= tol
    assert info["eval_loss_merged"] == pytest.approx(info["eval_loss_adapter"], rel=tol)
    assert info["eval_loss_trial"] == trial_loss(sweep, bits)
    assert info["diff_vs_trial"] == pytest.approx(info["eval_loss_merged"] - info["eval_loss_trial"])
    assert "merged model" in stdout and f"{info['eval_loss_merged']:.6f}" in stdout

    assert not (out / "adapter_config.json").exists()
    with safe_open(out / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    cfg = trial_cfg(sweep, bits)
    loss = M.eval_loss(cfg, model, load_tokenizer(str(out)), M.rebuild_splits(cfg))
    assert loss == pytest.approx(info["eval_loss_merged"], rel=1e-6)
    # The update really is in the weights: not the untouched base.
    base = AutoModelForCausalLM.from_pretrained(checkpoint_path(cfg), dtype=torch.float32)
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_best_is_the_lowest_finished_trial_never_base(sweep):
    rc, stdout, stderr = run_main(sweep)
    assert rc == 0, stderr[-2000:]
    assert "best trial: r4-8bit" in stdout
    out = sweep / "export" / "r4-8bit"  # the default --out
    assert json.loads((out / "export.json").read_text())["trial_id"] == "r4-8bit"


def test_a_merge_that_changes_the_loss_is_refused_and_nothing_is_written(sweep, tmp_path, monkeypatch):
    monkeypatch.setattr(M, "merge", lambda model: model.unload())  # drops the adapter instead of merging it
    rc, stdout, stderr = run_main(sweep, "--trial", "r4-16bit", "--merge", "--out", tmp_path / "out")
    assert rc == 1
    assert "MERGE CHECK FAILED" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--trial", "nope"], "unknown trial 'nope' (known: base, r4-4bit, r4-8bit, r4-16bit, r4-crashed)"),
    (["--trial", "base"], "trial 'base' is the baseline without an adapter"),
    (["--trial", "r4-crashed"], "trial 'r4-crashed' has no adapter (status ERROR)"),
    (["--trial", "r4-4bit", "--out", "{dir}/summary.csv/x"], "cannot write to"),
    (["--trial", "r4-4bit", "--out", "{dir}/trials"], "already exists and is not empty"),
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
