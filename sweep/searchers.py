"""A space's search, early stopping and budgets as Ray Tune's own objects.

  grid    the explicit trials, through Ray's default BasicVariantGenerator (``tune.grid_search``)
  random  BasicVariantGenerator sampling the axes (seeded), the seeds as its points_to_evaluate
  tpe     OptunaSearch with a seeded TPESampler, the seeds as points_to_evaluate, earlier results
          told to it as evaluated points (an --extend's warm start), under Ray's ConcurrencyLimiter
  ASHA / MedianStopping   Ray's ASHAScheduler / MedianStoppingRule on the periodic eval loss
  budgets  a Ray Stopper (wall time through Ray's TimeoutStopper; GPU hours counted from each result)

Ray restores all of it with the experiment (Tuner.restore): the searcher's state, the sample counter,
the budget left. The scheduler is the exception: Ray Tune does not save its state, so ours replay each
restored trial's earlier evals (its sealed eval checkpoints) when Ray adds the trial back.
"""

from __future__ import annotations

import time
from pathlib import Path

from ray import tune
from ray.tune import Stopper
from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import TimeoutStopper

from sweep.axes import ASHA, Choice, FloatRange, IntRange, MedianStopping
from sweep.search import SearchSpec
from trainers.config import SCHEDULE_METRIC, SCHEDULE_TIME, TUNE_POINT, TUNE_TRIAL, TrialConfig, trial_name

OPTUNA_PREFIX = TUNE_POINT + "/"  # OptunaSearch names a nested parameter by its path: point/r


def domain(axis):
    """A search axis as a Ray Tune domain (ranges include both ends, as the space file reads)."""
    if isinstance(axis, Choice):
        return tune.choice(list(axis.values))
    if isinstance(axis, IntRange):
        return (tune.lograndint if axis.log else tune.randint)(axis.low, axis.high + 1)
    if isinstance(axis, FloatRange):
        return (tune.loguniform if axis.log else tune.uniform)(axis.low, axis.high)
    raise TypeError(f"not a search axis: {axis!r}")


class SampleNamer:
    """Names a search's trials ``s003-r16-all_linear-4bit``: the number is Ray's own count of the trials of
    the experiment (the first field of ``Trial.experiment_tag``, 1-based for searchers, 0-based for the
    variant generator), after the ``offset`` samples of the sweep's earlier searches."""

    def __init__(self, offset: int, first: int):
        self.offset, self.first = offset, first

    def number(self, trial) -> int:
        return self.offset + int(trial.experiment_tag.split("_", 1)[0]) - self.first + 1

    def __call__(self, trial) -> str:
        values = {**trial.config[TUNE_TRIAL]["config"], **trial.config[TUNE_POINT]}
        return trial_name(values, self.number(trial))


def grid_name(trial) -> str:
    return trial.config[TUNE_TRIAL]["name"]  # names like r8-attention-4bit, chosen by the space


class _OptunaSearch(OptunaSearch):
    """OptunaSearch reads the metric from every intermediate result; ours come in kinds (steps and
    checkpoints carry no eval loss), so only the evals reach it."""

    def on_trial_result(self, trial_id: str, result: dict):
        if self.metric in result:
            super().on_trial_result(trial_id, result)


def searcher(spec: SearchSpec, *, samples_offset: int, seeds: list[dict], evaluated: list[tuple[dict, float]]):
    """The experiment's search algorithm, its name creator, and the ``point`` part of its param space."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    domains = {name: domain(axis) for name, axis in spec.axes.items()}
    s = spec.search
    if s.algorithm == "random":
        # A later search (an --extend) draws with another seed, so it does not repeat the first one's draws.
        alg = BasicVariantGenerator(points_to_evaluate=[{TUNE_POINT: p} for p in seeds], random_state=s.seed
                                    + samples_offset, max_concurrent=s.max_concurrent)
        return alg, SampleNamer(samples_offset, first=0), domains
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "new study created" note is not for the console
    flat = lambda p: {OPTUNA_PREFIX + k: v for k, v in p.items()}  # noqa: E731
    opt = _OptunaSearch(space={TUNE_POINT: domains}, metric=SCHEDULE_METRIC, mode="min",
                        points_to_evaluate=[flat(p) for p in seeds] or None,
                        sampler=optuna.samplers.TPESampler(seed=s.seed))
    for point, value in evaluated:  # results of the sweep's earlier searches: TPE starts from them
        opt.add_evaluated_point(flat(point), value)
    alg = ConcurrencyLimiter(opt, s.max_concurrent) if s.max_concurrent else opt
    return alg, SampleNamer(samples_offset, first=1), {}


def param_space(entry, log_dir: Path, point: dict | None = None) -> dict:
    """What every trial of an experiment gets: its ``trial`` entry (or a grid of them), where its log file
    goes, and a search's ``point`` domains (random search). Not where its checkpoints are: a trial asks
    Ray's storage context for that, on whichever node it runs."""
    from trainers.entry import LOG_DIR_KEY

    space = {TUNE_TRIAL: entry, LOG_DIR_KEY: str(log_dir)}
    return {**space, TUNE_POINT: point} if point else space


def earlier_evals(trial) -> list[tuple[int, float]]:
    """(step, eval loss) of every eval a trial reported before a resume, from its sealed eval checkpoints."""
    from trainers.checkpoints import evals

    try:
        trial_dir = trial.path  # in Ray's storage (local, NFS or S3), read through its filesystem
    except RuntimeError:  # a new trial: Ray names its directory only after adding it, and it has no evals yet
        return []
    found = evals(trial_dir, trial_config(trial).fingerprint, trial.storage.storage_filesystem)
    return [(e[SCHEDULE_TIME], e[SCHEDULE_METRIC]) for _, e in found]


class _Earlier:
    """A trial of an earlier experiment of the sweep, as a scheduler's records need it: an id."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


class _ASHA(ASHAScheduler):
    """Ray's ASHA, with a restored trial's earlier evals replayed into its bracket's rungs, and an --extend's
    new trials judged against the rungs the sweep's earlier trials reached (``history``)."""

    def __init__(self, *, history: list[list[tuple[int, float]]] = (), **kwargs):
        super().__init__(**kwargs)
        for i, evals in enumerate(history):
            for bracket in self._brackets:
                for step, loss in evals:
                    bracket.on_result(_Earlier(f"earlier-{i}"), step, self._metric_op * loss)

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for step, loss in earlier_evals(trial):
            bracket.on_result(trial, step, self._metric_op * loss)


class _Median(MedianStoppingRule):
    """Ray's MedianStoppingRule, with a restored trial's earlier evals put back in its history, and an
    --extend's new trials compared with the sweep's earlier trials (``history``)."""

    def __init__(self, *, history: list[list[tuple[int, float]]] = (), **kwargs):
        super().__init__(**kwargs)
        for i, evals in enumerate(history):
            self._results[f"earlier-{i}"] = [{SCHEDULE_TIME: s, SCHEDULE_METRIC: v} for s, v in evals]

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        replayed = [{SCHEDULE_TIME: s, SCHEDULE_METRIC: v} for s, v in earlier_evals(trial)]
        if replayed:  # an empty history would break the rule's look-ups (it reads each trial's last result)
            self._results[trial].extend(replayed)


def scheduler(stop, max_t: int, history: list[list[tuple[int, float]]] = ()):
    """Ray's scheduler for the space's early stopping, on the eval loss at each optimizer step; ``history``:
    the (step, eval loss) evals of each trial the sweep ran before this experiment."""
    from ray.tune.schedulers import FIFOScheduler

    common = dict(time_attr=SCHEDULE_TIME, metric=SCHEDULE_METRIC, mode="min", history=list(history))
    if isinstance(stop, ASHA):
        # stop_last_trials=False: max_t is an upper bound on steps; a trial past the last rung runs to its end.
        return _ASHA(**common, max_t=max_t, grace_period=stop.grace_period, reduction_factor=stop.reduction_factor,
                     brackets=stop.brackets, stop_last_trials=False)
    if isinstance(stop, MedianStopping):
        return _Median(**common, grace_period=stop.grace_period, min_samples_required=stop.min_samples)
    return FIFOScheduler()


def stop_reason(stop) -> str:
    return {ASHA: "ASHA", MedianStopping: "median stopping"}.get(type(stop), "")


def hours(h: float) -> str:
    return f"{h:g} h" if h >= 1 else f"{h * 60:.3g} min" if h * 60 >= 1 else f"{h * 3600:.3g} s"


class BudgetStopper(Stopper):
    """A run's wall-time and GPU-hours budgets. TuneConfig(time_budget_s) builds the same TimeoutStopper but
    nothing tells the driver afterwards that it fired, and the table must say so; Ray has no GPU-hours
    stopper. Ray saves this object with its experiment state, so a resumed run keeps spending the same
    budget. When it fires Ray stops every running trial and starts no more."""

    def __init__(self, on_end, wall_hours: float | None, gpu_hours: float | None, devices_per_trial: float):
        self.on_end = on_end
        self.wall = TimeoutStopper(wall_hours * 3600) if wall_hours else None
        self.wall_hours, self.gpu_hours, self.devices = wall_hours, gpu_hours, devices_per_trial
        self.device_seconds, self.ended = 0.0, ""

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.device_seconds += float(result.get("time_this_iter_s") or 0.0) * self.devices
        return False

    def stop_all(self) -> bool:
        if not self.ended:
            if self.wall is not None and self.wall.stop_all():
                self.ended = f"wall-time budget of {hours(self.wall_hours)}"
            elif self.gpu_hours and self.device_seconds >= self.gpu_hours * 3600:
                self.ended = f"GPU-hours budget of {hours(self.gpu_hours)}"
            if self.ended:
                self.on_end(self.ended, time.time())
        return bool(self.ended)


def trial_config(trial) -> TrialConfig:
    """A Ray Tune trial's config, as the trainable rebuilt it (its name is Tune's trial name)."""
    return TrialConfig.from_tune(trial.config, str(trial))
