"""Data: the space's dataset -> its rows checked -> seeded sample -> train/test -> rendered (trainers/formats.py).

Sources: a Hub dataset id (``datasets.load_dataset``, with ``dataset_subset`` and ``dataset_split``), a
local .jsonl/.json/.csv/.parquet file (.gz, .bz2 and .xz compressed too), or ``bundled:<name>`` (files
shipped in trainers/assets for the offline demos). Only the columns the format reads are kept; the
others (the Red Dot Hub set's own ``text``) are ignored.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from trainers.config import OPTIONAL_FIELDS, Settings
from trainers.formats import render

ASSETS = Path(__file__).parent / "assets"
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSED = (".gz", ".bz2", ".xz")  # what datasets decompresses by itself (zstd needs a package we do not ship)


class DataError(Exception):
    """A dataset that cannot be used; the message is one line for the user."""


def local_path(source: str) -> Path | None:
    if source.startswith("bundled:"):
        return ASSETS / f"{source.removeprefix('bundled:')}.jsonl"
    path = Path(source)
    if _local_format(path) is not None:
        return path
    return None


def _local_format(path: Path) -> str | None:
    return LOCAL_FORMATS.get(_base_suffix(path))


def _base_suffix(path: Path) -> str:
    """The file's suffix under any compression's: ``.jsonl`` for ``d.jsonl.gz``."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def needed_columns(cfg: Settings) -> tuple[list[str], list[str]]:
    """(required, optional) dataset columns the format reads."""
    names = [*cfg.prompt_fields, *([cfg.response_field] if cfg.response_field else [])]
    required = [cfg.column(n) for n in names if n not in OPTIONAL_FIELDS]
    return required, [cfg.column(n) for n in names if n in OPTIONAL_FIELDS]


def _load(cfg: Settings):
    import datasets

    source, path = cfg.dataset, local_path(cfg.dataset)
    try:
        if path is not None:
            if not path.is_file():
                raise DataError(f"dataset file not found: {source}")
            kind = _local_format(path)
            return datasets.load_dataset(kind, data_files=str(path), split=cfg.dataset_split,
                                         **({"features": _csv_as_text(path)} if kind == "csv" else {}))
        return datasets.load_dataset(source, cfg.dataset_subset or None, split=cfg.dataset_split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the first line
        while e.__cause__ is not None:  # "An error occurred while generating the dataset" wraps the reason
            e = e.__cause__
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "corresponds to no data" in first:  # datasets' words for a file with no rows
            raise DataError(f"dataset '{source}' is empty") from None
        raise DataError(f"cannot load dataset '{source}': {first}") from None


def _csv_as_text(path: Path):
    """Every CSV column read as text: left to pandas' guess, an answer column of "0." or "007" would load as
    the numbers 0.0 and 7."""
    import csv

    import datasets
    import fsspec

    with fsspec.open(str(path), "rt", compression="infer", encoding="utf-8", newline="") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def load_rows(cfg: Settings):
    """The raw dataset (a ``datasets.Dataset``), only the columns the format reads, those checked to exist."""
    ds = _load(cfg)
    required, optional = needed_columns(cfg)
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        mapped = {v: k for k, v in cfg.columns.items()}
        named = ", ".join(c + (f" (columns maps {mapped[c]} to it)" if c in mapped else "") for c in missing)
        raise DataError(f"dataset '{cfg.dataset}' lacks column(s) {named} for the {cfg.data_format} format "
                        f"(has: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"dataset '{cfg.dataset}' is empty")
    return ds.select_columns(required + [c for c in optional if c in ds.column_names])


def check_available(cfg: Settings) -> int:
    """Fail now, in the driver, on a dataset no trial could use: a local file that is missing, unreadable,
    not UTF-8, with a broken line, empty, without the format's columns or with a row the format cannot use
    (a null, empty or non-text field, a malformed conversation); or a Hub id while the Hub is unreachable
    and the dataset is not in the local cache. Returns its number of rows (``data_checks.check_split`` then
    checks each trial's split)."""
    from trainers.data_checks import check_text_file, check_values, messages_problem
    from trainers.models import hub_reachable

    path, lines = local_path(cfg.dataset), None
    required, optional = needed_columns(cfg)
    if path is not None:
        if path.is_file() and (suffix := _base_suffix(path)) != ".parquet":
            lines = check_text_file(path, (*required, *optional), json_lines=suffix == ".jsonl")
        ds = load_rows(cfg)
    elif hub_reachable():
        ds = load_rows(cfg)  # the driver's download fills the cache the trials on this machine read
    else:
        ds = _load_cached(cfg)
    # a file's line numbers name the rows only when the split is the whole file (not train[100:])
    check_values(ds, cfg.dataset, required, optional, lines if cfg.dataset_split == "train" else None,
                 messages_problem if cfg.data_format == "messages" else None)
    return len(ds)


def _load_cached(cfg: Settings):
    import datasets
    import huggingface_hub.constants

    # the Hub is down anyway: answer from the cache at once instead of after the client's retries
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        return load_rows(cfg)
    except DataError:
        raise DataError(f"dataset '{cfg.dataset}': the Hugging Face Hub is unreachable and it is not cached; point "
                        "the dataset at a local .jsonl/.csv/.parquet file (--set dataset=path)") from None


def build_splits(cfg: Settings):
    """Sample ``train_samples`` rows with ``seed``, render them, split into train/test.

    Returns a ``datasets.DatasetDict`` with ``train`` and ``test``; both keep the raw columns the format
    reads, the rendered ones (``trainers/formats.py``) and ``row_id``, the row's index in the source, which
    ``fingerprint`` hashes.
    """
    ds = load_rows(cfg)
    ds = ds.add_column("row_id", list(range(len(ds))))
    n = min(cfg.train_samples, len(ds))
    ds = ds.shuffle(seed=cfg.seed).select(range(n))
    ds = ds.map(lambda row: render(cfg, row))
    return ds.train_test_split(test_size=cfg.test_fraction, seed=cfg.seed)


def fingerprint(splits) -> str:
    """Hash of which source rows landed in train and in test: same seed, same data, same hash."""
    ids = ",".join(map(str, splits["train"]["row_id"])) + "|" + ",".join(map(str, splits["test"]["row_id"]))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]
