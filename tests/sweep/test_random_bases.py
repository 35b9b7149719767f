"""The sweep's ``random:`` bases, written by one child process (``python -m trainers.random_bases``) while the
driver plans, checks and starts Ray: which bases, from when, and that a sweep refused or stopped while the
child builds leaves neither a process nor a half-written copy. The child here is the real module's main
with the real signal handling; only its build is a slow stand-in, so that it is caught in the middle."""

import signal
import subprocess
import sys
import time

import pytest

from sweep import cluster, driver
from sweep.cli import RunError
from sweep.run import main
from tests.conftest import REPO, one_line_error, write_space
from trainers.random_bases import random_bases

# The real child (the module's main: its handlers, its exit status) around a build that writes a partial copy,
# says it is in the middle, and cleans up when interrupted, as materialize_random does.
CHILD = """
import pathlib, runpy, sys, time
import trainers.models
partial, ready = pathlib.Path(sys.argv[-2]), pathlib.Path(sys.argv[-1])
def slow_build(name, seed):
    partial.mkdir()
    try:
        ready.touch()
        time.sleep(60)
    finally:
        partial.rmdir()
trainers.models.materialize_random = slow_build
sys.argv = ["trainers.random_bases", *sys.argv[1:-2]]
runpy.run_module("trainers.random_bases", run_name="__main__")
"""


@pytest.fixture()
def slow_child(tmp_path, monkeypatch):
    """driver.prebuild_random replaced by the real child with a slow build; records the bases it was asked for."""
    partial, ready = tmp_path / "partial", tmp_path / "ready"
    started = []

    def build(models):
        args = [str(x) for name, seed in sorted(models) for x in (name, seed)]
        started.append((set(models), subprocess.Popen([sys.executable, "-c", CHILD, *args, str(partial), str(ready)],
                                                      cwd=REPO)))
        return started[-1][1]

    def wait_in_build():
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline, "the child never started its build"
            time.sleep(0.05)

    monkeypatch.setattr(driver, "prebuild_random", build)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in the full suite: children inherit it ignored
    yield started, partial, wait_in_build
    signal.signal(signal.SIGINT, previous)
    for _, p in started:
        if p.poll() is None:
            p.kill()


def test_a_grid_starts_writing_its_random_base_before_the_plan_and_a_refusing_plan_stops_it(tmp_path, slow_child,
                                                                                         capsys, monkeypatch):
    """The build starts before the plan (which imports torch and reads the data: 21 s on a fresh H200 host)
    and the plan refuses the sweep: one line, exit 2, the child interrupted (its cleanup ran, 130), none left."""
    started, partial, wait_in_build = slow_child
    planned = []
    real_plan = driver.plan_sweep

    def plan_after_the_build_started(*a, **k):
        planned.append(len(started))
        wait_in_build()  # as a plan on a cold machine takes seconds
        return real_plan(*a, **k)

    monkeypatch.setattr(driver, "plan_sweep", plan_after_the_build_started)
    space = write_space(tmp_path / "s.py", settings="seed=7")
    t0 = time.monotonic()
    assert main([str(space), "--set", f"dataset={tmp_path}/none.jsonl", "--output", str(tmp_path / "out"),
                 "--mlflow-uri", f"sqlite:///{tmp_path}/m.db", "--mps", "off"]) == 2
    assert "none.jsonl" in one_line_error(capsys.readouterr().err)
    assert planned == [1] and started[0][0] == {("tiny-llama", 7)}
    assert started[0][1].returncode == 130 and not partial.exists()  # interrupted, cleaned up, not killed
    assert time.monotonic() - t0 < 30  # not the 30 s a deaf child costs before it is killed
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()


def test_a_random_base_still_building_is_interrupted_cleanly_when_ray_does_not_start(tmp_path, slow_child,
                                                                                    monkeypatch):
    """``start`` builds what was not built before the plan (here: everything, ``start`` called alone); a Ray
    start that fails (or a Ctrl-C) interrupts the child, whose own cleanup removes its half-written copy."""
    started, partial, wait_in_build = slow_child
    opts = driver.SweepOptions(space="search_spaces/smoke_search.py", mps="off",
                               sets=("model=random:tiny-llama", "seed=5"))
    plan = driver.plan_sweep(opts, for_training=True)

    def no_ray(*a, **k):
        wait_in_build()
        raise RunError("ray would not start")

    monkeypatch.setattr(cluster, "start_ray", no_ray)
    with pytest.raises(RunError):
        driver.start(opts, plan, tmp_path / "sweep", None, None, None, None, logs=None)
    assert started[0][0] == {("tiny-llama", 5)}
    assert started[0][1].returncode == 130 and not partial.exists()


def test_which_bases_are_built_before_the_plan_and_that_they_are_the_plans():
    space = driver.load_space("search_spaces/paper_grid.py")
    opts = driver.SweepOptions(space="search_spaces/paper_grid.py", sets=("model=random:open_llama_3b_v2",))
    assert driver.early_random_bases(opts, space) == {("open_llama_3b_v2", 42)}
    assert driver.early_random_bases(driver.SweepOptions(space="search_spaces/paper_grid.py"), space) == set()  # Hub
    bad = driver.SweepOptions(space="search_spaces/paper_grid.py", sets=("model=random:open_llama_3b_v2", "r=-1"))
    assert driver.early_random_bases(bad, space) == set()  # the plan refuses it, building nothing
    for path, sets in (("search_spaces/smoke_search.py", ("seed=9",)), ("search_spaces/paper_search.py", (
            "model=random:open_llama_3b_v2", "dataset=bundled:products-400"))):
        opts = driver.SweepOptions(space=path, sets=sets)
        early = driver.early_random_bases(opts, driver.load_space(path))
        assert len(early) == 1 and early == random_bases(p.cfg for p in driver.share_trials(
            driver.plan_sweep(opts, for_training=True)))  # start() finds nothing more to build


def test_a_child_stopped_before_its_handlers_are_installed_ends_at_once(tmp_path, slow_child):
    """A sweep refused within milliseconds of starting the build (a warm process plans fast): the child may not
    have installed its handlers yet and, under a parent that ignores SIGINT, would be deaf to it; SIGTERM
    ends it at once (nothing written yet) instead of after the stop's timeout."""
    from trainers.random_bases import stop_build

    _, partial, _ = slow_child
    child = driver.prebuild_random({("tiny-llama", 3)})
    t0 = time.monotonic()
    stop_build(child, timeout=10)
    assert child.returncode in (-signal.SIGTERM, 130) and time.monotonic() - t0 < 5  # not killed (-9) at 10 s
    assert not partial.exists()
