"""A sweep tracked by a real ``mlflow server`` on 127.0.0.1 (SQLite behind it, artifacts served through it:
the driver uploads adapters over HTTP, no process touches the server's disk), restarted in the middle of
the sweep: every run, param, metric and artifact lands, once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_STEPS, write_tiny_space, free_port, start_mlflow_server, wait_for

pytestmark = pytest.mark.slow  # a real server, a real sweep

TRIALS = 'Trial(r=8, targets="attention", bits=4, name="a"), Trial(r=8, targets="all_linear", bits=8, name="b")'


def test_sweep_against_a_server_restarted_mid_sweep(tmp_path, model_cache):
    from trainers.checkpoints import resume_point

    port = free_port()
    server, uri = start_mlflow_server(tmp_path, port)
    write_tiny_space(tmp_path / "space.py", "tracked", TRIALS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "LORA_SWEEP_FAULTS": json.dumps({"a": {"mode": "slow", "sleep": 0.3}, "b": {"mode": "slow", "sleep": 0.3}})}
    proc = subprocess.Popen([sys.executable, "-m", "sweep.run", str(tmp_path / "space.py"), "--output",
                             str(tmp_path / "out"), "--mlflow-uri", uri], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: any((resume_point(tmp_path / "out" / "tune" / n) or (None, 0))[1] >= 6 for n in "ab"),
                 300, "a trial mid-training", proc)
        server.stop(signal.SIGKILL)  # the server dies mid-trial: the driver's MLflow client retries meanwhile
        down = time.monotonic()
        time.sleep(2)  # and stays down while the trials log (a step every 0.3 s, a loss every 3rd)
        server, _ = start_mlflow_server(tmp_path, port)  # same store, same port
        print(f"tracking server was down for {time.monotonic() - down:.1f}s")
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    try:
        assert proc.returncode == 0, output[-3000:]
        from mlflow import MlflowClient
        from mlflow.artifacts import download_artifacts

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("tracked").experiment_id
        runs = {r.info.run_name: r for r in client.search_runs([experiment])}
        assert sorted(runs) == ["a", "b", "base", "tracked"]  # no run lost, none twice
        parent = runs["tracked"].info.run_id
        assert {n: r.info.status for n, r in runs.items()} == dict.fromkeys(runs, "FINISHED")
        for name in ("a", "b"):
            run = runs[name]
            assert run.data.tags["mlflow.parentRunId"] == parent
            assert (run.data.params["r"], run.data.params["bits"]) == ("8", {"a": "4", "b": "8"}[name])
            assert run.data.metrics["train_steps"] == TINY_STEPS
            history = client.get_metric_history(run.info.run_id, "loss")
            # each logged step exactly once: the first, then every 3rd (none lost, none repeated by a retry)
            assert sorted(h.step for h in history) == [1, *range(3, TINY_STEPS + 1, 3)]
            adapter = Path(download_artifacts(run_id=run.info.run_id, artifact_path="adapter", tracking_uri=uri,
                                              dst_path=str(tmp_path / "dl" / name)))
            local = tmp_path / "out" / "trials" / name / "adapter" / "adapter_model.safetensors"
            assert (adapter / "adapter_model.safetensors").read_bytes() == local.read_bytes()  # served by the server
        summary = {a.path for a in client.list_artifacts(parent)}
        assert {"summary.md", "summary.csv", "samples.md"} <= summary
        assert (tmp_path / "artifacts").is_dir()  # the server's artifact root received them
    finally:
        server.stop(signal.SIGKILL)
