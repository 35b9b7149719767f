"""What the driver checks in a dataset before any trial starts, so that a bad file is one line naming
the file and the line or row (exit 2) rather than a trial failing on Ray, or training on ``None``.

``datasets`` loads a null or missing field as ``None`` without complaint, and reports a broken JSON
line or an undecodable byte without saying where it is ("Expected object or value at position 28"),
hence these few passes of our own over the file and the loaded columns.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from trainers.data import DataError


def check_text_file(path: Path, columns: tuple[str, ...]) -> list[int] | None:
    """Every byte UTF-8 and, for JSON Lines, every line a JSON object. Returns the file line of each
    data row (JSON Lines skip blank lines), so later messages can name lines; None for other formats."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"dataset '{path}': cannot read it ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"dataset '{path}': line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                        "save the file as UTF-8") from None
    if path.suffix.lower() == ".jsonl" or (path.suffix.lower() == ".json" and not _is_json_document(text)):
        return _json_lines(path, text, columns)
    return None


def _is_json_document(text: str) -> bool:
    """A .json file is either one JSON document (an array of rows) or JSON Lines, as ``datasets`` reads it."""
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _json_lines(path: Path, text: str, columns: tuple[str, ...]) -> list[int]:
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # datasets skips blank lines too
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"dataset '{path}': line {number}: not valid JSON ({e.msg}, column {e.colno})") \
                from None
        if not isinstance(row, dict):
            raise DataError(f"dataset '{path}': line {number}: expected a JSON object with "
                            f"{', '.join(columns)}, got {type(row).__name__}")
        lines.append(number)
    return lines


def check_values(ds, source: str, columns: tuple[str, ...], lines: list[int] | None = None) -> None:
    """Every needed field of every row is non-empty text: a null, a missing key, a number or an empty
    string would be trained on as "None", "5" or nothing."""
    for column in columns:
        for i, value in enumerate(ds[column]):
            if isinstance(value, str) and value.strip():
                continue
            where = f"line {lines[i]}" if lines else f"row {i + 1}"
            what = ("is missing or null" if value is None else "is empty" if isinstance(value, str)
                    else f"is {str(value)[:40]!r} ({type(value).__name__}), not text")
            raise DataError(f"dataset '{source}': {where}: field '{column}' {what}")


def check_split(source: str, rows: int, train_samples: int, test_fraction: float) -> None:
    """Both splits get at least one row, computed exactly as ``Dataset.train_test_split`` will."""
    n = min(train_samples, rows)
    n_test = math.ceil(test_fraction * n)
    if n - n_test < 1:
        raise DataError(f"dataset '{source}' is too small: {n} row(s) with test_fraction={test_fraction} leave "
                        f"{n - n_test} for training and {n_test} for testing; add rows or lower test_fraction")
