"""A sweep from start to end: space file -> planned trials -> checks -> Ray Tune -> the table.

``run_sweep`` reads top to bottom like the README: everything that can refuse the sweep runs before
anything is started or written; only then is the sweep directory created (or resumed), Ray started,
the trials run, and the reports written.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from sweep import sweepdir
from sweep.cli import UserError
from sweep.space import baseline_of, expand, load_space, parse_sets, sweep_fingerprint
from sweep.tracking import MLflowTracker, redact, tracking_uri


@dataclass(frozen=True)
class SweepOptions:
    """What the command line asked for (see ``python -m sweep.run --help`` for each option)."""

    space: str
    sets: tuple[str, ...] = ()
    output: str | None = None
    name: str | None = None
    address: str | None = None
    gpus_per_trial: float | str = "auto"
    mlflow_uri: str | None = None
    dashboard_host: str = "127.0.0.1"
    baseline: bool = True
    metric: str = "eval_loss"
    max_failures: int = 1
    resume: bool = False
    fresh: bool = False
    verbose: bool = False


def plan_sweep(opts: SweepOptions, *, for_training: bool):
    """The space file's trials, validated and counted, with the ``base`` row first unless turned off."""
    from sweep.plan import PlannedTrial, plan

    space = load_space(opts.space)
    planned = plan(expand(space, opts.space, parse_sets(opts.sets)), opts.space, for_training=for_training)
    if opts.baseline:
        first = planned[0]
        base = baseline_of(first.cfg)  # its memory estimate: evaluation only
        gpu_gb = plan([base], opts.space, for_training=False)[0].gpu_gb
        planned.insert(0, PlannedTrial(base, 0, first.total_params - first.trainable_params, gpu_gb))
    return opts.name or space.name, planned


def dry_run(opts: SweepOptions) -> int:
    from sweep.summary import dry_run_table

    name, planned = plan_sweep(opts, for_training=False)
    print(f"sweep '{name}': {len(planned)} trials from {opts.space}\n")
    print(dry_run_table(planned), end="")
    return 0


def run_sweep(opts: SweepOptions) -> int:
    import ray

    from sweep import cluster
    from sweep.console import DriverLogs

    name, planned = plan_sweep(opts, for_training=True)
    if opts.gpus_per_trial != "auto" and not (0 < opts.gpus_per_trial < math.inf):
        raise UserError(f"--gpus-per-trial must be 'auto' or a number > 0, got {opts.gpus_per_trial}")
    if opts.max_failures < 0:
        raise UserError(f"--max-failures must be >= 0, got {opts.max_failures}")
    out = Path(opts.output or Path("sweeps") / name).resolve()
    fingerprint = sweep_fingerprint([p.cfg for p in planned])
    sweepdir.check_writable(out)
    manifest = sweepdir.existing_manifest(out, fingerprint, fresh=opts.fresh, resume=opts.resume)
    cluster.check_address(opts.address)

    logs = DriverLogs(opts.verbose)  # from here on Ray's and MLflow's notes go to DIR/logs/driver.log
    cluster.start_ray(opts.address, opts.dashboard_host, verbose=opts.verbose)
    try:
        shares = cluster.gpu_shares(planned, opts.gpus_per_trial)
        cluster.check_resources(planned, shares)
        if manifest is not None and opts.fresh:  # only now that nothing can refuse the run
            sweepdir.move_aside(out)
            manifest = None
        sweepdir.prepare(out)
        logs.to_file(out)
        if manifest is None:
            manifest = sweepdir.new_manifest(out, name=name, space=str(opts.space), fingerprint=fingerprint,
                                             mlflow_uri=redact(tracking_uri(opts.mlflow_uri)))
        return execute(opts, manifest, out, planned, shares)
    finally:
        ray.shutdown()


def open_tracker(opts: SweepOptions, manifest: dict, out: Path, planned) -> MLflowTracker:
    """The sweep's MLflow parent run, created or reopened. The manifest's tracking store wins on resume,
    so the sweep's runs stay in one place; the live URI is used when it names that store, since only it
    carries any credentials."""
    uri = tracking_uri(opts.mlflow_uri)
    tracker = MLflowTracker(uri if redact(uri) == manifest["mlflow_uri"] else manifest["mlflow_uri"],
                            experiment=manifest["name"], sweep_id=manifest["sweep_id"])
    first = planned[0].cfg
    tracker.start({
        "space_file": str(opts.space), "trials": str(len(planned)), "model": first.model, "dataset": first.dataset,
        "sets": " ".join(k + "=" + redact(v) for k, _, v in (x.partition("=") for x in opts.sets)),
        "output": str(out), "metric": opts.metric, "generation": f"greedy, max_new_tokens={first.max_new_tokens}",
    })
    return tracker


def execute(opts: SweepOptions, manifest: dict, out: Path, planned, shares: dict[str, float]) -> int:
    from sweep import console
    from sweep.callbacks import TrialEvents
    from sweep.tuner import build_tuner, collect

    tracker = open_tracker(opts, manifest, out, planned)
    if shares:
        print("GPU share per trial: " + ", ".join(f"{n} {s:g}" for n, s in shares.items()), flush=True)
    live = console.Console(console.new_progress(manifest, out, planned, opts.metric), out, verbose=opts.verbose)
    print(f"sweep {manifest['name']}: {len(planned)} trial(s); their output goes to {out / sweepdir.LOGS_DIR}/",
          flush=True)
    console.activate(live)
    try:
        tuner = build_tuner(out, planned, shares=shares, max_failures=opts.max_failures,
                            callbacks=[TrialEvents(str(out), tracker)])
        outcomes = collect(tuner.fit(), out)
    finally:
        console.activate(None)
        live.clear()  # an exception must not leave the live block on the terminal
    live.close(outcomes)
    rows = write_results(opts, manifest, out, planned, outcomes, tracker)
    for r in rows:
        if r["status"] == sweepdir.ERROR:
            print(f"trial {r['trial_id']} failed: {r['error']}", file=sys.stderr)
    if any(r["status"] in (sweepdir.INTERRUPTED, sweepdir.NOT_RUN) for r in rows):
        print("sweep interrupted: run the same command again to resume it", file=sys.stderr)
    return 1 if sweepdir.sweep_failed(r["status"] for r in rows) else 0


def write_results(opts: SweepOptions, manifest: dict, out: Path, planned, outcomes,
                  tracker: MLflowTracker) -> list[dict]:
    """The table, samples, plots and report.html in the sweep directory and on the parent MLflow run."""
    from sweep.plots import write_plots
    from sweep.report import write_report
    from sweep.summary import write_reports

    rows, md = write_reports(out, planned, outcomes, title=f"Sweep {manifest['name']}", metric=opts.metric,
                             max_new_tokens=planned[0].cfg.max_new_tokens)
    plots = write_plots(out, rows, {p.cfg.name: p.cfg.to_dict() for p in planned})
    write_report(out, manifest, planned, rows, plots, metric=opts.metric)
    tracker.finish(out, rows, sweepdir.sweep_failed(r["status"] for r in rows))
    print("\n" + md + f"\nreport: {out / 'report.html'}  (the table, plots, generations side by side; opens from disk)"
          f"\nresults: {out}  (summary.md, samples.md, summary.csv, plots/, trials/<id>/adapter, logs/)"
          f"\ncompare in MLflow: {mlflow_hint(manifest['mlflow_uri'], tracker.experiment_id)}", flush=True)
    return rows


def mlflow_hint(uri: str, experiment_id: str) -> str:
    """Where the sweep's runs open: MLflow 3.17's UI shows the GenAI trace overview unless the URL (or its
    GenAI / Model training switch) asks for the runs. ``uri`` is the redacted one."""
    runs = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{runs}"
    return f"mlflow ui --backend-store-uri {uri}  then open http://127.0.0.1:5000/{runs}"
