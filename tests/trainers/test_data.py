"""Data: the post's template byte for byte, reproducible sampling, Hub-shaped local files."""

import json

import pytest

from trainers.data import DataError, build_splits, format_row, load_rows, prompt

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
    a = build_splits("bundled:products-400", 100, 0.1, seed=42)
    b = build_splits("bundled:products-400", 100, 0.1, seed=42)
    c = build_splits("bundled:products-400", 100, 0.1, seed=7)
    assert (len(a["train"]), len(a["test"])) == (90, 10)
    assert a["train"]["product"] == b["train"]["product"] and a["test"]["product"] == b["test"]["product"]
    assert a["train"]["product"] != c["train"]["product"]
    assert set(a["train"]["product"]).isdisjoint(a["test"]["product"])
    row = a["train"][0]
    assert row["text"] == format_row(row["product"], row["category"], row["description"])


def test_hub_shaped_file_ignores_its_text_column(tmp_path):
    """The Hub dataset has product, category, description and a text column of its own; we rebuild text."""
    path = tmp_path / "red_dot.jsonl"
    rows = [{"product": f"P{i}", "category": "Chair", "description": f"Desc {i}.", "text": "IGNORED"} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = build_splits(str(path), 20, 0.1, seed=1)
    assert all("IGNORED" not in t for t in splits["train"]["text"])
    assert load_rows(str(path)).column_names == ["product", "category", "description"]


@pytest.mark.parametrize("content, says", [
    ('{"product": "a", "category": "b"}\n', "lacks column(s) description"),
    ("", "cannot load dataset"),
])
def test_unusable_files_fail_with_one_line(tmp_path, content, says):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=says.replace("(", r"\(").replace(")", r"\)")) as e:
        load_rows(str(path))
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        load_rows(str(tmp_path / "none.csv"))


def test_fingerprint_is_stable_across_runs_and_differs_across_seeds():
    from trainers.data import fingerprint

    a = fingerprint(build_splits("bundled:products-400", 100, 0.1, seed=42))
    assert a == fingerprint(build_splits("bundled:products-400", 100, 0.1, seed=42))
    assert a != fingerprint(build_splits("bundled:products-400", 100, 0.1, seed=43))
    assert a != fingerprint(build_splits("bundled:products-400", 101, 0.1, seed=42))
    assert len(a) == 16 and int(a, 16) >= 0
