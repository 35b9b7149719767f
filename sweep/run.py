"""Run a LoRA/QLoRA sweep: every trial on its own GPU (or CPUs) through Ray Tune, tracked in MLflow.

    python -m sweep.run search_spaces/smoke.py                       # the offline CPU demo
    python -m sweep.run search_spaces/paper_grid.py                  # the post's four trials, GPU + Hub
    python -m sweep.run search_spaces/paper_grid.py --dry-run        # trials and exact parameter counts
    python -m sweep.run search_spaces/paper_grid.py --set model=random:open_llama_3b_v2 --set train_samples=500
    python -m sweep.run SPACE --address ray://head:10001              # the same on a Ray cluster

Re-running the same command on the same sweep directory resumes it: finished trials are kept,
interrupted ones continue from their latest checkpoint (Ray Tune's restore), and MLflow keeps one
run per trial. ``--fresh`` moves the old directory aside instead.

Exit codes: 0 every trial finished, 1 some trial failed (the table is still written), 2 bad input
(nothing started, nothing earlier touched).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

from sweep.ledger import LEDGER, MANIFEST, Ledger, read_json, write_json
from sweep.space import SpaceError, baseline_of, expand, load_space, parse_sets, sweep_fingerprint
from sweep.tracking import MLflowTracker, redact, tracking_uri


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sweep.run", description=__doc__.split("\n")[0])
    p.add_argument("space", help="search-space file (Python), e.g. search_spaces/paper_grid.py")
    p.add_argument("--output", help="sweep directory (default: sweeps/<name>/)")
    p.add_argument("--name", help="sweep name: MLflow experiment and default directory (default: the space's name)")
    p.add_argument("--address", help="Ray cluster address; default starts a local Ray")
    p.add_argument("--gpus-per-trial", type=float, default=1.0, help="GPUs per trial for CUDA spaces (default 1)")
    p.add_argument("--mlflow-uri", help="tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting for every trial, e.g. --set epochs=1 (repeatable)")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="Ray dashboard bind address (default loopback: the dashboard can run arbitrary jobs)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the 'base' row (the model before fine-tuning, evaluated like a trial)")
    p.add_argument("--metric", default="eval_loss", choices=["eval_loss", "perplexity", "rouge_l",
                                                             "repeat_ngram_rate", "end_marker_rate"],
                   help="measure that picks the best trial (default eval_loss)")
    p.add_argument("--max-failures", type=int, default=1,
                   help="retries of a failing trial, each from its latest checkpoint (default 1)")
    p.add_argument("--resume", action="store_true",
                   help="require an interrupted sweep in the output directory (re-running the command resumes anyway)")
    p.add_argument("--fresh", action="store_true",
                   help="move an existing sweep directory aside (DIR.old-<time>) and start over; nothing is deleted")
    p.add_argument("--dry-run", action="store_true", help="print the trials with exact parameter counts and exit")
    return p.parse_args(argv)


class UsageError(Exception):
    """Bad input found after the space validated (cluster, output directory); exit 2."""


def quiet_libraries() -> None:
    """The driver trains nothing: library deprecation notes would only bury our one-line errors."""
    import logging
    import warnings

    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels it looks for on the Hub
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # a bad file is reported by us, in one line
    if "datasets" in sys.modules:  # already imported (as in tests): its env var is read at import only
        sys.modules["datasets"].disable_progress_bars()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def main(argv=None) -> int:
    quiet_libraries()
    args = parse_args(argv)
    try:
        return run(args)
    except (SpaceError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from sweep.plan import PlannedTrial, plan
    from sweep.summary import dry_run_table

    space = load_space(args.space)
    configs = expand(space, args.space, parse_sets(args.set))
    planned = plan(configs, args.space, for_training=not args.dry_run)
    if not args.no_baseline:
        first = planned[0]
        planned.insert(0, PlannedTrial(baseline_of(first.cfg), 0, first.total_params - first.trainable_params))
    name = args.name or space.name
    if args.dry_run:
        print(f"sweep '{name}': {len(planned)} trials from {args.space}\n")
        print(dry_run_table(planned), end="")
        return 0
    if args.gpus_per_trial <= 0:
        raise UsageError(f"--gpus-per-trial must be > 0, got {args.gpus_per_trial}")
    if args.max_failures < 0:
        raise UsageError(f"--max-failures must be >= 0, got {args.max_failures}")
    out = Path(args.output or Path("sweeps") / name).resolve()
    fingerprint = sweep_fingerprint([p.cfg for p in planned])
    check_writable(out)
    manifest = existing_sweep(out, fingerprint, args)
    check_address(args.address)

    import ray

    start_ray(args)
    try:
        check_resources(planned, args.gpus_per_trial)
        if manifest is not None and args.fresh:  # only now that nothing can refuse the run
            aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            out.rename(aside)
            print(f"moved the previous sweep aside to {aside}", flush=True)
            manifest = None
        prepare_output(out)
        if manifest is None:
            manifest = {"sweep_id": uuid.uuid4().hex[:12], "name": name, "space": str(args.space),
                        "space_fingerprint": fingerprint, "mlflow_uri": redact(tracking_uri(args.mlflow_uri)),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_json(out / MANIFEST, manifest)
        return execute(args, manifest, out, planned)
    finally:
        ray.shutdown()


def existing_sweep(out: Path, fingerprint: str, args) -> dict | None:
    """The manifest of the sweep in ``out`` (to resume, or with --fresh to move aside), or None. Only reads."""
    manifest = read_json(out / MANIFEST) if (out / MANIFEST).is_file() else None
    if manifest is None and (out / "tune").exists():
        raise UsageError(f"{out} holds a Ray experiment that is not a lora-sweep sweep; pass another --output")
    if manifest is not None and args.fresh:
        return manifest
    if manifest is None:
        if args.resume:
            raise UsageError(f"--resume: no sweep to resume in {out}")
        return None
    if manifest["space_fingerprint"] != fingerprint:
        raise UsageError(
            f"{out} was started from a different space (fingerprint {manifest['space_fingerprint']}, now "
            f"{fingerprint}): the space file or --set values changed; restore them to resume, or pass --fresh "
            "to move the old sweep aside and start over")
    ledger = read_json(out / LEDGER)
    done = sum(e["status"] == "TERMINATED" for e in ledger.values())
    print(f"resuming sweep {manifest['name']} in {out}: {done} trial(s) already finished", flush=True)
    return manifest


def check_writable(out: Path) -> None:
    """Before anything starts, and without creating anything: can the sweep directory be made and written?"""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {out} is not writable ({probe} is not a writable directory)")


def prepare_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"output directory {out} is not writable: {e.strerror}") from None


def check_address(address: str | None) -> None:
    """Fail in seconds on an unreachable cluster instead of Ray's long connection retries."""
    if not address or address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or hostport, int(port) if port.isdigit() else 6379), timeout=5).close()
    except (OSError, ValueError) as e:
        raise UsageError(f"Ray address {address} is unreachable ({getattr(e, 'strerror', None) or e})") from None


def start_ray(args) -> None:
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    try:
        if args.address:
            ctx = ray.init(address=args.address, log_to_driver=True)
        else:
            ctx = ray.init(include_dashboard=dashboard_available(), dashboard_host=args.dashboard_host,
                           log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"cannot connect to Ray at {args.address}: {str(e).splitlines()[0]}") from None
    url = getattr(ctx, "dashboard_url", None)
    if url:
        token = Path.home() / ".ray" / "auth_token"
        auth = f"; it asks for the token in {token}" if token.exists() else ""
        print(f"Ray dashboard: http://{url}{auth}", flush=True)


def dashboard_available() -> bool:
    """ray[tune] alone has no dashboard (ray[default] brings it); run the sweep anyway and say so."""
    import importlib.util

    if importlib.util.find_spec("aiohttp") and importlib.util.find_spec("opencensus"):
        return True
    print("Ray dashboard unavailable: install ray[default] for it", flush=True)
    return False


def check_resources(planned, gpus_per_trial: float) -> None:
    """Refuse sweeps whose trials could never be scheduled, instead of leaving them pending forever."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    max_gpus = max((n.get("GPU", 0) for n in nodes), default=0)
    max_cpus = max((n.get("CPU", 0) for n in nodes), default=0)
    for p in planned:
        cfg = p.cfg
        if cfg.device == "cuda" and max_gpus == 0:
            raise UsageError(f"trial {cfg.name} needs a CUDA GPU but the Ray cluster has none; run on a GPU machine, "
                             "pass --address of a GPU cluster, or --set device=cpu")
        if cfg.device == "cuda" and gpus_per_trial > max_gpus:
            raise UsageError(f"--gpus-per-trial {gpus_per_trial} exceeds the {max_gpus:g} GPUs of the largest node")
        if cfg.cpus_per_trial > max_cpus:
            raise UsageError(f"trial {cfg.name} needs {cfg.cpus_per_trial} CPUs; the largest node has {max_cpus:g}")


def trial_resources(gpus_per_trial: float):
    def resources(config: dict) -> dict:
        t = config["trial"]
        return {"cpu": t["cpus_per_trial"], "gpu": gpus_per_trial if t["device"] == "cuda" else 0}

    return resources


def execute(args, manifest: dict, out: Path, planned) -> int:
    from ray import tune

    from sweep.summary import build_rows, samples_markdown, to_markdown, write_csv
    from trainers.trial import tune_trainable

    first, name = planned[0].cfg, manifest["name"]
    # The manifest's tracking store wins on resume, so the sweep's runs stay in one place; the live URI
    # is used when it names that store, since only it carries any credentials.
    uri = tracking_uri(args.mlflow_uri)
    tracker = MLflowTracker(uri if redact(uri) == manifest["mlflow_uri"] else manifest["mlflow_uri"],
                            experiment=name, sweep_id=manifest["sweep_id"])
    tracker.start({
        "space_file": str(args.space), "trials": str(len(planned)), "model": first.model, "dataset": first.dataset,
        "sets": " ".join(k + "=" + redact(v) for k, _, v in (x.partition("=") for x in args.set)),
        "output": str(out), "metric": args.metric,
        "generation": f"greedy, max_new_tokens={first.max_new_tokens}",
    })
    trainable = tune.with_resources(tune_trainable, trial_resources(args.gpus_per_trial))
    param_space = {"trial": tune.grid_search([p.cfg.to_dict() for p in planned]), "tune_dir": str(out / "tune")}
    if tune.Tuner.can_restore(str(out / "tune")):
        # Ray Tune's own restore: finished trials stay finished, the others continue from their checkpoints.
        tuner = tune.Tuner.restore(str(out / "tune"), trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space)
    else:
        trial_name = lambda t: t.config["trial"]["name"]  # noqa: E731 - names like r8-attention-4bit
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(
                name="tune", storage_path=str(out), callbacks=[tracker, Ledger(str(out))], verbose=1,
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                # Keep every checkpoint: with num_to_keep, Ray restored from a stale snapshot deletes checkpoints
                # it remembers and fails on ones already gone; trial checkpoints are adapter-sized anyway.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            ),
        )
    grid = tuner.fit()

    outcomes, generations = {}, {}
    for result in grid:
        if not result.config:  # never started: the sweep was interrupted first (NOT_RUN in the table)
            continue
        trial = result.config["trial"]["name"]
        ok = result.error is None and "eval_loss" in (result.metrics or {})
        status = "TERMINATED" if ok else "ERROR" if result.error is not None else "INTERRUPTED"
        error = str(result.error).strip().splitlines()[-1] if result.error is not None else ""
        outcomes[trial] = (status, {**(result.metrics or {}), "error": error})
        if ok and result.checkpoint is not None:  # the adapter and generations, where people look for them
            shutil.copytree(result.checkpoint.path, out / "trials" / trial, dirs_exist_ok=True)
            generations[trial] = json.loads((out / "trials" / trial / "generations.json").read_text())
    rows = build_rows(planned, outcomes, args.metric)
    write_csv(rows, out / "summary.csv")
    md = to_markdown(rows, f"Sweep {name}", args.metric)
    (out / "summary.md").write_text(md)
    (out / "samples.md").write_text(samples_markdown(rows, generations, first.max_new_tokens))
    failed = any(r["status"] != "TERMINATED" for r in rows)
    tracker.finish(out, rows, failed)
    print("\n" + md + f"\nresults: {out}  (summary.md, samples.md, summary.csv, trials/<id>/adapter)\n"
          f"compare in MLflow: mlflow ui --backend-store-uri {manifest['mlflow_uri']}", flush=True)
    for r in rows:
        if r["status"] == "ERROR":
            print(f"trial {r['trial_id']} failed: {r['error']}", file=sys.stderr)
    if any(r["status"] in ("INTERRUPTED", "NOT_RUN") for r in rows):
        print("sweep interrupted: run the same command again to resume it", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
