"""Data: the post's template byte for byte, reproducible sampling, local files of every kind, Hub-shaped files."""

import bz2
import gzip
import json
import lzma

import pytest

from tests.conftest import tiny_cfg, write_jsonl
from trainers.data import DataError, build_splits, check_available, fingerprint, load_rows
from trainers.formats import format_row, prompt

POST_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "\n"
    "Create a detailed description for the following product: Corelogic Smooth Mouse, belonging to category: "
    "Optical Mouse\n"
    "\n"
    "### Response:\n"
    "A smooth optical mouse.\n"
    "### End"
)


def test_template_matches_the_post_byte_for_byte():
    text = format_row("Corelogic Smooth Mouse", "Optical Mouse", "A smooth optical mouse.")
    assert text.encode() == POST_TEXT.encode()
    assert prompt("Corelogic Smooth Mouse", "Optical Mouse") == POST_TEXT[: POST_TEXT.index("A smooth")]


def test_sampling_is_reproducible_and_sized():
    a = build_splits(tiny_cfg(train_samples=100, seed=42))
    b = build_splits(tiny_cfg(train_samples=100, seed=42))
    c = build_splits(tiny_cfg(train_samples=100, seed=7))
    assert (len(a["train"]), len(a["test"])) == (90, 10)
    assert a["train"]["product"] == b["train"]["product"] and a["test"]["product"] == b["test"]["product"]
    assert a["train"]["product"] != c["train"]["product"]
    assert set(a["train"]["product"]).isdisjoint(a["test"]["product"])
    for row in a["train"]:  # the post's rows: prompt + completion is its text, byte for byte
        assert row["prompt"] + row["completion"] == format_row(row["product"], row["category"], row["description"])
        assert row["reference"] == row["description"] and row["title"] == f"{row['product']} ({row['category']})"


def test_hub_shaped_file_ignores_its_text_column(tmp_path):
    """The Hub dataset has product, category, description and a text column of its own; we rebuild text."""
    rows = [{"product": f"P{i}", "category": "Chair", "description": f"Desc {i}.", "text": "IGNORED"} for i in range(20)]
    cfg = tiny_cfg(dataset=str(write_jsonl(tmp_path / "red_dot.jsonl", rows)), train_samples=20, seed=1)
    splits = build_splits(cfg)
    assert all("IGNORED" not in p + c for p, c in zip(splits["train"]["prompt"], splits["train"]["completion"]))
    assert load_rows(cfg).column_names == ["product", "category", "description"]


ROWS = [{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(12)]


def _writers():
    text = "".join(json.dumps(r) + "\n" for r in ROWS)
    csv = "instruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n" for r in ROWS)
    return {
        "d.jsonl": text.encode(), "d.json": json.dumps(ROWS).encode(), "d.csv": csv.encode(),
        "d.jsonl.gz": gzip.compress(text.encode()), "d.csv.bz2": bz2.compress(csv.encode()),
        "d.json.xz": lzma.compress(text.encode()),
    }


@pytest.mark.parametrize("name", list(_writers()))
def test_local_files_of_every_kind_load_the_same_rows(tmp_path, name):
    (tmp_path / name).write_bytes(_writers()[name])
    cfg = tiny_cfg(dataset=str(tmp_path / name), data_format="alpaca")
    assert check_available(cfg) == 12
    ds = load_rows(cfg)
    assert (ds["instruction"], ds["output"]) == ([r["instruction"] for r in ROWS], [r["output"] for r in ROWS])


@pytest.mark.parametrize("name, content, says", [
    ("d.jsonl.gz", gzip.compress(b'{"text": "a"}\n{"text": \n'), "line 2: not valid JSON"),
    ("d.csv.xz", lzma.compress("text\n\u00e9\n".encode("latin-1")), "line 2: not UTF-8 text (byte 0xe9)"),
    ("d.jsonl.bz2", b"not bzip2", "cannot read it"),
])
def test_compressed_files_are_checked_line_by_line(tmp_path, name, content, says):
    """The driver's line checks read a compressed file as datasets will: decompressed."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as e:
        check_available(tiny_cfg(dataset=str(tmp_path / name), data_format="text"))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_parquet_and_a_split_slice(tmp_path):
    import pandas

    pandas.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    cfg = tiny_cfg(dataset=str(tmp_path / "d.parquet"), data_format="alpaca", dataset_split="train[:5]")
    assert load_rows(cfg)["output"] == ["0.", "1.", "2.", "3.", "4."]


@pytest.mark.parametrize("content, says", [
    ('{"product": "a", "category": "b"}\n', "lacks column(s) description for the post format (has: product, category)"),
    ("", "cannot load dataset"),
])
def test_unusable_files_fail_with_one_line(tmp_path, content, says):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_rows(tiny_cfg(dataset=str(path)))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        load_rows(tiny_cfg(dataset=str(tmp_path / "none.csv")))


def test_fingerprint_is_stable_across_runs_and_differs_across_seeds():
    a = fingerprint(build_splits(tiny_cfg(train_samples=100, seed=42)))
    assert a == fingerprint(build_splits(tiny_cfg(train_samples=100, seed=42)))
    assert a != fingerprint(build_splits(tiny_cfg(train_samples=100, seed=43)))
    assert a != fingerprint(build_splits(tiny_cfg(train_samples=101, seed=42)))
    assert len(a) == 16 and int(a, 16) >= 0


def test_a_subset_and_split_are_chosen_as_on_the_hub(tmp_path):
    """A dataset directory with two configurations and two splits goes through the same load_dataset call as a
    Hub id: dataset_subset picks the configuration, dataset_split the split."""
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: short\n  data_files:\n  - {split: train, path: short.jsonl}\n"
        "- config_name: long\n  data_files:\n  - {split: train, path: long.jsonl}\n"
        "  - {split: validation, path: long-val.jsonl}\n---\n")
    for name, n in (("short", 3), ("long", 5), ("long-val", 2)):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name} {i}"} for i in range(n)])
    cfg = tiny_cfg(dataset=str(tmp_path), data_format="text", dataset_subset="long")
    assert check_available(cfg) == 5
    assert load_rows(cfg)["text"][0] == "long 0"
    assert load_rows(tiny_cfg(dataset=str(tmp_path), data_format="text", dataset_subset="long",
                              dataset_split="validation"))["text"] == ["long-val 0", "long-val 1"]
    with pytest.raises(DataError, match="cannot load dataset"):
        load_rows(tiny_cfg(dataset=str(tmp_path), data_format="text", dataset_subset="medium"))
