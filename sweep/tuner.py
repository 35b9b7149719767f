"""Ray Tune for one sweep: build the Tuner (or restore it to resume), run it, and collect each trial's
outcome, copying its result files to ``DIR/trials/<trial>/`` where people look for them."""

from __future__ import annotations

import shutil
from pathlib import Path

from sweep import sweepdir
from sweep.cluster import trial_resources
from sweep.sweepdir import TrialOutcome
from trainers.config import TrialResult, report_kind


def build_tuner(out: Path, planned, *, shares: dict[str, float], max_failures: int, callbacks: list):
    """A new Tuner over the planned trials, or Ray Tune's own restore of the one in ``out``: finished
    trials stay finished, the others continue from their checkpoints."""
    from ray import tune

    from trainers.entry import LOG_DIR_KEY, tune_trainable

    tune_dir = out / sweepdir.TUNE_DIR
    trainable = tune.with_resources(tune_trainable, trial_resources(shares))
    params = [{**p.cfg.to_param(), "gpu_share": shares.get(p.cfg.name, 0.0)} for p in planned]
    param_space = {"trial": tune.grid_search(params), "tune_dir": str(tune_dir),
                   LOG_DIR_KEY: str(out / sweepdir.LOGS_DIR)}
    if tune.Tuner.can_restore(str(tune_dir)):
        return tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space)
    trial_name = lambda t: t.config["trial"]["name"]  # noqa: E731 - names like r8-attention-4bit
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            # verbose=0: our console (sweep/console.py) reports progress; Tune's tables would repeat it
            name=sweepdir.TUNE_DIR, storage_path=str(out), callbacks=callbacks, verbose=0,
            failure_config=tune.FailureConfig(max_failures=max_failures),
            # Keep every checkpoint: with num_to_keep, Ray restored from a stale snapshot deletes checkpoints
            # it remembers and fails on ones already gone; trial checkpoints are adapter-sized anyway.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        ),
    )


def collect(results, out: Path) -> dict[str, TrialOutcome]:
    """Trial name -> outcome, from Tune's ResultGrid; finished trials' files copied to DIR/trials/<name>/."""
    outcomes = {}
    for r in results:
        if not r.config:  # never started: the sweep was interrupted first (NOT_RUN in the table)
            continue
        name = r.config["trial"]["name"]
        final = report_kind(r.metrics or {}) == TrialResult.KIND
        error = str(r.error).strip().splitlines()[-1] if r.error is not None else ""
        if r.error is None and final:
            outcomes[name] = TrialOutcome(sweepdir.TERMINATED, TrialResult.from_dict(r.metrics))
            if r.checkpoint is not None:
                shutil.copytree(r.checkpoint.path, out / sweepdir.TRIALS_DIR / name, dirs_exist_ok=True)
        else:
            outcomes[name] = TrialOutcome(sweepdir.ERROR if r.error is not None else sweepdir.INTERRUPTED, error=error)
    return outcomes
