"""Tracking details that need no sweep: credentials never reach logs, files or params."""

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
