"""The benchmark's plumbing on the CPU: every path through the real trial function on identical data and
steps, the ratios and drift against the first path, the JSON; bad arguments refused in one line."""

import json

import pytest

from sweep.bench import main, steady_rate
from tests.conftest import REPO, one_line_error

SMOKE = str(REPO / "search_spaces" / "smoke.py")


@pytest.mark.parametrize("argv, says", [
    (["--paths", "fast,turbo"], "--paths takes one or more of reference, fast, compiled, each once; got 'fast,turbo'"),
    (["--paths", "fast,fast"], "each once"),
    (["--steps", "3"], "--warmup in [0, steps); got --steps 3 --warmup 5"),
    (["--steps", "0", "--warmup", "0"], "--steps must be >= 1"),
    (["--trials", "nope", "--set", "model=bundled:desc-llama", "--steps", "3", "--warmup", "1"],
     "--trials nope: no such trial in"),
])
def test_bad_arguments_exit_2_in_one_line(argv, says, capsys):
    assert main([SMOKE, "--set", "device=cpu", *argv]) == 2
    assert says in one_line_error(capsys.readouterr().err)


def test_steady_rate_weighs_each_step_by_its_interval_and_skips_the_warm_up():
    steps = [(0.0, {"step": 1, "tokens_per_second": 1.0}), (10.0, {"step": 2, "tokens_per_second": 5.0}),
             (11.0, {"step": 3, "tokens_per_second": 100.0}), (13.0, {"step": 4, "tokens_per_second": 400.0})]
    assert steady_rate(steps, warmup=2) == pytest.approx((1 * 100 + 2 * 400) / 3)
    assert steady_rate(steps, warmup=0) == pytest.approx((10 * 5 + 1 * 100 + 2 * 400) / 13)
    assert steady_rate(steps, warmup=4) is None


def test_paths_are_the_reference_the_space_and_the_space_compiled():
    from trainers.config import TrialConfig
    from sweep.bench import run_config

    cfg = TrialConfig(name="t", index=0, model="m", dataset="d", r=8, targets="attention", bits=4)
    ref, fast, compiled = (run_config(cfg, p) for p in ("reference", "fast", "compiled"))
    assert (ref.trainer, ref.gradient_checkpointing, ref.compile) == ("reference", True, False)
    assert (fast.trainer, fast.gradient_checkpointing, fast.compile) == ("fast", False, False)
    assert (compiled.trainer, compiled.compile) == ("fast", True)
    assert {ref.logging_steps, fast.logging_steps, compiled.logging_steps} == {1}  # every step, for the steady rate


@pytest.mark.slow  # trains one smoke trial both ways (compiling is tested in tests/trainers/test_sft.py)
def test_bench_runs_every_path_on_the_same_steps_and_tokens(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main([SMOKE, "--set", "model=bundled:desc-llama", "--set", "device=cpu", "--steps", "6", "--warmup", "2",
                 "--trials", "r8-attention-4bit", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["path"] for r in runs] == ["reference", "fast"]
    assert {r["steps"] for r in runs} == {6}
    assert len({r["real_tokens"] for r in runs}) == 1  # the same examples, counted without padding
    ref, fast = runs
    assert ref["config"]["trainer"] == "reference" and fast["config"]["trainer"] == "fast"
    # LoRA dropout (0.05) draws other masks in padded and packed layouts, so the losses agree to the noise of
    # 6 steps, not to rounding (measured: 5e-6)
    assert fast["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-4)
    assert all(r["steady_tokens_per_second"] > 0 for r in runs)
    printed = capsys.readouterr().out
    assert "| trial | path | tokens/s | x reference | steady tokens/s | x reference |" in printed
    assert "| r8-attention-4bit | reference | " in printed and "| r8-attention-4bit | fast | " in printed
