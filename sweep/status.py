"""Where a sweep stands, read from its directory alone: no Ray, no GPU, no torch.

    python -m sweep.status sweeps/smoke

Works while the sweep runs (from another terminal, or another machine that sees the directory),
after it finished, and after its driver was killed. Prints how the driver is doing, the sweep line,
one line per trial (status, step / total, train and eval loss, tokens/s, GPU, ETA; the log file of
any trial that did not finish) and the table as the sweep would write it now. It writes nothing.

Exit codes as ``sweep.run``: 0 every trial finished, 1 some did not (failed, interrupted, never
ran), 2 not a sweep directory; and 3 while the sweep is still running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sweep import sweepdir
from sweep.cli import UserError, exit_code
from sweep.progress import PENDING, PROGRESS, RUNNING, SweepProgress, TrialProgress, clock, driver_alive

STALE_AFTER = 60.0  # seconds without a progress write after which a driver on another machine counts as gone
STILL_RUNNING = 3


def settle(progress: SweepProgress, out: Path, now: float) -> str:
    """How the sweep stands (running, finished, interrupted, or stopped: its driver died mid-run), with
    each trial's status brought up to date from the ledger and Tune's trial directories."""
    from sweep.storage import trial_dirs
    from trainers.checkpoints import final_result, read_text

    ledger = {e["trial"]: e for e in sweepdir.read_json(out / sweepdir.LEDGER).values()}
    for t in progress.trials:
        if t.live and t.name in ledger:  # the ledger records an end the moment Tune reports it
            t.status, t.error = ledger[t.name]["status"], ledger[t.name].get("error", "") or t.error
        fs, dirs = trial_dirs(out, t.name) if t.live else (None, [])  # the sweep directory, or its --storage
        if t.live and (done := next(filter(None, (final_result(d, None, fs) for d in dirs)), None)):
            # finished, but the driver died before recording it; a resume collects it without training
            t.status, t.result = sweepdir.TERMINATED, json.loads(read_text(done, "metrics.json", fs))
    if progress.state != "running":
        return progress.state
    alive = driver_alive(progress.driver)
    if alive is None:
        alive = now - progress.updated < STALE_AFTER
    if alive:
        return "running"
    for t in progress.trials:
        if t.status == RUNNING:
            t.status = sweepdir.INTERRUPTED
        elif t.status == PENDING:
            t.status = sweepdir.NOT_RUN
    progress.state = "stopped"
    return progress.state


def headline(progress: SweepProgress, state: str, now: float) -> str:
    d = progress.driver
    where = f"driver pid {d.get('pid')} on {d.get('host')}"
    last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(progress.updated))
    return {
        "running": f"running ({where}; updated {clock(now - progress.updated)} ago)",
        "finished": f"finished {last}",
        "interrupted": f"interrupted {last}: run the same command again to resume it",
        "stopped": f"not running: its driver ({where}) stopped without finishing, last heard from {last}; "
                   "run the same command again to resume it",
    }.get(state, state)


def table(progress: SweepProgress, out: Path | None = None) -> tuple[list[dict], str]:
    """The table as the sweep would write it now (finished trials' measures, the others' statuses); with the
    sweep directory ``out``, paired comparisons from the per-example losses of the trials collected there."""
    from sweep.plan import PlannedTrial
    from sweep.summary import build_rows, load_heldout, to_markdown
    from trainers.config import TrialConfig, TrialResult

    planned, outcomes = [], {}
    for t in progress.trials:
        planned.append(PlannedTrial(TrialConfig.from_dict(t.config), t.trainable_params, t.total_params))
        try:
            result = TrialResult.from_dict(t.result) if t.result else None
        except (KeyError, TypeError):  # written by another version of lora-sweep
            result = None
        outcomes[t.name] = sweepdir.TrialOutcome(t.status, result, t.error)
    rows = build_rows(planned, outcomes, progress.metric, load_heldout(out, outcomes) if out else None)
    return rows, to_markdown(rows, f"Sweep {progress.name}", progress.metric)


def trial_line(t: TrialProgress, now: float, width: int) -> str:
    line = t.line(now, width)
    return line + (f"  (log: {t.log})" if t.status not in (sweepdir.TERMINATED, PENDING) and t.log else "")


def status(out: Path) -> int:
    if not (out / sweepdir.SWEEP_MANIFEST).is_file():
        raise UserError(f"{out} is not a sweep directory (no {sweepdir.SWEEP_MANIFEST})")
    progress = SweepProgress.read(out)
    if progress is None:
        raise UserError(f"{out} has no {PROGRESS} yet: the sweep was started by an older lora-sweep, or "
                        "its driver stopped before its first trial started")
    now = time.time()
    state = settle(progress, out, now)
    width = max(len(t.name) for t in progress.trials)
    print(f"sweep {progress.name} ({progress.sweep_id}) in {out}: {headline(progress, state, now)}")
    print(progress.sweep_line(now if state == "running" else progress.updated))
    for t in progress.trials:
        print("  " + trial_line(t, now, width))
    rows, md = table(progress, out)
    print("\n" + md, end="")
    if state == "running":
        return STILL_RUNNING
    return 1 if sweepdir.sweep_failed(rows) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sweep.status", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="the sweep directory, e.g. sweeps/smoke")
    args = p.parse_args(argv)
    return exit_code(lambda: status(Path(args.dir)))


if __name__ == "__main__":
    sys.exit(main())
