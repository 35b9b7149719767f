"""Tracking details that need no sweep: credentials never reach logs, files, params or pickles; what a
step report becomes in MLflow, one point per step; runs always closed."""

from types import SimpleNamespace

import pytest

from sweep.tracking import redact, tracking_uri


def test_redact_strips_credentials_only():
    assert redact("http://alice:s3cret@mlflow.internal:5000/api") == "http://***@mlflow.internal:5000/api"
    assert redact("https://token@host/x") == "https://***@host/x"
    assert redact("http://mlflow.internal:5000") == "http://mlflow.internal:5000"
    assert redact("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"
    assert redact("random:tiny-llama") == "random:tiny-llama"


def test_relative_sqlite_store_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking_uri("sqlite:///runs/m.db") == f"sqlite:///{tmp_path}/runs/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://h:5000")
    assert tracking_uri(None) == "http://h:5000"


def test_step_reports_become_step_metrics_and_mlflow_system_metrics():
    """The compare view's material: loss, learning rate and tokens/s by step, and system metrics under
    MLflow's own 'system/' names, which its System metrics charts show (a real store: the smoke sweep)."""
    from sweep.tracking import MLflowTracker
    from trainers.config import StepReport

    logged = []
    tracker = MLflowTracker("sqlite:///unused.db", experiment="demo", sweep_id="s1")
    tracker._client = SimpleNamespace(log_batch=lambda run_id, metrics: logged.append((run_id, metrics)),
                                      get_metric_history=lambda run_id, key: [])
    tracker._runs["fp-a"] = "run-a"
    report = StepReport(step=8, epoch=0.2, loss=6.0, learning_rate=1e-3, max_steps=72, tokens_per_second=8000.0,
                        system={"cpu_utilization_percentage": 97.5, "gpu_0_memory_usage_megabytes": 2048.0})
    tracker.trial_step({"fingerprint": "fp-a"}, report, 1_800_000_008.25)
    [(run_id, metrics)] = logged
    assert run_id == "run-a"
    assert {(m.key, m.value, m.step, m.timestamp) for m in metrics} == {
        ("loss", 6.0, 8, 1_800_000_008_250), ("learning_rate", 1e-3, 8, 1_800_000_008_250),
        ("tokens_per_second", 8000.0, 8, 1_800_000_008_250),
        ("system/cpu_utilization_percentage", 97.5, 8, 1_800_000_008_250),
        ("system/gpu_0_memory_usage_megabytes", 2048.0, 8, 1_800_000_008_250)}


# ---- credentials: split off the URI, handed to MLflow's own variables, never pickled or printed -------

SENTINEL = "s3ntinel-Pa55"


def test_credentials_are_split_off_the_uri():
    from sweep.store import TrackingStore, redact_argv

    store = TrackingStore.parse(f"https://alice:{SENTINEL}%21@mlflow.internal:5000/api")
    assert store.uri == "https://mlflow.internal:5000/api"
    assert (store.username, store.password) == ("alice", SENTINEL + "!")  # percent-decoded, as a browser would
    assert SENTINEL not in repr(store)
    assert store.env() == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": SENTINEL + "!"}
    assert TrackingStore.parse("sqlite:////tmp/m.db").env() == {}
    assert redact_argv(["run.py", f"--mlflow-uri=http://a:{SENTINEL}@h:1", "--mlflow-uri", f"http://a:{SENTINEL}@h"]) \
        == ["run.py", "--mlflow-uri=http://***@h:1", "--mlflow-uri", "http://***@h"]


def test_mlflow_authenticates_with_them_while_the_uri_stays_clean(monkeypatch):
    from mlflow import MlflowClient

    from sweep.store import TrackingStore, patched_env

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    store = TrackingStore.parse(f"http://alice:{SENTINEL}@127.0.0.1:9")
    client = MlflowClient(store.uri)  # no request is made
    with patched_env(store.env()):
        creds = client._tracking_client.store.get_host_creds()
        assert (creds.host, creds.username, creds.password) == ("http://127.0.0.1:9", "alice", SENTINEL)
    assert client._tracking_client.store.get_host_creds().password is None  # only inside the block


def test_ray_processes_do_not_inherit_tracking_credentials(monkeypatch):
    import os

    from sweep.store import hidden_credentials

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SENTINEL)
    with hidden_credentials():
        assert "MLFLOW_TRACKING_PASSWORD" not in os.environ
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SENTINEL


def test_the_pickled_tracker_carries_no_credentials():
    import pickle

    from sweep.tracking import MLflowTracker

    tracker = MLflowTracker(f"http://alice:{SENTINEL}@mlflow.internal:5000", "e", "sweep1")
    assert tracker.uri == "http://mlflow.internal:5000"
    data = pickle.dumps(tracker)
    assert SENTINEL.encode() not in data and b"alice" not in data
    old = MLflowTracker.__new__(MLflowTracker)  # a tracker an older version pickled with the password in
    old.__setstate__({"uri": f"http://alice:{SENTINEL}@h:1", "experiment": "e", "sweep_id": "s"})
    assert old.uri == "http://h:1"


# ---- the tracker in MLflow: one point per step, runs never left RUNNING ----------------------------

@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    from sweep.tracking import MLflowTracker

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/m.db"
    t = MLflowTracker(uri, "exp", "sweep1")
    t.start({"space_file": "s.py"})
    return t


def param(name: str) -> dict:
    from trainers.config import TrialConfig

    return TrialConfig(name=name, index=0, model="m", dataset="d", r=8, targets="attention", bits=16,
                       target_modules=("q_proj",)).to_param()


def test_a_trial_restarted_from_step_0_logs_each_step_once(tracker):
    """A retried trial repeats steps 1..3; a resumed driver (a new tracker) replays them too: MLflow keeps
    one point per step, the first."""
    from sweep.tracking import MLflowTracker
    from trainers.config import StepReport

    p = param("a")
    tracker.trial_started(p, "t1")
    for step, loss in [(1, 3.0), (2, 2.5), (3, 2.0), (1, 9.0), (2, 9.0), (3, 9.0), (4, 1.5)]:
        tracker.trial_step(p, StepReport(step=step, epoch=0.1, loss=loss, learning_rate=1e-3), 1.0)
    again = MLflowTracker(tracker.uri, "exp", "sweep1")
    again.trial_step(p, StepReport(step=4, epoch=0.1, loss=9.0, learning_rate=1e-3), 2.0)
    again.trial_step(p, StepReport(step=5, epoch=0.1, loss=1.0, learning_rate=1e-3), 2.0)
    history = tracker.client.get_metric_history(tracker._child(p), "loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.5), (3, 2.0), (4, 1.5), (5, 1.0)]


def test_a_failure_while_finishing_still_closes_the_parent_run(tracker, tmp_path, monkeypatch):
    """Logging the table fails (a full disk, a store error): the parent still ends FAILED, never RUNNING,
    and trials left RUNNING are KILLED."""
    p = param("b")
    tracker.trial_started(p, "t2")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracker.client, "log_table", disk_full)
    with pytest.raises(OSError):
        tracker.finish(tmp_path, [{"trial_id": "b"}], failed=True)
    assert tracker.client.get_run(tracker.parent_id).info.status == "FAILED"
    assert tracker.client.get_run(tracker._child(p)).info.status == "KILLED"
