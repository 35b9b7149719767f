"""Tracking details that need no sweep: credentials never reach logs, files or params; what a step
report becomes in MLflow."""

from types import SimpleNamespace

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
    tracker._client = SimpleNamespace(log_batch=lambda run_id, metrics: logged.append((run_id, metrics)))
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
