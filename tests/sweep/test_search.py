"""Searches without a sweep: axes and their checks, names and configs of sampled trials, TPE's seed,
alpha rules, the dry run's parameter range, budgets, early stopping's memory, --extend's plan, the table."""

import json
from types import SimpleNamespace

import pytest

from sweep.run import main
from tests.conftest import REPO

SPACE = """\
from sweep import ASHA, Budget, Choice, FloatRange, IntRange, MedianStopping, Search, Settings, Space, Trial
space = Space(
    name="s",
    settings=Settings(model="random:tiny-llama", dataset="bundled:products-400", device="cpu", train_samples=100,
                      batch_size=8, epochs=2, learning_rate=3e-3, eval_every={eval_every}),
    trials=[{trials}],
    search=Search(axes={{{axes}}}, num_samples={samples}),
    early_stopping={stop},
    budget={budget},
)
"""
AXES = ('"r": IntRange(4, 32, log=True), "targets": Choice(["attention", "all_linear"]), "bits": Choice([4, 16]), '
        '"learning_rate": FloatRange(1e-3, 1e-2, log=True)')
SEEDS = 'Trial(r=8, targets="attention", bits=4), Trial(r=8, targets="all_linear", bits=4)'


def search_space(tmp_path, axes=AXES, trials=SEEDS, samples=4, eval_every=4, stop="ASHA(grace_period=4)", budget=None):
    path = tmp_path / "search.py"
    path.write_text(SPACE.format(axes=axes, trials=trials, samples=samples, eval_every=eval_every, stop=stop,
                                 budget=budget))
    return path


def spec_of(path, **opts):
    from sweep.driver import SweepOptions, plan_sweep

    return plan_sweep(SweepOptions(space=str(path), **opts), for_training=False)


# ---- checks: exit 2, one line naming file and axis / trial / field, nothing started ----------------------

def _with(axis: str, replacement: str) -> str:
    parts = dict(p.split(": ", 1) for p in AXES.split(", \"") if p)
    parts = {k.strip('"'): v for k, v in parts.items()}
    parts[axis] = replacement
    return ", ".join(f'"{k}": {v}' for k, v in parts.items() if v is not None)


BAD = {
    "unknown axis": (dict(axes=AXES + ', "rank": Choice([1, 2])'), "Search.axes['rank']: unknown field"),
    "not searchable": (dict(axes=AXES + ', "test_fraction": FloatRange(0.1, 0.2)'),
                       "'test_fraction' cannot be searched: it changes the model or the held-out data"),
    "loss_on searched": (dict(axes=AXES + ', "loss_on": Choice(["all", "completion"])'),
                         "'loss_on' cannot be searched: trials taking their loss on different tokens"),
    "data format searched": (dict(axes=AXES + ', "data_format": Choice(["post", "alpaca"])'),
                             "'data_format' cannot be searched: it changes the data or the evaluation"),
    "bits missing": (dict(axes='"r": Choice([4, 8]), "targets": "attention"'), "Search.axes must give bits"),
    "range reversed": (dict(axes=AXES + ', "lora_dropout": FloatRange(0.1, 0.0)'), "needs numbers low < high"),
    "log from zero": (dict(axes=AXES.replace("FloatRange(1e-3", "FloatRange(0.0")), "log-scale range needs low > 0"),
    "float range on r": (dict(axes=AXES.replace("IntRange(4, 32, log=True)", "FloatRange(4, 32)")),
                         "Search.axes['r']: 'r' is an integer field: use IntRange or Choice"),
    "bits as a range": (dict(axes=AXES.replace("Choice([4, 16])", "IntRange(4, 16)")), "'bits' takes a Choice"),
    "empty choice": (dict(axes=AXES.replace('Choice(["attention", "all_linear"])', "Choice([])"), trials=""),
                     "Search.axes['targets']: Choice needs a non-empty list"),
    "value out of bounds": (dict(axes=AXES + ', "lora_dropout": FloatRange(0.0, 1.5)'),
                            "Search.axes['lora_dropout']: value 1.5: must be in [0, 1)"),
    "bad bits choice": (dict(axes=AXES.replace("Choice([4, 16])", "Choice([4, 5])")),
                        "Search.axes['bits']: value 5: must be one of 4, 8, 16"),
    "targets module missing": (dict(axes=AXES.replace('"all_linear"]', '["q_proj", "wqkv"]]'),
                                    trials='Trial(r=8, targets="attention", bits=4)'),
                               "Search.axes (targets=q_proj,wqkv r=32): field 'targets': module 'wqkv' matches no"),
    "seed outside its axis": (dict(trials='Trial(r=64, targets="attention", bits=4)'),
                              "trial 0 (seed): field 'r' 64 is outside the search axis IntRange"),
    "seed sets a fixed field": (dict(trials='Trial(r=8, targets="attention", bits=4, epochs=1)'),
                                "trial 0 (seed): field 'epochs' is not searched (fixed at 2)"),
    "fewer samples than seeds": (dict(samples=1), "Search.num_samples 1 is fewer than its 2 seed trials"),
    "early stopping without evals": (dict(eval_every=0), "Space.early_stopping needs Settings(eval_every=N)"),
    "grace past the last step": (dict(stop="ASHA(grace_period=100)"),
                                 "ASHA.grace_period must be an integer from 1 to the trials' 24 optimizer steps"),
    "reduction factor": (dict(stop="ASHA(grace_period=4, reduction_factor=1)"), "ASHA needs reduction_factor > 1"),
    "median samples": (dict(stop="MedianStopping(grace_period=4, min_samples=0)"), "min_samples must be an integer"),
    "negative budget": (dict(budget="Budget(wall_hours=-1)"), "Budget.wall_hours must be a positive number"),
    "max_trials zero": (dict(budget="Budget(max_trials=0)"), "Budget.max_trials must be a positive integer"),
}
CLI = {
    "--set on a searched axis": (["--set", "learning_rate=0.001"],
                                 "--set learning_rate: 'learning_rate' is a search axis"),
    "--num-samples below the seeds": (["--num-samples", "1"], "--num-samples must be at least 2"),
    "--extend with nothing to extend": (["--extend"], "--extend: no sweep to extend in"),
    "--set seeds on a search": (["--set", "seeds=3"], "seeds=3 repeats a grid's trials over training seeds"),
}


def _refused(argv, tmp_path, capsys, says: str, starts: str = "error: "):
    import ray

    out = tmp_path / "new"
    assert main([*argv, "--output", str(out), "--mlflow-uri", f"sqlite:///{tmp_path}/m.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(starts) and "\n" not in err and says in err, err
    assert not ray.is_initialized() and not out.exists() and not (tmp_path / "m.db").exists()


@pytest.mark.parametrize("case", BAD)
def test_bad_search_exits_2_with_one_line_naming_the_file(case, tmp_path, capsys, model_cache):
    changes, says = BAD[case]
    path = search_space(tmp_path, **changes)
    _refused([str(path)], tmp_path, capsys, says, starts=f"error: {path}: ")


@pytest.mark.parametrize("case", CLI)
def test_bad_search_options_exit_2(case, tmp_path, capsys, model_cache):
    extra, says = CLI[case]
    _refused([str(search_space(tmp_path)), *extra], tmp_path, capsys, says)


def test_num_samples_on_a_grid_is_refused(tmp_path, capsys, model_cache):
    _refused([str(REPO / "search_spaces" / "smoke.py"), "--num-samples", "3"], tmp_path, capsys,
             "smoke.py declares no search", starts="error: --num-samples: ")


# ---- what a search resolves to --------------------------------------------------------------------------

def test_smoke_search_resolves_axes_seeds_and_counts():
    p = spec_of(REPO / "search_spaces" / "smoke_search.py")
    assert list(p.spec.axes) == ["r", "targets", "bits", "alpha_rule", "learning_rate"]
    assert p.spec.seeds == [
        {"r": 8, "targets": "attention", "bits": 4, "alpha_rule": "fixed", "learning_rate": 3e-3},
        {"r": 8, "targets": "all_linear", "bits": 4, "alpha_rule": "fixed", "learning_rate": 3e-3}]
    # tiny-llama: attention r=1 -> 2 layers x (q, v) x (64 + 64) = 512; all_linear r=1 -> 26,112 / 8 = 3,264
    assert p.shapes.per_r == {"attention": 512, "all_linear": 3264}
    assert p.num_samples == 8 and p.max_steps == 36  # 144 train rows / batch 8 = 18 steps x 2 epochs
    assert [t.cfg.name for t in p.planned] == ["base"] and p.planned[0].cfg.bits == 4


def test_dry_run_shows_axes_ranges_and_the_parameter_range(capsys):
    assert main([str(REPO / "search_spaces" / "smoke_search.py"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "| r | 4 to 32, log scale |" in out and "| learning_rate | 0.001 to 0.01, log scale |" in out
    assert "| targets | one of attention, all_linear |" in out and "| bits | one of 4, 16 |" in out
    # 4 x 512 (r=4, attention) to 32 x 3,264 (r=32, all_linear)
    assert "trainable parameters: 2,048 (r=4, attention) to 104,448 (r=32, all_linear)" in out
    assert "| s001-r8-attention-4bit | 8 | attention | q_proj, v_proj | 4 | 4,096 |" in out
    assert "| s002-r8-all_linear-4bit | 8 | all_linear |" in out and "| 26,112 |" in out


@pytest.mark.slow
def test_dry_run_of_paper_search_has_the_posts_counts(capsys):
    assert main([str(REPO / "search_spaces" / "paper_search.py"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for count in ("2,662,400", "5,324,800", "12,994,560"):
        assert f"| {count} |" in out
    # r=4 on q_proj/v_proj = 2,662,400 / 2; r=64 on all linear layers = 12,994,560 x 8
    assert "trainable parameters: 1,331,200 (r=4, attention) to 103,956,480 (r=64, all_linear)" in out


def test_sampled_trial_config_name_and_identity():
    from trainers.config import TUNE_POINT, TUNE_TRIAL, TrialConfig, search_param

    shared = {"model": "m", "dataset": "d", "device": "cpu", "alpha_rule": "2r"}
    config = {TUNE_TRIAL: search_param(shared, {"attention": ("q_proj", "v_proj"), "q_proj,k_proj": ("q_proj",
                                                                                                     "k_proj")}),
              TUNE_POINT: {"r": 16, "targets": "q_proj,k_proj", "bits": 8, "learning_rate": 1e-3}}
    cfg = TrialConfig.from_tune(config, "s007-r16-custom-8bit")
    assert (cfg.name, cfg.index, cfg.targets, cfg.target_modules) == (
        "s007-r16-custom-8bit", 7, ("q_proj", "k_proj"), ("q_proj", "k_proj"))
    assert (cfg.lora_alpha, cfg.learning_rate, cfg.bits) == (32, 1e-3, 8)  # alpha = 2r
    again = TrialConfig.from_tune(json.loads(json.dumps(config)), "s007-r16-custom-8bit")  # as Ray stores it
    assert again == cfg and again.fingerprint == cfg.fingerprint
    assert TrialConfig.from_tune(config, "s008-r16-custom-8bit").fingerprint != cfg.fingerprint
    explicit = cfg.to_param()  # a grid's trial carries its whole config
    assert TrialConfig.from_tune({TUNE_TRIAL: explicit}, "ignored") == cfg


def test_alpha_rules_set_alpha_and_rslora_scaling():
    from trainers.config import TrialConfig
    from trainers.models import lora_config

    def cfg(rule):
        return TrialConfig.build(name="t", index=0, model="m", dataset="d", r=16, targets="attention", bits=4,
                                 lora_alpha=8, alpha_rule=rule, target_modules=("q_proj",))

    assert [cfg(rule).lora_alpha for rule in ("fixed", "r", "2r", "rslora")] == [8, 16, 32, 8]
    loras = {rule: lora_config(cfg(rule)) for rule in ("fixed", "rslora")}
    assert (loras["fixed"].use_rslora, loras["rslora"].use_rslora) == (False, True)
    assert cfg("nope").problems() == [("alpha_rule", "must be one of fixed, r, 2r, rslora, got 'nope'")]


def _proposals(spec, seed: int, n: int = 6) -> list[dict]:
    """What the search proposes first, each trial finished (in order) before the next is asked for."""
    from dataclasses import replace

    from sweep.searchers import searcher

    spec = replace(spec, search=replace(spec.search, seed=seed))
    alg, _, _ = searcher(spec, samples_offset=0, seeds=spec.seeds, evaluated=[])
    points = []
    for i in range(n):
        point = alg.suggest(f"t{i}")
        points.append(point["point"])
        alg.on_trial_complete(f"t{i}", {"eval_loss": 5.0 - 0.1 * i})
    return points


def test_tpe_with_a_fixed_seed_proposes_the_same_first_trials():
    spec = spec_of(REPO / "search_spaces" / "smoke_search.py").spec
    first, second, other = _proposals(spec, 0), _proposals(spec, 0), _proposals(spec, 1)
    assert first[:2] == spec.seeds  # the seeds come first
    assert first == second
    assert other[:2] == spec.seeds and other[2:] != first[2:]
    assert all(4 <= p["r"] <= 32 and 1e-3 <= p["learning_rate"] <= 1e-2 for p in first)


def test_sample_names_follow_rays_trial_counter():
    from sweep.searchers import SampleNamer
    from trainers.config import TUNE_POINT, TUNE_TRIAL

    trial = SimpleNamespace(experiment_tag="3_r=16", config={TUNE_TRIAL: {"config": {"bits": 4}},
                                                             TUNE_POINT: {"r": 16, "targets": "all_linear"}})
    assert SampleNamer(offset=0, first=1)(trial) == "s003-r16-all_linear-4bit"  # a searcher counts from 1
    assert SampleNamer(offset=8, first=1)(trial) == "s011-r16-all_linear-4bit"  # an --extend continues the count
    assert SampleNamer(offset=0, first=0)(trial) == "s004-r16-all_linear-4bit"  # the variant generator from 0


# ---- budgets and early stopping's memory ------------------------------------------------------------------

def test_budget_stopper_ends_on_gpu_hours_or_wall_time_and_says_which():
    import time

    from sweep.searchers import BudgetStopper

    ended = []
    gpu = BudgetStopper(lambda reason, at: ended.append(reason), None, gpu_hours=0.01, devices_per_trial=0.5)
    for trial in ("a", "b"):
        gpu(trial, {"time_this_iter_s": 30.0})  # 2 trials x 30 s x half a GPU = 30 GPU-seconds of 36
    assert not gpu.stop_all() and not ended
    gpu("a", {"time_this_iter_s": 12.0})
    assert gpu.stop_all() and gpu.stop_all() and ended == ["GPU-hours budget of 36 s"]  # recorded once
    wall = BudgetStopper(lambda reason, at: ended.append(reason), wall_hours=0.1 / 3600, gpu_hours=None,
                         devices_per_trial=1)
    assert not wall.stop_all()
    time.sleep(0.15)
    assert wall.stop_all() and ended[-1] == "wall-time budget of 0.1 s"


class _Trial:
    """A Ray trial as the schedulers see it (hashable: the median rule keys its records by trial)."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)


def _trial(tmp_path, name: str, evals=()):
    """A Ray trial as the schedulers see it, with sealed eval checkpoints on disk."""
    from trainers.checkpoints import seal
    from trainers.config import EvalReport, TrialConfig

    cfg = TrialConfig(name=name, index=0, model="m", dataset="d", r=8, targets="attention", bits=4)
    for i, (step, loss) in enumerate(evals):
        ckpt = tmp_path / name / f"checkpoint_{i:06d}"
        ckpt.mkdir(parents=True)
        seal(ckpt, step=step, final=False, fingerprint=cfg.fingerprint,
             eval=EvalReport(train_steps=step, epoch=0.0, eval_loss=loss).to_report())
    from pyarrow.fs import LocalFileSystem

    storage = _Trial(storage_filesystem=LocalFileSystem())  # Ray's StorageContext: where the trial's path lives
    return _Trial(trial_id=name, path=str(tmp_path / name), storage=storage, config={"trial": cfg.to_param()})


def test_asha_replays_a_restored_trials_evals_and_an_extensions_history(tmp_path):
    from sweep.axes import ASHA
    from sweep.searchers import scheduler

    asha = scheduler(ASHA(grace_period=8, reduction_factor=2), max_t=46, history=[[(8, 1.0)], [(8, 1.2)]])
    restored = _trial(tmp_path, "restored", evals=[(8, 0.5)])  # reported before the resume
    asha.on_trial_add(None, restored)
    assert asha.on_trial_result(None, restored, {"train_steps": 8, "eval_loss": 0.4}) == "CONTINUE"
    late = _trial(tmp_path, "late")
    asha.on_trial_add(None, late)
    # rung 8 holds 1.0, 1.2 (earlier experiments) and 0.5 (replayed): the median is 1.0
    assert asha.on_trial_result(None, late, {"train_steps": 8, "eval_loss": 1.1}) == "STOP"
    better = _trial(tmp_path, "better")
    asha.on_trial_add(None, better)
    assert asha.on_trial_result(None, better, {"train_steps": 8, "eval_loss": 0.9}) == "CONTINUE"
    assert asha.on_trial_result(None, better, {"step": 9, "loss": 3.0}) == "CONTINUE"  # not an eval: ignored


def test_median_stopping_compares_with_earlier_trials_and_survives_new_ones(tmp_path):
    from sweep.axes import MedianStopping
    from sweep.searchers import scheduler

    rule = scheduler(MedianStopping(grace_period=6, min_samples=2), max_t=36, history=[[(6, 1.0)], [(6, 1.2)]])
    fresh = _trial(tmp_path, "fresh")
    rule.on_trial_add(None, fresh)  # no evals yet: must not leave an empty history behind
    assert rule.on_trial_result(None, fresh, {"train_steps": 6, "eval_loss": 1.3}) == "STOP"  # median 1.1
    other = _trial(tmp_path, "other")
    rule.on_trial_add(None, other)
    assert rule.on_trial_result(None, other, {"train_steps": 6, "eval_loss": 0.9}) == "CONTINUE"


# ---- --extend's plan ------------------------------------------------------------------------------------

def test_extend_adds_only_what_the_space_now_declares(tmp_path):
    from dataclasses import replace

    from sweep.cli import UserError
    from sweep.extend import extension, first_experiments

    plan = spec_of(search_space(tmp_path, samples=4))
    manifest = {"search_identity": plan.spec.identity()}
    experiments = first_experiments(plan)
    assert [(e["name"], e.get("samples"), len(e.get("seeds", []))) for e in experiments] == [
        ("tune", None, 0), ("tune-search", 4, 2)]
    assert extension(manifest, plan, experiments) == []  # nothing new declared
    grown = replace(plan, num_samples=6)
    (added,) = extension(manifest, grown, experiments)
    assert (added["name"], added["samples"], added["offset"], added["seeds"]) == ("tune-search-ext1", 2, 4, [])
    with pytest.raises(UserError, match="below the 4 the sweep already has"):
        extension(manifest, replace(plan, num_samples=3), experiments)
    with pytest.raises(UserError, match="the search changed"):
        extension({"search_identity": "other"}, grown, experiments)
    capped = replace(grown, space=replace(plan.space, budget=__import__("sweep").Budget(max_trials=5)))
    assert extension(manifest, capped, experiments)[0]["samples"] == 1  # max_trials counts every sample


def test_extend_a_grid_by_new_trials_only(tmp_path):
    from sweep.cli import UserError
    from sweep.driver import SweepOptions, plan_sweep
    from sweep.extend import extension, first_experiments
    from tests.conftest import write_space

    two = 'Trial(r=8, targets="attention", bits=4), Trial(r=4, targets="attention", bits=4)'
    old = plan_sweep(SweepOptions(space=str(write_space(tmp_path / "a.py", trials=two))), for_training=False)
    experiments = first_experiments(old)
    assert len(experiments) == 1 and len(experiments[0]["trials"]) == 3  # base + 2
    more = two + ', Trial(r=16, targets="attention", bits=4)'
    new = plan_sweep(SweepOptions(space=str(write_space(tmp_path / "b.py", trials=more))), for_training=False)
    (added,) = extension({}, new, experiments)
    assert added["name"] == "tune-ext1" and added["trials"] == [new.explicit[2].cfg.fingerprint]
    fewer = plan_sweep(SweepOptions(space=str(write_space(tmp_path / "c.py"))), for_training=False)
    with pytest.raises(UserError, match="1 trial\\(s\\) of the sweep are no longer declared"):
        extension({}, fewer, experiments)


# ---- what the table and the search section say -------------------------------------------------------------

def test_stopped_trials_show_their_last_eval_and_are_never_best(tmp_path):
    from sweep.plan import PlannedTrial
    from sweep.summary import build_rows, to_markdown, write_csv
    from sweep.sweepdir import STOPPED, TrialOutcome
    from tests.conftest import make_result, read_csv
    from trainers.config import TrialConfig

    def planned(name, lr):
        return PlannedTrial(TrialConfig(name=name, index=0, model="m", dataset="d", r=8, targets="attention", bits=4,
                                        learning_rate=lr, target_modules=("q_proj", "v_proj")), 100, 1000)

    rows = build_rows([planned("done", 1e-3), planned("cut", 2e-3)], {
        "done": TrialOutcome("TERMINATED", make_result(eval_loss=2.0), steps=46),
        "cut": TrialOutcome(STOPPED, steps=16, eval_loss=1.5, reason="ASHA")})  # lower, but after 16 steps
    assert [(r["best"], r["quality"]) for r in rows] == [(True, "high"), (False, "-")]
    md = to_markdown(rows, "t")
    assert "| learning_rate |" in md.splitlines()[2] and "| 0.002 |" in md  # the varied setting gets a column
    assert "STOPPED @ 16 (ASHA)" in md and "| 1.5000 |" in md
    write_csv(rows, tmp_path / "s.csv")
    cut = read_csv(tmp_path / "s.csv")["cut"]
    assert (cut["status"], cut["steps"], cut["stop_reason"], cut["eval_loss"], cut["best"]) == (
        "STOPPED", "16", "ASHA", "1.5", "false")


def test_importance_finds_the_axis_that_matters():
    from sweep.search_summary import importances
    from sweep.sweepdir import TrialOutcome
    from tests.conftest import make_result

    spec = spec_of(REPO / "search_spaces" / "smoke_search.py").spec
    outcomes = {}
    for i, lr in enumerate([1e-3, 2e-3, 3e-3, 5e-3, 7e-3, 1e-2, 1.5e-3, 4e-3]):
        point = {"r": [4, 32][i % 2], "targets": ["attention", "all_linear"][i // 2 % 2], "bits": 4,
                 "alpha_rule": "fixed", "learning_rate": lr}
        loss = 10 * lr + 0.001 * point["r"]  # the learning rate decides; r barely
        outcomes[str(i)] = TrialOutcome("TERMINATED", make_result(eval_loss=loss), point=point)
    found, measured = importances(spec, outcomes)
    assert measured == 8 and set(found) == set(spec.axes)
    assert max(found, key=found.get) == "learning_rate" and found["learning_rate"] > 0.5
    assert importances(spec, dict(list(outcomes.items())[:2])) == ({}, 2)  # too few to say
