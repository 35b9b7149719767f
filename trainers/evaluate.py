"""Evaluation: the held-out loss, and generations for the post's prompts and held-out rows with the
failure modes the post names (repetition loops, very short answers, no proper ending)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainers.data import END_MARKER, POST_PROMPTS, prompt
from trainers.stats import mean_se, ratio_se

# Tokens per evaluation forward pass (padding included). Its logits, about 10 bytes a token per vocabulary
# entry in all, are a trial's memory peak when training needs less (sweep/plan.py counts them).
EVAL_BATCH_TOKENS = {"cuda": 8192, "cpu": 4096}


@dataclass(frozen=True)
class HeldoutLoss:
    """Summed next-token cross-entropy and target-token count of each held-out example."""

    sums: list[float]
    counts: list[int]

    @property
    def mean(self) -> float:
        """Mean loss per target token over the whole split: independent of how examples are batched
        (transformers' Trainer.evaluate averages per-batch means, which moves with the batch size)."""
        return sum(self.sums) / max(sum(self.counts), 1)

    @property
    def se(self) -> float:
        """Standard error of ``mean`` over held-out examples (``trainers/stats.py`` says how)."""
        return ratio_se(self.sums, self.counts)


@torch.no_grad()
def heldout_loss(model, input_ids: list[list[int]], pad_id: int, device: str,
                 autocast: bool | None = None) -> HeldoutLoss:
    """Teacher-forced loss of every example (as tokenized for training), in length-sorted padded batches.

    Sorting keeps padding small and changes nothing: each example's loss is computed on its own and
    summed. On CUDA it runs under bf16 autocast, as the Trainer trains and evaluates, unless ``autocast``
    is False (a merged model is measured as it was stored: bf16 autocast would round an fp32 merge).
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    sums, counts = [0.0] * len(input_ids), [0] * len(input_ids)
    if autocast is None:
        autocast = device == "cuda"
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(input_ids[order[end]]) <= EVAL_BATCH_TOKENS[device]:
            end += 1
        batch = [input_ids[i] for i in order[start:end]]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        with cast:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        token_loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none")
        per_row = token_loss.view(len(batch), -1).sum(1).tolist()
        for row, i in enumerate(order[start:end]):
            sums[i], counts[i] = per_row[row], len(input_ids[i]) - 1
        start = end
    model.train(was_training)
    return HeldoutLoss(sums, counts)


def repeated_ngram_rate(seq, n: int = 3) -> float:
    """Share of n-grams of ``seq`` (token ids, or words) that repeat an earlier one: 0 for fresh text,
    near 1 for a loop. Generations are scored on token ids, so a loop of newlines counts too."""
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased words (longest common subsequence). Written here rather than
    pulling in rouge-score and its nltk dependency for twenty lines."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def quality_prompts(test_split, heldout: int) -> list[dict]:
    """The post's two prompts (no reference) and the first ``heldout`` test rows (with reference)."""
    items = [{"product": p, "category": c, "reference": None, "source": "post"} for p, c in POST_PROMPTS]
    for row in test_split.select(range(min(heldout, len(test_split)))):
        items.append({"product": row["product"], "category": row["category"],
                      "reference": row["description"], "source": "test"})
    return items


@torch.no_grad()
def generate(model, tokenizer, items: list[dict], max_new_tokens: int) -> list[dict]:
    """Greedy generation (as the post read its outputs), batched with left padding, stopping at the end marker."""
    texts = [prompt(it["product"], it["category"]) for it in items]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    was_training = model.training
    model.eval()
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, stop_strings=[END_MARKER],
                         tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    results = []
    for it, row in zip(items, out[:, enc["input_ids"].shape[1]:]):
        ids = [t for t in row.tolist() if t not in tokenizer.all_special_ids]
        raw = tokenizer.decode(ids)
        ended = END_MARKER in raw
        text = raw.split(END_MARKER)[0]
        body = tokenizer(text, add_special_tokens=False)["input_ids"] if ended else ids
        results.append({**it, "generation": text.strip(), "ended": ended,
                        "repeat_rate": repeated_ngram_rate(body)})
    return results


def generation_metrics(results: list[dict]) -> dict:
    """Means over the generations; ROUGE-L over the held-out rows with its standard error across them."""
    rouge = [rouge_l(r["generation"], r["reference"]) for r in results if r["reference"]]
    n = max(len(results), 1)
    return {
        "repeat_ngram_rate": sum(r["repeat_rate"] for r in results) / n,
        "gen_mean_words": sum(len(r["generation"].split()) for r in results) / n,
        "end_marker_rate": sum(r["ended"] for r in results) / n,
        "rouge_l": sum(rouge) / len(rouge) if rouge else 0.0,
        "rouge_l_se": mean_se(rouge),
    }


def format_generations(results: list[dict]) -> str:
    """Plain text for people (and the MLflow artifact)."""
    blocks = []
    for r in results:
        head = f"## {r['product']} ({r['category']}) [{r['source']}]"
        body = r["generation"] + ("\n### End" if r["ended"] else "\n[no end marker]")
        ref = f"\n--- reference ---\n{r['reference']}" if r["reference"] else ""
        blocks.append(f"{head}\n{body}{ref}\n")
    return "\n".join(blocks)
