"""What a space file declares beyond explicit trials: search axes, the search, early stopping and budgets.

    space = Space(
        name="my-search",
        settings=Settings(model=..., dataset=..., eval_every=50),    # held-out eval every 50 steps
        trials=[Trial(r=8, targets="attention", bits=4)],            # seeds: the search evaluates them first
        search=Search(axes={
            "r": IntRange(4, 64, log=True),                          # log-spaced integers, both ends included
            "targets": Choice(["attention", "all_linear", ["q_proj", "k_proj", "v_proj"]]),
            "bits": Choice([4, 8]),
            "alpha_rule": Choice(["fixed", "2r", "rslora"]),         # how lora_alpha follows r
            "learning_rate": FloatRange(5e-5, 1e-3, log=True),
        }, algorithm="tpe", num_samples=24, max_concurrent=4, seed=0),
        early_stopping=ASHA(grace_period=100, reduction_factor=3),  # in optimizer steps
        budget=Budget(wall_hours=2, gpu_hours=6),
    )

Plain declarations, checked by ``sweep.search`` with the file and field in every message. An axis
given a plain value (``"bits": 4``) is fixed, not searched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence


@dataclass(frozen=True)
class Choice:
    """One of ``values``: numbers, strings, true/false, or (for ``targets``) presets and module lists."""

    values: Sequence[Any]


@dataclass(frozen=True)
class IntRange:
    """An integer from ``low`` to ``high``, both included; ``log=True`` samples evenly on a log scale."""

    low: int
    high: int
    log: bool = False


@dataclass(frozen=True)
class FloatRange:
    """A number from ``low`` to ``high``; ``log=True`` samples evenly on a log scale (learning rates)."""

    low: float
    high: float
    log: bool = False


Axis = Choice | IntRange | FloatRange


@dataclass(frozen=True, kw_only=True)
class Search:
    """How trials are chosen: Ray Tune's searcher over ``axes``, started with the space's explicit trials."""

    axes: dict[str, Any]
    """Field name -> Choice / IntRange / FloatRange (searched) or a plain value (fixed). r, targets and bits
    must be given; any other Settings field that does not change the data or the eval may be searched."""
    algorithm: Literal["tpe", "random"] = "tpe"
    """``tpe``: Optuna's TPE through ray.tune.search.optuna (seeded); ``random``: Ray's BasicVariantGenerator."""
    num_samples: int = 8
    """Trials in all, the seeds (the space's explicit trials) included."""
    max_concurrent: int = 0
    """Trials running at once (Ray's ConcurrencyLimiter); 0: as many as the cluster fits. TPE learns only from
    finished trials, so fewer at once means better-informed proposals."""
    seed: int = 0
    """The searcher's seed: the same seed proposes the same first trials."""


@dataclass(frozen=True, kw_only=True)
class ASHA:
    """Ray's ASHAScheduler on the held-out eval loss (Settings.eval_every sets how often it is measured)."""

    grace_period: int
    """Optimizer steps every trial runs before it can be stopped."""
    reduction_factor: float = 3
    """At each rung only the best 1/reduction_factor of the trials seen there continue."""
    brackets: int = 1


@dataclass(frozen=True, kw_only=True)
class MedianStopping:
    """Ray's MedianStoppingRule: stop a trial whose best eval loss is worse than the median of the others'
    running averages at the same step."""

    grace_period: int
    """Optimizer steps every trial runs before it can be stopped."""
    min_samples: int = 3
    """Other trials needed at a step before the rule judges there."""


@dataclass(frozen=True, kw_only=True)
class Budget:
    """Limits on one run of the sweep (an --extend gets the budget the space file gives then). When the wall
    time or GPU hours run out, running trials are stopped cleanly (STOPPED, with their last eval) and
    trials not yet started are not run; the table says which budget ended it."""

    max_trials: int | None = None
    """Trials the sweep may ever start, extensions included (the base row does not count)."""
    wall_hours: float | None = None
    """Wall time of the run, resumes included (Ray's TimeoutStopper keeps what is left in its saved state)."""
    gpu_hours: float | None = None
    """Sum over trials of running time x GPUs held; on CPU-only trials each trial counts as one device."""


EarlyStopping = ASHA | MedianStopping

__all__ = ["ASHA", "Axis", "Budget", "Choice", "EarlyStopping", "FloatRange", "IntRange", "MedianStopping", "Search"]
