"""Ray Tune's hooks, turned into our events: what each trial reported, by kind (``trainers/config.py``),
goes to the ledger, to MLflow and to the console. Runs on the driver's single Tune loop thread."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from ray.tune import Callback

from sweep import console, sweepdir
from sweep.searchers import trial_config
from sweep.tracking import MLflowTracker
from sweep.tuner import copy_result
from trainers.config import OOM_CAPPED, OOM_NOT_AGAIN, EvalReport, StepReport, TrialResult, report_kind


def error_line(error_file: str | None) -> str:
    """The last line of a trial's traceback (``RuntimeError: ...``): what went wrong, in one line."""
    if not error_file or not Path(error_file).is_file():
        return ""
    lines = [ln.strip() for ln in Path(error_file).read_text().splitlines() if ln.strip()]
    return out_of_memory(lines[-1]) if lines else ""


OOM = "torch.OutOfMemoryError: CUDA out of memory."
SHARE_ALLOWS = "its share of the GPU allows"  # in the line of a trial that ran out of its share's cap


def out_of_memory(line: str) -> str:
    """PyTorch's CUDA out-of-memory line (about 700 characters: every process on the GPU, the allocator's
    state, a link) as what it means for a trial: how much it asked for, its cap on a shared GPU, and what
    to change. The whole message stays in the trial's log, which the console line names."""
    if not line.startswith(OOM):
        return line
    size = r"([\d.]+ [KMGT]?i?B)"
    tried, allowed, free = (re.search(p, line) for p in (f"Tried to allocate {size}", size + OOM_CAPPED,
                                                          f"of which {size} is free"))
    said = [f"asked for {tried[1]} more"] if tried else []
    said += [f"{SHARE_ALLOWS} {allowed[1]}"] if allowed else [f"{free[1]} free on the GPU"] if free else []
    less = "make it need less (gradient_checkpointing=True, or a smaller batch_size with a larger grad_accum)"
    larger = "give it a larger share (--gpus-per-trial) or " if allowed else ""  # capped: packed (limit_gpu_memory)
    again = " (as when it ran before at this share: not run again)" if OOM_NOT_AGAIN in line else ""
    return OOM.rstrip(".") + (f" ({'; '.join(said)})" if said else "") + f"{again}: {larger}{less}"


class TrialEvents(Callback):
    """Each trial's start, reports (steps, evals), end (finished, or stopped early by ``stop_reason``, the
    experiment's scheduler), failure and retry, for the ledger, the MLflow tracker and the driver's console
    (looked up, not held: Tune pickles this callback into its experiment state)."""

    def __init__(self, sweep_dir: str, tracker: MLflowTracker, stop_reason: str = ""):
        self.sweep_dir, self.tracker, self.stop_reason = sweep_dir, tracker, stop_reason
        self._params: dict[str, dict] = {}  # Ray trial id -> its config, name and fingerprint, built once

    def param(self, trial) -> dict:
        if trial.trial_id not in self._params:
            self._params[trial.trial_id] = trial_config(trial).to_param()
        return self._params[trial.trial_id]

    @staticmethod
    def _console(method: str, *args) -> None:
        if (c := console.active()) is not None:
            getattr(c, method)(*args)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.tracker.trial_started(self.param(trial), trial.trial_id)
        self._console("trial_started", self.param(trial)["name"], self.param(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        kind, timestamp = report_kind(result), result.get("timestamp", 0)
        if kind == StepReport.KIND:
            self.tracker.trial_step(self.param(trial), StepReport.from_report(result), timestamp)
        elif kind == EvalReport.KIND:
            self.tracker.trial_eval(self.param(trial), EvalReport.from_report(result), timestamp)
        self._console("trial_report", self.param(trial)["name"], result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        param, last = self.param(trial), trial.last_result or {}
        if report_kind(last) == TrialResult.KIND:
            # the result files come through Ray's checkpoint (local, NFS or S3) into the sweep directory, at once
            checkpoint = trial.checkpoint and copy_result(trial.checkpoint, Path(self.sweep_dir), param["name"])
            sweepdir.record_trial(self.sweep_dir, param["fingerprint"], param["name"], sweepdir.TERMINATED)
            self.tracker.trial_finished(param, TrialResult.from_dict(last), checkpoint)
            self._console("trial_ended", param["name"], sweepdir.TERMINATED)
            return
        self.trial_stopped(trial, param, last)

    def trial_stopped(self, trial, param: dict, last: dict) -> None:
        # Ray completes a trial without its final report only when the scheduler stopped it (a budget's or
        # Ctrl-C's stop does not come through here): it ends STOPPED on its last eval and that checkpoint.
        evaluated = EvalReport.from_report(last) if report_kind(last) == EvalReport.KIND else None
        sweepdir.record_trial(self.sweep_dir, param["fingerprint"], param["name"], sweepdir.STOPPED,
                              reason=self.stop_reason, steps=evaluated and evaluated.train_steps)
        with tempfile.TemporaryDirectory(prefix="lora-sweep-") as tmp:  # its last eval checkpoint, wherever stored
            checkpoint = Path(trial.checkpoint.to_directory(tmp)) if trial.checkpoint is not None else None
            self.tracker.trial_stopped(param, evaluated and evaluated.train_steps, self.stop_reason, checkpoint)
        self._console("trial_ended", param["name"], sweepdir.STOPPED)

    def on_trial_error(self, iteration, trials, trial, **info):
        param, error = self.param(trial), error_line(trial.error_file)
        sweepdir.record_trial(self.sweep_dir, param["fingerprint"], param["name"], sweepdir.ERROR, error)
        self.tracker.trial_failed(param, error)
        self._console("trial_ended", param["name"], sweepdir.ERROR, error)

    def on_trial_recover(self, iteration, trials, trial, **info):
        error = error_line(trial.error_file)
        self._console("trial_retrying", self.param(trial)["name"], error, SHARE_ALLOWS in error)

    def on_step_end(self, iteration, trials, **info):
        self._console("tick")


def close_stopped(out: Path, tracker: MLflowTracker, outcomes: dict) -> None:
    """Trials a budget stopped: Ray ends them without a completion event, so the ledger and MLflow learn it
    here, after the run. Early-stopped ones were closed by ``on_trial_complete`` already (closing is
    idempotent)."""
    recorded = sweepdir.ledger(out)
    for o in outcomes.values():
        if o.status != sweepdir.STOPPED or recorded.get(o.cfg.fingerprint, {}).get("status") == sweepdir.STOPPED:
            continue
        sweepdir.record_trial(out, o.cfg.fingerprint, o.cfg.name, sweepdir.STOPPED, reason=o.reason, steps=o.steps)
        tracker.trial_stopped(o.cfg.to_param(), o.steps, o.reason, out / sweepdir.TRIALS_DIR / o.cfg.name)
