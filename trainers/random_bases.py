"""Where ``random:`` bases live in the model cache, and the child process that writes a sweep's bases
before its trials start (``python -m trainers.random_bases NAME SEED ...``; the writing itself is
``trainers.models.materialize_random``).

Nothing here imports torch or transformers: the driver starts the child before it imports them
(13 s on a fresh H200 host), so the build overlaps the driver's plan, its checks and Ray's start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

RANDOM_PREFIX = "random:"


def cache_root() -> Path:
    return Path(os.environ.get("LORA_SWEEP_CACHE", Path.home() / ".cache" / "lora-sweep"))


def random_checkpoint(name: str, seed: int) -> Path:
    """Where ``random:<name>`` with ``seed`` is materialized in the model cache."""
    return cache_root() / "random" / f"{name}-seed{seed}"


def random_bases(configs) -> set[tuple[str, int]]:
    """The ``(name, seed)`` of every ``random:`` base these trial configs load."""
    return {(c.model.removeprefix(RANDOM_PREFIX), c.seed) for c in configs if c.model.startswith(RANDOM_PREFIX)}


def prebuild_random(models: set[tuple[str, int]]) -> subprocess.Popen | None:
    """Start writing these ``random:`` bases before any trial starts (the driver, for trials on this
    machine); returns the child process to wait for (None: nothing to build).

    Packed trials share their GPU under a memory cap and so build on the CPU, one Ray thread each, while
    the others wait on the lock: about two minutes of every packed 3B trial's setup on an H200 host. Here
    the build runs once, on the whole GPU, in a child process, so the driver holds no CUDA memory after it;
    the driver plans, checks and starts Ray meanwhile (the 3B base took 29 s on an H200 host). A build
    that fails is left to the trials (which report their own error)."""
    missing = [str(x) for name, seed in sorted(models) if not (random_checkpoint(name, seed) / "config.json").is_file()
               for x in (name, seed)]
    if not missing:
        return None
    return subprocess.Popen([sys.executable, "-m", "trainers.random_bases", *missing], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop_build(build: subprocess.Popen | None, timeout: float = 30) -> None:
    """Stop a build the sweep no longer waits for (refused, or Ctrl-C'd while it built): SIGTERM first, so
    its own cleanup removes the half-written copy (``_stop``); killed if it has not exited after ``timeout`` s.

    Not SIGINT: a child inherits an ignored SIGINT (the test suite's process ignores it), and stays deaf to it
    until its own handler is installed; a SIGTERM that comes before then ends it at once, with nothing written."""
    if build is None or build.poll() is not None:
        return
    build.terminate()
    try:
        build.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        build.kill()
        build.wait()


def _stop(signum, frame):
    """The build's way out on SIGTERM (the driver) or SIGINT (Ctrl-C reaches the whole process group): the
    build's cleanup runs; a second signal during that cleanup is ignored, so it cannot cut it short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


if __name__ == "__main__":  # prebuild_random's child: python -m trainers.random_bases NAME SEED [NAME SEED ...]
    signal.signal(signal.SIGINT, _stop)  # before anything is imported or written
    signal.signal(signal.SIGTERM, _stop)

    from trainers.models import materialize_random

    try:
        for name, seed in zip(sys.argv[1::2], sys.argv[2::2]):
            materialize_random(name, int(seed))
    except KeyboardInterrupt:
        sys.exit(130)
