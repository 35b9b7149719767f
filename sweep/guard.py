"""Stop a sweep cleanly when its records cannot be written (a full disk, a tracking store gone away).

Ray Tune catches an exception raised by a callback's trial hook, logs its traceback and marks that
trial errored, then carries on: each trial in turn would fail the same way, tracebacks would scroll
by and the parent run would stay RUNNING. ``Guarded`` wraps our callback instead. The first failure
is remembered and nothing more is recorded; at the end of Tune's current loop step ``RecordingFailed``
ends ``Tuner.fit`` (Tune stops the trials), and the driver closes the runs, writes what table it can
and exits 1 with one line. The failure is kept in this module, not in the callback: Tune unpickles
its own copy of the callback when a sweep resumes, so the driver holds no reference to it.
"""

from __future__ import annotations

from ray.tune import Callback

FAILURES: list[str] = []  # this driver process's recording failures, first one first

HOOKS = ("setup", "on_step_begin", "on_trial_start", "on_trial_restore", "on_trial_save", "on_trial_result",
         "on_checkpoint", "on_trial_complete", "on_trial_recover", "on_trial_error", "on_experiment_end")


class RecordingFailed(Exception):
    """A trial's result or state could not be recorded: the sweep stops (the driver reports it)."""


def describe(e: BaseException) -> str:
    """One line: ``No space left on device: /path/ledger.json`` or ``MlflowException: ...``."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 300 else text[:297] + "..."


class Guarded(Callback):
    """``inner``'s hooks, each run at most until the first one fails."""

    def __init__(self, inner: Callback):
        self.inner = inner

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)

    def on_step_end(self, iteration, trials, **info):
        _call(self.inner, "on_step_end", iteration=iteration, trials=trials, **info)
        if FAILURES:
            raise RecordingFailed(FAILURES[0])


def _call(inner: Callback, hook: str, *args, **kwargs) -> None:
    if FAILURES:
        return
    try:
        getattr(inner, hook)(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever it is, the records are now incomplete: stop the sweep
        FAILURES.append(describe(e))


def _forwarder(hook: str):
    def forward(self, *args, **kwargs):
        _call(self.inner, hook, *args, **kwargs)

    forward.__name__ = hook
    return forward


for _hook in HOOKS:
    setattr(Guarded, _hook, _forwarder(_hook))
