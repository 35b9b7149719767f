"""Supervised fine-tuning through TRL's SFTTrainer, as the post did, on one of two paths.

``reference``: the post's (and this project's first) path, TRL's defaults: ``batch_size`` examples per
micro-batch padded to the longest, ``grad_accum`` micro-batches per optimizer step, gradient
checkpointing as the space says.

``fast``: the same optimization problem (the same ``batch_size x grad_accum`` examples per optimizer
step, in the same order, the same schedule and loss normalization), done in one padding-free
micro-batch: TRL's ``padding_free`` collator concatenates the step's examples into one row and
``trainers/attention.py`` keeps each example attending to itself only. No pad token is ever computed,
and the matrix multiplies are ``grad_accum`` times larger. The data is tokenized once, exactly as TRL
would (a test compares the ids), and handed to TRL pre-tokenized, as padding-free mode requires.

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

from trainers.config import compute_dtype_name


def adapts_output_head(model) -> bool:
    return isinstance(model.get_output_embeddings(), BaseTunerLayer)


class CountingSFTTrainer(SFTTrainer):
    """SFTTrainer that counts the real (unpadded) tokens it trains on, for an honest tokens/s."""

    real_tokens = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Still on the CPU here (moved to the device inside), so counting costs no device sync.
        mask = inputs.get("attention_mask")
        self.real_tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        return super().training_step(model, inputs, num_items_in_batch)


class LogitsLossSFTTrainer(CountingSFTTrainer):
    """SFTTrainer whose loss is cross-entropy over the model's logits: needed for adapters on lm_head, and
    what the fast path uses for every trial (one loss code path however the targets are chosen)."""

    def __init__(self, model, *args, **kwargs):
        if not adapts_output_head(model):
            super().__init__(model, *args, **kwargs)
            return
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


def tokenize(dataset, tokenizer, max_length: int):
    """The ``text`` column as TRL tokenizes it for training (EOS appended, truncated to ``max_length``),
    in one batched call; keeps the other columns."""
    eos = tokenizer.eos_token

    def encode(batch):
        texts = [t if t.endswith(eos) else t + eos for t in batch["text"]]
        return {"input_ids": tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]}

    return dataset.map(encode, batched=True)


def make_trainer(cfg, model, tokenizer, splits, output_dir: str, callbacks=(), checkpoints: bool = False) -> SFTTrainer:
    fast = cfg.trainer == "fast"
    cuda = cfg.device == "cuda"
    args = SFTConfig(
        output_dir=output_dir,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size * cfg.grad_accum if fast else cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1 if fast else cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss must show as NaN (trainers/guards.py fails the trial on it)
        max_length=None if fast else cfg.max_seq_length,  # fast: truncated by tokenize() already
        padding_free=fast,
        dataset_text_field="text",  # the post trains on the whole templated text
        packing=False,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=compute_dtype_name(cfg.device) == "bfloat16",
        use_cpu=not cuda,
        seed=cfg.train_seed,  # the seed repeats differ in training only (the split is seeded by cfg.seed)
        data_seed=cfg.train_seed,
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
    if fast:
        train = tokenize(splits["train"].select_columns(["text"]), tokenizer, cfg.max_seq_length)
        train = train.select_columns(["input_ids"])
    else:
        train = splits["train"].select_columns(["text"])
    trainer_cls = LogitsLossSFTTrainer if adapts_output_head(model) or fast else CountingSFTTrainer
    return trainer_cls(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                       callbacks=list(callbacks))
