"""Ray Tune's hooks, turned into our events: what each trial reported, by kind (``trainers/config.py``),
goes to the ledger, to MLflow and to the console. Runs on the driver's single Tune loop thread."""

from __future__ import annotations

from pathlib import Path

from ray.tune import Callback

from sweep import console, sweepdir
from sweep.tracking import MLflowTracker
from trainers.config import StepReport, TrialResult, report_kind


def error_line(error_file: str | None) -> str:
    """The last line of a trial's traceback (``RuntimeError: ...``): what went wrong, in one line."""
    if not error_file or not Path(error_file).is_file():
        return ""
    lines = [ln.strip() for ln in Path(error_file).read_text().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class TrialEvents(Callback):
    """Each trial's start, reports, end, failure and retry, for the ledger, the MLflow tracker and the
    driver's console (looked up, not held: Tune pickles this callback into its experiment state)."""

    def __init__(self, sweep_dir: str, tracker: MLflowTracker):
        self.sweep_dir, self.tracker = sweep_dir, tracker

    @staticmethod
    def _console(method: str, *args) -> None:
        if (c := console.active()) is not None:
            getattr(c, method)(*args)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.tracker.trial_started(trial.config["trial"], trial.trial_id)
        self._console("trial_started", trial.config["trial"]["name"])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if report_kind(result) == StepReport.KIND:
            self.tracker.trial_step(trial.config["trial"], StepReport.from_report(result), result.get("timestamp", 0))
        self._console("trial_report", trial.config["trial"]["name"], result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        param, last, status = trial.config["trial"], trial.last_result or {}, sweepdir.TERMINATED
        result = TrialResult.from_dict(last) if report_kind(last) == TrialResult.KIND else None
        checkpoint = Path(trial.checkpoint.path) if trial.checkpoint is not None else None
        sweepdir.record_trial(self.sweep_dir, param["fingerprint"], param["name"], status)
        self.tracker.trial_finished(param, result, checkpoint)
        self._console("trial_ended", param["name"], status)

    def on_trial_error(self, iteration, trials, trial, **info):
        param, error = trial.config["trial"], error_line(trial.error_file)
        sweepdir.record_trial(self.sweep_dir, param["fingerprint"], param["name"], sweepdir.ERROR, error)
        self.tracker.trial_failed(param, error)
        self._console("trial_ended", param["name"], sweepdir.ERROR, error)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._console("trial_retrying", trial.config["trial"]["name"], error_line(trial.error_file))

    def on_step_end(self, iteration, trials, **info):
        self._console("tick")
