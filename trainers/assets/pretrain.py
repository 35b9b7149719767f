"""Pretrain ``desc-llama``, the offline demo's base: a small LLaMA that can write (run once by a maintainer;
the outputs are committed under trainers/assets/models/desc-llama/).

    python trainers/assets/pretrain.py ../shared/data/products.jsonl

Plain causal language modelling (no instruction template, no end marker) on the descriptions of the
products file *minus the 400 rows bundled as the demo's data* (``products-400.jsonl``): the smoke sweep
fine-tunes and evaluates on those, so the base has never seen them, as the post's OpenLLaMA had never
seen the Red Dot descriptions. The text is Debian 12 package descriptions, each under its package's
licence (``../shared/data/README.md``).

Writes a 2,048-token byte-level BPE trained on the same text, ``config.json`` (every width a multiple of
32: bitsandbytes' CPU 4-bit path asserts it), ``model.safetensors`` (bf16) and ``pretrain.json`` (the
settings and the measured losses). Seeded: the same command on the same machine and thread count gives
the same weights. A plain loop rather than transformers' Trainer: one short, readable pass over packed
blocks is all pretraining needs here, and it keeps the recipe in one screen.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "models" / "desc-llama"
VOCAB = 2048
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": 512, "hidden_act": "silu",
    "rms_norm_eps": 1e-06, "initializer_range": 0.02, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "use_cache": True,
}
SEED = 0
BLOCK = 256  # tokens per training row: the smoke sweep's max_seq_length
BATCH = 16  # rows per step
STEPS = 400
LR, WARMUP, WEIGHT_DECAY = 3e-3, 30, 0.1
VAL_DOCS = 256  # pretraining documents held out to report the language model's own loss


def documents(source: str) -> list[str]:
    """Every description of the products file except the bundled demo rows (matched by their text)."""
    demo = {json.loads(line)["description"] for line in open(HERE / "products-400.jsonl")}
    with open(source) as f:
        docs = [row["description"] for row in map(json.loads, f) if row["description"] not in demo]
    if len(docs) != 13824 - len(demo):
        raise SystemExit(f"expected the 13,824-row products file, got {len(docs) + len(demo)} rows")
    return docs


def train_tokenizer(docs: list[str]):
    from make_assets import TOKENIZER_CONFIG, train_tokenizer as bpe

    OUT.mkdir(parents=True, exist_ok=True)
    bpe([{"product": "", "category": "", "description": d} for d in docs], VOCAB, OUT, max_length=512)
    from transformers import AutoTokenizer

    assert json.loads((OUT / "tokenizer_config.json").read_text())["eos_token"] == TOKENIZER_CONFIG["eos_token"]
    return AutoTokenizer.from_pretrained(OUT)


def blocks(tok, docs: list[str]):
    """Documents as ``<s> text </s>``, concatenated and cut into BLOCK-token rows (the usual packing)."""
    import torch

    ids = [i for ds in tok([d + tok.eos_token for d in docs])["input_ids"] for i in ds]
    n = len(ids) // BLOCK
    return torch.tensor(ids[:n * BLOCK]).view(n, BLOCK)


def lr_at(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def main(source: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    random.seed(SEED)
    docs = documents(source)
    random.shuffle(docs)
    tok = train_tokenizer(docs)
    val, train = blocks(tok, docs[:VAL_DOCS]), blocks(tok, docs[VAL_DOCS:])
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(SEED)
    start, log = time.perf_counter(), []
    for step in range(STEPS):
        rows = train[torch.randint(len(train), (BATCH,), generator=gen)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # about 4x faster than fp32 here (AVX512-BF16)
            loss = model(input_ids=rows, labels=rows).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == STEPS - 1:
            log.append((step, round(loss.item(), 4)))
            print(f"step {step} loss {loss.item():.4f} {time.perf_counter() - start:.0f}s", flush=True)
    model.eval()
    with torch.no_grad():
        val_loss = sum(model(input_ids=b, labels=b).loss.item() for b in val.split(BATCH)) / len(val.split(BATCH))
    model.to(torch.bfloat16).save_pretrained(OUT)  # bf16: half the bytes; loads as fp32 on the CPU
    (OUT / "pretrain.json").write_text(json.dumps({
        "source": "products.jsonl minus products-400.jsonl (Debian 12 package descriptions)",
        "documents": len(docs), "train_tokens": train.numel(), "val_documents": VAL_DOCS, "block": BLOCK,
        "batch": BATCH, "steps": STEPS, "lr": LR, "warmup": WARMUP, "weight_decay": WEIGHT_DECAY, "seed": SEED,
        "parameters": sum(p.numel() for p in model.parameters()), "val_loss": round(val_loss, 4),
        "train_loss_log": log, "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
    }, indent=1) + "\n")
    print(f"val loss {val_loss:.4f}; wrote {OUT}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main(sys.argv[1])
