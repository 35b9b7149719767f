"""Which of a trial's checkpoints can be trusted after a crash.

Ray Tune copies every checkpoint a trial reports into its storage, ``<storage>/<experiment>/<trial>/
checkpoint_NNNNNN`` (the sweep directory, an NFS path or a bucket: any pyarrow filesystem), and restores
the experiment from a snapshot it writes every few seconds. A process killed at the
wrong moment can therefore leave a half-copied newest checkpoint, or checkpoints (even a finished
trial's final result) that the restored snapshot does not know about. Ray has no notion of
"complete", so each checkpoint we report carries a seal: a list of its files and their sizes, written
last, and on start a trial scans its own directory: a final result means "done, do not train
again"; otherwise the newest complete training checkpoint is where it resumes. The trial finds its
directory through Ray's storage context, never through a path on the driver's disk.

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


def read_seal(directory, fs=None) -> dict | None:
    """The seal when every file it lists is present at its recorded size, else None. ``directory`` is a
    local path, or a path on ``fs`` (a pyarrow filesystem: Ray Tune's storage, local, NFS or S3)."""
    from pyarrow.fs import FileSelector, FileType

    fs, path = _on(fs, directory)
    try:
        meta = read_json(path, SEAL, fs)
        sizes = {i.path[len(path) + 1:]: i.size for i in fs.get_file_info(FileSelector(path, recursive=True))
                 if i.type == FileType.File}
        complete = all(sizes.get(name) == size for name, size in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return meta if complete else None


def read_json(directory, name: str, fs=None):
    """A JSON file of a checkpoint, a local path or one on ``fs``."""
    return json.loads(read_text(directory, name, fs))


def _on(fs, directory) -> tuple:
    if fs is None:
        from pyarrow.fs import LocalFileSystem

        fs = LocalFileSystem()
    return fs, str(directory).rstrip("/")


def _complete(trial_dir, fingerprint: str | None, fs=None) -> list[tuple[object, dict]]:
    """Complete checkpoints of the trial with ``fingerprint`` (None: of any trial in this directory); Paths
    for a local ``trial_dir`` given as one, else paths on ``fs``."""
    from pyarrow.fs import FileSelector, FileType

    fs_, path = _on(fs, trial_dir)
    try:
        found = sorted(i.path for i in fs_.get_file_info(FileSelector(path, allow_not_found=True))
                       if i.type == FileType.Directory and i.base_name.startswith("checkpoint_"))
    except OSError:  # an unreachable store reads as "nothing yet"; the trial's own report then fails loudly
        return []
    as_path = isinstance(trial_dir, Path) and fs is None
    return [(Path(p) if as_path else p, m) for p in found if (m := read_seal(p, fs_))
            and fingerprint in (None, m.get("fingerprint"))]


def final_result(trial_dir, fingerprint: str | None = None, fs=None):
    """A complete final-result checkpoint of this trial, if it ever finished."""
    return next((p for p, m in _complete(trial_dir, fingerprint, fs) if m["final"]), None)


def evals(trial_dir, fingerprint: str | None = None, fs=None) -> list[tuple[object, dict]]:
    """Every complete checkpoint sent with a held-out eval, and that eval (an EvalReport's fields), by step."""
    found = [(p, m["eval"]) for p, m in _complete(trial_dir, fingerprint, fs) if m.get("eval")]
    return sorted(found, key=lambda t: t[1]["train_steps"])


def last_eval(trial_dir, fingerprint: str | None = None, fs=None) -> tuple[object, dict] | None:
    """The complete checkpoint sent with the trial's latest held-out eval, and that eval."""
    found = evals(trial_dir, fingerprint, fs)
    return found[-1] if found else None


def resume_point(trial_dir, fingerprint: str | None = None, fs=None) -> tuple[object, int] | None:
    """The complete training checkpoint with the highest step, and that step; incomplete ones are skipped.

    By step, not by directory name: after a restore from a stale snapshot Ray numbers new
    checkpoints from where the snapshot left off, so names need not follow steps.
    """
    training = [(p, m["step"]) for p, m in _complete(trial_dir, fingerprint, fs) if not m["final"]]
    return max(training, key=lambda t: t[1], default=None)


def read_text(checkpoint, name: str, fs=None) -> str:
    """One file of a checkpoint (on ``fs``, or local), as text."""
    fs, path = _on(fs, checkpoint)
    with fs.open_input_stream(f"{path}/{name}") as f:
        return f.read().decode()


def download(checkpoint, fs, dest: Path, only: tuple[str, ...] = ()) -> Path:
    """A copy of a checkpoint (on ``fs``, or local) in ``dest`` (``only``: just these top-level entries):
    Ray may rewrite its own copy, and a trial on another node than the storage reads it over the network
    once. File by file: pyarrow's copy_files does not create the local directories it copies into."""
    from pyarrow.fs import FileSelector, FileType

    fs, path = _on(fs, checkpoint)
    for info in fs.get_file_info(FileSelector(path, recursive=True)):
        relative = info.path[len(path) + 1:]
        if info.type == FileType.File and (not only or relative.split("/", 1)[0] in only):
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
    return dest


# A trial that ran out of the GPU memory its share allows (PyTorch says "... allowed;" only for a capped
# process) would run out again at the same step if retried at the same share: same data, same order, same
# peak. Ray Tune retries every failure alike (FailureConfig.max_failures has no per-error rule), so the
# trial records it here, beside its checkpoints, and a retry of the same trial at a share no larger ends
# at once with the same error instead of repeating setup and training up to that step.
OUT_OF_MEMORY = "out_of_memory.json"


def record_out_of_memory(trial_dir, fs, *, fingerprint: str, share: float, error: str) -> None:
    fs, path = _on(fs, trial_dir)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{OUT_OF_MEMORY}") as f:
        f.write(json.dumps({"fingerprint": fingerprint, "share": share, "error": error}).encode())


def repeated_out_of_memory(trial_dir, fs, *, fingerprint: str, share: float) -> str | None:
    """The error of this trial's earlier run out of memory at a share at least ``share``, else None."""
    try:
        seen = read_json(trial_dir, OUT_OF_MEMORY, fs)
        again = seen["fingerprint"] == fingerprint and share <= seen["share"]
        return str(seen["error"]) if again else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
