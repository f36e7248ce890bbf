"""Late and re-sent landing files: taken once, by the hour they arrived in; re-sent rows never count twice."""

from __future__ import annotations

from pathlib import Path

from profile_engine.hours import format_hour, hour_range
from profile_engine.ingest import events as ingest
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake
from profile_engine.sources import simulate

from .conftest import LAST, WARM


def test_late_and_resent_files_are_taken_once_by_their_arrival_hour(reference_lake: Path) -> None:
    # Arrange: the simulator's plan of every landing file (its truth) and the ledger of every hour.
    lake = Lake(reference_lake)
    hours = list(hour_range(WARM, LAST))
    plan = [row for h in hours for row in lake.read_named(lk.TRUTH, h, simulate.TRUTH_FILES).to_pylist()]
    taken = {e.path.rsplit("/", 1)[-1]: h for h in hours for e in ingest.read_ledger(lake, h) or []}
    staged = {i for h in hours for i in lake.read(lk.STAGING, h, columns=["event_id"]).column("event_id").to_pylist()}
    reasons = [r for h in hours for r in lake.read(lk.QUARANTINE, h, columns=["reasons"]).column("reasons").to_pylist()]

    # Act
    late = [f for f in plan if f["kind"] != simulate.ON_TIME]
    misplaced = [f["file"] for f in plan if format_hour(taken[f["file"]]) != format_hour(f["arrival_hour"])]

    # Assert: the plan has late, too-late and re-sent files; each was taken by its arrival hour only.
    assert {f["kind"] for f in late} >= {simulate.LATE_FILE, simulate.RESENT_FILE}
    assert len(taken) == len(plan) and misplaced == []
    # Re-sent copies went to quarantine as duplicates: staged events are unique (checked in
    # test_backfill) and duplicates were seen, so a retry never counted twice.
    assert staged and any(ingest.DUPLICATE in str(r) for r in reasons)
