"""The chat-shaped offline space through the real CLI: conversations through the tiny model's chat template, the
loss on every token vs on the assistant's turns as a sweep axis, compared on the response loss."""

import json
import math

import pytest

from sweep.space import expand, load_space
from tests.conftest import REPO, read_csv, run_cli

pytestmark = pytest.mark.slow  # a real Ray sweep

SPACE = REPO / "search_spaces" / "chat_smoke.py"
TRIALS = ("r8-all_linear-16bit-loss_on-all", "r8-all_linear-16bit-loss_on-assistant")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, model_cache):
    work = tmp_path_factory.mktemp("chat")
    proc = run_cli(SPACE, "--mlflow-uri", f"sqlite:///{work}/mlflow.db", cwd=work)
    return {"proc": proc, "dir": work / "sweeps" / "chat-smoke", "uri": f"sqlite:///{work}/mlflow.db"}


def test_loss_on_is_an_axis_and_the_table_compares_on_the_response_loss(sweep):
    assert sweep["proc"].returncode == 0, sweep["proc"].stderr[-3000:]
    rows = read_csv(sweep["dir"] / "summary.csv")
    assert list(rows) == ["base", *TRIALS]
    assert [r["loss_on"] for r in rows.values()] == ["all", "all", "assistant"]
    assert all(r["status"] == "TERMINATED" for r in rows.values())
    loss = {t: (float(r["eval_loss"]), float(r["response_loss"])) for t, r in rows.items()}
    assert all(math.isfinite(a) and math.isfinite(b) for a, b in loss.values())
    assert loss[TRIALS[1]][0] == loss[TRIALS[1]][1]  # loss on the assistant's tokens = the response loss
    assert loss[TRIALS[0]][0] != loss[TRIALS[0]][1]
    best = min(TRIALS, key=lambda t: loss[t][1])  # by response loss: the eval losses are on different tokens
    assert {t: r["best"] for t, r in rows.items()} == {"base": "false", **{t: str(t == best).lower() for t in TRIALS}}
    assert all(loss[t][1] < loss["base"][1] for t in TRIALS)  # both learned the replies
    md = (sweep["dir"] / "summary.md").read_text()
    assert "best by response_loss" in md and "vs base is computed, on the response loss" in md


def test_the_cut_reported_is_the_cut_the_chat_template_makes(sweep):
    """truncated_rows against an independent count: train conversations rendered by the chat template."""
    from trainers.data import build_splits
    from trainers.models import local_tokenizer

    cfg = expand(load_space(SPACE), SPACE)[0]
    tok = local_tokenizer(cfg)
    lengths = [len(tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"])
               for m in build_splits(cfg)["train"]["messages"]]
    for name in TRIALS:
        m = json.loads((sweep["dir"] / "trials" / name / "metrics.json").read_text())
        assert m["truncated_rows"] == sum(n > cfg.max_seq_length for n in lengths)
        assert (m["train_examples"], m["train_steps"], m["dropped_rows"]) == (144, 18, 0)
        assert m["response_lost_pct"] < 2.0
    assert "warning: max_seq_length" not in sweep["proc"].stderr  # under 2%: no warning line


def test_the_spaces_own_prompt_then_heldout_conversations(sweep):
    sections = (sweep["dir"] / "samples.md").read_text().split("\n## ")[1:]
    assert len(sections) == 1 + 2 and "stopping at EOS" in (sweep["dir"] / "samples.md").read_text()
    assert sections[0].startswith("Which category is the Hoover Lightspeed in?\n")
    assert all(s.split("\n")[0].endswith("[held-out]") and "**reference**" in s for s in sections[1:])
    gens = json.loads((sweep["dir"] / "trials" / TRIALS[1] / "generations.json").read_text())
    assert gens[0]["prompt"] == [{"role": "user", "content": "Which category is the Hoover Lightspeed in?"}]
    assert [g["prompt"][-1]["content"] for g in gens[1:]] == ["Describe it in one sentence."] * 2


def test_mlflow_records_the_data_settings(sweep):
    from mlflow import MlflowClient

    client = MlflowClient(sweep["uri"])
    runs = client.search_runs([client.get_experiment_by_name("chat-smoke").experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("lora_sweep.role") == "trial"}
    assert set(children) == set(TRIALS)
    for name, run in children.items():
        p, m = run.data.params, run.data.metrics
        assert (p["data_format"], p["loss_on"], p["end_marker"]) == ("messages", name.rsplit("-", 1)[1],
                                                                     "(none: EOS)")
        assert {"response_loss", "truncated_rows", "truncated_pct", "response_lost_pct", "dropped_rows"} <= set(m)
