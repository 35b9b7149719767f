"""Which Ray Tune experiments a sweep runs: those of a new sweep, and those an --extend adds.

A sweep is a list of experiments in its manifest, each a directory of its own under the sweep
directory, run (or, when interrupted, restored) in order:

  tune/               the explicit trials (a grid) and the base row; for a search, the base row only
  tune-search/        a search: its seeds first, then what the searcher proposes
  tune-ext1/, ...     an --extend's new explicit trials
  tune-search-ext1/   an --extend's further samples: the searcher is told every earlier result first

--extend grows a sweep to what its space file now declares (more ``num_samples``, new trials): the
trials already declared keep their results (found by fingerprint for explicit trials, and as the
searcher's evaluated points for samples), only the new ones run. It is idempotent: run the same
command again and it resumes, or finds nothing to add. Nothing here imports Ray.
"""

from __future__ import annotations

from sweep.cli import UserError
from sweep.plan import SweepPlan
from sweep.sweepdir import TUNE_DIR

SEARCH_DIR = "tune-search"


def _cap(plan: SweepPlan, wanted: int, started: int) -> int:
    """Budget.max_trials: trials the sweep may ever start (the base row does not count)."""
    budget = plan.space.budget
    cap = budget.max_trials if budget is not None and budget.max_trials else None
    return wanted if cap is None else max(0, min(wanted, cap - started))


def first_experiments(plan: SweepPlan) -> list[dict]:
    base = [p.cfg.fingerprint for p in plan.planned if p.cfg.baseline]
    if plan.spec is None:
        explicit = [p.cfg.fingerprint for p in plan.explicit][:_cap(plan, len(plan.explicit), 0)]
        return [{"name": TUNE_DIR, "trials": base + explicit, "finished": False}]
    grid = [{"name": TUNE_DIR, "trials": base, "finished": False}] if base else []
    samples = _cap(plan, plan.num_samples, 0)
    return grid + [{"name": SEARCH_DIR, "samples": samples, "offset": 0, "seeds": plan.spec.seeds[:samples],
                    "finished": False}]


def declared(experiments: list[dict], key: str) -> list:
    return [x for e in experiments for x in (e.get(key) or [])]


def extension(manifest: dict, plan: SweepPlan, experiments: list[dict]) -> list[dict]:
    """The experiments an --extend adds to a sweep whose space file now declares ``plan``; [] if none."""
    n = 1 + sum(e["name"].startswith(("tune-ext", SEARCH_DIR + "-ext")) for e in experiments)
    if plan.spec is None:
        if manifest.get("search_identity"):
            raise UserError("--extend: the sweep is a search but the space file no longer declares one")
        old, new = set(declared(experiments, "trials")), [p.cfg.fingerprint for p in plan.explicit]
        gone = old - set(new) - {p.cfg.fingerprint for p in plan.planned if p.cfg.baseline}
        if gone:
            raise UserError(f"--extend: {len(gone)} trial(s) of the sweep are no longer declared in "
                            f"{plan.space.name}'s space file, or their settings changed: extending only adds trials")
        candidates = [f for f in new if f not in old]
        added = candidates[:_cap(plan, len(candidates), len([f for f in old if f in new]))]
        return [{"name": f"tune-ext{n}", "trials": added, "finished": False}] if added else []
    if manifest.get("search_identity") != plan.spec.identity():
        raise UserError("--extend: the search changed (its axes, shared settings, algorithm or seed); an extension "
                        "may only raise num_samples and add seed trials")
    samples = sum(e.get("samples", 0) for e in experiments)
    more = plan.num_samples - samples
    if more < 0:
        raise UserError(f"--extend: num_samples {plan.num_samples} is below the {samples} the sweep already has")
    seeds = [p for p in plan.spec.seeds if p not in declared(experiments, "seeds")]
    if more < len(seeds):
        raise UserError(f"--extend: {len(seeds)} new seed trial(s) need num_samples of at least {samples + len(seeds)}")
    more = _cap(plan, more, samples)
    if not more:
        return []
    return [{"name": f"{SEARCH_DIR}-ext{n}", "samples": more, "offset": samples, "seeds": seeds[:more],
             "finished": False}]
