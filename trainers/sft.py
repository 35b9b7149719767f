"""Supervised fine-tuning through TRL's SFTTrainer, as the post did.

TRL 1.16 computes its loss by multiplying hidden states by ``lm_head.weight`` directly (a fused,
chunked head), and therefore refuses a PEFT adapter on ``lm_head``: the adapter would never train.
The post's "all linear" set includes lm_head. ``LogitsLossSFTTrainer`` is the small subclass that
makes that case train: the loss comes from the model's own logits (``Trainer.compute_loss``), which
run through ``lm_head.forward`` and so through its adapter. Everything else stays TRL's.
"""

from __future__ import annotations

import transformers
from peft.tuners.tuners_utils import BaseTunerLayer
from trl import SFTConfig, SFTTrainer


def adapts_output_head(model) -> bool:
    return isinstance(model.get_output_embeddings(), BaseTunerLayer)


class LogitsLossSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is cross-entropy over the model's logits, for adapters on lm_head."""

    def __init__(self, model, *args, **kwargs):
        # Hide the head's adapter from SFTTrainer's constructor check only; compute_loss below is what
        # makes training it correct.
        head = model.get_output_embeddings()
        model.get_output_embeddings = lambda: head.base_layer
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            del model.get_output_embeddings

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs["use_cache"] = False
        return transformers.Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


def make_trainer(cfg, model, tokenizer, splits, output_dir: str, callbacks=(), checkpoints: bool = False) -> SFTTrainer:
    cuda = cfg.device == "cuda"
    args = SFTConfig(
        output_dir=output_dir,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        max_length=cfg.max_seq_length,
        dataset_text_field="text",  # the post trains on the whole templated text
        packing=False,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=cuda,
        use_cpu=not cuda,
        seed=cfg.seed,
        data_seed=cfg.seed,
        eval_strategy="no",
        # Checkpoints (adapter, optimizer, scheduler, RNG, step) let an interrupted trial resume mid-way;
        # the trial hands each one to Ray Tune, so one local copy is enough.
        save_strategy="steps" if checkpoints else "no",
        save_steps=cfg.checkpoint_every,
        save_total_limit=1,
        report_to=[],  # tracking is the driver's job (one MLflow writer for the whole sweep)
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer_cls = LogitsLossSFTTrainer if adapts_output_head(model) else SFTTrainer
    return trainer_cls(
        model=model,
        args=args,
        train_dataset=splits["train"].select_columns(["text"]),
        eval_dataset=splits["test"].select_columns(["text"]),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
