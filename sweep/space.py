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
from typing import Sequence

from sweep.axes import Budget, EarlyStopping, Search
from sweep.cli import UserError
from trainers.config import Settings, Targets, TrialConfig, trial_name

__all__ = ["Settings", "Space", "SpaceError", "Trial", "TrialConfig", "grid", "load_space", "parse_sets", "expand",
           "baseline_of"]


class SpaceError(UserError):
    """Bad search-space input. The message is one line, ready for the user; the CLI exits 2."""


SETTING_FIELDS = {f.name: f for f in fields(Settings)}


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

    def __repr__(self) -> str:
        return f"Trial(r={self.r!r}, targets={self.targets!r}, bits={self.bits!r})"


def grid(*, r: Sequence[int], targets: Sequence[Targets], bits: Sequence[int], **overrides) -> list[Trial]:
    """The full cross product r x targets x bits, in that nesting order."""
    return [Trial(r=a, targets=t, bits=b, **overrides) for a, t, b in itertools.product(r, targets, bits)]


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
SETTABLE = sorted(set(TRIAL_FIELDS) - {"name", "index", "target_modules", "baseline"})


def load_space(path: str | Path) -> Space:
    """Run a space file and return its ``space``; any failure becomes a one-line SpaceError."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"space file not found: {path}")
    try:
        module = runpy.run_path(str(path), run_name="__space__")
    except SyntaxError as e:
        raise SpaceError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - a space file is user code; report where it broke
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                     if Path(f.filename).resolve() == path.resolve()), "?")
        msg = str(e) if isinstance(e, SpaceError) else f"{type(e).__name__}: {e}"
        raise SpaceError(f"{path}:{line}: {msg}") from None
    space = module.get("space")
    if not isinstance(space, Space):
        raise SpaceError(f"{path}: must assign `space = Space(...)` (found {type(space).__name__})")
    if not isinstance(space.settings, Settings):
        raise SpaceError(f"{path}: Space.settings must be a Settings(...)")
    if not isinstance(space.trials, (list, tuple)) or not all(isinstance(t, Trial) for t in space.trials):
        raise SpaceError(f"{path}: Space.trials must be a list of Trial(...) / grid(...)")
    if not space.trials and space.search is None:
        raise SpaceError(f"{path}: Space.trials must be a non-empty list of Trial(...) / grid(...), or give search=")
    return space


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
    try:
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
    except ValueError:
        raise SpaceError(f"--set {key}={raw}: expected {hint.__name__}") from None
    return raw


def expand(space: Space, path: str | Path, sets: dict | None = None) -> list[TrialConfig]:
    """Settings + each Trial (+ --set overrides) -> validated TrialConfigs with unique names."""
    base = dataclasses.asdict(space.settings)
    configs, seen = [], set()
    for i, t in enumerate(space.trials):
        values = {**base, **t.overrides, "r": t.r, "targets": t.targets, "bits": t.bits, **(sets or {})}
        name = t.name or trial_name(values)
        if name in seen:
            name = f"{name}-{i}"
        seen.add(name)
        cfg = TrialConfig.build(name=name, index=i, **values)
        for fname, msg in cfg.problems():
            raise SpaceError(f"{path}: trial {i} ({name}): field '{fname}' {msg}")
        configs.append(cfg)
    return configs


def baseline_of(cfg: TrialConfig) -> TrialConfig:
    """The ``base`` row: the first trial's model, data and bits, no training."""
    return replace(cfg, name="base", index=-1, baseline=True)


