"""trainers.merge without training: the fp32 weights a 4/8-bit adapter was trained against."""

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from peft import get_peft_model

from trainers import merge as M
from trainers.config import TrialConfig
from trainers.models import load_base, lora_config, materialize_random


@pytest.mark.parametrize("bits", [4, 8])
def test_trained_weights_dequantize_every_quantized_layer_not_only_adapted_ones(model_cache, bits):
    cfg = TrialConfig(name="t", index=0, model="random:tiny-llama", dataset="d", device="cpu", r=8,
                      targets="attention", target_modules=("q_proj", "v_proj"), bits=bits)
    path = str(materialize_random("tiny-llama", cfg.seed))
    reference = load_base(cfg, path)  # the same quantized weights, to dequantize by hand
    model = get_peft_model(load_base(cfg, path), lora_config(cfg))
    plain = M.trained_weights(model)
    linears = {n: m for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 15  # 2 layers x 7 projections + lm_head, none left as a bitsandbytes layer
    assert not [m for m in plain.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    assert "quantization_config" not in plain.config.to_dict() and not plain.is_quantized
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        q = reference.get_submodule(name)
        if bits == 4:
            expected = F.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
        else:
            expected = q.weight.data.float() * q.weight.SCB.float().unsqueeze(1) / 127
        torch.testing.assert_close(linears[name].weight, expected, rtol=0, atol=1e-7, msg=name)


def test_merge_refuses_a_base_that_is_not_fp32(model_cache):
    cfg = TrialConfig(name="t", index=0, model="random:tiny-llama", dataset="d", device="cpu", r=8,
                      targets="attention", target_modules=("q_proj", "v_proj"), bits=16)
    base = load_base(cfg, str(materialize_random("tiny-llama", cfg.seed)), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fp32 base"):
        M.merge(get_peft_model(base, lora_config(cfg)))


def test_tolerance_follows_what_can_separate_the_losses():
    cfg = TrialConfig(name="t", index=0, model="m", dataset="d", device="cpu", r=8, targets="attention", bits=8)
    assert M.tolerance(cfg, "trial", "float32") == M.TOLERANCE_INT8  # LLM.int8 rounded activations too
    assert M.tolerance(cfg, "original", "float32") == M.TOLERANCE_FP32  # both sides unquantized fp32
    assert M.tolerance(cfg, "trial", "bfloat16") == M.TOLERANCE_16BIT
    cuda = TrialConfig(name="t", index=0, model="m", dataset="d", device="cuda", r=8, targets="attention", bits=4)
    assert M.tolerance(cuda, "trial", "float32") == M.TOLERANCE_16BIT  # its loss was measured under bf16 autocast
    assert M.TOLERANCE_FP32 < M.TOLERANCE_INT8 < M.TOLERANCE_16BIT
