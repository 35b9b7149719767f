"""The trainer paths: TRL alone refuses an lm_head adapter, ours trains it; the fast path trains the same
problem as the reference; its attention and tokenization; the held-out loss."""

import pytest
from peft import get_peft_model
from trl import SFTConfig, SFTTrainer

from trainers.config import TrialConfig
from trainers.data import build_splits
from trainers.evaluate import heldout_loss
from trainers.models import load_base, load_config, load_tokenizer, lora_config, materialize_random, meta_model, resolve_targets
from trainers.sft import LogitsLossSFTTrainer, make_trainer, tokenize


@pytest.fixture()
def setup(model_cache, tmp_path):
    modules = resolve_targets(meta_model(load_config("random:tiny-llama")), "all_linear")
    cfg = TrialConfig(name="t", index=0, model="random:tiny-llama", dataset="bundled:products-400", device="cpu",
                      r=4, targets="all_linear", bits=16, target_modules=modules, learning_rate=3e-3, epochs=1,
                      batch_size=8, train_samples=80, logging_steps=2)
    path = str(materialize_random("tiny-llama", cfg.seed))
    model = get_peft_model(load_base(cfg, path), lora_config(cfg))
    return cfg, model, load_tokenizer(path), build_splits(cfg.dataset, cfg.train_samples, cfg.test_fraction, cfg.seed)


def test_trl_alone_refuses_an_lm_head_adapter(setup, tmp_path):
    cfg, model, tok, splits = setup
    with pytest.raises(ValueError, match="lm_head"):
        SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                   train_dataset=splits["train"].select_columns(["text"]), processing_class=tok)


def test_logits_loss_trainer_trains_the_lm_head_adapter(setup, tmp_path):
    cfg, model, tok, splits = setup
    trainer = make_trainer(cfg, model, tok, splits, str(tmp_path))
    assert type(trainer) is LogitsLossSFTTrainer
    head_b = model.base_model.model.lm_head.lora_B["default"].weight
    assert head_b.abs().sum() == 0
    test_ids = tokenize(splits["test"], tok, cfg.max_seq_length)["input_ids"]
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


def test_tokenize_gives_the_ids_trl_would(model_cache, tmp_path):
    """The fast path hands TRL pre-tokenized data (padding-free mode requires it): the ids must be TRL's."""
    cfg = trial_cfg("reference", "attention", 16)
    path = str(materialize_random("tiny-llama", cfg.seed))
    model = get_peft_model(load_base(cfg, path), lora_config(cfg))
    tok = load_tokenizer(path)
    splits = build_splits(cfg.dataset, cfg.train_samples, cfg.test_fraction, cfg.seed)
    trl_ids = make_trainer(cfg, model, tok, splits, str(tmp_path)).train_dataset["input_ids"]
    assert tokenize(splits["train"], tok, cfg.max_seq_length)["input_ids"] == trl_ids
    assert max(map(len, trl_ids)) == cfg.max_seq_length  # some rows really are truncated


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
    ids = tokenize(build_splits(cfg.dataset, 200, 0.1, cfg.seed)["test"], tok, cfg.max_seq_length)["input_ids"]
    whole = evaluate.heldout_loss(model, ids, tok.pad_token_id, "cpu")
    monkeypatch.setitem(evaluate.EVAL_BATCH_TOKENS, "cpu", 1)  # one example per forward pass
    single = evaluate.heldout_loss(model, ids, tok.pad_token_id, "cpu")
    assert single.counts == whole.counts == [len(x) - 1 for x in ids]
    assert single.mean == pytest.approx(whole.mean, rel=1e-5)
    assert single.sums == pytest.approx(whole.sums, rel=1e-4)
