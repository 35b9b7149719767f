"""Faults with real processes: the driver SIGKILLed mid-sweep and resumed, trials that raise or are
killed, a half-written checkpoint, an edited space file. Every wait is bounded."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from pathlib import Path

from tests.conftest import REPO, read_csv, tree_digest
from trainers.checkpoints import final_result, resume_point

pytestmark = pytest.mark.slow  # real Ray sweeps / trained trials

SPACE = """\
from sweep import Settings, Space, Trial
space = Space(
    name="faults",
    settings=Settings(model="random:tiny-llama", dataset="bundled:products-400", device="cpu", cpus_per_trial={cpus},
                      learning_rate={lr}, epochs=2, batch_size=8, train_samples=160, logging_steps=3,
                      checkpoint_every=6, max_new_tokens=8, heldout_prompts=1),
    trials=[{trials}],
)
"""
TWO = 'Trial(r=8, targets="attention", bits=16, name="a"), Trial(r=8, targets="all_linear", bits=16, name="b")'
STEPS = 36  # 144 train rows / batch 8 x 2 epochs


def write_space(work: Path, trials: str = TWO, cpus: int = 2, lr: float = 3e-3) -> Path:
    path = work / "space.py"
    path.write_text(SPACE.format(trials=trials, cpus=cpus, lr=lr))
    return path


def sweep_cmd(work: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "sweep.run", str(work / "space.py"), "--no-baseline", "--output", str(work / "out"),
            "--mlflow-uri", f"sqlite:///{work}/m.db", *extra]


def env(faults: dict | None = None) -> dict:
    e = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    e.pop("LORA_SWEEP_FAULTS", None)
    if faults:
        e["LORA_SWEEP_FAULTS"] = json.dumps(faults)
    return e


def start(work: Path, faults: dict | None = None) -> subprocess.Popen:
    """The sweep in its own process group, as a terminal would run it."""
    return subprocess.Popen(sweep_cmd(work), cwd=work, env=env(faults), start_new_session=True,
                            stdout=open(work / f"run-{time.monotonic_ns()}.log", "w"), stderr=subprocess.STDOUT)


def kill_when(proc: subprocess.Popen, condition, timeout: float = 240) -> float:
    """SIGKILL the driver's whole process group (driver, Ray, trial workers) once ``condition()`` holds."""
    start_t = time.monotonic()
    while not condition():
        assert proc.poll() is None, "the sweep ended before the kill point"
        assert time.monotonic() - start_t < timeout, "kill point never reached"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return time.monotonic() - start_t


def finish(work: Path, faults: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_cmd(work), cwd=work, env=env(faults), capture_output=True, text=True, timeout=timeout)


def metrics(work: Path, trial: str) -> dict:
    return json.loads((work / "out" / "trials" / trial / "metrics.json").read_text())


def assert_one_clean_run_per_trial(work: Path, trials: set[str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/m.db")
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    parents = [r for r in runs if r.data.tags.get("lora_sweep.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("lora_sweep.role") == "trial"]
    assert len(runs) == 1 + len(trials) and len(parents) == 1
    assert sorted(r.info.run_name for r in children) == sorted(trials)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]


def trial_dir(work: Path, name: str) -> Path:
    return work / "out" / "tune" / name


def test_kill_driver_edit_space_truncate_checkpoint_then_resume(tmp_path, model_cache):
    """SIGKILL the process group when trial a has finished and b is mid-training (checkpoint at step 12);
    an edited space file is refused without touching the directory; b's newest checkpoint is then cut
    short; the resumed sweep finishes, a is not retrained and b resumes from its previous checkpoint."""
    write_space(tmp_path)
    proc = start(tmp_path, faults={"b": {"mode": "slow", "sleep": 0.4}})
    waited = kill_when(proc, lambda: final_result(trial_dir(tmp_path, "a")) is not None
                       and (resume_point(trial_dir(tmp_path, "b")) or (None, 0))[1] >= 12)
    print(f"killed after {waited:.1f}s")
    a_done = json.loads((final_result(trial_dir(tmp_path, "a")) / "metrics.json").read_text())
    (tmp_path / "out" / "trials").mkdir(exist_ok=True)  # not there yet: the driver copies results at the end
    before = tree_digest(tmp_path / "out")

    # sweep.status reads the killed sweep from its directory alone, and touches nothing (checked below)
    seen = subprocess.run([sys.executable, "-m", "sweep.status", str(tmp_path / "out")], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=60)
    assert seen.returncode == 1, seen.stderr
    assert "not running: its driver" in seen.stdout.splitlines()[0]
    statuses = {ln.split()[0]: ln.split()[1] for ln in seen.stdout.splitlines() if ln.startswith("  ")}
    assert statuses == {"a": "TERMINATED", "b": "INTERRUPTED"}
    assert f"(log: {tmp_path / 'out' / 'logs' / 'b.log'})" in seen.stdout

    # the space file changed since the sweep started: refused, nothing touched
    write_space(tmp_path, lr=1e-3)
    refused = finish(tmp_path)
    assert refused.returncode == 2
    assert "was started from a different space" in refused.stderr and refused.stderr.strip().count("\n") == 0
    assert tree_digest(tmp_path / "out") == before
    write_space(tmp_path)

    # the newest checkpoint of b is half-written: resume must fall back to the one before
    newest, step = resume_point(trial_dir(tmp_path, "b"))
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    previous = resume_point(trial_dir(tmp_path, "b"))
    assert previous is not None and previous[1] == step - 6

    start_t = time.monotonic()
    done = finish(tmp_path)
    print(f"resume took {time.monotonic() - start_t:.1f}s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 trial(s) already finished" in done.stdout
    a, b = metrics(tmp_path, "a"), metrics(tmp_path, "b")
    assert (a["train_started_at"], a["train_steps"], a["resumed_from_step"]) == (
        a_done["train_started_at"], STEPS, 0)  # a was not trained again
    assert (b["resumed_from_step"], b["train_steps"]) == (step - 6, STEPS)
    assert_one_clean_run_per_trial(tmp_path, {"a", "b"})


def mid_training(work: Path, name: str) -> bool:
    point = resume_point(trial_dir(work, name))
    return final_result(trial_dir(work, name)) is None and point is not None and point[1] < STEPS


def test_kill_driver_twice_at_different_points(tmp_path, model_cache):
    """Kill 1: no trial finished, one mid-training. Kill 2: one finished, the other mid-training.
    (A restored Tune may start the trials in either order, so the kill points name no trial.)"""
    write_space(tmp_path)
    slow = {"a": {"mode": "slow", "sleep": 0.3}, "b": {"mode": "slow", "sleep": 0.3}}
    kill_when(start(tmp_path, slow), lambda: any(mid_training(tmp_path, n) for n in "ab"))
    first = next(n for n in "ab" if mid_training(tmp_path, n))
    assert not any(final_result(trial_dir(tmp_path, n)) for n in "ab")

    def one_done_one_running():
        return any(final_result(trial_dir(tmp_path, d)) and mid_training(tmp_path, r) for d, r in ("ab", "ba"))

    kill_when(start(tmp_path, slow), one_done_one_running)
    done_name, running = next((d, r) for d, r in ("ab", "ba") if final_result(trial_dir(tmp_path, d)))
    done_before = json.loads((final_result(trial_dir(tmp_path, done_name)) / "metrics.json").read_text())
    done = finish(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics(tmp_path, first)["resumed_from_step"] > 0  # interrupted by kill 1, resumed
    assert metrics(tmp_path, running)["resumed_from_step"] > 0  # interrupted by kill 2, resumed
    after = metrics(tmp_path, done_name)
    assert (after["train_started_at"], after["train_steps"]) == (done_before["train_started_at"], STEPS)
    assert metrics(tmp_path, running)["train_steps"] == STEPS
    assert_one_clean_run_per_trial(tmp_path, {"a", "b"})


def test_trials_that_raise_or_are_killed(tmp_path, model_cache):
    """a raises once at step 12 and is retried from its step-6 checkpoint; b raises every time and
    ends ERROR while the others finish; c's worker SIGKILLs itself once and is retried; d runs out of its
    GPU share's memory at step 8 (a stand-in on the CPU) and its retry ends at once, training nothing, with
    the same error. Exit code 1."""
    trials = ('Trial(r=8, targets="attention", bits=16, name="a"), '
              'Trial(r=8, targets="attention", bits=16, name="b", seed=1), '
              'Trial(r=4, targets="attention", bits=16, name="c"), '
              'Trial(r=4, targets="attention", bits=16, name="d", seed=2)')
    write_space(tmp_path, trials=trials, cpus=1)
    done = finish(tmp_path, faults={
        "a": {"mode": "raise", "step": 12, "marker": str(tmp_path / "a.marker")},
        "b": {"mode": "raise", "step": 6},
        "c": {"mode": "kill", "step": 12, "marker": str(tmp_path / "c.marker")},
        "d": {"mode": "oom", "step": 8, "log": str(tmp_path / "d.log")},
    })
    assert done.returncode == 1, done.stderr[-3000:]
    assert (tmp_path / "a.marker").exists() and (tmp_path / "c.marker").exists()
    for name in ("a", "c"):
        m = metrics(tmp_path, name)
        assert (m["resumed_from_step"], m["train_steps"]) == (6, STEPS), name
    b_row = read_csv(tmp_path / "out" / "summary.csv")["b"]
    assert (b_row["status"], b_row["error"]) == ("ERROR", "RuntimeError: injected fault at step 6")
    assert "trial b failed: RuntimeError: injected fault at step 6" in done.stderr
    assert (tmp_path / "d.log").read_text() == "oom at step 8\n"  # its retry (from step 6) never trained
    oom = ("torch.OutOfMemoryError: CUDA out of memory (asked for 4.00 GiB more; its share of the GPU allows 2.00 GiB)"
           "{}: give it a larger share (--gpus-per-trial) or make it need less (gradient_checkpointing=True, or a "
           "smaller batch_size with a larger grad_accum)")
    assert f"d ran out of its GPU share's memory, and would again at the same share: its retry ends at once: " \
           f"{oom.format('')}" in done.stderr
    d_row = read_csv(tmp_path / "out" / "summary.csv")["d"]
    assert (d_row["status"], d_row["error"]) == ("ERROR", oom.format(" (as when it ran before at this share: not "
                                                                     "run again)"))
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("faults").experiment_id])}
    assert {n: r.info.status for n, r in runs.items()} == {
        "a": "FINISHED", "b": "FAILED", "c": "FINISHED", "d": "FAILED", "faults": "FAILED"}
    assert runs["b"].data.tags["lora_sweep.error"] == "RuntimeError: injected fault at step 6"


def test_fresh_moves_the_old_sweep_aside(tmp_path, model_cache):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"space_fingerprint": "x", "name": "faults"}))
    (out / "summary.csv").write_text("old results")
    write_space(tmp_path, trials='Trial(r=4, targets="attention", bits=16, name="a")', cpus=1)
    done = subprocess.run(sweep_cmd(tmp_path, "--fresh"), cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (aside,) = tmp_path.glob("out.old-*")
    assert (aside / "summary.csv").read_text() == "old results"
    assert json.loads((out / "sweep.json").read_text())["space_fingerprint"] != "x"


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_then_resume(how, tmp_path, model_cache):
    """Ctrl-C (SIGINT to the foreground process group), or SIGTERM to the driver alone (``timeout``, ``kill``,
    a scheduler), mid-training: the driver writes the table with the trial INTERRUPTED, closes its MLflow
    run as KILLED, says how to resume, and exits 1; no stack dump reaches the console. The same command then
    resumes (run after Ctrl-C only: SIGTERM leaves the same records)."""
    write_space(tmp_path)
    proc = start(tmp_path, faults={"a": {"mode": "slow", "sleep": 0.4}})
    start_t = time.monotonic()
    while not mid_training(tmp_path, "a"):
        assert proc.poll() is None and time.monotonic() - start_t < 240
        time.sleep(0.2)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 1
    log = next(tmp_path.glob("run-*.log")).read_text()
    assert "sweep interrupted: run the same command again to resume it" in log
    assert "SIGTERM received" not in log and "Traceback" not in log, log[-3000:]
    assert read_csv(tmp_path / "out" / "summary.csv")["a"]["status"] == "INTERRUPTED"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}
    if how == "sigterm":  # the same records as Ctrl-C leaves, which the resume below is proven on
        return
    done = finish(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics(tmp_path, "a")["resumed_from_step"] > 0
    assert_one_clean_run_per_trial(tmp_path, {"a", "b"})
