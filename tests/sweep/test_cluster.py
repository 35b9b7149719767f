"""A real two-node Ray cluster on this machine (head + one worker node, each with its own temp dir; the
worker's custom resource ``worker`` pins the trials to it): a sweep submitted as a Ray Job, and a worker
node killed in the middle of a trial. The cluster is shared by the module; only its own processes are
ever stopped. Tiny trials: what is tested is where they run and how their results come back (the smoke
space itself is tests/sweep/test_run_smoke.py's)."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, TINY_STEPS, write_tiny_space, read_csv, wait_for

pytestmark = pytest.mark.slow  # a Ray cluster, real sweeps

JOB_TRIALS = {"base", "j"}  # the baseline and one 4-bit trial (bitsandbytes on the worker node)
# trials take their environment from the node that runs them: on the module's worker node, trial "a" (the
# node-loss test's) trains slowly enough to be caught mid-way; the job's trials are not slowed
WORKER_ENV = {"LORA_SWEEP_FAULTS": json.dumps({"a": {"mode": "slow", "sleep": 0.5}})}


def ray_cli(cluster, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **cluster.ENV})


def test_sweep_as_a_ray_job_runs_every_trial_on_the_worker_node(ray_cluster, tmp_path, model_cache):
    """``ray job submit -- python -m sweep.run ... --address auto`` against the head: the job succeeds, its
    log (the table) is in the Jobs API, every trial ran on the worker node, table, adapters, MLflow complete.
    Its random: base is built by the trial on the worker node (the driver prebuilds only for a local Ray)."""
    workers = ray_cluster.worker_ids()
    assert len(workers) == 1
    write_tiny_space(tmp_path / "space.py", "job", 'Trial(r=8, targets="attention", bits=4, name="j")')
    out, db = tmp_path / "sweep", f"sqlite:///{tmp_path}/mlflow.db"
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                                "LORA_SWEEP_CACHE": os.environ["LORA_SWEEP_CACHE"]}}
    start = time.monotonic()
    job = ray_cli(ray_cluster, "job", "submit", f"--address={ray_cluster.dashboard}", "--submission-id=job",
                  f"--runtime-env-json={json.dumps(runtime_env)}", "--",
                  sys.executable, "-m", "sweep.run", str(tmp_path / "space.py"), "--set", "epochs=1",
                  "--address", "auto",
                  "--trial-resource", "worker=1", "--storage", str(tmp_path / "storage"), "--output", str(out),
                  "--mlflow-uri", db, timeout=600)
    print(f"two-node sweep as a Ray Job: {time.monotonic() - start:.1f}s")
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    assert "Job 'job' succeeded" in job.stdout + job.stderr

    # the Jobs view: status and the driver's log, from the dashboard's own API
    status = ray_cli(ray_cluster, "job", "status", f"--address={ray_cluster.dashboard}", "job")
    assert "Job 'job' succeeded" in status.stdout
    logs = ray_cli(ray_cluster, "job", "logs", f"--address={ray_cluster.dashboard}", "job").stdout
    assert "# Sweep job" in logs and "| j " in logs

    rows = read_csv(out / "summary.csv")
    assert set(rows) == JOB_TRIALS and {r["status"] for r in rows.values()} == {"TERMINATED"}
    for name in JOB_TRIALS:
        metrics = json.loads((out / "trials" / name / "metrics.json").read_text())
        assert metrics["node_id"] in workers, name  # ran on the worker node, not the head
        assert (out / "trials" / name / "heldout.json").is_file(), name  # the error bars' per-example losses
        if name != "base":
            assert (out / "trials" / name / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (tmp_path / "storage").is_dir() and not (out / "tune").exists()  # checkpoints went to --storage

    from mlflow import MlflowClient

    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("job").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(JOB_TRIALS | {"job"})
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["lora_sweep.node_id"] for r in runs if r.info.run_name != "job"} == workers

    # the trials, in the dashboard's state API (Cluster and Actors views): actors of the job, on the worker node
    actors = json.loads(ray_cli(ray_cluster, "list", "actors", f"--address={ray_cluster.dashboard}",
                                "--format=json", "--limit=1000", "--detail").stdout)
    # "ImplicitFunc", or its qualified name once the driver has imported ray.tune before ray.init (it does)
    trials = [a for a in actors if a.get("class_name", "").rpartition(".")[2] == "ImplicitFunc"]
    assert len(trials) >= len(JOB_TRIALS) and {a["node_id"] for a in trials} == workers


TRIALS = 'Trial(r=8, targets="attention", bits=16, name="a")'


def test_worker_node_killed_mid_trial_finishes_once_a_node_is_back(ray_cluster, tmp_path, model_cache):
    """The worker node dies (all its processes, SIGKILL) after the trial's step-12 checkpoint; the sweep
    waits, a new worker node joins, and the trial resumes there from a checkpoint in --storage."""
    from trainers.checkpoints import resume_point

    write_tiny_space(tmp_path / "space.py", "node-loss", TRIALS)
    storage = tmp_path / "storage"  # the module's worker node trains "a" slowly (WORKER_ENV)
    env = {**os.environ, **ray_cluster.ENV}
    proc = subprocess.Popen([sys.executable, "-m", "sweep.run", str(tmp_path / "space.py"), "--no-baseline",
                             "--address", ray_cluster.address, "--trial-resource", "worker=1",
                             "--storage", str(storage), "--output", str(tmp_path / "out"),
                             "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"],
                            cwd=tmp_path, env=env, stdout=open(tmp_path / "driver.log", "w"), stderr=subprocess.STDOUT)
    log = lambda: (tmp_path / "driver.log").read_text()[-3000:]  # noqa: E731 - for the failure messages
    try:
        def trial_dir():
            found = list(storage.glob("node-loss-*/tune/a"))
            return found[0] if found else None

        reached = lambda: trial_dir() and (resume_point(trial_dir()) or (None, 0))[1] >= 12  # noqa: E731
        wait_for(lambda: reached() or proc.poll() is not None, 240, "a checkpoint at step 12")
        assert proc.poll() is None, log()
        killed_at = resume_point(trial_dir())[1]
        lost = ray_cluster.worker_ids()
        ray_cluster.workers[-1].stop(sig=9)  # the node is gone: raylet, its workers, the trial
        time.sleep(10)  # the sweep waits for resources; it neither ends nor errors
        assert proc.poll() is None, log()
        ray_cluster.add_worker()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log()
    m = json.loads((tmp_path / "out" / "trials" / "a" / "metrics.json").read_text())
    assert m["train_steps"] == TINY_STEPS and 12 <= m["resumed_from_step"] <= killed_at + 6
    assert m["node_id"] in ray_cluster.worker_ids() and m["node_id"] not in lost
    assert read_csv(tmp_path / "out" / "summary.csv")["a"]["status"] == "TERMINATED"
    assert "tensorboardx" not in (tmp_path / "driver.log").read_text()  # Tune's notes stay off a joining console
