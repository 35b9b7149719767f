"""The sweep directory's life: new, resumed, or moved aside with --fresh; and its own records.

  sweep.json   the manifest: sweep id, name, space fingerprint, tracking URI, and the sweep's Ray Tune
               experiments (``tune/`` first; an --extend or a search adds more). Resume refuses a sweep
               whose space (after --set) no longer has this fingerprint; --extend grows it instead.
  ledger.json  trial fingerprint -> status, trial name, time, error. Ray snapshots its experiment
               state only every few seconds; the ledger records each trial's end the moment Tune
               reports it, so the driver (and a person) knows what finished however it was stopped.
  budget.json  experiment -> which budget ended it, and when (written by the budget stopper).

Both are written atomically (temp file + rename): a driver killed at any instant leaves either the
old or the new version, never half of one. Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sweep.cli import UserError
from trainers.config import TrialConfig, TrialResult

SWEEP_MANIFEST, LEDGER, BUDGETS = "sweep.json", "ledger.json", "budget.json"
MANIFEST_KEYS = ("sweep_id", "name", "space_fingerprint", "mlflow_uri")
TUNE_DIR = "tune"  # Ray Tune's first experiment directory inside the sweep directory
TRIALS_DIR = "trials"  # each finished (or stopped) trial's result files, copied from its checkpoint
LOGS_DIR = "logs"  # each trial's output (logs/<trial>.log) and the driver's library logs (logs/driver.log)

# A trial's status in the ledger and the table. STOPPED: ended early by early stopping or a budget,
# with its last eval loss and the adapter of that step.
TERMINATED, STOPPED, ERROR, INTERRUPTED, NOT_RUN = "TERMINATED", "STOPPED", "ERROR", "INTERRUPTED", "NOT_RUN"


def sweep_failed(rows) -> bool:
    """The exit-code rule shared by ``sweep.run`` and ``sweep.status`` (their table's rows): 1 unless every
    trial finished, or was ended by early stopping or a budget (STOPPED; NOT_RUN with the budget's reason)."""
    return any(not (r["status"] in (TERMINATED, STOPPED) or (r["status"] == NOT_RUN and r.get("stop_reason")))
               for r in rows)


@dataclass(frozen=True)
class TrialOutcome:
    """How a trial ended, as the table shows it: a status above, its result if it finished, its error;
    for a stopped one the step it stopped at, its last eval loss there and why."""

    status: str
    result: TrialResult | None = None
    error: str = ""
    cfg: TrialConfig | None = None
    steps: int | None = None
    eval_loss: float | None = None
    reason: str = ""
    point: dict | None = None
    """A searched trial's values, as its searcher proposed them."""
    evals: tuple[tuple[int, float], ...] = ()
    """(step, eval loss) of its held-out evals during training."""
    seconds: float | None = None
    """How long it ran: Ray Tune's ``time_total_s``, from the trainable's start (setup included, process
    start not) to its last report."""


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=1, sort_keys=True))


def write_text(path: Path, text: str) -> None:
    """The one atomic write: a temp file, flushed to disk, renamed over ``path``. A driver killed at any
    instant, or a disk that fills up, leaves the old file whole and no temp file behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename:  # a failed write names no file: name the record
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def read_json(path: Path) -> dict:
    """A record of ours ({} when absent); one that cannot be read or parsed is a UserError naming it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as e:  # cut short, empty, overwritten
        raise damaged(path, f"not valid JSON: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise damaged(path, f"a JSON {type(data).__name__}, not an object")
    return data


def damaged(path: Path, why: str) -> UserError:
    if path.name == LEDGER:  # Ray Tune's own state knows which trials finished; the ledger only mirrors it
        remedy = "restore it, or delete it (the sweep still resumes; only this record of finished trials is lost)"
    else:
        remedy = "restore it from a backup"
    return UserError(f"{path} is damaged ({' '.join(why.split())}): {remedy}, or pass --fresh to move this sweep "
                     "aside and start over")


def read_manifest(out: Path) -> dict:
    path = out / SWEEP_MANIFEST
    manifest = read_json(path)
    bad = [k for k in MANIFEST_KEYS if not isinstance(manifest.get(k), str)]
    if bad:
        raise damaged(path, f"field '{bad[0]}' is missing or not text")
    exps = manifest.get("experiments")
    if exps is not None and not (isinstance(exps, list) and all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and e["name"] for e in exps)):
        raise damaged(path, "field 'experiments' is not a list of named experiments")
    kept = manifest.get("storage")  # --storage, when the sweep was started with one
    if kept is not None and not (isinstance(kept, dict) and set(kept) == {"uri", "endpoint"}
                                 and all(isinstance(v, str) for v in kept.values()) and kept["uri"]):
        raise damaged(path, "field 'storage' is not a --storage record (uri and endpoint)")
    return manifest


def read_ledger(out: Path) -> dict:
    path = out / LEDGER
    entries = read_json(path)
    for fp, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("status"), str):
            raise damaged(path, f"entry {fp[:40]!r} has no status")
    return entries


def check_tune_state(out: Path, manifest: dict) -> None:
    """Each experiment's pickled Tuner, read the way Tune.restore will read it: a damaged one is named now
    rather than failing after Ray has started."""
    for exp in experiments(manifest):
        path = out / exp["name"] / "tuner.pkl"
        if not path.is_file():
            continue
        import ray.cloudpickle as pickle  # Ray itself stays down: this only imports it

        try:
            pickle.loads(path.read_bytes())
        except Exception as e:  # noqa: BLE001 - unpickling raises whatever the damage makes of the bytes
            raise damaged(path, f"{type(e).__name__}: {e}") from None


def record_trial(sweep_dir: Path, fingerprint: str, name: str, status: str, error: str = "", **extra) -> None:
    """Note a trial's end in the ledger (called from the driver's single Tune callback thread); ``extra``:
    for a stopped trial, why and at which step."""
    path = Path(sweep_dir) / LEDGER
    entries = read_ledger(Path(sweep_dir))
    entries[fingerprint] = {"trial": name, "status": status, "at": time.time(), "error": error, **extra}
    write_json(path, entries)


def ledger(sweep_dir: Path) -> dict:
    return read_ledger(Path(sweep_dir))


def record_budget_end(sweep_dir: str, experiment: str, reason: str, at: float) -> None:
    """A budget ended ``experiment`` (called by its budget stopper, on the driver)."""
    path = Path(sweep_dir) / BUDGETS
    write_json(path, {**read_json(path), experiment: {"reason": reason, "at": at}})


def budget_ends(sweep_dir: Path) -> dict[str, str]:
    """Experiment -> the budget that ended it."""
    path = Path(sweep_dir) / BUDGETS
    ends = read_json(path)
    if not all(isinstance(e, dict) and isinstance(e.get("reason"), str) for e in ends.values()):
        raise damaged(path, "an entry has no reason")
    return {name: e["reason"] for name, e in ends.items()}


def finished_count(sweep_dir: Path) -> int:
    return sum(e["status"] == TERMINATED for e in read_ledger(Path(sweep_dir)).values())


def existing_manifest(out: Path, fingerprint: str, *, fresh: bool, resume: bool, extend: bool = False) -> dict | None:
    """The manifest of the sweep in ``out`` to resume or extend, or None for a new sweep. With --fresh an
    existing sweep, even a damaged one, is moved aside later (``needs_moving_aside``). Only reads; every
    record is checked before any of it is believed. With ``extend`` a changed space is the caller's to
    check (``sweep.extend``)."""
    if fresh and needs_moving_aside(out):
        return None
    manifest = read_manifest(out) if (out / SWEEP_MANIFEST).is_file() else None
    if manifest is None:
        if (out / TUNE_DIR).exists():
            raise UserError(f"{out} holds a Ray experiment that is not a lora-sweep sweep; pass another --output")
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"{out} is not empty and holds no lora-sweep sweep (no {SWEEP_MANIFEST}); pass another "
                            "--output")
        if resume or extend:
            raise UserError(f"--{'resume' if resume else 'extend'}: no sweep to {'resume' if resume else 'extend'} "
                            f"in {out}")
        return None
    finished = finished_count(out)
    budget_ends(out)
    check_tune_state(out, manifest)
    if manifest["space_fingerprint"] != fingerprint and not extend:
        raise UserError(
            f"{out} was started from a different space (fingerprint {manifest['space_fingerprint']}, now "
            f"{fingerprint}): the space file or --set values changed; restore them to resume, pass --extend to "
            "grow the sweep by the trials or samples added, or --fresh to move the old sweep aside and start over")
    print(f"resuming sweep {manifest['name']} in {out}: {finished} trial(s) already finished", flush=True)
    return manifest


def needs_moving_aside(out: Path) -> bool:
    """--fresh moves a sweep aside: a directory with our manifest, even one that cannot be read."""
    return (out / SWEEP_MANIFEST).exists()


def check_writable(out: Path) -> None:
    """Before anything starts, and without creating anything: can the sweep directory be made and written?"""
    if out == out.parent:
        raise UserError(f"--output {out} is a file system root, not a directory for a sweep")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output directory {out} is not writable ({probe} is not a writable directory)")


def move_aside(out: Path) -> Path:
    """--fresh: keep the old sweep next to the new one (nothing is ever deleted), under a name not yet taken
    (two --fresh runs within one second must not collide)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = out.with_name(f"{out.name}.old-{stamp}"), 1
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = out.with_name(f"{out.name}.old-{stamp}-{n}")
    try:
        out.rename(aside)
    except OSError as e:
        raise UserError(f"--fresh: cannot move {out} aside to {aside}: {e.strerror}") from None
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


def new_manifest(out: Path, *, name: str, space: str, fingerprint: str, mlflow_uri: str, **extra) -> dict:
    """Start a sweep's records; ``mlflow_uri`` must already be free of credentials. ``extra``: the sweep's
    experiments, for a search its identity (what an --extend must keep), and its --storage (None: the
    sweep directory), credential-free too."""
    manifest = {"sweep_id": uuid.uuid4().hex[:12], "name": name, "space": space, "space_fingerprint": fingerprint,
                "mlflow_uri": mlflow_uri, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    try:
        write_json(out / SWEEP_MANIFEST, manifest)
    except OSError as e:
        raise UserError(f"cannot write {out / SWEEP_MANIFEST}: {e.strerror}") from None
    return manifest


def experiments(manifest: dict) -> list[dict]:
    """The sweep's Ray Tune experiments, in order: {"name", "trials": [fingerprints] | "samples", "offset",
    "finished"}. A sweep from before searches has one, ``tune/``, holding every trial of its space."""
    return manifest.get("experiments") or [{"name": TUNE_DIR, "trials": None, "finished": False}]


def update_manifest(out: Path, manifest: dict, **changes) -> dict:
    """The manifest with ``changes`` (an --extend's experiments and fingerprint, a finished experiment)."""
    manifest = {**manifest, **changes}
    write_json(out / SWEEP_MANIFEST, manifest)
    return manifest
