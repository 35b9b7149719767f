"""Run a LoRA/QLoRA sweep: every trial on its own GPU (or CPUs) through Ray Tune, tracked in MLflow.

    python -m sweep.run search_spaces/smoke.py                       # the offline CPU demo
    python -m sweep.run search_spaces/paper_grid.py                  # the post's four trials, GPU + Hub
    python -m sweep.run search_spaces/paper_grid.py --dry-run        # trials and exact parameter counts
    python -m sweep.run search_spaces/paper_grid.py --set model=random:open_llama_3b_v2 --set train_samples=500
    python -m sweep.run SPACE --address HEAD:6379 --storage s3://bucket/sweeps   # on a Ray cluster
    ray job submit -- python -m sweep.run SPACE --address auto --storage /nfs/sweeps  # as a Ray Job
    python -m sweep.run search_spaces/smoke_search.py                # a search: TPE + ASHA early stopping, CPU
    python -m sweep.run search_spaces/smoke_search.py --extend --num-samples 10   # 2 more samples, warm-started

Re-running the same command on the same sweep directory resumes it: finished trials are kept,
interrupted ones continue from their latest checkpoint (Ray Tune's restore), and MLflow keeps one
run per trial. ``--fresh`` moves the old directory aside instead. ``--extend`` grows a finished sweep to
what its space file (and ``--num-samples``) now declares: only the new trials run.

Exit codes: 0 every trial finished, 1 some trial failed (the table is still written), 2 bad input
(nothing started, nothing earlier touched).
"""

from __future__ import annotations

import argparse
import sys

from sweep import mps
from sweep.cli import ArgumentParser, exit_code
from sweep.cluster import LOOPBACK
from sweep.driver import SweepOptions


def gpus(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {value!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m sweep.run", description=__doc__.split("\n")[0])
    p.add_argument("space", help="search-space file (Python), e.g. search_spaces/paper_grid.py")
    p.add_argument("--output", help="sweep directory (default: sweeps/<name>/)")
    p.add_argument("--name", help="sweep name: MLflow experiment and default directory (default: the space's name)")
    p.add_argument("--address", help="Ray cluster address; default starts a local Ray")
    p.add_argument("--storage", metavar="URI",
                   help="where Ray Tune keeps trial checkpoints, reachable from every node: an absolute local/NFS "
                        "path or s3://BUCKET/PATH (credentials from each node's AWS_* environment); default: the "
                        "sweep directory, for one machine")
    p.add_argument("--storage-endpoint", metavar="URL",
                   help="endpoint of an S3-compatible store for --storage s3://... (MinIO, Ceph), e.g. "
                        "http://minio:9000")
    p.add_argument("--trial-resource", action="append", default=[], metavar="NAME=AMOUNT",
                   help="a custom Ray resource every trial requests, to keep trials on the nodes that offer it "
                        "(ray start --resources='{\"NAME\": N}'); repeatable")
    p.add_argument("--gpus-per-trial", type=gpus, default="auto", metavar="auto|N",
                   help="GPU share per CUDA trial: auto (default) sizes each trial's share from its estimated peak "
                        "memory so small trials share a GPU; or a number (1 = a whole GPU each, 0.5 = two per GPU)")
    p.add_argument("--mps", default="auto", choices=mps.MODES,
                   help="NVIDIA MPS for trials that share a GPU, so their kernels run side by side: auto (default) "
                        "starts a daemon for the sweep when trials may share a GPU and nvidia-cuda-mps-control is "
                        "installed (a local Ray only); on requires it; off time-slices the GPU between them")
    p.add_argument("--mlflow-uri", help="tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting for every trial, e.g. --set epochs=1 (repeatable)")
    p.add_argument("--dashboard-host", default="127.0.0.1",
                   help="Ray dashboard bind address (default loopback: the dashboard can run arbitrary jobs)")
    p.add_argument("--ray-node-ip", default=LOOPBACK, metavar="IP",
                   help="the IP of the local Ray a sweep starts without --address (default 127.0.0.1: every Ray "
                        "service listens on loopback only). Give this machine's IP to let other machines join it "
                        "(ray start --address); Ray then listens on every interface: trusted networks only")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the 'base' row (the model before fine-tuning, evaluated like a trial)")
    p.add_argument("--metric", default="eval_loss", choices=["eval_loss", "response_loss", "perplexity", "rouge_l",
                                                             "repeat_ngram_rate", "end_marker_rate"],
                   help="measure that picks the best trial (default eval_loss; response_loss when the trials' "
                        "loss_on differ)")
    p.add_argument("--max-failures", type=int, default=1,
                   help="retries of a failing trial, each from its latest checkpoint (default 1)")
    again = p.add_mutually_exclusive_group()  # one way to treat an existing sweep directory
    again.add_argument("--resume", action="store_true",
                       help="require an interrupted sweep in the output directory (re-running the command resumes "
                            "anyway)")
    again.add_argument("--fresh", action="store_true",
                       help="move an existing sweep directory aside (DIR.old-<time>) and start over; nothing is "
                            "deleted")
    again.add_argument("--extend", action="store_true",
                       help="grow the sweep in the output directory by the trials or samples its space file (or "
                            "--num-samples) now adds; finished trials are kept and a search is told their results")
    p.add_argument("--num-samples", type=int, metavar="N",
                   help="a search's samples in all, seeds included (default: the space file's num_samples)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the trials (a search: its axes and parameter range) with exact counts and exit")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show everything: trial output, library warnings and Ray's and MLflow's logs, as they come "
                        "(by default they go to DIR/logs/ and the console shows progress only)")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> SweepOptions:
    return SweepOptions(
        space=args.space, sets=tuple(args.set), output=args.output, name=args.name, address=args.address,
        gpus_per_trial=args.gpus_per_trial, mlflow_uri=args.mlflow_uri, dashboard_host=args.dashboard_host,
        baseline=not args.no_baseline, metric=args.metric, max_failures=args.max_failures, resume=args.resume,
        fresh=args.fresh, verbose=args.verbose, extend=args.extend, num_samples=args.num_samples,
        node_ip=args.ray_node_ip, storage=args.storage, storage_endpoint=args.storage_endpoint,
        trial_resources=tuple(args.trial_resource), mps=args.mps,
    )


def main(argv=None) -> int:
    from sweep import driver

    args = parse_args(argv)
    opts = options(args)
    return exit_code(lambda: driver.dry_run(opts) if args.dry_run else driver.run_sweep(opts))


if __name__ == "__main__":
    sys.exit(main())
