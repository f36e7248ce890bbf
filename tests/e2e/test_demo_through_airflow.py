"""End to end: a warm-up plus 24 hourly runs of ``profile_refresh`` through Airflow (``dag.test``)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from profile_engine.config import Settings
from profile_engine.hours import hour_range
from profile_engine.ingest import events as ingest
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake, read_json
from profile_engine.ops import demo
from profile_engine.profiles import snapshot, verify

LAST = datetime(2026, 11, 20, 23, tzinfo=UTC)
HOURS = 24


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_demo_runs_every_stage_for_every_hour(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lake_root = tmp_path / "lake"
    for key in ("PROFILE_ENGINE_START", *demo.DEMO_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PROFILE_ENGINE_LAKE", str(lake_root))
    monkeypatch.setenv("PROFILE_ENGINE_BUCKETS", "2")
    monkeypatch.setenv("PROFILE_ENGINE_START", "")  # set by the demo; restored afterwards
    for key, value in demo.DEMO_ENV.items():
        monkeypatch.setenv(key, value)
    # every hourly snapshot of the demo's small buckets starts from the hour before (verified below)
    monkeypatch.setenv("PROFILE_ENGINE_SNAPSHOT_FROM_PREVIOUS_MIN_USERS", "0")
    monkeypatch.setattr(snapshot, "MOST_CHANGED", 1.0)
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True, capture_output=True)

    summary = demo.run_demo(users=300, history_days=3, hours=HOURS, seed=3, last=LAST)

    settings = Settings.from_env()
    lake = Lake(settings.lake)
    first = LAST.replace(hour=0)
    assert summary["failed_hours"] == [] and summary["hours_processed"] == HOURS
    landed = staged = quarantined = started = 0
    for hour in hour_range(first, LAST):
        for layer in (lk.STAGING, lk.QUARANTINE, lk.PROFILES, lk.SCORES, lk.SEGMENTS, lk.PROFILE_CHANGES):
            assert lake.data_files(layer, hour), f"{layer} missing for {hour}"
        assert (lake.partition(lk.PROFILES, hour) / lk.MANIFEST).is_file(), f"snapshot {hour} not committed"
        assert (lake.partition(lk.QUALITY_DOCS, hour) / "index.html").is_file()
        assert (lake.partition(lk.EXPORTS, hour) / lk.MANIFEST).is_file()
        report = read_json(lake.partition(lk.REPORTS, hour) / "report.json")
        assert report["status"] == "success", report["incomplete_stages"]
        built = report["stages"]["build_profiles"]["summary"]  # one per bucket, as the run report shows them
        started += sum(b["snapshot_from_previous_hour"] for b in built)
        landed += sum(e.rows for e in ingest.read_ledger(lake, hour) or [])
        staged += lake.read(lk.STAGING, hour, columns=["event_id"]).num_rows
        quarantined += lake.read(lk.QUARANTINE, hour, columns=["event_id"]).num_rows
    assert landed > 0 and landed == staged + quarantined
    assert quarantined > 0  # the simulator's defects reach quarantine
    assert summary["profiles"] > 0
    assert started == 2 * HOURS  # every bucket of every hour (the first starts from the warm-up)
    results = verify.verify_hours(settings, first, LAST)  # every hourly snapshot equals its rebuild
    assert len(results) == HOURS
    assert all(r.equal for r in results), [r.render() for r in results if not r.equal]
