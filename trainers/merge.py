"""A finished trial's adapter, back on its base: evaluated, and optionally merged into plain weights.

Two bases to merge into (``sweep.export --merge-base``):

``trial``     the weights the adapter was trained against. A 4-bit trial's NF4 layers dequantized
              (bitsandbytes' ``dequantize_4bit``), an 8-bit trial's int8 rows dequantized
              (``CB * SCB / 127``), a 16-bit trial's base as it loaded it: exactly the weights the fast
              path's layers computed with (``trainers/kbit.py``). The merged model reproduces the trial.
``original``  the checkpoint's own unquantized weights. For a 4/8-bit trial this is a different model
              from the one the trial measured: the adapter learned to correct the quantized weights.

Either way the merge arithmetic is fp32 (``W + scale * B @ A``, no rounding of the small update) and
the stored dtype is chosen explicitly. The CLI is ``sweep.export``; this module holds the model work.
"""

from __future__ import annotations

import dataclasses

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from trainers.config import TrialConfig, is_quantized
from trainers.data import build_splits
from trainers.evaluate import split_losses
from trainers.models import checkpoint_path, load_base, load_tokenizer, prepare_kbit

MERGE_BASES = ("trial", "original")
STORE_DTYPES = ("float32", "bfloat16", "float16")

# Largest relative gap between the merged model's eval loss and the loss it must reproduce, by what can
# separate them (measured on the CPU with the smoke sweep's desc-llama trials and tiny-llama's; README
# "Shipping a trial"):
# - fp32 arithmetic alone: against the adapter on the same weights 6e-9 to 9e-9; against the trial's
#   own eval loss 5e-7 (4-bit all-linear) to 1.7e-6 (4-bit attention-only: its unadapted layers are
#   dequantized too); the trial summed on one thread, export on two. Dropping an adapter moves these
#   losses by 1e-2 or more, so 1e-4 still catches a wrong merge.
# - an 8-bit trial's LLM.int8 products also rounded its *activations* to int8 (outlier columns aside),
#   which the merged model does not: 6.2e-5 (desc-llama r8 all-linear); 1e-3 gives ~16x room.
# - bf16 anywhere: a CUDA trial measured its loss under bf16 autocast, and a bf16/fp16 file rounds the
#   merged weights (desc-llama, bf16 file: 1.0e-4; on an H200 bf16 merges lost 1.3e-5 to 1.1e-3, the
#   smaller the update the more). Not re-measured on a GPU for the dequantized merge (no GPU time left).
TOLERANCE_FP32, TOLERANCE_INT8, TOLERANCE_16BIT = 1e-4, 1e-3, 1e-2


def tolerance(cfg: TrialConfig, merge_base: str, dtype: str) -> float:
    """How far the merged model's loss may be from its reference (``reference``) before export refuses."""
    if cfg.device == "cuda" or dtype != "float32":
        return TOLERANCE_16BIT
    if merge_base == "trial" and cfg.bits == 8:
        return TOLERANCE_INT8
    return TOLERANCE_FP32


def describe_base(cfg: TrialConfig, merge_base: str) -> str:
    """Which weights the adapter was merged into, in words (printed and kept in export.json)."""
    if merge_base == "original":
        return "the checkpoint's original weights (fp32)"
    return {4: "the trial's 4-bit NF4 base, dequantized with bitsandbytes' dequantize_4bit",
            8: "the trial's 8-bit LLM.int8 base, dequantized as CB * SCB / 127",
            16: f"the trial's 16-bit base ({compute_dtype_label(cfg)}, as it trained)"}[cfg.bits]


def compute_dtype_label(cfg: TrialConfig) -> str:
    from trainers.config import compute_dtype_name

    return compute_dtype_name(cfg.device)


def load_adapted(cfg: TrialConfig, adapter_dir, base: str = "trial") -> tuple[PeftModel, object]:
    """The trial's adapter (attached, not merged) on ``base`` and the trial's tokenizer.

    ``trial`` reproduces the trial: its 4/8/16 bits and compute dtype, its fast-path layers.
    ``original`` is the checkpoint unquantized in fp32 whatever the trial trained on.
    """
    if base == "trial":
        model = load_base(cfg, checkpoint_path(cfg))
    else:
        model = load_base(dataclasses.replace(cfg, bits=16), checkpoint_path(cfg), dtype=torch.float32)
    if base == "trial" and is_quantized(cfg.bits):
        # As the trial did (its unquantized layers in fp32 on the reference path, 16-bit on the fast one), which
        # the trial's eval_loss was measured with. A no-op on CPU, where everything is fp32 already.
        model = prepare_kbit(model, cfg, gradient_checkpointing=False)
    model = PeftModel.from_pretrained(model, str(adapter_dir))  # is_trainable=False: eval mode, frozen
    # The trial saved the tokenizer it trained with (pad token included) next to its adapter.
    tokenizer = load_tokenizer(str(adapter_dir), cfg.trust_remote_code)
    return model, tokenizer


def trained_weights(model: PeftModel) -> torch.nn.Module:
    """The plain fp32 model the adapter was trained against: ``model``'s base without the adapter, its
    bitsandbytes layers replaced by nn.Linear holding the dequantized weights (transformers'
    ``dequantize``, which also drops the quantization config so the saved model loads as a plain one)."""
    base = model.unload()
    if getattr(base, "hf_quantizer", None) is not None:
        # dequantize_4bit gives the weights in the dtype they were quantized from (the compute dtype),
        # the very values the trial's 4-bit layers computed with; int8 rows come out as CB * SCB / 127.
        base = base.dequantize(dtype=torch.float32)
    return base.float()


def rebuild_splits(cfg: TrialConfig):
    """The trial's exact train/test split (build_splits is deterministic in its arguments)."""
    return build_splits(cfg)


def heldout(cfg: TrialConfig, model, tokenizer, splits, autocast: bool | None = None):
    """Per-example held-out losses exactly as the trial computed them (same tokenization, same tokens: loss_on's
    for ``eval``, the response's for ``response``; same function)."""
    return split_losses(cfg, model, tokenizer, splits["test"], autocast)


def eval_loss(cfg: TrialConfig, model, tokenizer, splits, autocast: bool | None = None) -> float:
    """The trial's eval loss: on the tokens its loss was taken on (``loss_on``)."""
    return heldout(cfg, model, tokenizer, splits, autocast)["eval"].mean


def merge(model: PeftModel, dtype: str = "float32") -> torch.nn.Module:
    """Fold the adapter into its base weights in fp32, drop every PEFT wrapper, cast to ``dtype``."""
    if any(p.dtype != torch.float32 for p in model.base_model.model.parameters()):
        raise ValueError("merge needs an fp32 base (PEFT merges in the weight's dtype)")
    merged = model.merge_and_unload()
    leftover = [n for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    if leftover:  # would make from_pretrained of the saved model silently differ from what we evaluated
        raise RuntimeError(f"merge left PEFT layers behind: {', '.join(leftover[:3])}")
    return merged.to(getattr(torch, dtype))


def relative_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)
