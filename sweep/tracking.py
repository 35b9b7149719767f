"""MLflow tracking: one experiment per sweep, one parent run, one nested child run per trial.

All writes happen in the driver, from Ray Tune's callback hooks (``sweep/callbacks.py``), which run on
the driver's single Tune loop thread: one writer, so several trials finishing at once never collide
on a SQLite store. Ray's own MLflowLoggerCallback logs each trial as a flat, unparented run with its
raw config dict as params, and opens a new run for a trial after every restart; we need nesting under
the sweep's parent run, the resolved module names as params, the adapter and generations from the
trial's checkpoint as artifacts, and exactly one child run per trial however often the sweep is
interrupted, hence this class. It keeps no state that matters: the parent is found by the sweep's id
and each child by its trial fingerprint (MLflow tags), so the copy Ray pickles into its experiment
state and restores on resume behaves exactly like a fresh one. Nothing here imports Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

from sweep.store import redact, strip_credentials, tracking_uri  # noqa: F401 - redact, tracking_uri re-exported

from trainers.config import ADAPTER_DIR, GENERATIONS_JSON, GENERATIONS_MD, METRICS_FILE, EvalReport, StepReport, \
    TrialConfig, TrialResult

PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG, TRIAL_TAG, ROLE_TAG = "lora_sweep.sweep_id", "lora_sweep.trial_fp", "lora_sweep.role"
ERROR_TAG, STOPPED_TAG = "lora_sweep.error", "lora_sweep.stopped"
TRIAL_PARAMS = ("r", "bits", "lora_alpha", "alpha_rule", "lora_dropout", "learning_rate", "epochs", "batch_size",
                "grad_accum", "model", "dataset", "max_seq_length", "train_samples", "seed", "seeds", "device",
                "max_new_tokens", "eval_every", "data_format", "loss_on", "dataset_split", "dataset_subset")
STEP_METRICS = ("loss", "learning_rate", "tokens_per_second")
SYSTEM_PREFIX = "system/"  # where MLflow's own system metrics live, so its "System metrics" charts show ours
# The experiment kind MLflow's UI reads to open an experiment on its runs rather than on the GenAI trace
# overview (the value its kind selector writes for "Machine learning"; see the note in the README).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def trial_params(cfg: TrialConfig) -> dict[str, str]:
    params = {k: str(getattr(cfg, k)) for k in TRIAL_PARAMS}
    params["targets"] = cfg.targets_label
    params["target_modules"] = ",".join(cfg.target_modules)
    params["generation"] = "greedy"
    params["train_seed"], params["config"] = str(cfg.train_seed), cfg.group  # seed repeats share "config"
    params["template"] = cfg.template or "(the format's own)"
    params["end_marker"] = cfg.marker or "(none: EOS)"
    params["chat_template"] = "(the space's)" if cfg.chat_template else "(the tokenizer's)"
    if cfg.columns:
        params["columns"] = ",".join(f"{k}:{v}" for k, v in sorted(cfg.columns.items()))
    return params


class MLflowTracker:
    def __init__(self, uri: str, experiment: str, sweep_id: str):
        # never a credential here: Ray pickles this object into tune/tuner.pkl (and older sweeps' pickles
        # may still carry one, hence the strip on the way in too)
        self.uri, self.experiment, self.sweep_id = strip_credentials(uri), experiment, sweep_id
        self._client = self._experiment_id = self._parent_id = None
        self._runs: dict[str, str] = {}  # trial fingerprint -> child run id (a cache of MLflow's answer)
        self._last_step: dict[str, int] = {}  # trial fingerprint -> last step logged (likewise)

    def __getstate__(self):  # Ray pickles the callback holding this into its experiment state
        return {"uri": self.uri, "experiment": self.experiment, "sweep_id": self.sweep_id}

    def __setstate__(self, state):
        self.__init__(**state)

    # ---- lookups ----------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            # MLflow prints "View run ... at <uri>" for every run it closes on a server: noise, and where
            # the URI once carried a password, a leak
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            self._client = MlflowClient(tracking_uri=self.uri)
            exp = self._client.get_experiment_by_name(self.experiment)
            self._experiment_id = exp.experiment_id if exp else self._client.create_experiment(
                self.experiment, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        return self._client

    @property
    def experiment_id(self) -> str:
        _ = self.client
        return self._experiment_id

    def _find(self, **tags) -> list:
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in {SWEEP_TAG: self.sweep_id, **tags}.items())
        return self.client.search_runs([self._experiment_id], filter_string=where, max_results=1000)

    @property
    def parent_id(self) -> str:
        if self._parent_id is None:
            found = self._find(**{ROLE_TAG: "sweep"})
            self._parent_id = found[0].info.run_id if found else None
        return self._parent_id

    def _child(self, param: dict, ray_trial_id: str = "") -> str:
        """The child run of the trial whose Tune param-space entry is ``param``; created on first sight."""
        fp = param["fingerprint"]
        if fp not in self._runs:
            found = self._find(**{TRIAL_TAG: fp})
            if found:
                self._runs[fp] = found[0].info.run_id
            else:
                run = self.client.create_run(self._experiment_id, run_name=param["name"], tags={
                    PARENT_TAG: self.parent_id, SWEEP_TAG: self.sweep_id, TRIAL_TAG: fp,
                    ROLE_TAG: "baseline" if param["baseline"] else "trial", "lora_sweep.trial": param["name"],
                    "lora_sweep.ray_trial_id": ray_trial_id,
                })
                self._runs[fp] = run.info.run_id
                self._log_params(run.info.run_id, trial_params(TrialConfig.from_param(param)))
        return self._runs[fp]

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])

    # ---- the driver, before and after Tune ---------------------------------------------------------
    def start(self, parent_params: dict[str, str]) -> str:
        """Create the sweep's parent run, or reopen it on resume; close what a killed driver left RUNNING."""
        if self.parent_id is None:
            run = self.client.create_run(self._experiment_id, run_name=self.experiment,
                                         tags={ROLE_TAG: "sweep", SWEEP_TAG: self.sweep_id})
            self._parent_id = run.info.run_id
            self._log_params(self._parent_id, parent_params)
        else:
            self.client.update_run(self._parent_id, status="RUNNING")
        self._close_running_trials()  # their trials died with the old driver
        return self._parent_id

    def _close_running_trials(self) -> None:
        for run in self._find():
            if run.info.run_id != self._parent_id and run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, "KILLED")

    def finish(self, summary_dir: Path, rows: list[dict], failed: bool) -> None:
        try:
            self._close_running_trials()  # trials an interrupt (Ctrl-C) stopped
            for name in ("summary.md", "summary.csv", "samples.md", "report.html"):
                if (summary_dir / name).is_file():  # a full disk may have stopped the driver writing them
                    self.client.log_artifact(self.parent_id, str(summary_dir / name))
            if (summary_dir / "plots").is_dir():
                self.client.log_artifacts(self.parent_id, str(summary_dir / "plots"), artifact_path="plots")
            table = {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}
            self.client.log_table(self.parent_id, data=table, artifact_file="summary_table.json")
        finally:  # whatever failed above, the parent run must not stay RUNNING
            self.client.set_terminated(self.parent_id, "FAILED" if failed else "FINISHED")

    def close(self, status: str) -> None:
        """End the sweep's runs when the driver leaves early: the parent as ``status`` (FAILED, KILLED),
        trials still RUNNING as KILLED."""
        try:
            self._close_running_trials()
        finally:
            if self.parent_id is not None:
                self.client.set_terminated(self.parent_id, status)

    def log_search(self, importance: dict[str, float], section: str) -> None:
        """On the parent run: each searched axis's importance (a metric per axis) and the search section."""
        from mlflow.entities import Metric

        if importance:
            self.client.log_batch(self.parent_id, metrics=[Metric(f"importance.{k}", v, 0, 0)
                                                           for k, v in importance.items()])
            self.client.log_dict(self.parent_id, importance, "importance.json")
        self.client.log_text(self.parent_id, section, "search.md")

    # ---- one trial's life (called by sweep.callbacks.TrialEvents) ---------------------------------
    def trial_started(self, param: dict, ray_trial_id: str) -> None:
        self.client.update_run(self._child(param, ray_trial_id), status="RUNNING")

    def trial_step(self, param: dict, step: StepReport, timestamp: float) -> None:
        from mlflow.entities import Metric

        run_id, fp = self._child(param), param["fingerprint"]
        if fp not in self._last_step:
            history = self.client.get_metric_history(run_id, STEP_METRICS[0])
            self._last_step[fp] = max((m.step for m in history), default=-1)
        if step.step <= self._last_step[fp]:
            return  # a retried or resumed trial repeats steps MLflow already has: one point per step
        ms = int(timestamp * 1000)
        metrics = [Metric(k, float(getattr(step, k)), ms, step.step) for k in STEP_METRICS]
        metrics += [Metric(SYSTEM_PREFIX + k, float(v), ms, step.step) for k, v in step.system.items()]
        self.client.log_batch(run_id, metrics=metrics)
        self._last_step[fp] = step.step

    def trial_eval(self, param: dict, report: EvalReport, timestamp: float) -> None:
        """A held-out eval during training: the eval_loss curve, which the final eval loss ends."""
        from mlflow.entities import Metric

        metric = Metric("eval_loss", report.eval_loss, int(timestamp * 1000), report.train_steps)
        self.client.log_batch(self._child(param), metrics=[metric])

    def trial_finished(self, param: dict, result: TrialResult | None, result_dir: Path | None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        run_id = self._child(param)
        if result is not None:
            tags = [RunTag(f"lora_sweep.{k}", str(getattr(result, k))) for k in TrialResult.names("tag")]
            logged = self.client.get_run(run_id).data.params
            params = [Param(k, str(getattr(result, k))) for k in TrialResult.names("param") if k not in logged]
            # at the last step, so that eval_loss's latest value is the final one, after the periodic evals
            metrics = [Metric(k, v, 0, result.train_steps) for k, v in result.mlflow_metrics().items()]
            self.client.log_batch(run_id, metrics=metrics, tags=tags, params=params)
        self._log_results(run_id, result_dir)
        self.client.set_terminated(run_id, "FINISHED")

    def _log_results(self, run_id: str, result_dir: Path | None) -> None:
        if result_dir is None:
            return
        for name in (GENERATIONS_MD, GENERATIONS_JSON, METRICS_FILE):
            if (result_dir / name).is_file():
                self.client.log_artifact(run_id, str(result_dir / name))
        if (result_dir / ADAPTER_DIR).is_dir():
            self.client.log_artifacts(run_id, str(result_dir / ADAPTER_DIR), artifact_path=ADAPTER_DIR)

    def trial_stopped(self, param: dict, steps: int | None, reason: str, result_dir: Path | None) -> None:
        """Ended early by early stopping or a budget: FINISHED (not an error), tagged with why and at which
        step; its eval_loss curve (streamed) ends at its last eval, and the adapter of that step is attached.
        Once per trial: a run already closed is left as it is."""
        from mlflow.entities import Metric, RunTag

        run_id = self._child(param)
        if self.client.get_run(run_id).info.status == "FINISHED":
            return
        where = f" at step {steps}" if steps is not None else ""
        tags = [RunTag(STOPPED_TAG, f"{reason or 'stopped'}{where}"), RunTag("lora_sweep.status", "STOPPED")]
        metrics = [Metric("stopped_at_step", steps, 0, steps)] if steps is not None else []
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self._log_results(run_id, result_dir)
        self.client.set_terminated(run_id, "FINISHED")

    def trial_failed(self, param: dict, error: str) -> None:
        run_id = self._child(param)
        if error:
            self.client.set_tag(run_id, ERROR_TAG, error[:5000])
        self.client.set_terminated(run_id, "FAILED")
