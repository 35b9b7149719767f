"""Export one trial of a finished sweep: its adapter, or the adapter merged into a plain model.

    python -m sweep.export sweeps/paper-grid                       # best trial's adapter -> DIR/export/<id>/
    python -m sweep.export sweeps/paper-grid --merge               # best trial merged -> DIR/export/<id>-merged/
    python -m sweep.export sweeps/paper-grid --trial r8-all_linear-4bit --merge --dtype bfloat16
    python -m sweep.export sweeps/paper-grid --merge --merge-base original

Every export re-measures the held-out loss before it writes anything. ``--merge`` folds the adapter into
the weights it was trained against (a 4/8-bit base dequantized; ``--merge-base original`` for the
checkpoint's own weights instead) in fp32 arithmetic, stores the result in ``--dtype``, reloads it with
``AutoModelForCausalLM.from_pretrained`` and keeps it only if its held-out loss matches: the trial's own
eval_loss for ``--merge-base trial``, the adapter's on the same original weights for ``original``.

Exit codes: 0 exported, 1 the merged model's loss disagrees (nothing written), 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

from sweep.cli import ArgumentParser, UserError, exit_code
from trainers.config import ADAPTER_DIR, CONFIG_FILE, METRICS_FILE, TrialConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m sweep.export", description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir", metavar="DIR", help="a finished sweep directory (has summary.csv and trials/)")
    p.add_argument("--trial", default="best",
                   help="trial id, or 'best': the trial summary.csv marks best (by the sweep's --metric; default)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into its base and save a plain model")
    p.add_argument("--merge-base", choices=("trial", "original"),
                   help="with --merge: 'trial' (default) = the weights the adapter was trained against (a 4/8-bit "
                        "base dequantized: reproduces the trial); 'original' = the checkpoint's unquantized weights")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="with --merge: the merged model's stored dtype (default float32; 16-bit files are half the "
                        "size but round away part of a small update, which the check then reports)")
    p.add_argument("--out", help="output directory (default DIR/export/<trial_id>[-merged])")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: export(args.sweep_dir, args.trial, args.merge, args.out, args.merge_base, args.dtype))


def _float(x) -> float | None:
    try:
        return v if math.isfinite(v := float(x)) else None
    except (TypeError, ValueError):
        return None


def read_sweep(sweep: Path) -> dict[str, dict]:
    """summary.csv rows by trial id, plus any trial directory the table lacks (a sweep cut short)."""
    if not sweep.exists():
        raise UserError(f"sweep directory not found: {sweep}")
    if not sweep.is_dir() or not ((sweep / "summary.csv").is_file() or (sweep / "trials").is_dir()):
        raise UserError(f"{sweep} is not a sweep directory (no summary.csv or trials/)")
    rows: dict[str, dict] = {}
    if (sweep / "summary.csv").is_file():
        with open(sweep / "summary.csv", newline="") as f:
            reader = csv.DictReader(f)
            if "trial_id" not in (reader.fieldnames or []):
                raise UserError(f"{sweep / 'summary.csv'} has no trial_id column: not a sweep summary")
            rows = {r["trial_id"]: r for r in reader}
    if (sweep / "trials").is_dir():
        for d in sorted((sweep / "trials").iterdir()):
            if d.is_dir():
                rows.setdefault(d.name, {"trial_id": d.name, "status": "?"})
    return rows


def pick_trial(rows: dict[str, dict], wanted: str) -> str:
    """``best`` is the trial the sweep's table starred (summary.csv's ``best`` column): one rule for both."""
    if wanted == "best":
        best = [tid for tid, r in rows.items() if r.get("best") == "true"]
        if not best:
            raise UserError("summary.csv marks no best trial (no trial finished with a finite eval_loss) to export")
        return best[0]
    if wanted not in rows:
        raise UserError(f"unknown trial '{wanted}' (known: {', '.join(rows) or 'none'})")
    return wanted


def check_trial(sweep: Path, tid: str, row: dict) -> tuple[TrialConfig, Path]:
    if tid == "base":
        raise UserError("trial 'base' is the baseline without an adapter: there is nothing to export")
    tdir = sweep / "trials" / tid
    adapter = tdir / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"trial '{tid}' has no adapter (status {row.get('status') or '?'}): "
                         "only finished trials can be exported")
    try:
        cfg = TrialConfig.from_dict(json.loads((tdir / CONFIG_FILE).read_text()))
    except FileNotFoundError:
        raise UserError(f"trial '{tid}' has no config.json (written by trials since export exists); "
                         "re-run the trial to export it") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{tdir / CONFIG_FILE}: not a trial config ({e})") from None
    return cfg, adapter


def check_out(out: Path) -> None:
    """Fail before the minutes of loading, not after: the nearest existing ancestor must take a file."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # Writing into an old export could leave adapter files next to a merged model, and
        # from_pretrained would then load it as a PEFT model.
        raise UserError(f"--out {out} already exists and is not empty; remove it or choose another path")
    parent = _existing_ancestor(out)
    if not parent.is_dir():
        raise UserError(f"cannot write to {out}: {parent} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror or e}") from None


class MergeCheckFailed(Exception):
    """The merged model's loss disagrees with its reference (the trial's, or the adapter's): nothing written, exit 1."""


def export(sweep_dir: str, trial: str = "best", merge: bool = False, out: str | None = None,
           merge_base: str | None = None, dtype: str | None = None) -> int:
    if not merge and (merge_base or dtype):
        raise UserError("--merge-base and --dtype apply to merged exports only: add --merge")
    sweep = Path(sweep_dir)
    rows = read_sweep(sweep)
    tid = pick_trial(rows, trial)
    cfg, adapter = check_trial(sweep, tid, rows[tid])
    target = Path(out) if out else sweep / "export" / (tid + ("-merged" if merge else ""))
    check_out(target)
    metrics_file = sweep / "trials" / tid / METRICS_FILE
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}

    import torch  # heavy imports only once the input is known to be good

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trial '{tid}' was trained with device=cuda but no CUDA GPU is visible here")
    if trial == "best":
        print(f"best trial: {tid} (eval_loss {_float(rows[tid].get('eval_loss')):.6f})", flush=True)
    # Everything is written to a staging directory beside the target and moved into place only once it
    # passed: a refused merge leaves nothing behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=_existing_ancestor(target.parent)))
    try:
        info = measure(cfg, tid, adapter, metrics, staging, merge_base or "trial" if merge else None,
                       dtype or "float32")
        info["out"] = str(target.resolve())
        (staging / "export.json").write_text(json.dumps(info, indent=1))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)  # an empty target directory is replaced too (check_out allowed no other)
    except MergeCheckFailed as e:
        print(f"error: MERGE CHECK FAILED for trial '{tid}': {e}; nothing written", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print_summary(info)
    return 0


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def measure(cfg: TrialConfig, tid: str, adapter: Path, metrics: dict, staging: Path, merge_base: str | None,
            dtype: str) -> dict:
    """The adapter back on its base, its held-out loss re-measured, written to ``staging``; with ``merge_base``,
    merged, saved, reloaded as a user would and checked (MergeCheckFailed when the loss disagrees)."""
    import datasets
    import transformers

    from trainers import merge as M
    from trainers.data import DataError, fingerprint
    from trainers.models import ModelError

    datasets.disable_progress_bars()  # per-eval tokenizing bars would bury the summary
    transformers.utils.logging.disable_progress_bar()
    trial_loss = _float(metrics.get("eval_loss"))
    info = {"trial_id": tid, "base_model": cfg.model, "bits": cfg.bits, "merged": merge_base is not None,
            "device": cfg.device, "eval_loss_trial": trial_loss}
    try:
        splits = M.rebuild_splits(cfg)
        info["dataset_fingerprint"] = fingerprint(splits)
        if metrics.get("dataset_fingerprint") not in (None, info["dataset_fingerprint"]):
            print(f"warning: the rebuilt test split differs from trial '{tid}'s (has {cfg.dataset} changed?); "
                  "its eval_loss is not comparable with the ones measured here", file=sys.stderr)
        on_original = merge_base == "original"
        model, tokenizer = M.load_adapted(cfg, adapter, "original" if on_original else "trial")
        # on the original weights the merge's own arithmetic is checked, so both sides are measured in fp32
        adapter_loss = M.eval_loss(cfg, model, tokenizer, splits, autocast=False if on_original else None)
        info.update(eval_loss_adapter=adapter_loss, test_examples=len(splits["test"]),
                    adapter_eval_base="original weights, fp32" if on_original else f"{cfg.bits}-bit, as trained")
        if merge_base is None:
            # lm_head's base weights are frozen: only its LoRA factors belong in the adapter
            model.save_pretrained(staging, save_embedding_layers=False)
        else:
            info.update(merge_check(cfg, model, adapter, tokenizer, splits, staging, merge_base, dtype,
                                    reference=adapter_loss if on_original or trial_loss is None else trial_loss))
        tokenizer.save_pretrained(staging)
    except (ModelError, DataError) as e:
        raise UserError(str(e)) from None
    final = info.get("eval_loss_merged", adapter_loss)
    info["diff_vs_trial"] = None if trial_loss is None else final - trial_loss
    return info


def merge_check(cfg: TrialConfig, model, adapter: Path, tokenizer, splits, staging: Path, merge_base: str,
                dtype: str, reference: float) -> dict:
    """Merge in fp32 into ``merge_base``, save in ``dtype``, reload with from_pretrained, compare with ``reference``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainers import merge as M

    if merge_base == "trial":  # a fresh PEFT model on dequantized fp32 weights (PEFT's 4/8-bit merge would requantize)
        model = PeftModel.from_pretrained(M.trained_weights(model), str(adapter))
    M.merge(model, dtype).save_pretrained(staging)
    del model
    device_map = {"": 0} if cfg.device == "cuda" else {"": "cpu"}
    reloaded = AutoModelForCausalLM.from_pretrained(staging, device_map=device_map)
    merged_loss = M.eval_loss(cfg, reloaded, tokenizer, splits, autocast=False)  # as stored: no autocast rounding
    stored = str(next(reloaded.parameters()).dtype).removeprefix("torch.")
    del reloaded
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    gap, tol = M.relative_gap(merged_loss, reference), M.tolerance(cfg, merge_base, dtype)
    against = "the trial's eval loss" if merge_base == "trial" else "the adapter on the original weights"
    info = dict(eval_loss_merged=merged_loss, merge_base=merge_base, merged_into=M.describe_base(cfg, merge_base),
                dtype=stored, checked_against=against, reference_loss=reference, merge_rel_diff=gap,
                merge_tolerance=tol)
    if gap > tol:
        raise MergeCheckFailed(f"merged into {info['merged_into']}, stored as {dtype}: eval loss {merged_loss:.6f} "
                               f"vs {against} {reference:.6f} (relative diff {gap:.2e} > tolerance {tol:.0e})")
    return info


def print_summary(info: dict) -> None:
    kind = f"a merged {info['dtype']} model" if info["merged"] else "an adapter"
    lines = [f"exported trial {info['trial_id']} ({info['base_model']}, trained on {info['bits']}-bit) as {kind}",
             f"  eval loss  adapter, {info['adapter_eval_base'] + ' base':28} {info['eval_loss_adapter']:.6f}"]
    if info["merged"]:
        lines.append(f"             {'merged model, reloaded':37} {info['eval_loss_merged']:.6f}  "
                     f"(vs {info['checked_against']}: relative diff {info['merge_rel_diff']:.1e}, "
                     f"tolerance {info['merge_tolerance']:.0e})")
        lines.append(f"  merged into {info['merged_into']}, in fp32; stored as {info['dtype']}")
    if info["eval_loss_trial"] is not None:
        lines.append(f"             {'trial, ' + str(info['bits']) + '-bit base':37} {info['eval_loss_trial']:.6f}  "
                     f"(exported - trial {info['diff_vs_trial']:+.6f})")
    lines.append(f"  out: {info['out']}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
