"""The fault contract with real processes: a tracking password that never leaves the driver, a trial
that diverges and fails, a second driver refused while the first runs, Ray listening on loopback only,
and a disk that fills up mid-sweep. One sweep serves the first four; every wait is bounded."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, read_csv

pytestmark = pytest.mark.slow  # real Ray sweeps, a real MLflow server

USER, SENTINEL = "sweepuser7", "Sentinel-7Qz-Passw0rd"  # in the tracking URI: in no file, no console line
SPACE = """\
from sweep import Settings, Space, Trial
space = Space(
    name="contract",
    settings=Settings(model="random:tiny-llama", dataset="bundled:products-400", device="cpu", cpus_per_trial={cpus},
                      learning_rate=3e-3, epochs=1, batch_size=8, train_samples=48, logging_steps=1,
                      checkpoint_every=100, max_new_tokens=4, heldout_prompts=1),
    trials=[{trials}],
)
"""


def env(**extra) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "LORA_SWEEP_FAULTS"}
    return {**clean, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **extra}


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    start = time.monotonic()
    while not condition():
        assert proc is None or proc.poll() is None, f"the process ended before {what}"
        assert time.monotonic() - start < timeout, f"{what} never happened"
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1")
        return urllib.request.urlopen(req, timeout=5).status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """MLflow's own tracking server on loopback (it ignores the credentials; they only have to travel)."""
    work = tmp_path_factory.mktemp("server")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{work}/s.db",
                             "--artifacts-destination", str(work / "artifacts"), "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1"], stdout=open(work / "server.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: answers(port), "the MLflow server answering", proc, timeout=240)
        yield {"port": port, "dir": work}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a test server: its graceful shutdown takes seconds
        proc.wait(timeout=60)


def listening(pid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``pid`` and its descendants."""
    import psutil

    root = psutil.Process(pid)
    found = []
    for p in [root, *root.children(recursive=True)]:
        try:
            found += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.Error:  # a worker that ended meanwhile
            pass
    return found


@pytest.fixture(scope="module")
def held_sweep(tmp_path_factory, mlflow_server, model_cache):
    """One sweep (trial ok; trial diverges, at a learning rate that makes its loss NaN), held at ok's step 2
    while a second driver tries the same directory and Ray's sockets are read, then let go."""
    work = tmp_path_factory.mktemp("contract")
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live under it
    (work / "space.py").write_text(SPACE.format(cpus=1, trials='Trial(r=4, targets="attention", bits=16, name="ok"), '
                                                               'Trial(r=4, targets="attention", bits=16, '
                                                               'name="diverges", learning_rate=1e38)'))
    uri = f"http://{USER}:{SENTINEL}@127.0.0.1:{mlflow_server['port']}"
    cmd = [sys.executable, "-m", "sweep.run", str(work / "space.py"), "--no-baseline", "--output", str(work / "out"),
           "--mlflow-uri", uri]
    faults = json.dumps({"ok": {"mode": "wait", "step": 2, "marker": str(work / "go")}})
    # RAY_ADDRESS names a cluster that is not there: a sweep without --address must start its own Ray anyway
    first = subprocess.Popen(cmd, cwd=work, env=env(RAY_TMPDIR=ray_tmp, LORA_SWEEP_FAULTS=faults,
                                                    RAY_ADDRESS="127.0.0.1:9"),
                             stdout=open(work / "first.out", "w"), stderr=open(work / "first.err", "w"))
    try:
        wait_for(lambda: (work / "go.reached").exists(), "trial ok reaching step 2", first)
        sockets = listening(first.pid)
        start = time.monotonic()
        second = subprocess.run(cmd, cwd=work, env=env(RAY_TMPDIR=ray_tmp), capture_output=True, text=True,
                                timeout=300)
        second_seconds = time.monotonic() - start
    finally:
        (work / "go").touch()
    code = first.wait(timeout=300)
    yield {"work": work, "first": first, "code": code, "second": second, "second_seconds": second_seconds,
           "sockets": sockets, "ray_tmp": Path(ray_tmp), "server": mlflow_server}
    shutil.rmtree(ray_tmp, ignore_errors=True)


def runs(port: int, experiment: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(f"http://127.0.0.1:{port}")
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {r.info.run_name: r for r in found}, client


def test_the_tracking_password_reaches_no_file_and_no_console(held_sweep):
    """Every file of the sweep directory (tune/tuner.pkl, the pickled tracker, included), every file of the
    run's Ray session (its logs), the console of both drivers, and the tracking server's own store."""
    work, port = held_sweep["work"], held_sweep["server"]["port"]
    manifest = json.loads((work / "out" / "sweep.json").read_text())
    assert manifest["mlflow_uri"] == f"http://127.0.0.1:{port}"
    assert (work / "out" / "tune" / "tuner.pkl").is_file()
    files = [p for root in (work, held_sweep["ray_tmp"], held_sweep["server"]["dir"]) for p in root.rglob("*")
             if p.is_file() and not p.is_symlink()]
    session_logs = [p for p in files if "session_" in str(p) and "/logs/" in str(p)]
    assert len(session_logs) > 10, "the Ray session's logs were not found"
    leaks = [str(p) for p in files if SENTINEL.encode() in p.read_bytes()]
    second = held_sweep["second"]
    leaks += [name for name, text in (("second stdout", second.stdout), ("second stderr", second.stderr))
              if SENTINEL in text]
    assert leaks == []
    assert USER not in (work / "first.out").read_text() + (work / "first.err").read_text()  # the user name too
    by_name, _ = runs(port, "contract")
    assert set(by_name) == {"contract", "ok", "diverges"}  # the sweep did use the store it authenticated to


def test_a_trial_whose_loss_turns_nan_fails_and_the_sweep_exits_1(held_sweep):
    assert held_sweep["code"] == 1, (held_sweep["work"] / "first.err").read_text()[-3000:]
    rows = read_csv(held_sweep["work"] / "out" / "summary.csv")
    assert rows["ok"]["status"] == "TERMINATED"
    assert rows["diverges"]["status"] == "ERROR" and rows["diverges"]["eval_loss"] == ""
    assert rows["diverges"]["error"].endswith("NonFiniteLoss: training loss is nan at step 2: training diverged "
                                              "(try a lower learning_rate)")
    assert "trial diverges failed: " in (held_sweep["work"] / "first.err").read_text()
    by_name, client = runs(held_sweep["server"]["port"], "contract")
    assert {n: r.info.status for n, r in by_name.items()} == {"contract": "FAILED", "ok": "FINISHED",
                                                               "diverges": "FAILED"}
    assert "training loss is nan at step 2" in by_name["diverges"].data.tags["lora_sweep.error"]
    # diverges ran twice (--max-failures 1), from step 0 both times: MLflow has its step 1 once
    assert [m.step for m in client.get_metric_history(by_name["diverges"].info.run_id, "loss")] == [1]


def test_a_second_driver_on_the_same_directory_is_refused_at_once(held_sweep):
    second, first = held_sweep["second"], held_sweep["first"]
    assert second.returncode == 2, second.stderr[-2000:]
    err = second.stderr.strip()
    assert "\n" not in err and err.startswith(f"error: {held_sweep['work'] / 'out'} is in use by another lora-sweep "
                                              f"driver (pid {first.pid} on host {socket.gethostname()}"), err
    assert "Ray dashboard" not in second.stdout  # it started nothing
    assert held_sweep["second_seconds"] < 120
    by_name, _ = runs(held_sweep["server"]["port"], "contract")
    assert len(by_name) == 3  # one parent run: the second driver opened none
    assert not (held_sweep["work"] / "out.lock").exists()  # and the first released its lock on the way out


def test_the_sweep_starts_its_own_ray_listening_on_loopback_only(held_sweep):
    sockets = held_sweep["sockets"]
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the driver's own Ray (despite RAY_ADDRESS), all of it
    assert {ip for _, ip, _ in sockets} <= {"127.0.0.1", "::ffff:127.0.0.1"}, sockets


# ---- a disk that fills up mid-sweep -----------------------------------------------------------------

@pytest.fixture()
def small_disk(tmp_path):
    """A 32 MiB tmpfs to fill up (mounting needs root, as CI and this machine run)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs (the full disk) needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 2**20)
                f.flush()
        except OSError:
            pass


def test_a_full_disk_stops_the_sweep_in_one_line_and_the_same_command_resumes(small_disk, tmp_path, model_cache):
    """Trial a finishes; while b trains the disk fills up. The driver stops the sweep: one error line (exit 1),
    the table on the console, the parent run FAILED, no temp file left. With space freed, the same command
    finishes b without training a again."""
    out = small_disk / "out"
    (tmp_path / "space.py").write_text(SPACE.format(cpus=1, trials='Trial(r=4, targets="attention", bits=16, '
                                                                   'name="a"), Trial(r=8, targets="attention", '
                                                                   'bits=16, name="b")'))
    cmd = [sys.executable, "-m", "sweep.run", str(tmp_path / "space.py"), "--no-baseline", "--output", str(out),
           "--mlflow-uri", f"sqlite:///{tmp_path}/m.db", "--max-failures", "0"]
    faults = json.dumps({"b": {"mode": "wait", "step": 2, "marker": str(tmp_path / "go")}})
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(LORA_SWEEP_FAULTS=faults), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def a_recorded() -> bool:
        ledger = out / "ledger.json"
        return ledger.is_file() and any(e["trial"] == "a" for e in json.loads(ledger.read_text()).values())

    try:
        wait_for(lambda: (tmp_path / "go.reached").exists() and a_recorded(), "a finished and b mid-training", proc)
        fill(small_disk)
    finally:
        (tmp_path / "go").touch()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    # the first record the full disk refused: the ledger or the console's progress file, whichever came first
    assert re.fullmatch(rf"error: the sweep stopped: No space left on device: {re.escape(str(out))}/"
                        r"(ledger|progress)\.json\. Fix that \(free disk space, bring the tracking store back\) and "
                        r"run the same command again to resume", last), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "# Sweep contract" in stdout and "| a * | 4 |" in stdout, stdout[-3000:]  # the table, never written
    assert not [p.name for p in out.glob(".*")]  # no temp file of a record left behind
    assert not (out / "summary.csv").exists()  # never half a table: there was none yet, there is none
    assert json.loads((out / "ledger.json").read_text())  # the ledger is whole, as before the disk filled
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    statuses = {r.info.run_name: r.info.status for r in
                client.search_runs([client.get_experiment_by_name("contract").experiment_id])}
    assert statuses["contract"] == "FAILED" and "RUNNING" not in statuses.values(), statuses

    (small_disk / "filler").unlink()
    a_final = next(p for p in (out / "tune" / "a").glob("checkpoint_*") if (p / "metrics.json").is_file())
    a_started = json.loads((a_final / "metrics.json").read_text())["train_started_at"]
    again = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = read_csv(out / "summary.csv")
    assert (rows["a"]["status"], rows["b"]["status"]) == ("TERMINATED", "TERMINATED")
    assert json.loads((out / "trials" / "a" / "metrics.json").read_text())["train_started_at"] == a_started
