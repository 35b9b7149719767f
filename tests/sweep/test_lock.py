"""One driver per sweep directory: a second one is refused at once, a dead one's lock is taken over,
and the lock goes away however the driver leaves."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from sweep.cli import UserError
from sweep.lock import holder, lock_path, locked
from sweep.run import main
from tests.conftest import REPO, one_line_error, tree_digest, write_space

HOLD = """\
import sys, time
from pathlib import Path
from sweep.lock import locked
with locked(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture()
def other_driver(tmp_path):
    """A real second process holding the lock of tmp_path/out, as a running driver does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait(timeout=30)


def test_a_second_driver_is_refused_naming_the_first(tmp_path, other_driver):
    with pytest.raises(UserError) as e:
        with locked(tmp_path / "out"):
            pass
    assert f"{tmp_path / 'out'} is in use by another lora-sweep driver (pid {other_driver.pid} on host " \
           f"{socket.gethostname()}" in str(e.value)
    assert holder(tmp_path / "out")["pid"] == other_driver.pid  # the refused driver left the lock alone


def test_the_lock_of_a_killed_driver_is_taken_over(tmp_path, other_driver, capsys):
    other_driver.send_signal(signal.SIGKILL)  # no clean-up runs: the lock file stays, its flock goes
    other_driver.wait(timeout=30)
    assert lock_path(tmp_path / "out").exists()
    with locked(tmp_path / "out"):
        assert holder(tmp_path / "out")["pid"] == os.getpid()
    assert f"taking over the stale lock of a driver that is gone (pid {other_driver.pid}" in capsys.readouterr().out
    assert not lock_path(tmp_path / "out").exists()


def test_a_lock_from_another_machine_is_not_broken(tmp_path):
    """On shared storage another host's driver cannot be checked from here: say whose lock it is and how
    to clear it, and leave it."""
    path = lock_path(tmp_path / "out")
    path.write_text(json.dumps({"pid": 4242, "host": "gpu-node-7", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(UserError, match=r"locked by a driver on another machine \(pid 4242 on host gpu-node-7, since "
                                        r"2026-01-01T00:00:00\); if none runs there any more, delete .*out\.lock"):
        with locked(tmp_path / "out"):
            pass
    assert json.loads(path.read_text())["host"] == "gpu-node-7"


def test_the_lock_is_released_on_an_exception_and_made_directories_removed(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(KeyboardInterrupt):
        with locked(out):
            assert holder(out)["pid"] == os.getpid()
            raise KeyboardInterrupt
    assert not (tmp_path / "a").exists()  # nothing earlier touched: not even the parents made for the lock
    with locked(out):  # and it can be taken again at once
        pass


def test_the_cli_refuses_a_locked_sweep_in_one_line_touching_nothing(tmp_path, other_driver, earlier_sweep, capsys):
    os.rename(earlier_sweep, tmp_path / "out")
    before = tree_digest(tmp_path / "out")
    start = time.monotonic()
    assert main([str(write_space(tmp_path / "s.py")), "--output", str(tmp_path / "out"),
                 "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert f"is in use by another lora-sweep driver (pid {other_driver.pid}" in err
    assert time.monotonic() - start < 30
    assert tree_digest(tmp_path / "out") == before and not (tmp_path / "m.db").exists()
