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
