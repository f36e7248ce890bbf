"""Extraction through the ledger, and validation into staging and quarantine."""

from __future__ import annotations

import gzip
import os
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from profile_engine import ingest
from profile_engine import lake as lk
from profile_engine.config import Settings
from profile_engine.hours import HOUR
from profile_engine.lake import Lake
from profile_engine.schema import EVENT_SCHEMA, STAGED_SCHEMA
from tests.conftest import HOUR0


def event(
    event_id: str, user: str = "u1", kind: str = "view", ts: datetime = HOUR0, **extra: object
) -> dict[str, object]:
    row: dict[str, object] = {
        "event_id": event_id,
        "user_id": user,
        "event_type": kind,
        "item_id": "i1",
        "category_id": "c1",
        "price": 10.0,
        "quantity": 1,
        "order_id": None,
        "ts": ts + timedelta(minutes=5),
        "session_id": "s1",
    }
    row.update(extra)
    return row


def land(lake: Lake, arrival: datetime, name: str, rows: list[dict[str, object]]) -> Path:
    directory = lake.partition(lk.LANDING, arrival)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    pq.write_table(pa.Table.from_pylist(rows, schema=EVENT_SCHEMA), path)
    os.utime(path, (arrival.timestamp() + 60, arrival.timestamp() + 60))
    return path


def test_extract_takes_each_file_once_and_rerun_reads_the_ledger(settings: Settings) -> None:
    lake = Lake(settings.lake)
    land(lake, HOUR0, "a.parquet", [event("e1")])
    first = ingest.extract_events(settings, HOUR0)
    land(lake, HOUR0, "late.parquet", [event("e2")])  # lands in HOUR0's partition after HOUR0 ran
    land(lake, HOUR0 + HOUR, "b.parquet", [event("e3", ts=HOUR0 + HOUR)])

    second = ingest.extract_events(settings, HOUR0 + HOUR)
    rerun = ingest.extract_events(settings, HOUR0)

    assert (first["files"], first["rows"]) == (1, 1)
    assert (second["files"], second["late_files"]) == (2, 1)
    assert rerun["rerun"] and rerun["files"] == 1
    assert [e.path for e in ingest.read_ledger(lake, HOUR0) or []] == ["landing/events/dt=2026-11-02/hour=10/a.parquet"]


def test_extract_ignores_files_arriving_after_the_hour(settings: Settings) -> None:
    lake = Lake(settings.lake)
    land(lake, HOUR0 + HOUR, "future.parquet", [event("e1")])

    assert ingest.extract_events(settings, HOUR0)["files"] == 0


def test_rerun_fails_naming_a_changed_file(settings: Settings) -> None:
    lake = Lake(settings.lake)
    path = land(lake, HOUR0, "a.parquet", [event("e1")])
    ingest.extract_events(settings, HOUR0)
    land(lake, HOUR0, "a.parquet", [event("e1"), event("e2")])

    with pytest.raises(ingest.LedgerError, match=str(path)):
        ingest.extract_events(settings, HOUR0)


def test_changed_file_is_reported_not_reread(settings: Settings) -> None:
    lake = Lake(settings.lake)
    land(lake, HOUR0, "a.parquet", [event("e1")])
    ingest.extract_events(settings, HOUR0)
    land(lake, HOUR0, "a.parquet", [event("e1"), event("e2")])

    summary = ingest.extract_events(settings, HOUR0 + HOUR)

    assert summary["files"] == 0
    assert summary["changed_after_ingestion"] == ["landing/events/dt=2026-11-02/hour=10/a.parquet"]


def test_validate_stages_per_bucket_and_quarantines_with_reasons(settings: Settings) -> None:
    settings = replace(settings, quarantine_threshold=1.0)
    lake = Lake(settings.lake)
    rows = [
        event("ok1", user="u1"),
        event("ok2", user="u2", kind="purchase", order_id="o1"),
        # 11:02, inside the 5 min clock skew: staged, held back by the profile state
        event("ok3", user="u3", ts=HOUR0 + timedelta(minutes=57)),
        event("bad1", user=""),
        event("bad2", kind="click"),
        event("bad3", price=-1.0),
        event("bad4", quantity=0),
        event("bad5", ts=HOUR0 + timedelta(days=1)),
        event("bad6", ts=HOUR0 - timedelta(hours=settings.lateness_hours + 1)),
        event("ok1", user="u1"),  # a second copy of ok1
    ]
    land(lake, HOUR0, "a.parquet", rows)
    ingest.extract_events(settings, HOUR0)

    summary = ingest.validate_events(settings, HOUR0, quality_suite=False)

    assert (summary["read"], summary["staged"], summary["quarantined"]) == (10, 3, 7)
    assert summary["reasons"] == {
        "bad_quantity": 1,
        "duplicate": 1,
        "future_ts": 1,
        "missing_user_id": 1,
        "negative_price": 1,
        "too_late": 1,
        "unknown_event_type": 1,
    }
    staged = lake.read(lk.STAGING, HOUR0)
    assert staged.schema == STAGED_SCHEMA
    assert sorted(staged.column("event_id").to_pylist()) == ["ok1", "ok2", "ok3"]
    for b in range(settings.buckets):
        part = lake.read(lk.STAGING, HOUR0, b)
        assert set(part.column("bucket").to_pylist()) <= {b}
    quarantined = lake.read(lk.QUARANTINE, HOUR0)
    assert quarantined.column("source_file").to_pylist()[0] == "landing/events/dt=2026-11-02/hour=10/a.parquet"
    assert sorted(quarantined.column("source_row").to_pylist()) == [4, 5, 6, 7, 8, 9, 10]


def test_producer_resend_in_a_later_hour_is_a_duplicate(settings: Settings) -> None:
    lake = Lake(settings.lake)
    land(lake, HOUR0, "a.parquet", [event("e1")])
    land(lake, HOUR0 + HOUR, "a-resent.parquet", [event("e1")])
    for hour in (HOUR0, HOUR0 + HOUR):
        ingest.extract_events(settings, hour)

    first = ingest.validate_events(settings, HOUR0, quality_suite=False)
    second = ingest.validate_events(settings, HOUR0 + HOUR, quality_suite=False)

    assert (first["staged"], second["staged"], second["reasons"]) == (1, 0, {"duplicate": 1})


def test_text_sources_with_gzip_are_read(settings: Settings) -> None:
    lake = Lake(settings.lake)
    directory = lake.partition(lk.LANDING, HOUR0)
    directory.mkdir(parents=True)
    header = "event_id,user_id,event_type,item_id,category_id,price,quantity,order_id,ts,session_id\n"
    with gzip.open(directory / "a.csv.gz", "wt") as handle:
        handle.write(header + "e1,1234567890123456789,view,i1,c1,1.5,,,2026-11-02 10:05:00+00,s1\n")
    (directory / "b.jsonl").write_text(
        '{"event_id":"e2","user_id":"u2","event_type":"cart","item_id":"i2","ts":"2026-11-02T10:06:00Z"}\n'
    )
    ingest.extract_events(settings, HOUR0)

    summary = ingest.validate_events(settings, HOUR0, quality_suite=False)

    assert (summary["read"], summary["staged"]) == (2, 2)
    staged = lake.read(lk.STAGING, HOUR0).sort_by("event_id")
    assert staged.column("user_id").to_pylist() == ["1234567890123456789", "u2"]  # never through float
    assert staged.column("quantity").to_pylist() == [1, 1]


def test_quarantine_threshold_fails_after_writing(settings: Settings) -> None:
    settings = replace(settings, quarantine_min_rows=100)
    lake = Lake(settings.lake)
    rows = [event(f"bad{i}", user="") for i in range(30)] + [event(f"ok{i}") for i in range(70)]
    land(lake, HOUR0, "a.parquet", rows)
    ingest.extract_events(settings, HOUR0)

    with pytest.raises(ingest.QuarantineThresholdExceeded, match="30 of 100 rows"):
        ingest.validate_events(settings, HOUR0, quality_suite=False)
    assert lake.committed(lk.QUARANTINE, HOUR0)


def test_quiet_hours_and_routine_reasons_do_not_trip_the_threshold(settings: Settings) -> None:
    lake = Lake(settings.lake)
    late = HOUR0 - timedelta(hours=settings.lateness_hours + 2)
    rows = [event("bad", user="")] + [event(f"late{i}", ts=late) for i in range(60)] + [event("ok")]
    land(lake, HOUR0, "a.parquet", rows)
    ingest.extract_events(settings, HOUR0)

    summary = ingest.validate_events(settings, HOUR0, quality_suite=False)

    assert (summary["read"], summary["quarantined"], summary["defective"]) == (62, 61, 1)
