"""The sweep directory's own records: written without strays on a full disk; --fresh never colliding."""

import errno
import json
import os

import pytest

from sweep import sweepdir


def test_a_failed_write_leaves_the_old_record_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    sweepdir.write_json(path, {"a": {"status": "TERMINATED"}})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        sweepdir.write_json(path, {"b": {"status": "ERROR"}})
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]
    assert json.loads(path.read_text()) == {"a": {"status": "TERMINATED"}}


def test_fresh_twice_in_one_second_keeps_both_old_sweeps(tmp_path, monkeypatch):
    monkeypatch.setattr(sweepdir.time, "strftime", lambda fmt: "20260101-000000")
    out = tmp_path / "out"
    for content in ("first", "second"):
        out.mkdir()
        (out / "sweep.json").write_text(content)
        sweepdir.move_aside(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.old-20260101-000000", "out.old-20260101-000000-2"]
    assert (tmp_path / "out.old-20260101-000000-2" / "sweep.json").read_text() == "second"
