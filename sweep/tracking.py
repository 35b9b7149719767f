"""MLflow tracking: one experiment per sweep, one parent run, one nested child run per trial.

All writes happen here, in the driver, from Ray Tune's callback hooks (which run on the driver's
single Tune loop thread): one writer, so several trials finishing at once never collide on a
SQLite store. Ray's own MLflowLoggerCallback logs each trial as a flat, unparented run with its raw
config dict as params; we need nesting under the sweep's parent run, the resolved module names as
params and the adapter/generations from the trial's checkpoint as artifacts, hence this callback.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ray.tune import Callback

from sweep.space import TrialConfig

PARENT_TAG = "mlflow.parentRunId"
TRIAL_PARAMS = ("r", "bits", "lora_alpha", "lora_dropout", "learning_rate", "epochs", "batch_size", "grad_accum",
                "model", "dataset", "max_seq_length", "train_samples", "seed", "device", "max_new_tokens")
STEP_METRICS = ("loss", "learning_rate")


def tracking_uri(flag: str | None) -> str:
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def trial_params(cfg: TrialConfig) -> dict[str, str]:
    params = {k: str(getattr(cfg, k)) for k in TRIAL_PARAMS}
    params["targets"] = cfg.targets_label
    params["target_modules"] = ",".join(cfg.target_modules)
    params["generation"] = "greedy"
    return params


class MLflowTracker(Callback):
    def __init__(self, uri: str, experiment: str, parent_run_name: str, parent_params: dict[str, str]):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        parent = self.client.create_run(self.experiment_id, run_name=parent_run_name,
                                        tags={"lora_sweep.role": "sweep"})
        self.parent_id = parent.info.run_id
        self._log_params(self.parent_id, parent_params)
        self.runs: dict[str, str] = {}  # trial name -> child run id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])

    # ---- Tune hooks -------------------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        cfg = TrialConfig.from_dict(trial.config["trial"])
        if cfg.name in self.runs:
            return
        run = self.client.create_run(self.experiment_id, run_name=cfg.name, tags={
            PARENT_TAG: self.parent_id, "lora_sweep.role": "baseline" if cfg.baseline else "trial",
            "lora_sweep.trial": cfg.name,
            "lora_sweep.ray_trial_id": trial.trial_id,
        })
        self.runs[cfg.name] = run.info.run_id
        self._log_params(run.info.run_id, trial_params(cfg))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.runs.get(trial.config["trial"]["name"])
        if run_id is None or "eval_loss" in result or "step" not in result:
            return
        from mlflow.entities import Metric

        ts = int(result.get("timestamp", 0) * 1000)
        metrics = [Metric(k, float(result[k]), ts, int(result["step"])) for k in STEP_METRICS if k in result]
        self.client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.runs.get(trial.config["trial"]["name"])
        if run_id is None:
            return
        from mlflow.entities import Metric, Param, RunTag

        result = trial.last_result or {}
        numeric = {k: float(v) for k, v in result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
                   and k not in STEP_METRICS and k not in ("step", "epoch", "timestamp", "time_this_iter_s",
                                                           "time_total_s", "training_iteration", "pid",
                                                           "time_since_restore", "iterations_since_restore")}
        tags = [RunTag(f"lora_sweep.{k}", str(result[k])) for k in ("device_name", "gpu_uuid", "bnb_layer_type")
                if k in result]
        params = [Param("dataset_fingerprint", str(result["dataset_fingerprint"]))] if "dataset_fingerprint" in result else []
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
        run_id = self.runs.get(trial.config["trial"]["name"])
        if run_id is None:
            return
        error = trial.error_file and Path(trial.error_file).is_file() and Path(trial.error_file).read_text()
        if error:
            self.client.set_tag(run_id, "lora_sweep.error", error.strip().splitlines()[-1][:5000])
        self.client.set_terminated(run_id, "FAILED")

    # ---- end of the sweep -------------------------------------------------------------------------
    def finish(self, summary_dir: Path, rows: list[dict], failed: bool) -> None:
        for name in ("summary.md", "summary.csv", "samples.md"):
            self.client.log_artifact(self.parent_id, str(summary_dir / name))
        table = {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}
        self.client.log_table(self.parent_id, data=table, artifact_file="summary_table.json")
        self.client.set_terminated(self.parent_id, "FAILED" if failed else "FINISHED")
