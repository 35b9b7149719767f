"""Plan a sweep before anything starts: resolve each trial's target modules on the model's own
architecture and count its exact parameters on the meta device (no weights, no GPU, seconds).

Every failure here names the space file, the trial and the field, and the CLI exits 2 on it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from sweep.space import SpaceError, TrialConfig


@dataclass(frozen=True)
class PlannedTrial:
    cfg: TrialConfig
    trainable_params: int
    total_params: int
    gpu_gb: float = 0.0
    """Estimated peak GPU memory of the trial (``estimate_gpu_gb``); 0 for CPU trials."""


# Bytes autograd keeps per token, per layer, per hidden unit, for the backward pass of a decoder block
# (the residual stream in fp32 after prepare_model_for_kbit_training, matmul outputs in bf16 under
# autocast), without and with gradient checkpointing. Calibrated on an H200 (README, "GPU memory").
ACTIVATION_BYTES = {False: 60.0, True: 8.0}
EVAL_TOKENS = 16384  # trainers.evaluate.EVAL_BATCH_TOKENS["cuda"]


def estimate_gpu_gb(cfg: TrialConfig, model, trainable: int) -> float:
    """Peak memory PyTorch allocates for this trial on a GPU (what ``peak_gpu_mem_gb`` reports), from the
    architecture on the meta device: frozen base in its bits, adapter with AdamW state, the activations
    of the largest micro-batch, its logits, or the evaluation batch's logits, whichever is larger."""
    import torch

    conf = model.config
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head" and "lora_" not in n)
    other = sum(p.numel() for p in model.parameters()) - linear - trainable  # embeddings, norms, lm_head
    weight_bytes = {4: 0.5 + 1 / 64, 8: 1.0 + 4 / conf.hidden_size, 16: 2.0}[cfg.bits]
    base = linear * weight_bytes + other * (4.0 if cfg.bits in (4, 8) else 2.0)  # kbit prep upcasts to fp32
    adapter = trainable * (4 + 4 + 8)  # weights, gradients, AdamW moments (fp32)
    per_step = cfg.batch_size * cfg.grad_accum if cfg.trainer == "fast" else cfg.batch_size
    tokens = per_step * cfg.max_seq_length
    acts = tokens * conf.num_hidden_layers * conf.hidden_size * ACTIVATION_BYTES[cfg.gradient_checkpointing]
    logits = tokens * conf.vocab_size * (2 + 4 + 4)  # bf16 logits, their fp32 copy for the loss, its gradient
    work = 0.0 if cfg.baseline else acts + logits
    evaluation = EVAL_TOKENS * conf.vocab_size * (2 + 4)
    return (base + adapter + max(work, evaluation)) / 2**30


def _absolute(value: str) -> str:
    """Trials run with the trial directory as cwd, so local paths must not be relative."""
    return str(Path(value).resolve()) if Path(value).exists() else value


def plan(configs: list[TrialConfig], space_path, *, for_training: bool = True) -> list[PlannedTrial]:
    """Resolve and count every trial. ``for_training`` also checks that the data and weights can be
    had (a dry run needs neither: only configs, which are bundled for the post's model)."""
    from peft import get_peft_model

    from trainers.data import DataError, check_available
    from trainers.models import ModelError, check_weights_available, load_config, lora_config, meta_model, resolve_targets

    def fail(cfg: TrialConfig, field: str, e: Exception):
        raise SpaceError(f"{space_path}: trial {cfg.index} ({cfg.name}): field '{field}': {e}") from None

    model_configs, datasets_ok, out = {}, set(), []
    for cfg in configs:
        cfg = replace(cfg, model=_absolute(cfg.model), dataset=_absolute(cfg.dataset))
        if for_training and cfg.dataset not in datasets_ok:
            try:
                check_available(cfg.dataset)
            except DataError as e:
                fail(cfg, "dataset", e)
            datasets_ok.add(cfg.dataset)
        key = (cfg.model, cfg.trust_remote_code)
        if key not in model_configs:
            try:
                model_configs[key] = load_config(cfg.model, cfg.trust_remote_code)
                if for_training:
                    check_weights_available(cfg.model)
            except ModelError as e:
                fail(cfg, "model", e)
        model = meta_model(model_configs[key])
        try:
            cfg = replace(cfg, target_modules=resolve_targets(model, cfg.targets))
        except ModelError as e:
            fail(cfg, "targets", e)
        peft_model = get_peft_model(model, lora_config(cfg))
        trainable, total = peft_model.get_nb_trainable_parameters()
        gpu_gb = estimate_gpu_gb(cfg, peft_model, trainable) if cfg.device == "cuda" else 0.0
        out.append(PlannedTrial(cfg, trainable, total, gpu_gb))
    return out
