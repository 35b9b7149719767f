"""Planning: memory estimates against what an H200 measured, and GPU shares for --gpus-per-trial auto."""

from dataclasses import replace

import pytest

from sweep import cluster
from sweep.cli import UserError
from sweep.plan import PlannedTrial, plan
from sweep.space import expand, load_space, parse_sets
from tests.conftest import REPO
from trainers.config import CUDA_OVERHEAD_GB, TrialConfig

PAPER = REPO / "search_spaces" / "paper_grid.py"
# peak_gpu_mem_gb measured by `python -m sweep.bench` on an H200 (random:open_llama_3b_v2, 20 steps of 16
# examples of products.jsonl): fast path (trainers/kbit.py, 16-bit residual stream), and the reference path.
MEASURED_FAST = {"r8-attention-4bit": 17.8, "r16-attention-4bit": 17.8, "r8-all_linear-4bit": 22.0,
                 "r8-all_linear-8bit": 23.5}
MEASURED_REFERENCE = {"r8-attention-4bit": 5.3, "r16-attention-4bit": 5.3, "r8-all_linear-4bit": 5.4,
                      "r8-all_linear-8bit": 6.8}


@pytest.fixture(scope="module")
def paper_configs():
    return expand(load_space(PAPER), PAPER, parse_sets(["model=random:open_llama_3b_v2"]))


@pytest.mark.parametrize("variant, measured", [({}, MEASURED_FAST),
                                               ({"trainer": "reference", "gradient_checkpointing": True},
                                                MEASURED_REFERENCE)], ids=["fast", "reference"])
def test_estimates_cover_what_an_h200_measured_without_wasting_half_the_gpu(paper_configs, variant, measured):
    planned = plan([replace(c, **variant) for c in paper_configs], PAPER, for_training=False)
    for p in planned:
        assert measured[p.cfg.name] <= p.gpu_gb <= 1.6 * measured[p.cfg.name], (p.cfg.name, p.gpu_gb)


def planned_trial(name: str, gb: float, device: str = "cuda") -> PlannedTrial:
    cfg = TrialConfig(name=name, index=0, model="m", dataset="d", r=8, targets="attention", bits=4, device=device)
    return PlannedTrial(cfg, 1, 10, gb)


def test_auto_shares_pack_small_trials_and_refuse_what_cannot_fit(monkeypatch):
    monkeypatch.setattr(cluster, "gpu_memory_gb", lambda: 80.0)
    trials = [planned_trial("small", 18.5), planned_trial("big", 60.0), planned_trial("cpu", 0.0, device="cpu")]
    shares = cluster.gpu_shares(trials, "auto")
    assert shares == {"small": 0.25, "big": 0.77}  # (18.5 + 1.5) / 80 and (60 + 1.5) / 80, rounded up
    assert CUDA_OVERHEAD_GB == 1.5
    assert cluster.gpu_shares(trials, 1.0) == {"small": 1.0, "big": 1.0}
    with pytest.raises(UserError, match="trial huge needs about 81 GiB of GPU memory but the GPUs have 80 GiB"):
        cluster.gpu_shares([planned_trial("huge", 79.5)], "auto")
    resources = cluster.trial_resources(shares)
    param = {"name": "small", "config": {"device": "cuda", "cpus_per_trial": 2}}
    assert resources({"trial": param}) == {"cpu": 2, "gpu": 0.25}
