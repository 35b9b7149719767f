"""A space's search, early stopping and budget, checked before anything starts (no Ray here).

``resolve_search`` turns ``Space.search`` into a ``SearchSpec``: the searched axes (``targets`` choices
as the strings a searcher samples), the values every sampled trial shares, and the seeds (the space's
explicit trials, as points of the space). ``sweep/searchers.py`` builds Ray Tune's objects from it.
Every problem names the file and the axis, trial or field, in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass

from sweep.axes import ASHA, Axis, Budget, Choice, FloatRange, IntRange, MedianStopping, Search
from sweep.space import SETTABLE, Space, SpaceError
from trainers.config import TrialConfig, identity, targets_from_label, targets_label, trial_name

# Settings a search may not vary, and why: trials must stay comparable on one held-out split and eval.
NOT_SEARCHABLE = {
    **dict.fromkeys(("model", "dataset", "train_samples", "test_fraction", "seed", "max_seq_length"),
                    "it changes the model or the held-out data, so eval losses would not compare"),
    **dict.fromkeys(("max_new_tokens", "heldout_prompts"), "it changes the evaluation, so trials would not compare"),
    **dict.fromkeys(("device", "cpus_per_trial", "trust_remote_code", "seeds"), "it is not a hyperparameter"),
    **dict.fromkeys(("eval_every", "checkpoint_every", "logging_steps"),
                    "it schedules the trial, it does not train it"),
    **dict.fromkeys(("data_format", "columns", "template", "chat_template", "end_marker", "eval_prompts",
                     "dataset_split", "dataset_subset"),
                    "it changes the data or the evaluation, so eval losses would not compare"),
    # The searcher and the early-stopping rungs rank trials by eval_loss as they go, and eval_loss is taken on
    # the tokens loss_on names: a loss_on axis belongs to an explicit grid, whose table compares on response_loss.
    "loss_on": "trials taking their loss on different tokens have eval losses that do not compare; cross it in "
               "a grid(..., loss_on=[...]) instead, whose table compares them on the response loss",
}
SEARCHABLE = [f for f in SETTABLE if f not in NOT_SEARCHABLE]
REQUIRED = ("r", "targets", "bits")
HINTS = typing.get_type_hints(TrialConfig)


@dataclass(frozen=True)
class SearchSpec:
    """A checked search: what Ray Tune's searcher samples and what every sampled trial shares."""

    search: Search
    axes: dict[str, Axis]
    """The searched axes; ``targets`` choices are labels (a preset, or module names joined by commas)."""
    fixed: dict
    """Every other TrialConfig value: the settings, the axes given a plain value, --set."""
    seeds: list[dict]
    """The space's explicit trials as points (axis -> value), evaluated first."""

    @property
    def target_labels(self) -> list[str]:
        axis = self.axes.get("targets")
        return list(axis.values) if axis else [targets_label(self.fixed["targets"])]

    def identity(self) -> str:
        """What an --extend must keep: the shared values, the axes, the algorithm and its seed."""
        return _digest({"fixed": identity(self.fixed), "axes": self.axes, "algorithm": self.search.algorithm,
                        "seed": self.search.seed})


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def space_fingerprint(configs: list[TrialConfig], space: Space, spec: SearchSpec | None, num_samples: int) -> str:
    """Identity of a whole sweep: its explicit trials after --set, and its search, early stopping and budget.
    Resume refuses a mismatch (Ray Tune restores the sweep as it was started)."""
    extra = {"search": spec and spec.identity(), "samples": num_samples if spec else 0,
             "concurrent": spec and spec.search.max_concurrent, "stop": space.early_stopping, "budget": space.budget}
    searched = spec or space.early_stopping or space.budget
    parts = [c.fingerprint for c in configs] + ([_digest(extra)] if searched else [])
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def resolve_search(space: Space, path, sets: dict) -> SearchSpec:
    s, where = space.search, f"{path}: Search"
    if not isinstance(s, Search):
        raise SpaceError(f"{where} must be a Search(...)")
    _check_search_options(s, where)
    if not isinstance(s.axes, dict) or not all(isinstance(k, str) for k in s.axes):
        raise SpaceError(f"{where}.axes must be a dict of field name -> Choice / IntRange / FloatRange or a value")
    for name in s.axes:
        if name in NOT_SEARCHABLE:
            raise SpaceError(f"{where}.axes['{name}']: '{name}' cannot be searched: {NOT_SEARCHABLE[name]}")
        if name not in SEARCHABLE:
            raise SpaceError(f"{where}.axes['{name}']: unknown field (searchable: {', '.join(SEARCHABLE)})")
    missing = [n for n in REQUIRED if n not in s.axes]
    if missing:
        raise SpaceError(f"{where}.axes must give {', '.join(missing)} (a value, or a Choice / IntRange to search)")
    searched = {n: a for n, a in s.axes.items() if isinstance(a, (Choice, IntRange, FloatRange))}
    if not searched:
        raise SpaceError(f"{where}.axes searches nothing: give at least one axis a Choice, IntRange or FloatRange")
    clash = sorted(set(sets) & set(searched))
    if clash:
        raise SpaceError(f"--set {clash[0]}: '{clash[0]}' is a search axis in {path}; change its range there")
    axes = {n: _check_axis(n, a, f"{where}.axes['{n}']") for n, a in searched.items()}
    constants = {n: (tuple(v) if n == "targets" and isinstance(v, list) else v)
                 for n, v in s.axes.items() if n not in searched}
    fixed = {**dataclasses.asdict(space.settings), **constants, **sets}
    if fixed.get("seeds", 1) != 1:  # a repeat over training seeds is a grid's: a searcher would see one config N times
        raise SpaceError(f"{path}: seeds={fixed['seeds']} repeats a grid's trials over training seeds; a search runs "
                         "each sample once (list the configurations to repeat as Trials, without a Search)")
    _check_values(axes, fixed, path)
    seeds = [_seed_point(i, t, axes, fixed, path) for i, t in enumerate(space.trials)]
    if s.num_samples < len(seeds):
        raise SpaceError(f"{where}.num_samples {s.num_samples} is fewer than its {len(seeds)} seed trials")
    return SearchSpec(s, axes, fixed, seeds)


def _check_search_options(s: Search, where: str) -> None:
    if s.algorithm not in ("tpe", "random"):
        raise SpaceError(f"{where}.algorithm must be 'tpe' or 'random', got {s.algorithm!r}")
    for name, low in (("num_samples", 1), ("max_concurrent", 0)):
        value = getattr(s, name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            raise SpaceError(f"{where}.{name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(s.seed, int) and not isinstance(s.seed, bool)):
        raise SpaceError(f"{where}.seed must be an integer, got {s.seed!r}")


def _check_axis(name: str, axis: Axis, where: str) -> Axis:
    """The axis in the form a searcher samples; its shape and type checked against the field."""
    hint = HINTS[name]
    if isinstance(axis, Choice):
        values = list(axis.values) if isinstance(axis.values, (list, tuple)) else None
        if not values:
            raise SpaceError(f"{where}: Choice needs a non-empty list of values")
        if name == "targets":
            values = [targets_label(tuple(v) if isinstance(v, (list, tuple)) else v) for v in values]
        if not all(isinstance(v, (str, int, float, bool)) for v in values):
            raise SpaceError(f"{where}: choices must be numbers, strings or true/false, got {values!r}")
        if len(set(map(repr, values))) < len(values):
            raise SpaceError(f"{where}: choices repeat a value: {values!r}")
        return Choice(values)
    if name in ("targets", "bits", "alpha_rule") or hint is bool:
        raise SpaceError(f"{where}: '{name}' takes a Choice of values, not a range")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  for v in (axis.low, axis.high))
    if not numbers or not axis.low < axis.high:
        raise SpaceError(f"{where}: needs numbers low < high, got low={axis.low!r}, high={axis.high!r}")
    if isinstance(axis, IntRange) and not all(isinstance(v, int) for v in (axis.low, axis.high)):
        raise SpaceError(f"{where}: IntRange needs integer ends, got {axis.low!r}, {axis.high!r}")
    if isinstance(axis, FloatRange) and hint is int:
        raise SpaceError(f"{where}: '{name}' is an integer field: use IntRange or Choice")
    if axis.log and axis.low <= 0:
        raise SpaceError(f"{where}: a log-scale range needs low > 0, got {axis.low!r}")
    return axis


def axis_values(axis: Axis) -> list:
    """The values that bound an axis: every choice, or a range's two ends."""
    return list(axis.values) if isinstance(axis, Choice) else [axis.low, axis.high]


def _config(values: dict, name: str = "check", index: int = 0) -> TrialConfig:
    values = dict(values)
    if isinstance(values.get("targets"), str):
        values["targets"] = targets_from_label(values["targets"])
    return TrialConfig.build(name=name, index=index, **values)


def _check_values(axes: dict[str, Axis], fixed: dict, path) -> None:
    """Every bound of every axis, with the others at their first value, makes a valid config."""
    first = {n: axis_values(a)[0] for n, a in axes.items()}
    for fname, msg in _config({**fixed, **first}).problems():
        if fname not in axes:
            raise SpaceError(f"{path}: field '{fname}' {msg}")
    for name, axis in axes.items():
        for value in axis_values(axis):
            for fname, msg in _config({**fixed, **first, name: value}).problems():
                if fname == name:
                    raise SpaceError(f"{path}: Search.axes['{name}']: value {value!r}: {msg.split(', got')[0]}")


def _in_axis(axis: Axis, value) -> bool:
    if isinstance(axis, Choice):
        return any(value == v and type(value) is type(v) or (_num(value) and _num(v) and value == v)
                   for v in axis.values)
    if isinstance(axis, IntRange) and not (isinstance(value, int) and not isinstance(value, bool)):
        return False
    return _num(value) and axis.low <= value <= axis.high


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _seed_point(i: int, trial, axes: dict[str, Axis], fixed: dict, path) -> dict:
    """An explicit trial of a search space as a point: its own values, the settings' for the rest."""
    values = {**trial.overrides, "r": trial.r, "targets": trial.targets, "bits": trial.bits}
    where = f"{path}: trial {i} ({trial.name or 'seed'})"
    for name, value in values.items():
        if name in axes:
            continue
        given = targets_label(value) if name == "targets" else value
        if given != (targets_label(fixed[name]) if name == "targets" else fixed[name]):
            raise SpaceError(f"{where}: field '{name}' is not searched (fixed at {fixed[name]!r}): a seed of a "
                             "search sets only searched axes")
    point = {}
    for name, axis in axes.items():
        value = values[name] if name in values else fixed[name]
        value = targets_label(value) if name == "targets" else value
        if not _in_axis(axis, value):
            raise SpaceError(f"{where}: field '{name}' {value!r} is outside the search axis {axis}")
        point[name] = value
    return point


def corner_configs(spec: SearchSpec) -> list[TrialConfig]:
    """Each targets choice at the largest r: what the plan step resolves (module names), counts (trainable
    parameters are linear in r) and sizes (GPU memory, with every bits choice: ``bits_choices``)."""
    first = {n: axis_values(a)[0] for n, a in spec.axes.items()}
    r = max(axis_values(spec.axes["r"])) if "r" in spec.axes else spec.fixed["r"]
    return [_config({**spec.fixed, **first, "targets": label, "r": r}, name=f"targets={label} r={r}", index=i)
            for i, label in enumerate(spec.target_labels)]


def bits_choices(spec: SearchSpec) -> tuple[int, ...]:
    return tuple(axis_values(spec.axes["bits"])) if "bits" in spec.axes else (spec.fixed["bits"],)


def max_steps(values: dict, axes: dict[str, Axis] | None = None) -> int:
    """An upper bound on a trial's optimizer steps (the longest corner of the axes): what ASHA's rungs span."""
    pick = {"epochs": max, "batch_size": min, "grad_accum": min}
    v = {k: pick[k](axis_values(axes[k])) if axes and k in axes else values[k] for k in pick}
    train = values["train_samples"] - math.ceil(values["train_samples"] * values["test_fraction"])
    return max(1, math.ceil(train / (v["batch_size"] * v["grad_accum"])) * math.ceil(v["epochs"]))


def check_schedule(space: Space, path, configs: list[TrialConfig], spec: SearchSpec | None) -> None:
    """Early stopping needs a periodic eval to read and room to stop in; budgets need positive limits."""
    stop, budget = space.early_stopping, space.budget
    if stop is not None:
        if not isinstance(stop, (ASHA, MedianStopping)):
            raise SpaceError(f"{path}: Space.early_stopping must be ASHA(...) or MedianStopping(...)")
        values = [spec.fixed] if spec else [c.to_dict() for c in configs if not c.baseline]
        if not all(v["eval_every"] > 0 for v in values):
            raise SpaceError(f"{path}: Space.early_stopping needs Settings(eval_every=N): the held-out eval it reads")
        longest = max(max_steps(v, spec.axes if spec else None) for v in values)
        g = stop.grace_period
        if not (isinstance(g, int) and not isinstance(g, bool) and 1 <= g <= longest):
            raise SpaceError(f"{path}: {type(stop).__name__}.grace_period must be an integer from 1 to the trials' "
                             f"{longest} optimizer steps, got {g!r}")
        if isinstance(stop, ASHA) and not (_num(stop.reduction_factor) and stop.reduction_factor > 1
                                           and isinstance(stop.brackets, int) and stop.brackets >= 1):
            raise SpaceError(f"{path}: ASHA needs reduction_factor > 1 and brackets >= 1")
        if isinstance(stop, MedianStopping) and not (isinstance(stop.min_samples, int) and stop.min_samples >= 1):
            raise SpaceError(f"{path}: MedianStopping.min_samples must be an integer >= 1")
    if budget is not None:
        if not isinstance(budget, Budget):
            raise SpaceError(f"{path}: Space.budget must be a Budget(...)")
        for name in ("max_trials", "wall_hours", "gpu_hours"):
            value = getattr(budget, name)
            ok = value is None or (_num(value) and math.isfinite(value) and value > 0
                                   and (name != "max_trials" or isinstance(value, int)))
            if not ok:
                kind = "integer" if name == "max_trials" else "number"
                raise SpaceError(f"{path}: Budget.{name} must be a positive {kind}, got {value!r}")


def seed_configs(spec: SearchSpec) -> list[TrialConfig]:
    """The seeds as configs (for the dry run's table), named as the search will name them."""
    return [_config({**spec.fixed, **p}, name=trial_name({**spec.fixed, **p}, i + 1), index=i + 1)
            for i, p in enumerate(spec.seeds)]
