"""Idempotent hours and backfill equivalence through the in-process hour runner."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from profile_engine.hours import hour_range
from profile_engine.ingest import events as ingest
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake
from profile_engine.ops import runner
from profile_engine.profiles.verify import verify_hour

from .conftest import H0, LAST, WARM, copy_lake, settings_for
from .lakecheck import differences, lake_content, partial_partitions


def test_rerunning_hours_10_to_the_last_reproduces_the_lake_and_equals_a_rebuild(
    reference_lake: Path, reference_content: dict[str, Any], tmp_path: Path
) -> None:
    # Arrange: 24 hours run in order (the reference); a copy to backfill.
    root = copy_lake(reference_lake, tmp_path / "lake")
    settings = settings_for(root)

    # Act: rerun hour 10 alone (later hours exist), then 10..20 and every later hour, in order.
    runner.run_hour(settings, H0 + timedelta(hours=10), build_docs=False)
    reran = runner.run_hours(settings, H0 + timedelta(hours=10), LAST, build_docs=False)

    # Assert: the same content (state, ledger, contact history, exports: nothing double-counted) ...
    assert len(reran) == 14 and all(r["extract_events"]["rerun"] for r in reran)
    assert differences(lake_content(root), reference_content) == []
    assert partial_partitions(root) == []
    # ... and the last snapshot equals a full rebuild from the staged events.
    assert verify_hour(settings, LAST).equal


def test_every_landed_row_is_counted_once(reference_lake: Path) -> None:
    # Arrange
    lake = Lake(reference_lake)
    hours = list(hour_range(WARM, LAST))

    # Act
    read = sum(e.rows for h in hours for e in ingest.read_ledger(lake, h) or [])
    files = [e.path for h in hours for e in ingest.read_ledger(lake, h) or []]
    staged = [lake.read(lk.STAGING, h, columns=["event_id"]).column("event_id") for h in hours]
    quarantined = sum(lake.read(lk.QUARANTINE, h, columns=["event_id"]).num_rows for h in hours)
    event_ids = [event_id for column in staged for event_id in column.to_pylist()]

    # Assert: every file once in the ledger, every row staged or quarantined, no event staged twice.
    assert len(files) == len(set(files)) > 0
    assert read == sum(len(s) for s in staged) + quarantined
    assert len(set(event_ids)) == len(event_ids) > 0
