"""Causal attention over padding-free batches: several examples concatenated in one row, each attending
only to itself.

TRL's padding-free collator (``padding_free=True``) concatenates a batch's examples and passes their
boundaries as ``cu_seq_lens_q``; transformers hands those to the attention function. Its own varlen
path is flash-attn's, which cannot be built on our GPU hosts; its SDPA path turns the packed
positions into a dense block-diagonal mask (quadratic in the whole row's length, and often routed to
a slower kernel); PyTorch's nested-tensor flash path needs a head size divisible by 8 (OpenLLaMA-3B's
is 100). So only attention is re-padded: the packed queries, keys and values are scattered into
[examples, heads, longest, head size] and run through one causal SDPA call (the flash kernel on
CUDA). With right padding and a causal mask, no real token can see a pad, so no mask is needed;
the pads' own outputs are dropped. The matrix multiplies, almost all of the work, stay padding-free.
Anything that is not a packed batch (generation, padded batches) goes to transformers' own SDPA
function unchanged. ``_loop`` (one SDPA call per example) is the reference the tests compare with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "lora_sweep_varlen"

_layout: tuple[torch.Tensor | None, tuple] = (None, ())


def _padded_layout(cu_seq_lens: torch.Tensor, device) -> tuple[torch.Tensor, int, int]:
    """(flat index of each packed token in [examples x longest], examples, longest); computed once per
    forward pass and reused by every layer (one host read of the boundaries, not one per layer)."""
    global _layout
    if _layout[0] is not cu_seq_lens:
        bounds = cu_seq_lens.tolist()
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        longest = max(lengths)
        index = torch.cat([torch.arange(n) + i * longest for i, n in enumerate(lengths)]).to(device)
        _layout = (cu_seq_lens, (index, len(lengths), longest))
    return _layout[1]


def _padded(query, key, value, cu_seq_lens, scaling, dropout):
    index, examples, longest = _padded_layout(cu_seq_lens, query.device)
    heads, dim = query.shape[1], query.shape[-1]

    def pad(x):  # [1, heads, T, d] -> [examples, heads, longest, d]
        buf = x.new_zeros(heads, examples * longest, x.shape[-1])
        buf[:, index] = x[0]
        return buf.view(heads, examples, longest, x.shape[-1]).transpose(0, 1)

    out = F.scaled_dot_product_attention(pad(query), pad(key), pad(value), is_causal=True, scale=scaling,
                                         dropout_p=dropout)
    return out.transpose(0, 1).reshape(heads, examples * longest, dim)[:, index].unsqueeze(0)


def _loop(query, key, value, cu_seq_lens, scaling, dropout):
    bounds = cu_seq_lens.tolist()
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                           scale=scaling, dropout_p=dropout)
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=2)


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = _padded(query, key, value, cu, scaling, dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def _mask(*args, attention_mask=None, **kwargs):
    """No dense mask for packed batches (the boundaries say it all); transformers' SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def compile_safe() -> None:
    """Keep the attention function out of torch.compile graphs (its layout is built on the host)."""
    global varlen_attention
    if not getattr(varlen_attention, "_lora_sweep_disabled", False):
        varlen_attention = torch.compiler.disable(varlen_attention)
        varlen_attention._lora_sweep_disabled = True
        register()


def register() -> str:
    """Make ``NAME`` a valid ``attn_implementation`` for every model; returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME
