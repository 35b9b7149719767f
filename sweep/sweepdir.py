"""The sweep directory's life: new, resumed, or moved aside with --fresh; and its own records.

  sweep.json   the manifest: sweep id, name, space fingerprint, tracking URI. Resume refuses a sweep
               whose space (after --set) no longer has this fingerprint.
  ledger.json  trial fingerprint -> status, trial name, time, error. Ray snapshots its experiment
               state only every few seconds; the ledger records each trial's end the moment Tune
               reports it, so the driver (and a person) knows what finished however it was stopped.

Both are written atomically (temp file + rename): a driver killed at any instant leaves either the
old or the new version, never half of one. Nothing here imports Ray.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sweep.cli import UserError
from trainers.config import TrialResult

SWEEP_MANIFEST, LEDGER = "sweep.json", "ledger.json"
TUNE_DIR = "tune"  # Ray Tune's experiment directory inside the sweep directory
TRIALS_DIR = "trials"  # each finished trial's result files, copied from its final checkpoint
LOGS_DIR = "logs"  # each trial's output (logs/<trial>.log) and the driver's library logs (logs/driver.log)

# A trial's status in the ledger and the table.
TERMINATED, ERROR, INTERRUPTED, NOT_RUN = "TERMINATED", "ERROR", "INTERRUPTED", "NOT_RUN"


def sweep_failed(statuses) -> bool:
    """The exit-code rule shared by ``sweep.run`` and ``sweep.status``: 1 unless every trial finished."""
    return any(s != TERMINATED for s in statuses)


@dataclass(frozen=True)
class TrialOutcome:
    """How a trial ended, as the table shows it: a status above, its result if it finished, its error."""

    status: str
    result: TrialResult | None = None
    error: str = ""


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


def record_trial(sweep_dir: Path, fingerprint: str, name: str, status: str, error: str = "") -> None:
    """Note a trial's end in the ledger (called from the driver's single Tune callback thread)."""
    path = Path(sweep_dir) / LEDGER
    entries = read_json(path)
    entries[fingerprint] = {"trial": name, "status": status, "at": time.time(), "error": error}
    write_json(path, entries)


def finished_count(sweep_dir: Path) -> int:
    return sum(e["status"] == TERMINATED for e in read_json(Path(sweep_dir) / LEDGER).values())


def existing_manifest(out: Path, fingerprint: str, *, fresh: bool, resume: bool) -> dict | None:
    """The manifest of the sweep in ``out`` (to resume, or with --fresh to move aside), or None. Only reads."""
    manifest = read_json(out / SWEEP_MANIFEST) if (out / SWEEP_MANIFEST).is_file() else None
    if manifest is None and (out / TUNE_DIR).exists():
        raise UserError(f"{out} holds a Ray experiment that is not a lora-sweep sweep; pass another --output")
    if manifest is not None and fresh:
        return manifest
    if manifest is None:
        if resume:
            raise UserError(f"--resume: no sweep to resume in {out}")
        return None
    if manifest["space_fingerprint"] != fingerprint:
        raise UserError(
            f"{out} was started from a different space (fingerprint {manifest['space_fingerprint']}, now "
            f"{fingerprint}): the space file or --set values changed; restore them to resume, or pass --fresh "
            "to move the old sweep aside and start over")
    print(f"resuming sweep {manifest['name']} in {out}: {finished_count(out)} trial(s) already finished", flush=True)
    return manifest


def check_writable(out: Path) -> None:
    """Before anything starts, and without creating anything: can the sweep directory be made and written?"""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output directory {out} is not writable ({probe} is not a writable directory)")


def move_aside(out: Path) -> Path:
    """--fresh: keep the old sweep next to the new one (nothing is ever deleted)."""
    aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(aside)
    print(f"moved the previous sweep aside to {aside}", flush=True)
    return aside


def prepare(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {out} is not writable: {e.strerror}") from None


def new_manifest(out: Path, *, name: str, space: str, fingerprint: str, mlflow_uri: str) -> dict:
    """Start a sweep's records; ``mlflow_uri`` must already be free of credentials."""
    manifest = {"sweep_id": uuid.uuid4().hex[:12], "name": name, "space": space, "space_fingerprint": fingerprint,
                "mlflow_uri": mlflow_uri, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(out / SWEEP_MANIFEST, manifest)
    return manifest
