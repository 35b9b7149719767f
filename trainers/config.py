"""The contract between the driver and one trial: what crosses in (``TrialConfig``, and how a Ray Tune
config becomes one), what comes back (``StepReport``, ``EvalReport``, ``CheckpointReport``, ``TrialResult``)
and the files a trial leaves behind.

This module is the bottom of the project: ``sweep/`` and ``trainers/`` import it, it imports nothing
of ours (and neither torch nor Ray), so validation and ``--dry-run`` stay fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import string
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Union

TARGET_PRESETS = ("attention", "all_linear")
BITS = (4, 8, 16)
ALPHA_RULES = ("fixed", "r", "2r", "rslora")
Targets = Union[str, tuple[str, ...]]

# What a trial leaves in its result directory (reported to Ray Tune as its final checkpoint).
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
GENERATIONS_JSON = "generations.json"
GENERATIONS_MD = "generations.md"
CONFIG_FILE = "config.json"
HELDOUT_FILE = "heldout.json"  # per-example held-out losses: the table's paired comparisons need them
RESULT_FILES = (GENERATIONS_MD, GENERATIONS_JSON, METRICS_FILE, CONFIG_FILE, HELDOUT_FILE)


def perplexity(eval_loss: float) -> float:
    """exp(eval loss), capped so a diverged trial's table row stays a number."""
    return math.exp(min(eval_loss, 50.0))


def is_quantized(bits: int) -> bool:
    """4 and 8 bits mean a bitsandbytes-quantized frozen base; 16 means the plain one."""
    return bits in (4, 8)


CUDA_OVERHEAD_GB = 1.5
"""GPU memory a trial process uses beyond PyTorch's allocations (CUDA context, cuBLAS workspace): the
driver adds it to each trial's estimate, a trial on a shared GPU leaves it out of its own cap."""
# In PyTorch's CUDA out-of-memory message only when a per-process memory fraction is set: the trial ran out of its
# share's cap (trainers.trial.limit_gpu_memory), not of a GPU that others filled; the same share runs out again.
OOM_CAPPED = " allowed;"
OOM_NOT_AGAIN = "(as when this trial ran before at this share: not run again)"
# NVIDIA MPS: where a client finds its control daemon (the variable, else the machine's default directory)
MPS_PIPE_ENV, MPS_MACHINE_PIPE = "CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"
MPS_PRIORITY_ENV = "CUDA_MPS_CLIENT_PRIORITY"  # 0 normal, 1 below normal (sweep/mps.py)


def mps_daemon() -> str | None:
    """The MPS control daemon a CUDA process started now would be a client of, described (the variable,
    else the machine's default directory when a daemon listens there); None: it would not be a client. The
    driver asks before it starts one of its own (sweep/mps.py), a trial when it records how it had its GPU."""
    if os.environ.get(MPS_PIPE_ENV):
        return f"{MPS_PIPE_ENV}={os.environ[MPS_PIPE_ENV]}"
    if os.path.exists(os.path.join(MPS_MACHINE_PIPE, "control")):
        return MPS_MACHINE_PIPE
    return None


# ---- data formats (README "Your own data"; rendering in trainers/formats.py) ------------------------------------

# Each format's fields: the dataset columns it reads (renamed by Settings.columns); the last one of the
# prompt/response formats is the response, the text the model learns to write.
FORMAT_FIELDS = {"post": ("product", "category", "description"), "alpaca": ("instruction", "input", "output"),
                 "prompt_completion": ("prompt", "completion"), "messages": ("messages",), "text": ("text",)}
OPTIONAL_FIELDS = ("input",)  # alpaca's input: a missing, null or empty one means "no input"
CHAT = "chat"  # Settings.template: render through the tokenizer's chat template
POST_END_MARKER = "### End"
LOSS_ON = {"post": ("all", "completion"), "alpaca": ("all", "completion"), "prompt_completion": ("all", "completion"),
           "messages": ("all", "assistant"), "text": ("all",)}


def template_fields(template: str) -> tuple[str, ...] | None:
    """The named fields of a format string, in order; None when it is not one (positional ``{}``, ``{a.b}``,
    unbalanced braces)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError:
        return None
    return tuple(dict.fromkeys(names)) if all(n.isidentifier() for n in names) else None


def compute_dtype_name(device: str) -> str:
    """bf16 on CUDA (the post's A100 and our H200s), fp32 on the CPU, where bf16 matmuls are slow."""
    return "bfloat16" if device == "cuda" else "float32"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Values shared by every trial of a sweep; a Trial may override any of them."""

    model: str
    """Hub id, local checkpoint directory, ``bundled:desc-llama`` (the demo's small pretrained base, shipped
    with its weights) or ``random:<bundled config>`` (seeded random weights)."""
    dataset: str
    """Hub dataset id, a local .jsonl/.csv/.parquet file, or ``bundled:products-400``."""
    device: Literal["cuda", "cpu"] = "cuda"
    """``cuda``: each trial gets its own GPU(s) through Ray. ``cpu``: trials request CPUs only."""
    lora_alpha: float = 8
    alpha_rule: Literal["fixed", "r", "2r", "rslora"] = "fixed"
    """How lora_alpha follows r: ``fixed`` (scaling alpha/r), ``r`` or ``2r`` (alpha set to r or 2r, scaling 1
    or 2), ``rslora`` (alpha fixed, scaling alpha/sqrt(r): rank-stabilized LoRA, PEFT's use_rslora)."""
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
    """Seeds the data sample and train/test split, a ``random:`` base's weights, and training."""
    seeds: int = 1
    """Train every trial this many times, with training seeds ``seed``, ``seed + 1``, ...: the LoRA
    initialisation, dropout and data order change, the data split and the base do not, so the repeats
    are measured on the same held-out examples and the table can report mean +- spread over seeds."""
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
    eval_every: int = 0
    """Optimizer steps between held-out evals during training, each reported to Ray Tune (what early stopping
    reads) with a checkpoint holding the adapter of that step, and streamed to MLflow. 0: only the final eval."""
    trust_remote_code: bool = False
    """Off unless a space turns it on: remote code runs with the trial's permissions."""
    trainer: Literal["fast", "reference"] = "fast"
    """``fast``: each optimizer step's ``batch_size x grad_accum`` examples in one padding-free micro-batch.
    ``reference``: TRL's default path (padded micro-batches of ``batch_size``, accumulated). Same examples,
    order, schedule and loss normalization either way; ``reference`` re-checks the fast path's fidelity."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: train the full ``epochs``); for quick checks and benchmarks."""
    fast_kbit: bool = True
    """Fast path with a 4/8-bit base: keep a 16-bit copy of the frozen weights (+2 bytes a parameter) so
    no step dequantizes them again, run LLM.int8 without its host syncs (``trainers/kbit.py``), and keep the
    unquantized layers in the compute dtype where PEFT upcasts them to fp32 (``trainers.models.prepare_kbit``)."""
    compile: bool = False
    """Fast path: ``torch.compile`` each decoder layer for training (``trainers/compiling.py``); evaluation and
    generation stay eager. Costs a compile per trial (cached on disk for the next trial of the same shape)."""
    data_format: Literal["post", "alpaca", "prompt_completion", "messages", "text"] = "post"
    """How a row becomes a training example: ``post`` (product, category, description, in the post's
    instruction and template), ``alpaca`` (instruction, input, output), ``prompt_completion``, ``messages``
    (a conversation, rendered with the chat template) or ``text`` (trained on as it is)."""
    columns: dict = field(default_factory=dict)
    """The format's fields that your dataset names differently: ``{"output": "answer"}``."""
    template: str = ""
    """The prompt. "": the format's own (the post's template for ``post``, Stanford Alpaca's for ``alpaca``,
    the prompt itself for ``prompt_completion``); ``"chat"``: one user turn of the tokenizer's chat template,
    the response as the assistant's; otherwise a format string over the row's columns (``"Q: {question}\\nA: "``).
    The response follows the prompt directly."""
    chat_template: str = ""
    """A Jinja chat template to use instead of the tokenizer's own (many base models have none)."""
    end_marker: str | None = None
    """Text the response ends with, on a line of its own, before EOS: generation stops there and
    ``end_marker_rate`` counts it. None: the format's (``### End`` for ``post``, none otherwise: the
    response ends with EOS, or the chat template's end of turn, and that is what is counted)."""
    loss_on: Literal["all", "completion", "assistant"] = "all"
    """Which tokens the loss is taken on: ``all`` (the post), ``completion`` (the response only, TRL's
    completion_only_loss) or ``assistant`` (assistant turns only, TRL's assistant_only_loss)."""
    eval_prompts: tuple = ()
    """Prompts generated for after training, besides ``heldout_prompts`` test rows: each a dict of the
    prompt's fields (``{"product": ..., "category": ...}``), a string for a one-field prompt, or for
    ``messages`` a conversation ending in a user turn."""
    dataset_split: str = "train"
    """Which split of the dataset to sample from (a Hub split, or a slice such as ``train[:2000]``)."""
    dataset_subset: str = ""
    """The Hub dataset's configuration (subset), where it has several."""

    @property
    def response_field(self) -> str | None:
        """The field the model learns to write; None for ``messages`` (assistant turns) and ``text``."""
        fields_ = FORMAT_FIELDS.get(self.data_format, ())
        return fields_[-1] if len(fields_) > 1 else None

    @property
    def prompt_fields(self) -> tuple[str, ...]:
        """What a prompt is made of: a custom template's fields, else the format's fields before the response."""
        if self.template and self.template != CHAT and self.response_field:
            return template_fields(self.template) or ()
        fields_ = FORMAT_FIELDS.get(self.data_format, ())
        return fields_[:-1] if self.response_field else fields_

    @property
    def required_prompt_fields(self) -> tuple[str, ...]:
        """The prompt's fields a row (or an eval prompt) must have: all but the optional ones (alpaca's input)."""
        return tuple(f for f in self.prompt_fields if f not in OPTIONAL_FIELDS)

    @property
    def conversational(self) -> bool:
        """Rendered with the chat template (a ``messages`` dataset, or ``template="chat"``)."""
        return self.data_format == "messages" or self.template == CHAT

    @property
    def marker(self) -> str:
        """The end marker in force ("" for none)."""
        if self.end_marker is None:
            return POST_END_MARKER if self.data_format == "post" else ""
        return self.end_marker

    def column(self, name: str) -> str:
        """The dataset column holding the format's field ``name``."""
        return self.columns.get(name, name) if isinstance(self.columns, dict) else name


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v) -> bool:
    """The one rule for "a number": int or float, not bool, not NaN or infinite (those pass a range check
    such as ``x > 0`` and then fail inside a trial)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Trial and sweep names become directory names (trials/<name>, sweeps/<name>), Ray trial names and MLflow
# run and experiment names: portable file-name characters only, starting with a letter or digit (so never
# "", ".", ".." or a hidden file), short enough for every file system and for Ray's paths below them.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME_LENGTH = 100
BASELINE_NAME = "base"
SEED_LIMIT = 2**32  # numpy's seeds (the Trainer seeds numpy too) must be below 2**32


def name_problem(name) -> str | None:
    """Why ``name`` cannot name a trial or a sweep, or None when it can."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        return "must start with a letter or digit and use only letters, digits, '.', '_' and '-'"
    if len(name) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters (has {len(name)})"
    return None


# Settings added after sweeps may already exist, each with the value that reproduces what those sweeps ran:
# left out of fingerprints at that value, so a sweep an earlier version started still resumes (and --extends)
# after an upgrade instead of reading as "started from a different space". Add each new setting here.
NEUTRAL_WHEN = {"compile": False}


def identity(values: dict) -> dict:
    """``values`` (a config or a space's shared settings) without the settings at their neutral value."""
    return {k: v for k, v in values.items() if not (k in NEUTRAL_WHEN and v is NEUTRAL_WHEN[k])}


@dataclass(frozen=True, kw_only=True)
class TrialConfig(Settings):
    """Everything one trial needs, fully resolved. Built by the driver; read by ``trainers``."""

    name: str
    index: int
    r: int
    targets: Targets
    bits: int
    target_modules: tuple[str, ...] = ()
    """Module names the preset resolved to on this model; filled in by the driver's plan step."""
    baseline: bool = False
    """The base model before fine-tuning: evaluated and generated for exactly like a trial, never trained."""
    replicate: int = 0
    """Which of the ``seeds`` repeats of its configuration this trial is (0, 1, ...)."""
    config_name: str = ""
    """The configuration's name, shared by its seed repeats (empty: the trial's own name)."""

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for every invalid value; empty when the config is valid."""
        out = []

        def check(name, ok, msg):
            if not ok:
                got = repr(getattr(self, name))
                out.append((name, f"{msg}, got {got if len(got) <= 80 else got[:77] + '...'}"))

        check("r", _is_int(self.r) and self.r > 0, "must be a positive integer")
        check("bits", self.bits in BITS and _is_int(self.bits), "must be one of 4, 8, 16")
        if isinstance(self.targets, str):
            check("targets", self.targets in TARGET_PRESETS,
                  "must be a preset (attention, all_linear) or a list of module names")
        else:
            check("targets", isinstance(self.targets, tuple) and len(self.targets) > 0
                  and all(isinstance(t, str) and t for t in self.targets),
                  "must be a non-empty list of module names")
        check("model", isinstance(self.model, str) and self.model.strip() != "", "must be a non-empty string")
        check("dataset", isinstance(self.dataset, str) and self.dataset.strip() != "", "must be a non-empty string")
        check("device", self.device in ("cuda", "cpu"), "must be 'cuda' or 'cpu'")
        check("trainer", self.trainer in ("fast", "reference"), "must be 'fast' or 'reference'")
        check("max_steps", _is_int(self.max_steps) and self.max_steps >= 0, "must be an integer >= 0")
        for name in ("lora_alpha", "learning_rate", "epochs"):
            check(name, is_finite_number(getattr(self, name)) and getattr(self, name) > 0,
                  "must be a finite positive number")
        check("alpha_rule", self.alpha_rule in ALPHA_RULES, "must be one of " + ", ".join(ALPHA_RULES))
        check("lora_dropout", is_finite_number(self.lora_dropout) and 0 <= self.lora_dropout < 1, "must be in [0, 1)")
        check("test_fraction", is_finite_number(self.test_fraction) and 0 < self.test_fraction < 1,
              "must be in (0, 1)")
        for name in ("batch_size", "grad_accum", "logging_steps", "max_new_tokens", "cpus_per_trial",
                     "checkpoint_every"):
            check(name, _is_int(getattr(self, name)) and getattr(self, name) >= 1, "must be an integer >= 1")
        check("max_seq_length", _is_int(self.max_seq_length) and self.max_seq_length >= 16, "must be an integer >= 16")
        check("train_samples", _is_int(self.train_samples) and self.train_samples >= 10, "must be an integer >= 10")
        for name in ("heldout_prompts", "eval_every"):
            check(name, _is_int(getattr(self, name)) and getattr(self, name) >= 0, "must be an integer >= 0")
        check("seed", _is_int(self.seed) and 0 <= self.seed < SEED_LIMIT, "must be an integer in [0, 2**32)")
        check("seeds", _is_int(self.seeds) and 1 <= self.seeds <= 100, "must be an integer from 1 to 100")
        if not out and self.seeds > 1:  # the repeats train with seed, seed + 1, ..., seed + seeds - 1
            check("seed", self.seed + self.seeds - 1 < SEED_LIMIT,
                  f"must leave room below 2**32 for seeds={self.seeds} training seeds (seed, seed + 1, ...)")
        for name in ("gradient_checkpointing", "trust_remote_code", "fast_kbit", "compile"):
            check(name, isinstance(getattr(self, name), bool), "must be true or false")
        check("compile", self.compile is not True or self.trainer == "fast",
              "compiles the fast trainer path only: set trainer=fast or compile=false")
        check("data_format", self.data_format in FORMAT_FIELDS, f"must be one of {', '.join(FORMAT_FIELDS)}")
        if self.data_format in FORMAT_FIELDS:
            self._data_problems(check)
        for name in ("chat_template", "dataset_subset"):
            check(name, isinstance(getattr(self, name), str), "must be a string")
        check("dataset_split", isinstance(self.dataset_split, str) and self.dataset_split.strip() != "",
              "must be a split name such as 'train'")
        # last: an automatic name is only bad because a field above is
        problem = name_problem(self.name)
        check("name", problem is None, problem or "")
        check("name", problem or self.baseline or self.name.lower() != BASELINE_NAME,
              f"'{BASELINE_NAME}' is reserved for the baseline row (the model before fine-tuning)")
        return out

    @classmethod
    def build(cls, *, name: str, index: int, **values) -> "TrialConfig":
        """The one way a config is made from a space's values: ``alpha_rule`` r / 2r sets lora_alpha here, so
        the config, its fingerprint, MLflow and the table all carry the alpha the adapter really uses."""
        rule, r = values.get("alpha_rule", "fixed"), values.get("r")
        if rule in ("r", "2r") and _is_int(r):
            values = {**values, "lora_alpha": r if rule == "r" else 2 * r}
        return cls(name=name, index=index, **values)

    @property
    def use_rslora(self) -> bool:
        return self.alpha_rule == "rslora"

    def _data_problems(self, check) -> None:
        """The data settings against the chosen format (``check`` as in ``problems``)."""
        fmt, own, template = self.data_format, FORMAT_FIELDS[self.data_format], self.template
        check("columns", isinstance(self.columns, dict) and all(k in own and isinstance(v, str) and v
                                                                for k, v in self.columns.items()),
              f"must map the {fmt} format's fields ({', '.join(own)}) to column names")
        choices = ("all", "completion") if template == CHAT and fmt != "messages" else LOSS_ON[fmt]
        check("loss_on", self.loss_on in choices, f"must be one of {', '.join(choices)} for the {fmt} format")
        if not isinstance(template, str) or not template or (template == CHAT and fmt != "text"):
            check("template", isinstance(template, str), "must be a string")
        elif not self.response_field:
            allowed = f"'' or '{CHAT}'" if fmt == "messages" else "''"
            check("template", False, f"must be {allowed} for the {fmt} format: it has no prompt to template")
        else:
            names = template_fields(template)
            check("template", names is not None, "must be a format string with named fields such as "
                                                 "{question} (write {{ and }} for literal braces)")
            check("template", names is None or self.response_field not in names,
                  f"must not contain the response field {{{self.response_field}}}: the response follows the prompt")
        check("end_marker", self.end_marker is None or isinstance(self.end_marker, str), "must be a string or None")
        check("end_marker", not (isinstance(self.end_marker, str) and self.end_marker and not self.response_field),
              f"does not apply to the {fmt} format: it ends where its text or turn ends")
        check("eval_prompts", isinstance(self.eval_prompts, (tuple, list))
              and all(self._prompt_ok(p) for p in self.eval_prompts), self._prompt_shape())

    def _prompt_shape(self) -> str:
        if self.data_format == "messages":
            return ("must be a list of prompts, each a string or a list of {role, content} messages ending with a "
                    "user turn")
        needed = self.required_prompt_fields
        one = f" or a string (the {needed[0]})" if len(needed) == 1 else ""
        return f"must be a list of prompts, each a dict of {', '.join(self.prompt_fields)} as text{one}"

    def _prompt_ok(self, p) -> bool:
        needed = self.required_prompt_fields
        if isinstance(p, str):
            return p != "" and (self.data_format == "messages" or len(needed) == 1)
        if self.data_format == "messages":
            return (isinstance(p, (list, tuple)) and len(p) > 0 and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in p) and p[-1]["role"] == "user")
        return (isinstance(p, dict) and set(needed) <= set(p) <= set(self.prompt_fields)
                and all(isinstance(v, str) for v in p.values()))

    @property
    def train_seed(self) -> int:
        """Seeds training (LoRA init, dropout, data order); ``seed`` alone seeds the data split and the base."""
        return self.seed + self.replicate

    @property
    def group(self) -> str:
        """The configuration this trial repeats: the table's row when a sweep has several seeds."""
        return self.config_name or self.name

    @property
    def targets_label(self) -> str:
        return targets_label(self.targets)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def fingerprint(self) -> str:
        """Identity of this trial across restarts: ledger key and MLflow tag."""
        return hashlib.sha256(json.dumps(identity(self.to_dict()), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> "TrialConfig":
        d = dict(d)
        for key in ("targets", "target_modules", "eval_prompts"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)

    def to_param(self) -> dict:
        """The trial's entry in Ray Tune's param space: the config and, precomputed, what identifies it."""
        return {"config": self.to_dict(), "name": self.name, "fingerprint": self.fingerprint,
                "baseline": self.baseline}

    @classmethod
    def from_param(cls, param: dict) -> "TrialConfig":
        return cls.from_dict(param["config"])

    @classmethod
    def from_tune(cls, config: dict, trial_name: str) -> "TrialConfig":
        """The config of the Ray Tune trial named ``trial_name`` whose config is ``config`` (see ``search_param``).

        An explicit trial (a grid's) carries its whole config. A searched trial carries the shared settings
        under ``trial`` and the searcher's values under ``point``; its name, made by the driver when Tune
        created the trial, carries its sample number. The trainable and the driver's callbacks both call this,
        so both see the same config and fingerprint."""
        entry = config[TUNE_TRIAL]
        if "name" in entry:
            return cls.from_param(entry)
        values = {**entry["config"], **config[TUNE_POINT]}
        label = targets_label(values["targets"])
        values.update(targets=targets_from_label(label), target_modules=tuple(entry["modules"][label]))
        return cls.build(name=trial_name, index=sample_number(trial_name), **values)


# ---- how a searched trial is named and found in Ray Tune's config ---------------------------------------

TUNE_TRIAL, TUNE_POINT = "trial", "point"
"""Keys of a Ray Tune trial config: the shared (or, for an explicit trial, whole) config, and a search's values."""


def targets_label(targets: Targets) -> str:
    """A preset's name or the module names joined by commas: the form a searcher samples (Optuna's
    categorical choices must be plain strings) and --set accepts."""
    return targets if isinstance(targets, str) else ",".join(targets)


def targets_from_label(label: str) -> Targets:
    return label if label in TARGET_PRESETS else tuple(label.split(","))


def trial_name(values: dict, number: int | None = None) -> str:
    """Readable trial names: ``r8-attention-4bit``; a search's samples are numbered, ``s003-r8-attention-4bit``."""
    label = values["targets"] if values["targets"] in TARGET_PRESETS else "custom"
    name = f"r{values['r']}-{label}-{values['bits']}bit"
    return name if number is None else f"s{number:03d}-{name}"


def sample_number(name: str) -> int:
    """The sample number ``trial_name`` put in a searched trial's name."""
    return int(name.split("-", 1)[0].removeprefix("s"))


def search_param(shared: dict, modules: dict[str, tuple[str, ...]]) -> dict:
    """The ``trial`` entry every trial of a search shares: the settings its searcher does not set, and the
    target modules each ``targets`` choice resolved to on the model (the driver's plan step)."""
    return {"config": shared, "modules": {label: list(m) for label, m in modules.items()}}


# ---- what a trial reports -------------------------------------------------------------------------

REPORT_KIND = "report"
"""Key in every dict a trial hands ``tune.report``: which of the report types below it is."""


class _Report:
    """A report sent as a dict of its fields, tagged with its kind."""

    KIND = ""

    def to_report(self) -> dict:
        return {REPORT_KIND: self.KIND, **dataclasses.asdict(self)}

    @classmethod
    def from_report(cls, d: dict):
        """Fields missing from ``d`` (a report from an older version) take their defaults."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class StepReport(_Report):
    """A logged training step: the driver streams these to MLflow as step metrics and to the console."""

    KIND = "step"
    step: int
    epoch: float
    loss: float
    learning_rate: float
    max_steps: int = 0
    """The trial's total optimizer steps (0: unknown), for "step / total" and the ETA."""
    tokens_per_second: float = 0.0
    """Real (unpadded) tokens trained per second since the previous report."""
    system: dict[str, float] = field(default_factory=dict)
    """Mean system metrics sampled since the previous report, named as MLflow's system metrics
    (``cpu_utilization_percentage``, ``gpu_0_utilization_percentage``, ...); empty when none were taken."""


SCHEDULE_METRIC, SCHEDULE_TIME = "eval_loss", "train_steps"
"""What early stopping and the searchers read: the held-out loss at an optimizer step. Both EvalReport and
TrialResult carry these two keys, and no other report does: Ray's schedulers skip results without them."""


@dataclass(frozen=True)
class EvalReport(_Report):
    """A held-out eval during training (every ``eval_every`` steps), sent with the checkpoint of that step:
    a trial that early stopping ends here keeps this eval loss and this adapter."""

    KIND = "eval"
    train_steps: int
    epoch: float
    eval_loss: float


@dataclass(frozen=True)
class CheckpointReport:
    """A training checkpoint (adapter, optimizer, scheduler, RNG) handed to Tune so the trial can resume."""

    KIND = "checkpoint"
    step: int

    def to_report(self) -> dict:
        return {REPORT_KIND: self.KIND, "checkpoint_step": self.step}


def _tracked(mlflow: str | None):
    """How MLflow records a TrialResult field: ``metric``, ``tag``, ``param``, or not at all (None)."""
    return field(metadata={"mlflow": mlflow})


@dataclass(frozen=True)
class TrialResult:
    """A finished trial's measures: the one place metric names live (metrics.json, MLflow, the table)."""

    KIND = "final"
    trainable_params: int = _tracked("metric")
    total_params: int = _tracked("metric")
    trainable_pct: float = _tracked("metric")
    eval_loss: float = _tracked("metric")
    """Held-out loss per token on the tokens the loss is taken on (``loss_on``)."""
    eval_loss_se: float = _tracked("metric")
    """Standard error of eval_loss over the held-out examples (``trainers/stats.py``)."""
    response_loss: float = _tracked("metric")
    """Held-out loss per response token (completion, assistant turns; every token of ``text``): the same
    tokens whatever ``loss_on`` is, so trials that differ in it compare on this."""
    response_loss_se: float = _tracked("metric")
    """Standard error of response_loss over the held-out examples."""
    perplexity: float = _tracked("metric")
    rouge_l: float = _tracked("metric")
    rouge_l_se: float = _tracked("metric")
    """Standard error of rouge_l over the held-out rows generated for (nan with fewer than two)."""
    repeat_ngram_rate: float = _tracked("metric")
    end_marker_rate: float = _tracked("metric")
    gen_mean_words: float = _tracked("metric")
    setup_seconds: float = _tracked("metric")
    train_seconds: float = _tracked("metric")
    eval_seconds: float = _tracked("metric")
    generate_seconds: float = _tracked("metric")
    train_tokens: int = _tracked("metric")
    """Real (unpadded) tokens this process trained on; with train_seconds, an honest tokens/s."""
    train_tokens_per_second: float = _tracked("metric")
    peak_gpu_mem_gb: float = _tracked("metric")
    train_loss_first: float = _tracked("metric")
    train_loss_last: float = _tracked("metric")
    train_steps: int = _tracked("metric")
    train_examples: int = _tracked("metric")
    truncated_rows: int = _tracked("metric")
    """Train rows longer than ``max_seq_length`` (cut to it)."""
    truncated_pct: float = _tracked("metric")
    response_tokens_lost: int = _tracked("metric")
    """Response tokens of the train rows that the cut removed (never learned)."""
    response_lost_pct: float = _tracked("metric")
    dropped_rows: int = _tracked("metric")
    """Train rows the cut left with no token to learn from (their prompt alone fills ``max_seq_length``):
    TRL drops them, and so does the fast path."""
    test_examples: int = _tracked("metric")
    bnb_layers: int = _tracked("metric")
    dataset_fingerprint: str = _tracked("param")
    bnb_layer_type: str = _tracked("tag")
    device_name: str = _tracked("tag")
    gpu_uuid: str = _tracked("tag")
    resumed_from_step: int = _tracked("metric")
    train_started_at: float = _tracked(None)
    node_id: str = field(default="", metadata={"mlflow": "tag"})
    """The Ray node the trial ran on (empty outside Ray); results written before it existed lack it."""
    gpu_sharing: str = field(default="", metadata={"mlflow": "tag"})
    """How the trial had its GPU, which its tokens/s depends on: ``whole``, ``mps`` (a share, its kernels
    beside its neighbours'), ``time-sliced`` (a share, taking turns); empty on the CPU and in results
    written before it existed."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_report(self) -> dict:
        return {REPORT_KIND: self.KIND, **self.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrialResult":
        """From metrics.json or a Tune result (whose own keys, such as ``time_total_s``, are ignored)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d or f.default is dataclasses.MISSING})

    @classmethod
    def names(cls, mlflow: str | None) -> list[str]:
        return [f.name for f in fields(cls) if f.metadata.get("mlflow") == mlflow]

    def mlflow_metrics(self) -> dict[str, float]:
        """The numeric measures MLflow can store (it rejects NaN and inf from a trial that never logged)."""
        values = {n: float(getattr(self, n)) for n in self.names("metric")}
        return {n: v for n, v in values.items() if math.isfinite(v)}


def report_kind(result: dict[str, Any]) -> str | None:
    return result.get(REPORT_KIND)


def uses_fast_kbit(cfg: Settings, bits: int) -> bool:
    """Whether a trial's quantized base runs through trainers/kbit.py (the fast path's frozen layers)."""
    return cfg.trainer == "fast" and cfg.fast_kbit and is_quantized(bits)
