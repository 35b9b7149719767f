"""Benchmark the trial paths against each other: same trials, same data, same optimizer steps, one GPU.

    python -m sweep.bench --set dataset=data/products.jsonl                      # the paper grid, 20 steps
    python -m sweep.bench --steps 30 --paths reference,fast --out bench.json
    python -m sweep.bench --paths fast,compiled --steps 40                       # what compile=True buys
    python -m sweep.bench search_spaces/smoke.py --set model=bundled:desc-llama --set device=cpu --steps 3 --warmup 1

For each trial of the space (default: the paper grid on ``random:open_llama_3b_v2``, the post's
architecture with random weights), it runs the real trial function (``trainers.trial.run_trial``:
load, train ``--steps`` optimizer steps, evaluate, generate) once per path, in this process, one after
the other, and reports per run: real (unpadded) tokens per second of training (over all steps, and
"steady" over the steps after the first ``--warmup``, which leaves out start-up and compiling), MFU,
peak GPU memory, seconds outside training (setup + eval + generation), and the held-out loss after the
same steps.

Paths: ``reference`` is the project's original trial path as the space ran it (TRL's SFTTrainer,
``batch_size`` padded micro-batches, ``grad_accum`` of them per step, gradient checkpointing on);
``fast`` is the space as written (``trainer="fast"``); ``compiled`` is ``fast`` with ``compile=True``.
The result to read is the ratio to the reference (or, without one, to the first path), measured in the
same run: the GPUs are shared and absolute times drift.

MFU counts 4 x (parameters of the frozen base's matrix multiplies, lm_head included) FLOPs per trained
token (forward, plus the backward pass's input gradients; the frozen base gets no weight gradients),
against the GPU's dense bf16 peak from its datasheet (989 TFLOP/s for the H100 and H200). It leaves
out the attention scores (about 1% at these lengths) and the LoRA factors' own work, and an 8-bit
base's int8 matmuls are counted against the same bf16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

from sweep.cli import ArgumentParser, UserError, exit_code

REFERENCE = {"trainer": "reference", "gradient_checkpointing": True, "compile": False}  # the first path, as it ran
PATHS = {"reference": REFERENCE, "fast": {"trainer": "fast"}, "compiled": {"trainer": "fast", "compile": True}}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
DEFAULT_SETS = ("model=random:open_llama_3b_v2",)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m sweep.bench", description=__doc__.split("\n")[0])
    p.add_argument("space", nargs="?", default="search_spaces/paper_grid.py", help="space file (default: paper grid)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a setting (applied after the defaults {', '.join(DEFAULT_SETS)})")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    p.add_argument("--paths", default="reference,fast",
                   help="comma-separated, in order: reference, fast, compiled (default reference,fast)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the steady tokens/s (default 5)")
    p.add_argument("--trials", help="comma-separated trial names (default: every trial of the space)")
    p.add_argument("--out", help="write every run's numbers as JSON here")
    return p.parse_args(argv)


def matmul_params(cfg) -> int:
    """Parameters of the base's Linear layers (lm_head included): each costs 2 FLOPs a token a pass."""
    import torch

    from trainers.models import load_config, meta_model

    model = meta_model(load_config(cfg.model, cfg.trust_remote_code))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def gpu_peak(name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def steady_rate(steps: list[tuple[float, dict]], warmup: int) -> float | None:
    """Tokens/s over the logged steps after the first ``warmup``: each report's rate times the time since the
    one before (the interval it was measured over); None when no step is left after the warm-up."""
    timed = [(t1 - t0, r1) for (t0, _), (t1, r1) in zip(steps, steps[1:]) if r1["step"] > warmup]
    seconds = sum(dt for dt, _ in timed)
    return sum(dt * r["tokens_per_second"] for dt, r in timed) / seconds if seconds > 0 else None


def run_config(cfg, path: str):
    # every step logged, on every path alike, for the steady rate
    return dataclasses.replace(cfg, **PATHS[path], logging_steps=1)


def one_run(cfg, path: str, flops_per_token: float, warmup: int = 5) -> dict:
    import torch

    from trainers.trial import run_trial

    run_cfg = run_config(cfg, path)
    steps: list[tuple[float, dict]] = []

    def report(r: dict) -> None:
        if r["report"] == "step":
            steps.append((time.perf_counter(), r))

    with tempfile.TemporaryDirectory(prefix="lora-sweep-bench-") as tmp:
        start = time.perf_counter()
        r = run_trial(run_cfg, Path(tmp) / "trial", report=report)
        wall = time.perf_counter() - start
    gc.collect()
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    tps = r.train_tokens_per_second
    peak = gpu_peak(r.device_name)
    return {"trial": cfg.name, "path": path, "device": r.device_name, "steps": r.train_steps,
            "real_tokens": r.train_tokens, "train_seconds": r.train_seconds, "tokens_per_second": tps,
            "steady_tokens_per_second": steady_rate(steps, warmup), "warmup_steps": warmup,
            "mfu": tps * flops_per_token / peak if peak else None, "peak_gpu_mem_gb": r.peak_gpu_mem_gb,
            "setup_seconds": r.setup_seconds, "eval_seconds": r.eval_seconds, "generate_seconds": r.generate_seconds,
            "outside_training_seconds": wall - r.train_seconds, "eval_loss": r.eval_loss,
            "train_loss_last": r.train_loss_last, "config": dataclasses.asdict(run_cfg)}


def table(runs: list[dict], paths: list[str]) -> str:
    """One row per run; ratios and the eval loss drift against the same trial's run on the first path."""
    first = paths[0]
    lines = [f"| trial | path | tokens/s | x {first} | steady tokens/s | x {first} | MFU | peak GiB (est.) | "
             f"outside training s | eval loss | vs {first} |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = {r["trial"]: r for r in runs if r["path"] == first}

    def ratio(r, base, key):
        return f"{r[key] / base[key]:.2f}" if base and r[key] and base[key] else "-"

    for r in runs:
        base = ref.get(r["trial"])
        drift = f"{(r['eval_loss'] - base['eval_loss']) / base['eval_loss']:+.2%}" if base else "-"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        steady = f"{r['steady_tokens_per_second']:,.0f}" if r["steady_tokens_per_second"] else "-"
        lines.append(f"| {r['trial']} | {r['path']} | {r['tokens_per_second']:,.0f} | "
                     f"{ratio(r, base, 'tokens_per_second')} | {steady} | "
                     f"{ratio(r, base, 'steady_tokens_per_second')} | {mfu} | "
                     f"{r['peak_gpu_mem_gb']:.1f} ({r.get('estimated_gpu_gb', 0):.1f}) | "
                     f"{r['outside_training_seconds']:.1f} | {r['eval_loss']:.4f} | {drift} |")
    return "\n".join(lines)


def bench(args: argparse.Namespace) -> int:
    from sweep.space import expand, load_space, parse_sets
    from sweep.plan import plan

    paths = args.paths.split(",")
    if not paths or not set(paths) <= set(PATHS) or len(set(paths)) != len(paths):
        raise UserError(f"--paths takes one or more of {', '.join(PATHS)}, each once; got '{args.paths}'")
    if args.steps < 1 or args.warmup < 0 or args.warmup >= args.steps:
        raise UserError(f"--steps must be >= 1 and --warmup in [0, steps); got --steps {args.steps} "
                        f"--warmup {args.warmup}")
    sets = parse_sets([*DEFAULT_SETS, *args.set, f"max_steps={args.steps}"])
    configs = [p.cfg for p in plan(expand(load_space(args.space), args.space, sets), args.space)]
    if args.trials:
        configs = [c for c in configs if c.name in args.trials.split(",")]
    if not configs:
        raise UserError(f"--trials {args.trials}: no such trial in {args.space}")
    flops = 4 * matmul_params(configs[0])
    from trainers.models import checkpoint_path

    checkpoint_path(configs[0])  # a random: base is written once, before anything is timed
    one_run(dataclasses.replace(configs[0], name="warm-up", max_steps=2), "fast", flops)  # CUDA/cuBLAS start-up
    runs, failed = [], []
    for cfg in configs:
        for path in paths:
            try:
                runs.append({**one_run(cfg, path, flops, args.warmup),
                             "estimated_gpu_gb": plan([run_config(cfg, path)], args.space)[0].gpu_gb})
            except Exception as e:  # noqa: BLE001 - one broken run must not cost the others (GPU time is scarce)
                failed.append(f"{cfg.name} {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                print(f"FAILED {failed[-1]}", flush=True)
                continue
            print(f"{cfg.name} {path}: {runs[-1]['tokens_per_second']:,.0f} tokens/s", flush=True)
            if args.out:  # after every run, so a run cut short still leaves its numbers
                Path(args.out).write_text(json.dumps({"runs": runs, "failed": failed, "steps": args.steps,
                                                      "flops_per_token": flops}, indent=1))
    device = runs[0]["device"] if runs else "?"
    print(f"\n{configs[0].model} on {device}, {args.steps} optimizer steps per run, "
          f"{flops / 4:.3g} matmul parameters\n\n{table(runs, paths)}", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
