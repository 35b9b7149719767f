"""NVIDIA MPS for packed trials (sweep/mps.py): when a sweep starts a daemon, what its trials inherit, and
that it is always stopped. The machine has no GPU, so ``nvidia-cuda-mps-control`` is a stand-in that keeps
the real one's contract (``-d`` starts a daemon listening in $CUDA_MPS_PIPE_DIRECTORY; a command on stdin
fails when none listens; ``quit`` stops it, leaving its ``control`` socket file behind, as the real one did
on an H200) and records every call. The real daemon and its effect
(+36% tokens/s on four packed trials, the same losses) were measured on an H200 (README, "GPU sharing")."""

import json
import os
import stat
import time
from pathlib import Path

import pytest

from sweep import mps
from sweep.cli import UserError
from trainers import config

STAND_IN = """#!/usr/bin/env python3
import json, os, sys
pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
def note(call):
    with open(os.environ["STAND_IN_CALLS"], "a") as f:
        f.write(json.dumps(call) + "\\n")
control, gone = os.path.join(pipe, "control"), os.path.join(pipe, "stand-in-quit")
if sys.argv[1:] == ["-d"]:
    note({"call": "-d", "pipe": pipe, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "log": os.environ.get("CUDA_MPS_LOG_DIRECTORY")})
    if os.environ.get("STAND_IN_FAIL"):
        sys.exit(1)
    open(control, "w").close()
    if os.path.exists(gone):
        os.remove(gone)
    sys.exit(0)
command = sys.stdin.read().strip()
note({"call": command, "pipe": pipe})
if not os.path.exists(control) or os.path.exists(gone):
    print("Cannot find MPS control daemon process")
    sys.exit(1)
if command == "quit":
    open(gone, "w").close()  # the daemon is gone; its socket file stays
"""


@pytest.fixture
def control(tmp_path, monkeypatch):
    """The stand-in on PATH; returns a function reading the calls it received."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / mps.CONTROL
    exe.write_text(STAND_IN)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STAND_IN_CALLS", str(calls))
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    monkeypatch.delenv(mps.LOG_ENV, raising=False)
    monkeypatch.setattr(config, "MPS_MACHINE_PIPE", str(tmp_path / "no-machine-daemon"))
    monkeypatch.setattr(mps, "ROOT", tmp_path / "run")  # the sweeps' daemon directories, this test's own
    return lambda: [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def start(out: Path, mode="auto", **kw):
    args = {"address": None, "gpus_per_trial": "auto", "cuda_trials": True, **kw}
    return mps.start_for_sweep(mode, out=out, **args)


def test_a_packed_sweep_starts_a_daemon_its_trials_inherit_and_stops_it(control, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    daemon = start(tmp_path / "sweep")
    pipe = mps.pipe_dir(tmp_path / "sweep")
    assert daemon is not None and daemon.pipe == pipe and (pipe / "control").exists()
    assert stat.S_IMODE(pipe.stat().st_mode) == 0o700 and daemon.owner() == os.getpid()  # private, and whose
    # the Ray processes started next inherit this, so every trial is a client of this daemon
    assert os.environ[mps.PIPE_ENV] == str(pipe) and os.environ[mps.LOG_ENV] == str(pipe / "log")
    started = control()[-1]
    # the daemon sees every GPU, so the GPU numbers Ray gives each trial mean the same GPUs to it
    assert started == {"call": "-d", "pipe": str(pipe), "visible": None, "log": str(pipe / "log")}
    assert capsys.readouterr().out.strip() == ("GPU sharing: NVIDIA MPS (trials on one GPU run their kernels side by "
                                               "side; --mps off to time-slice)")
    t0 = time.monotonic()
    mps.stop_for_sweep(daemon)
    # quit, then asked until it no longer answers: its socket file, left behind, is no sign of it (on the H200
    # waiting for that file to go cost 30 s at the end of every sweep under MPS); the stale file is removed
    assert control()[-2:] == [{"call": "quit", "pipe": str(pipe)}, {"call": "get_server_list", "pipe": str(pipe)}]
    assert time.monotonic() - t0 < 5
    assert not (pipe / "control").exists() and mps.PIPE_ENV not in os.environ and mps.LOG_ENV not in os.environ


def test_the_daemon_a_killed_driver_left_is_used_and_stopped(control, tmp_path):
    out = tmp_path / "sweep"
    left = start(out)  # ...and the driver was killed: never stopped
    os.environ.pop(mps.PIPE_ENV)  # a new driver process starts without it
    os.environ.pop(mps.LOG_ENV)
    again = start(out)
    assert [c["call"] for c in control()] == ["-d", "get_server_list"]  # found answering: not started twice
    assert again.pipe == left.pipe
    mps.stop_for_sweep(again)
    assert [c["call"] for c in control()][-2:] == ["quit", "get_server_list"]
    assert not (again.pipe / "control").exists()


def dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_beside_another_sweeps_daemon_in_use_a_sweep_time_slices(control, tmp_path, capsys):
    first = start(tmp_path / "first")  # its driver: this process, alive
    os.environ.pop(mps.PIPE_ENV)
    os.environ.pop(mps.LOG_ENV)
    capsys.readouterr()
    assert start(tmp_path / "second") is None  # not a second daemon for the same GPUs
    assert capsys.readouterr().out.strip() == ("GPU sharing: time-sliced (another sweep's MPS daemon runs on this "
                                               f"machine: driver process {os.getpid()})")
    with pytest.raises(UserError, match=f"--mps on: the MPS daemon of another sweep on this machine is in use "
                                        f"\\(its driver is process {os.getpid()}\\)"):
        start(tmp_path / "second", "on")
    assert [c["call"] for c in control()] == ["-d", "get_server_list", "get_server_list"]
    assert (first.pipe / "control").exists()  # the first sweep's daemon is left alone
    mps.stop_for_sweep(first)


def test_another_sweeps_leftover_daemon_is_stopped(control, tmp_path):
    left = start(tmp_path / "killed")
    (left.pipe / mps.OWNER).write_text(str(dead_pid()))  # its driver was killed
    os.environ.pop(mps.PIPE_ENV)
    os.environ.pop(mps.LOG_ENV)
    daemon = start(tmp_path / "next")
    assert daemon is not None and daemon.pipe != left.pipe
    assert [(c["call"], c["pipe"]) for c in control()] == [
        ("-d", str(left.pipe)), ("get_server_list", str(left.pipe)), ("quit", str(left.pipe)),
        ("get_server_list", str(left.pipe)), ("-d", str(daemon.pipe))]
    assert not (left.pipe / "control").exists() and daemon.owner() == os.getpid()
    mps.stop_for_sweep(daemon)


def test_two_sweeps_get_their_own_daemons_with_short_socket_paths(tmp_path):
    deep = tmp_path / ("d" * 120) / "sweep"
    assert mps.pipe_dir(tmp_path / "a") != mps.pipe_dir(tmp_path / "b")
    assert mps.pipe_dir(deep) == mps.pipe_dir(deep)
    assert len(str(mps.pipe_dir(deep) / "control")) < 108  # AF_UNIX's limit, whatever the sweep directory


@pytest.mark.parametrize("mode, kw", [
    ("off", {}),
    ("auto", {"address": "10.0.0.1:6379"}),  # a cluster's nodes run their own daemons
    ("auto", {"cuda_trials": False}),
    ("auto", {"gpus_per_trial": 1.0}),  # one trial per GPU: nothing to share
    ("on", {"cuda_trials": False}),
])
def test_no_daemon_when_nothing_shares_a_gpu_here(control, tmp_path, capsys, mode, kw):
    assert start(tmp_path / "sweep", mode, **kw) is None
    assert control() == [] and mps.PIPE_ENV not in os.environ and capsys.readouterr().out == ""


def test_on_starts_one_even_for_whole_gpu_trials(control, tmp_path):
    daemon = start(tmp_path / "sweep", "on", gpus_per_trial=1.0)
    assert daemon is not None and [c["call"] for c in control()] == ["-d"]
    mps.stop_for_sweep(daemon)


def test_a_machine_that_runs_mps_is_left_as_it_is(control, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(mps.PIPE_ENV, "/var/run/mps")
    assert start(tmp_path / "sweep") is None and control() == []
    assert os.environ[mps.PIPE_ENV] == "/var/run/mps"
    assert capsys.readouterr().out.strip() == f"GPU sharing: the machine's NVIDIA MPS ({mps.PIPE_ENV}=/var/run/mps)"


def test_a_daemon_that_will_not_start(control, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STAND_IN_FAIL", "1")
    assert start(tmp_path / "sweep") is None and mps.PIPE_ENV not in os.environ  # auto: time-sliced, said so
    assert capsys.readouterr().out.strip() == ("GPU sharing: time-sliced (nvidia-cuda-mps-control -d did not start; "
                                               f"its log: {mps.pipe_dir(tmp_path / 'sweep') / 'log'})")
    with pytest.raises(UserError, match="--mps on: nvidia-cuda-mps-control -d did not start; its log: "):
        start(tmp_path / "sweep", "on")


def test_a_daemon_directory_someone_else_made_is_never_used(control, tmp_path, capsys):
    """The directories live in a shared temp dir: one planted there (here a link) is refused, not followed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pipe = mps.pipe_dir(tmp_path / "sweep")
    pipe.parent.mkdir(parents=True)
    pipe.symlink_to(elsewhere)
    assert start(tmp_path / "sweep") is None and control() == [] and mps.PIPE_ENV not in os.environ
    assert capsys.readouterr().out.strip() == f"GPU sharing: time-sliced ({pipe} is not this user's own directory)"
    assert list(elsewhere.iterdir()) == []
    (elsewhere / "control").touch()  # nor is one taken for another sweep's daemon, to stop or to defer to
    (tmp_path / "run" / f"lora-sweep-mps-{os.getuid()}-planted").symlink_to(elsewhere)
    daemon = start(tmp_path / "other")
    assert daemon is not None and [c["call"] for c in control()] == ["-d"]
    mps.stop_for_sweep(daemon)


def test_bad_mps_options_are_refused_before_anything_starts(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="with --address run 'nvidia-cuda-mps-control -d' on each GPU node"):
        mps.check("on", "10.0.0.1:6379")
    monkeypatch.setenv("PATH", str(tmp_path))  # no control binary
    with pytest.raises(UserError, match="--mps on: nvidia-cuda-mps-control is not installed here"):
        mps.check("on", None)
    with pytest.raises(UserError, match="--mps must be one of auto, on, off"):
        mps.check("sometimes", None)
    mps.check("auto", None)  # auto without the binary: time-sliced, no error
    mps.check("off", "10.0.0.1:6379")


def test_the_driver_stops_its_daemon_when_ray_does_not_start(control, tmp_path, monkeypatch):
    from sweep import cluster, driver
    from sweep.cli import RunError

    opts = driver.SweepOptions(space="search_spaces/smoke.py", gpus_per_trial=0.5)
    plan = driver.plan_sweep(opts, for_training=True)
    monkeypatch.setattr(driver, "share_trials", lambda p: [type("P", (), {"cfg": type("C", (), {
        "device": "cuda", "model": "bundled:desc-llama"})()})()])

    def no_ray(*a, **k):
        assert os.environ[mps.PIPE_ENV] == str(mps.pipe_dir(tmp_path / "sweep"))  # set before Ray starts
        raise RunError("ray would not start")

    monkeypatch.setattr(cluster, "start_ray", no_ray)
    with pytest.raises(RunError):
        driver.start(opts, plan, tmp_path / "sweep", None, None, None, None, logs=None)
    assert [c["call"] for c in control()] == ["-d", "quit", "get_server_list"] and mps.PIPE_ENV not in os.environ


@pytest.mark.parametrize("share, pipe_env, machine_daemon, says", [
    (None, None, False, "whole"),  # no share set: a GPU of its own
    ("1.0", "/tmp/x", False, "whole"),
    ("0.25", None, False, "time-sliced"),
    ("0.25", "/tmp/lora-sweep-mps-0-abc", False, "mps"),  # the sweep's daemon
    ("0.25", None, True, "mps"),  # the machine's
])
def test_a_trial_records_how_it_had_its_gpu(tmp_path, monkeypatch, share, pipe_env, machine_daemon, says):
    from trainers import entry, trial
    from trainers.models import GPU_SHARE_ENV

    for key, value in ((GPU_SHARE_ENV, share), (mps.PIPE_ENV, pipe_env)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    (tmp_path / "mps").mkdir()
    if machine_daemon:
        (tmp_path / "mps" / "control").touch()
    monkeypatch.setattr(config, "MPS_MACHINE_PIPE", str(tmp_path / "mps"))
    monkeypatch.delenv(mps.PRIORITY_ENV, raising=False)
    assert trial.gpu_sharing() == says
    entry.mps_client_priority(mps.BELOW_NORMAL)  # a trial that gives way to a longer one on its GPU
    assert os.environ[mps.PRIORITY_ENV] == "1"
    assert trial.gpu_sharing() == (says + ", below normal" if says == "mps" else says)


def test_a_trial_asks_for_its_mps_priority_only_before_cuda_starts_and_never_over_the_users(monkeypatch):
    import torch

    from trainers import entry as trial

    monkeypatch.delenv(mps.PRIORITY_ENV, raising=False)
    trial.mps_client_priority(mps.NORMAL)
    assert mps.PRIORITY_ENV not in os.environ  # normal is CUDA's default
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    trial.mps_client_priority(mps.BELOW_NORMAL)
    assert mps.PRIORITY_ENV not in os.environ  # too late: CUDA reads it once, when it starts
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv(mps.PRIORITY_ENV, "0")
    trial.mps_client_priority(mps.BELOW_NORMAL)
    assert os.environ[mps.PRIORITY_ENV] == "0"  # the user's own setting stands


def test_a_trial_that_sees_no_gpu_under_mps_says_where_to_look(tmp_path, monkeypatch):
    import torch

    from trainers import trial
    from trainers.config import TrialConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(mps.PIPE_ENV, "/tmp/lora-sweep-mps-0-abc")
    cfg = TrialConfig(name="t", index=0, model="m", dataset="d", r=8, targets="attention", bits=4, device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible to it \\(it is a client of the NVIDIA MPS daemon "
                                           "in /tmp/lora-sweep-mps-0-abc: see the log there, or run the sweep with "
                                           "--mps off\\)"):
        trial.run_trial(cfg, tmp_path / "t")
    monkeypatch.delenv(mps.PIPE_ENV)
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible to it$"):
        trial.run_trial(cfg, tmp_path / "t")


def test_a_full_disk_where_the_driver_is_recorded_stops_the_daemon_it_started(control, tmp_path, monkeypatch, capsys):
    def full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mps.Daemon, "claim", full)
    assert start(tmp_path / "sweep") is None and mps.PIPE_ENV not in os.environ
    pipe = mps.pipe_dir(tmp_path / "sweep")
    assert [c["call"] for c in control()] == ["-d", "quit", "get_server_list"] and not (pipe / "control").exists()
    assert capsys.readouterr().out.strip() == (f"GPU sharing: time-sliced (cannot record this driver in {pipe}: "
                                               "[Errno 28] No space left on device)")
