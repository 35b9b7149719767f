"""Shared fixtures. Everything runs offline on the CPU with the bundled tiny model and data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach for the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Materialized random: models for this test session only."""
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["LORA_SWEEP_CACHE"] = str(path)
    return path


def tiny_cfg(**overrides):
    """A TrialConfig on the tiny model and the bundled data, CPU; tests override what they exercise."""
    from trainers.config import TrialConfig

    values = dict(name="t", index=0, model="random:tiny-llama", dataset="bundled:products-400", device="cpu", r=8,
                  targets="attention", bits=16, target_modules=("q_proj", "v_proj"), learning_rate=3e-3, epochs=1,
                  batch_size=4, grad_accum=2, train_samples=100, logging_steps=1, lora_dropout=0.0,
                  max_new_tokens=4, heldout_prompts=0)
    return TrialConfig(**{**values, **overrides})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(*args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sweep.run", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_space(path: Path, settings: str = "", trials: str = 'Trial(r=8, targets="attention", bits=4)') -> Path:
    """A small valid space file on the tiny model; pieces replaced to make it invalid."""
    path.write_text(
        "from sweep import Settings, Space, Trial, grid\n"
        "space = Space(\n"
        "    name='t',\n"
        "    settings=Settings(model='random:tiny-llama', dataset='bundled:products-400', device='cpu'"
        f"{', ' + settings if settings else ''}),\n"
        f"    trials=[\n        {trials},\n    ],\n"
        ")\n"
    )
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its hash: equal digests mean nothing was touched."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_csv(path: Path) -> dict[str, dict]:
    """summary.csv rows by trial_id, each a dict by column name."""
    import csv

    with open(path, newline="") as f:
        return {row["trial_id"]: row for row in csv.DictReader(f)}


def make_result(**values):
    """A TrialResult with plausible values for a finished CPU trial; tests override what they check."""
    from trainers.config import TrialResult

    defaults = dict(trainable_params=100, total_params=1000, trainable_pct=10.0, eval_loss=2.0, eval_loss_se=0.01,
                    response_loss=2.5, response_loss_se=0.01, perplexity=7.39, truncated_rows=0, truncated_pct=0.0,
                    response_tokens_lost=0, response_lost_pct=0.0, dropped_rows=0, rouge_l=0.2, rouge_l_se=0.05,
                    repeat_ngram_rate=0.1, end_marker_rate=0.5, gen_mean_words=40.0, setup_seconds=1.0,
                    train_seconds=1.0, eval_seconds=0.1, generate_seconds=0.1, train_tokens=100,
                    train_tokens_per_second=100.0, peak_gpu_mem_gb=0.0, train_loss_first=3.0, train_loss_last=2.0,
                    train_steps=10, train_examples=90, test_examples=10, bnb_layers=0, dataset_fingerprint="0" * 16,
                    bnb_layer_type="none", device_name="cpu", gpu_uuid="", resumed_from_step=0, train_started_at=0.0)
    return TrialResult(**{**defaults, **values})


def chromium():
    """Debian's headless Chromium through Selenium (``.ci/run`` installs both); the test is skipped, with
    the reason, only where they could not be installed."""
    import shutil

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed here (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,2200"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, errors included
    return webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))


def data_file(directory: Path, name: str, content: bytes) -> str:
    """A file with exactly these bytes (a dataset, a space file, a broken record); returns its path."""
    (directory / name).write_bytes(content)
    return str(directory / name)


@pytest.fixture()
def earlier_sweep(tmp_path) -> Path:
    """A sweep directory with results in it, as an earlier run leaves it."""
    import json

    out = tmp_path / "earlier"
    (out / "trials" / "r8-attention-4bit" / "adapter").mkdir(parents=True)
    (out / "trials" / "r8-attention-4bit" / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00weights")
    (out / "summary.csv").write_text("trial_id,status\nr8-attention-4bit,TERMINATED\n")
    (out / "sweep.json").write_text(json.dumps({"sweep_id": "abc", "name": "t", "space_fingerprint": "0" * 16,
                                                "mlflow_uri": "sqlite:///x.db"}))
    (out / "ledger.json").write_text("{}")
    return out


def one_line_error(err: str) -> str:
    """stderr of a refused command: exactly one line, ``error: ...``; returns it."""
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err
