"""Planning: memory estimates against what an H200 measured, and GPU shares for --gpus-per-trial auto."""

from dataclasses import replace

import pytest

from sweep import cluster
from sweep.cli import UserError
from sweep.plan import PlannedTrial, plan
from sweep.space import baseline_of, expand, load_space, parse_sets
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


# steady tokens/s of the fast path on an H200 (python -m sweep.bench, README "Speed"): the same data, so a
# trial's time is inversely proportional to its rate
MEASURED_FAST_RATE = {"r8-attention-4bit": 13041, "r16-attention-4bit": 13230, "r8-all_linear-4bit": 8448,
                      "r8-all_linear-8bit": 7145}


def test_relative_work_orders_the_paper_trials_as_an_h200_timed_them(paper_configs):
    """The work estimate that picks a GPU's long pole (sweep/mps.py) against the measured time per example:
    within 5% for each paper trial, relative to the fastest; the base row trains nothing."""
    from sweep.plan import relative_work

    planned = [p.cfg for p in plan(paper_configs + [baseline_of(paper_configs[0])], PAPER, for_training=False)]
    work = {c.name: relative_work(c) for c in planned}
    assert work.pop("base") == 0.0
    fastest = max(MEASURED_FAST_RATE.values())
    for name, w in work.items():
        predicted = w / min(work.values())
        measured = fastest / MEASURED_FAST_RATE[name]
        assert predicted == pytest.approx(measured, rel=0.05), name
    assert max(work, key=work.get) == "r8-all_linear-8bit"
    long = replace(next(c for c in planned if c.name == "r8-attention-4bit"), epochs=12)
    assert relative_work(long) > work["r8-all_linear-8bit"]  # more steps outweigh cheaper ones


def test_mps_priorities_put_the_long_pole_first_on_a_shared_gpu(paper_configs, tmp_path):
    from sweep import mps

    planned = plan(paper_configs + [baseline_of(paper_configs[0])], PAPER, for_training=False)
    shares = {"base": 0.11, "r8-attention-4bit": 0.19, "r16-attention-4bit": 0.19, "r8-all_linear-4bit": 0.24,
              "r8-all_linear-8bit": 0.25}
    assert mps.client_priorities(planned, shares) == {
        "base": mps.BELOW_NORMAL, "r8-attention-4bit": mps.BELOW_NORMAL, "r16-attention-4bit": mps.BELOW_NORMAL,
        "r8-all_linear-4bit": mps.NORMAL, "r8-all_linear-8bit": mps.NORMAL}  # 4-bit has 84% of the 8-bit's work
    # trials with whole GPUs share nothing; one shared trial has no one to go before
    assert mps.client_priorities(planned, {n: 1.0 for n in shares}) == {}
    assert mps.client_priorities(planned, {"r8-all_linear-8bit": 0.5}) == {}
    # the attention trial has 55% of the 8-bit's work: it gives way
    assert mps.client_priorities(planned, {"r8-attention-4bit": 0.4, "r8-all_linear-8bit": 0.5}) == {
        "r8-attention-4bit": mps.BELOW_NORMAL, "r8-all_linear-8bit": mps.NORMAL}
    # equal work: both normal
    twins = {"r8-attention-4bit": 0.4, "r16-attention-4bit": 0.4, "base": 0.1}
    assert mps.client_priorities(planned, twins) == {"r8-attention-4bit": mps.NORMAL,
                                                     "r16-attention-4bit": mps.NORMAL, "base": mps.BELOW_NORMAL}
    # and each grid trial's Ray config carries its priority to the trial process (trainers.trial.tune_trainable)
    from sweep.plan import SweepPlan
    from sweep.tuner import experiment_space

    sweep_plan = SweepPlan("paper", load_space(PAPER), planned, None, None, 0, "f")
    space = experiment_space(tmp_path, {"trials": None}, sweep_plan, [], shares)[0]
    entries = space["trial"]["grid_search"]
    assert {e["config"]["name"]: e["mps_priority"] for e in entries} == mps.client_priorities(planned, shares)


def test_the_share_line_names_the_long_pole_only_when_the_trials_are_mps_clients(paper_configs, monkeypatch):
    from sweep import driver, mps
    from sweep.plan import SweepPlan

    planned = plan(paper_configs, PAPER, for_training=False)
    sweep_plan = SweepPlan("paper", load_space(PAPER), planned, None, None, 0, "f")
    shares = {"r8-attention-4bit": 0.19, "r16-attention-4bit": 0.19, "r8-all_linear-4bit": 0.24,
              "r8-all_linear-8bit": 0.25}
    shares_text = ("GPU share per trial: r8-attention-4bit 0.19, r16-attention-4bit 0.19, r8-all_linear-4bit 0.24, "
                   "r8-all_linear-8bit 0.25")
    monkeypatch.setattr(mps, "machine_daemon", lambda: None)  # time-sliced: priorities do nothing
    assert driver.share_line(sweep_plan, shares, None) == shares_text
    monkeypatch.setattr(mps, "machine_daemon", lambda: "/tmp/lora-sweep-mps-0-abc")
    assert driver.share_line(sweep_plan, shares, None) == (
        shares_text + " (r8-all_linear-4bit, r8-all_linear-8bit first under MPS)")
    assert driver.share_line(sweep_plan, shares, "10.0.0.1:6379") == shares_text  # the nodes' MPS is not known here
