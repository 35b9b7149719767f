"""One trial, in the post's order: load data -> load base (bits) -> attach LoRA -> train -> evaluate ->
generate -> save adapter -> report.

``run_trial`` is plain Python (tests call it directly); ``tune_trainable`` is the Ray Tune function
trainable the driver schedules, one GPU-pinned process per trial.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from peft import get_peft_model
from transformers import PrinterCallback, TrainerCallback

from trainers import checkpoints, compiling, faults
from trainers.config import (ADAPTER_DIR, CONFIG_FILE, CUDA_OVERHEAD_GB, GENERATIONS_JSON, GENERATIONS_MD,
                             HELDOUT_FILE, METRICS_FILE, MPS_PIPE_ENV, MPS_PRIORITY_ENV, OOM_CAPPED, OOM_NOT_AGAIN,
                             CheckpointReport, EvalReport, StepReport, TrialConfig, TrialResult, is_quantized,
                             mps_daemon, perplexity)
from trainers.data import DataError, build_splits, fingerprint
from trainers.evaluate import (format_generations, generate, generation_metrics, heldout_losses, loss_masks,
                               quality_prompts)
from trainers.formats import chat_template_problem
from trainers.guards import FiniteLossGuard, check_finite
from trainers.models import (GPU_SHARE_ENV, checkpoint_path, load_base, load_tokenizer, lora_config, prepare_kbit,
                             tokenizer_path)
from trainers.sft import length_stats, make_trainer, tokenize, trl_columns, trl_ready
from trainers.sysmetrics import SystemSampler

Report = Callable[[dict], None]  # tune.report, or a test's list.append
OnCheckpoint = Callable[[Path, int, "EvalReport | None"], None]


class PeriodicEval(TrainerCallback):
    """The held-out loss every ``every`` optimizer steps (not at the last one: the final eval follows), for
    early stopping. With checkpoints on, it has the Trainer save at that step and the eval travels with that
    checkpoint (``CheckpointReporter``), so a trial stopped on it keeps the adapter it was judged by."""

    def __init__(self, every: int, report: Report, evaluate: Callable[[], float], checkpointing: bool):
        self.every, self.report, self.evaluate, self.checkpointing = every, report, evaluate, checkpointing
        self.pending: EvalReport | None = None

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.every or step >= state.max_steps:
            return
        self.pending = EvalReport(train_steps=step, epoch=float(state.epoch or 0.0), eval_loss=self.evaluate())
        if self.checkpointing:
            control.should_save = True
        else:
            self.report(self.pending.to_report())
            self.pending = None

    def take(self, step: int) -> EvalReport | None:
        """The eval made at ``step``, once: it is sent with that step's checkpoint."""
        pending, self.pending = self.pending, None
        return pending if pending is not None and pending.train_steps == step else None


class CheckpointReporter(TrainerCallback):
    """Hands every checkpoint the Trainer writes (adapter, optimizer, scheduler, RNG, step) to the driver,
    with the held-out eval of that step if one was made; such a checkpoint also gets the adapter alone in
    ``adapter/`` (LoRA factors only), laid out like a finished trial's, for the table, MLflow and export."""

    def __init__(self, on_checkpoint: OnCheckpoint, evals: PeriodicEval | None = None):
        self.on_checkpoint, self.evals = on_checkpoint, evals

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        evaluated = self.evals.take(state.global_step) if self.evals else None
        if evaluated is not None and model is not None:
            model.save_pretrained(path / ADAPTER_DIR, save_embedding_layers=False)
            if processing_class is not None:  # export loads the tokenizer from beside the adapter
                processing_class.save_pretrained(path / ADAPTER_DIR)
        self.on_checkpoint(path, state.global_step, evaluated)


class StepReporter(TrainerCallback):
    """Forwards every logged training step (loss, learning rate, progress, throughput, system metrics)
    to the driver."""

    def __init__(self, report: Report, sampler: SystemSampler | None = None):
        self.report, self.sampler = report, sampler
        self.losses: list[float] = []
        self.tokens: Callable[[], int] = lambda: 0  # the trainer's real-token count, once it exists
        self._last = (time.perf_counter(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), self.tokens())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            now, tokens = time.perf_counter(), self.tokens()
            rate = (tokens - self._last[1]) / max(now - self._last[0], 1e-9)
            self._last = (now, tokens)
            self.report(StepReport(
                step=state.global_step, epoch=float(state.epoch or 0.0), loss=float(logs["loss"]),
                learning_rate=float(logs.get("learning_rate", 0.0)), max_steps=int(state.max_steps or 0),
                tokens_per_second=rate, system=self.sampler.take() if self.sampler else {}).to_report())


def quantized_layers(model) -> dict[str, int]:
    """Count bitsandbytes layers by class, so a report proves the base really is 4- or 8-bit."""
    counts: dict[str, int] = {}
    for m in model.modules():
        name = type(m).__name__
        if name in ("Linear4bit", "Linear8bitLt") and type(m).__module__.startswith("bitsandbytes"):
            counts[name] = counts.get(name, 0) + 1
    return counts


def gpu_uuids(cuda: bool) -> list[str]:
    """The GPUs this process may use (Ray pins them through CUDA_VISIBLE_DEVICES), by UUID."""
    return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())] if cuda else []


def gpu_sharing() -> str:
    """``whole``, or for a trial on a share of its GPU (limit_gpu_memory), ``mps`` when it is an MPS client (the
    sweep's daemon, or the machine's; ``mps, below normal`` when it gave way to a longer trial) and
    ``time-sliced`` otherwise."""
    if float(os.environ.get(GPU_SHARE_ENV, "1")) >= 1:
        return "whole"
    if mps_daemon() is None:
        return "time-sliced"
    return "mps, below normal" if os.environ.get(MPS_PRIORITY_ENV) == "1" else "mps"


def device_info(cuda: bool) -> dict:
    if not cuda:
        return {"device_name": "cpu", "gpu_uuid": "", "gpu_sharing": ""}
    props = torch.cuda.get_device_properties(0)
    return {"device_name": props.name, "gpu_uuid": str(props.uuid), "gpu_sharing": gpu_sharing()}


@dataclass
class Setup:
    """What steps 1-3 build: the data (and its train split tokenized as the fast path trains on it, with what
    max_seq_length cut from it), the tokenizer, the base with its (untrained) LoRA adapter."""

    splits: object
    train_data: object
    lengths: dict
    tokenizer: object
    model: torch.nn.Module
    bnb: dict[str, int]
    trainable: int
    total: int


@dataclass
class Training:
    trainer: object
    started_at: float
    seconds: float
    tokens: int
    losses: list[float]


def setup(cfg: TrialConfig) -> Setup:
    """1. data -> 2. base model in 4, 8 or 16 bits -> 3. LoRA."""
    splits = build_splits(cfg)
    path = checkpoint_path(cfg)
    tokenizer = load_tokenizer(tokenizer_path(cfg.model, path), cfg.trust_remote_code, cfg.chat_template)
    if (problem := chat_template_problem(cfg, tokenizer)) is not None:
        raise DataError(f"field '{problem[0]}': {problem[1]}")
    train_tokens = tokenize(trl_columns(splits["train"]), tokenizer, cfg.max_seq_length, cfg.loss_on)
    train_data, dropped = trl_ready(train_tokens, cfg.loss_on)
    lengths = length_stats(train_tokens, cfg.max_seq_length, dropped)
    model = load_base(cfg, path)
    bnb = quantized_layers(model)
    if is_quantized(cfg.bits):
        model = prepare_kbit(model, cfg, cfg.gradient_checkpointing)
    # The baseline gets an adapter too: PEFT starts every lora_B at zero, so the untrained adapter is exactly
    # the base model, and its eval loss and generations come from the very same code as a trial's.
    # Seeded here, not only at the start: building a random: base (done by whichever trial gets there
    # first) draws from the same generator, and the LoRA A factors must not depend on that race.
    torch.manual_seed(cfg.train_seed)
    model = get_peft_model(model, lora_config(cfg))
    trainable, total = model.get_nb_trainable_parameters()
    if cfg.baseline:
        trainable, total = 0, total - trainable
    return Setup(splits, train_data, lengths, tokenizer, model, bnb, trainable, total)


def train(cfg: TrialConfig, s: Setup, out_dir: Path, report: Report, resume_from: Path | None, resume_step: int,
          on_checkpoint: OnCheckpoint | None, evaluate: Callable[[], float],
          sampler: SystemSampler | None = None) -> Training:
    """4. train, with ``evaluate`` (the held-out loss) every ``eval_every`` steps (the baseline trains nothing)."""
    steps = StepReporter(report, sampler)
    evals = PeriodicEval(cfg.eval_every, report, evaluate, on_checkpoint is not None) if cfg.eval_every else None
    callbacks = [FiniteLossGuard(), steps, *([evals] if evals else []),
                 *([CheckpointReporter(on_checkpoint, evals)] if on_checkpoint else []), *faults.injectors(cfg.name)]
    trainer = make_trainer(cfg, s.model, s.tokenizer, s.splits, str(out_dir / "hf"), callbacks=callbacks,
                           checkpoints=on_checkpoint is not None, train_data=s.train_data)
    steps.tokens = lambda: trainer.real_tokens
    trainer.remove_callback(PrinterCallback)  # steps go to the driver, not to the worker's stdout
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started_at, start = time.time(), time.perf_counter()
    if not cfg.baseline:
        if cfg.compile:  # the fast path's (validation refuses it on the reference path)
            compiling.compile_layers(s.model)
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:
            if cfg.compile:
                compiling.uncompile_layers(s.model)
    if cfg.device == "cuda":
        torch.cuda.synchronize()
    return Training(trainer, started_at, time.perf_counter() - start, trainer.real_tokens, steps.losses)


def save(cfg: TrialConfig, s: Setup, out_dir: Path, generations: list[dict]) -> None:
    """6. the adapter (megabytes; the base stays where it came from) and the generations."""
    if not cfg.baseline:
        # save_embedding_layers=False: lm_head's base weights are frozen, only its LoRA factors belong here
        s.model.save_pretrained(out_dir / ADAPTER_DIR, save_embedding_layers=False)
        s.tokenizer.save_pretrained(out_dir / ADAPTER_DIR)
    (out_dir / GENERATIONS_JSON).write_text(json.dumps(generations, indent=1, ensure_ascii=False))
    (out_dir / GENERATIONS_MD).write_text(format_generations(generations, cfg.marker))


def run_trial(cfg: TrialConfig, out_dir: Path, report: Report | None = None, resume_from: Path | None = None,
              resume_step: int = 0, on_checkpoint: OnCheckpoint | None = None,
              sampler: SystemSampler | None = None, node_id: str = "") -> TrialResult:
    """Train and evaluate one configuration; writes adapter/, generations.{md,json}, metrics.json to out_dir.

    ``resume_from`` is a Trainer checkpoint (of ``resume_step``) to continue from; ``on_checkpoint``
    receives each checkpoint the Trainer writes every ``cfg.checkpoint_every`` steps, and at every periodic
    eval with that eval; ``sampler``'s system metrics ride along with each step report; ``node_id`` is the
    Ray node it runs on, recorded in the result.
    """
    cuda = cfg.device == "cuda"
    if cuda and not torch.cuda.is_available():
        mps = os.environ.get(MPS_PIPE_ENV)  # a client whose MPS server cannot start sees no GPU at all
        raise RuntimeError("trial asks for device=cuda but no CUDA GPU is visible to it" + (
            f" (it is a client of the NVIDIA MPS daemon in {mps}: see the log there, or run the sweep with --mps off)"
            if mps else ""))
    if not cuda:
        torch.set_num_threads(cfg.cpus_per_trial)
    torch.manual_seed(cfg.train_seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))  # what export needs to rebuild it

    clock = time.perf_counter()
    s = setup(cfg)
    test_ids, masks = loss_masks(cfg, s.tokenizer, s.splits["test"])

    def held_out(names=("eval",)) -> dict:  # during training (every eval_every steps) and after it
        return heldout_losses(s.model, test_ids, s.tokenizer.pad_token_id, cfg.device, {n: masks[n] for n in names})

    t = train(cfg, s, out_dir, report or (lambda r: None), resume_from, resume_step, on_checkpoint,
              lambda: held_out()["eval"].mean, sampler)
    setup_seconds = time.perf_counter() - clock - t.seconds  # data, base, adapter, trainer
    # 5. evaluate: held-out losses, then generations for the space's prompts and test rows
    clock = time.perf_counter()
    losses = held_out(("eval", "response"))  # per example: error bars
    eval_loss = losses["eval"].mean
    check_finite("eval loss", eval_loss)
    eval_seconds, clock = time.perf_counter() - clock, time.perf_counter()
    generations = generate(s.model, s.tokenizer, quality_prompts(cfg, s.splits["test"]), cfg.max_new_tokens,
                           cfg.marker)
    generate_seconds = time.perf_counter() - clock
    save(cfg, s, out_dir, generations)
    # per example and per loss (the table pairs trials on whichever loss it compares them on)
    (out_dir / HELDOUT_FILE).write_text(json.dumps({"row_ids": list(s.splits["test"]["row_id"]), "losses": {
        f"{name}_loss": {"sums": h.sums, "counts": h.counts} for name, h in losses.items()}}))
    result = TrialResult(
        trainable_params=s.trainable, total_params=s.total, trainable_pct=100.0 * s.trainable / s.total,
        eval_loss=eval_loss, eval_loss_se=losses["eval"].se, response_loss=losses["response"].mean,
        response_loss_se=losses["response"].se, perplexity=perplexity(eval_loss), setup_seconds=setup_seconds,
        train_seconds=t.seconds, eval_seconds=eval_seconds, generate_seconds=generate_seconds, train_tokens=t.tokens,
        train_tokens_per_second=t.tokens / t.seconds if t.tokens else 0.0,
        peak_gpu_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        train_loss_first=t.losses[0] if t.losses else float("nan"),
        train_loss_last=t.losses[-1] if t.losses else float("nan"),
        train_steps=t.trainer.state.global_step, resumed_from_step=resume_step, train_started_at=t.started_at,
        train_examples=len(s.splits["train"]), dataset_fingerprint=fingerprint(s.splits),
        test_examples=len(s.splits["test"]), bnb_layers=sum(s.bnb.values()), **s.lengths,
        bnb_layer_type=",".join(sorted(s.bnb)) or "none", **device_info(cuda), **generation_metrics(generations),
        node_id=node_id,
    )
    (out_dir / METRICS_FILE).write_text(json.dumps(result.to_dict(), indent=1))
    return result


def limit_gpu_memory(share: float) -> None:
    """On a GPU shared with other trials, cap this process's allocator at its share (less the CUDA context
    the driver counted on top), so a trial that outgrows its estimate fails alone, not its neighbours."""
    if 0 < share < 1 and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(max(share - CUDA_OVERHEAD_GB / total, 0.05))
        os.environ[GPU_SHARE_ENV] = str(share)  # models.materialize_random then builds on the CPU


def tune_trainable(config: dict) -> None:
    """Ray Tune entry point: rebuild the typed config, run (or resume), report the result as a checkpoint.

    Each Trainer checkpoint is sealed and reported to Tune, which stores it in the trial's directory in
    Ray's storage (the sweep directory, or --storage: NFS, S3). On start the trial looks there first,
    through Ray's storage context: a complete final result means it already finished (the driver died
    before recording it), so it re-reports that result instead of training again; otherwise it resumes
    from the newest complete training checkpoint. Not ``tune.get_checkpoint()`` alone: that is the newest
    checkpoint in the snapshot Ray restored, which can predate the trial's last checkpoints (and even its
    final result) when the driver was killed between two snapshots.
    """
    import ray
    from ray import tune

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Every step has its own token count: without expandable segments the caching allocator fragments
    # and holds about twice the peak (seen on an H200: 41-46 GiB held for a 23-27 GiB peak).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cfg = TrialConfig.from_tune(config, tune.get_context().get_trial_name())
    fp = cfg.fingerprint
    share = config["trial"].get("gpu_share", 0.0)
    limit_gpu_memory(share)
    storage = tune.get_context().get_storage()  # Ray's: the trial's own directory wherever Tune keeps it
    fs, trial_dir = storage.storage_filesystem, storage.trial_fs_path

    def on_checkpoint(path: Path, step: int, evaluated: EvalReport | None) -> None:
        (path / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))  # export rebuilds a stopped trial
        checkpoints.seal(path, step=step, final=False, fingerprint=fp, eval=evaluated and evaluated.to_report())
        report = evaluated.to_report() if evaluated else CheckpointReport(step).to_report()
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(str(path)))

    with tempfile.TemporaryDirectory(prefix="lora-sweep-") as tmp:
        if (done := checkpoints.final_result(trial_dir, fp, fs)) is not None:
            done = checkpoints.download(done, fs, Path(tmp) / "done")
            result = TrialResult.from_dict(json.loads((done / METRICS_FILE).read_text()))
            tune.report(result.to_report(), checkpoint=tune.Checkpoint.from_directory(str(done)))
            return
        if (error := checkpoints.repeated_out_of_memory(trial_dir, fs, fingerprint=fp, share=share)) is not None:
            raise torch.OutOfMemoryError(f"{error} {OOM_NOT_AGAIN}")
        resume_from, resume_step = None, 0
        if (point := checkpoints.resume_point(trial_dir, fp, fs)) is not None:
            resume_from = checkpoints.download(point[0], fs, Path(tmp) / "resume")
            resume_step = point[1]
        result_dir = Path(tmp) / "result"
        sampler = SystemSampler(gpu_uuids(cfg.device == "cuda")).start()
        try:
            result = run_trial(cfg, result_dir, report=tune.report, resume_from=resume_from, resume_step=resume_step,
                               on_checkpoint=on_checkpoint, sampler=sampler,
                               node_id=ray.get_runtime_context().get_node_id())
        except torch.OutOfMemoryError as e:
            if OOM_CAPPED in str(e):  # its share's cap, not a GPU others filled: the same share runs out again
                # a store that cannot take the record: retried as any failure, and the error stays the OOM
                with contextlib.suppress(OSError):
                    checkpoints.record_out_of_memory(trial_dir, fs, fingerprint=fp, share=share,
                                                     error=str(e).splitlines()[0])
            raise
        finally:
            sampler.stop()
        shutil.rmtree(result_dir / "hf", ignore_errors=True)  # trainer scratch space, not a result
        checkpoints.seal(result_dir, step=result.train_steps, final=True, fingerprint=fp)
        tune.report(result.to_report(), checkpoint=tune.Checkpoint.from_directory(str(result_dir)))
