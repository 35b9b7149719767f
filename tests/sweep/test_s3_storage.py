"""--storage s3://... against moto's S3 server on 127.0.0.1 (the real S3 protocol over HTTP): the sweep's
checkpoints live only in the bucket; the driver is SIGKILLed with one trial finished and the other mid-
training, and the same command resumes it from the bucket: nothing retrained, one MLflow run per trial. The
S3 secret key, which every trial needs, reaches no file of the sweep or of Ray's session and no console."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sweep.storage import Storage
from tests.conftest import REPO, TINY_STEPS, write_tiny_space, read_csv, wait_for

pytestmark = pytest.mark.slow  # real Ray sweeps / trained trials

TRIALS = 'Trial(r=8, targets="attention", bits=16, name="a"), Trial(r=4, targets="attention", bits=16, name="b")'
SECRET = "s3-secret-7f3a9c2e"  # looked for in every file afterwards
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}  # moto takes any credentials


def command(work, endpoint) -> list[str]:
    return [sys.executable, "-m", "sweep.run", str(work / "space.py"), "--no-baseline", "--output", str(work / "out"),
            "--storage", "s3://sweeps/ray", "--storage-endpoint", endpoint, "--mlflow-uri", f"sqlite:///{work}/m.db"]


@pytest.fixture()
def ray_tmp():
    path = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live under it
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def env(ray_tmp, faults=None) -> dict:
    e = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": str(ray_tmp)}
    e.pop("LORA_SWEEP_FAULTS", None)
    if faults:
        e["LORA_SWEEP_FAULTS"] = json.dumps(faults)
    return e


def test_s3_storage_completes_and_resumes_after_the_driver_is_killed(tmp_path, s3_server, model_cache, monkeypatch,
                                                                     ray_tmp):
    from trainers.checkpoints import final_result, resume_point

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    write_tiny_space(tmp_path / "space.py", "s3-resume", TRIALS)
    fs, base = Storage("s3://sweeps/ray", s3_server).filesystem()

    def trial_path(name):
        from pyarrow.fs import FileSelector, FileType

        found = [i.path for i in fs.get_file_info(FileSelector(base, allow_not_found=True))
                 if i.type == FileType.Directory and i.base_name.startswith("s3-resume-")]
        return f"{found[0]}/tune/{name}" if found else None

    def done(name):
        return trial_path(name) and final_result(trial_path(name), fs=fs) is not None

    def mid_training(name):
        point = trial_path(name) and resume_point(trial_path(name), fs=fs)
        return point and not done(name) and point[1] >= 6

    slow = {"a": {"mode": "slow", "sleep": 0.2}, "b": {"mode": "slow", "sleep": 0.4}}
    proc = subprocess.Popen(command(tmp_path, s3_server), cwd=tmp_path, env=env(ray_tmp, slow), start_new_session=True,
                            stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: any(done(d) and mid_training(r) for d, r in ("ab", "ba")), 300, "one done, one mid-way", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finished, running = next((d, r) for d, r in ("ab", "ba") if done(d))
    with fs.open_input_stream(f"{final_result(trial_path(finished), fs=fs)}/metrics.json") as f:
        before = json.loads(f.read())
    assert not (tmp_path / "out" / "tune").exists()  # no checkpoint on the driver's disk

    start = time.monotonic()
    again = subprocess.run(command(tmp_path, s3_server), cwd=tmp_path, env=env(ray_tmp), capture_output=True, text=True,
                           timeout=300)
    print(f"resume from S3 took {time.monotonic() - start:.1f}s")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 trial(s) already finished" in again.stdout
    rows = read_csv(tmp_path / "out" / "summary.csv")
    assert {n: r["status"] for n, r in rows.items()} == {"a": "TERMINATED", "b": "TERMINATED"}
    m = {n: json.loads((tmp_path / "out" / "trials" / n / "metrics.json").read_text()) for n in "ab"}
    assert (m[finished]["train_started_at"], m[finished]["train_steps"]) == (before["train_started_at"], TINY_STEPS)
    assert m[running]["resumed_from_step"] >= 6 and m[running]["train_steps"] == TINY_STEPS
    assert (tmp_path / "out" / "trials" / running / "adapter" / "adapter_model.safetensors").is_file()
    for n in "ab":  # the table's per-example losses came from the bucket with the other result files
        with fs.open_input_stream(f"{final_result(trial_path(n), fs=fs)}/heldout.json") as f:
            assert (tmp_path / "out" / "trials" / n / "heldout.json").read_bytes() == f.read(), n

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    runs = client.search_runs([client.get_experiment_by_name("s3-resume").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["a", "b", "s3-resume"]
    assert {r.info.status for r in runs} == {"FINISHED"}

    files = [p for root in (tmp_path, ray_tmp) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len([p for p in files if "session_" in str(p) and "/logs/" in str(p)]) > 10, "no Ray session logs found"
    assert [str(p) for p in files if SECRET.encode() in p.read_bytes()] == []
    assert SECRET not in again.stdout + again.stderr
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["storage"] == {"uri": "s3://sweeps/ray",
                                                                                   "endpoint": s3_server}
