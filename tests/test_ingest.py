"""Extraction through the ledger, and validation into staging and quarantine."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from profile_engine.config import MAX_BUCKETS, Settings
from profile_engine.contracts.events import EVENT_SCHEMA, STAGED_SCHEMA, bucket_sql
from profile_engine.hours import HOUR
from profile_engine.ingest import events as ingest
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake, read_json
from profile_engine.sources import mappings as sources
from profile_engine.sources import sql as source_sql
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

    summary = ingest.validate_events(settings, HOUR0)

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
    assert summary["held_back"] == 1  # ok3, at 11:02
    assert summary["staged_per_bucket"] == [lake.read(lk.STAGING, HOUR0, b).num_rows for b in range(settings.buckets)]


def test_validate_events_runs_without_pandas(settings: Settings) -> None:
    """The task imports no pandas (issue 19: pyarrow's ``to_numpy`` and ``pa.scalar`` imported it, 0.2-0.3 CPU s of
    the task); run in a process of its own, as the DAG runs it."""
    lake = Lake(settings.lake)
    land(lake, HOUR0, "a.parquet", [event("e1"), event("e2", user="u2"), event("e3", user="u3", quantity=0)])
    ingest.extract_events(settings, HOUR0)
    script = (
        "import sys; from datetime import datetime; from pathlib import Path; from profile_engine.config import Settings; "
        "from profile_engine.ingest import events; "
        f"s = Settings(lake=Path({str(settings.lake)!r}), buckets={settings.buckets}, lateness_hours=6, "
        f"start=datetime.fromisoformat({HOUR0.isoformat()!r})); "
        f"r = events.validate_events(s, datetime.fromisoformat({HOUR0.isoformat()!r})); "
        "print(r['staged'], r['held_back'], 'pandas' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["2", "0", "False"]


def test_producer_resend_in_a_later_hour_is_a_duplicate(settings: Settings) -> None:
    lake = Lake(settings.lake)
    land(lake, HOUR0, "a.parquet", [event("e1")])
    land(lake, HOUR0 + HOUR, "a-resent.parquet", [event("e1")])
    for hour in (HOUR0, HOUR0 + HOUR):
        ingest.extract_events(settings, hour)

    first = ingest.validate_events(settings, HOUR0)
    second = ingest.validate_events(settings, HOUR0 + HOUR)

    assert (first["staged"], second["staged"], second["reasons"]) == (1, 0, {"duplicate": 1})


def python_bucket(user_id: str, buckets: int) -> int:
    """DuckDB's ``md5_number(user_id) % buckets``: the MD5 digest read as a little-endian 128-bit number."""
    return int.from_bytes(hashlib.md5(user_id.encode()).digest(), "little") % buckets


ID_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)


@pytest.mark.timeout(120)
@hyp_settings(max_examples=40, deadline=None)
@given(
    texts=st.lists(ID_TEXT, min_size=1, max_size=30), buckets=st.one_of(st.integers(1, 64), st.integers(1, MAX_BUCKETS))
)
def test_bucket_sql_is_md5_number_modulo_buckets(texts: list[str], buckets: int) -> None:
    import duckdb

    con = duckdb.connect()

    rows = con.execute(
        f"SELECT {bucket_sql('x', buckets)}, CAST(md5_number(x) % {buckets} AS INTEGER) FROM unnest($xs) AS t(x)",
        {"xs": texts},
    ).fetchall()

    expected = [python_bucket(t, buckets) for t in texts]
    assert [fast for fast, _ in rows] == [plain for _, plain in rows] == expected


def test_bucket_sql_refuses_bucket_counts_out_of_range() -> None:
    with pytest.raises(ValueError, match="modulus must be in"):
        bucket_sql("user_id", 0)


# One landed row: (event id from a small pool, so ids repeat; user; minute; negative price?).
ROW = st.tuples(
    st.sampled_from(["a", "b", "c", "d", "e"]), st.sampled_from(["u1", "u2", "u3"]), st.integers(0, 59), st.booleans()
)


@pytest.mark.timeout(300)
@hyp_settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    earlier=st.sets(st.sampled_from(["a", "b", "c", "d", "e", "f"]), max_size=3),
    files=st.lists(st.lists(ROW, max_size=6), min_size=1, max_size=3),
)
def test_staged_rows_are_first_copies_in_bucket_user_time_order(
    tmp_path_factory: pytest.TempPathFactory, earlier: set[str], files: list[list[tuple[str, str, int, bool]]]
) -> None:
    # Arrange: ids staged an hour before, then this hour's files (read in name order, rows in file order).
    root = tmp_path_factory.mktemp("order") / "lake"
    settings = Settings(lake=root, buckets=3, lateness_hours=6, start=HOUR0 - HOUR, quarantine_threshold=1.0)
    lake = Lake(root)
    land(lake, HOUR0 - HOUR, "prev.parquet", [event(i, ts=HOUR0 - HOUR) for i in sorted(earlier)])
    for n, rows in enumerate(files):
        land(
            lake,
            HOUR0,
            f"f{n}.parquet",
            [
                event(i, user=u, ts=HOUR0 + timedelta(minutes=m - 5), price=-1.0 if neg else 5.0)
                for i, u, m, neg in rows
            ],
        )
    for hour in (HOUR0 - HOUR, HOUR0):
        ingest.extract_events(settings, hour)
    ingest.validate_events(settings, HOUR0 - HOUR)

    # Act
    summary = ingest.validate_events(settings, HOUR0)

    # Assert: a row is a duplicate when its id was staged before or an earlier row of the hour has it.
    seen: set[str] = set(earlier)
    expected_staged, expected_reasons = [], []
    for n, rows in enumerate(files):
        for r, (i, u, m, neg) in enumerate(rows, start=1):
            reasons = (["negative_price"] if neg else []) + (["duplicate"] if i in seen else [])
            seen.add(i)
            if reasons:
                expected_reasons.append((f"f{n}.parquet", r, ",".join(reasons)))
            else:
                expected_staged.append((python_bucket(u, 3), u, m, i))
    staged = lake.read(lk.STAGING, HOUR0)
    got = [
        (row["bucket"], row["user_id"], int((row["ts"] - HOUR0).total_seconds() // 60), row["event_id"])
        for row in staged.to_pylist()
    ]
    assert got == sorted(expected_staged)  # bucket, user, time, id: the staged order
    assert summary["staged_per_bucket"] == [sum(1 for row in got if row[0] == b) for b in range(3)]
    quarantined = lake.read(lk.QUARANTINE, HOUR0).to_pylist()
    assert [(Path(q["source_file"]).name, q["source_row"], q["reasons"]) for q in quarantined] == expected_reasons


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

    summary = ingest.validate_events(settings, HOUR0)

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
        ingest.validate_events(settings, HOUR0)
    assert lake.committed(lk.QUARANTINE, HOUR0)


def test_quiet_hours_and_routine_reasons_do_not_trip_the_threshold(settings: Settings) -> None:
    lake = Lake(settings.lake)
    late = HOUR0 - timedelta(hours=settings.lateness_hours + 2)
    rows = [event("bad", user="")] + [event(f"late{i}", ts=late) for i in range(60)] + [event("ok")]
    land(lake, HOUR0, "a.parquet", rows)
    ingest.extract_events(settings, HOUR0)

    summary = ingest.validate_events(settings, HOUR0)

    assert (summary["read"], summary["quarantined"], summary["defective"]) == (62, 61, 1)


# ---- table sources: a real SQLite database file through a Connection -------------------

SHOP_MAPPING = """
name: shop
description: a shop's event table, read by its auto-increment id
sql:
  table: shop_events
  cursor: {cursor}
  cursor_type: {cursor_type}
  conn_id: shop_db
fields:
  event_id: event_uuid
  user_id: customer
  event_type: action
  item_id: sku
  price: amount
  ts: happened_at
event_types:
  page_view: view
  basket_add: cart
  order: purchase
timestamp:
  format: iso
  timezone: UTC
"""
BIG_ID = 1234567890123456789  # 19 digits: must survive as text, never through float


def shop_db(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE shop_events (id INTEGER PRIMARY KEY, ingested_at TIMESTAMP, event_uuid TEXT, "
        "customer BIGINT, action TEXT, sku TEXT, amount REAL, happened_at TEXT)"
    )
    return con


def insert(con: sqlite3.Connection, *rows: tuple[str, str, int, str, str, float | None, str]) -> None:
    con.executemany(
        "INSERT INTO shop_events (ingested_at, event_uuid, customer, action, sku, amount, happened_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    con.commit()


@pytest.fixture
def shop(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, sqlite3.Connection]:
    """Settings reading table source ``shop`` (cursor ``id``) from a SQLite file via AIRFLOW_CONN_SHOP_DB."""
    database = tmp_path / "shop.db"
    con = shop_db(database)
    monkeypatch.setenv("AIRFLOW_CONN_SHOP_DB", f"sqlite:///{database}")
    mapping = Lake(settings.lake).path(sources.LAKE_SOURCES_DIR, "shop.yaml")
    mapping.parent.mkdir(parents=True, exist_ok=True)
    mapping.write_text(SHOP_MAPPING.format(cursor="id", cursor_type="id"))
    return replace(settings, sql_sources=("shop",)), con


def at(hour: datetime, minutes: int) -> str:
    return (hour + timedelta(minutes=minutes)).strftime("%Y-%m-%d %H:%M:%S")


def test_table_source_takes_rows_after_the_high_water_mark(shop: tuple[Settings, sqlite3.Connection]) -> None:
    # Arrange
    settings, con = shop
    insert(
        con,
        (at(HOUR0, 1), "e1", BIG_ID, "page_view", "i1", 9.5, at(HOUR0, 1)),
        (at(HOUR0, 2), "e2", 7, "Basket_Add", "i2", None, at(HOUR0, 2)),
        (at(HOUR0, 3), "e3", 7, "wishlist", "i3", 1.0, at(HOUR0, 3)),  # unknown event type
    )

    # Act
    first = ingest.extract_events(settings, HOUR0)
    summary = ingest.validate_events(settings, HOUR0)
    insert(con, (at(HOUR0, 70), "e4", 8, "order", "i1", 20.0, at(HOUR0, 65)))
    second = ingest.extract_events(settings, HOUR0 + HOUR)
    summary2 = ingest.validate_events(settings, HOUR0 + HOUR)

    # Assert
    lake = Lake(settings.lake)
    (entry,) = ingest.read_ledger(lake, HOUR0) or []
    assert (entry.path, entry.lower, entry.upper, entry.rows) == ("sql://shop/shop_events", None, 3, 3)
    (entry2,) = ingest.read_ledger(lake, HOUR0 + HOUR) or []
    assert (entry2.lower, entry2.upper, entry2.rows) == (3, 4, 1)
    assert first["sources"] == ["shop"] and second["rows"] == 1
    assert (summary["read"], summary["staged"], summary["quarantined"]) == (3, 2, 1)
    assert summary["reasons"] == {"unknown_event_type": 1}
    assert summary["sources"]["shop"]["read"] == 3
    staged = lake.read(lk.STAGING, HOUR0)
    assert sorted(staged.column("user_id").to_pylist()) == [str(BIG_ID), "7"]
    assert sorted(staged.column("event_type").to_pylist()) == ["cart", "view"]
    quarantined = lake.read(lk.QUARANTINE, HOUR0).to_pylist()
    assert [(q["event_id"], q["source_file"], q["event_type"]) for q in quarantined] == [
        ("e3", "sql://shop/shop_events", "wishlist")
    ]
    assert (summary2["read"], summary2["staged"]) == (1, 1)
    assert read_json(ingest.watermark_path(lake, "shop"))["upper"] == 4


def test_rerun_of_a_table_hour_reads_exactly_its_range(shop: tuple[Settings, sqlite3.Connection]) -> None:
    # Arrange
    settings, con = shop
    insert(con, (at(HOUR0, 1), "e1", 1, "page_view", "i1", 1.0, at(HOUR0, 1)))
    ingest.extract_events(settings, HOUR0)
    first = ingest.validate_events(settings, HOUR0)
    insert(con, (at(HOUR0, 2), "e2", 2, "page_view", "i1", 1.0, at(HOUR0, 2)))

    # Act
    rerun = ingest.extract_events(settings, HOUR0)
    again = ingest.validate_events(settings, HOUR0)

    # Assert: the new row waits for the next hour instead of joining the rerun
    assert rerun["rerun"] and rerun["rows"] == 1
    assert (again["read"], again["staged"]) == (first["read"], first["staged"]) == (1, 1)
    assert Lake(settings.lake).read(lk.STAGING, HOUR0).column("event_id").to_pylist() == ["e1"]
    assert ingest.extract_events(settings, HOUR0 + HOUR)["rows"] == 1


def test_rerun_fails_when_rows_of_a_taken_range_changed(shop: tuple[Settings, sqlite3.Connection]) -> None:
    # Arrange
    settings, con = shop
    insert(con, (at(HOUR0, 1), "e1", 1, "page_view", "i1", 1.0, at(HOUR0, 1)))
    ingest.extract_events(settings, HOUR0)
    con.execute("UPDATE shop_events SET amount = 2.0 WHERE id = 1")
    con.commit()

    # Act / Assert
    with pytest.raises(ingest.LedgerError, match=r"sql://shop/shop_events.*changed since hour"):
        ingest.validate_events(settings, HOUR0)


def test_time_cursor_takes_only_rows_ingested_before_the_hour_end(
    shop: tuple[Settings, sqlite3.Connection],
) -> None:
    # Arrange
    settings, con = shop
    mapping = Lake(settings.lake).path(sources.LAKE_SOURCES_DIR, "shop.yaml")
    mapping.write_text(SHOP_MAPPING.format(cursor="ingested_at", cursor_type="time"))
    insert(
        con,
        (at(HOUR0, 10), "e1", 1, "page_view", "i1", 1.0, at(HOUR0, 9)),
        (at(HOUR0, 59), "e2", 1, "page_view", "i1", 1.0, at(HOUR0, 58)),
        (at(HOUR0, 61), "e3", 1, "page_view", "i1", 1.0, at(HOUR0, 60)),
    )

    # Act
    first = ingest.extract_events(settings, HOUR0)
    second = ingest.extract_events(settings, HOUR0 + HOUR)

    # Assert
    lake = Lake(settings.lake)
    (entry,) = ingest.read_ledger(lake, HOUR0) or []
    mark = {"datetime": "2026-11-02T10:59:00"}  # a DATETIME column: the bound keeps its type
    assert first["rows"] == 2 and entry.upper == mark
    (entry2,) = ingest.read_ledger(lake, HOUR0 + HOUR) or []
    assert second["rows"] == 1 and (entry2.lower, entry2.upper) == (mark, {"datetime": "2026-11-02T11:01:00"})


def test_table_source_missing_column_fails_naming_table(shop: tuple[Settings, sqlite3.Connection]) -> None:
    # Arrange
    settings, con = shop
    con.execute("ALTER TABLE shop_events RENAME COLUMN sku TO product")
    con.commit()

    # Act / Assert
    with pytest.raises(sources.SourceError, match=r"sql://shop/shop_events: missing required column\(s\) sku"):
        ingest.extract_events(settings, HOUR0)


def test_out_of_order_table_hour_is_refused(shop: tuple[Settings, sqlite3.Connection]) -> None:
    # Arrange
    settings, _ = shop
    ingest.extract_events(settings, HOUR0 + HOUR)

    # Act / Assert
    with pytest.raises(ingest.LedgerError, match="hours run in order"):
        ingest.extract_events(settings, HOUR0)


def test_connection_url_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange
    database = tmp_path / "x.db"
    monkeypatch.setenv("AIRFLOW_CONN_AS_URL", f"sqlite:///{database}")
    monkeypatch.setenv("AIRFLOW_CONN_AS_JSON", json.dumps({"conn_type": "sqlite", "host": str(database)}))
    monkeypatch.delenv("AIRFLOW_CONN_NOT_THERE", raising=False)

    # Act / Assert
    assert source_sql.connection_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert source_sql.connection_url("as_url") == f"sqlite:///{database}"
    assert source_sql.connection_url("as_json") == f"sqlite:///{database}"
    with pytest.raises(sources.SourceError, match="'not_there' is not defined"):
        source_sql.connection_url("not_there")


def test_sql_mapping_block_is_validated() -> None:
    # Arrange
    document = yaml.safe_load(SHOP_MAPPING.format(cursor="id", cursor_type="sometimes"))

    # Act / Assert
    with pytest.raises(sources.MappingError, match="sql.cursor_type: must be id or time"):
        sources.parse_mapping(document)
    document["sql"] = {"table": "t"}
    with pytest.raises(sources.MappingError, match="sql.cursor: must name a column"):
        sources.parse_mapping(document)


def test_sql_sources_setting_from_env() -> None:
    settings = Settings.from_env({"PROFILE_ENGINE_SQL_SOURCES": "shop, crm", "PROFILE_ENGINE_SQL_CONN_ID": "db"})
    assert (settings.sql_sources, settings.sql_conn_id) == (("shop", "crm"), "db")


def test_table_source_feeds_the_hour_runner_to_a_published_snapshot(
    shop: tuple[Settings, sqlite3.Connection],
) -> None:
    # Arrange: a time cursor, so each hour takes what was ingested during it
    from profile_engine.ops import runner

    settings, con = shop
    Lake(settings.lake).path(sources.LAKE_SOURCES_DIR, "shop.yaml").write_text(
        SHOP_MAPPING.format(cursor="ingested_at", cursor_type="time")
    )
    insert(
        con,
        (at(HOUR0, 5), "e1", BIG_ID, "page_view", "i1", 5.0, at(HOUR0, 4)),
        (at(HOUR0, 6), "e2", BIG_ID, "order", "i1", 5.0, at(HOUR0, 5)),
        (at(HOUR0, 65), "e3", 42, "basket_add", "i2", 3.0, at(HOUR0, 64)),
        (at(HOUR0, 66), "e4", 42, "teleport", "i2", 3.0, at(HOUR0, 65)),
    )

    # Act
    summary = runner.warm_up(settings, HOUR0, HOUR0 + HOUR, snapshot_every=1)

    # Assert
    assert (summary["read"], summary["staged"], summary["quarantined"]) == (4, 3, 1)
    profiles = Lake(settings.lake).read(lk.PROFILES, HOUR0 + HOUR)
    assert sorted(profiles.column("user_id").to_pylist()) == [str(BIG_ID), "42"]
    assert Lake(settings.lake).committed(lk.PROFILES, HOUR0 + HOUR)


@hyp_settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=4))
def test_table_ranges_take_every_row_exactly_once(
    shop: tuple[Settings, sqlite3.Connection], batches: list[int]
) -> None:
    # Arrange: a fresh lake and table per example; ``batches[h]`` rows arrive before hour h is extracted
    base, con = shop
    con.execute("DELETE FROM shop_events")
    con.commit()
    with tempfile.TemporaryDirectory() as tmp:
        settings = replace(base, lake=Path(tmp) / "lake")
        mapping = Lake(settings.lake).path(sources.LAKE_SOURCES_DIR, "shop.yaml")
        mapping.parent.mkdir(parents=True)
        mapping.write_text(SHOP_MAPPING.format(cursor="id", cursor_type="id"))
        taken: list[int] = []

        # Act
        for h, n in enumerate(batches):
            hour = HOUR0 + h * HOUR
            insert(con, *[(at(hour, 1), f"e{h}-{i}", i, "page_view", "i", 1.0, at(hour, 1)) for i in range(n)])
            ingest.extract_events(settings, hour)
            (entry,) = ingest.read_ledger(Lake(settings.lake), hour) or []
            low, high = entry.lower or 0, entry.upper or 0
            taken += range(low + 1, high + 1)
            assert entry.rows == high - low

    # Assert
    all_ids = [row[0] for row in con.execute("SELECT id FROM shop_events ORDER BY id")]
    assert taken == all_ids


# ---- table sources over a catch-up and a late run (each row once, in its hour) ----------

CURSORS = {"id": ("id", "id"), "time": ("ingested_at", "time")}


def use_cursor(settings: Settings, kind: str) -> None:
    cursor, cursor_type = CURSORS[kind]
    Lake(settings.lake).path(sources.LAKE_SOURCES_DIR, "shop.yaml").write_text(
        SHOP_MAPPING.format(cursor=cursor, cursor_type=cursor_type)
    )


def staged_hours(settings: Settings, first: datetime, last: datetime) -> dict[str, list[datetime]]:
    """Event id -> the processing hours that staged it."""
    lake = Lake(settings.lake)
    found: dict[str, list[datetime]] = {}
    hour = first
    while hour <= last:
        for event_id in lake.read(lk.STAGING, hour).column("event_id").to_pylist():
            found.setdefault(event_id, []).append(hour)
        hour += HOUR
    return found


def three_hours_of_rows(con: sqlite3.Connection) -> None:
    """Two rows in each of hours 10, 11 and 12, committed as they happen."""
    insert(
        con,
        *[
            (at(HOUR0 + h * HOUR, m), f"h{h}-{m}", 100 + h, "page_view", "i", 1.0, at(HOUR0 + h * HOUR, m))
            for h in range(3)
            for m in (10, 40)
        ],
    )


@pytest.mark.parametrize("kind", sorted(CURSORS))
def test_table_catch_up_stages_every_row_once_in_its_hour(shop: tuple[Settings, sqlite3.Connection], kind: str) -> None:
    # Arrange: the table already holds hours 10..12 when the catch-up starts
    settings, con = shop
    use_cursor(settings, kind)
    three_hours_of_rows(con)

    # Act
    summaries = [ingest_table_hour(settings, HOUR0 + h * HOUR) for h in range(3)]

    # Assert
    assert [s["staged"] for s in summaries] == [2, 2, 2]
    assert all(s["quarantined"] == 0 and "future_ts" not in s["reasons"] for s in summaries)
    found = staged_hours(settings, HOUR0, HOUR0 + 2 * HOUR)
    assert found == {f"h{h}-{m}": [HOUR0 + h * HOUR] for h in range(3) for m in (10, 40)}


@pytest.mark.parametrize("kind", sorted(CURSORS))
def test_table_run_started_hours_late_takes_only_its_hour(shop: tuple[Settings, sqlite3.Connection], kind: str) -> None:
    # Arrange: hour 10 runs at 12:50, hour 11 at 13:30 (rows of 13:xx exist by then)
    settings, con = shop
    use_cursor(settings, kind)
    three_hours_of_rows(con)

    # Act
    first = ingest_table_hour(settings, HOUR0)
    insert(con, (at(HOUR0, 190), "h3-10", 103, "page_view", "i", 1.0, at(HOUR0, 190)))
    second = ingest_table_hour(settings, HOUR0 + HOUR)
    third = ingest_table_hour(settings, HOUR0 + 2 * HOUR)
    fourth = ingest_table_hour(settings, HOUR0 + 3 * HOUR)

    # Assert
    assert [s["staged"] for s in (first, second, third, fourth)] == [2, 2, 2, 1]
    assert all(s["quarantined"] == 0 for s in (first, second, third, fourth))
    found = staged_hours(settings, HOUR0, HOUR0 + 3 * HOUR)
    assert found["h3-10"] == [HOUR0 + 3 * HOUR]
    assert all(len(hours) == 1 and hours[0] == HOUR0 + int(key[1]) * HOUR for key, hours in found.items())


def test_id_cursor_row_committed_late_is_taken_once_by_the_hour_its_id_comes_up(
    shop: tuple[Settings, sqlite3.Connection],
) -> None:
    # Arrange: an event of 10:50 is committed after rows of 11:xx (an old ts, a new id)
    settings, con = shop
    insert(
        con,
        (at(HOUR0, 10), "a", 1, "page_view", "i", 1.0, at(HOUR0, 10)),
        (at(HOUR0, 70), "b", 1, "page_view", "i", 1.0, at(HOUR0, 70)),
        (at(HOUR0, 75), "late", 1, "page_view", "i", 1.0, at(HOUR0, 50)),
        (at(HOUR0, 80), "c", 1, "page_view", "i", 1.0, at(HOUR0, 80)),
    )

    # Act: a catch-up of hours 10 and 11
    summaries = [ingest_table_hour(settings, HOUR0 + h * HOUR) for h in range(2)]

    # Assert: hour 10 stops before the first row of 11:xx; the late row joins hour 11, staged
    assert [s["staged"] for s in summaries] == [1, 3]
    assert all(s["quarantined"] == 0 for s in summaries)
    assert staged_hours(settings, HOUR0, HOUR0 + HOUR) == {
        "a": [HOUR0],
        "b": [HOUR0 + HOUR],
        "late": [HOUR0 + HOUR],
        "c": [HOUR0 + HOUR],
    }
    entries = [(ingest.read_ledger(Lake(settings.lake), HOUR0 + h * HOUR) or [])[0] for h in range(2)]
    assert [(e.lower, e.upper) for e in entries] == [(None, 1), (1, 4)]


def test_id_cursor_row_with_an_impossible_future_ts_does_not_stall_the_source(
    shop: tuple[Settings, sqlite3.Connection],
) -> None:
    # Arrange: a row dated 2099 (after the moment of reading) between two rows of hour 10
    settings, con = shop
    insert(
        con,
        (at(HOUR0, 10), "a", 1, "page_view", "i", 1.0, at(HOUR0, 10)),
        (at(HOUR0, 11), "bogus", 1, "page_view", "i", 1.0, "2099-01-01 00:00:00"),
        (at(HOUR0, 12), "b", 1, "page_view", "i", 1.0, at(HOUR0, 12)),
        (at(HOUR0, 70), "c", 1, "page_view", "i", 1.0, at(HOUR0, 70)),
    )

    # Act
    summary = ingest_table_hour(settings, HOUR0)

    # Assert: the bogus row is quarantined as future_ts and the range goes on to row 3
    assert (summary["staged"], summary["reasons"]) == (2, {"future_ts": 1})
    assert ingest_table_hour(settings, HOUR0 + HOUR)["staged"] == 1


def test_table_rerun_after_a_catch_up_reads_the_same_range(shop: tuple[Settings, sqlite3.Connection]) -> None:
    # Arrange
    settings, con = shop
    three_hours_of_rows(con)
    first = ingest_table_hour(settings, HOUR0)

    # Act
    rerun = ingest_table_hour(settings, HOUR0)

    # Assert
    assert rerun["staged"] == first["staged"] == 2
    assert ingest_table_hour(settings, HOUR0 + HOUR)["staged"] == 2


def ingest_table_hour(settings: Settings, hour: datetime) -> dict[str, Any]:
    """Extract and validate ``hour``, read a day after it (the tests do not depend on the clock)."""
    ingest.extract_events(settings, hour, now=hour + timedelta(days=1))
    return ingest.validate_events(settings, hour)


def test_bucket_counts_beyond_a_duckdb_integer_are_refused_by_name(tmp_path: Path) -> None:
    """A bucket is a DuckDB INTEGER: a count it cannot hold fails at settings, naming the variable."""
    with pytest.raises(ValueError, match="PROFILE_ENGINE_BUCKETS must be between 1 and"):
        Settings(lake=tmp_path, buckets=MAX_BUCKETS + 1).check()


@given(
    read=st.integers(min_value=0, max_value=10**7),
    fraction=st.floats(min_value=0, max_value=1),
    threshold=st.floats(min_value=0, max_value=1),
    min_rows=st.integers(min_value=0, max_value=10**4),
)
def test_threshold_verdict_is_bounded_monotone_and_needs_the_minimum_rows(
    read: int, fraction: float, threshold: float, min_rows: int
) -> None:
    defective = int(read * fraction)

    share, exceeded = ingest.threshold_verdict(defective, read, threshold, min_rows)

    assert 0.0 <= share <= 1.0
    assert share == ingest.defective_share(defective, read)
    assert exceeded == (share > threshold and read >= min_rows)
    if defective < read:
        # One more defective row never brings an hour back under the threshold.
        more_share, more_exceeded = ingest.threshold_verdict(defective + 1, read, threshold, min_rows)
        assert more_share >= share
        assert more_exceeded or not exceeded


@pytest.mark.parametrize(("defective", "read"), [(-1, 5), (6, 5), (0, -1)])
def test_threshold_verdict_rejects_impossible_counts(defective: int, read: int) -> None:
    with pytest.raises(ValueError, match="row counts|exceed"):
        ingest.threshold_verdict(defective, read, 0.2, 0)
