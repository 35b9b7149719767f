"""Plan a sweep before anything starts: resolve each trial's target modules on the model's own
architecture and count its exact parameters on the meta device (no weights, no GPU, seconds).

Every failure here names the space file, the trial and the field, and the CLI exits 2 on it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from sweep.search import SearchSpec, max_steps
from sweep.space import Space, SpaceError, TrialConfig


@dataclass(frozen=True)
class PlannedTrial:
    cfg: TrialConfig
    trainable_params: int
    total_params: int
    gpu_gb: float = 0.0
    """Estimated peak GPU memory of the trial (``estimate_gpu_gb``); 0 for CPU trials."""


# Peak GPU memory per trial, from the architecture. Calibrated against `python -m sweep.bench` on an
# H200 (OpenLLaMA-3B layout, 20 steps of 16 examples; README "GPU memory"): bytes autograd keeps per
# token, per layer, per hidden unit without gradient checkpointing, 36 plus 26 times the share of
# the layer's input width that carries an adapter (LoRA keeps its own copy of each adapted input);
# 12 more where PEFT's k-bit preparation carries the residual stream in fp32 (the reference path; the
# fast path keeps it 16-bit, trainers.models.prepare_kbit); 24 more for the stock 8-bit layers (they
# keep fp32 and int8 copies of their inputs); 8 with checkpointing (the layer inputs in fp32 and one
# layer's worth). Logits cost about 10 bytes a token per vocabulary entry (bf16 logits, their fp32
# copy, the loss's softmax).
ACTIVATION_BYTES, ADAPTED_INPUT_BYTES, STOCK_INT8_BYTES, CHECKPOINTED_BYTES = 36.0, 26.0, 24.0, 8.0
FP32_RESIDUAL_BYTES = 12.0
LOGIT_BYTES = 10.0
# Blocks the caching allocator holds beyond the peak (expandable segments on): the base row, whose peak
# is an evaluation batch, reached 11.1 GiB of its 11.5 GiB estimate and failed on an H200.
ALLOCATOR_HEADROOM = 1.1
EVAL_TOKENS = 8192  # trainers.evaluate.EVAL_BATCH_TOKENS["cuda"]


def estimate_gpu_gb(cfg: TrialConfig, model, trainable: int) -> float:
    """Peak memory PyTorch allocates for this trial on a GPU (what ``peak_gpu_mem_gb`` reports): the frozen
    base in its bits (and its 16-bit copy on the fast path), the adapter with AdamW state, and the larger of
    training's largest micro-batch (activations and logits) and the evaluation batch's logits."""
    import torch

    from trainers.config import is_quantized, uses_fast_kbit

    conf = model.config
    linears = {n.removesuffix(".base_layer"): m for n, m in model.named_modules()  # the base's own layers
               if isinstance(m, torch.nn.Linear) and "lora_" not in n}
    body = [m for n, m in linears.items() if n.split(".")[-1] != "lm_head"]
    linear = sum(m.weight.numel() for m in body)
    other = sum(p.numel() for p in model.parameters()) - linear - trainable  # embeddings, norms, lm_head
    weight_bytes = {4: 0.5 + 1 / 64, 8: 1.0 + 4 / conf.hidden_size, 16: 2.0}[cfg.bits]
    upcast = is_quantized(cfg.bits) and not uses_fast_kbit(cfg, cfg.bits)  # k-bit prep's fp32 (prepare_kbit)
    base = linear * weight_bytes + other * (4.0 if upcast else 2.0)
    if uses_fast_kbit(cfg, cfg.bits):
        base += linear * 2.0
    adapter = trainable * (4 + 4 + 8)  # weights, gradients, AdamW moments (fp32)
    adapted = sum(m.in_features for n, m in model.named_modules() if hasattr(m, "lora_A") and "lm_head" not in n)
    share = adapted / max(sum(m.in_features for m in body), 1)
    per_token = ACTIVATION_BYTES + ADAPTED_INPUT_BYTES * share + (FP32_RESIDUAL_BYTES if upcast else 0.0)
    if cfg.bits == 8 and not uses_fast_kbit(cfg, 8):
        per_token += STOCK_INT8_BYTES
    if cfg.gradient_checkpointing:
        per_token = CHECKPOINTED_BYTES
    tokens = (cfg.batch_size * cfg.grad_accum if cfg.trainer == "fast" else cfg.batch_size) * cfg.max_seq_length
    train = tokens * (conf.num_hidden_layers * conf.hidden_size * per_token + conf.vocab_size * LOGIT_BYTES)
    # evaluation: its logits, and a few layers' activations (no autograd graph) in fp32
    inner = getattr(conf, "intermediate_size", None) or 4 * conf.hidden_size
    evaluation = EVAL_TOKENS * (conf.vocab_size * LOGIT_BYTES + 4 * (6 * conf.hidden_size + 3 * inner))
    return ALLOCATOR_HEADROOM * (base + adapter + max(0.0 if cfg.baseline else train, evaluation)) / 2**30


# Relative cost of one training example on the fast path, for telling which of the trials sharing a GPU
# will take longest (sweep/mps.py). Fitted to the bench's steady tokens/s on an H200 (README, "Speed":
# 13.0k / 8.4k / 7.1k for r8 attention 4-bit, r8 all linear 4-bit, r8 all linear 8-bit, OpenLLaMA-3B
# shapes): a cost by the base's bits (the quantized layers' own kernels: LLM.int8's activation
# quantization and outlier product make 8-bit 1.36 times 4-bit) plus one per adapted module in a layer
# (LoRA's dropout, two products, scale and add, forward and backward). r hardly matters (13.0k vs 13.2k
# for r8 and r16). A 16-bit base runs the same kernels as the fast path's 4-bit one (which keeps its
# weights dequantized), so it counts as 4-bit.
BITS_EXAMPLE_COST = {4: 1.0, 8: 1.36, 16: 1.0}
ADAPTER_EXAMPLE_COST = 0.137


def relative_work(cfg: TrialConfig) -> float:
    """A trial's training work, comparable between trials of one sweep (same data): examples trained times
    the cost of an example; 0 for the base row, which trains nothing."""
    if cfg.baseline:
        return 0.0
    steps = cfg.max_steps or max_steps(cfg.to_dict())
    layer_modules = sum(1 for m in cfg.target_modules if m != "lm_head")
    cost = BITS_EXAMPLE_COST[cfg.bits] + ADAPTER_EXAMPLE_COST * layer_modules  # bits: 4, 8 or 16 (validated)
    return steps * cfg.batch_size * cfg.grad_accum * cost


@dataclass(frozen=True)
class TargetShapes:
    """What a search's ``targets`` choices resolved to on the model: module names, trainable parameters per
    unit of r (LoRA adds r x (in + out) per adapted layer, so counts are exactly linear in r), and the
    largest GPU memory estimate of any sample (the largest r, each targets and bits choice)."""

    modules: dict[str, tuple[str, ...]]
    per_r: dict[str, int]
    base_total: int
    gpu_gb: float

    @classmethod
    def from_corners(cls, corners: list[PlannedTrial]) -> "TargetShapes":
        modules = {c.cfg.targets_label: c.cfg.target_modules for c in corners}
        per_r = {c.cfg.targets_label: c.trainable_params // c.cfg.r for c in corners}
        return cls(modules, per_r, corners[0].total_params - corners[0].trainable_params,
                   max(c.gpu_gb for c in corners))

    def planned(self, cfg: TrialConfig) -> PlannedTrial:
        trainable = cfg.r * self.per_r[cfg.targets_label]
        return PlannedTrial(cfg, trainable, self.base_total + trainable, self.gpu_gb)


@dataclass(frozen=True)
class SweepPlan:
    """A sweep, checked and counted before anything starts."""

    name: str
    space: Space
    planned: list[PlannedTrial]
    """The explicit trials (the ``base`` row first unless turned off); for a search, only the base row:
    its seeds and samples are planned as the searcher proposes them."""
    spec: SearchSpec | None
    shapes: TargetShapes | None
    num_samples: int
    fingerprint: str

    @property
    def explicit(self) -> list[PlannedTrial]:
        return [p for p in self.planned if not p.cfg.baseline]

    @property
    def device(self) -> str:
        return self.spec.fixed["device"] if self.spec else self.planned[0].cfg.device

    @property
    def max_steps(self) -> int:
        """An upper bound on any trial's optimizer steps: the span of ASHA's rungs."""
        if self.spec:
            return max_steps(self.spec.fixed, self.spec.axes)
        return max((max_steps(p.cfg.to_dict()) for p in self.explicit), default=1)


def _describe(cfg: TrialConfig) -> str:
    return f"trial {cfg.index} ({cfg.name})"


def _absolute(value: str) -> str:
    """Trials run with the trial directory as cwd, so local paths must not be relative."""
    return str(Path(value).resolve()) if Path(value).exists() else value


def data_key(cfg: TrialConfig) -> str:
    """What the data checks depend on: trials that agree on it are checked once."""
    import json

    fields = ("dataset", "dataset_split", "dataset_subset", "data_format", "columns", "template", "chat_template",
              "loss_on", "model", "trust_remote_code")
    return json.dumps({f: getattr(cfg, f) for f in fields}, sort_keys=True)


def plan(configs: list[TrialConfig], space_path, *, for_training: bool = True,
         describe: Callable[[TrialConfig], str] = _describe, also_bits: tuple[int, ...] = ()) -> list[PlannedTrial]:
    """Resolve and count every trial. ``for_training`` also checks that the data and weights can be
    had (a dry run needs neither: only configs, which are bundled for the post's model). ``describe``
    names a config in messages (a search's corners are not trials of the space file); ``also_bits``
    sizes each as if its base had these bits too, keeping the largest estimate (a search's bits choices)."""
    from peft import get_peft_model

    from trainers.data import DataError, check_available
    from trainers.data_checks import check_split
    from trainers.formats import chat_template_problem
    from trainers.models import (ModelError, check_weights_available, load_config, local_tokenizer, lora_config,
                                 meta_model, resolve_targets)

    def fail(cfg: TrialConfig, field: str, e: Exception):
        raise SpaceError(f"{space_path}: {describe(cfg)}: field '{field}': {e}") from None

    model_configs, dataset_rows, out = {}, {}, []
    for cfg in configs:
        cfg = replace(cfg, model=_absolute(cfg.model), dataset=_absolute(cfg.dataset))
        if for_training:
            data = data_key(cfg)
            try:
                if data not in dataset_rows:
                    dataset_rows[data] = check_available(cfg)
                    if cfg.conversational and (tokenizer := local_tokenizer(cfg)) is not None and \
                            (problem := chat_template_problem(cfg, tokenizer)):
                        fail(cfg, problem[0], problem[1])
                check_split(cfg.dataset, dataset_rows[data], cfg.train_samples, cfg.test_fraction)
            except DataError as e:
                fail(cfg, "dataset", e)
        key = (cfg.model, cfg.trust_remote_code)
        if key not in model_configs:
            try:
                model_configs[key] = load_config(cfg.model, cfg.trust_remote_code)
                if for_training:
                    check_weights_available(cfg.model, cfg.trust_remote_code)
            except ModelError as e:
                fail(cfg, "model", e)
        positions = getattr(model_configs[key], "max_position_embeddings", None) or \
            getattr(model_configs[key], "n_positions", None)
        if isinstance(positions, int) and cfg.max_seq_length > positions:
            fail(cfg, "max_seq_length", f"{cfg.max_seq_length} exceeds the model's {positions} positions")
        model = meta_model(model_configs[key])
        try:
            cfg = replace(cfg, target_modules=resolve_targets(model, cfg.targets))
        except ModelError as e:
            fail(cfg, "targets", e)
        peft_model = get_peft_model(model, lora_config(cfg))
        trainable, total = peft_model.get_nb_trainable_parameters()
        gpu_gb = max(estimate_gpu_gb(replace(cfg, bits=b), peft_model, trainable)
                     for b in {cfg.bits, *also_bits}) if cfg.device == "cuda" else 0.0
        out.append(PlannedTrial(cfg, trainable, total, gpu_gb))
    return out
