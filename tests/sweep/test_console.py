"""The live console and sweep.status, driven in-process by hand-made reports on a fake clock: exact
lines, ETAs, what goes to stdout and stderr, progress.json, and the status command's exit codes."""

import io
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from sweep import console as console_mod
from sweep import progress as progress_mod
from sweep import status as status_mod
from sweep.console import Console, plain_every
from sweep.plan import PlannedTrial
from sweep.progress import SweepProgress, TrialProgress, clock, device_text, this_driver
from sweep.sweepdir import TrialOutcome, write_json
from tests.conftest import REPO, make_result
from trainers.config import EvalReport, StepReport, TrialConfig



@pytest.fixture
def fake_time(monkeypatch):
    now = [time.time()]
    fake = SimpleNamespace(time=lambda: now[0], strftime=time.strftime, localtime=time.localtime)
    for mod in (console_mod, progress_mod, status_mod):
        monkeypatch.setattr(mod, "time", fake)
    return now


def cfg(name: str, baseline: bool = False) -> TrialConfig:
    return TrialConfig(model="random:tiny-llama", dataset="bundled:products-400", device="cpu", name=name, index=0,
                       r=8, targets="attention", bits=4, target_modules=("q_proj", "v_proj"), baseline=baseline)


def make_console(tmp_path, names=("a", "b", "c"), live=False):
    planned = [PlannedTrial(cfg(n), 4096, 221504) for n in names]
    manifest = {"name": "demo", "sweep_id": "abc123"}
    prog = console_mod.new_progress(manifest, tmp_path, planned, "eval_loss")
    out = io.StringIO()
    return Console(prog, tmp_path, stream=out, live=live), out


def step(n: int, loss: float, total: int = 72, rate: float = 12345.0, system=None) -> dict:
    return StepReport(step=n, epoch=n / 36, loss=loss, learning_rate=1e-3, max_steps=total, tokens_per_second=rate,
                      system=system or {}).to_report()


def test_trial_line_shows_steps_losses_rate_device_and_eta(tmp_path, fake_time):
    con, out = make_console(tmp_path)
    con.trial_started("a")
    con.trial_report("a", step(1, 7.0))
    fake_time[0] += 10  # 10 s for 9 steps after the first report: 36 steps left take 40 s more
    con.trial_report("a", step(10, 6.5, system={"cpu_utilization_percentage": 97.4}))
    con.trial_report("a", EvalReport(train_steps=10, epoch=0.3, eval_loss=6.25).to_report())  # a periodic eval
    t = con.progress.trial("a")
    assert t.eta(fake_time[0]) == pytest.approx(62 / 0.9)  # 62 steps left at 9 steps per 10 s
    line = t.line(fake_time[0], width=3)
    assert line == ("a   RUNNING         10/72  loss  6.5000  eval  6.2500   12.3k tok/s  cpu 97%        ETA 1:09")
    assert device_text({"gpu_0_utilization_percentage": 87.0, "gpu_0_memory_usage_megabytes": 21504.0}) == \
        "gpu0 87% 21.0G"
    fake_time[0] += 9
    assert t.eta(fake_time[0]) == pytest.approx(62 / 0.9 - 9)  # counts down between reports
    assert clock(3725) == "1:02:05" and clock(None) == "-"


def test_plain_output_prints_events_blocks_and_errors_with_the_log(tmp_path, fake_time, capsys):
    con, out = make_console(tmp_path)
    con.trial_started("a")
    con.trial_started("b")
    con.trial_report("a", step(1, 7.0))
    fake_time[0] += 29
    con.tick()
    assert out.getvalue().count("\n") == 2  # only the two start lines before 30 s
    fake_time[0] += 2
    con.tick()  # the periodic block: the sweep line, then one line per running trial
    lines = out.getvalue().splitlines()
    assert lines[0] == "[0:00] start a" and lines[1] == "[0:00] start b"
    assert lines[2].startswith("sweep demo: 0/3 done, 2 running, 1 pending; elapsed 0:31")
    assert lines[3].startswith("  a RUNNING") and lines[4].startswith("  b RUNNING") and len(lines) == 5
    con.trial_ended("b", "ERROR", "RuntimeError: injected fault at step 6")
    err = capsys.readouterr().err
    assert err.startswith("[0:31] b ERROR ") and "RuntimeError: injected fault at step 6" in err
    assert f"(log: {tmp_path}/logs/b.log)" in err  # at once, on stderr, with the trial's log
    con.trial_ended("a", "STOPPED")  # statuses are free strings: issue 10's early stopping shows as is
    assert "[0:31] a STOPPED " in out.getvalue()
    assert con.progress.counts() == (2, 0, 1)
    # early stopping ends a trial, it does not fail it: counted apart from the failed one
    assert "2/3 done (1 not finished) (1 stopped early)" in con.progress.sweep_line(fake_time[0])


def test_live_output_redraws_the_block_in_place(tmp_path, fake_time):
    con, out = make_console(tmp_path, live=True)
    con.trial_started("a")
    fake_time[0] += 1.5
    con.tick()
    fake_time[0] += 1.5
    con.tick()
    text = out.getvalue()
    assert text.count("\x1b[2F\x1b[J") >= 2  # the two-line block (sweep line + a) erased before each redraw
    assert text.count("[0:00] start a") == 1  # events are printed once, above the block


def test_progress_file_round_trips_and_close_takes_the_outcomes(tmp_path, fake_time):
    con, _ = make_console(tmp_path)
    con.trial_started("a")
    con.trial_report("a", step(72, 5.5))
    con.trial_report("a", make_result(eval_loss=5.43, train_steps=72).to_report())
    con.close({"a": TrialOutcome("TERMINATED", make_result(eval_loss=5.43, train_steps=72))})
    back = SweepProgress.read(tmp_path)
    assert back.state == "interrupted"  # b and c never ran
    assert [(t.name, t.status) for t in back.trials] == [("a", "TERMINATED"), ("b", "NOT_RUN"), ("c", "NOT_RUN")]
    a = back.trial("a")
    assert (a.step, a.max_steps, a.eval_loss, a.result["eval_loss"]) == (72, 72, 5.43, 5.43)
    assert a.log == str(tmp_path / "logs" / "a.log")
    assert plain_every(60) == 30 and plain_every(1200) == 120 and plain_every(7200) == 300


def sweep_dir(tmp_path, driver: dict, statuses: dict, ledger: dict | None = None):
    """A sweep directory as a driver leaves it: manifest, progress.json, ledger."""
    write_json(tmp_path / "sweep.json", {"name": "demo", "sweep_id": "abc123"})
    trials = []
    for name, status in statuses.items():
        t = TrialProgress(name, status=status, config=cfg(name).to_dict(), trainable_params=4096, total_params=221504,
                          log=str(tmp_path / "logs" / f"{name}.log"), step=72 if status == "TERMINATED" else 30,
                          max_steps=72, loss=5.5)
        if status == "TERMINATED":
            t.result = make_result(eval_loss=5.5).to_dict()
        trials.append(t)
    SweepProgress("demo", "abc123", "eval_loss", trials, driver=driver).write(tmp_path)
    write_json(tmp_path / "ledger.json", ledger or {})


def run_status(tmp_path, capsys) -> tuple[int, str]:
    code = status_mod.main([str(tmp_path)])
    return code, capsys.readouterr().out


def trial_statuses(out: str) -> dict[str, str]:
    return {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if ln.startswith("  ")}


def test_status_of_a_sweep_whose_driver_was_killed(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    driver = {**this_driver(), "pid": int(dead.stdout)}  # same host, a process that is gone
    sweep_dir(tmp_path, driver, {"a": "TERMINATED", "b": "RUNNING", "c": "PENDING", "d": "RUNNING"},
              ledger={"fp-d": {"trial": "d", "status": "ERROR", "at": 0, "error": "RuntimeError: boom"}})
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code, out = run_status(tmp_path, capsys)
    assert code == 1
    assert "not running: its driver (driver pid" in out and "run the same command again to resume it" in out
    assert trial_statuses(out) == {"a": "TERMINATED", "b": "INTERRUPTED", "c": "NOT_RUN", "d": "ERROR"}  # d: ledger
    assert f"(log: {tmp_path}/logs/b.log)" in out and "RuntimeError: boom" in out
    assert "| a * | 8 | attention" in out and out.count("| INTERRUPTED |") == 1  # the table as it would be now
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # status writes nothing


def test_status_exit_codes(tmp_path, capsys):
    sweep_dir(tmp_path, this_driver(), {"a": "TERMINATED", "b": "RUNNING"})  # this process: alive
    code, out = run_status(tmp_path, capsys)
    assert code == 3 and "running (driver pid" in out
    progress = SweepProgress.read(tmp_path)
    progress.trial("b").status, progress.state = "TERMINATED", "finished"
    progress.trial("b").result = make_result().to_dict()
    progress.write(tmp_path)
    assert run_status(tmp_path, capsys)[0] == 0
    assert status_mod.main([str(tmp_path / "nowhere")]) == 2
    assert "is not a sweep directory" in capsys.readouterr().err


def test_status_from_another_machine_trusts_a_recent_heartbeat_only(tmp_path, capsys):
    sweep_dir(tmp_path, {"pid": 1, "host": "elsewhere", "process_started": 0.0}, {"a": "RUNNING"})
    assert run_status(tmp_path, capsys)[0] == 3
    data = json.loads((tmp_path / "progress.json").read_text())
    data["updated"] -= 120
    (tmp_path / "progress.json").write_text(json.dumps(data))
    code, out = run_status(tmp_path, capsys)
    assert code == 1 and trial_statuses(out) == {"a": "INTERRUPTED"}


def test_status_needs_neither_ray_nor_torch(tmp_path):
    sweep_dir(tmp_path, this_driver(), {"a": "TERMINATED"})
    code = ("import sys, runpy; sys.argv = ['sweep.status', sys.argv[1]]\n"
            "try:\n    runpy.run_module('sweep.status', run_name='__main__')\n"
            "except SystemExit as e:\n    code = e.code\n"
            "heavy = [m for m in ('torch', 'ray', 'transformers', 'mlflow') if m in sys.modules]\n"
            "print('heavy:', heavy, 'code:', code)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip().splitlines()[-1] == "heavy: [] code: 3", proc.stderr[-2000:]


# PyTorch's line, verbatim, from a packed trial on an H200 (README, "GPU memory")
OOM_LINE = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 139.80 GiB. GPU 0 has a total capacity of "
            "139.80 GiB of which 137.99 GiB is free. Process 1747 has 66.00 MiB memory in use. Process 1795 has 946.00 "
            "MiB memory in use. Including non-PyTorch memory, this process has 830.00 MiB memory in use. 46.03 GiB "
            "allowed; Of the allocated memory 64.58 MiB is allocated by PyTorch, and 7.42 MiB is reserved by PyTorch "
            "but unallocated. If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandabl"
            "e_segments:True to avoid fragmentation.  See documentation for Memory Management  (https://docs.pytorch.o"
            "rg/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf)")


LESS = "make it need less (gradient_checkpointing=True, or a smaller batch_size with a larger grad_accum)"


@pytest.mark.parametrize("line, says", [
    (OOM_LINE, ("torch.OutOfMemoryError: CUDA out of memory (asked for 139.80 GiB more; its share of the GPU allows "
                f"46.03 GiB): give it a larger share (--gpus-per-trial) or {LESS}")),
    (OOM_LINE.replace(" 46.03 GiB allowed;", ""),  # a whole GPU: no cap, so no larger share to give
     f"torch.OutOfMemoryError: CUDA out of memory (asked for 139.80 GiB more; 137.99 GiB free on the GPU): {LESS}"),
    ("torch.OutOfMemoryError: CUDA out of memory.", f"torch.OutOfMemoryError: CUDA out of memory: {LESS}"),
    ("RuntimeError: injected fault at step 3", "RuntimeError: injected fault at step 3"),
])
def test_a_trial_error_is_its_tracebacks_last_line_and_an_oom_says_what_to_change(tmp_path, line, says):
    from sweep.callbacks import error_line

    error_file = tmp_path / "error.txt"
    error_file.write_text(f"Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n{line}\n\n")
    assert error_line(str(error_file)) == says
    assert error_line(str(tmp_path / "none.txt")) == "" and error_line(None) == ""
