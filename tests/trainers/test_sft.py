"""The trainer paths: TRL alone refuses an lm_head adapter, ours trains it; the fast path trains the same
problem as the reference, for every data format and whatever the loss is taken on; its attention and
tokenization; the held-out losses; what max_seq_length cuts."""

import dataclasses

import pytest
from peft import get_peft_model
from trl import SFTConfig, SFTTrainer

from tests.conftest import tiny_cfg, write_jsonl
from trainers.config import TrialConfig
from trainers.data import build_splits
from trainers.evaluate import heldout_loss, heldout_losses
from trainers.models import (load_base, load_config, load_tokenizer, lora_config, materialize_random, meta_model,
                             resolve_targets, tokenizer_path)
from trainers.sft import LogitsLossSFTTrainer, length_stats, make_trainer, tokenize, trl_columns, trl_ready


@pytest.fixture()
def setup(model_cache, tmp_path):
    modules = resolve_targets(meta_model(load_config("random:tiny-llama")), "all_linear")
    cfg = TrialConfig(name="t", index=0, model="random:tiny-llama", dataset="bundled:products-400", device="cpu",
                      r=4, targets="all_linear", bits=16, target_modules=modules, learning_rate=3e-3, epochs=1,
                      batch_size=8, train_samples=80, logging_steps=2)
    path = str(materialize_random("tiny-llama", cfg.seed))
    model = get_peft_model(load_base(cfg, path), lora_config(cfg))
    return cfg, model, load_tokenizer(path), build_splits(cfg)


def test_trl_alone_refuses_an_lm_head_adapter(setup, tmp_path):
    cfg, model, tok, splits = setup
    with pytest.raises(ValueError, match="lm_head"):
        SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                   train_dataset=trl_columns(splits["train"]), processing_class=tok)


def test_logits_loss_trainer_trains_the_lm_head_adapter(setup, tmp_path):
    cfg, model, tok, splits = setup
    trainer = make_trainer(cfg, model, tok, splits, str(tmp_path))
    assert type(trainer) is LogitsLossSFTTrainer
    head_b = model.base_model.model.lm_head.lora_B["default"].weight
    assert head_b.abs().sum() == 0
    test_ids = tokenize(trl_columns(splits["test"]), tok, cfg.max_seq_length)["input_ids"]
    before = heldout_loss(model, test_ids, tok.pad_token_id, "cpu").mean
    trainer.train()
    assert head_b.abs().sum() > 0
    assert heldout_loss(model, test_ids, tok.pad_token_id, "cpu").mean < before
    assert model.get_output_embeddings() is model.base_model.model.lm_head  # the constructor patch is undone


def trial_cfg(path: str, targets: str, bits: int) -> TrialConfig:
    modules = resolve_targets(meta_model(load_config("random:tiny-llama")), targets)
    return TrialConfig(name="t", index=0, model="random:tiny-llama", dataset="bundled:products-400", device="cpu",
                       r=8, targets=targets, bits=bits, target_modules=modules, learning_rate=3e-3, epochs=1,
                       batch_size=4, grad_accum=2, train_samples=160, logging_steps=1, lora_dropout=0.0,
                       max_new_tokens=4, heldout_prompts=0, trainer=path)


@pytest.mark.parametrize("targets, bits", [("all_linear", 16), ("attention", 4)])
def test_fast_path_trains_the_same_problem_as_the_reference(model_cache, tmp_path, targets, bits):
    """Same examples per step, same order, schedule and normalization: the per-step losses agree to float
    rounding (measured: <= 1e-6 relative in fp32 on the CPU), though the fast path does each step in one
    padding-free micro-batch of 8 where the reference pads micro-batches of 4 and accumulates two."""
    from trainers.trial import run_trial

    runs = {}
    for path in ("reference", "fast"):
        steps = []
        result = run_trial(trial_cfg(path, targets, bits), tmp_path / path, report=steps.append)
        runs[path] = (result, [s["loss"] for s in steps if s["report"] == "step"])
    (ref, ref_losses), (fast, fast_losses) = runs["reference"], runs["fast"]
    assert ref.train_steps == fast.train_steps == 18  # 144 examples / 8 per step
    assert ref.train_tokens == fast.train_tokens > 0  # the same real tokens, none of them padding
    assert len(ref_losses) == len(fast_losses) == 18
    assert fast_losses == pytest.approx(ref_losses, rel=1e-5)
    assert fast_losses[-1] < fast_losses[0]
    assert fast.eval_loss == pytest.approx(ref.eval_loss, rel=1e-5)


def test_varlen_attention_keeps_examples_apart():
    """Packed examples through the registered attention = each example alone through SDPA."""
    import torch

    from trainers import attention

    torch.manual_seed(0)
    lens, heads, dim = [5, 9, 3], 4, 8
    q, k, v = (torch.randn(1, heads, sum(lens), dim) for _ in range(3))
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    module = torch.nn.Module()
    out, _ = attention.varlen_attention(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=9)
    assert torch.allclose(out, attention._loop(q, k, v, cu, None, 0.0).transpose(1, 2), atol=1e-6)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                                                 is_causal=True)
        assert torch.allclose(out[:, s:e], alone.transpose(1, 2), atol=1e-6)
    # attending across the boundary would change the second example's first token
    leaked = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert not torch.allclose(out[:, 5], leaked[:, 5], atol=1e-3)


def test_heldout_loss_does_not_depend_on_batching(model_cache, monkeypatch):
    from trainers import evaluate

    cfg = trial_cfg("fast", "attention", 16)
    path = str(materialize_random("tiny-llama", cfg.seed))
    model, tok = load_base(cfg, path), load_tokenizer(path)
    ids = tokenize(trl_columns(build_splits(dataclasses.replace(cfg, train_samples=200))["test"]), tok,
                   cfg.max_seq_length)["input_ids"]
    whole = evaluate.heldout_loss(model, ids, tok.pad_token_id, "cpu")
    monkeypatch.setitem(evaluate.EVAL_BATCH_TOKENS, "cpu", 1)  # one example per forward pass
    single = evaluate.heldout_loss(model, ids, tok.pad_token_id, "cpu")
    assert single.counts == whole.counts == [len(x) - 1 for x in ids]
    assert single.mean == pytest.approx(whole.mean, rel=1e-5)
    assert single.sums == pytest.approx(whole.sums, rel=1e-4)


# ---- every data format, both paths ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shaped_files(tmp_path_factory):
    """The bundled products as an Alpaca file and as a plain-text file (the chat one is bundled)."""
    import json

    from trainers.data import ASSETS

    rows = [json.loads(line) for line in (ASSETS / "products-400.jsonl").read_text().splitlines()]
    d = tmp_path_factory.mktemp("shaped")
    alpaca = [{"instruction": f"Describe the {r['product']}.", "input": r["category"], "output": r["description"]}
              for r in rows]
    return {"alpaca": str(write_jsonl(d / "alpaca.jsonl", alpaca)),
            "text": str(write_jsonl(d / "text.jsonl", [{"text": f"{r['product']}\n{r['description']}"} for r in rows]))}


# Each format and what the loss is taken on. max_seq_length=200 cuts most rows (160-530 tokens with the tiny
# tokenizer; 128 for the 100-263-token conversations) but not all; 104 leaves some of the post's 94-114-token
# prompts alone, with nothing to learn from under a completion-only loss (TRL drops those rows).
FORMAT_CASES = {
    "post, all": dict(),
    "post, completion": dict(loss_on="completion"),
    "post, completion, prompts that fill the limit": dict(loss_on="completion", max_seq_length=104),
    "post as a chat turn, completion": dict(template="chat", loss_on="completion"),
    "alpaca, completion": dict(data_format="alpaca", loss_on="completion"),
    "messages, all": dict(data_format="messages", dataset="bundled:products-chat-200", max_seq_length=128),
    "messages, assistant": dict(data_format="messages", dataset="bundled:products-chat-200", loss_on="assistant",
                                max_seq_length=128),
    "text": dict(data_format="text"),
}


def format_cfg(case: str, files: dict, **overrides) -> TrialConfig:
    settings = dict(FORMAT_CASES[case])
    if settings.get("data_format") in files:
        settings["dataset"] = files[settings["data_format"]]
    return tiny_cfg(**{"max_seq_length": 200, "train_samples": 60, **settings, **overrides})


def tiny_model(cfg: TrialConfig):
    import torch

    path = str(materialize_random("tiny-llama", cfg.seed))
    torch.manual_seed(cfg.seed)
    return get_peft_model(load_base(cfg, path), lora_config(cfg)), load_tokenizer(tokenizer_path(cfg.model, path))


@pytest.mark.parametrize("case", FORMAT_CASES)
def test_tokenize_gives_the_ids_and_labels_trl_would(model_cache, tmp_path, shaped_files, case):
    """The fast path hands TRL pre-tokenized data (padding-free mode requires it): after TRL builds labels from our
    masks, ids and labels must be exactly those of TRL's own preparation of the same rows (the reference path),
    with the same rows dropped; and the labels keep exactly the response where the loss is on it."""
    cfg = format_cfg(case, shaped_files, trainer="fast")
    model, tok = tiny_model(cfg)
    splits = build_splits(cfg)
    trl = make_trainer(dataclasses.replace(cfg, trainer="reference"), model, tok, splits, str(tmp_path)).train_dataset
    ours = make_trainer(cfg, model, tok, splits, str(tmp_path)).train_dataset
    assert ours["input_ids"] == trl["input_ids"] and ours["labels"] == trl["labels"]
    tokens = tokenize(trl_columns(splits["train"]), tok, cfg.max_seq_length, cfg.loss_on)
    stats = length_stats(tokens, cfg.max_seq_length, trl_ready(tokens, cfg.loss_on)[1])
    assert len(trl) == len(splits["train"]) - stats["dropped_rows"]
    assert stats["truncated_rows"] > 0
    if cfg.loss_on == "all":
        assert trl["labels"] == trl["input_ids"] and stats["dropped_rows"] == 0
        return
    if cfg.max_seq_length == 104:
        assert stats["dropped_rows"] > 0  # prompts that fill max_seq_length alone: dropped on both paths
        return
    whole = [i for i, n in enumerate(tokens["full_length"]) if n <= cfg.max_seq_length]
    assert whole and stats["dropped_rows"] == 0
    kept = {tuple(ids): labels for ids, labels in zip(trl["input_ids"], trl["labels"])}
    for i in whole:  # an uncut row's labels, decoded, are its response and nothing else
        learned = tok.decode([t for t in kept[tuple(tokens[i]["input_ids"])] if t != -100])
        row = splits["train"][i]
        # a chat completion is everything after the prompt, the template's "\n" after the turn's EOS included;
        # assistant masks are the {% generation %} spans: each reply and its EOS
        expected = (row["completion"][0]["content"] + tok.eos_token + "\n" if cfg.template == "chat" else
                    row["completion"] + tok.eos_token if "completion" in row else
                    "".join(m["content"] + tok.eos_token for m in row["messages"] if m["role"] == "assistant"))
        assert learned == expected


def test_length_stats_count_rows_and_response_tokens_cut():
    """Two rows of known length through the tiny tokenizer: exact counts of what a limit cuts."""
    from datasets import Dataset

    tok = load_tokenizer(tokenizer_path("random:tiny-llama", ""))
    rows = Dataset.from_dict({"prompt": ["Name:\n"] * 2, "completion": ["Mouse", "Vacuum cleaner with a long cord"]})
    full = [len(tok(p + c + tok.eos_token)["input_ids"]) for p, c in zip(rows["prompt"], rows["completion"])]
    prompt_len = len(tok("Name:\n")["input_ids"])  # a prefix of both rows' tokens: they split at the newline
    limit = full[0]  # the first row fits exactly, the second is cut
    tokens = tokenize(rows, tok, limit, "completion")
    stats = length_stats(tokens, limit, trl_ready(tokens, "completion")[1])
    total = sum(n - prompt_len for n in full)
    assert stats == {"truncated_rows": 1, "truncated_pct": 50.0, "response_tokens_lost": full[1] - limit,
                     "response_lost_pct": 100.0 * (full[1] - limit) / total, "dropped_rows": 0}
    assert tokens["response_tokens"] == [n - prompt_len for n in full]
    tokens = tokenize(rows, tok, prompt_len, "completion")  # nothing but the prompt fits: both rows dropped
    assert trl_ready(tokens, "completion")[1] == 2 and trl_ready(tokens, "all")[1] == 0


def test_heldout_loss_on_chosen_tokens_is_the_models_own_loss(model_cache):
    """With a mask, the held-out loss is what the model's own loss gives with the other labels set to -100."""
    import torch

    cfg = tiny_cfg(loss_on="completion")
    path = str(materialize_random("tiny-llama", cfg.seed))
    model, tok = load_base(cfg, path), load_tokenizer(path)
    tokens = tokenize(trl_columns(build_splits(cfg)["test"].select(range(3))), tok, 256, "completion")
    losses = heldout_losses(model, tokens["input_ids"], tok.pad_token_id, "cpu",
                            {"chosen": tokens["response_mask"], "all": None})
    for i, (ids, mask) in enumerate(zip(tokens["input_ids"], tokens["response_mask"])):
        labels = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])[None]
        with torch.no_grad():
            own = model(input_ids=torch.tensor(ids)[None], labels=labels).loss.item()
            every = model(input_ids=torch.tensor(ids)[None], labels=torch.tensor(ids)[None]).loss.item()
        assert losses["chosen"].sums[i] / losses["chosen"].counts[i] == pytest.approx(own, rel=1e-5)
        assert losses["chosen"].counts[i] == sum(mask[1:])
        assert losses["all"].sums[i] / losses["all"].counts[i] == pytest.approx(every, rel=1e-5)


def test_the_posts_eval_loss_is_unchanged(model_cache):
    """The post's rows, tokenized through the prompt/completion shape, give the held-out loss main gave through its
    text column: 6.946498643161008 for the untrained tiny model on the 40 test rows of 400 (seed 42), 9,439 tokens."""
    cfg = tiny_cfg(train_samples=400, heldout_prompts=0)
    path = str(materialize_random("tiny-llama", cfg.seed))
    model, tok = load_base(cfg, path), load_tokenizer(path)
    ids = tokenize(trl_columns(build_splits(cfg)["test"]), tok, cfg.max_seq_length)["input_ids"]
    loss = heldout_loss(model, ids, tok.pad_token_id, "cpu")
    assert sum(loss.counts) + len(ids) == 9439
    assert loss.mean == pytest.approx(6.946498643161008, rel=1e-6)


@pytest.mark.slow  # trains
@pytest.mark.parametrize("case", ["post, completion", "messages, assistant"])
def test_a_restricted_loss_trains_the_same_on_both_paths(model_cache, tmp_path, shaped_files, case):
    """The completion / assistant masks reach both paths identically: per-step losses agree to float rounding."""
    losses = {}
    for path in ("reference", "fast"):
        cfg = format_cfg(case, shaped_files, trainer=path, max_steps=4, max_seq_length=128)
        model, tok = tiny_model(cfg)
        trainer = make_trainer(cfg, model, tok, build_splits(cfg), str(tmp_path / path))
        trainer.train()
        losses[path] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses["fast"]) == 4
    assert losses["fast"] == pytest.approx(losses["reference"], rel=1e-5)


@pytest.mark.slow  # trains twice and compiles (about 40 s on two cores)
def test_compiled_layers_train_the_same_losses_as_eager(model_cache, tmp_path, monkeypatch):
    """``compile=true`` (torch.compile per decoder layer, fast path) changes how the step runs, not what it
    computes: the same per-step losses as eager to float rounding (measured: 5e-7 relative on the CPU), the
    layers really compiled, and back to eager for evaluation and generation."""
    import torch._dynamo

    from trainers import compiling
    from trainers.trial import run_trial

    released, uncompile = [], compiling.uncompile_layers

    def compiled_layers(model):
        return [layer._compiled_call_impl is not None for layer in compiling.decoder_layers(model)]

    def spy(model):
        released.append(compiled_layers(model))
        uncompile(model)
        released.append(compiled_layers(model))

    monkeypatch.setattr(compiling, "uncompile_layers", spy)
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        steps = []
        cfg = dataclasses.replace(trial_cfg("fast", "all_linear", 4), compile=compiled, epochs=0.5)
        result = run_trial(cfg, tmp_path / str(compiled), report=steps.append)
        runs[compiled] = (result, [s["loss"] for s in steps if s["report"] == "step"])
    assert released == [[True, True], [False, False]]  # both layers compiled for training, eager for evaluation
    (eager, eager_losses), (comp, comp_losses) = runs[False], runs[True]
    assert len(comp_losses) == len(eager_losses) == 9
    assert comp_losses == pytest.approx(eager_losses, rel=1e-5)
    assert comp.eval_loss == pytest.approx(eager.eval_loss, rel=1e-5)
