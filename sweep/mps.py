"""NVIDIA MPS for the trials that share a GPU: their kernels run side by side instead of taking turns.

Processes on one GPU are time-sliced: the GPU runs one process's kernels at a time. A LoRA trial keeps
its GPU busy only part of each step (a profile on an H200, fast path, OpenLLaMA-3B shapes: kernels ran
about 50-70% of a step's time; the rest is the host launching 4,900-11,300 small kernels a step), so
trials packed onto one GPU by ``--gpus-per-trial auto`` wait for each other's turns while it idles. Under the
Multi-Process Service the GPU runs several processes' kernels at once. Measured on one H200 (README,
"GPU sharing"): the paper grid's four trials packed together, 120 steps each, trained at 15.4k tokens/s
together without MPS and 21.0k with it (+36%), with the same eval losses.

Ray (2.x) neither starts nor knows about MPS, so a sweep that starts its own Ray does it here: before
Ray starts, when its CUDA trials may share a GPU (``--gpus-per-trial`` auto or below 1) and NVIDIA's
``nvidia-cuda-mps-control`` is installed, it starts a control daemon of its own in a private directory
and points ``CUDA_MPS_PIPE_DIRECTORY`` there; Ray's processes inherit it, so every trial process becomes
a client of that daemon. The daemon is stopped when the sweep ends. One left running by a killed
driver is used by the next run of the same sweep (same directory) and stopped by any other sweep's.
Beside another sweep's daemon in use, a sweep time-slices rather than start a second daemon for the
same GPUs, and says so. A machine that already runs MPS (its own daemon, or
``CUDA_MPS_PIPE_DIRECTORY`` set) is left as it is: the trials are its clients already. On a cluster
(``--address``) each GPU node runs its own daemon (README).

Which trial's kernels go first: the sweep gives every GPU trial an MPS client priority
(``CUDA_MPS_CLIENT_PRIORITY``, set in the trial's process before it touches CUDA). The trials with the
most work (``sweep.plan.relative_work``: the largest, and any with at least 3/4 of it) are
normal-priority clients, the others below normal: when the GPU is full, the long poles' kernels run
first and the shorter trials fill the gaps they leave, instead of all of them slowing down alike and
the longest one finishing alone on a GPU it cannot fill. Why 3/4, measured on an H200 (README "GPU
sharing"): with the paper grid's 8-bit trial alone normal, the all-linear 4-bit trial, with 84% of
its work, got the smallest part of the GPU and became the new long pole; the attention trials, with
55% of it, can give way and still catch up, as they run fastest once alone. A search's samples,
whose work is not known in advance, all stay normal.

What MPS changes for a trial: nothing in its arithmetic (the same kernels run). GPU memory stays
isolated per process on Volta and later GPUs, and a trial's own allocator cap (``trainers.trial.
limit_gpu_memory``) still applies, so an out-of-memory error stays in its trial. A fatal GPU fault (an
illegal memory access) in one client, however, is reported to every client on that GPU: those trials
fail together and are retried from their checkpoints like any failed trial (``--max-failures``).
``--mps off`` time-slices instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sweep.cli import UserError
from trainers.config import MPS_PIPE_ENV, MPS_PRIORITY_ENV, mps_daemon

CONTROL = "nvidia-cuda-mps-control"
PIPE_ENV, LOG_ENV = MPS_PIPE_ENV, "CUDA_MPS_LOG_DIRECTORY"
MODES = ("auto", "on", "off")
TIMEOUT_S = 30
ROOT = Path(tempfile.gettempdir())  # where the sweeps' daemon directories are
OWNER = "driver.pid"  # in a daemon's directory: the driver that uses it
PRIORITY_ENV = MPS_PRIORITY_ENV
NORMAL, BELOW_NORMAL = 0, 1  # its values
LONG_POLE = 0.75  # trials with at least this part of the most work go first too (the docstring says why)


def client_priorities(planned, shares: dict[str, float]) -> dict[str, int]:
    """Each GPU-sharing trial's MPS client priority: normal for the long pole(s), below normal for the others
    (see the module's docstring); empty when fewer than two trials share."""
    from sweep.plan import relative_work

    work = {p.cfg.name: relative_work(p.cfg) for p in planned if 0 < shares.get(p.cfg.name, 0.0) < 1}
    most = max(work.values(), default=0.0)
    if len(work) < 2 or most <= 0:
        return {}
    return {name: NORMAL if w >= LONG_POLE * most else BELOW_NORMAL for name, w in work.items()}


def may_share(gpus_per_trial: float | str) -> bool:
    """Whether several trials can land on one GPU: auto packs small ones, a number below 1 packs them all."""
    return gpus_per_trial == "auto" or float(gpus_per_trial) < 1


def check(mode: str, address: str | None) -> None:
    """Refuse what ``--mps`` cannot do, before anything starts."""
    if mode not in MODES:
        raise UserError(f"--mps must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "on" and address:
        raise UserError(f"--mps on starts MPS on this machine; with --address run '{CONTROL} -d' on each GPU node of "
                        "the cluster (README, 'GPU sharing'), or pass --mps off")
    if mode == "on" and shutil.which(CONTROL) is None:
        raise UserError(f"--mps on: {CONTROL} is not installed here (it comes with NVIDIA's driver); pass --mps auto "
                        "or off")


machine_daemon = mps_daemon  # a daemon the machine runs already: the trials are its clients without us


@dataclass
class Daemon:
    """An MPS control daemon this sweep started (or found left by its own earlier run) and stops."""

    pipe: Path

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
        # Ray gives each trial CUDA_VISIBLE_DEVICES with the machine's GPU numbers; the daemon must see every GPU
        # for those numbers to mean the same GPUs to its clients.
        return {**env, PIPE_ENV: str(self.pipe), LOG_ENV: str(self.pipe / "log")}

    def control(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run([CONTROL], input=command + "\n", env=self.env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)

    def running(self) -> bool:
        if not (self.pipe / "control").exists():
            return False
        try:
            return self.control("get_server_list").returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def own(self) -> bool:
        """The directory is a real one of this user's: the temp dir is shared, and another user's (or a link
        planted there) must never be taken for a daemon of ours."""
        try:
            st = self.pipe.lstat()
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()

    def start(self) -> str | None:
        """Start the daemon (or adopt this sweep's leftover one); None when it runs, else why it does not."""
        try:
            self.pipe.parent.mkdir(parents=True, exist_ok=True)
            self.pipe.mkdir(mode=0o700, exist_ok=True)
            if not self.own():
                return f"{self.pipe} is not this user's own directory"
            if self.running():
                return None
            (self.pipe / "control").unlink(missing_ok=True)  # a dead daemon's socket: the wait below is for the new one
            (self.pipe / "log").mkdir(mode=0o700, exist_ok=True)
            started = subprocess.run([CONTROL, "-d"], env=self.env, capture_output=True, text=True,
                                     timeout=TIMEOUT_S).returncode == 0
        except (OSError, subprocess.SubprocessError) as e:
            return f"{CONTROL} -d: {e}"
        deadline = time.monotonic() + 10
        while started and not (self.pipe / "control").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not (started and (self.pipe / "control").exists()):
            return f"{CONTROL} -d did not start; its log: {self.pipe / 'log'}"
        return None

    def owner(self) -> int | None:
        try:
            return int((self.pipe / OWNER).read_text())
        except (OSError, ValueError):
            return None

    def claim(self) -> None:
        (self.pipe / OWNER).write_text(str(os.getpid()))

    def stop(self) -> None:
        """Quit the daemon and wait (at most TIMEOUT_S) until it no longer answers. Its socket file outlives it
        (seen on an H200: the daemon gone within a second of ``quit``, ``control`` still there), so that file is
        no sign of it; waiting for the file to go cost every sweep under MPS 30 s at its end. The stale file is
        removed, so the next sweep on this directory finds no daemon without asking."""
        try:
            self.control("quit")
        except (OSError, subprocess.SubprocessError):
            pass  # nothing more to do: a daemon that does not answer is found and stopped by the next run
        deadline = time.monotonic() + TIMEOUT_S
        while (alive := self.running()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not alive:
            (self.pipe / "control").unlink(missing_ok=True)


def pipe_dir(out: Path) -> Path:
    """The sweep's daemon directory: the same for every run of one sweep directory, and short (a Unix socket
    path must fit 108 bytes, a sweep directory need not)."""
    digest = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]
    return ROOT / f"lora-sweep-mps-{os.getuid()}-{digest}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


def other_sweeps(mine: Path) -> tuple[int | None, list[Daemon]]:
    """(the driver pid of another sweep on this machine whose daemon is in use, or None; the daemons other
    sweeps' killed drivers left running). Two daemons would each start a server for the same GPUs, so a
    second sweep beside a running one time-slices instead, and stopping its daemon at its end can never
    take the first sweep's trials down."""
    busy, left = None, []
    for pipe in sorted(ROOT.glob(f"lora-sweep-mps-{os.getuid()}-*")):
        daemon = Daemon(pipe)
        if pipe == mine or not daemon.own() or not daemon.running():
            continue
        if (pid := daemon.owner()) is not None and alive(pid):
            busy = pid
        else:
            left.append(daemon)
    return busy, left


def start_for_sweep(mode: str, *, address: str | None, gpus_per_trial: float | str, cuda_trials: bool,
                    out: Path) -> Daemon | None:
    """Before Ray starts: the daemon this sweep's trials will be clients of, started; None when MPS is off,
    not needed, not installed, or the machine's own. Prints one line saying which."""
    if mode == "off" or address or not cuda_trials or (mode == "auto" and not may_share(gpus_per_trial)):
        return None
    if (theirs := machine_daemon()) is not None:
        print(f"GPU sharing: the machine's NVIDIA MPS ({theirs})", flush=True)
        return None
    if shutil.which(CONTROL) is None:  # mode "on" was refused by check() already
        return None
    daemon = Daemon(pipe_dir(out))
    busy, left = other_sweeps(daemon.pipe)
    if busy is not None:
        if mode == "on":
            raise UserError(f"--mps on: the MPS daemon of another sweep on this machine is in use (its driver is "
                            f"process {busy}); wait for that sweep, or pass --mps auto to time-slice beside it")
        print(f"GPU sharing: time-sliced (another sweep's MPS daemon runs on this machine: driver process {busy})",
              flush=True)
        return None
    for leftover in left:  # a killed driver's, of another sweep directory
        leftover.stop()
    if (problem := daemon.start()) is None:
        try:
            daemon.claim()  # without its driver's pid, other sweeps would take it for a leftover and stop it
        except OSError as e:
            daemon.stop()
            problem = f"cannot record this driver in {daemon.pipe}: {e}"
    if problem is not None:
        if mode == "on":
            raise UserError(f"--mps on: {problem}")
        print(f"GPU sharing: time-sliced ({problem})", flush=True)
        return None
    os.environ[PIPE_ENV] = str(daemon.pipe)  # inherited by the Ray processes started next, and so by every trial
    os.environ[LOG_ENV] = str(daemon.pipe / "log")
    print("GPU sharing: NVIDIA MPS (trials on one GPU run their kernels side by side; --mps off to time-slice)",
          flush=True)
    return daemon


def stop_for_sweep(daemon: Daemon | None) -> None:
    """After Ray has stopped (no client left): stop the daemon and forget its directory."""
    if daemon is None:
        return
    daemon.stop()
    for key in (PIPE_ENV, LOG_ENV):
        os.environ.pop(key, None)
