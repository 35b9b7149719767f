"""A trial that stops learning must fail, not finish: a NaN or infinite loss (a diverged run, a learning
rate far too high) would otherwise end TERMINATED, with a NaN eval loss and an adapter of NaNs.

``check_finite`` is the rule; ``FiniteLossGuard`` applies it to every step the Trainer logs (the loss,
and the gradient norm, which turns NaN on the same step the weights do).
"""

from __future__ import annotations

import math

from transformers import TrainerCallback


class NonFiniteLoss(RuntimeError):
    """The loss is NaN or infinite: the trial fails with this message (ERROR in the table)."""


def check_finite(what: str, value: float, step: int | None = None) -> None:
    if not math.isfinite(value):
        at = f" at step {step}" if step is not None else ""
        raise NonFiniteLoss(f"{what} is {value}{at}: training diverged (try a lower learning_rate)")


class FiniteLossGuard(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, what in (("loss", "training loss"), ("grad_norm", "gradient norm")):
            if logs and isinstance(logs.get(key), (int, float)):
                check_finite(what, float(logs[key]), state.global_step)
