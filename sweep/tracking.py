"""MLflow tracking: one experiment per sweep, one parent run, one nested child run per trial.

All writes happen here, in the driver, from Ray Tune's callback hooks (which run on the driver's
single Tune loop thread): one writer, so several trials finishing at once never collide on a
SQLite store. Ray's own MLflowLoggerCallback logs each trial as a flat, unparented run with its raw
config dict as params, and opens a new run for a trial after every restart; we need nesting under
the sweep's parent run, the resolved module names as params, the adapter and generations from the
trial's checkpoint as artifacts, and exactly one child run per trial however often the sweep is
interrupted, hence this callback. It keeps no state that matters: the parent is found by the
sweep's id and each child by its trial fingerprint (MLflow tags), so the copy Ray pickles into
its experiment state and restores on resume behaves exactly like a fresh one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ray.tune import Callback

from sweep.space import TrialConfig

PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG, TRIAL_TAG, ROLE_TAG = "lora_sweep.sweep_id", "lora_sweep.trial_fp", "lora_sweep.role"
TRIAL_PARAMS = ("r", "bits", "lora_alpha", "lora_dropout", "learning_rate", "epochs", "batch_size", "grad_accum",
                "model", "dataset", "max_seq_length", "train_samples", "seed", "device", "max_new_tokens")
STEP_METRICS = ("loss", "learning_rate")
NOT_METRICS = {"step", "epoch", "timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid",
               "time_since_restore", "iterations_since_restore", "checkpoint_step", "train_started_at"}


def tracking_uri(flag: str | None) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db; a relative SQLite path is made absolute
    so that a resume started from another directory finds the same store."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def redact(uri: str) -> str:
    """The URI without user:password, for logs and the manifest (MLflow also takes credentials from
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which never reach a file)."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def trial_params(cfg: TrialConfig) -> dict[str, str]:
    params = {k: str(getattr(cfg, k)) for k in TRIAL_PARAMS}
    params["targets"] = cfg.targets_label
    params["target_modules"] = ",".join(cfg.target_modules)
    params["generation"] = "greedy"
    return params


class MLflowTracker(Callback):
    def __init__(self, uri: str, experiment: str, sweep_id: str):
        self.uri, self.experiment, self.sweep_id = uri, experiment, sweep_id
        self._client = self._experiment_id = self._parent_id = None
        self._runs: dict[str, str] = {}  # trial fingerprint -> child run id (a cache of MLflow's answer)

    def __getstate__(self):  # Ray pickles callbacks into its experiment state
        return {"uri": self.uri, "experiment": self.experiment, "sweep_id": self.sweep_id}

    def __setstate__(self, state):
        self.__init__(**state)

    # ---- lookups ----------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
            exp = self._client.get_experiment_by_name(self.experiment)
            self._experiment_id = exp.experiment_id if exp else self._client.create_experiment(self.experiment)
        return self._client

    def _find(self, **tags) -> list:
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in {SWEEP_TAG: self.sweep_id, **tags}.items())
        return self.client.search_runs([self._experiment_id], filter_string=where, max_results=1000)

    @property
    def parent_id(self) -> str:
        if self._parent_id is None:
            found = self._find(**{ROLE_TAG: "sweep"})
            self._parent_id = found[0].info.run_id if found else None
        return self._parent_id

    def _child(self, cfg: TrialConfig, ray_trial_id: str = "") -> str:
        fp = cfg.fingerprint
        if fp not in self._runs:
            found = self._find(**{TRIAL_TAG: fp})
            if found:
                self._runs[fp] = found[0].info.run_id
            else:
                run = self.client.create_run(self._experiment_id, run_name=cfg.name, tags={
                    PARENT_TAG: self.parent_id, SWEEP_TAG: self.sweep_id, TRIAL_TAG: fp,
                    ROLE_TAG: "baseline" if cfg.baseline else "trial", "lora_sweep.trial": cfg.name,
                    "lora_sweep.ray_trial_id": ray_trial_id,
                })
                self._runs[fp] = run.info.run_id
                self._log_params(run.info.run_id, trial_params(cfg))
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
        self._close_running_trials()  # trials an interrupt (Ctrl-C) stopped
        for name in ("summary.md", "summary.csv", "samples.md"):
            self.client.log_artifact(self.parent_id, str(summary_dir / name))
        table = {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}
        self.client.log_table(self.parent_id, data=table, artifact_file="summary_table.json")
        self.client.set_terminated(self.parent_id, "FAILED" if failed else "FINISHED")

    # ---- Tune hooks -------------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self._child(TrialConfig.from_dict(trial.config["trial"]), trial.trial_id)
        self.client.update_run(run_id, status="RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "eval_loss" in result or "step" not in result:
            return
        from mlflow.entities import Metric

        run_id = self._child(TrialConfig.from_dict(trial.config["trial"]))
        ts = int(result.get("timestamp", 0) * 1000)
        metrics = [Metric(k, float(result[k]), ts, int(result["step"])) for k in STEP_METRICS if k in result]
        self.client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        from mlflow.entities import Metric, Param, RunTag

        run_id = self._child(TrialConfig.from_dict(trial.config["trial"]))
        result = trial.last_result or {}
        numeric = {k: float(v) for k, v in result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
                   and k not in STEP_METRICS and k not in NOT_METRICS}
        tags = [RunTag(f"lora_sweep.{k}", str(result[k])) for k in ("device_name", "gpu_uuid", "bnb_layer_type")
                if k in result]
        logged = self.client.get_run(run_id).data.params
        params = [Param("dataset_fingerprint", str(result["dataset_fingerprint"]))] \
            if "dataset_fingerprint" in result and "dataset_fingerprint" not in logged else []
        self.client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in numeric.items()], tags=tags,
                              params=params)
        if trial.checkpoint is not None:
            root = Path(trial.checkpoint.path)
            for name in ("generations.md", "generations.json", "metrics.json"):
                if (root / name).is_file():
                    self.client.log_artifact(run_id, str(root / name))
            if (root / "adapter").is_dir():
                self.client.log_artifacts(run_id, str(root / "adapter"), artifact_path="adapter")
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._child(TrialConfig.from_dict(trial.config["trial"]))
        error = error_line(trial.error_file)
        if error:
            self.client.set_tag(run_id, "lora_sweep.error", error[:5000])
        self.client.set_terminated(run_id, "FAILED")


def error_line(error_file: str | None) -> str:
    """The last line of a trial's traceback (``RuntimeError: ...``): what went wrong, in one line."""
    if not error_file or not Path(error_file).is_file():
        return ""
    lines = [ln.strip() for ln in Path(error_file).read_text().splitlines() if ln.strip()]
    return lines[-1] if lines else ""
