"""A finished trial's adapter, back on its base: evaluated, and optionally merged into plain weights.

The CLI is ``sweep.export``; this module holds the model work so it can be tested and reused alone.
"""

from __future__ import annotations

import dataclasses

import torch
from peft import PeftModel, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer

from trainers.config import TrialConfig, is_quantized
from trainers.data import build_splits
from trainers.evaluate import heldout_loss
from trainers.models import checkpoint_path, load_base, load_tokenizer
from trainers.sft import tokenize

# Largest relative |merged - adapter| eval loss accepted before refusing to write a merged model.
# Both losses come from the same unquantized base, so only rounding separates them.
# fp32 (CPU): W x + B(A x) and (W + BA) x agree to float precision; measured 0 to 7e-8 on tiny-llama
#   adapters trained on 4/8/16-bit bases. 1e-4 leaves room for larger models yet still catches a
#   wrong merge (dropping the tiny-llama adapters moves their loss by 1.8e-2 to 2.7e-2).
# bf16 (CUDA): the merged weight keeps 8 mantissa bits, so part of a small LoRA update rounds away;
#   measured on H200: tiny-llama 1.3e-5, random 3B LLaMA r=16 lr 1e-3 4.8e-5, r=8 lr 2e-4 1.1e-3
#   (the smaller the update, the more of it is lost). 1e-2 is ~10x the worst seen.
MERGE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def load_adapted(cfg: TrialConfig, adapter_dir, quantized: bool) -> tuple[PeftModel, object]:
    """The trial's base with its adapter attached (not merged) and the trial's tokenizer.

    ``quantized=True`` reproduces the trial (its 4/8/16 bits). ``quantized=False`` loads the base
    unquantized (bf16 on GPU, fp32 on CPU) whatever the trial trained on: merging into 4/8-bit weights
    would dequantize, add and requantize, losing most of the adapter's small update.
    """
    base_cfg = cfg if quantized else dataclasses.replace(cfg, bits=16)
    base = load_base(base_cfg, checkpoint_path(cfg))
    if is_quantized(base_cfg.bits):
        # As the trial did: on GPU this upcasts the unquantized layers (embeddings, norms, lm_head) from bf16 to fp32,
        # which the trial's eval_loss was measured with. A no-op on CPU, where everything is fp32 already.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = PeftModel.from_pretrained(base, str(adapter_dir))  # is_trainable=False: eval mode, frozen
    # The trial saved the tokenizer it trained with (pad token included) next to its adapter.
    tokenizer = load_tokenizer(str(adapter_dir), cfg.trust_remote_code)
    return model, tokenizer


def rebuild_splits(cfg: TrialConfig):
    """The trial's exact train/test split (build_splits is deterministic in its arguments)."""
    return build_splits(cfg.dataset, cfg.train_samples, cfg.test_fraction, cfg.seed)


def eval_loss(cfg: TrialConfig, model, tokenizer, splits) -> float:
    """Held-out loss exactly as the trial computed it (same tokenization, same function)."""
    test_ids = tokenize(splits["test"], tokenizer, cfg.max_seq_length)["input_ids"]
    return heldout_loss(model, test_ids, tokenizer.pad_token_id, cfg.device).mean


def merge(model: PeftModel) -> torch.nn.Module:
    """Fold the adapter into the base weights and drop every PEFT wrapper."""
    merged = model.merge_and_unload()
    leftover = [n for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    if leftover:  # would make from_pretrained of the saved model silently differ from what we evaluated
        raise RuntimeError(f"merge left PEFT layers behind: {', '.join(leftover[:3])}")
    return merged


def relative_gap(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)
