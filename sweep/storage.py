"""Where Ray Tune keeps a sweep's trial checkpoints (the tracking store is another thing, MLflow's).

Without ``--storage`` it is the sweep directory (``DIR/tune``): one machine, or a cluster whose nodes all
mount that directory. ``--storage URI`` is for clusters with nothing shared but the URI: an absolute local
or NFS path mounted at the same place on every node, or anything pyarrow's filesystems open (``s3://``,
``gs://``, ``hdfs://``), with ``--storage-endpoint`` for S3-compatible stores (MinIO, Ceph, moto). Each
node's trial reads and writes its own checkpoints there through Ray; the driver copies finished trials'
files from there into the sweep directory. Credentials never go in the URI: S3 takes them from each
node's environment (``AWS_ACCESS_KEY_ID`` ...) or its instance role, so Ray never pickles them.
Nothing here imports Ray.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sweep.cli import UserError

PROBE_TIMEOUT_S = 20.0  # a reachable store answers in a second; a wrong endpoint would retry for minutes


@dataclass(frozen=True)
class Storage:
    """``--storage`` and ``--storage-endpoint`` as the manifest records them (no credentials in either)."""

    uri: str
    endpoint: str = ""

    def filesystem(self, *, probe: bool = False):
        """(pyarrow filesystem, path on it). ``probe``: short timeouts and no retries, for the up-front check."""
        import pyarrow.fs as pafs

        scheme = urlsplit(self.uri).scheme
        if not scheme or scheme == "file":
            return pafs.LocalFileSystem(), self.uri.removeprefix("file://")
        if scheme == "s3":
            parts = urlsplit(self.uri)
            options = {"connect_timeout": 5, "request_timeout": 10,
                       "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1)} if probe else {}
            if self.endpoint:
                endpoint = urlsplit(self.endpoint)
                options.update(endpoint_override=endpoint.netloc, scheme=endpoint.scheme)
            # allow_delayed_open: a small file (seals, metrics, adapters of small models) goes up in one PutObject
            # instead of a multipart upload (fewer requests; moto 5.2's multipart completion fails pyarrow's
            # response check). Region: pyarrow resolves the bucket's own; S3-compatible stores ignore it.
            fs = pafs.S3FileSystem(allow_delayed_open=True, **options)
            return fs, (parts.netloc + parts.path).rstrip("/")
        return pafs.FileSystem.from_uri(self.uri)

    def sweep_root(self, name: str, sweep_id: str) -> tuple[object, str]:
        """(filesystem, path) under which one sweep's Ray Tune experiments live: a directory of its own, so
        two sweeps of the same name (or a --fresh start) never share checkpoints."""
        fs, base = self.filesystem()
        return fs, f"{base}/{name}-{sweep_id}"

    def to_manifest(self) -> dict:
        return {"uri": self.uri, "endpoint": self.endpoint}


CREDENTIAL_QUERY = ("access_key", "secret_key", "session_token")  # pyarrow's S3 URI options that are secrets


def _split(value: str, flag: str):
    try:
        return urlsplit(value)
    except ValueError as e:  # not repeated here: it may hold a secret
        raise UserError(f"{flag} is not a valid URI ({e})") from None


def resolve(uri: str, endpoint: str | None) -> Storage:
    """Check ``--storage``/``--storage-endpoint`` without touching anything; relative paths made absolute.
    A value carrying credentials is refused without being repeated."""
    parts = _split(uri, "--storage")
    if parts.scheme in ("", "file"):
        if endpoint:
            raise UserError("--storage-endpoint is for S3-compatible stores; --storage is a local path")
        path = Path(uri.removeprefix("file://")).expanduser()
        return Storage(str(path.resolve()))
    if "@" in parts.netloc or any(k in parts.query for k in CREDENTIAL_QUERY):
        raise UserError("--storage must not carry credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                        "(or an instance role) on every node instead")
    if not parts.netloc:
        raise UserError(f"--storage {uri}: expected SCHEME://BUCKET/PATH, e.g. s3://my-bucket/sweeps")
    if endpoint:
        if parts.scheme != "s3":
            raise UserError(f"--storage-endpoint is for s3:// storage, not {parts.scheme}://")
        e = _split(endpoint, "--storage-endpoint")
        if "@" in e.netloc or e.query:
            raise UserError("--storage-endpoint must not carry credentials: set AWS_ACCESS_KEY_ID / "
                            "AWS_SECRET_ACCESS_KEY on every node instead")
        if e.scheme not in ("http", "https") or not e.netloc:
            raise UserError(f"--storage-endpoint must be http(s)://HOST[:PORT], got {endpoint}")
    try:
        Storage(uri, endpoint or "").filesystem(probe=True)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ValueError/ArrowInvalid/OSError for unknown schemes
        raise UserError(f"--storage {uri}: {str(e).splitlines()[0]}") from None
    return Storage(uri, endpoint or "")


def sweep_root(manifest: dict, out: Path) -> tuple[object, str]:
    """(filesystem or None, path) under which Ray Tune keeps the sweep's experiment: the sweep directory,
    or the sweep's own directory in its --storage."""
    if not manifest.get("storage"):
        return None, str(out)
    return Storage(**manifest["storage"]).sweep_root(manifest["name"], manifest["sweep_id"])


def trial_dirs(out: Path, name: str) -> tuple[object, list[str]]:
    """(filesystem, paths) where a trial's Ray Tune directory can be: one per experiment of the sweep in
    ``out`` (``tune/``, ``tune-search/``, ...), in the sweep directory or in its --storage."""
    from pyarrow.fs import LocalFileSystem

    from sweep import sweepdir

    manifest = sweepdir.read_json(out / sweepdir.SWEEP_MANIFEST)
    fs, root = sweep_root(manifest, out)
    return fs or LocalFileSystem(), [f"{root}/{e['name']}/{name}" for e in sweepdir.experiments(manifest)]


def read_file(fs, directory: str, name: str) -> str | None:
    """A file's text on ``fs``; None when it is not there (or the store does not answer)."""
    from trainers.checkpoints import read_text

    try:
        return read_text(directory, name, fs)
    except (OSError, ValueError):
        return None


def from_flags(uri: str | None, endpoint: str | None) -> Storage | None:
    """--storage and --storage-endpoint, checked (None: the sweep directory)."""
    if endpoint and not uri:
        raise UserError("--storage-endpoint needs --storage s3://BUCKET/PATH")
    return resolve(uri, endpoint) if uri else None


def for_sweep(given: Storage | None, manifest: dict | None) -> Storage | None:
    """The sweep's storage. A resumed sweep keeps the one it started with, where its trials' checkpoints
    are; a different --storage on resume is refused rather than silently starting the trials over."""
    if manifest is None:
        return given
    recorded = Storage(**manifest["storage"]) if manifest.get("storage") else None
    if given is not None and given != recorded:
        was = f"--storage {recorded.uri}" if recorded else "no --storage (the sweep directory)"
        raise UserError(f"this sweep was started with {was}; pass the same to resume it, or --fresh to start over")
    return recorded


def check(storage: Storage) -> None:
    """Write and remove a small file under the storage, within PROBE_TIMEOUT_S: a wrong bucket, endpoint or
    credentials fail here, in one line, before Ray starts, instead of in every trial."""
    outcome: list[BaseException | None] = []

    def probe():
        try:
            fs, base = storage.filesystem(probe=True)
            fs.create_dir(base, recursive=True)
            path = f"{base}/.lora-sweep-probe-{uuid.uuid4().hex[:8]}"
            with fs.open_output_stream(path) as f:
                f.write(b"ok")
            fs.delete_file(path)
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - any failure means the trials could not write there either
            outcome.append(e)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    if not outcome:
        raise UserError(f"storage {storage.uri} did not answer within {PROBE_TIMEOUT_S:.0f}s"
                        + (f" (endpoint {storage.endpoint})" if storage.endpoint else ""))
    if outcome[0] is not None:
        reason = " ".join(str(outcome[0]).split())[:300]
        raise UserError(f"storage {storage.uri} is not writable: {reason}")
