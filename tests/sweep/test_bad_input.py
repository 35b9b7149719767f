"""Bad input: exit 2, one line naming what is wrong, nothing started, an earlier sweep untouched."""

import json
from pathlib import Path

import pytest

from sweep.run import main
from tests.conftest import tree_digest, write_space

T = 'Trial(r=8, targets="attention", bits=4)'


def space(tmp: Path, settings: str = "", trials: str = T) -> list[str]:
    return [str(write_space(tmp / "space.py", settings=settings, trials=trials))]


def data_file(tmp: Path, name: str, content: bytes) -> str:
    (tmp / name).write_bytes(content)
    return str(tmp / name)


CASES = {
    "missing space file": (lambda t: [str(t / "nope.py")], "space file not found"),
    "syntax error": (lambda t: [data_file(t, "s.py", b"from sweep import Space\nspace = Space(\n")], "s.py:2: syntax error"),
    "unknown field": (lambda t: space(t, trials='Trial(r=8, targets="attention", bits=4, rank=2)'), "unknown field 'rank'"),
    "r is zero": (lambda t: space(t, trials='Trial(r=0, targets="attention", bits=4)'), "field 'r' must be a positive"),
    "r not an int": (lambda t: space(t, trials='Trial(r="8", targets="attention", bits=4)'), "field 'r' must be a positive"),
    "bits": (lambda t: space(t, trials='Trial(r=8, targets="attention", bits=5)'), "field 'bits' must be one of 4, 8, 16"),
    "unknown preset": (lambda t: space(t, trials='Trial(r=8, targets="mlp", bits=4)'), "field 'targets' must be a preset"),
    "module matches no layer": (lambda t: space(t, trials='Trial(r=8, targets=["wqkv"], bits=4)'),
                                "module 'wqkv' matches no Linear layer"),
    "dataset missing": (lambda t: space(t) + ["--set", f"dataset={t / 'none.jsonl'}"], "dataset file not found"),
    "dataset unreadable": (lambda t: space(t) + ["--set", "dataset=" + data_file(t, "d.parquet", b"not parquet")],
                           "cannot load dataset"),
    "dataset empty": (lambda t: space(t) + ["--set", "dataset=" + data_file(t, "e.csv", b"product,category,description\n")],
                      "is empty"),
    "dataset columns": (lambda t: space(t) + ["--set", "dataset=" + data_file(t, "c.jsonl", b'{"product": "x"}\n')],
                        "lacks column(s) category, description"),
    "hub dataset offline": (lambda t: space(t) + ["--set", "dataset=someone/red-dot"], "Hub is unreachable"),
    "hub model offline": (lambda t: space(t) + ["--set", "model=someone/llama"], "Hub is unreachable and no copy"),
    "set unknown key": (lambda t: space(t) + ["--set", "rank=4"], "--set rank: unknown key"),
    "set wrong type": (lambda t: space(t) + ["--set", "epochs=two"], "--set epochs=two: expected float"),
    "ray address unreachable": (lambda t: space(t) + ["--address", "127.0.0.1:9", "--output", str(t / "new")],
                                "Ray address 127.0.0.1:9 is unreachable"),
    "output not writable": (lambda t: space(t) + ["--output", data_file(t, "file", b"") + "/sweep"], "is not writable"),
    "space changed since the sweep started": (lambda t: space(t, settings="epochs=2"), "different space"),
}


@pytest.fixture()
def earlier_sweep(tmp_path) -> Path:
    """A sweep directory with results in it, as an earlier run leaves it."""
    out = tmp_path / "earlier"
    (out / "trials" / "r8-attention-4bit" / "adapter").mkdir(parents=True)
    (out / "trials" / "r8-attention-4bit" / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00weights")
    (out / "summary.csv").write_text("trial_id,status\nr8-attention-4bit,TERMINATED\n")
    (out / "sweep.json").write_text(json.dumps({"sweep_id": "abc", "name": "t", "space_fingerprint": "0" * 16,
                                                "mlflow_uri": "sqlite:///x.db"}))
    (out / "ledger.json").write_text("{}")
    return out


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case, tmp_path, earlier_sweep, capsys, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    build, says = CASES[case]
    argv = build(tmp_path)
    if "--output" not in argv:
        argv += ["--output", str(earlier_sweep)]
    before = tree_digest(earlier_sweep)
    assert main(argv + ["--mlflow-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and says in err, err
    assert tree_digest(earlier_sweep) == before
    assert not ray.is_initialized()
    assert not (tmp_path / "new").exists() and not (tmp_path / "m.db").exists()  # nothing started
