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
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.data_utils import common_prefix_length

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


# TRL's three dataset shapes (trainers/formats.py renders every format into one) and their columns.
SHAPE_COLUMNS = {"text": ["text"], "prompt_completion": ["prompt", "completion"], "messages": ["messages"]}


def shape(dataset) -> str:
    columns = dataset.column_names
    return "messages" if "messages" in columns else "prompt_completion" if "completion" in columns else "text"


def trl_columns(split):
    """A split's columns in TRL's shape, without the raw and evaluation ones."""
    return split.select_columns(SHAPE_COLUMNS[shape(split)])


def trl_chat_template(tokenizer, loss_on: str) -> str | None:
    """The chat template TRL tokenizes conversations with: under assistant_only_loss, when the tokenizer's own
    has no ``{% generation %}`` markers, TRL's training version of it (ValueError for one TRL does not know);
    otherwise the tokenizer's own (None)."""
    if loss_on != "assistant" or has_generation_markers(tokenizer.chat_template or ""):
        return None
    return get_training_chat_template(tokenizer)


def _with_eos(texts: list[str], eos: str) -> list[str]:
    return [t if t.endswith(eos) else t + eos for t in texts]  # as TRL's add_eos


def _encode_text(batch, tokenizer, loss_on):
    ids = tokenizer(_with_eos(batch["text"], tokenizer.eos_token))["input_ids"]
    return ids, [[1] * len(x) for x in ids]  # all of it is the response


def _encode_prompt_completion(batch, tokenizer, loss_on):
    prompts, completions = batch["prompt"], batch["completion"]
    if isinstance(prompts[0], list):  # conversational: the chat template ends the turn, no EOS is added
        prompt_ids = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        ids = tokenizer.apply_chat_template([p + c for p, c in zip(prompts, completions)], tokenize=True,
                                            return_dict=True)["input_ids"]
    else:
        prompt_ids = tokenizer(prompts)["input_ids"]
        ids = tokenizer([p + c for p, c in zip(prompts, _with_eos(completions, tokenizer.eos_token))])["input_ids"]
    # TRL: the completion starts where the two tokenizations diverge (not always after the prompt)
    starts = [common_prefix_length(p, x) for p, x in zip(prompt_ids, ids)]
    return ids, [[0] * n + [1] * (len(x) - n) for n, x in zip(starts, ids)]


def _encode_messages(batch, tokenizer, loss_on):
    template = trl_chat_template(tokenizer, loss_on)
    out = tokenizer.apply_chat_template(batch["messages"], tokenize=True, return_dict=True, chat_template=template,
                                        return_assistant_tokens_mask=has_generation_markers(
                                            template or tokenizer.chat_template or ""))
    ids = out["input_ids"]
    # without {% generation %} markers the assistant tokens are unknown: no response measures (NaN)
    return ids, out.get("assistant_masks") or [[0] * len(x) for x in ids]


def tokenize(dataset, tokenizer, max_length: int, loss_on: str = "all"):
    """The rendered rows as TRL 1.16's SFTTrainer tokenizes them for training, in batched calls: EOS appended
    to non-chat text and completions, chat rendered by the template TRL would use, cut to ``max_length``
    (TRL's keep_start). Adds ``input_ids``, ``response_mask`` (1 on the response's tokens: the completion,
    assistant turns, all of ``text``; TRL's completion_mask / assistant_masks), and the uncut ``full_length``
    and ``response_tokens``; keeps the other columns."""
    encode = {"text": _encode_text, "prompt_completion": _encode_prompt_completion,
              "messages": _encode_messages}[shape(dataset)]

    def batch_fn(batch):
        ids, masks = encode(batch, tokenizer, loss_on)
        return {"input_ids": [x[:max_length] for x in ids], "response_mask": [m[:max_length] for m in masks],
                "full_length": [len(x) for x in ids], "response_tokens": [sum(m) for m in masks]}

    return dataset.map(batch_fn, batched=True)


def trl_ready(tokenized, loss_on: str):
    """What TRL's preparation hands its label builder, for the fast path: ``input_ids`` with the mask its
    tokenizer step names ``completion_mask`` (prompt-completion rows; applied under completion_only_loss) or
    ``assistant_masks`` (conversations under assistant_only_loss; always applied), and without the rows its
    truncation left with no token to learn from. Returns the dataset and the number of rows dropped."""
    kind = shape(tokenized)
    mask = "completion_mask" if kind == "prompt_completion" else "assistant_masks" if loss_on == "assistant" else None
    ds = tokenized.select_columns(["input_ids", "response_mask"])
    before = len(ds)
    if loss_on != "all":
        ds = ds.filter(lambda row: any(row["response_mask"]))
    ds = ds.rename_column("response_mask", mask) if mask else ds.remove_columns("response_mask")
    return ds, before - len(ds)


def loss_targets(tokenized, loss_on: str) -> list[list[int]] | None:
    """Which tokens of each row the loss is taken on (None: all of them)."""
    return None if loss_on == "all" else tokenized["response_mask"]


def length_stats(tokenized, max_length: int, dropped: int) -> dict:
    """How much ``max_length`` cuts: rows cut, response tokens lost (of all the rows' response tokens), rows
    left with nothing to learn from."""
    rows, full = len(tokenized), tokenized["full_length"]
    total = sum(tokenized["response_tokens"])
    lost = total - sum(map(sum, tokenized["response_mask"]))
    cut = sum(n > max_length for n in full)
    return {"truncated_rows": cut, "truncated_pct": 100.0 * cut / rows if rows else 0.0,
            "response_tokens_lost": lost, "response_lost_pct": 100.0 * lost / total if total else float("nan"),
            "dropped_rows": dropped}


def make_trainer(cfg, model, tokenizer, splits, output_dir: str, callbacks=(), checkpoints: bool = False,
                 train_data=None) -> SFTTrainer:
    """The trial's SFTTrainer; ``train_data`` is the train split through ``tokenize`` and ``trl_ready`` (the fast
    path's data), when the caller has it already."""
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
        dataset_text_field="text",
        # What the loss is taken on, by TRL's own masks. The fast path's data comes pre-tokenized, where TRL
        # refuses assistant_only_loss; its assistant_masks column (which TRL always applies) does the same.
        completion_only_loss=cfg.loss_on == "completion",
        assistant_only_loss=cfg.loss_on == "assistant" and not fast,
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
        if train_data is None:
            tokenized = tokenize(trl_columns(splits["train"]), tokenizer, cfg.max_seq_length, cfg.loss_on)
            train_data = trl_ready(tokenized, cfg.loss_on)[0]
        train = train_data
    else:
        train = trl_columns(splits["train"])
    trainer_cls = LogitsLossSFTTrainer if adapts_output_head(model) or fast else CountingSFTTrainer
    return trainer_cls(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                       callbacks=list(callbacks))
