"""Searches through the real CLI: the smoke search killed (SIGKILL) mid-search and resumed, its table and
MLflow runs, then extended by two samples; a budget ending a sweep. Every wait is bounded."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, read_csv, run_cli
from trainers.checkpoints import final_result

pytestmark = pytest.mark.slow  # real Ray sweeps / trained trials

SPACE = REPO / "search_spaces" / "smoke_search.py"
STEPS = 36  # the smoke search's trials: 144 train rows / batch 8 = 18 steps x 2 epochs


def cli(work, *extra) -> list[str]:
    return [sys.executable, "-m", "sweep.run", str(SPACE), "--output", str(work / "out"),
            "--mlflow-uri", f"sqlite:///{work}/m.db", *extra]


def env() -> dict:
    e = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    e.pop("LORA_SWEEP_FAULTS", None)
    return e


def finished(work) -> dict[str, float]:
    """Searched trials with a final result on disk -> when their training started."""
    found = {}
    for d in (work / "out" / "tune-search").glob("s0*"):
        if (done := final_result(d)) is not None:
            found[d.name] = json.loads((done / "metrics.json").read_text())["train_started_at"]
    return found


@pytest.fixture(scope="module")
def search(tmp_path_factory, model_cache):
    """The smoke search, SIGKILLed (driver, Ray and trials) once a sample has finished and more have started,
    then run again with the same command. (Waiting for two finished samples could outlast the search: ASHA,
    asynchronous, has stopped all but one sample in a CI run.)"""
    work = tmp_path_factory.mktemp("search")
    start = time.monotonic()
    proc = subprocess.Popen(cli(work), cwd=work, env=env(), start_new_session=True,
                            stdout=open(work / "first.log", "w"), stderr=subprocess.STDOUT)
    while not (finished(work) and len(list((work / "out" / "tune-search").glob("s0*"))) >= 4):
        assert proc.poll() is None, (work / "first.log").read_text()[-3000:]
        assert time.monotonic() - start < 400, "kill point never reached"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = finished(work)
    killed_at = time.monotonic() - start
    resumed = subprocess.run(cli(work), cwd=work, env=env(), capture_output=True, text=True, timeout=600)
    print(f"smoke search: killed after {killed_at:.0f}s, resumed run {time.monotonic() - start - killed_at:.0f}s")
    return {"work": work, "out": work / "out", "proc": resumed, "before": before}


@pytest.fixture(scope="module")
def extended(search):
    """The finished search grown by two samples."""
    start = time.monotonic()
    proc = run_cli(SPACE, "--output", search["out"], "--mlflow-uri", f"sqlite:///{search['work']}/m.db",
                   "--extend", "--num-samples", "10", cwd=search["work"])
    print(f"extension: {time.monotonic() - start:.0f}s")
    return {**search, "proc": proc}


def runs(work):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/m.db")
    return client, client.search_runs([client.get_experiment_by_name("smoke-search").experiment_id])


def test_resumed_search_has_every_sample_once(search):
    out, proc = search["out"], search["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming sweep smoke-search" in proc.stdout
    rows = read_csv(out / "summary.csv")
    samples = [f"s{i:03d}" for i in range(1, 9)]
    assert [t.split("-")[0] for t in rows if t != "base"] == samples  # 8 samples, no repeats, none lost
    assert sorted(d.name.split("-")[0] for d in (out / "tune-search").glob("s0*")) == samples
    assert rows["s001-r8-attention-4bit"]["r"] == "8" and rows["s002-r8-all_linear-4bit"]["bits"] == "4"  # seeds
    # samples that had finished before the kill were not trained again
    assert search["before"] and all(
        json.loads((out / "trials" / name / "metrics.json").read_text())["train_started_at"] == started
        for name, started in search["before"].items())


def test_asha_stopped_trials_early_with_their_last_eval_and_adapter(search):
    rows = read_csv(search["out"] / "summary.csv")
    stopped = {t: r for t, r in rows.items() if r["status"] == "STOPPED"}
    assert stopped, "ASHA stopped no trial"
    assert {r["stop_reason"] for r in stopped.values()} == {"ASHA"}
    for name, r in stopped.items():
        assert int(r["steps"]) in (6, 12, 24) and int(r["steps"]) < STEPS  # a rung of grace 6, factor 2
        assert float(r["eval_loss"]) > 0 and r["best"] == "false" and r["quality"] == "-"
        assert (search["out"] / "trials" / name / "adapter" / "adapter_model.safetensors").is_file()
    done = [r for t, r in rows.items() if r["status"] == "TERMINATED" and t != "base"]
    assert done and all(r["steps"] == str(STEPS) for r in done)
    assert sum(r["best"] == "true" for r in rows.values()) == 1


def test_mlflow_children_finished_or_tagged_stopped_none_running(search):
    client, found = runs(search["work"])
    parents = [r for r in found if r.data.tags.get("lora_sweep.role") == "sweep"]
    children = {r.info.run_name: r for r in found if r.data.tags.get("lora_sweep.role") == "trial"}
    rows = read_csv(search["out"] / "summary.csv")
    assert len(parents) == 1 and len(found) == 1 + len(rows) and set(children) == set(rows) - {"base"}
    assert {r.info.status for r in found} == {"FINISHED"}
    for name, run in children.items():
        history = client.get_metric_history(run.info.run_id, "eval_loss")
        if rows[name]["status"] == "STOPPED":
            assert run.data.tags["lora_sweep.stopped"] == f"ASHA at step {rows[name]['steps']}"
            assert max(m.step for m in history) == int(rows[name]["steps"])  # the eval curve ends where it stopped
            assert "adapter" in {a.path for a in client.list_artifacts(run.info.run_id)}
        else:
            assert "lora_sweep.stopped" not in run.data.tags
            assert sorted(m.step for m in history) == [6, 12, 18, 24, 30, STEPS]  # periodic evals, then the final
    parent = parents[0]
    assert set(parent.data.metrics) == {f"importance.{a}" for a in ("r", "targets", "bits", "alpha_rule",
                                                                     "learning_rate")}
    assert sum(parent.data.metrics.values()) == pytest.approx(1.0, abs=1e-6)
    assert {"search.md", "importance.json", "summary.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_summary_says_how_the_best_was_chosen_and_which_axes_mattered(search):
    md = (search["out"] / "summary.md").read_text()
    best = next(t for t, r in read_csv(search["out"] / "summary.csv").items() if r["best"] == "true")
    assert f"**Best**: {best} (r=" in md and "the lowest eval_loss" in md and "ran 8 of 8 samples" in md
    assert "**Stopped early**" in md and "**Which axes mattered**" in md and "| learning_rate |" in md
    assert "early stopping skipped" in md


def test_a_stopped_trial_exports_with_the_eval_loss_it_was_stopped_on(search, tmp_path):
    from sweep.export import export

    name, row = next((t, r) for t, r in read_csv(search["out"] / "summary.csv").items() if r["status"] == "STOPPED")
    assert export(str(search["out"]), trial=name, out=str(tmp_path / "exported")) == 0
    info = json.loads((tmp_path / "exported" / "export.json").read_text())
    # the adapter kept is the one the eval was measured on, at the step the trial stopped
    assert info["eval_loss_adapter"] == pytest.approx(float(row["eval_loss"]), rel=1e-4)


def test_extend_trains_only_the_new_samples_warm_started(extended):
    out, proc = extended["out"], extended["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "extending sweep smoke-search: 2 more sample(s)" in proc.stdout
    rows = read_csv(out / "summary.csv")
    assert [t.split("-")[0] for t in rows if t != "base"] == [f"s{i:03d}" for i in range(1, 11)]
    new = sorted(d.name for d in (out / "tune-search-ext1").glob("s0*"))
    assert [n.split("-")[0] for n in new] == ["s009", "s010"]  # only those two ran
    assert not list((out / "tune-search-ext1").glob("s00[1-8]*"))
    for name, r in rows.items():  # the others kept their results: not trained again
        if r["status"] == "TERMINATED" and name not in new:
            started = json.loads((out / "trials" / name / "metrics.json").read_text())["train_started_at"]
            done = final_result(out / ("tune" if name == "base" else "tune-search") / name)
            assert started == json.loads((done / "metrics.json").read_text())["train_started_at"]
    # the extension's TPE was told the 8 earlier results before it proposed (Ray's saved searcher state)
    state = pickle.loads(sorted((out / "tune-search-ext1").glob("searcher-state-*.pkl"))[-1].read_bytes())
    study = state["searcher"]._ot_study if "searcher" in state else state["_ot_study"]
    told = [t for t in study.trials if t.number < 8]
    assert len(study.trials) == 10 and all(t.state.name == "COMPLETE" for t in told)
    assert sorted(round(t.value, 6) for t in told) == sorted(
        round(float(rows[n]["eval_loss"]), 6) for n in rows if n != "base" and n.split("-")[0] <= "s008")
    client, found = runs(extended["work"])
    assert sum(r.data.tags.get("lora_sweep.role") == "sweep" for r in found) == 1  # one parent run
    assert len(found) == 1 + len(rows) and {r.info.status for r in found} == {"FINISHED"}


BUDGET_SPACE = """\
from sweep import Budget, Settings, Space, Trial
space = Space(
    name="budget",
    settings=Settings(model="random:tiny-llama", dataset="bundled:products-400", device="cpu", learning_rate=3e-3,
                      epochs=2, batch_size=8, train_samples=160, logging_steps=3, eval_every=2, checkpoint_every=50,
                      max_new_tokens=8, heldout_prompts=1),
    trials=[Trial(r=8, targets="attention", bits=16, name="a"), Trial(r=8, targets="all_linear", bits=16, name="b"),
            Trial(r=4, targets="attention", bits=16, name="c")],
    budget=Budget(max_trials=2, wall_hours=30 / 3600),
)
"""


def test_a_budget_stops_running_trials_cleanly_and_the_table_says_so(tmp_path, model_cache):
    (tmp_path / "space.py").write_text(BUDGET_SPACE)
    slow = json.dumps({n: {"mode": "slow", "sleep": 1.0} for n in "ab"})  # 36 steps: over 36 s, past the budget
    done = subprocess.run([sys.executable, "-m", "sweep.run", "space.py", "--no-baseline", "--output", "out",
                           "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**env(), "LORA_SWEEP_FAULTS": slow})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_csv(tmp_path / "out" / "summary.csv")
    for name in "ab":  # ran until the 30 s wall budget ended, then stopped at their last eval
        r = rows[name]
        assert (r["status"], r["stop_reason"]) == ("STOPPED", "wall-time budget of 30 s")
        # On an idle machine both reach several evals in 30 s; on one loaded several times over, process start
        # alone can take that long, and a trial stopped before its first eval has no step, loss or adapter.
        if r["steps"]:
            assert int(r["steps"]) % 2 == 0 and 0 < int(r["steps"]) < 36 and float(r["eval_loss"]) > 0
            assert (tmp_path / "out" / "trials" / name / "adapter" / "adapter_model.safetensors").is_file()
    assert (rows["c"]["status"], rows["c"]["stop_reason"]) == ("NOT_RUN", "max_trials budget")
    assert "Budget: the wall-time budget of 30 s ended it: 2 trial(s) stopped, 1 not run." in (
        tmp_path / "out" / "summary.md").read_text()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    found = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("budget").experiment_id])}
    assert {n: r.info.status for n, r in found.items()} == {"a": "FINISHED", "b": "FINISHED", "budget": "FINISHED"}
    assert all(found[n].data.tags["lora_sweep.stopped"] == "wall-time budget of 30 s" + (
        f" at step {rows[n]['steps']}" if rows[n]["steps"] else "") for n in "ab")
