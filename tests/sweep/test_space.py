"""Search-space files: every shipped one validates; bad ones fail with file, trial and field."""

import pytest

from sweep.plan import plan
from sweep.run import main
from sweep.space import SpaceError, Trial, expand, grid, load_space, parse_sets
from tests.conftest import REPO, run_cli, write_space

SHIPPED = sorted((REPO / "search_spaces").glob("*.py"))


def test_shipped_spaces_exist():
    assert {p.name for p in SHIPPED} >= {"paper_grid.py", "smoke.py", "paper_search.py", "smoke_search.py"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_space_loads_and_validates(path):
    from sweep.driver import SweepOptions, plan_sweep

    # the paper spaces' data and weights are on the Hub: validate and count only
    p = plan_sweep(SweepOptions(space=str(path), baseline=False), for_training=False)
    if p.spec is None:
        assert len(p.planned) == len(p.space.trials) >= 1
        assert all(t.trainable_params > 0 and t.cfg.target_modules for t in p.planned)
    else:  # a search: its seeds fit its axes, every targets choice resolves on the model
        assert p.num_samples >= len(p.spec.seeds) == len(p.space.trials) and p.spec.axes
        assert all(p.shapes.per_r[label] > 0 and p.shapes.modules[label] for label in p.spec.target_labels)
        assert p.space.early_stopping is not None and p.spec.fixed["eval_every"] > 0


def test_paper_grid_is_the_posts_four_trials():
    cfgs = expand(load_space(REPO / "search_spaces" / "paper_grid.py"), "paper_grid.py")
    assert [(c.r, c.targets, c.bits) for c in cfgs] == [
        (8, "attention", 4), (16, "attention", 4), (8, "all_linear", 4), (8, "all_linear", 8)]
    c = cfgs[0]
    assert (c.model, c.dataset) == ("openlm-research/open_llama_3b_v2", "xiyuez/red-dot-design-award-product-description")
    assert (c.lora_alpha, c.lora_dropout, c.epochs, c.max_seq_length, c.train_samples, c.seed) == (8, 0.05, 3, 256, 5000, 42)


def test_grid_is_the_full_cross_product_in_order():
    trials = grid(r=[4, 8], targets=["attention", "all_linear"], bits=[4, 8, 16], learning_rate=1e-3)
    assert len(trials) == 12
    assert [(t.r, t.targets, t.bits) for t in trials[:4]] == [
        (4, "attention", 4), (4, "attention", 8), (4, "attention", 16), (4, "all_linear", 4)]
    assert all(t.overrides == {"learning_rate": 1e-3} for t in trials)
    crossed = grid(r=[8], targets=["attention"], bits=[4, 8], loss_on=["all", "completion"], eval_prompts=["x"])
    assert [(t.bits, t.overrides["loss_on"]) for t in crossed] == [(4, "all"), (4, "completion"), (8, "all"),
                                                                    (8, "completion")]
    assert all(t.overrides["eval_prompts"] == ["x"] for t in crossed)  # a list-valued setting is a value


def test_fixed_values_and_per_trial_overrides(tmp_path):
    path = write_space(tmp_path / "s.py", settings="epochs=2, lora_alpha=16",
                       trials='Trial(r=8, targets="attention", bits=4), Trial(r=4, targets=["q_proj"], bits=16, epochs=1)')
    a, b = expand(load_space(path), path)
    assert (a.epochs, a.lora_alpha, b.epochs, b.lora_alpha, b.targets) == (2, 16, 1, 16, ("q_proj",))
    assert (a.name, b.name) == ("r8-attention-4bit", "r4-custom-16bit")


@pytest.mark.parametrize("trial, field, says", [
    ('Trial(r=0, targets="attention", bits=4)', "r", "positive integer"),
    ('Trial(r=2.5, targets="attention", bits=4)', "r", "positive integer"),
    ('Trial(r=8, targets="attention", bits=5)', "bits", "one of 4, 8, 16"),
    ('Trial(r=8, targets="mlp_only", bits=4)', "targets", "preset"),
    ('Trial(r=8, targets="attention", bits=4, lora_dropout=1.5)', "lora_dropout", "[0, 1)"),
    ('Trial(r=8, targets="attention", bits=4, seeds=0)', "seeds", "from 1 to 100"),
])
def test_bad_values_name_file_trial_and_field(tmp_path, trial, field, says):
    path = write_space(tmp_path / "bad.py", trials=f'Trial(r=8, targets="attention", bits=4), {trial}')
    with pytest.raises(SpaceError) as e:
        expand(load_space(path), path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "trial 1 (" in msg and f"field '{field}'" in msg and says in msg
    assert "\n" not in msg


@pytest.mark.parametrize("settings, field, says", [
    ("data_format='chatml'", "data_format", "must be one of post, alpaca, prompt_completion, messages, text"),
    ("data_format='alpaca', columns={'answer': 'output'}", "columns",
     "must map the alpaca format's fields (instruction, input, output) to column names"),
    ("data_format='alpaca', loss_on='assistant'", "loss_on", "must be one of all, completion for the alpaca format"),
    ("data_format='text', loss_on='completion'", "loss_on", "must be one of all for the text format"),
    ("data_format='messages', template='{x}'", "template", "must be '' or 'chat' for the messages format"),
    ("data_format='prompt_completion', template='Q: {}'", "template", "must be a format string with named fields"),
    ("data_format='prompt_completion', template='{prompt} {completion}'", "template",
     "must not contain the response field {completion}"),
    ("data_format='messages', end_marker='END'", "end_marker", "does not apply to the messages format"),
    ("eval_prompts=['Corelogic Smooth Mouse']", "eval_prompts",
     "must be a list of prompts, each a dict of product, category as text"),
    ("dataset_split=''", "dataset_split", "must be a split name"),
])
def test_bad_data_settings_name_file_trial_and_field(tmp_path, settings, field, says):
    path = write_space(tmp_path / "bad.py", settings=settings)
    with pytest.raises(SpaceError) as e:
        expand(load_space(path), path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "trial 0 (" in msg and f"field '{field}' {says}" in msg and "\n" not in msg


def test_data_settings_of_every_format_validate(tmp_path):
    path = write_space(tmp_path / "ok.py", settings=(
        "data_format='prompt_completion', columns={'completion': 'answer'}, template='Q: {question}\\nA: ', "
        "end_marker='', eval_prompts=[{'question': 'Why?'}], loss_on='completion'"),
        trials='*grid(r=[8], targets=["attention"], bits=[4], loss_on=["all", "completion"])')
    a, b = expand(load_space(path), path)
    assert (a.loss_on, b.loss_on, a.columns, a.eval_prompts) == ("all", "completion", {"completion": "answer"},
                                                                ({"question": "Why?"},))
    assert (a.name, b.name) == ("r8-attention-4bit-loss_on-all", "r8-attention-4bit-loss_on-completion")
    assert a.prompt_fields == ("question",) and a.marker == "" and a.response_field == "completion"
    post = expand(load_space(write_space(tmp_path / "p.py")), "p.py")[0]
    assert (post.marker, post.prompt_fields, post.eval_prompts) == ("### End", ("product", "category"), ())


def test_unknown_field_names_file_line_and_field(tmp_path):
    path = write_space(tmp_path / "bad.py", trials='Trial(r=8, targets="attention", bits=4, rank=3)')
    with pytest.raises(SpaceError, match=r"bad\.py:6: Trial\(\.\.\.\) at this line: unknown field 'rank'"):
        load_space(path)


def test_module_name_matching_no_layer(tmp_path):
    path = write_space(tmp_path / "bad.py", trials='Trial(r=8, targets=["q_proj", "wqkv"], bits=4)')
    with pytest.raises(SpaceError, match=r"trial 0 \(r8-custom-4bit\): field 'targets': module 'wqkv' matches no"):
        plan(expand(load_space(path), path), path)


def test_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "syntax.py"
    bad.write_text("from sweep import Space\nspace = Space(\n")
    with pytest.raises(SpaceError, match=r"syntax\.py:2: syntax error"):
        load_space(bad)
    with pytest.raises(SpaceError, match="space file not found"):
        load_space(tmp_path / "nope.py")


def test_seeds_repeat_a_trial_with_training_seeds_on_one_data_split(tmp_path):
    from sweep.space import baseline_of

    path = write_space(tmp_path / "s.py", settings="seed=7",
                       trials='Trial(r=8, targets="attention", bits=4, seeds=3), '
                              'Trial(r=16, targets="attention", bits=4)')
    runs = expand(load_space(path), path)
    assert [c.name for c in runs] == ["r8-attention-4bit-seed7", "r8-attention-4bit-seed8", "r8-attention-4bit-seed9",
                                      "r16-attention-4bit"]
    assert [(c.replicate, c.train_seed, c.seed, c.group) for c in runs] == [
        (0, 7, 7, "r8-attention-4bit"), (1, 8, 7, "r8-attention-4bit"), (2, 9, 7, "r8-attention-4bit"),
        (0, 7, 7, "r16-attention-4bit")]  # seed (the split, the base) stays 7: repeats see the same test rows
    assert len({c.fingerprint for c in runs}) == 4
    base = baseline_of(runs[1])
    assert (base.name, base.replicate, base.train_seed, base.group) == ("base", 0, 7, "base")
    twice = expand(load_space(path), path, parse_sets(["seeds=2"]))  # --set seeds=2 applies to every trial
    assert [c.name for c in twice] == ["r8-attention-4bit-seed7", "r8-attention-4bit-seed8", "r16-attention-4bit-seed7",
                                       "r16-attention-4bit-seed8"]
    assert not {c.fingerprint for c in twice} & {c.fingerprint for c in runs}  # another sweep: resume refuses it
    with pytest.raises(SpaceError, match="--set replicate: unknown key"):
        parse_sets(["replicate=1"])


def test_seed_repeats_keep_names_unique_and_automatic_names_step_around(tmp_path):
    """Two identical automatic trials with seeds=2: the second configuration is ``-1``, its repeats follow."""
    path = write_space(tmp_path / "s.py", trials='Trial(r=8, targets="attention", bits=4), '
                                                 'Trial(r=8, targets="attention", bits=4)')
    names = [c.name for c in expand(load_space(path), path, parse_sets(["seeds=2"]))]
    assert names == ["r8-attention-4bit-seed42", "r8-attention-4bit-seed43", "r8-attention-4bit-1-seed42",
                     "r8-attention-4bit-1-seed43"]
    clash = write_space(tmp_path / "c.py", trials='Trial(r=8, targets="attention", bits=4, '
                                                  'name="R8-attention-4bit-seed43"), '
                                                  'Trial(r=8, targets="attention", bits=4, seeds=2)')
    with pytest.raises(SpaceError, match="trial 0 \\(R8-attention-4bit-seed43\\): field 'name' is already used by "
                                         "trial 1's seed repeat r8-attention-4bit-seed43"):
        expand(load_space(clash), clash)


def test_set_overrides_are_typed():
    assert parse_sets(["epochs=1", "learning_rate=1e-3", "model=random:x", "gradient_checkpointing=true",
                       "targets=q_proj,v_proj"]) == {
        "epochs": 1.0, "learning_rate": 1e-3, "model": "random:x", "gradient_checkpointing": True,
        "targets": ("q_proj", "v_proj")}
    with pytest.raises(SpaceError, match="--set foo: unknown key"):
        parse_sets(["foo=1"])
    with pytest.raises(SpaceError, match="--set batch_size=big: expected int"):
        parse_sets(["batch_size=big"])
    assert parse_sets(["columns=instruction:question, output:answer", "loss_on=completion", "end_marker="]) == {
        "columns": {"instruction": "question", "output": "answer"}, "loss_on": "completion", "end_marker": ""}
    with pytest.raises(SpaceError, match="--set columns=output: expected field:column pairs"):
        parse_sets(["columns=output"])
    with pytest.raises(SpaceError, match="--set eval_prompts: takes a list; set it in the space file"):
        parse_sets(["eval_prompts=hello"])


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    path = write_space(tmp_path / "bad.py", trials='Trial(r=0, targets="attention", bits=4)')
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "field 'r'" in err and str(path) in err
    assert main([str(path), "--set", "nope=1"]) == 2


@pytest.mark.slow
def test_cpu_space_that_needs_gpu_is_refused_not_left_pending(tmp_path):
    """A CUDA space on a cluster without GPUs exits 2 with the reason (the real CLI, real Ray)."""
    path = write_space(tmp_path / "gpu.py")
    proc = run_cli(path, "--set", "device=cuda", "--output", tmp_path / "out", "--mlflow-uri",
                   f"sqlite:///{tmp_path}/m.db", cwd=tmp_path, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "needs a CUDA GPU but the Ray cluster has none" in proc.stderr
    assert not (tmp_path / "out" / "tune").exists()


def test_existing_sweep_directory_is_never_overwritten(tmp_path):
    out = tmp_path / "out"
    (out / "tune").mkdir(parents=True)
    (out / "summary.csv").write_text("keep me")
    path = write_space(tmp_path / "s.py")
    assert main([str(path), "--output", str(out)]) == 2
    assert (out / "summary.csv").read_text() == "keep me"


@pytest.mark.slow
def test_dry_run_of_paper_grid_prints_the_posts_exact_counts():
    proc = run_cli(REPO / "search_spaces" / "paper_grid.py", "--dry-run", cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = [line.split("|")[6].strip() for line in proc.stdout.splitlines() if line.startswith("| r")]
    assert counts == ["2,662,400", "5,324,800", "12,994,560", "12,994,560"]
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in proc.stdout


def test_trial_repr():
    assert repr(Trial(r=8, targets=["q_proj"], bits=4)) == "Trial(r=8, targets=('q_proj',), bits=4)"


def test_automatic_names_never_collide_with_explicit_ones(tmp_path):
    """Trial 1's automatic de-duplication (-1) would produce the name trial 2 gives itself: explicit names
    are kept, automatic ones step around every name already taken (case-insensitively)."""
    path = write_space(tmp_path / "s.py", trials='Trial(r=8, targets="attention", bits=4), '
                                                 'Trial(r=8, targets="attention", bits=4), '
                                                 'Trial(r=8, targets="attention", bits=4, name="R8-attention-4bit-1"), '
                                                 'Trial(r=8, targets="attention", bits=4)')
    names = [c.name for c in expand(load_space(path), path)]
    assert names == ["r8-attention-4bit", "r8-attention-4bit-1-2", "R8-attention-4bit-1", "r8-attention-4bit-3"]


def test_trials_may_be_any_iterable_even_a_generator(tmp_path):
    path = tmp_path / "gen.py"
    path.write_text("from sweep import Settings, Space, Trial\n"
                    "space = Space(name='gen', settings=Settings(model='random:tiny-llama', dataset='d.jsonl'),"
                    " trials=(Trial(r=r, targets='attention', bits=4) for r in (4, 8)))\n")
    space = load_space(path)
    assert [c.name for c in expand(space, path)] == ["r4-attention-4bit", "r8-attention-4bit"]
    assert [c.name for c in expand(space, path)] == ["r4-attention-4bit", "r8-attention-4bit"]  # not used up
