"""One driver per sweep directory: a lock held for the driver's life.

Two drivers on one ``--output`` would train every trial twice into the same Tune directories and
open two MLflow parent runs. The lock is the file ``<DIR>.lock`` next to the sweep directory (not in
it: ``--fresh`` renames the directory, and the lock must stay where the next driver looks), holding an
``flock`` and the holder's pid, host and start time. The kernel drops an ``flock`` when its process
dies however it dies (``kill -9`` included), so a lock file left behind is recognised as stale and
taken over. A lock written on another host (a sweep directory on shared storage) cannot be checked
from here: the message says whose it is and how to clear it. Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from sweep.cli import UserError


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def holder(out: Path) -> dict | None:
    """Who holds (or last held) the lock of sweep directory ``out``: pid, host, started; None if nobody."""
    try:
        return _parse(lock_path(out).read_text())
    except OSError:
        return None


def _parse(text: str) -> dict | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _describe(h: dict | None) -> str:
    if not h:
        return "holder unknown"
    return f"pid {h.get('pid')} on host {h.get('host')}, since {h.get('started')}"


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError) as e:
        return getattr(e, "errno", None) == errno.EPERM  # exists, but not ours to signal
    return True


@contextlib.contextmanager
def locked(out: Path):
    """Hold ``out``'s lock until the block ends (normally, by an exception or by Ctrl-C); a second
    driver gets a UserError (exit 2) naming the holder. Parent directories made for the lock file are
    removed again if nothing else was put in them."""
    path = lock_path(out)
    made = [d for d in reversed(path.parents) if not d.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(out, path)
    except BaseException:
        _remove_dirs(made)
        raise
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before the close: a driver that opened the old file sees it is gone and retries
        os.close(fd)
        _remove_dirs(made)


def _remove_dirs(made: list[Path]) -> None:
    for d in reversed(made):
        with contextlib.suppress(OSError):
            d.rmdir()


def _acquire(out: Path, path: Path) -> int:
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the lock file {path}: {e.strerror}") from None
        try:
            _take(out, path, fd)
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file between our open and our flock: try again
    raise UserError(f"cannot take the lock {path}: it keeps changing; is another driver starting on {out}?")


def _take(out: Path, path: Path, fd: int) -> None:
    """flock the open lock file, decide whether an earlier holder is still there, and write ourselves in."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        flocked = True
    except BlockingIOError:
        raise UserError(f"{out} is in use by another lora-sweep driver ({_describe(_read(fd))}); wait for it to "
                        "finish or stop it, or pass another --output") from None
    except OSError:  # a file system without flock (some network mounts): the pid and host are all we have
        flocked = False
    previous, here = _read(fd), socket.gethostname()
    if previous and previous.get("host") != here:
        raise UserError(f"{out} is locked by a driver on another machine ({_describe(previous)}); if none runs "
                        f"there any more, delete {path} and run again")
    if previous and not flocked and previous.get("pid") != os.getpid() and _alive(previous.get("pid")):
        raise UserError(f"{out} is in use by another lora-sweep driver ({_describe(previous)})")
    if previous:
        print(f"note: taking over the stale lock of a driver that is gone ({_describe(previous)})", flush=True)
    me = {"pid": os.getpid(), "host": here, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    except OSError as e:  # a full disk: the lock file itself cannot be written
        raise UserError(f"cannot write the lock file {path}: {e.strerror}") from None


def _read(fd: int) -> dict | None:
    try:
        return _parse(os.pread(fd, 4096, 0).decode(errors="replace"))
    except OSError:
        return None
