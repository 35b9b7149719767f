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


# What lora-sweep at commit 264369d (before the `compile` setting existed) wrote into its sweeps' manifests
# (space fingerprint) and ledgers (trial fingerprint) for these spaces: an upgrade that adds a setting must
# not make a sweep it started read as "started from a different space" on --resume or --extend. A new
# setting goes into trainers.config.NEUTRAL_WHEN with the value that reproduces the earlier behaviour.
EARLIER_FINGERPRINTS = {"search_spaces/smoke.py": "ebe420fc14bf3c34", "search_spaces/smoke_search.py": "07736d02adf44a40"}
EARLIER_TRIAL_FINGERPRINT = "952930b6b0a3145e"


@pytest.mark.parametrize("space", sorted(EARLIER_FINGERPRINTS))
def test_sweeps_an_earlier_version_started_keep_their_fingerprints(space, monkeypatch):
    from sweep.driver import SweepOptions, plan_sweep
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)
    opts = SweepOptions(space=space, sets=("model=random:tiny-llama", "dataset=bundled:products-400", "device=cpu"))
    assert plan_sweep(opts, for_training=False).fingerprint == EARLIER_FINGERPRINTS[space]


def test_a_trial_keeps_its_fingerprint_unless_a_new_setting_leaves_its_neutral_value():
    from dataclasses import replace

    from trainers.config import TrialConfig

    cfg = TrialConfig(name="t", index=0, model="random:tiny-llama", dataset="bundled:products-400", device="cpu", r=8,
                      targets="attention", bits=4)
    assert cfg.fingerprint == EARLIER_TRIAL_FINGERPRINT
    assert replace(cfg, compile=True).fingerprint != EARLIER_TRIAL_FINGERPRINT  # compiled is another trial
    assert TrialConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "compile"}) == cfg  # an old record
