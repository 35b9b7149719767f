"""Bad input: exit 2, one line naming what is wrong, nothing started, an earlier sweep untouched.

One case per way a hostile or careless user can get it wrong, grouped by class: the space file, its
values and names, the data, the model, the command line, the tracking store, the sweep directory and
its records. Each runs the real entry point in this process (no Ray may start)."""

import json
import shutil
import socket
import time
from pathlib import Path

import pytest

from sweep.run import main
from tests.conftest import data_file, one_line_error, tree_digest, write_space

T = 'Trial(r=8, targets="attention", bits=4)'
ROW = b'{"product": "p", "category": "c", "description": "d"}\n'


def space(tmp: Path, settings: str = "", trials: str = T) -> list[str]:
    return [str(write_space(tmp / "space.py", settings=settings, trials=trials))]


def space_file(tmp: Path, body: str) -> list[str]:
    head = "from sweep import Settings, Space, Trial\nS = Settings(model='random:tiny-llama', " \
           "dataset='bundled:products-400', device='cpu')\n"
    return [data_file(tmp, "custom.py", (head + body).encode())]


def dataset(tmp: Path, name: str, content: bytes, *extra: str) -> list[str]:
    return space(tmp) + ["--set", "dataset=" + data_file(tmp, name, content), *extra]


def model_dir(tmp: Path, *files: str) -> list[str]:
    """A local model directory with the tiny model's config and the named (empty or tiny) files."""
    from trainers.models import ASSETS

    d = tmp / "model"
    d.mkdir()
    (d / "config.json").write_text((ASSETS / "tiny-llama" / "config.json").read_text())
    for f in files:
        (d / f).write_text('{"weight_map": {"a": "model-00001-of-00002.safetensors"}}' if f.endswith("index.json")
                           else "x")
    return space(tmp) + ["--set", f"model={d}"]


def damage(tmp: Path, name: str, content: bytes) -> list[str]:
    """The earlier sweep with one of its records replaced by ``content``."""
    path = tmp / "earlier" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return space(tmp)


def tracked(tmp: Path, uri: str) -> list[str]:
    """A new sweep (so the earlier one's manifest is not what refuses it) tracked in ``uri``."""
    return space(tmp) + ["--mlflow-uri", uri, "--output", str(tmp / "new")]


def silent_server() -> int:
    """A port that accepts connections and never answers (kept open for the test session)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    SILENT.append(s)
    return s.getsockname()[1]


SILENT: list[socket.socket] = []

CASES = {
    # the space file: Python that must only assign `space`
    "missing space file": (lambda t: [str(t / "nope.py")], "space file not found"),
    "syntax error": (lambda t: [data_file(t, "s.py", b"from sweep import Space\nspace = Space(\n")],
                     "s.py:2: syntax error"),
    "space file calls sys.exit": (lambda t: space_file(t, "import sys\nsys.exit(3)\n"),
                                  "custom.py:4: calls sys.exit(3)"),
    "space file raises KeyboardInterrupt": (lambda t: space_file(t, "raise KeyboardInterrupt\n"),
                                            "custom.py:3: KeyboardInterrupt"),
    "space trials generator raises": (lambda t: space_file(t, "def g():\n    yield 1/0\nspace = Space(name='g', "
                                                           "settings=S, trials=g())\n"), "ZeroDivisionError"),
    "trials not a list": (lambda t: space_file(t, "space = Space(name='x', settings=S, trials=Trial(r=8, "
                                                  "targets='attention', bits=4))\n"),
                          "Space.trials must be a list of Trial(...)"),
    "endless trials": (lambda t: space_file(t, "import itertools\nspace = Space(name='x', settings=S, trials=("
                                               "Trial(r=8, targets='attention', bits=4) for _ in "
                                               "itertools.count()))\n"),
                       "Space.trials has more than 10,000 trials"),
    "unknown field": (lambda t: space(t, trials='Trial(r=8, targets="attention", bits=4, rank=2)'),
                      "unknown field 'rank'"),
    # values: types, ranges, and numbers that are not finite (they pass "> 0" and fail inside a trial)
    "r is zero": (lambda t: space(t, trials='Trial(r=0, targets="attention", bits=4)'), "field 'r' must be a positive"),
    "r not an int": (lambda t: space(t, trials='Trial(r="8", targets="attention", bits=4)'),
                     "field 'r' must be a positive"),
    "bits": (lambda t: space(t, trials='Trial(r=8, targets="attention", bits=5)'),
             "field 'bits' must be one of 4, 8, 16"),
    "targets not a list": (lambda t: space(t, trials='Trial(r=8, targets=5, bits=4)'), "field 'targets' must be"),
    "unknown preset": (lambda t: space(t, trials='Trial(r=8, targets="mlp", bits=4)'),
                       "field 'targets' must be a preset"),
    "module matches no layer": (lambda t: space(t, trials='Trial(r=8, targets=["wqkv"], bits=4)'),
                                "module 'wqkv' matches no Linear layer"),
    "learning rate NaN": (lambda t: space(t, settings="learning_rate=float('nan')"),
                          "field 'learning_rate' must be a finite positive number, got nan"),
    "lora_alpha infinite": (lambda t: space(t, settings="lora_alpha=float('inf')"),
                            "field 'lora_alpha' must be a finite"),
    "epochs infinite": (lambda t: space(t) + ["--set", "epochs=inf"],
                        "field 'epochs' must be a finite positive number"),
    "seed negative": (lambda t: space(t) + ["--set", "seed=-1"], "field 'seed' must be an integer in [0, 2**32)"),
    "seed too large": (lambda t: space(t) + ["--set", "seed=4294967296"],
                       "field 'seed' must be an integer in [0, 2**32)"),
    "max_seq_length beyond the model": (lambda t: space(t) + ["--set", "max_seq_length=1024"],
                                        "field 'max_seq_length': 1024 exceeds the model's 512 positions"),
    "seeds zero": (lambda t: space(t) + ["--set", "seeds=0"], "field 'seeds' must be an integer from 1 to 100"),
    "compile on the reference path": (lambda t: space(t) + ["--set", "trainer=reference", "--set", "compile=true"],
                                      "field 'compile' compiles the fast trainer path only"),
    "seed repeats beyond 2**32": (lambda t: space(t) + ["--set", "seed=4294967294", "--set", "seeds=3"],
                                  "field 'seed' must leave room below 2**32 for seeds=3 training seeds"),
    "max_seq_length beyond the demo base": (lambda t: space(t) + ["--set", "model=bundled:desc-llama", "--set",
                                                                  "max_seq_length=1024"],
                                            "field 'max_seq_length': 1024 exceeds the model's 512 positions"),
    "dropout NaN": (lambda t: space(t, settings="lora_dropout=float('nan')"), "field 'lora_dropout' must be in [0, 1)"),
    # names: directories, Ray trials and MLflow runs
    "trial named base": (lambda t: space(t, trials='Trial(r=8, targets="attention", bits=4, name="base")'),
                         "field 'name' 'base' is reserved for the baseline row"),
    "trial named BASE": (lambda t: space(t, trials='Trial(r=8, targets="attention", bits=4, name="BASE")'),
                         "'base' is reserved"),
    "trial name with a slash": (lambda t: space(t, trials='Trial(r=8, targets="attention", bits=4, name="a/b")'),
                                "field 'name' must start with a letter or digit"),
    "trial name ..": (lambda t: space(t, trials='Trial(r=8, targets="attention", bits=4, name="..")'),
                      "field 'name' must start with a letter or digit"),
    "trial name empty": (lambda t: space(t, trials='Trial(r=8, targets="attention", bits=4, name="")'),
                         "field 'name' must start"),
    "trial name with a newline": (lambda t: space(t, trials='Trial(r=8, targets="attention", bits=4, name="a\\nb")'),
                                  "trial 0 ('a\\nb'): field 'name'"),
    "trial name too long": (lambda t: space(t, trials='Trial(r=8, targets="attention", bits=4, name="x" * 101)'),
                            "must be at most 100 characters (has 101)"),
    "two trials one name": (lambda t: space(t, trials='Trial(r=8, targets="attention", bits=4, name="A"), '
                                                      'Trial(r=4, targets="attention", bits=4, name="a")'),
                            "trial 1 ('a'): field 'name' is already used by trial 0"),
    "seed repeat takes a trial's name": (lambda t: space(t, trials='Trial(r=8, targets="attention", bits=4, seeds=2, '
                                                               'name="a"), Trial(r=4, targets="attention", bits=4, '
                                                               'name="A-seed43")'),
                                         "trial 1 (A-seed43): field 'name' is already used by trial 0's seed repeat "
                                         "a-seed43"),
    "seed repeat name too long": (lambda t: space(t, trials='Trial(r=8, targets="attention", bits=4, seeds=2, '
                                                            'name="x" * 95)'),
                                  "a seed repeat): field 'name' must be at most 100 characters (has 102)"),
    "space name escapes": (lambda t: space_file(t, "space = Space(name='../../x', settings=S, trials=[Trial(r=8, "
                                                   "targets='attention', bits=4)])\n"), "Space.name '../../x' must"),
    "space name empty": (lambda t: space_file(t, "space = Space(name='', settings=S, trials=[Trial(r=8, "
                                                 "targets='attention', bits=4)])\n"), "Space.name '' must"),
    "--name escapes": (lambda t: space(t) + ["--name", "../x"], "--name '../x' must start"),
    # data: found in the driver, with the line or row, never trained on
    "dataset missing": (lambda t: space(t) + ["--set", f"dataset={t / 'none.jsonl'}"], "dataset file not found"),
    "dataset unreadable": (lambda t: dataset(t, "d.parquet", b"not parquet"), "cannot load dataset"),
    "dataset empty": (lambda t: dataset(t, "e.csv", b"product,category,description\n"), "is empty"),
    "dataset columns": (lambda t: dataset(t, "c.jsonl", b'{"product": "x"}\n'),
                        "lacks column(s) category, description"),
    "null field": (lambda t: dataset(t, "n.jsonl", ROW * 3 + b'{"product": null, "category": "c", '
                                                              b'"description": "d"}\n'),
                   "n.jsonl': line 4: field 'product' is missing or null"),
    "missing key": (lambda t: dataset(t, "k.jsonl", ROW * 5 + b'{"product": "p", "category": "c"}\n' + ROW),
                    "line 6: field 'description' is missing or null"),
    "empty text": (lambda t: dataset(t, "x.csv", b"product,category,description\np,c,d\np,c,   \n"),
                   "x.csv': row 2: field 'description' is empty"),
    "number for text": (lambda t: dataset(t, "i.jsonl", ROW + b'{"product": 7, "category": "c", "description": "d"}\n'),
                        "line 2: field 'product' is '7' (int), not text"),
    "undecodable bytes": (lambda t: dataset(t, "b.jsonl", ROW * 2 + b'{"product": "\xff\xfe", "category": "c", '
                                                             b'"description": "d"}\n'),
                          "line 3: not UTF-8 text (byte 0xff)"),
    "undecodable csv": (lambda t: dataset(t, "b.csv", b"product,category,description\np,c,d\n\xe9t\xe9,c,d\n"),
                        "b.csv': line 3: not UTF-8 text (byte 0xe9)"),
    "broken json line": (lambda t: dataset(t, "j.jsonl", ROW * 2 + b'{"product": "p", "cat\n' + ROW),
                         "line 3: not valid JSON"),
    "json line not an object": (lambda t: dataset(t, "a.jsonl", ROW + b'["p", "c", "d"]\n'),
                                "line 2: expected a JSON object with product, category, description, got list"),
    "ragged csv": (lambda t: dataset(t, "r.csv", b"product,category,description\np,c,d\np,c,d,e,f\n"),
                   "Expected 3 fields in line 3, saw 5"),
    "too few rows for the split": (lambda t: dataset(t, "few.jsonl", ROW * 3, "--set", "test_fraction=0.7"),
                                   "is too small: 3 row(s) with test_fraction=0.7 leave 0 for training and 3 for test"),
    "dataset mapped to a missing column": (
        lambda t: space(t, settings="data_format='alpaca', columns={'instruction': 'question'}") + [
            "--set", "dataset=" + data_file(t, "a.jsonl", b'{"q": "x", "output": "y"}\n')],
        "field 'dataset': dataset '{}' lacks column(s) question (columns maps instruction to it) for the alpaca "
        "format"),
    "null in a mapped column": (
        lambda t: space(t, settings="data_format='alpaca', columns={'output': 'answer'}") + [
            "--set", "dataset=" + data_file(t, "a.jsonl", b'{"instruction": "i", "answer": "x"}\n' * 3
                                            + b'{"instruction": "i", "answer": null}\n')],
        "a.jsonl': line 4: field 'answer' is missing or null"),
    "dataset row unusable": (
        lambda t: space(t, settings="data_format='messages'") + ["--set", "dataset=" + data_file(
            t, "m.jsonl", b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
                          b'{"messages": [{"role": "user", "content": "x"}]}\n')],
        "m.jsonl': line 2: field 'messages' needs an assistant message after another message"),
    "chat without a chat template": (
        lambda t: space(t, settings="data_format='messages'") + [
            "--set", "model=random:open_llama_3b_v2", "--set", "dataset=bundled:products-chat-200"],
        "field 'chat_template': data_format='messages' needs a chat template and the tokenizer of "
        "random:open_llama_3b_v2 has none"),
    "hub dataset offline": (lambda t: space(t) + ["--set", "dataset=someone/red-dot"], "Hub is unreachable"),
    # the model
    "hub model offline": (lambda t: space(t) + ["--set", "model=someone/llama"], "Hub is unreachable and no copy"),
    "model directory without weights": (lambda t: model_dir(t),
                                        "holds no weights (*.safetensors or pytorch_model*.bin)"),
    "model shard missing": (lambda t: model_dir(t, "model.safetensors.index.json"),
                            "weight file model-00001-of-00002.safetensors named in model.safetensors.index.json is "
                            "missing"),
    "bundled model unknown": (lambda t: space(t) + ["--set", "model=bundled:nope"],
                              "unknown bundled checkpoint 'bundled:nope' (bundled with weights: desc-llama)"),
    "bundled model without weights": (lambda t: space(t) + ["--set", "model=bundled:tiny-llama"],
                                      "unknown bundled checkpoint 'bundled:tiny-llama'"),
    "bundled model as a path": (lambda t: space(t) + ["--set", "model=bundled:../models/desc-llama"],
                                "unknown bundled checkpoint 'bundled:../models/desc-llama'"),
    "model without tokenizer": (lambda t: model_dir(t, "model.safetensors"), "no usable tokenizer"),
    # the command line's own values
    "set unknown key": (lambda t: space(t) + ["--set", "rank=4"], "--set rank: unknown key"),
    "set wrong type": (lambda t: space(t) + ["--set", "epochs=two"], "--set epochs=two: expected float"),
    "gpus per trial NaN": (lambda t: space(t) + ["--gpus-per-trial", "nan"],
                           "--gpus-per-trial must be 'auto' or a finite number"),
    "gpus per trial infinite": (lambda t: space(t) + ["--gpus-per-trial", "inf"],
                                "--gpus-per-trial must be 'auto' or a finite"),
    "gpus per trial negative": (lambda t: space(t) + ["--gpus-per-trial", "-1"],
                                "--gpus-per-trial must be 'auto' or a finite"),
    "gpus per trial 1.5": (lambda t: space(t) + ["--gpus-per-trial", "1.5"],
                           "--gpus-per-trial 1.5: a trial trains on one GPU"),
    "gpus per trial a sliver": (lambda t: space(t) + ["--gpus-per-trial", "0.001"],
                                "--gpus-per-trial must be at least 0.01"),
    "dashboard host unknown": (lambda t: space(t) + ["--dashboard-host", "no.such.host.invalid"],
                               "--dashboard-host 'no.such.host.invalid' is not an address of this machine"),
    "ray address port out of range": (lambda t: space(t) + ["--address", "127.0.0.1:99999", "--output", str(t / "new")],
                                      "Ray address 127.0.0.1:99999 is unreachable"),
    "max failures negative": (lambda t: space(t) + ["--max-failures", "-1"], "--max-failures must be >= 0"),
    "ray node ip not an ip": (lambda t: space(t) + ["--ray-node-ip", "localhost:1"], "--ray-node-ip must be an IP"),
    "ray node ip with address": (lambda t: space(t) + ["--ray-node-ip", "10.0.0.1", "--address", "127.0.0.1:9"],
                                 "with --address the cluster has its own"),
    "ray address unreachable": (lambda t: space(t) + ["--address", "127.0.0.1:9", "--output", str(t / "new")],
                                "Ray address 127.0.0.1:9 is unreachable"),
    "cpus the machine lacks": (lambda t: space(t, settings="cpus_per_trial=4096") + ["--output", str(t / "new")],
                               "needs 4096 CPUs; the largest node has"),
    "gpu space on a machine without": (lambda t: space(t) + ["--set", "device=cuda", "--output", str(t / "new")],
                                       "needs a CUDA GPU but the Ray cluster has none"),
    "more than one GPU per trial": (lambda t: space(t) + ["--gpus-per-trial", "2"],
                                    "--gpus-per-trial 2: a trial trains on one GPU"),
    "storage with credentials": (lambda t: space(t) + ["--storage", "s3://AKIA:pw@bucket/x"],
                                 "--storage must not carry credentials"),
    "storage endpoint alone": (lambda t: space(t) + ["--storage-endpoint", "http://127.0.0.1:9"],
                               "--storage-endpoint needs --storage"),
    "storage unreachable": (lambda t: space(t) + ["--storage", "s3://b/x", "--storage-endpoint", "http://127.0.0.1:9",
                                                  "--output", str(t / "new")], "storage s3://b/x is not writable"),
    "trial resource malformed": (lambda t: space(t) + ["--trial-resource", "GPU=2", "--output", str(t / "new")],
                                 "--trial-resource expects NAME=AMOUNT"),
    "trial resource zero": (lambda t: space(t) + ["--trial-resource", "worker=0"], "--trial-resource expects NAME"),
    "trial resource without a cluster": (lambda t: space(t) + ["--trial-resource", "worker=1"],
                                         "the local Ray a sweep starts offers no custom resources"),
    "mps on with a cluster": (lambda t: space(t) + ["--mps", "on", "--address", "127.0.0.1:9"],
                              "--mps on starts MPS on this machine; with --address run"),
    "storage unparsable": (lambda t: space(t) + ["--storage", "s3://s3cr3t@[b/x"], "--storage is not a valid URI"),
    "storage secret in the query": (lambda t: space(t) + ["--storage", "s3://b/x?secret_key=s3cr3t"],
                                    "--storage must not carry credentials"),
    "storage endpoint with credentials": (lambda t: space(t) + ["--storage", "s3://b/x", "--storage-endpoint",
                                                               "http://AKIA:s3cr3t@127.0.0.1:9"],
                                          "--storage-endpoint must not carry credentials"),
    "storage endpoint without scheme": (lambda t: space(t) + ["--storage", "s3://b/x", "--storage-endpoint", "h:9"],
                                        "--storage-endpoint must be http(s)://HOST[:PORT], got h:9"),
    "storage endpoint for a path": (lambda t: space(t) + ["--storage", str(t / "s"), "--storage-endpoint", "http://h"],
                                    "--storage-endpoint is for S3-compatible stores"),
    "storage path through a file": (lambda t: space(t) + ["--storage", data_file(t, "file", b"") + "/ray", "--output",
                                                          str(t / "new")], "/file/ray is not writable"),
    "storage silent endpoint": (lambda t: space(t) + ["--storage", "s3://b/x", "--output", str(t / "new"),
                                                      "--storage-endpoint", f"http://127.0.0.1:{silent_server()}"],
                                "storage s3://b/x did not answer within 1s"),
    # the tracking store: reached, within seconds, before anything is written
    "tracking nothing listening": (lambda t: tracked(t, "http://127.0.0.1:9"),
                                   "tracking store http://127.0.0.1:9 cannot be used"),
    "tracking silent server": (lambda t: tracked(t, f"http://127.0.0.1:{silent_server()}"),
                               "tracking store http://127.0.0.1:"),
    "tracking unknown scheme": (lambda t: tracked(t, "bogus://x"), "unsupported URI 'bogus://x'"),
    "tracking sqlite directory": (lambda t: tracked(t, f"sqlite:///{t}"), "is a directory, not a"),
    "tracking sqlite not a database": (lambda t: tracked(t, "sqlite:///" + data_file(t, "n.db", b"no")),
                                       "is not an SQLite database"),
    "tracking sqlite in a missing directory": (lambda t: tracked(t, f"sqlite:///{t}/no/m.db"),
                                               "is not a writable directory"),
    "tracking uri unparsable": (lambda t: tracked(t, "http://user:pw123@[::1"),
                                "--mlflow-uri is not a valid URI (Invalid IPv6 URL)"),
    "tracking user without password": (lambda t: tracked(t, "http://token@127.0.0.1:9"),
                                       "a user name without a password"),
    # the sweep directory and its records
    "output not writable": (lambda t: space(t) + ["--output", data_file(t, "file", b"") + "/sweep"], "is not writable"),
    "output is somebody's directory": (lambda t: space(t) + ["--output", str(t)],
                                       "is not empty and holds no lora-sweep"),
    "space changed since the sweep started": (lambda t: space(t, settings="epochs=2"), "different space"),
    "manifest cut short": (lambda t: damage(t, "sweep.json", b'{"sweep_id": "ab'),
                           "sweep.json is damaged (not valid JSON"),
    "manifest empty": (lambda t: damage(t, "sweep.json", b""), "sweep.json is damaged (not valid JSON"),
    "manifest a list": (lambda t: damage(t, "sweep.json", b"[]"), "sweep.json is damaged (a JSON list, not an object)"),
    "manifest field missing": (lambda t: damage(t, "sweep.json", b'{"sweep_id": "a", "name": "t"}'),
                               "field 'space_fingerprint' is missing"),
    "ledger cut short": (lambda t: damage(t, "ledger.json", b'{"abc": {"trial": "a", "sta'),
                         "ledger.json is damaged (not valid JSON"),
    "ledger wrong shape": (lambda t: damage(t, "ledger.json", b'{"abc": "TERMINATED"}'), "entry 'abc' has no status"),
    "tune state cut short": (lambda t: damage(t, "tune/tuner.pkl", b"\x80\x05\x95\x10"), "tuner.pkl is damaged"),
    "manifest storage not a record": (lambda t: damage(t, "sweep.json", json.dumps({
        "sweep_id": "a", "name": "t", "space_fingerprint": "0" * 16, "mlflow_uri": "sqlite:///x.db",
        "storage": "s3://b/x"}).encode()), "field 'storage' is not a --storage record"),
}
if shutil.which("nvidia-cuda-mps-control") is None:  # true on CI; a GPU host would start it instead
    CASES["mps on without nvidia's daemon"] = (lambda t: space(t) + ["--mps", "on"],
                                               "--mps on: nvidia-cuda-mps-control is not installed here")


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case, tmp_path, earlier_sweep, capsys, monkeypatch):
    import ray

    import sweep.storage
    import sweep.store

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep.store, "PROBE_TIMEOUT_S", 1.0)  # the silent server's case: bounded, and quick here
    monkeypatch.setattr(sweep.storage, "PROBE_TIMEOUT_S", 1.0)  # the same for the storage's
    build, says = CASES[case]
    argv = build(tmp_path)
    if "--output" not in argv:
        argv += ["--output", str(earlier_sweep)]
    if "--mlflow-uri" not in argv:
        argv += ["--mlflow-uri", f"sqlite:///{tmp_path}/m.db"]
    before = tree_digest(earlier_sweep)
    start = time.monotonic()
    assert main(argv) == 2
    err = one_line_error(capsys.readouterr().err)
    says = says.replace("{}", str(tmp_path / "a.jsonl"))
    assert says in err and "s3cr3t" not in err, err  # a storage secret is refused, never repeated
    assert time.monotonic() - start < 30
    assert tree_digest(earlier_sweep) == before
    assert not ray.is_initialized()
    assert not (tmp_path / "new").exists() and not (tmp_path / "m.db").exists()  # nothing started
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob("earlier.old-*"))


@pytest.mark.parametrize("argv, says", [
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--resume", "--fresh"], "argument --fresh: not allowed with argument --resume"),
    (["--extend", "--fresh"], "argument --fresh: not allowed with argument --extend"),
    (["--gpus-per-trial", "abc"], "argument --gpus-per-trial: expected 'auto' or a number, got 'abc'"),
    (["--metric", "accuracy"], "argument --metric: invalid choice: 'accuracy'"),
    (["--mps", "sometimes"], "argument --mps: invalid choice: 'sometimes'"),
    ([], "the following arguments are required: space"),
])
def test_usage_errors_are_one_line_too(argv, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(write_space(tmp_path / "s.py")), *argv] if argv else [])
    assert e.value.code == 2
    err = one_line_error(capsys.readouterr().err)
    assert says in err and "(see python -m sweep.run --help)" in err, err


def test_silent_tracking_server_is_given_up_on_within_the_probe_timeout(tmp_path, capsys, monkeypatch):
    """A server that accepts and never answers costs the probe's seconds, not MLflow's minutes of retries."""
    import sweep.store

    monkeypatch.setattr(sweep.store, "PROBE_TIMEOUT_S", 2.0)
    port = silent_server()
    start = time.monotonic()
    assert main(space(tmp_path) + ["--output", str(tmp_path / "o"), "--mlflow-uri", f"http://127.0.0.1:{port}"]) == 2
    seconds = time.monotonic() - start
    err = one_line_error(capsys.readouterr().err)
    assert f"tracking store http://127.0.0.1:{port} cannot be used: it did not answer within 2 s" == err[7:], err
    assert 2.0 <= seconds < 12, seconds  # planning the sweep takes a few of these seconds
    assert not (tmp_path / "o").exists()


def started_sweep(tmp: Path, **fields) -> tuple[list[str], Path]:
    """The space's argv and a sweep directory that sweep started in (its manifest only, plus ``fields``)."""
    from sweep.driver import SweepOptions, plan_sweep

    argv = space(tmp)
    fingerprint = plan_sweep(SweepOptions(space=argv[0]), for_training=False).fingerprint
    out = tmp / "out"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"sweep_id": "a", "name": "t", "space_fingerprint": fingerprint,
                                                "mlflow_uri": f"sqlite:///{tmp}/a.db", **fields}))
    return argv, out


def test_resume_with_another_tracking_store_is_refused(tmp_path, capsys, monkeypatch):
    """A resumed sweep keeps its runs in the store it started with; --mlflow-uri naming another is refused
    (not silently ignored), with the store to use."""
    monkeypatch.chdir(tmp_path)
    argv, out = started_sweep(tmp_path)
    before = tree_digest(out)
    assert main(argv + ["--output", str(out), "--mlflow-uri", f"sqlite:///{tmp_path}/b.db"]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert f"tracks its runs in sqlite:///{tmp_path}/a.db; resume with that --mlflow-uri" in err, err
    assert tree_digest(out) == before and not (tmp_path / "b.db").exists() and not (tmp_path / "a.db").exists()


@pytest.mark.parametrize("recorded, given, says", [
    (None, ["--storage", "STORAGE"], "this sweep was started with no --storage (the sweep directory); pass the same"),
    ("STORAGE", ["--storage", "OTHER"], "this sweep was started with --storage STORAGE; pass the same"),
])
def test_resume_with_another_storage_is_refused(recorded, given, says, tmp_path, capsys, monkeypatch):
    """A resumed sweep's trials continue from the checkpoints in the storage it started with: another
    --storage is refused, not a silent start over; nothing is probed or written."""
    monkeypatch.chdir(tmp_path)
    paths = {"STORAGE": str(tmp_path / "storage"), "OTHER": str(tmp_path / "other")}
    argv, out = started_sweep(tmp_path, storage=recorded and {"uri": paths[recorded], "endpoint": ""})
    before = tree_digest(out)
    assert main(argv + ["--output", str(out), "--mlflow-uri", f"sqlite:///{tmp_path}/a.db",
                        *[paths.get(g, g) for g in given]]) == 2
    err = one_line_error(capsys.readouterr().err)
    assert says.replace("STORAGE", paths["STORAGE"]) in err, err
    assert tree_digest(out) == before and not (tmp_path / "a.db").exists()
    assert not (tmp_path / "storage").exists() and not (tmp_path / "other").exists()
