"""A trial that stops learning fails: a NaN or infinite loss or gradient norm is an error with its step."""

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
