"""The sweep directory's own records, written atomically (temp file + rename), so a driver killed at
any instant leaves either the old or the new version, never half of one.

  sweep.json   the manifest: sweep id, name, space fingerprint, tracking URI. Resume refuses a sweep
               whose space (after --set) no longer has this fingerprint.
  ledger.json  trial fingerprint -> status, trial name, time, error. Ray snapshots its experiment
               state only every few seconds; the ledger records each trial's end the moment Tune
               reports it, so the driver (and a person) knows what finished however it was stopped.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from ray.tune import Callback

from sweep.space import TrialConfig
from sweep.tracking import error_line

MANIFEST, LEDGER = "sweep.json", "ledger.json"


def write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


class Ledger(Callback):
    def __init__(self, sweep_dir: str):
        self.path = Path(sweep_dir) / LEDGER

    def record(self, trial, status: str, error: str = "") -> None:
        cfg = TrialConfig.from_dict(trial.config["trial"])
        entries = read_json(self.path)
        entries[cfg.fingerprint] = {"trial": cfg.name, "status": status, "at": time.time(), "error": error}
        write_json(self.path, entries)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.record(trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.record(trial, "ERROR", error_line(trial.error_file))
