"""``torch.compile`` for the fast path, one decoder layer at a time (``Settings.compile``).

A 3B LoRA step at the paper's 16 x ~150 tokens is bound by kernel launches, not by the GPU's math: a
profile on an H200 showed ~5,700 launches a step for all-linear r8, the GPU busy 38% of the time.
Compiling each decoder layer fuses its norms, rotary embedding, LoRA dropout/scale/add and casts, and
runs the rest through Inductor's lighter wrapper. "Regional" compilation (transformers' and PyTorch's
recommendation): all layers share one compiled graph, so it costs one compile per layer shape, not 26;
the token count changes every step, so shapes are dynamic from the start. Attention is left out
(``torch.compiler.disable``): its packed-batch layout is built from the boundaries on the host once a
forward pass (``trainers/attention.py``), which a graph cannot hold.

Off by default: on an H200 it raised steady-state tokens/s by 6% (r8 attention 4-bit), 15% (all-linear
4-bit) and 28% (all-linear 8-bit), but the first step spent 50-83 s compiling, more than a paper-scale
trial saves unless Inductor's on-disk cache already holds the graphs (README, "Speed").
"""

from __future__ import annotations

import torch


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The repeated blocks of a (PEFT-wrapped) causal LM: the largest ModuleList of identical modules."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0
             and len({type(x) for x in m}) == 1]
    if not lists:
        raise ValueError("no repeated decoder layers to compile")
    return max(lists, key=len)


def compile_layers(model: torch.nn.Module) -> int:
    """Compile every decoder layer of ``model`` in place; returns how many."""
    from trainers import attention

    attention.compile_safe()
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def uncompile_layers(model: torch.nn.Module) -> None:
    """Back to eager (evaluation and generation run other shapes, with a KV cache)."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None
