"""The tracking store a sweep writes to: its URI, its credentials, and whether it answers at all.

A tracking URI may carry ``user:password@``. Only the URI without them is ever written (sweep.json),
logged, handed to MLflow or pickled by Ray (``tune/tuner.pkl`` holds the tracker); the credentials
reach MLflow through its own ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` variables in
the driver process only, set after Ray has started so no Ray process or trial worker inherits them.
Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from sweep.cli import UserError

CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
PROBE_TIMEOUT_S = 15.0  # a server on the other side of the world answers in one; a dead one never


def tracking_uri(flag: str | None) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db; a relative SQLite path is made absolute
    so that a resume started from another directory finds the same store."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def redact(uri: str) -> str:
    """The URI with user:password shown as ``***``, for messages and --set values in MLflow params."""
    return _replace_userinfo(uri, "***@")


def strip_credentials(uri: str) -> str:
    """The URI with no user information at all: what MLflow, Ray's pickles and every log line get."""
    return _replace_userinfo(uri, "")


def _replace_userinfo(uri: str, by: str) -> str:
    try:
        parts = urlsplit(uri)
    except ValueError:  # not a URI (an unbalanced "[" in a path): nothing that looks like user:password@
        return uri
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=by + parts.netloc.rpartition("@")[2]))


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with user:password taken out of every URI in it (``--opt=URI`` too)."""
    def clean(arg: str) -> str:
        flag, eq, value = arg.partition("=")
        return flag + eq + redact(value) if arg.startswith("--") and eq else redact(arg)

    return [clean(a) for a in argv]


@dataclass(frozen=True)
class TrackingStore:
    """A tracking URI split into the URI proper and its credentials. Only ``uri`` is ever stored, logged,
    handed to MLflow or pickled by Ray; the credentials reach MLflow through its own environment
    variables in the driver process alone (``credentials_env``)."""

    uri: str
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, uri: str) -> "TrackingStore":
        try:
            parts = urlsplit(uri)
        except ValueError as e:  # not repeated here: it may hold a password
            raise UserError(f"--mlflow-uri is not a valid URI ({e})") from None
        if parts.username is None and parts.password is None:
            return cls(uri)
        if not parts.password:
            raise UserError(f"tracking URI {redact(uri)}: a user name without a password; give user:password, or "
                            "set MLFLOW_TRACKING_TOKEN (a bearer token) instead")
        return cls(strip_credentials(uri), unquote(parts.username or ""), unquote(parts.password))

    def env(self) -> dict[str, str]:
        if self.password is None:
            return {}
        return {"MLFLOW_TRACKING_USERNAME": self.username or "", "MLFLOW_TRACKING_PASSWORD": self.password}


@contextlib.contextmanager
def patched_env(values: dict[str, str | None]):
    """Set (or, for None, remove) environment variables for the block, then put back what was there."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def hidden_credentials():
    """For ``ray.init``: the processes it starts (and their trial workers) inherit the driver's
    environment, and trials never talk to MLflow, so no tracking credential goes with them."""
    return patched_env(dict.fromkeys(CREDENTIAL_VARS))


def use_credentials(store: TrackingStore) -> None:
    """From now on (after Ray has started), this process's MLflow client authenticates with them."""
    os.environ.update(store.env())


def check_store(store: TrackingStore, timeout: float | None = None) -> None:
    """Reach the tracking store before anything starts, as the sweep will use it (MLflow's own client, one
    request, no retries): a wrong scheme, a server that is down or silent, rejected credentials or a
    database that is not one fail here in one line instead of minutes into the sweep (MLflow's client
    retries for about four minutes by default). A server gets ``timeout`` seconds to answer."""
    from mlflow import MlflowClient  # imported before the clock starts: it alone takes seconds

    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    error: list[BaseException] = []

    def ask() -> None:
        try:
            MlflowClient(tracking_uri=store.uri).search_experiments(max_results=1)
        except BaseException as e:  # noqa: BLE001 - reported below, in one line
            error.append(e)

    with patched_env({**store.env(), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout)))}):
        if store.uri.startswith("sqlite:"):  # a local file: nothing to wait for, and a new one takes seconds
            _check_sqlite_path(store.uri)   # to set up, so no clock
            ask()
        else:
            probe = threading.Thread(target=ask, daemon=True)  # daemon: a hung connect must not hold up exit
            probe.start()
            probe.join(timeout + 2)  # the client's own timeout first; ours if it hangs elsewhere (DNS, a DB)
            if probe.is_alive():
                raise UserError(f"tracking store {store.uri} cannot be used: it did not answer within {timeout:g} s")
    if error:
        raise UserError(f"tracking store {store.uri} cannot be used: {_reason(error[0], timeout)}")


# MLflow wraps an HTTP failure into one long sentence; these say what it means.
REASONS = (("Read timed out", "it did not answer within {timeout:g} s"),
           ("Connection refused", "nothing listens there (connection refused)"),
           ("Name or service not known", "the host name does not resolve"),
           ("401", "it refused the credentials (HTTP 401)"), ("403", "it refused access (HTTP 403)"))


def _reason(e: BaseException, timeout: float) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    for needle, meaning in REASONS:
        if needle in text:
            return meaning.format(timeout=timeout)
    return text if len(text) <= 300 else text[:297] + "..."


def _check_sqlite_path(uri: str) -> None:
    """What MLflow would report late or not at all about a SQLite file, said precisely and without
    creating anything."""
    path = Path(uri.removeprefix("sqlite:///").partition("?")[0]) if uri.startswith("sqlite:///") else None
    if path is None or str(path) in ("", ":memory:"):
        raise UserError(f"tracking store {uri}: an in-memory store would lose the sweep's runs; give a file, "
                        "sqlite:///PATH")
    if path.is_dir():
        raise UserError(f"tracking store {uri}: {path} is a directory, not a database file")
    if path.exists():
        with open(path, "rb") as f:
            head = f.read(16)
        if head and head != b"SQLite format 3\x00":
            raise UserError(f"tracking store {uri}: {path} is not an SQLite database")
        if not os.access(path, os.R_OK | os.W_OK):
            raise UserError(f"tracking store {uri}: {path} is not readable and writable")
    elif not path.parent.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"tracking store {uri}: cannot create {path} ({path.parent} is not a writable directory)")
