"""Ray Tune's entry point for a trial: first the trial's own log file, then the trial.

Everything a trial process writes (library warnings, Ray's checkpoint notes, a traceback) goes to
``<sweep>/logs/<trial>.log`` instead of the driver's console. It is redirected at the file-descriptor
level and before the heavy imports, so import-time warnings, output from C code and logging handlers
created earlier (which hold the original stderr) land there too. Ray Tune's own
``RunConfig(log_to_file=...)`` falls short here: it swaps only Python's ``sys.stdout``/``sys.stderr``
(and still tees them to the worker's stream), writes under Ray's session directory rather than the
sweep's, and reaches storage only when a later report syncs it, so a crashing trial's last lines,
the ones that matter, would be lost.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

LOG_DIR_KEY = "log_dir"  # key in Tune's param space: where the trials' log files go


def log_path(log_dir: str | Path, trial_name: str) -> Path:
    return Path(log_dir) / f"{trial_name}.log"


@contextlib.contextmanager
def output_to(path: Path):
    """Point this process's stdout and stderr (fds 1 and 2) at ``path`` (appended), then put them back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def tune_trainable(config: dict) -> None:
    """What Ray Tune runs for each trial (and each retry, which appends to the same log)."""
    log_dir = config.get(LOG_DIR_KEY)
    if not log_dir:
        return _run(config)
    name = config["trial"].get("name") or _tune_trial_name()
    with output_to(log_path(log_dir, name)):
        print(f"==== trial {name}: process {os.getpid()} started {_now()} ====", flush=True)
        try:
            _run(config)
        except BaseException:
            traceback.print_exc()  # Ray keeps its own copy too; this one sits next to the trial's other output
            raise
        finally:
            print(f"==== trial {name}: process {os.getpid()} ended {_now()} ====", flush=True)


def _tune_trial_name() -> str:
    """A searched trial's name: the driver gave it when Tune created the trial, not in its config."""
    from ray import tune

    return tune.get_context().get_trial_name()


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def mps_client_priority(level: int) -> None:
    """Ask to be a below-normal MPS client (``level`` 1: sweep/mps.py gives it to the trials sharing a GPU with
    a longer one). CUDA reads it once, when it starts in the process, and importing the trial's libraries
    starts CUDA: set after those imports, it never took effect (seen on an H200), so it is set here, before
    them. Without MPS it does nothing."""
    from trainers.config import MPS_PRIORITY_ENV

    torch = sys.modules.get("torch")
    if level and MPS_PRIORITY_ENV not in os.environ and not (torch and torch.cuda.is_initialized()):
        os.environ[MPS_PRIORITY_ENV] = str(level)


def _run(config: dict) -> None:
    mps_client_priority(config["trial"].get("mps_priority", 0))
    from trainers.trial import tune_trainable as run_under_tune

    run_under_tune(config)
