"""Search spaces: the typed objects a space file declares, and their validation.

A space file is plain Python that assigns ``space = Space(...)``::

    space = Space(
        name="paper-grid",
        settings=Settings(model="openlm-research/open_llama_3b_v2", dataset="...", lora_alpha=8),
        trials=[Trial(r=8, targets="attention", bits=4), *grid(r=[8, 16], targets=["all_linear"], bits=[4, 8])],
    )

``expand`` turns it into a list of frozen ``TrialConfig``: the one object that crosses from the
driver to a trial. Every problem is reported as ``file: trial N (name): field 'x': what is wrong``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import runpy
import traceback
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal, Sequence, Union

TARGET_PRESETS = ("attention", "all_linear")
BITS = (4, 8, 16)
Targets = Union[str, tuple[str, ...]]


class SpaceError(Exception):
    """Bad search-space input. The message is one line, ready for the user; the CLI exits 2."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Values shared by every trial of a sweep; a Trial may override any of them."""

    model: str
    """Hub id, local checkpoint directory, or ``random:<bundled config>`` (seeded random weights)."""
    dataset: str
    """Hub dataset id, a local .jsonl/.csv/.parquet file, or ``bundled:products-400``."""
    device: Literal["cuda", "cpu"] = "cuda"
    """``cuda``: each trial gets its own GPU(s) through Ray. ``cpu``: trials request CPUs only."""
    lora_alpha: float = 8
    lora_dropout: float = 0.05
    learning_rate: float = 2e-4
    epochs: float = 3
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_length: int = 256
    train_samples: int = 5000
    """Rows sampled (with ``seed``) from the dataset before the train/test split."""
    test_fraction: float = 0.1
    seed: int = 42
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    max_new_tokens: int = 128
    """Generation length for the quality prompts (the post used 128)."""
    heldout_prompts: int = 3
    """Test-split rows generated for, besides the post's two prompts, to score ROUGE-L."""
    cpus_per_trial: int = 1
    checkpoint_every: int = 50
    """Optimizer steps between trial checkpoints (adapter, optimizer, scheduler, RNG, step): an
    interrupted trial resumes from its latest one instead of step 0."""
    trust_remote_code: bool = False
    """Off unless a space turns it on: remote code runs with the trial's permissions."""


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
    trials: Sequence[Trial]


@dataclass(frozen=True, kw_only=True)
class TrialConfig(Settings):
    """Everything one trial needs, fully resolved. Built by ``expand``; read by ``trainers``."""

    name: str
    index: int
    r: int
    targets: Targets
    bits: int
    target_modules: tuple[str, ...] = ()
    """Module names the preset resolved to on this model; filled in by the driver's plan step."""
    baseline: bool = False
    """The base model before fine-tuning: evaluated and generated for exactly like a trial, never trained."""

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for every invalid value; empty when the config is valid."""
        out = []

        def check(name, ok, msg):
            if not ok:
                out.append((name, f"{msg}, got {getattr(self, name)!r}"))

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        check("r", is_int(self.r) and self.r > 0, "must be a positive integer")
        check("bits", self.bits in BITS and is_int(self.bits), "must be one of 4, 8, 16")
        if isinstance(self.targets, str):
            check("targets", self.targets in TARGET_PRESETS,
                  "must be a preset (attention, all_linear) or a list of module names")
        else:
            check("targets", len(self.targets) > 0 and all(isinstance(t, str) and t for t in self.targets),
                  "must be a non-empty list of module names")
        check("model", isinstance(self.model, str) and self.model.strip() != "", "must be a non-empty string")
        check("dataset", isinstance(self.dataset, str) and self.dataset.strip() != "", "must be a non-empty string")
        check("device", self.device in ("cuda", "cpu"), "must be 'cuda' or 'cpu'")
        check("lora_alpha", is_num(self.lora_alpha) and self.lora_alpha > 0, "must be a positive number")
        check("lora_dropout", is_num(self.lora_dropout) and 0 <= self.lora_dropout < 1, "must be in [0, 1)")
        check("learning_rate", is_num(self.learning_rate) and self.learning_rate > 0, "must be a positive number")
        check("epochs", is_num(self.epochs) and self.epochs > 0, "must be a positive number")
        check("test_fraction", is_num(self.test_fraction) and 0 < self.test_fraction < 1, "must be in (0, 1)")
        for name in ("batch_size", "grad_accum", "logging_steps", "max_new_tokens", "cpus_per_trial",
                     "checkpoint_every"):
            check(name, is_int(getattr(self, name)) and getattr(self, name) >= 1, "must be an integer >= 1")
        check("max_seq_length", is_int(self.max_seq_length) and self.max_seq_length >= 16, "must be an integer >= 16")
        check("train_samples", is_int(self.train_samples) and self.train_samples >= 10, "must be an integer >= 10")
        check("heldout_prompts", is_int(self.heldout_prompts) and self.heldout_prompts >= 0, "must be an integer >= 0")
        check("seed", is_int(self.seed), "must be an integer")
        for name in ("gradient_checkpointing", "trust_remote_code"):
            check(name, isinstance(getattr(self, name), bool), "must be true or false")
        return out

    @property
    def targets_label(self) -> str:
        return self.targets if isinstance(self.targets, str) else ",".join(self.targets)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def fingerprint(self) -> str:
        """Identity of this trial across restarts: ledger key and MLflow tag."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> "TrialConfig":
        d = dict(d)
        for key in ("targets", "target_modules"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)


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
    if not space.trials or not all(isinstance(t, Trial) for t in space.trials):
        raise SpaceError(f"{path}: Space.trials must be a non-empty list of Trial(...) / grid(...)")
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
        label = values["targets"] if isinstance(values["targets"], str) else "custom"
        name = t.name or f"r{values['r']}-{label}-{values['bits']}bit"
        if name in seen:
            name = f"{name}-{i}"
        seen.add(name)
        cfg = TrialConfig(name=name, index=i, **values)
        for fname, msg in cfg.problems():
            raise SpaceError(f"{path}: trial {i} ({name}): field '{fname}' {msg}")
        configs.append(cfg)
    return configs


def sweep_fingerprint(configs: Sequence[TrialConfig]) -> str:
    """Identity of a whole sweep: the space file's trials after --set. Resume refuses a mismatch."""
    return hashlib.sha256("|".join(c.fingerprint for c in configs).encode()).hexdigest()[:16]


def baseline_of(cfg: TrialConfig) -> TrialConfig:
    """The ``base`` row: the first trial's model, data and bits, no training."""
    return replace(cfg, name="base", index=-1, baseline=True)


