"""What the driver checks in a dataset before any trial starts, so that a bad file is one line naming
the file and the line or row (exit 2) rather than a trial failing on Ray, or training on ``None``.

``datasets`` loads a null or missing field as ``None`` without complaint, and reports a broken JSON
line or an undecodable byte without saying where it is ("Expected object or value at position 28"),
hence these few passes of our own over the file and the loaded columns.
"""

from __future__ import annotations

import json
import lzma
import math
from pathlib import Path
from typing import Callable

from trainers.data import DataError

ROLES = ("system", "user", "assistant")


def check_text_file(path: Path, columns: tuple[str, ...], json_lines: bool) -> list[int] | None:
    """Every byte UTF-8 and, for JSON Lines, every line a JSON object (read a line at a time: datasets
    can be large; a .gz, .bz2 or .xz file decompressed as ``datasets`` will). Returns the file line of each
    data row of a JSON Lines file (blank lines are skipped, as ``datasets`` skips them), so later messages
    can name lines; None for other formats."""
    import fsspec

    lines = []
    try:
        with fsspec.open(str(path), "rb", compression="infer") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"dataset '{path}': line {number}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                                    "save the file as UTF-8") from None
                if json_lines and line.strip():
                    _json_object(path, number, line, columns)
                    lines.append(number)
    except (OSError, EOFError, lzma.LZMAError) as e:  # unreadable, or not the compression its name says
        raise DataError(f"dataset '{path}': cannot read it ({e.strerror or e})") from None
    return lines if json_lines else None


def _json_object(path: Path, number: int, line: str, columns: tuple[str, ...]) -> None:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise DataError(f"dataset '{path}': line {number}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"dataset '{path}': line {number}: expected a JSON object with {', '.join(columns)}, "
                        f"got {type(row).__name__}")


def check_values(ds, source: str, required, optional=(), lines: list[int] | None = None,
                 problem: Callable[[object], str | None] | None = None) -> None:
    """Every needed field of every row is non-empty text: a null, a missing key, a number or an empty
    string would be trained on as "None", "5" or nothing. An optional field (alpaca's input) may also be
    missing, null or empty. ``problem`` replaces the text rule for a field of another shape (conversations)."""
    for column in [*required, *(c for c in optional if c in ds.column_names)]:
        for i, value in enumerate(ds[column]):
            why = problem(value) if problem else _text_problem(value, column in optional)
            if why:
                where = f"line {lines[i]}" if lines else f"row {i + 1}"
                raise DataError(f"dataset '{source}': {where}: field '{column}' {why}")


def _text_problem(value, optional: bool) -> str | None:
    if value is None or value == "":
        return None if optional else ("is missing or null" if value is None else "is empty")
    if not isinstance(value, str):
        return f"is {str(value)[:40]!r} ({type(value).__name__}), not text"
    return None if value.strip() or optional else "is empty (only whitespace)"


def messages_problem(value) -> str | None:
    """A conversation: a list of {role, content} messages with an assistant reply after another turn."""
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of messages"
    for j, m in enumerate(value, 1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            return f"message {j} must be {{role: {'|'.join(ROLES)}, content: text}}, got {str(m)[:60]}"
    replies = [j for j, m in enumerate(value) if m["role"] == "assistant"]
    if not replies or replies[-1] == 0:
        return "needs an assistant message after another message (what the model learns to answer)"
    return None


def check_split(source: str, rows: int, train_samples: int, test_fraction: float) -> None:
    """Both splits get at least one row, computed exactly as ``Dataset.train_test_split`` will."""
    n = min(train_samples, rows)
    n_test = math.ceil(test_fraction * n)
    if n - n_test < 1:
        raise DataError(f"dataset '{source}' is too small: {n} row(s) with test_fraction={test_fraction} leave "
                        f"{n - n_test} for training and {n_test} for testing; add rows or lower test_fraction")
