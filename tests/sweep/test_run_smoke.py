"""The smoke sweep through the real CLI: Ray Tune, bitsandbytes 4/8-bit on CPU, MLflow, the table, on the
pretrained desc-llama base: a base that writes, trials that beat it beyond noise, labels that follow eval loss."""

import csv
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from sweep.summary import CSV_COLUMNS
from tests.conftest import REPO, chromium, read_csv, run_cli

pytestmark = pytest.mark.slow  # real Ray sweeps / trained trials

# Exact LoRA sizes on desc-llama (hidden 128, intermediate 352, vocab 2,048, 2 layers):
#   attention r=8:  2 layers x (q, v) x 8 x (128 + 128)                                      = 8,192
#   all_linear r=8: 2 x [4 x 8 x 256 + 2 x 8 x (128 + 352) + 8 x (352 + 128)] + 8 x (128 + 2048) = 56,832
EXPECTED = {
    "r8-attention-4bit": (8, 4, 8192, "q_proj v_proj"),
    "r16-attention-4bit": (16, 4, 16384, "q_proj v_proj"),
    "r8-all_linear-4bit": (8, 4, 56832, "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head"),
    "r8-all_linear-8bit": (8, 8, 56832, "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head"),
}
LABELS = ("low", "medium", "high")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, model_cache):
    work = tmp_path_factory.mktemp("smoke")
    start = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # several samples even in these short trials
        proc = run_cli(REPO / "search_spaces" / "smoke.py", "--mlflow-uri", f"sqlite:///{work}/mlflow.db", cwd=work)
    seconds = time.monotonic() - start
    print(f"smoke sweep wall time: {seconds:.1f}s")
    return {"proc": proc, "dir": work / "sweeps" / "smoke", "uri": f"sqlite:///{work}/mlflow.db", "seconds": seconds}


def test_exit_code_and_printed_table(sweep):
    proc = sweep["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# Sweep smoke" in proc.stdout
    assert "Ray dashboard: http://127.0.0.1:" in proc.stdout
    assert sweep["seconds"] < 300


def test_summary_csv_has_four_finished_rows_with_exact_counts(sweep):
    with open(sweep["dir"] / "summary.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == CSV_COLUMNS
        ordered = list(reader)
    rows = {r["trial_id"]: r for r in ordered}
    assert [r["trial_id"] for r in ordered] == ["base", *EXPECTED]  # the baseline row comes first
    base = rows.pop("base")
    assert (base["status"], base["trainable_params"], base["bits"]) == ("TERMINATED", "0", "4")
    assert set(rows) == set(EXPECTED)
    for name, (r, bits, trainable, modules) in EXPECTED.items():
        row = rows[name]
        assert row["status"] == "TERMINATED"
        assert (int(row["r"]), int(row["bits"]), int(row["trainable_params"])) == (r, bits, trainable)
        assert row["target_modules"] == modules
        assert math.isfinite(float(row["eval_loss"])) and float(row["eval_loss"]) > 0
        assert float(row["perplexity"]) == pytest.approx(math.exp(float(row["eval_loss"])), rel=1e-6)
        assert float(row["peak_gpu_mem_gb"]) == 0.0
        assert (row["device"], row["gpu_uuid"], row["gpu_sharing"]) == ("cpu", "", "")
    md = (sweep["dir"] / "summary.md").read_text()
    assert sum(line.startswith("| r") for line in md.splitlines()) == 4  # one row per trial
    assert "| base |" in md and "params updated (M)" in md and "vs base" in md


def test_a_base_that_writes_and_trials_the_table_tells_apart(sweep):
    """What the random base could never show: the base writes (no loops), every trial beats it beyond noise,
    the labels follow eval loss, and all-linear adapters beat attention-only ones by more than the noise."""
    rows = read_csv(sweep["dir"] / "summary.csv")
    base = json.loads((sweep["dir"] / "trials" / "base" / "metrics.json").read_text())
    assert base["repeat_ngram_rate"] < 0.5 and base["gen_mean_words"] >= 5  # sentences, not loops
    for name in EXPECTED:
        row = rows[name]
        assert 0 < float(row["eval_loss_se"]) < 0.1 and float(row["rouge_l_se"]) >= 0
        assert float(row["vs_base"]) + 2 * float(row["vs_base_se"]) < 0, name  # better than base beyond noise
        assert (sweep["dir"] / "trials" / name / "heldout.json").is_file()
    assert any(rows[n]["quality"] in ("high", "medium") for n in EXPECTED)
    by_loss = sorted(EXPECTED, key=lambda n: float(rows[n]["eval_loss"]))
    ranks = [LABELS.index(rows[n]["quality"]) for n in by_loss]
    assert ranks == sorted(ranks, reverse=True), [(n, rows[n]["quality"]) for n in by_loss]  # labels follow loss
    assert {n: rows[n]["quality"] for n in by_loss[:2]} == {"r8-all_linear-4bit": "high", "r8-all_linear-8bit": "high"}
    for name in ("r8-attention-4bit", "r16-attention-4bit"):  # the post's finding, beyond noise
        assert rows[name]["quality"] != "high" and float(rows[name]["vs_best"]) > 2 * float(rows[name]["vs_best_se"])
    # the paired SE of a difference is far below either trial's own SE: same held-out examples
    assert float(rows["r8-attention-4bit"]["vs_base_se"]) < float(rows["r8-attention-4bit"]["eval_loss_se"]) / 3


def test_samples_md_has_every_prompt_for_every_trial(sweep):
    samples = (sweep["dir"] / "samples.md").read_text()
    assert "max_new_tokens=32" in samples and "Greedy" in samples
    sections = samples.split("\n## ")[1:]
    assert len(sections) == 2 + 6  # the post's two prompts + 6 held-out test rows
    assert sections[0].startswith("Corelogic Smooth Mouse (Optical Mouse)")
    assert sections[1].startswith("Hoover Lightspeed (Cordless Vacuum Cleaner)")
    for section in sections:
        assert section.count("**base** (base model)") == 1
        for name, (r, bits, _, _) in EXPECTED.items():
            assert section.count(f"**{name}** (r={r}, ") == 1, (name, section[:80])
    assert all("**reference**" in s for s in sections[2:])


def test_bitsandbytes_layers_and_loss_goes_down(sweep):
    for name, (_, bits, _, _) in EXPECTED.items():
        m = json.loads((sweep["dir"] / "trials" / name / "metrics.json").read_text())
        # tiny-llama has 2 layers x 7 projections; lm_head stays unquantized, as transformers does by default
        assert (m["bnb_layer_type"], m["bnb_layers"]) == ({4: "Linear4bit", 8: "Linear8bitLt"}[bits], 14)
        assert m["train_loss_last"] < m["train_loss_first"] - 0.05, name
        assert m["train_steps"] == 34  # 272 examples / batch 8 x 1 epoch
        assert len(m["dataset_fingerprint"]) == 16
    fingerprints = {json.loads((sweep["dir"] / "trials" / n / "metrics.json").read_text())["dataset_fingerprint"]
                    for n in [*EXPECTED, "base"]}
    assert len(fingerprints) == 1  # every trial and the baseline saw the same rows
    assert not (sweep["dir"] / "trials" / "base" / "adapter").exists()


def test_every_lora_factor_trained_including_lm_head(sweep):
    for name in EXPECTED:
        weights = load_file(sweep["dir"] / "trials" / name / "adapter" / "adapter_model.safetensors")
        b = {k: v for k, v in weights.items() if "lora_B" in k}
        assert b, name
        # PEFT initialises every lora_B to zero: a non-zero B is a trained adapter
        assert all(v.abs().sum() > 0 for v in b.values()), name
        assert not any("base_layer" in k for k in weights), "adapter must not carry frozen base weights"
        if "all_linear" in name:
            assert weights["base_model.model.lm_head.lora_B.weight"].abs().sum() > 0


def test_mlflow_one_parent_four_children(sweep):
    from mlflow import MlflowClient

    client = MlflowClient(sweep["uri"])
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("lora_sweep.role") == "trial"]
    baselines = [r for r in runs if r.data.tags.get("lora_sweep.role") == "baseline"]
    assert len(runs) == 6 and len(parents) == 1 and len(children) == 4 and len(baselines) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert baselines[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"summary.md", "summary.csv", "samples.md"}
    assert {c.info.run_name for c in children} == set(EXPECTED)
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        p = child.data.params
        r, bits, trainable, modules = EXPECTED[child.info.run_name]
        assert (p["r"], p["bits"], p["target_modules"]) == (str(r), str(bits), modules.replace(" ", ","))
        assert (p["lora_alpha"], p["lora_dropout"], p["epochs"], p["batch_size"]) == ("8", "0.05", "1", "8")
        assert (p["max_seq_length"], p["train_samples"], p["seed"]) == ("256", "320", "42")
        assert p["model"] == "bundled:desc-llama" and p["dataset"] == "bundled:products-400"
        assert p["learning_rate"] == "0.001" and p["generation"] == "greedy" and len(p["dataset_fingerprint"]) == 16
        assert (p["seeds"], p["train_seed"], p["config"]) == ("1", "42", child.info.run_name)
        assert child.data.metrics["trainable_params"] == trainable
        assert math.isfinite(child.data.metrics["eval_loss"])
        assert 0 < child.data.metrics["eval_loss_se"] < 0.1 and "rouge_l_se" in child.data.metrics
        history = client.get_metric_history(child.info.run_id, "loss")
        assert len(history) == 9 and history[0].step == 1 and history[-1].step == 32  # steps 1, 4, 8, ..., 32
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"adapter", "generations.md", "generations.json"} <= artifacts


def test_console_is_quiet_and_every_trial_ends_on_one_line(sweep):
    """Output to a pipe, as in CI: a few dozen lines, one final line per trial, no worker noise; the noise
    is in the per-trial logs instead."""
    console = sweep["proc"].stdout + sweep["proc"].stderr
    print(f"console lines: {len(console.splitlines())}")
    assert len(console.splitlines()) <= 60
    assert re.search(r"^\[\d+:\d\d\] base\s+TERMINATED\s+-\s+loss\s+-\s+eval\s+\d+\.\d{4}", console, re.M)
    for name in EXPECTED:
        assert re.search(rf"^\[\d+:\d\d\] {name}\s+TERMINATED\s+34/34\s+loss\s+\d+\.\d{{4}}\s+eval\s+\d+\.\d{{4}}\s+"
                         rf"[\d.]+k? tok/s\s+cpu \d+%\s+took \d+:\d\d$", console, re.M), name
    for noise in ("MatMul8bitLt", "Checkpoint successfully created", "FutureWarning", "UserWarning", "tensorboard",
                  "Trial status", "Traceback", "INFO"):
        assert noise not in console, noise
    logs = sweep["dir"] / "logs"
    assert sorted(p.name for p in logs.iterdir()) == sorted([f"{n}.log" for n in ["base", *EXPECTED]] + ["driver.log"])
    for name in ["base", *EXPECTED]:  # Ray's checkpoint notes, library warnings, import-time messages
        text = (logs / f"{name}.log").read_text()
        assert "Checkpoint successfully created" in text and "FutureWarning" in text, name
        assert "Failed to load CPU gemm_4bit_forward" in text, name  # printed while the trial's imports ran
        if "all_linear" in name:
            assert "UserWarning: Setting `save_embedding_layers`" in text, name
    driver_log = (logs / "driver.log").read_text()
    assert "Started a local Ray instance" in driver_log
    # the driver's timeline, once, last: its phases in order (no random: base, no MPS daemon on a CPU sweep)
    (timeline,) = re.findall(r"^.* INFO lora_sweep: driver timeline \(s from its start\): (.*)$", driver_log, re.M)
    assert driver_log.rstrip().endswith(timeline)
    marks = [(m[0], float(m[1])) for m in re.findall(r"([A-Za-z ]+?) (\d+\.\d)(?:, |$)", timeline)]
    assert [m[0] for m in marks] == ["planned", "checked", "Ray started", "sweep started", "sweep ended",
                                     "Ray stopped"], timeline
    seconds = [m[1] for m in marks]
    assert seconds == sorted(seconds) and seconds[-1] < sweep["seconds"]
    assert seconds[4] - seconds[3] > 20  # five trials trained between the two


def test_plots_are_pngs_built_from_every_trial(sweep):
    from PIL import Image

    from sweep import plots
    from sweep.progress import SweepProgress
    from sweep.status import table

    for name in ("quality_vs_cost", "loss_curves"):
        with Image.open(sweep["dir"] / "plots" / f"{name}.png") as img:
            assert (img.format, img.size) == ("PNG", (800, 500))
    rows, _ = table(SweepProgress.read(sweep["dir"]))
    csv_rows = read_csv(sweep["dir"] / "summary.csv")
    curves = plots.read_curves(sweep["dir"], [r["trial_id"] for r in rows])
    for name in EXPECTED:  # logging_steps=4 with the first step: 1, 4, 8, ..., 32 of 34
        assert [s for s, _ in curves[name]["train"]] == [1, *range(4, 33, 4)]
        assert curves[name]["eval"] == [(34, pytest.approx(float(csv_rows[name]["eval_loss"])))]
    cost = plots.quality_vs_cost(rows).axes[0]
    assert [c.get_label() for c in cost.collections] == list(EXPECTED)
    labels = {ln.get_label() for ln in plots.loss_curves(curves, rows).axes[0].get_lines()}
    assert labels == {f"{n} {k}" for n in EXPECTED for k in ("train", "eval")} | {
        f"base eval loss: {float(csv_rows['base']['eval_loss']):.4f}"}


def test_report_html_in_headless_chromium(sweep, tmp_path):
    browser = chromium()
    try:
        browser.get((sweep["dir"] / "report.html").as_uri())
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        images = browser.execute_script(
            "return [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        first_cells = browser.execute_script(
            "return [...document.querySelectorAll('#summary tbody tr')].map(r => r.cells[0].innerText)")
        browser.save_screenshot(str(tmp_path / "report.png"))
    finally:
        browser.quit()
    print(f"report screenshot: {tmp_path / 'report.png'}")
    assert errors == []
    assert images == [["quality vs cost", True, 800, 500], ["loss curves", True, 800, 500]]
    assert first_cells == ["base", "r8-attention-4bit", "r16-attention-4bit", "r8-all_linear-4bit *",
                           "r8-all_linear-8bit"]
    assert (tmp_path / "report.png").stat().st_size > 20_000


def test_mlflow_compare_view_material(sweep):
    """The experiment is marked as model training; the parent carries the table, plots and report; each
    trial's run carries tokens/s and system metrics by step."""
    from mlflow import MlflowClient

    client = MlflowClient(sweep["uri"])
    exp = client.get_experiment_by_name("smoke")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("lora_sweep.role") == "sweep")
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"summary_table.json", "report.html", "plots"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "plots")} == {
        "plots/quality_vs_cost.png", "plots/loss_curves.png"}
    for child in (r for r in runs if r.data.tags.get("lora_sweep.role") == "trial"):
        run_id = child.info.run_id
        rates = client.get_metric_history(run_id, "tokens_per_second")
        assert len(rates) == 9 and all(m.value > 0 for m in rates)
        cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
        assert len(cpu) >= 2 and all(0 <= m.value <= 100 and 1 <= m.step <= 34 for m in cpu), child.info.run_name
        assert client.get_metric_history(run_id, "system/system_memory_usage_megabytes")


def test_status_of_the_finished_sweep(sweep):
    proc = subprocess.run([sys.executable, "-m", "sweep.status", str(sweep["dir"])], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    statuses = {ln.split()[0]: ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("  ")}
    assert statuses == {n: "TERMINATED" for n in ["base", *EXPECTED]}
    assert "finished" in proc.stdout.splitlines()[0] and "| r8-all_linear-4bit * |" in proc.stdout
    # the same table as summary.md, error bars included (paired from the trials' heldout.json)
    assert (sweep["dir"] / "summary.md").read_text() in proc.stdout
