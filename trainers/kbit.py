"""The fast path's frozen 4/8-bit base: bitsandbytes' arithmetic without its per-call overheads.

A LoRA trial never updates the base, so everything bitsandbytes rebuilds from the quantized weights
on every call can be built once. Measured on an H200 (README, "Speed"), the stock layers cost:

- 4-bit (NF4): each forward and each backward dequantizes the whole weight again. For batches over
  1,536 tokens bitsandbytes itself computes ``F.linear(x, dequantize(W))``; keeping ``dequantize(W)``
  gives bit-identical results (a test checks) at 2 bytes a parameter.
- 8-bit (LLM.int8): each forward finds the outlier columns with ``outliers.any()`` and
  ``torch.argwhere``, two host syncs per layer that stall the GPU hundreds of times a step, and
  gathers those columns; the backward rebuilds the dequantized weight and multiplies in the input's
  dtype, which after PEFT's k-bit preparation is fp32. Here the same decomposition runs without a
  sync: the int8 product of the rows' non-outlier values (bitsandbytes' own int8 kernel), plus the
  outlier columns in 16 bits as a dense product with a column mask (the other columns contribute
  exact zeros), and the input gradient in the compute dtype against a kept dequantized weight.
  Equal to bitsandbytes' reference up to 16-bit rounding (a test bounds it).

``patch(model, dtype)`` swaps the forward of every bitsandbytes layer; the modules, their weights and
everything PEFT wraps around them stay as they are.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _forward_4bit(self, x: torch.Tensor) -> torch.Tensor:
    """``bnb.nn.Linear4bit.forward`` with the dequantized weight kept (same casts, same product)."""
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    if getattr(self, "_lora_sweep_weight", None) is None:
        import bitsandbytes.functional as bnbf

        self._lora_sweep_weight = bnbf.dequantize_4bit(self.weight.data, self.weight.quant_state).to(x.dtype)
    return F.linear(x, self._lora_sweep_weight, bias).to(inp_dtype)


class Int8OutlierMatmul(torch.autograd.Function):
    """LLM.int8 (threshold outlier decomposition) with no host sync; x is 2-D, W the dequantized weight."""

    @staticmethod
    def forward(ctx, x, CB, SCB, W, bias, threshold: float):
        xh = x.to(torch.float16)  # bitsandbytes quantizes from fp16
        outliers = xh.abs() >= threshold
        cols = outliers.any(dim=0)  # stays on the device: no sync
        inliers = xh.masked_fill(outliers, 0)
        row_stats = inliers.abs().amax(dim=1).float()
        CA = torch.round(inliers.float() * (127.0 / row_stats.clamp_min(1e-30)).unsqueeze(1)).to(torch.int8)
        CA = CA.masked_fill(cols, 0)
        out = torch.ops.bitsandbytes.int8_scaled_mm(CA, CB, row_stats, SCB, bias=bias, dtype=W.dtype)
        out = out.addmm(x.to(W.dtype) * cols.to(W.dtype), W.t())
        ctx.save_for_backward(W)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        (W,) = ctx.saved_tensors
        return (grad.to(W.dtype) @ W).to(ctx.x_dtype), None, None, None, None, None


def _forward_8bit(self, x: torch.Tensor) -> torch.Tensor:
    """``bnb.nn.Linear8bitLt.forward`` for a frozen int8 weight, through Int8OutlierMatmul."""
    if self.weight.CB is not None:
        self.init_8bit_state()  # moves CB/SCB from the parameter to the layer's state, as bitsandbytes does
    CB, SCB = self.state.CB, self.state.SCB
    if getattr(self, "_lora_sweep_weight", None) is None:
        self._lora_sweep_weight = (CB.float() * (SCB.unsqueeze(1) / 127.0)).to(self._lora_sweep_dtype)
    bias = None if self.bias is None else self.bias.to(self._lora_sweep_dtype)
    out = Int8OutlierMatmul.apply(x.reshape(-1, x.shape[-1]), CB, SCB, self._lora_sweep_weight, bias,
                                  self.state.threshold)
    return out.view(*x.shape[:-1], -1).to(x.dtype)


def patch(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Give every bitsandbytes layer of ``model`` the forward above; returns how many were patched."""
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.forward = types.MethodType(_forward_4bit, module)
        elif isinstance(module, bnb.nn.Linear8bitLt) and not module.state.has_fp16_weights:
            module._lora_sweep_dtype = dtype
            module.forward = types.MethodType(_forward_8bit, module)
        else:
            continue
        count += 1
    return count
