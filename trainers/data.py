"""Data: Red Dot-shaped rows -> the post's instruction in the Alpaca template -> seeded sample -> train/test.

Sources: a Hub dataset id (``datasets.load_dataset``), a local .jsonl/.json/.csv/.parquet file, or
``bundled:products-400`` (400 rows of real product descriptions shipped for the offline demo).
Only ``product``, ``category`` and ``description`` are read; other columns (the Hub set's ``text``)
are ignored.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
COLUMNS = ("product", "category", "description")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

INSTRUCTION = "Create a detailed description for the following product: {product}, belonging to category: {category}"
TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n\n{instruction}\n\n### Response:\n{response}"
)
END_MARKER = "### End"
# The two prompts the post judged every configuration by.
POST_PROMPTS = (("Corelogic Smooth Mouse", "Optical Mouse"), ("Hoover Lightspeed", "Cordless Vacuum Cleaner"))


class DataError(Exception):
    """A dataset that cannot be used; the message is one line for the user."""


def prompt(product: str, category: str) -> str:
    """Everything up to where the model should start writing the description."""
    return TEMPLATE.format(instruction=INSTRUCTION.format(product=product, category=category), response="")


def format_row(product: str, category: str, description: str) -> str:
    """One training text: the post's template with the description and its end marker as the response."""
    return prompt(product, category) + f"{description}\n{END_MARKER}"


def local_path(source: str) -> Path | None:
    if source.startswith("bundled:"):
        return ASSETS / f"{source.removeprefix('bundled:')}.jsonl"
    if Path(source).suffix.lower() in LOCAL_FORMATS:
        return Path(source)
    return None


def load_rows(source: str):
    """The raw dataset (a ``datasets.Dataset``) with the three needed columns checked."""
    import datasets

    path = local_path(source)
    try:
        if path is not None:
            if not path.is_file():
                raise DataError(f"dataset file not found: {source}")
            ds = datasets.load_dataset(LOCAL_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(source, split="train")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs the first line
        while e.__cause__ is not None:  # "An error occurred while generating the dataset" wraps the reason
            e = e.__cause__
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "corresponds to no data" in first:  # datasets' words for a file with no rows
            raise DataError(f"dataset '{source}' is empty") from None
        raise DataError(f"cannot load dataset '{source}': {first}") from None
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"dataset '{source}' lacks column(s) {', '.join(missing)} (has: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"dataset '{source}' is empty")
    return ds.select_columns(list(COLUMNS))


def check_available(source: str) -> int:
    """Fail now, in the driver, on a dataset no trial could use: a local file that is missing, unreadable,
    not UTF-8, with a broken line, without the columns or with a null, empty or non-text field; or a Hub id
    while the Hub is unreachable and the dataset is not in the local cache. Returns its number of rows
    (``data_checks.check_split`` then checks each trial's split)."""
    from trainers.data_checks import check_text_file, check_values
    from trainers.models import hub_reachable

    path, lines = local_path(source), None
    if path is not None:
        if path.is_file() and path.suffix.lower() != ".parquet":
            lines = check_text_file(path, COLUMNS)
        ds = load_rows(source)
    elif hub_reachable():
        ds = load_rows(source)  # the driver's download fills the cache the trials on this machine read
    else:
        ds = _load_cached(source)
    check_values(ds, source, COLUMNS, lines)
    return len(ds)


def _load_cached(source: str):
    import datasets
    import huggingface_hub.constants

    # the Hub is down anyway: answer from the cache at once instead of after the client's retries
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        return load_rows(source)
    except DataError:
        raise DataError(f"dataset '{source}': the Hugging Face Hub is unreachable and it is not cached; point the "
                        "dataset at a local .jsonl/.csv/.parquet file (--set dataset=path)") from None


def build_splits(source: str, train_samples: int, test_fraction: float, seed: int):
    """Sample ``train_samples`` rows with ``seed``, add the ``text`` column, split into train/test.

    Returns a ``datasets.DatasetDict`` with ``train`` and ``test``; both keep the raw columns (so
    evaluation can prompt with product/category and score against the description) and ``row_id``,
    the row's index in the source, which ``fingerprint`` hashes.
    """
    ds = load_rows(source)
    ds = ds.add_column("row_id", list(range(len(ds))))
    n = min(train_samples, len(ds))
    ds = ds.shuffle(seed=seed).select(range(n))
    ds = ds.map(lambda r: {"text": format_row(r["product"], r["category"], r["description"])})
    return ds.train_test_split(test_size=test_fraction, seed=seed)


def fingerprint(splits) -> str:
    """Hash of which source rows landed in train and in test: same seed, same data, same hash."""
    ids = ",".join(map(str, splits["train"]["row_id"])) + "|" + ",".join(map(str, splits["test"]["row_id"]))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]
