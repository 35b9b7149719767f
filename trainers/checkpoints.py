"""Which of a trial's checkpoints can be trusted after a crash.

Ray Tune copies every checkpoint a trial reports into ``<sweep>/tune/<trial>/checkpoint_NNNNNN``
and restores the experiment from a snapshot it writes every few seconds. A process killed at the
wrong moment can therefore leave a half-copied newest checkpoint, or checkpoints (even a finished
trial's final result) that the restored snapshot does not know about. Ray has no notion of
"complete", so each checkpoint we report carries a seal: a list of its files and their sizes, written
last, and on start a trial scans its own directory: a final result means "done, do not train
again"; otherwise the newest complete training checkpoint is where it resumes.

The seal also names the trial (its config's fingerprint) and, for a checkpoint sent with a held-out
eval, that eval: a search restored from an older snapshot can hand a directory name to a different
sample, whose trial must not pick up the other one's checkpoints; and a trial that early stopping or
a budget ended is read back (its last eval loss and adapter) from its newest sealed eval.
"""

from __future__ import annotations

import json
from pathlib import Path

SEAL = "lora_sweep_complete.json"


def seal(directory: Path, *, step: int, final: bool, fingerprint: str = "", eval: dict | None = None) -> None:
    """Write the seal into a fully written checkpoint directory (call it last)."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != SEAL}
    tmp = directory / (SEAL + ".tmp")
    tmp.write_text(json.dumps({"step": step, "final": final, "files": files, "fingerprint": fingerprint,
                               "eval": eval}))
    tmp.replace(directory / SEAL)


def read_seal(directory: Path) -> dict | None:
    """The seal when every file it lists is present at its recorded size, else None."""
    try:
        meta = json.loads((directory / SEAL).read_text())
        complete = all((directory / name).is_file() and (directory / name).stat().st_size == size
                       for name, size in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete else None


def _complete(trial_dir: Path, fingerprint: str | None) -> list[tuple[Path, dict]]:
    """Complete checkpoints of the trial with ``fingerprint`` (None: of any trial in this directory)."""
    return [(p, m) for p in sorted(trial_dir.glob("checkpoint_*")) if p.is_dir() and (m := read_seal(p))
            and fingerprint in (None, m.get("fingerprint"))]


def final_result(trial_dir: Path, fingerprint: str | None = None) -> Path | None:
    """A complete final-result checkpoint of this trial, if it ever finished."""
    return next((p for p, m in _complete(trial_dir, fingerprint) if m["final"]), None)


def evals(trial_dir: Path, fingerprint: str | None = None) -> list[tuple[Path, dict]]:
    """Every complete checkpoint sent with a held-out eval, and that eval (an EvalReport's fields), by step."""
    found = [(p, m["eval"]) for p, m in _complete(trial_dir, fingerprint) if m.get("eval")]
    return sorted(found, key=lambda t: t[1]["train_steps"])


def last_eval(trial_dir: Path, fingerprint: str | None = None) -> tuple[Path, dict] | None:
    """The complete checkpoint sent with the trial's latest held-out eval, and that eval."""
    found = evals(trial_dir, fingerprint)
    return found[-1] if found else None


def resume_point(trial_dir: Path, fingerprint: str | None = None) -> tuple[Path, int] | None:
    """The complete training checkpoint with the highest step; incomplete ones are skipped.

    By step, not by directory name: after a restore from a stale snapshot Ray numbers new
    checkpoints from where the snapshot left off, so names need not follow steps.
    """
    training = [(p, m["step"]) for p, m in _complete(trial_dir, fingerprint) if not m["final"]]
    return max(training, key=lambda t: t[1], default=None)
