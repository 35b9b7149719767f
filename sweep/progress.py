"""A sweep's progress as people read it: one line per trial (status, step / total, train loss, latest
eval loss, tokens/s, GPU, ETA) and one for the sweep (done / running / pending, elapsed, ETA).

The driver keeps it current from the trials' reports (``sweep/console.py``) and writes it to
``DIR/progress.json`` at every status change and every few seconds (atomically, so a reader never sees
half of it). ``python -m sweep.status`` reads the same file from any terminal, with no Ray: the file
names the driver process, so a reader can tell a running sweep from one whose driver was killed.
Statuses are free strings: PENDING and RUNNING are live, anything else (TERMINATED, ERROR, STOPPED,
INTERRUPTED, ...) is an end. Nothing here imports Ray.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from sweep import sweepdir

PROGRESS = "progress.json"
PENDING, RUNNING = "PENDING", "RUNNING"


def clock(seconds: float | None) -> str:
    """1:02:03 or 2:03; '-' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(max(seconds, 0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _num(x: float | None, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def rate_text(tokens_per_second: float | None) -> str:
    if not tokens_per_second:
        return "- tok/s"
    if tokens_per_second >= 1000:
        return f"{tokens_per_second / 1000:.1f}k tok/s"
    return f"{tokens_per_second:.0f} tok/s"


def device_text(system: dict[str, float]) -> str:
    """The trial's GPU (utilisation, memory) from its system metrics, or the machine's CPU on CPU trials."""
    gpus = sorted({k.split("_")[1] for k in system if k.startswith("gpu_") and k.endswith("_utilization_percentage")})
    if gpus:
        return " ".join(f"gpu{i} {system[f'gpu_{i}_utilization_percentage']:.0f}% "
                        f"{system.get(f'gpu_{i}_memory_usage_megabytes', 0) / 1024:.1f}G" for i in gpus)
    if "cpu_utilization_percentage" in system:
        return f"cpu {system['cpu_utilization_percentage']:.0f}%"
    return "-"


@dataclass
class TrialProgress:
    name: str
    status: str = PENDING
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    system: dict[str, float] = field(default_factory=dict)
    started: float | None = None  # wall time this trial's current attempt started
    ended: float | None = None
    updated: float | None = None  # wall time of its latest report
    rate_from: tuple[float, int] | None = None  # (time, step) of the attempt's first step report: for the ETA
    attempts: int = 0
    error: str = ""
    log: str = ""
    baseline: bool = False
    config: dict = field(default_factory=dict)  # TrialConfig.to_dict(), for the table
    trainable_params: int = 0
    total_params: int = 0
    result: dict | None = None  # TrialResult.to_dict() once it finished

    @property
    def live(self) -> bool:
        return self.status in (PENDING, RUNNING)

    def eta(self, now: float) -> float | None:
        """Seconds of training left, from the step rate of this attempt; None until two reports."""
        if self.status != RUNNING or not self.max_steps or self.rate_from is None or self.updated is None:
            return None
        t0, s0 = self.rate_from
        if self.step <= s0 or self.updated <= t0:
            return None
        per_step = (self.updated - t0) / (self.step - s0)
        return max((self.max_steps - self.step) * per_step - (now - self.updated), 0.0)

    def line(self, now: float, width: int = 20) -> str:
        steps = f"{self.step}/{self.max_steps}" if self.max_steps else (str(self.step) if self.step else "-")
        if self.status == RUNNING:
            tail = f"ETA {clock(self.eta(now))}"
        elif self.started is not None and self.ended is not None:
            tail = f"took {clock(self.ended - self.started)}"
        else:
            tail = ""
        text = (f"{self.name:<{width}} {self.status:<11} {steps:>9}  loss {_num(self.loss, '.4f'):>7}  "
                f"eval {_num(self.eval_loss, '.4f'):>7}  {rate_text(self.tokens_per_second):>12}  "
                f"{device_text(self.system):<14} {tail}")
        if self.error:
            text += f"  {self.error}"
        return text.rstrip()


@dataclass
class SweepProgress:
    name: str
    sweep_id: str
    metric: str
    trials: list[TrialProgress]
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    state: str = "running"  # running | finished | interrupted (the driver's own word, written last)
    driver: dict = field(default_factory=dict)  # pid, host, process start: is it still alive?
    concurrency: int = 1  # the most trials seen running at once: the ETA's parallelism

    def trial(self, name: str) -> TrialProgress:
        return next(t for t in self.trials if t.name == name)

    def counts(self) -> tuple[int, int, int]:
        running = sum(t.status == RUNNING for t in self.trials)
        pending = sum(t.status == PENDING for t in self.trials)
        return len(self.trials) - running - pending, running, pending

    def eta(self, now: float) -> float | None:
        """Running trials' ETAs plus pending trials at the mean duration of those that finished in this
        driver (or, before any did, of the running ones' elapsed + ETA), spread over the concurrency."""
        done, running, pending = self.counts()
        if not running and not pending:
            return 0.0
        etas = [t.eta(now) for t in self.trials if t.status == RUNNING]
        if any(e is None for e in etas):
            return None
        took = [t.ended - t.started for t in self.trials if not t.live and t.started and t.ended and not t.baseline]
        if not took:
            took = [now - t.started + e for t, e in zip((t for t in self.trials if t.status == RUNNING), etas)]
        if pending and not took:
            return None
        per_trial = sum(took) / len(took) if took else 0.0
        return max(max(etas, default=0.0), (sum(etas) + pending * per_trial) / max(self.concurrency, running, 1))

    def sweep_line(self, now: float) -> str:
        done, running, pending = self.counts()
        stopped = sum(t.status == sweepdir.STOPPED for t in self.trials)
        failed = sum(t.status not in (PENDING, RUNNING, sweepdir.TERMINATED, sweepdir.STOPPED) for t in self.trials)
        eta = self.eta(now) if self.state == "running" else None
        return (f"sweep {self.name}: {done}/{len(self.trials)} done" + (f" ({failed} not finished)" if failed else "")
                + (f" ({stopped} stopped early)" if stopped else "")
                + f", {running} running, {pending} pending; elapsed {clock(now - self.started)}"
                + (f", ETA ~{clock(eta)}" if eta is not None else ""))

    def lines(self, now: float, *, all_trials: bool = False) -> list[str]:
        """The sweep line, then the running trials (every trial with ``all_trials``)."""
        width = max((len(t.name) for t in self.trials), default=10)
        shown = self.trials if all_trials else [t for t in self.trials if t.status == RUNNING]
        return [self.sweep_line(now)] + ["  " + t.line(now, width) for t in shown]

    # ---- the file -----------------------------------------------------------------------------------
    def write(self, out: Path) -> None:
        self.updated = time.time()
        sweepdir.write_json(Path(out) / PROGRESS, asdict(self))

    @classmethod
    def read(cls, out: Path) -> "SweepProgress | None":
        data = sweepdir.read_json(Path(out) / PROGRESS)
        if not data:
            return None
        names = {f.name for f in fields(TrialProgress)}
        trials = [TrialProgress(**{k: v for k, v in t.items() if k in names}) for t in data.pop("trials")]
        for t in trials:
            t.rate_from = tuple(t.rate_from) if t.rate_from else None
        return cls(trials=trials, **{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})


def this_driver() -> dict:
    """What identifies the driver process: a reused pid is told apart by its start time."""
    import psutil

    return {"pid": os.getpid(), "host": socket.gethostname(), "process_started": psutil.Process().create_time()}


def driver_alive(driver: dict) -> bool | None:
    """True or False for a driver on this machine; None when it ran elsewhere (no way to ask)."""
    import psutil

    if driver.get("host") != socket.gethostname():
        return None
    try:
        return abs(psutil.Process(driver["pid"]).create_time() - driver["process_started"]) < 1.0
    except (psutil.Error, KeyError):
        return False
