"""Every file under landing/ is read or named with a reason (ledger, run report, task log)."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from profile_engine.config import Settings
from profile_engine.contracts.events import EVENT_COLUMNS, EVENT_SCHEMA
from profile_engine.hours import HOUR
from profile_engine.ingest import events as ingest
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake, read_json, write_json
from profile_engine.ops import report
from profile_engine.sources import mappings as sources
from profile_engine.sources import readers as source_readers
from tests.conftest import HOUR0

H = HOUR0 + timedelta(hours=40)
COLUMNS = list(EVENT_COLUMNS)


def _row(event_id: str, ts: datetime = H) -> list[str]:
    stamp = (ts + timedelta(minutes=5)).isoformat()
    return [event_id, "u1", "view", "i1", "c1", "10.0", "1", "", stamp, "s1"]


def _text(path: Path, lines: list[str], arrival: datetime) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    os.utime(path, (arrival.timestamp() + 60, arrival.timestamp() + 60))
    return path


def _parquet(path: Path, event_id: str, arrival: datetime) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    row = dict(zip(COLUMNS, _row(event_id, arrival), strict=True))
    typed = {**row, "price": 10.0, "quantity": 1, "order_id": None, "ts": arrival + timedelta(minutes=5)}
    pq.write_table(pa.Table.from_pylist([typed], schema=EVENT_SCHEMA), path)
    os.utime(path, (arrival.timestamp() + 60, arrival.timestamp() + 60))
    return path


def _land_every_kind(lake: Lake) -> dict[str, str]:
    """One file of each kind under landing/; returns {relative path: expected reason or 'read'}."""
    here = lake.partition(lk.LANDING, H)
    old = H - timedelta(hours=6 + ingest.LISTING_MARGIN_HOURS + 5)  # beyond lateness 6 + the listing margin
    rees = "event_time,event_type,product_id,category_id,price,user_id,user_session"
    files = {
        _text(here / "UPPER.CSV", [",".join(COLUMNS), ",".join(_row("csv1")), ",".join(_row("csv2"))], H): "read",
        _text(here / "tabs.tsv", ["\t".join(COLUMNS), "\t".join(_row("tsv1"))], H): "read",
        _text(
            here / "lines.ndjson",
            [json.dumps(dict(zip(COLUMNS, _row(f"nd{i}"), strict=True))) for i in range(3)],
            H,
        ): "read",
        # A mapping that says csv reads .txt as CSV; the canonical mapping (no format) does not.
        _text(
            here / "source=rees46" / "export.TXT",
            [rees, f"{(H + timedelta(minutes=9)).strftime('%Y-%m-%d %H:%M:%S')} UTC,view,p1,c1,1.5,u9,s9"],
            H,
        ): "read",
        _text(here / "notes.txt", [",".join(COLUMNS), ",".join(_row("txt1"))], H): ingest.UNSUPPORTED_FORMAT,
        _parquet(here / "backup" / "stray.parquet", "stray1", H): ingest.UNKNOWN_FOLDER,
        _parquet(lake.partition(lk.LANDING, old) / "old.parquet", "old1", old): ingest.ARRIVED_TOO_LATE,
        _parquet(lake.path(lk.LANDING, "dt=2026-11-04", "hour=xx", "a.parquet"), "bad1", H): ingest.UNKNOWN_FOLDER,
        _text(lake.path(lk.LANDING, "misc", "README.md"), ["hello"], H): ingest.UNKNOWN_FOLDER,
    }
    return {str(p.relative_to(lake.root)): reason for p, reason in files.items()}


def test_file_format_is_case_insensitive_and_knows_ndjson_tsv_and_txt() -> None:
    canonical = sources.canonical_mapping()
    rees = sources.load_mapping("rees46")
    assert source_readers.file_format(canonical, Path("a.CSV")) == "csv"
    assert source_readers.file_format(canonical, Path("a.Csv.GZ")) == "csv"
    assert source_readers.file_format(canonical, Path("a.PARQUET")) == "parquet"
    assert source_readers.file_format(canonical, Path("a.NDJSON")) == "jsonl"
    assert source_readers.file_format(canonical, Path("a.tsv")) == "csv"
    assert source_readers.file_delimiter(canonical, Path("a.TSV.gz")) == "\t"
    assert source_readers.file_delimiter(canonical, Path("a.csv")) == ","
    assert source_readers.file_format(rees, Path("export.txt")) == "csv"
    with pytest.raises(sources.SourceError, match=r"notes\.txt"):
        source_readers.file_format(canonical, Path("notes.txt"))
    with pytest.raises(sources.SourceError, match=r"sheet\.xlsx"):
        source_readers.file_format(rees, Path("sheet.xlsx"))


def test_every_landing_file_is_read_or_named_with_its_reason(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrange: one file of each kind the listing used to pass over silently.
    settings = Settings(lake=settings.lake, buckets=2, lateness_hours=6, start=H, quarantine_threshold=1.0)
    lake = Lake(settings.lake)
    expected = _land_every_kind(lake)

    # Act
    with caplog.at_level(logging.WARNING, logger="profile_engine.ingest.events"):
        extracted = ingest.extract_events(settings, H)
    validated = ingest.validate_events(settings, H)
    document = report.build_report(H, {"extract_events": extracted, "validate_events": validated}, run_id="t")
    page = report.render_html(document)

    # Assert: read files are in the ledger and their rows are all counted.
    taken = {e.path for e in ingest.read_ledger(lake, H) or []}
    assert taken == {p for p, r in expected.items() if r == "read"}
    assert validated["read"] == 2 + 1 + 3 + 1
    assert validated["staged"] == validated["read"]
    # ... and every other file is named once, with its reason: ledger, summary, report, log.
    named = {e.path: e.reason for e in ingest.read_skipped(lake, H)}
    assert named == {p: r for p, r in expected.items() if r != "read"}
    assert {s["path"]: s["reason"] for s in extracted["skipped"]} == named
    assert {s["path"]: s["reason"] for s in document["headline"]["skipped_files"]} == named
    for path, reason in named.items():
        assert reason is not None
        assert path in page and reason in page
        assert any(path in r.getMessage() and reason in r.getMessage() for r in caplog.records), path
        assert all(r.levelno == logging.WARNING for r in caplog.records if path in r.getMessage())


def test_skipped_files_are_named_once_and_reruns_name_them_again(settings: Settings) -> None:
    # Arrange
    lake = Lake(settings.lake)
    settings = Settings(lake=settings.lake, buckets=2, lateness_hours=6, start=H)
    expected = _land_every_kind(lake)
    first = ingest.extract_events(settings, H)

    # Act: the next hour, a rerun of H, and a new file dropped into the old folder later.
    following = ingest.extract_events(settings, H + HOUR)
    rerun = ingest.extract_events(settings, H)
    old = H - timedelta(hours=6 + ingest.LISTING_MARGIN_HOURS + 5)
    newer = _parquet(lake.partition(lk.LANDING, old) / "resent.parquet", "old2", old)
    third = ingest.extract_events(settings, H + 2 * HOUR)

    # Assert
    assert following["skipped"] == [] and following["files"] == 0
    assert rerun["rerun"] and rerun["skipped"] == first["skipped"]
    assert [(s["path"], s["reason"]) for s in third["skipped"]] == [
        (str(newer.relative_to(lake.root)), ingest.ARRIVED_TOO_LATE)
    ]
    assert len(first["skipped"]) == sum(1 for r in expected.values() if r != "read")


def test_a_ledger_written_before_skipped_entries_is_still_read(settings: Settings) -> None:
    # Arrange: a ledger in the old format (no "skipped", no "reason").
    lake = Lake(settings.lake)
    path = _parquet(lake.partition(lk.LANDING, HOUR0) / "a.parquet", "e1", HOUR0)
    entry = {
        "path": str(path.relative_to(lake.root)),
        "size": path.stat().st_size,
        "sha256": lk.sha256_file(path),
        "rows": 1,
        "arrival_hour": "2026-11-02T10:00:00+00:00",
        "source": "canonical",
    }
    write_json(ingest.ledger_path(lake, HOUR0), {"hour": "x", "run_id": "old", "files": [entry], "changed": []})

    # Act
    rerun = ingest.extract_events(settings, HOUR0)
    following = ingest.extract_events(settings, HOUR0 + HOUR)

    # Assert
    assert rerun["files"] == 1 and rerun["skipped"] == []
    assert ingest.read_skipped(lake, HOUR0) == []
    assert following["files"] == 0 and following["skipped"] == []
    assert "reason" not in read_json(ingest.ledger_path(lake, HOUR0))["files"][0]
