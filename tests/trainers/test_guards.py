"""A trial that stops learning fails: a NaN or infinite loss or gradient norm is an error with its step."""

import os
from types import SimpleNamespace

import pytest

from trainers.guards import FiniteLossGuard, NonFiniteLoss, check_finite


@pytest.mark.parametrize("logs, says", [
    ({"loss": float("nan"), "grad_norm": 0.5}, "training loss is nan at step 7: training diverged"),
    ({"loss": float("inf")}, "training loss is inf at step 7"),
    ({"loss": 2.0, "grad_norm": float("nan")}, "gradient norm is nan at step 7"),
])
def test_a_non_finite_logged_step_fails_the_trial(logs, says):
    with pytest.raises(NonFiniteLoss, match=says):
        FiniteLossGuard().on_log(None, SimpleNamespace(global_step=7), None, logs=logs)


def test_finite_steps_and_other_logs_pass():
    guard = FiniteLossGuard()
    guard.on_log(None, SimpleNamespace(global_step=1), None, logs={"loss": 2.0, "grad_norm": 0.5, "learning_rate": 0})
    guard.on_log(None, SimpleNamespace(global_step=1), None, logs={"train_runtime": 3.0})
    check_finite("eval loss", 1.5)
    with pytest.raises(NonFiniteLoss, match=r"^eval loss is nan: training diverged"):
        check_finite("eval loss", float("nan"))


@pytest.mark.parametrize("share, fraction", [(0.34, 0.34 - 1.5 / 80), (0.02, 0.05), (1.0, None), (0.0, None)])
def test_a_packed_trial_caps_its_allocator_at_its_share(monkeypatch, share, fraction):
    """A trial that outgrows its share must fail alone: its caching allocator is capped at the share less the
    CUDA context counted on top (the floor: 5% of the GPU); a whole GPU, or none, is not capped. On an H200
    under MPS, a trial that asked for the whole GPU at 0.34 (``faults`` mode ``oom``) failed with "46.03 GiB
    allowed", twice, while the two trials beside it finished (README, "GPU memory")."""
    import torch

    from trainers import trial
    from trainers.models import GPU_SHARE_ENV

    caps = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, *a: caps.append(f))
    monkeypatch.setenv(GPU_SHARE_ENV, "1")  # recorded: whatever limit_gpu_memory sets is undone after the test
    monkeypatch.delenv(GPU_SHARE_ENV)
    trial.limit_gpu_memory(share)
    if fraction is None:
        assert caps == [] and GPU_SHARE_ENV not in os.environ
    else:
        assert caps == [pytest.approx(fraction)]
        assert os.environ[GPU_SHARE_ENV] == str(share)  # a random: base then builds on the CPU


def test_a_trial_that_ran_out_of_its_share_is_not_run_again_at_that_share_only(tmp_path):
    """The record a capped out-of-memory leaves beside the trial's checkpoints (Ray's storage: here a local
    directory through pyarrow, as in a sweep directory): the same trial at the same or a smaller share ends
    at once; a larger share, another trial, or a damaged record runs as usual."""
    from trainers.checkpoints import OUT_OF_MEMORY, record_out_of_memory, repeated_out_of_memory

    trial_dir = tmp_path / "tune" / "exp" / "trial_1"
    assert repeated_out_of_memory(str(trial_dir), None, fingerprint="f", share=0.34) is None  # never ran
    record_out_of_memory(str(trial_dir), None, fingerprint="f", share=0.34, error="CUDA out of memory. x allowed;")

    def again(fp, share):
        return repeated_out_of_memory(str(trial_dir), None, fingerprint=fp, share=share)

    assert again("f", 0.34) == again("f", 0.2) == "CUDA out of memory. x allowed;"
    assert again("f", 0.5) is None and again("g", 0.34) is None
    (trial_dir / OUT_OF_MEMORY).write_text('{"fingerprint": "f", "sha')
    assert again("f", 0.34) is None
