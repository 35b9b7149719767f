"""The fast path's frozen 4/8-bit layers against bitsandbytes' own arithmetic, on the CPU."""

import copy
import types

import pytest
import torch
from bitsandbytes.autograd._functions import MatMul8bitLt

from trainers import kbit
from trainers.config import TrialConfig
from trainers.models import load_base, materialize_random


def base(model_cache, bits: int, trainer: str):
    cfg = TrialConfig(name="t", index=0, model="random:tiny-llama", dataset="d", device="cpu", r=8,
                      targets="attention", bits=bits, trainer=trainer)
    return load_base(cfg, str(materialize_random("tiny-llama", cfg.seed)))


def patched(model) -> int:
    return sum(isinstance(getattr(m, "forward", None), types.MethodType) and m.forward.__func__ in
               (kbit._forward_4bit, kbit._forward_8bit) for m in model.modules())


def inputs(width: int) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(3, 50, width) * 2.0
    x[:, :, 5] *= 8  # a column of outliers (|x| >= 6) among others that cross the threshold by chance
    assert (x.abs() >= 6).any()
    return x.requires_grad_(True)


def out_and_grad(layer, x):
    out = layer(x)
    out.sum().backward()
    grad, x.grad = x.grad, None
    return out.detach(), grad


@pytest.mark.parametrize("bits", [4, 8])
def test_fast_path_patches_every_quantized_layer_and_reference_none(model_cache, bits):
    assert patched(base(model_cache, bits, "fast")) == 14  # 2 layers x 7 projections; lm_head stays 16-bit
    assert patched(base(model_cache, bits, "reference")) == 0


def test_4bit_layer_is_bit_identical_to_bitsandbytes(model_cache):
    layer = base(model_cache, 4, "reference").model.layers[0].mlp.gate_proj
    x = inputs(layer.in_features)
    stock = out_and_grad(layer, x)
    fast = copy.deepcopy(layer)
    kbit.patch(torch.nn.Sequential(fast), torch.float32)
    ours = out_and_grad(fast, x)
    assert torch.equal(ours[0], stock[0]) and torch.equal(ours[1], stock[1])


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_8bit_layer_is_llm_int8(model_cache, dtype, tolerance):
    """Same outlier decomposition as bitsandbytes' reference LLM.int8 (its autograd function over its
    reference ops): equal in fp32, within bf16 rounding when the 16-bit parts run in bf16."""
    layer = base(model_cache, 8, "reference").model.layers[0].mlp.gate_proj
    layer.init_8bit_state()
    x = inputs(layer.in_features)
    out = MatMul8bitLt.apply(x, layer.weight, None, layer.bias, layer.state)
    out.sum().backward()
    ref_out, ref_grad, x.grad = out.detach(), x.grad, None
    fast = copy.deepcopy(layer)
    kbit.patch(torch.nn.Sequential(fast), dtype)
    ours, grad = out_and_grad(fast, x)
    error = ((ours - ref_out).norm() / ref_out.norm()).item()
    assert error < tolerance
    assert ((grad - ref_grad).norm() / ref_grad.norm()).item() < tolerance
    # the decomposition is what makes it close: int8 alone (outliers quantized with the rest) is far off
    int8_only = copy.deepcopy(layer)
    int8_only.state.threshold = 1e9
    kbit.patch(torch.nn.Sequential(int8_only), dtype)
    int8_error = ((int8_only(x).detach() - ref_out).norm() / ref_out.norm()).item()
    assert int8_error > max(1e-3, 3 * error)


@pytest.mark.parametrize("trainer, unquantized", [("fast", torch.bfloat16), ("reference", torch.float32)])
def test_kbit_preparation_keeps_the_unquantized_layers_16_bit_on_the_fast_path_only(model_cache, trainer,
                                                                                   unquantized):
    """PEFT's k-bit preparation upcasts embeddings, norms and lm_head to fp32 (the reference path, as the post
    ran it); the fast path keeps them in the compute dtype, as a 16-bit base trains. Either way the whole
    base is frozen and the quantized weights are untouched."""
    from trainers.models import prepare_kbit

    cfg = TrialConfig(name="t", index=0, model="random:tiny-llama", dataset="d", device="cpu", r=8,
                      targets="attention", bits=4, trainer=trainer)
    model = load_base(cfg, str(materialize_random("tiny-llama", cfg.seed)), dtype=torch.bfloat16)
    quantized = {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters() if p.dtype == torch.uint8}
    model = prepare_kbit(model, cfg, gradient_checkpointing=False)
    params = dict(model.named_parameters())
    unq = [n for n in params if n not in quantized]
    assert len(quantized) == 14 and len(unq) == 2 * 2 + 3  # 2 layers x 2 norms, embeddings, final norm, lm_head
    assert {params[n].dtype for n in unq} == {unquantized}
    assert {n: (params[n].dtype, params[n].data_ptr()) for n in quantized} == quantized
    assert not any(p.requires_grad for p in params.values())
