"""A sweep from start to end: space file -> planned trials -> checks -> Ray Tune -> the table.

``run_sweep`` reads top to bottom like the README: everything that can refuse the sweep runs before
anything is started or written; only then is the sweep directory created (or resumed, or extended),
Ray started, the sweep's experiments run in order (``sweep/extend.py``), and the reports written.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from sweep import cluster, mps, storage, sweepdir
from sweep.cli import RunError, UserError
from sweep.cluster import LOOPBACK
from sweep.lock import locked
from sweep.space import baseline_of, expand, load_space, parse_sets
from sweep.store import TrackingStore, check_store, patched_env, redact, strip_credentials, tracking_uri
from sweep.tracking import MLflowTracker
from trainers.config import is_finite_number, name_problem
from trainers.random_bases import prebuild_random, random_bases, stop_build

MIN_GPU_SHARE = 0.01  # Ray keeps resource amounts to four decimals; finer shares are not shares


@dataclass
class Timeline:
    """When the driver's phases ended, in seconds from the start of ``run_sweep`` (the command's own imports,
    ~0.1 s, come before), appended to DIR/logs/driver.log as one line when the driver is done: where a sweep's
    minutes went before its first trial started and after its last one ended (the checks, Ray's start and
    stop, a ``random:`` base written, the MPS daemon stopped; README "Speed"). Never on the console. Written
    with a plain append, not a logging handler, so a full disk costs only this line (a handler would print
    a traceback)."""

    started: float = field(default_factory=time.monotonic)
    marks: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, what: str) -> None:
        self.marks.append((what, time.monotonic() - self.started))

    def line(self) -> str:
        return "driver timeline (s from its start): " + ", ".join(f"{w} {t:.1f}" for w, t in self.marks)

    def append_to(self, log: Path) -> None:
        """Only into a driver log the sweep already writes (a refused sweep leaves no file behind), formatted
        as the log's other lines."""
        import logging

        from sweep.console import LOG_FORMAT

        if log.is_file():
            record = logging.makeLogRecord({"name": "lora_sweep", "levelname": "INFO", "msg": self.line()})
            try:
                with open(log, "a") as f:
                    f.write(logging.Formatter(LOG_FORMAT).format(record) + "\n")
            except OSError:
                pass


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
    extend: bool = False
    num_samples: int | None = None
    node_ip: str = LOOPBACK
    storage: str | None = None
    storage_endpoint: str | None = None
    trial_resources: tuple[str, ...] = ()
    mps: str = "auto"


def _search(space, opts: SweepOptions, sets: dict, for_training: bool):
    """A search space's checked search, with its targets choices resolved and counted on the model."""
    from sweep.plan import TargetShapes, plan
    from sweep.search import bits_choices, corner_configs, resolve_search

    spec = resolve_search(space, opts.space, sets)
    if opts.num_samples is not None:
        if opts.num_samples < max(1, len(spec.seeds)):
            raise UserError(f"--num-samples must be at least {max(1, len(spec.seeds))} (the space's seed trials)")
        spec = replace(spec, search=replace(spec.search, num_samples=opts.num_samples))
    corners = plan(corner_configs(spec), opts.space, for_training=for_training,
                   describe=lambda c: f"Search.axes ({c.name})", also_bits=bits_choices(spec))
    shapes = TargetShapes.from_corners(corners)
    first = corners[0].cfg  # model and data paths made absolute by the plan step
    return replace(spec, fixed={**spec.fixed, "model": first.model, "dataset": first.dataset}), shapes


def plan_sweep(opts: SweepOptions, *, for_training: bool, space=None):
    """The space file's trials (or search), validated and counted, with the ``base`` row first unless turned off.
    ``space``: the space file, already run (a space file is run once per command)."""
    from sweep.plan import PlannedTrial, SweepPlan, plan
    from sweep.search import check_schedule, space_fingerprint

    space = space or load_space(opts.space)
    sets = parse_sets(opts.sets)
    spec = shapes = None
    if space.search is not None:
        spec, shapes = _search(space, opts, sets, for_training)
        planned = [shapes.planned(sample_config(spec, shapes))]  # the first seed's shape: the base row's bits
    else:
        if opts.num_samples is not None:
            raise UserError(f"--num-samples: {opts.space} declares no search")
        planned = plan(expand(space, opts.space, sets), opts.space, for_training=for_training)
    check_schedule(space, opts.space, [p.cfg for p in planned], spec)
    if opts.baseline and planned:
        first = planned[0]
        base = baseline_of(first.cfg)  # its memory estimate: evaluation only
        gpu_gb = plan([base], opts.space, for_training=False)[0].gpu_gb
        base = PlannedTrial(base, 0, first.total_params - first.trainable_params, gpu_gb)
        planned = [base] + ([] if spec else planned)
    elif spec:
        planned = []
    samples = spec.search.num_samples if spec else 0
    fingerprint = space_fingerprint([p.cfg for p in planned], space, spec, samples)
    return SweepPlan(opts.name or space.name, space, planned, spec, shapes, samples, fingerprint)


def dry_run(opts: SweepOptions) -> int:
    from sweep.plan import plan
    from sweep.search import seed_configs
    from sweep.search_summary import dry_run_search
    from sweep.summary import dry_run_table

    check_options(opts)
    p = plan_sweep(opts, for_training=False)
    if p.spec is None:
        print(f"sweep '{p.name}': {len(p.planned)} trials from {opts.space}\n")
        print(dry_run_table(p.planned), end="")
        return 0
    print(f"sweep '{p.name}': a search of {p.num_samples} samples from {opts.space}\n")
    print(dry_run_search(p.spec, p.shapes, p.space, p.num_samples))
    seeds = plan(seed_configs(p.spec), opts.space, for_training=False)
    print("seed trials, evaluated first:\n")
    print(dry_run_table(p.planned + seeds), end="")
    return 0


def check_options(opts: SweepOptions) -> None:
    """The command line's own numbers and names, before the space file is even read."""
    gpus = opts.gpus_per_trial
    if gpus != "auto":
        if not is_finite_number(gpus) or gpus <= 0:
            raise UserError(f"--gpus-per-trial must be 'auto' or a finite number > 0, got {gpus}")
        if gpus < MIN_GPU_SHARE:
            raise UserError(f"--gpus-per-trial must be at least {MIN_GPU_SHARE} (a hundredth of a GPU), got {gpus}")
        if gpus > 1:  # see README, "More than one GPU per trial"
            raise UserError(f"--gpus-per-trial {gpus:g}: a trial trains on one GPU (no data parallelism across "
                            "GPUs), so the others would sit idle; use 1, a share below 1, or auto")
    if opts.max_failures < 0:
        raise UserError(f"--max-failures must be >= 0, got {opts.max_failures}")
    if opts.name is not None and (problem := name_problem(opts.name)) is not None:
        raise UserError(f"--name {opts.name!r} {problem}")
    if opts.resume and opts.fresh:
        raise UserError("--resume and --fresh contradict each other: pass one of them")
    if opts.extend and (opts.fresh or opts.resume):
        raise UserError("--extend grows a sweep: it cannot be combined with --fresh or --resume")
    try:
        ip = ipaddress.ip_address(opts.node_ip)
    except ValueError:
        raise UserError(f"--ray-node-ip must be an IP address of this machine, got {opts.node_ip!r}") from None
    if ip.is_unspecified:
        raise UserError(f"--ray-node-ip must be an address of this machine, not {opts.node_ip}")
    if opts.address and opts.node_ip != LOOPBACK:
        raise UserError("--ray-node-ip sets up the local Ray a sweep starts; with --address the cluster has its own")
    try:
        socket.getaddrinfo(opts.dashboard_host, None)
    except (OSError, UnicodeError) as e:
        raise UserError(f"--dashboard-host {opts.dashboard_host!r} is not an address of this machine ({e})") from None
    storage.from_flags(opts.storage, opts.storage_endpoint)
    mps.check(opts.mps, opts.address)
    if cluster.parse_resources(opts.trial_resources) and not opts.address:
        raise UserError("--trial-resource: the local Ray a sweep starts offers no custom resources; pass --address "
                        "of a cluster whose nodes offer it")


def run_sweep(opts: SweepOptions) -> int:
    """Every check that can refuse the sweep, then (holding the directory's lock) the run itself; the sweep's
    ``random:`` bases are written meanwhile, from the start."""
    timeline = Timeline()
    check_options(opts)
    space = load_space(opts.space)
    build = None if opts.address else prebuild_random(early_random_bases(opts, space))
    try:
        return checked_run(opts, space, build, timeline)
    finally:
        stop_build(build)  # refused while it built (a finished or waited-for build is left alone)


def early_random_bases(opts: SweepOptions, space) -> set[tuple[str, int]]:
    """The ``random:`` bases of a grid's trials, or of a search's seed trials and corners, read before the
    plan imports torch and reads the data, so their build (29 s for the 3B base on an H200 host) overlaps the
    plan, the checks and Ray's start (on an H200 it had waited 17 s beyond Ray's start when it began after
    the checks). They are the plan's (a test checks, for the shipped spaces); ``start`` builds the plan's when
    nothing was started here. A space the plan refuses builds nothing."""
    from sweep.search import corner_configs, resolve_search, seed_configs

    sets = parse_sets(opts.sets)
    try:
        if space.search is None:
            return random_bases(expand(space, opts.space, sets))
        spec = resolve_search(space, opts.space, sets)
        return random_bases(seed_configs(spec) + corner_configs(spec))
    except UserError:  # the plan refuses it next, with this same line
        return set()


def checked_run(opts: SweepOptions, space, build, timeline: Timeline) -> int:
    """The plan and every check that can refuse it, then ``start``."""
    from sweep import extend
    from sweep.console import DriverLogs

    plan = plan_sweep(opts, for_training=True, space=space)
    timeline.mark("planned")
    out = Path(opts.output or Path("sweeps") / plan.name).resolve()
    sweepdir.check_writable(out)
    cluster.check_address(opts.address)
    if not opts.address:
        cluster.check_local_resources(share_trials(plan), opts.gpus_per_trial)
    with locked(out):
        manifest = sweepdir.existing_manifest(out, plan.fingerprint, fresh=opts.fresh, resume=opts.resume,
                                              extend=opts.extend)
        added = extend.extension(manifest, plan, sweepdir.experiments(manifest)) if opts.extend else None
        store = tracking_store(opts, out, manifest)
        tune_storage = storage.for_sweep(storage.from_flags(opts.storage, opts.storage_endpoint), manifest)
        logs = DriverLogs(opts.verbose)  # from here on Ray's and MLflow's notes go to DIR/logs/driver.log
        if tune_storage is not None:
            storage.check(tune_storage)  # before the tracking probe, which may create a SQLite file
        check_store(store)  # only a store that answered is ever recorded in sweep.json
        return start(opts, plan, out, manifest, added, store, tune_storage, logs, timeline, build)


def tracking_store(opts: SweepOptions, out: Path, manifest: dict | None) -> TrackingStore:
    """The store the sweep writes to. A resumed sweep keeps the one its manifest records, so its runs
    stay in one place; an explicit --mlflow-uri naming another is refused rather than ignored."""
    live = TrackingStore.parse(tracking_uri(opts.mlflow_uri))
    if manifest is None:
        return live
    recorded = strip_credentials(manifest["mlflow_uri"])
    if recorded == live.uri:
        return live
    if opts.mlflow_uri:
        raise UserError(f"the sweep in {out} tracks its runs in {recorded}; resume with that --mlflow-uri (or "
                        "none), or pass --fresh to start a new sweep")
    return TrackingStore(recorded)  # credentials, if it needs any, from MLflow's environment variables


def start(opts: SweepOptions, plan, out: Path, manifest: dict | None, added: list | None, store: TrackingStore,
          tune_storage: storage.Storage | None, logs, timeline: Timeline | None = None, build=None) -> int:
    """``build``: the child writing the sweep's ``random:`` bases, if ``run_sweep`` started one already."""
    import ray

    from sweep import extend
    from sweep.console import DRIVER_LOG

    timeline = timeline or Timeline()
    timeline.mark("checked")

    if opts.address is None and build is None:  # trials on this machine: their random bases built once, before
        build = prebuild_random(random_bases(p.cfg for p in share_trials(plan)))  # they start (any not built early)
    daemon = None
    try:
        daemon = mps.start_for_sweep(opts.mps, address=opts.address, gpus_per_trial=opts.gpus_per_trial,
                                     cuda_trials=any(p.cfg.device == "cuda" for p in share_trials(plan)), out=out)
        cluster.start_ray(opts.address, opts.dashboard_host, opts.node_ip, verbose=opts.verbose)
        timeline.mark("Ray started")
        logs.quiet()
        if build is not None:
            build.wait()  # built while Ray started
            timeline.mark("random base written")
        with patched_env(store.env()):  # the driver's MLflow client only: Ray's processes are already up
            shares = cluster.gpu_shares(share_trials(plan), opts.gpus_per_trial)  # auto: from the GPUs' memory
            cluster.check_resources(share_trials(plan), shares, cluster.parse_resources(opts.trial_resources))
            if opts.fresh and sweepdir.needs_moving_aside(out):  # only now that nothing can refuse the run
                sweepdir.move_aside(out)
            sweepdir.prepare(out)
            logs.to_file(out)
            if manifest is None:
                manifest = sweepdir.new_manifest(
                    out, name=plan.name, space=str(opts.space), fingerprint=plan.fingerprint, mlflow_uri=store.uri,
                    experiments=extend.first_experiments(plan),
                    search_identity=plan.spec.identity() if plan.spec else None,
                    storage=tune_storage and tune_storage.to_manifest())
            elif added is not None:
                print(f"extending sweep {manifest['name']}: " + (", ".join(
                    f"{len(e['trials'])} new trial(s)" if "trials" in e else f"{e['samples']} more sample(s)"
                    for e in added) or "nothing to add (the space declares no trials or samples beyond it)"),
                    flush=True)
                manifest = sweepdir.update_manifest(out, manifest, space_fingerprint=plan.fingerprint,
                                                    experiments=sweepdir.experiments(manifest) + added)
            timeline.mark("sweep started")
            try:
                return execute(opts, manifest, out, plan, store, shares)
            finally:
                timeline.mark("sweep ended")  # its table and reports written
    finally:
        stop_build(build)  # Ctrl-C'd or refused while it built
        ray.shutdown()
        timeline.mark("Ray stopped")
        if daemon is not None:
            mps.stop_for_sweep(daemon)  # after Ray: no trial process is left using it
            timeline.mark("MPS daemon stopped")
        timeline.append_to(out / sweepdir.LOGS_DIR / DRIVER_LOG)


def share_line(plan, shares: dict[str, float], address: str | None) -> str:
    """The console's line of GPU shares, naming the trials whose kernels go first when the trials on this
    machine are MPS clients (sweep/mps.py)."""
    line = "GPU share per trial: " + ", ".join(f"{n} {s:g}" for n, s in shares.items())
    first = [n for n, level in mps.client_priorities(plan.planned, shares).items() if level == mps.NORMAL]
    if first and address is None and mps.machine_daemon():
        line += f" ({', '.join(first)} first under MPS)"
    return line


def share_trials(plan) -> list:
    """The trials GPU shares are sized for: the planned ones and, for a search, one standing for every
    sample (the largest estimate over its targets, bits and r)."""
    from sweep.plan import PlannedTrial
    from sweep.tuner import SEARCH_SHARE

    if plan.spec is None:
        return plan.planned
    sample = replace(sample_config(plan.spec, plan.shapes), name=SEARCH_SHARE)
    return plan.planned + [PlannedTrial(sample, 0, 0, plan.shapes.gpu_gb)]


def sample_config(spec, shapes):
    """A config shaped like the search's trials: its first seed's, else its smallest corner's."""
    from sweep.search import corner_configs, seed_configs

    cfg = (seed_configs(spec) or corner_configs(spec))[0]
    return replace(cfg, target_modules=shapes.modules[cfg.targets_label])


def open_tracker(opts: SweepOptions, manifest: dict, out: Path, plan, store: TrackingStore) -> MLflowTracker:
    """The sweep's MLflow parent run, created or reopened, in the store ``tracking_store`` chose."""
    tracker = MLflowTracker(store.uri, experiment=manifest["name"], sweep_id=manifest["sweep_id"])
    first = plan.spec.fixed if plan.spec else plan.planned[0].cfg.to_dict()
    tracker.start({
        "space_file": str(opts.space), "trials": str(len(plan.planned) + plan.num_samples), "model": first["model"],
        "dataset": first["dataset"], "output": str(out), "metric": opts.metric,
        "sets": " ".join(k + "=" + redact(v) for k, _, v in (x.partition("=") for x in opts.sets)),
        "generation": f"greedy, max_new_tokens={first['max_new_tokens']}",
    })
    return tracker


def run_experiments(opts: SweepOptions, manifest: dict, out: Path, plan, tracker, shares: dict[str, float]) -> dict:
    """Run (or restore) each unfinished experiment in order; returns the manifest as it ends. An interrupted
    (Ctrl-C'd) experiment stays unfinished and those after it wait for the resume; one with failed trials
    stays unfinished too (a rerun retries them, as Ray's restore does) but does not hold the others up."""
    from sweep.callbacks import TrialEvents
    from sweep.guard import Guarded
    from sweep.searchers import stop_reason
    from sweep.tuner import build_tuner, collect

    experiments = sweepdir.experiments(manifest)
    for i, exp in enumerate(experiments):
        if exp.get("finished"):
            continue
        callbacks = [Guarded(TrialEvents(str(out), tracker, stop_reason(plan.space.early_stopping)))]
        build_tuner(out, exp, plan, shares=shares, max_failures=opts.max_failures, callbacks=callbacks,
                    earlier=collect(out, experiments[:i]) if i else {},
                    resources=cluster.parse_resources(opts.trial_resources)).fit()
        outcomes = collect(out, [exp]).values()
        ended = exp["name"] in sweepdir.budget_ends(out)
        if any(o.status == sweepdir.INTERRUPTED or (o.status == sweepdir.NOT_RUN and not o.reason) for o in outcomes) \
                or ("samples" in exp and len(outcomes) < exp["samples"] and not ended):
            break
        if any(o.status == sweepdir.ERROR for o in outcomes):
            continue
        # a search a budget ended keeps the samples it made: an --extend counts from there
        made = {"samples": len(outcomes)} if "samples" in exp and ended else {}
        experiments[i] = {**exp, "finished": True, **made}
        manifest = sweepdir.update_manifest(out, manifest, experiments=experiments)
    return manifest


def execute(opts: SweepOptions, manifest: dict, out: Path, plan, store: TrackingStore,
            shares: dict[str, float]) -> int:
    """The experiments run; whatever happens, the table is written (or printed) and the MLflow runs are
    closed before the driver leaves. Records that could not be written (a full disk, a store gone away)
    end in one line and exit 1; anything unforeseen is re-raised after that, with its traceback."""
    from sweep import console, guard
    from sweep.callbacks import close_stopped
    from sweep.summary import table_trials, truncation_warnings
    from sweep.tuner import collect

    guard.FAILURES.clear()
    try:
        tracker = open_tracker(opts, manifest, out, plan, store)
    except Exception as e:  # noqa: BLE001 - it answered the probe a moment ago
        raise RunError(f"the tracking store {store.uri} failed as the sweep started ({guard.describe(e)}); run the "
                       "same command again once it answers") from None
    if shares:
        print(share_line(plan, shares, opts.address), flush=True)
    experiments = sweepdir.experiments(manifest)
    known = table_trials(plan, collect(out, experiments), experiments)  # a search's samples so far
    live = console.Console(console.new_progress(manifest, out, known, opts.metric), out, verbose=opts.verbose)
    search = f" and a search of {plan.num_samples} samples" if plan.spec else ""
    print(f"sweep {manifest['name']}: {len(plan.planned)} trial(s){search}; their output goes to "
          f"{out / sweepdir.LOGS_DIR}/", flush=True)
    unexpected = None
    try:
        console.activate(live)
        try:
            manifest = run_experiments(opts, manifest, out, plan, tracker, shares)
        except Exception as e:  # noqa: BLE001 - first the table and the runs, from what the directory records
            if isinstance(e, OSError):  # e.g. the manifest, on a full disk
                guard.FAILURES.append(guard.describe(e))
            elif not isinstance(e, guard.RecordingFailed):
                unexpected = e
        finally:
            console.activate(None)
            live.clear()  # an exception must not leave the live block on the terminal
        experiments = sweepdir.experiments(manifest)
        outcomes = collect(out, experiments)  # a copy the full disk refuses is noted in guard.FAILURES
        try:
            live.close(outcomes)
            close_stopped(out, tracker, outcomes)
        except Exception as e:  # noqa: BLE001 - the progress file or the ledger on a full disk, the store
            guard.FAILURES.append(guard.describe(e))
        planned = table_trials(plan, outcomes, experiments)
        rows, failure = write_results(opts, manifest, out, plan, planned, outcomes, tracker, shares,
                                      failed=unexpected is not None)
    except BaseException as e:  # Ctrl-C while reporting, a failure in the fallback: no run stays RUNNING
        close_runs(tracker, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    for r in rows:
        if r["status"] == sweepdir.ERROR:
            print(f"trial {r['trial_id']} failed: {r['error']}", file=sys.stderr)
    for line in truncation_warnings(rows):
        print(f"warning: {line}", file=sys.stderr)
    if not failure and any(r["status"] == sweepdir.INTERRUPTED or (r["status"] == sweepdir.NOT_RUN
                                                                  and not r["stop_reason"]) for r in rows):
        print("sweep interrupted: run the same command again to resume it", file=sys.stderr)
    if unexpected is not None:
        raise unexpected
    if failure:
        raise RunError(f"the sweep stopped: {failure}. Fix that (free disk space, bring the tracking store back) "
                       "and run the same command again to resume")
    return 1 if sweepdir.sweep_failed(rows) else 0


def write_results(opts: SweepOptions, manifest: dict, out: Path, plan, planned, outcomes, tracker: MLflowTracker,
                  shares: dict[str, float], failed: bool = False) -> tuple[list[dict], str | None]:
    """The table (with its budget note and, for a search, its search section), samples, plots and
    report.html in the sweep directory and on the parent MLflow run, and what failed on the way. On a full
    disk the table still reaches the console, and the runs are closed."""
    from sweep import guard
    from sweep.plots import write_plots
    from sweep.report import write_report
    from sweep.search_summary import budget_note, report_search
    from sweep.summary import build_rows, to_markdown, write_reports

    experiments = sweepdir.experiments(manifest)
    failure, title = (guard.FAILURES or [None])[0], f"Sweep {manifest['name']}"
    try:
        rows, md = write_reports(out, planned, outcomes, title=title, metric=opts.metric)
        md += budget_note(out, rows, experiments)
        importance = {}
        if plan.spec is not None:
            section, importance = report_search(out, plan, rows, outcomes, opts.metric, experiments, shares)
            tracker.log_search(importance, section)
            md += section
        plots = write_plots(out, rows, search=plan.spec is not None, importance=importance)
        write_report(out, manifest, planned, rows, plots, metric=opts.metric)
    except OSError as e:  # a full disk: the table still reaches the console
        failure = failure or guard.describe(e)
        rows = build_rows(planned, outcomes, opts.metric)
        md = to_markdown(rows, title, opts.metric)
    failed = failed or failure is not None or sweepdir.sweep_failed(rows)
    try:
        tracker.finish(out, rows, failed)
    except Exception as e:  # noqa: BLE001 - the store went away at the very end
        failure = failure or f"closing the MLflow runs failed: {guard.describe(e)}"
    print("\n" + md + f"\nreport: {out / 'report.html'}  (the table, plots, generations side by side; opens from disk)"
          f"\nresults: {out}  (summary.md, samples.md, summary.csv, plots/, trials/<id>/adapter, logs/)"
          f"\ncompare in MLflow: {mlflow_hint(tracker.uri, tracker._experiment_id)}", flush=True)
    return rows, failure


def mlflow_hint(uri: str, experiment_id: str | None) -> str:
    """Where the sweep's runs open: MLflow 3.17's UI shows the GenAI trace overview unless the URL (or its
    GenAI / Model training switch) asks for the runs. ``uri`` carries no credentials."""
    runs = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{runs}"
    return f"mlflow ui --backend-store-uri {uri}  then open http://127.0.0.1:5000/{runs}"


def close_runs(tracker: MLflowTracker, status: str) -> None:
    try:
        tracker.close(status)
    except Exception as e:  # noqa: BLE001 - already leaving on another error; say this one in a line
        print(f"warning: could not close the sweep's MLflow runs: {e}", file=sys.stderr)
