"""The lm_head adapter: TRL alone refuses it; our trainer path trains it."""

import pytest
from peft import get_peft_model
from trl import SFTConfig, SFTTrainer

from trainers.config import TrialConfig
from trainers.data import build_splits
from trainers.models import load_base, load_config, load_tokenizer, lora_config, materialize_random, meta_model, resolve_targets
from trainers.sft import LogitsLossSFTTrainer, make_trainer


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
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert head_b.abs().sum() > 0
    assert trainer.evaluate()["eval_loss"] < before
    assert model.get_output_embeddings() is model.base_model.model.lm_head  # the constructor patch is undone
