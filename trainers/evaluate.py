"""Evaluation: the held-out losses, and generations for the space's prompts and held-out rows with the
failure modes the post names (repetition loops, very short answers, no proper ending)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainers.formats import space_prompt
from trainers.sft import loss_targets, tokenize, trl_columns
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
        (transformers' Trainer.evaluate averages per-batch means, which moves with the batch size).
        NaN when no token was a target."""
        total = sum(self.counts)
        return sum(self.sums) / total if total else math.nan

    @property
    def se(self) -> float:
        """Standard error of ``mean`` over held-out examples (``trainers/stats.py`` says how)."""
        return ratio_se(self.sums, self.counts)


def heldout_loss(model, input_ids: list[list[int]], pad_id: int, device: str,
                 targets: list[list[int]] | None = None, autocast: bool | None = None) -> HeldoutLoss:
    """Teacher-forced loss of every example (as tokenized for training); ``targets`` marks with 1 the tokens
    it is taken on (default: all, as the post trained)."""
    return heldout_losses(model, input_ids, pad_id, device, {"": targets}, autocast)[""]


@torch.no_grad()
def heldout_losses(model, input_ids: list[list[int]], pad_id: int, device: str,
                   targets: dict[str, list[list[int]] | None], autocast: bool | None = None) -> dict[str, HeldoutLoss]:
    """``heldout_loss`` for several target masks from one forward pass, in length-sorted padded batches.

    Sorting keeps padding small and changes nothing: each example's loss is computed on its own and
    summed. On CUDA it runs under bf16 autocast, as the Trainer trains and evaluates, unless ``autocast``
    is False (a merged model is measured as it was stored: bf16 autocast would round an fp32 merge).
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    out = {name: ([0.0] * len(input_ids), [0] * len(input_ids)) for name in targets}
    if autocast is None:
        autocast = device == "cuda"
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(input_ids[order[end]]) <= EVAL_BATCH_TOKENS[device]:
            end += 1
        rows = order[start:end]
        width = max(len(input_ids[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, i in enumerate(rows):
            ids[row, :len(input_ids[i])], mask[row, :len(input_ids[i])] = torch.tensor(input_ids[i]), 1
        with cast:
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False).logits
        token_loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten().to(model.device),
                                     reduction="none").view(len(rows), -1)
        for name, chosen in targets.items():
            weight = mask.clone()
            if chosen is not None:
                for row, i in enumerate(rows):
                    weight[row, :len(chosen[i])] *= torch.tensor(chosen[i])
            weight = weight[:, 1:].to(token_loss.device)  # the first token is never a target
            sums, counts = (token_loss * weight).sum(1).tolist(), weight.sum(1).tolist()
            for row, i in enumerate(rows):
                out[name][0][i], out[name][1][i] = sums[row], int(counts[row])
        start = end
    model.train(was_training)
    return {name: HeldoutLoss(sums, counts) for name, (sums, counts) in out.items()}


def loss_masks(cfg, tokenizer, split) -> tuple[list[list[int]], dict[str, list[list[int]] | None]]:
    """A split tokenized as for training, and the tokens each held-out loss is taken on: ``eval`` those the
    training loss is (loss_on; a trial's eval_loss), ``response`` the response's (the same whatever loss_on is)."""
    tokens = tokenize(trl_columns(split), tokenizer, cfg.max_seq_length, cfg.loss_on)
    return tokens["input_ids"], {"eval": loss_targets(tokens, cfg.loss_on), "response": tokens["response_mask"]}


def split_losses(cfg, model, tokenizer, split, autocast: bool | None = None) -> dict[str, HeldoutLoss]:
    """``loss_masks``' per-example held-out losses, from one pass over the split."""
    ids, masks = loss_masks(cfg, tokenizer, split)
    return heldout_losses(model, ids, tokenizer.pad_token_id, cfg.device, masks, autocast)


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


def quality_prompts(cfg, test_split) -> list[dict]:
    """The space's own prompts (no reference) and the first ``heldout_prompts`` test rows (with reference)."""
    items = [{**space_prompt(cfg, p), "reference": None, "source": "space"} for p in cfg.eval_prompts]
    for row in test_split.select(range(min(cfg.heldout_prompts, len(test_split)))):
        items.append({"title": row["title"], "prompt": row["eval_prompt"], "reference": row["reference"],
                      "source": "test"})
    return items


def _prompt_ids(tokenizer, prompt) -> list[int]:
    """A prompt's tokens exactly as its training rows begin: text through the tokenizer (BOS included),
    a conversation through the chat template, ready for the assistant's turn."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


def eos_ids(model, tokenizer) -> list[int]:
    """Every token that ends a generation: the tokenizer's EOS and the model's (a chat model's end of turn)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({*ids, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})


@torch.no_grad()
def generate(model, tokenizer, items: list[dict], max_new_tokens: int, end_marker: str = "") -> list[dict]:
    """Greedy generation (as the post read its outputs), batched with left padding, stopping at the end marker
    when there is one, else at EOS; ``ended`` says whether it got there within ``max_new_tokens``."""
    if not items:
        return []
    prompts = [_prompt_ids(tokenizer, it["prompt"]) for it in items]
    width, pad = max(map(len, prompts)), tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts]).to(model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]).to(model.device)
    was_training = model.training
    model.eval()
    stops = eos_ids(model, tokenizer)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         stop_strings=[end_marker] if end_marker else None, tokenizer=tokenizer,
                         pad_token_id=pad, eos_token_id=stops)
    model.train(was_training)
    results = []
    for it, row in zip(items, out[:, width:].tolist()):
        ids_ = [t for t in row if t not in tokenizer.all_special_ids]
        raw = tokenizer.decode(ids_)
        ended = end_marker in raw if end_marker else any(t in stops for t in row)
        text = raw.split(end_marker)[0] if end_marker else raw
        body = tokenizer(text, add_special_tokens=False)["input_ids"] if end_marker and ended else ids_
        results.append({**it, "generation": text.strip(), "ended": ended, "repeat_rate": repeated_ngram_rate(body)})
    return results


def generation_metrics(results: list[dict]) -> dict:
    """Means over the generations; ROUGE-L over the held-out rows with its standard error across them."""
    rouge = [rouge_l(r["generation"], r["reference"]) for r in results if r["reference"]]
    n = len(results)
    if not n:  # nothing generated for (no eval_prompts, heldout_prompts=0): not measured, not zero
        return dict.fromkeys(("repeat_ngram_rate", "gen_mean_words", "end_marker_rate", "rouge_l", "rouge_l_se"),
                             math.nan)
    return {
        "repeat_ngram_rate": sum(r["repeat_rate"] for r in results) / n,
        "gen_mean_words": sum(len(r["generation"].split()) for r in results) / n,
        "end_marker_rate": sum(r["ended"] for r in results) / n,
        "rouge_l": sum(rouge) / len(rouge) if rouge else math.nan,
        "rouge_l_se": mean_se(rouge),
    }


def format_generations(results: list[dict], end_marker: str = "") -> str:
    """Plain text for people (and the MLflow artifact)."""
    blocks = []
    for r in results:
        head = f"## {r['title']} [{r['source']}]"
        body = r["generation"] + (f"\n{end_marker or '[end]'}" if r["ended"] else
                                  f"\n[no {'end marker' if end_marker else 'end: max_new_tokens reached'}]")
        ref = f"\n--- reference ---\n{r['reference']}" if r["reference"] else ""
        blocks.append(f"{head}\n{body}{ref}\n")
    return "\n".join(blocks)
