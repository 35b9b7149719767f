"""Search spaces: the typed objects a space file declares, and their validation.

A space file is plain Python that assigns ``space = Space(...)``::

    space = Space(
        name="paper-grid",
        settings=Settings(model="openlm-research/open_llama_3b_v2", dataset="...", lora_alpha=8),
        trials=[Trial(r=8, targets="attention", bits=4), *grid(r=[8, 16], targets=["all_linear"], bits=[4, 8])],
    )

``expand`` turns it into a list of frozen ``TrialConfig`` (``trainers/config.py``): the one object
that crosses from the driver to a trial. Every problem is reported as ``file: trial N (name): field 'x': what is wrong``.
A space may also search (``search=Search(...)``; its explicit trials are then the search's seeds), stop
trials early and carry a budget: see ``sweep/axes.py`` and, for their checks, ``sweep/search.py``.
"""

from __future__ import annotations

import dataclasses
import itertools
import runpy
import traceback
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterable, Sequence

from sweep.axes import Budget, EarlyStopping, Search
from sweep.cli import UserError
from trainers.config import Settings, Targets, TrialConfig, name_problem, trial_name

__all__ = ["Settings", "Space", "SpaceError", "Trial", "TrialConfig", "grid", "load_space", "parse_sets", "expand",
           "baseline_of"]


class SpaceError(UserError):
    """Bad search-space input. The message is one line, ready for the user; the CLI exits 2."""


SETTING_FIELDS = {f.name: f for f in fields(Settings)}
MAX_TRIALS = 10_000  # each one a fine-tune: more is a space that never ends (an endless generator)


class Trial:
    """One trial: the three axes of the post, plus any Settings field to override for it alone."""

    def __init__(self, *, r: int, targets: Targets, bits: int, name: str | None = None, **overrides):
        unknown = sorted(set(overrides) - set(SETTING_FIELDS))
        if unknown:
            raise SpaceError(
                f"Trial(...) at this line: unknown field '{unknown[0]}' (fields: r, targets, bits, name, "
                f"{', '.join(SETTING_FIELDS)})"
            )
        self.r, self.bits, self.name = r, bits, name
        self.targets = tuple(targets) if isinstance(targets, (list, tuple)) else targets
        self.overrides = overrides
        self.suffix = ""  # grid's extra axes, named in the trial's default name

    def __repr__(self) -> str:
        return f"Trial(r={self.r!r}, targets={self.targets!r}, bits={self.bits!r})"


def grid(*, r: Sequence[int], targets: Sequence[Targets], bits: Sequence[int], **overrides) -> list[Trial]:
    """The full cross product r x targets x bits, in that nesting order, then crossed with any other setting
    given as a list of values (``loss_on=["all", "completion"]``); settings that are lists or dicts
    themselves (``eval_prompts``, ``columns``) are values, not axes."""
    axes = {k: v for k, v in overrides.items() if isinstance(v, (list, tuple)) and k in SETTING_FIELDS
            and SETTING_FIELDS[k].type not in ("tuple", "dict")}
    fixed = {k: v for k, v in overrides.items() if k not in axes}
    trials = []
    for a, t, b, *values in itertools.product(r, targets, bits, *axes.values()):
        trial = Trial(r=a, targets=t, bits=b, **fixed, **dict(zip(axes, values)))
        trial.suffix = "".join(f"-{k}-{v}" for k, v in zip(axes, values))
        trials.append(trial)
    return trials


@dataclass(frozen=True)
class Space:
    name: str
    settings: Settings
    trials: Sequence[Trial] = ()
    """The trials to run (a grid), or, with ``search``, the points the search evaluates first."""
    search: Search | None = None
    early_stopping: EarlyStopping | None = None
    budget: Budget | None = None


TRIAL_FIELDS = {f.name: f for f in fields(TrialConfig)}
SETTABLE = sorted(set(TRIAL_FIELDS) - {"name", "index", "target_modules", "baseline", "replicate", "config_name"})


def load_space(path: str | Path) -> Space:
    """Run a space file and return its ``space``; any failure becomes a one-line SpaceError."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"space file not found: {path}")
    space = _run_space_file(path, lambda: runpy.run_path(str(path), run_name="__space__")).get("space")
    if not isinstance(space, Space):
        raise SpaceError(f"{path}: must assign `space = Space(...)` (found {type(space).__name__})")
    if (problem := name_problem(space.name)) is not None:
        raise SpaceError(f"{path}: Space.name {_shown(space.name)} {problem}")
    if not isinstance(space.settings, Settings):
        raise SpaceError(f"{path}: Space.settings must be a Settings(...)")
    trials = space.trials
    if not isinstance(trials, Iterable) or isinstance(trials, (str, bytes)):
        raise SpaceError(f"{path}: Space.trials must be a list of Trial(...) / grid(...)")
    # a generator runs the space file's code here, and an endless one must not hang the driver
    trials = _run_space_file(path, lambda: tuple(itertools.islice(trials, MAX_TRIALS + 1)))
    if len(trials) > MAX_TRIALS:
        raise SpaceError(f"{path}: Space.trials has more than {MAX_TRIALS:,} trials")
    if not all(isinstance(t, Trial) for t in trials):
        raise SpaceError(f"{path}: Space.trials must be a list of Trial(...) / grid(...)")
    if not trials and space.search is None:
        raise SpaceError(f"{path}: Space.trials must be a non-empty list of Trial(...) / grid(...), or give search=")
    return replace(space, trials=trials)


def _run_space_file(path: Path, run):
    """Run (part of) a space file: whatever it raises, even SystemExit or KeyboardInterrupt, becomes a
    SpaceError naming the line, since a space file's only job is to assign ``space``."""
    try:
        return run()
    except SyntaxError as e:
        raise SpaceError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except BaseException as e:  # noqa: BLE001 - a space file is user code; report where it broke
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                     if Path(f.filename).resolve() == path.resolve()), "?")
        if isinstance(e, SpaceError):
            msg = str(e)
        elif isinstance(e, SystemExit):
            msg = f"calls sys.exit({e.code!r}); a space file must only assign `space`"
        else:
            msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise SpaceError(f"{path}:{line}: {' '.join(msg.split())}") from None


def _shown(value) -> str:
    """A value as an error message shows it: repr (so a newline cannot break the one line), shortened."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_sets(pairs: Sequence[str]) -> dict:
    """``--set key=value`` pairs -> typed overrides; unknown keys and bad values raise SpaceError."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep:
            raise SpaceError(f"--set {pair}: expected key=value")
        if key not in SETTABLE:
            raise SpaceError(f"--set {key}: unknown key (known: {', '.join(SETTABLE)})")
        out[key] = _coerce(key, raw.strip())
    return out


def _coerce(key: str, raw: str):
    hint = typing.get_type_hints(TrialConfig)[key]
    if key == "targets":
        return raw if "," not in raw else tuple(s.strip() for s in raw.split(",") if s.strip())
    if key == "columns":  # --set columns=instruction:question,output:answer
        pairs = [p.partition(":") for p in raw.split(",") if p.strip()]
        if not all(sep and k.strip() and v.strip() for k, sep, v in pairs):
            raise SpaceError(f"--set columns={raw}: expected field:column pairs, e.g. columns=output:answer")
        return {k.strip(): v.strip() for k, _, v in pairs}
    try:
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is tuple:
            raise SpaceError(f"--set {key}: takes a list; set it in the space file")
    except ValueError:
        raise SpaceError(f"--set {key}={raw}: expected {hint.__name__}") from None
    return raw


def expand(space: Space, path: str | Path, sets: dict | None = None) -> list[TrialConfig]:
    """Settings + each Trial (+ --set overrides) -> validated TrialConfigs with unique names; a trial with
    ``seeds=N`` > 1 becomes N trials named ``<name>-seed<S>``, one per training seed, sharing ``config_name``."""
    base = dataclasses.asdict(space.settings)
    values = [{**base, **t.overrides, "r": t.r, "targets": t.targets, "bits": t.bits, **(sets or {})}
              for t in space.trials]
    for v in values:
        if isinstance(v["eval_prompts"], list):
            v["eval_prompts"] = tuple(v["eval_prompts"])
    configs = []
    for i, (v, name) in enumerate(zip(values, trial_names(space.trials, values, path))):
        cfg = TrialConfig.build(name=name, index=i, **v)
        shown = _shown(name) if name_problem(name) else name  # a bad name could break the one line
        for fname, msg in cfg.problems():
            raise SpaceError(f"{path}: trial {i} ({shown}): field '{fname}' {msg}")
        configs += seed_repeats(cfg, i, path)
    _check_repeat_names(configs, path)
    return configs


def seed_repeats(cfg: TrialConfig, i: int, path) -> list[TrialConfig]:
    """``cfg`` itself, or with ``seeds=N`` > 1 its N repeats ``<name>-seed<S>``, one per training seed."""
    if cfg.seeds == 1:
        return [cfg]
    repeats = [replace(cfg, name=f"{cfg.name}-seed{cfg.seed + k}", replicate=k, config_name=cfg.name)
               for k in range(cfg.seeds)]
    for fname, msg in repeats[-1].problems():  # the longest name, the highest training seed
        raise SpaceError(f"{path}: trial {i} ({_shown(repeats[-1].name)}, a seed repeat): field '{fname}' {msg}")
    return repeats


def _check_repeat_names(configs: list[TrialConfig], path) -> None:
    """A seed repeat's name (``<name>-seed<S>``) must not be another trial's name, ignoring case."""
    taken: dict[str, TrialConfig] = {}
    for cfg in configs:
        other = taken.setdefault(cfg.name.lower(), cfg)
        if other is not cfg:
            first, second = sorted((other, cfg), key=lambda c: c.replicate == 0 and not c.config_name)
            raise SpaceError(f"{path}: trial {second.index} ({second.name}): field 'name' is already used by trial "
                             f"{first.index}'s seed repeat {first.name}; trial names must differ (ignoring case)")


def trial_names(trials: Sequence[Trial], values: list[dict], path) -> list:
    """Each trial's name: its own, else ``r8-attention-4bit`` (with grid's extra axes: ``-loss_on-all``).
    Names are directories, Ray trials and MLflow runs, so they must differ even on a case-insensitive file
    system: two explicit names that clash are an error; an automatic name that clashes gets ``-<index>`` (and a
    counter, should that be taken too)."""
    taken: dict[str, int] = {}
    for i, t in enumerate(trials):
        if isinstance(t.name, str):
            if t.name.lower() in taken:
                raise SpaceError(f"{path}: trial {i} ({_shown(t.name)}): field 'name' is already used by trial "
                                 f"{taken[t.name.lower()]}; trial names must differ (ignoring case)")
            taken[t.name.lower()] = i
    names = []
    for i, (t, v) in enumerate(zip(trials, values)):
        if t.name is not None:
            names.append(t.name)
            continue
        name = candidate = trial_name(v) + t.suffix
        k = 1
        while candidate.lower() in taken:
            candidate, k = f"{name}-{i}" + (f"-{k}" if k > 1 else ""), k + 1
        taken[candidate.lower()] = i
        names.append(candidate)
    return names


def baseline_of(cfg: TrialConfig) -> TrialConfig:
    """The ``base`` row: the first trial's model, data and bits, no training (one row whatever ``seeds``)."""
    return replace(cfg, name="base", index=-1, baseline=True, replicate=0, config_name="")


