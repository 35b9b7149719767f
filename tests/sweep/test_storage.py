"""--storage and --storage-endpoint: checked before anything starts, credentials refused, probes bounded.
(The S3 round trip against a real S3 endpoint is in test_s3_storage.py.)"""

import time

import pytest

from sweep.cli import UserError
from sweep.storage import Storage, check, resolve


def test_local_paths_are_made_absolute_and_probed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = resolve("shared/ray", None)
    assert s == Storage(str(tmp_path / "shared" / "ray"))
    check(s)  # creates the directory, leaves nothing else behind
    assert (tmp_path / "shared" / "ray").is_dir() and not list((tmp_path / "shared" / "ray").iterdir())
    fs, path = s.sweep_root("smoke", "abc123")
    assert path == f"{tmp_path}/shared/ray/smoke-abc123" and type(fs).__name__ == "LocalFileSystem"


@pytest.mark.parametrize("uri, endpoint, message", [
    ("s3://AKIA:secret@bucket/x", None, "--storage must not carry credentials"),
    ("s3://bucket/x?access_key=AKIA&secret_key=s", None, "--storage must not carry credentials"),
    ("s3:///x", None, "--storage s3:///x: expected SCHEME://BUCKET/PATH"),
    ("/tmp/x", "http://127.0.0.1:9000", "--storage-endpoint is for S3-compatible stores"),
    ("s3://bucket/x", "127.0.0.1:9000", "--storage-endpoint must be http(s)://HOST[:PORT]"),
    ("s3://bucket/x", "http://AKIA:secret@127.0.0.1:9000", "--storage-endpoint must not carry credentials"),
    ("s3://bucket/x", "http://127.0.0.1:9000?secret_key=secret", "--storage-endpoint must not carry credentials"),
    ("s3://bucket/x?session_token=secret", None, "--storage must not carry credentials"),
    ("s3://secret@[bucket/x", None, "--storage is not a valid URI (Invalid IPv6 URL)"),
    ("nosuch://bucket/x", None, "--storage nosuch://bucket/x: "),
])
def test_bad_storage_is_one_line(uri, endpoint, message):
    with pytest.raises(UserError) as e:
        resolve(uri, endpoint)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert "secret" not in str(e.value)


def test_unwritable_and_unreachable_storage_fail_fast(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^storage .*/file/ray is not writable: "):
        check(resolve(str(tmp_path / "file" / "ray"), None))
    start = time.monotonic()
    with pytest.raises(UserError, match=r"^storage s3://bucket/ray is not writable: .*(connect|Connect)"):
        check(resolve("s3://bucket/ray", "http://127.0.0.1:9"))  # nothing listens on port 9
    assert time.monotonic() - start < 20


def test_a_resumed_sweep_keeps_its_storage(tmp_path):
    from sweep.storage import for_sweep

    started = resolve(str(tmp_path / "a"), None)
    manifest = {"storage": started.to_manifest()}
    assert for_sweep(None, manifest) == started  # the same command without --storage still resumes there
    assert for_sweep(started, manifest) == started
    with pytest.raises(UserError, match=r"^this sweep was started with --storage .*/a; pass the same"):
        for_sweep(resolve(str(tmp_path / "b"), None), manifest)
    with pytest.raises(UserError, match=r"^this sweep was started with no --storage \(the sweep directory\)"):
        for_sweep(started, {"storage": None})
    assert for_sweep(started, None) == started  # a new sweep
