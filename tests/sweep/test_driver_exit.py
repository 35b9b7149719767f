"""How a started sweep ends when something fails on the way (a full disk, a store error, Ctrl-C that
escaped Tune): one line, exit 1, the MLflow parent closed (never RUNNING), and the table printed even
when it cannot be written. Ray Tune is replaced by a stand-in here; the slow tier runs the real thing."""

import errno
from types import SimpleNamespace

import pytest

from sweep import driver, guard, sweepdir
from sweep.cli import RunError
from sweep.store import TrackingStore
from tests.conftest import make_result, read_csv, write_space


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/m.db"  # one store (setting one up takes seconds)


@pytest.fixture()
def started(tmp_path, monkeypatch, store_uri, request):
    """A sweep of trials a and b as the driver has it when Tune starts: Tune (``run_experiments``) does what
    the test sets in ``TUNE``; afterwards its records say a finished and b was interrupted."""
    path = write_space(tmp_path / "s.py", trials='Trial(r=8, targets="attention", bits=16, name="a"), '
                                                 'Trial(r=4, targets="attention", bits=16, name="b")')
    out, uri = tmp_path / "out", store_uri
    opts = driver.SweepOptions(space=str(path), output=str(out), mlflow_uri=uri, baseline=False)
    plan = driver.plan_sweep(opts, for_training=False)
    sweepdir.prepare(out)
    manifest = sweepdir.new_manifest(out, name=request.node.name[:60], space=str(path), fingerprint="f",
                                     mlflow_uri=uri)
    cfg = {p.cfg.name: p.cfg for p in plan.planned}
    recorded = {"a": sweepdir.TrialOutcome(sweepdir.TERMINATED, make_result(eval_loss=1.5), cfg=cfg["a"], steps=10),
                "b": sweepdir.TrialOutcome(sweepdir.INTERRUPTED, cfg=cfg["b"])}
    monkeypatch.setattr("sweep.tuner.collect", lambda out, experiments: dict(recorded) if TUNE.get("ran") else {})

    def tune(*args, **kwargs):
        TUNE["ran"] = True
        return TUNE["fit"]()

    monkeypatch.setattr(driver, "run_experiments", tune)
    TUNE.clear()
    return SimpleNamespace(opts=opts, manifest=manifest, out=out, plan=plan, store=TrackingStore.parse(uri))


TUNE = {}


def run(s):
    return driver.execute(s.opts, s.manifest, s.out, s.plan, s.store, {})


def mlflow_statuses(s) -> dict[str, str]:
    """Run name -> status in this test's experiment; the parent run is named ``sweep``."""
    from mlflow import MlflowClient

    client = MlflowClient(s.store.uri)
    runs = client.search_runs([client.get_experiment_by_name(s.manifest["name"]).experiment_id])
    return {"sweep" if r.info.run_name == s.manifest["name"] else r.info.run_name: r.info.status for r in runs}


def test_records_that_cannot_be_written_stop_the_sweep_cleanly(started, capsys):
    """The guard saw the ledger hit a full disk and stopped Tune: the table comes from what Tune's records
    say (a finished, b interrupted), the parent run is FAILED, and the error is one line (exit 1)."""
    def fit():
        guard.FAILURES.append(f"No space left on device: {started.out / 'ledger.json'}")
        raise guard.RecordingFailed(guard.FAILURES[0])

    TUNE["fit"] = fit
    with pytest.raises(RunError) as e:
        run(started)
    assert str(e.value) == (f"the sweep stopped: No space left on device: {started.out / 'ledger.json'}. Fix that "
                            "(free disk space, bring the tracking store back) and run the same command again to resume")
    assert f"# Sweep {started.manifest['name']}" in capsys.readouterr().out
    rows = read_csv(started.out / "summary.csv")
    assert {n: (r["status"], r["eval_loss"]) for n, r in rows.items()} == {"a": ("TERMINATED", "1.5"),
                                                                         "b": ("INTERRUPTED", "")}
    assert mlflow_statuses(started) == {"sweep": "FAILED"}


def test_a_table_that_cannot_be_written_is_still_printed(started, capsys, monkeypatch):
    TUNE["fit"] = lambda: started.manifest

    def disk_full(out, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "summary.csv"))

    monkeypatch.setattr("sweep.summary.write_reports", disk_full)
    with pytest.raises(RunError, match=f"the sweep stopped: No space left on device: {started.out}/summary.csv"):
        run(started)
    assert f"# Sweep {started.manifest['name']}" in capsys.readouterr().out
    assert not (started.out / "summary.csv").exists()
    assert mlflow_statuses(started) == {"sweep": "FAILED"}


def test_an_interrupt_that_escapes_tune_leaves_no_run_running(started):
    def fit():
        raise KeyboardInterrupt

    TUNE["fit"] = fit
    with pytest.raises(KeyboardInterrupt):
        run(started)
    assert mlflow_statuses(started) == {"sweep": "KILLED"}


def test_one_recording_failure_mutes_the_callback_and_ends_the_tune_loop():
    """Tune would log the traceback of a raising callback and carry on; the guard keeps the first failure,
    records nothing more and raises at the end of Tune's loop step."""
    calls = []

    class Events:
        def on_trial_complete(self, **info):
            calls.append(info["trial"])
            raise OSError(errno.ENOSPC, "No space left on device", "/s/ledger.json")

        def on_step_end(self, **info):
            calls.append("step")

    guard.FAILURES.clear()
    g = guard.Guarded(Events())
    g.on_trial_complete(iteration=1, trials=[], trial="a")
    g.on_trial_complete(iteration=1, trials=[], trial="b")
    with pytest.raises(guard.RecordingFailed, match="No space left on device: /s/ledger.json"):
        g.on_step_end(iteration=1, trials=[])
    assert calls == ["a"]
    guard.FAILURES.clear()


def test_an_unforeseen_error_still_writes_the_table_and_fails_the_run(started):
    """A bug or a Tune failure nobody planned for keeps its traceback (it is re-raised), but only after the
    table is written from the directory's records and the parent run is closed as FAILED."""
    def fit():
        raise RuntimeError("restore went wrong")

    TUNE["fit"] = fit
    with pytest.raises(RuntimeError, match="restore went wrong"):
        run(started)
    assert read_csv(started.out / "summary.csv")["a"]["status"] == "TERMINATED"
    assert mlflow_statuses(started) == {"sweep": "FAILED"}
