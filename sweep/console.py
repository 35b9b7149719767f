"""What the driver prints while a sweep runs: a quiet live console built on the trials' typed reports.

On a terminal, a block (the sweep line and one line per running trial) is redrawn in place about once
a second; when output is not a terminal (CI, ``ray job`` logs, a pipe), the same block is printed as
plain lines every so often (30 s at first, sparser as the sweep grows old). Either way each trial's
start and end are one line each, and an error reaches stderr at once with the trial's log path.
Worker output goes to ``DIR/logs/<trial>.log`` (``trainers/entry.py``) and the driver's library logs
(Ray, MLflow) to ``DIR/logs/driver.log``; ``-v`` echoes both to the console as they are written.

The console is the driver's, one per process (``active()``): Tune pickles its callbacks into the
experiment state and restores them on resume, so ``sweep/callbacks.py`` looks the console up here
instead of holding it. Nothing here imports Ray.
"""

from __future__ import annotations

import logging
import logging.handlers
import shutil
import sys
import time
from pathlib import Path

from sweep import sweepdir
from sweep.cli import UserError
from sweep.progress import PENDING, RUNNING, SweepProgress, TrialProgress, clock
from trainers.config import EvalReport, StepReport, TrialResult, report_kind
from trainers.entry import log_path

REDRAW_EVERY = 1.0  # seconds between redraws of the live block on a terminal
SAVE_EVERY = 5.0  # seconds between writes of progress.json (besides one at every status change)
DRIVER_LOG = "driver.log"
LIBRARY_LOGGERS = ("ray", "mlflow", "alembic")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # DIR/logs/driver.log's lines


def plain_every(elapsed: float) -> float:
    """Seconds between plain progress blocks: 30 s, growing to 5 min as the sweep ages (a 2-hour sweep
    prints about 40 blocks, not 240)."""
    return min(max(30.0, elapsed / 10), 300.0)


class Console:
    def __init__(self, progress: SweepProgress, out: Path, *, stream=None, live: bool | None = None,
                 verbose: bool = False):
        self.progress, self.out, self.verbose = progress, Path(out), verbose
        self.stream = stream or sys.stdout
        self.live = (self.stream.isatty() and not verbose) if live is None else live
        self._drawn = 0  # lines of the live block now on screen
        self._last_draw = self._last_plain = self._last_save = time.time()
        self._tails: dict[Path, int] = {}

    # ---- events (from sweep/callbacks.py, on Tune's loop thread) ----------------------------------
    def trial_started(self, name: str, param: dict | None = None) -> None:
        """``param`` (``TrialConfig.to_param()``) adds a trial the console has not heard of: a search's
        sample, named as Tune creates it."""
        if param is not None and not any(t.name == name for t in self.progress.trials):
            self.progress.trials.append(TrialProgress(name, baseline=param["baseline"], config=param["config"],
                                                      log=str(log_path(self.out / sweepdir.LOGS_DIR, name))))
        t = self.progress.trial(name)
        t.status, t.started, t.ended, t.rate_from, t.error = RUNNING, time.time(), None, None, ""
        t.attempts += 1
        self.progress.concurrency = max(self.progress.concurrency, self.progress.counts()[1])
        self.progress.write(self.out)
        self._event(f"start {name}" + (f" (attempt {t.attempts})" if t.attempts > 1 else ""))

    def trial_report(self, name: str, result: dict) -> None:
        """Any report: steps move the line; anything carrying an eval loss (a periodic eval, the final
        result) updates the latest eval loss."""
        t, now = self.progress.trial(name), time.time()
        kind = report_kind(result)
        if kind == StepReport.KIND:
            s = StepReport.from_report(result)
            t.step, t.max_steps, t.loss, t.tokens_per_second = s.step, s.max_steps or t.max_steps, s.loss, \
                s.tokens_per_second
            t.system = s.system or t.system
            if t.rate_from is None:
                t.rate_from = (now, s.step)
        elif kind == EvalReport.KIND:  # a periodic eval: early stopping judges the trial at its step
            t.step = max(t.step, EvalReport.from_report(result).train_steps)
        elif kind == TrialResult.KIND:
            r = TrialResult.from_dict(result)
            t.result, t.step = r.to_dict(), r.train_steps
            t.tokens_per_second = r.train_tokens_per_second or t.tokens_per_second
            t.max_steps = t.max_steps or r.train_steps
        if isinstance(result.get("eval_loss"), (int, float)):
            t.eval_loss = float(result["eval_loss"])
        t.updated = now
        self.tick()

    def trial_ended(self, name: str, status: str, error: str = "") -> None:
        t = self.progress.trial(name)
        t.status, t.ended, t.error = status, time.time(), error
        self.progress.write(self.out)
        ended_well = status in (sweepdir.TERMINATED, sweepdir.STOPPED)  # STOPPED: early stopping, not a fault
        self._event(t.line(time.time(), self._width()) + ("" if ended_well else f"  (log: {t.log})"),
                    error=not ended_well and bool(error))

    def trial_retrying(self, name: str, error: str, out_of_its_share: bool = False) -> None:
        """Ray retries every failure; a trial that ran out of its GPU share's memory ends its retry at once
        (trainers/checkpoints.py, OUT_OF_MEMORY), and this line says so."""
        t = self.progress.trial(name)
        t.status, t.error = PENDING, ""
        self.progress.write(self.out)
        what = ("ran out of its GPU share's memory, and would again at the same share: its retry ends at once"
                if out_of_its_share else "failed, will retry from its latest checkpoint")
        self._event(f"{name} {what}: {error}  (log: {t.log})", error=True)

    def tick(self) -> None:
        """Called from every Tune loop step: redraw, print a plain block, save progress, echo logs (-v)."""
        now = time.time()
        if self.verbose:
            self._echo_logs()
        if now - self._last_save >= SAVE_EVERY:
            self.progress.write(self.out)
            self._last_save = now
        if self.live and now - self._last_draw >= REDRAW_EVERY:
            self._redraw()
        elif not self.live and now - self._last_plain >= plain_every(now - self.progress.started):
            self._write(self.progress.lines(now))
            self._last_plain = now

    def close(self, outcomes: dict) -> None:
        """The end of this driver's run: the live block goes; each trial's line and the file take the
        outcome the table shows (``sweepdir.TrialOutcome`` by trial; none: it never ran)."""
        if self.verbose:
            self._echo_logs()
        self.clear()
        for t in self.progress.trials:
            o = outcomes.get(t.name, sweepdir.TrialOutcome(sweepdir.NOT_RUN))
            t.status, t.error = o.status, o.error or t.error
            if o.result is not None:
                t.result = o.result.to_dict()
                t.eval_loss = o.result.eval_loss
            t.ended = t.ended or (time.time() if t.started else None)
        ended = not any(o.status == sweepdir.INTERRUPTED or (o.status == sweepdir.NOT_RUN and not o.reason)
                        for o in (outcomes.get(t.name, sweepdir.TrialOutcome(sweepdir.NOT_RUN))
                                  for t in self.progress.trials))
        self.progress.state = "finished" if ended else "interrupted"
        self.progress.write(self.out)

    # ---- output -------------------------------------------------------------------------------------
    def _width(self) -> int:
        return max(len(t.name) for t in self.progress.trials)

    def _event(self, line: str, error: bool = False) -> None:
        self.clear()
        elapsed = f"[{clock(time.time() - self.progress.started)}] "
        print(elapsed + line, file=sys.stderr if error else self.stream, flush=True)
        if self.live:
            self._redraw()

    def _write(self, lines: list[str]) -> None:
        self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()

    def _redraw(self) -> None:
        columns = shutil.get_terminal_size().columns
        lines = [ln[: columns - 1] for ln in self.progress.lines(time.time())]  # no wrapping: it would break the count
        self.clear()
        self._write(lines)
        self._drawn, self._last_draw = len(lines), time.time()

    def clear(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # up to the block's first line, erase to the end
            self.stream.flush()
            self._drawn = 0

    def _echo_logs(self) -> None:
        """-v: new complete lines of every trial log and the driver log, as they are written."""
        for path in sorted((self.out / sweepdir.LOGS_DIR).glob("*.log")):
            if path.name == DRIVER_LOG:
                continue  # -v leaves the library loggers on the console already
            offset = self._tails.get(path, 0)
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1
            if end:
                self._tails[path] = offset + end
                prefix = f"({path.stem}) "
                self.clear()
                self._write([prefix + ln for ln in chunk[:end].decode(errors="replace").splitlines()])


_ACTIVE: Console | None = None


def activate(console: Console | None) -> None:
    global _ACTIVE
    _ACTIVE = console


def active() -> Console | None:
    return _ACTIVE


def new_progress(manifest: dict, out: Path, planned, metric: str) -> SweepProgress:
    """This driver's view of the sweep: every planned trial pending, except what an earlier run finished
    (the ledger), whose results are carried over from that run's progress file for the status table."""
    from sweep.progress import TrialProgress, this_driver

    ledger = {e["trial"]: e for e in sweepdir.read_json(out / sweepdir.LEDGER).values()}
    try:
        before = SweepProgress.read(out)
    except UserError:  # a damaged progress file (a record of this driver's, not the sweep's): write a new one
        before = None
    old = {t.name: t for t in before.trials} if before else {}
    trials = []
    for p in planned:
        t = TrialProgress(p.cfg.name, baseline=p.cfg.baseline, config=p.cfg.to_dict(),
                          trainable_params=p.trainable_params, total_params=p.total_params,
                          log=str(log_path(out / sweepdir.LOGS_DIR, p.cfg.name)))
        if (done := ledger.get(t.name, {}).get("status")) in (sweepdir.TERMINATED, sweepdir.STOPPED):
            t.status = done
            if t.name in old:
                prev = old[t.name]
                t.result, t.step, t.max_steps, t.loss, t.eval_loss = prev.result, prev.step, prev.max_steps, \
                    prev.loss, prev.eval_loss
        trials.append(t)
    return SweepProgress(manifest["name"], manifest["sweep_id"], metric, trials, driver=this_driver())


class DriverLogs:
    """The driver's library logs (Ray, MLflow): kept off the console unless -v, written to
    DIR/logs/driver.log. Buffered from before Ray starts, since the sweep directory comes later.
    Errors included: Tune logs each trial failure with a 50-line traceback, which the console already
    reports as one line with the trial's log path; what stops the driver still raises."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.buffer = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
        self.buffer.setFormatter(logging.Formatter(LOG_FORMAT))
        import mlflow  # noqa: F401 - it sets up its console handler on import: import first, then quiet it
        self.quiet()
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).addHandler(self.buffer)

    def quiet(self) -> None:
        """Keep the libraries' own console handlers quiet (not with -v). Again once Ray is up: joining a running
        cluster (--address) sets up Ray's console handler anew, and Tune's INFO notes would reach the console."""
        if self.verbose:
            return
        for name in LIBRARY_LOGGERS:
            for h in logging.getLogger(name).handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    h.setLevel(logging.CRITICAL)

    def to_file(self, out: Path) -> Path:
        path = out / sweepdir.LOGS_DIR / DRIVER_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(self.buffer.formatter)
        self.buffer.setTarget(handler)
        self.buffer.flush()
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).removeHandler(self.buffer)
            logging.getLogger(name).addHandler(handler)
        return path
