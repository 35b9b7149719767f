"""One trial, in the post's order: load data -> load base (bits) -> attach LoRA -> train -> evaluate ->
generate -> save adapter -> report.

``run_trial`` is plain Python (tests call it directly); ``tune_trainable`` is the Ray Tune function
trainable the driver schedules, one GPU-pinned process per trial.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import PrinterCallback, TrainerCallback

from sweep.space import TrialConfig
from trainers.data import build_splits, fingerprint
from trainers.evaluate import format_generations, generate, generation_metrics, quality_prompts
from trainers.models import checkpoint_path, load_base, load_tokenizer, lora_config
from trainers.sft import make_trainer

Report = Callable[[dict], None]


class StepReporter(TrainerCallback):
    """Forwards every logged training step (loss, learning rate) to the driver."""

    def __init__(self, report: Report):
        self.report = report
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            self.report({"loss": float(logs["loss"]), "learning_rate": float(logs.get("learning_rate", 0.0)),
                         "step": state.global_step, "epoch": float(state.epoch or 0.0)})


def quantized_layers(model) -> dict[str, int]:
    """Count bitsandbytes layers by class, so a report proves the base really is 4- or 8-bit."""
    counts: dict[str, int] = {}
    for m in model.modules():
        name = type(m).__name__
        if name in ("Linear4bit", "Linear8bitLt") and type(m).__module__.startswith("bitsandbytes"):
            counts[name] = counts.get(name, 0) + 1
    return counts


def device_info(cuda: bool) -> dict:
    if not cuda:
        return {"device_name": "cpu", "gpu_uuid": ""}
    props = torch.cuda.get_device_properties(0)
    return {"device_name": props.name, "gpu_uuid": str(props.uuid)}


def run_trial(cfg: TrialConfig, out_dir: Path, report: Report | None = None) -> dict:
    """Train and evaluate one configuration; writes adapter/, generations.{md,json}, metrics.json to out_dir."""
    report = report or (lambda metrics: None)
    cuda = cfg.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("trial asks for device=cuda but no CUDA GPU is visible to it")
    if not cuda:
        torch.set_num_threads(cfg.cpus_per_trial)
    torch.manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))  # what export needs to rebuild it

    # 1. data
    splits = build_splits(cfg.dataset, cfg.train_samples, cfg.test_fraction, cfg.seed)

    # 2. base model in 4, 8 or 16 bits
    path = checkpoint_path(cfg)
    tokenizer = load_tokenizer(path, cfg.trust_remote_code)
    model = load_base(cfg, path)
    bnb = quantized_layers(model)
    if cfg.bits in (4, 8):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)

    # 3. LoRA. The baseline gets one too: PEFT starts every lora_B at zero, so the untrained adapter is
    # exactly the base model, and its eval loss and generations come from the very same code as a trial's.
    model = get_peft_model(model, lora_config(cfg))
    trainable, total = model.get_nb_trainable_parameters()
    if cfg.baseline:
        trainable, total = 0, total - trainable

    # 4. train
    steps = StepReporter(report)
    trainer = make_trainer(cfg, model, tokenizer, splits, str(out_dir / "hf"), callbacks=[steps])
    trainer.remove_callback(PrinterCallback)  # steps go to the driver, not to the worker's stdout
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if not cfg.baseline:
        trainer.train()
    train_seconds = time.perf_counter() - start
    tokens = 0 if cfg.baseline else sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * cfg.epochs

    # 5. evaluate: held-out loss, then generations for the post's prompts and test rows
    eval_loss = float(trainer.evaluate()["eval_loss"])
    results = generate(model, tokenizer, quality_prompts(splits["test"], cfg.heldout_prompts), cfg.max_new_tokens)

    # 6. save the adapter (megabytes; the base stays where it came from)
    if not cfg.baseline:
        # save_embedding_layers=False: lm_head's base weights are frozen, only its LoRA factors belong here
        model.save_pretrained(out_dir / "adapter", save_embedding_layers=False)
        tokenizer.save_pretrained(out_dir / "adapter")
    (out_dir / "generations.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    (out_dir / "generations.md").write_text(format_generations(results))

    metrics = {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100.0 * trainable / total,
        "eval_loss": eval_loss,
        "perplexity": math.exp(min(eval_loss, 50.0)),
        "train_seconds": train_seconds,
        "train_tokens_per_second": tokens / train_seconds if tokens else 0.0,
        "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "train_loss_first": steps.losses[0] if steps.losses else float("nan"),
        "train_loss_last": steps.losses[-1] if steps.losses else float("nan"),
        "train_steps": trainer.state.global_step,
        "train_examples": len(splits["train"]),
        "dataset_fingerprint": fingerprint(splits),
        "test_examples": len(splits["test"]),
        "bnb_layers": sum(bnb.values()),
        "bnb_layer_type": ",".join(sorted(bnb)) or "none",
        **device_info(cuda),
        **generation_metrics(results),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def tune_trainable(config: dict) -> None:
    """Ray Tune entry point: rebuild the typed config, run, report the result with its files as a checkpoint."""
    from ray import tune

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = TrialConfig.from_dict(config["trial"])
    with tempfile.TemporaryDirectory(prefix="lora-sweep-") as tmp:
        result_dir = Path(tmp) / "result"
        metrics = run_trial(cfg, result_dir, report=tune.report)
        shutil.rmtree(result_dir / "hf", ignore_errors=True)  # trainer scratch space, not a result
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(result_dir)))
