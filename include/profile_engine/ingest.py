"""Extract and validate: landing files -> ingestion ledger -> staging and quarantine.

DESIGN.md §3. ``extract_events`` decides which landing files hour H takes (every
file that arrived by the end of H and is not in the ledger yet) and records them
in the ledger; a rerun of H re-reads exactly the ledger's files. ``validate_events``
reads those files, applies the row rules in DuckDB, stages valid events per user
bucket and quarantines the rest with their reasons, so that
``rows read = staged + quarantined + erased`` for every hour.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profile_engine import lake as lk
from profile_engine.config import Settings
from profile_engine.hours import HOUR, format_hour, hour_range, parse_hour
from profile_engine.lake import Lake, read_json, sha256_file, write_json
from profile_engine.schema import BUCKET, EVENT_COLUMNS, EVENT_TYPES, QUARANTINE_SCHEMA, STAGED_SCHEMA, bucket_sql

LEDGER_FILE = "ledger.json"
LANDING_SUFFIXES = (".parquet", ".csv", ".csv.gz", ".jsonl", ".jsonl.gz", ".json", ".json.gz")
# Events up to this far past the hour's end are staged and held back by the profile
# state (producer clock skew); later ones are quarantined as future_ts.
FUTURE_SKEW = timedelta(hours=1)
# Arrival partitions older than the lateness window plus this margin are not listed.
LISTING_MARGIN_HOURS = 24

# Quarantine reasons, named once.
MISSING_EVENT_ID = "missing_event_id"
MISSING_USER_ID = "missing_user_id"
MISSING_ITEM_ID = "missing_item_id"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
NEGATIVE_PRICE = "negative_price"
BAD_PRICE = "bad_price"
BAD_QUANTITY = "bad_quantity"
BAD_TS = "bad_ts"
FUTURE_TS = "future_ts"
TOO_LATE = "too_late"
DUPLICATE_EVENT_ID = "duplicate_event_id"
# Producer retries and late deliveries are routine: such rows are quarantined but do
# not count towards the quarantine threshold, which exists to catch broken sources.
BENIGN_REASONS = frozenset({DUPLICATE_EVENT_ID, TOO_LATE})
# Below this many rows an hour's defect share is noise (one bad row in a quiet night
# hour), so the threshold is only enforced from here on.
THRESHOLD_MIN_ROWS = 50


class LedgerError(RuntimeError):
    """A file the ledger gave an hour is gone or changed, so the hour cannot be reproduced."""


class QuarantineThresholdExceeded(RuntimeError):
    """More than the allowed share of an hour's rows went to quarantine (a policy failure)."""


@dataclass(frozen=True)
class LedgerEntry:
    """One landing file taken by one hour."""

    path: str  # relative to the lake root
    size: int
    sha256: str
    rows: int
    arrival_hour: str

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "rows": self.rows,
            "arrival_hour": self.arrival_hour,
        }


def ledger_path(lake: Lake, hour: datetime) -> Path:
    """Where the ledger records the files hour ``hour`` took."""
    return lake.partition(lk.LEDGER, hour) / LEDGER_FILE


def read_ledger(lake: Lake, hour: datetime) -> list[LedgerEntry] | None:
    """The ledger entries of ``hour``, or None when the hour has not been extracted."""
    path = ledger_path(lake, hour)
    if not path.is_file():
        return None
    return [LedgerEntry(**entry) for entry in read_json(path)["files"]]


def _arrival_hour(path: Path) -> datetime | None:
    """Arrival hour from a ``dt=YYYY-MM-DD/hour=HH`` path, None when the path says nothing."""
    parts = {p.split("=", 1)[0]: p.split("=", 1)[1] for p in path.parts if "=" in p}
    if "dt" in parts and "hour" in parts:
        return parse_hour(f"{parts['dt']}T{int(parts['hour']):02d}")
    return None


def _file_rows(path: Path) -> int:
    """Row count of a landing file (Parquet from metadata; text files counted by lines)."""
    if path.name.endswith(".parquet"):
        return int(pq.ParquetFile(path).metadata.num_rows)
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        lines = sum(1 for line in handle if line.strip())
    return lines - 1 if ".csv" in path.name else lines


def _list_landing(lake: Lake, hour: datetime, lookback_hours: int) -> list[tuple[Path, datetime]]:
    """Landing files that arrived by the end of ``hour``, in recent arrival partitions only."""
    found: list[tuple[Path, datetime]] = []
    for arrival in hour_range(hour - timedelta(hours=lookback_hours), hour):
        directory = lake.partition(lk.LANDING, arrival)
        if directory.is_dir():
            found += [(p, arrival) for p in sorted(directory.iterdir()) if p.name.endswith(LANDING_SUFFIXES)]
    # Files dropped directly under landing/events: their modification time decides.
    root = lake.path(lk.LANDING)
    if root.is_dir():
        end = (hour + HOUR).timestamp()
        start = (hour - timedelta(hours=lookback_hours)).timestamp()
        for p in sorted(root.iterdir()):
            if p.is_file() and p.name.endswith(LANDING_SUFFIXES) and start <= p.stat().st_mtime < end:
                found.append((p, datetime.fromtimestamp(p.stat().st_mtime, hour.tzinfo).replace(minute=0, second=0)))
    return found


def extract_events(settings: Settings, hour: datetime, *, run_id: str = "manual") -> dict[str, Any]:
    """Record in the ledger which landing files hour ``hour`` takes, and return a summary.

    A first run takes every file that arrived by the end of the hour and is in no
    earlier hour's ledger; a rerun keeps the ledger's list and checks that those
    files are unchanged (``LedgerError`` names the file otherwise). Files that changed
    after an earlier hour took them are reported, not re-read.
    """
    lake = Lake(settings.lake)
    existing = read_ledger(lake, hour)
    if existing is not None:
        for entry in existing:
            path = lake.path(entry.path)
            if not path.is_file():
                raise LedgerError(f"{path}: taken by hour {format_hour(hour)} but no longer in landing")
            if path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
                raise LedgerError(f"{path}: changed since hour {format_hour(hour)} ingested it")
        return _extract_summary(hour, existing, rerun=True, changed=[])

    lookback = settings.lateness_hours + LISTING_MARGIN_HOURS
    taken: dict[str, LedgerEntry] = {}
    for previous in hour_range(hour - timedelta(hours=lookback + 1), hour - HOUR):
        for entry in read_ledger(lake, previous) or []:
            taken[entry.path] = entry
    entries: list[LedgerEntry] = []
    changed: list[str] = []
    for path, arrival in _list_landing(lake, hour, lookback):
        relative = str(path.relative_to(lake.root))
        size = path.stat().st_size
        if relative in taken:
            old = taken[relative]
            if size != old.size or (size == old.size and sha256_file(path) != old.sha256):
                changed.append(relative)
            continue
        entries.append(
            LedgerEntry(
                relative, size, sha256_file(path), _file_rows(path), format_hour(_arrival_hour(path) or arrival)
            )
        )
    write_json(
        ledger_path(lake, hour),
        {"hour": format_hour(hour), "run_id": run_id, "files": [e.as_dict() for e in entries], "changed": changed},
    )
    return _extract_summary(hour, entries, rerun=False, changed=changed)


def _extract_summary(hour: datetime, entries: list[LedgerEntry], *, rerun: bool, changed: list[str]) -> dict[str, Any]:
    late = sum(1 for e in entries if parse_hour(e.arrival_hour) < hour)
    return {
        "hour": format_hour(hour),
        "files": len(entries),
        "rows": sum(e.rows for e in entries),
        "bytes": sum(e.size for e in entries),
        "late_files": late,
        "rerun": rerun,
        "changed_after_ingestion": changed,
    }


def _read_sql(path: Path, index: int) -> str:
    """DuckDB SELECT giving a landing file's canonical columns as text, with file and row number."""
    quoted = str(path).replace("'", "''")
    if path.name.endswith(".parquet"):
        source = f"read_parquet('{quoted}', file_row_number=true)"
        row = "file_row_number + 1"
    elif ".csv" in path.name:
        source = f"read_csv('{quoted}', all_varchar=true, header=true)"
        row = "row_number() OVER ()"
    else:
        source = f"read_json_objects('{quoted}', format='newline_delimited')"
        cols = ", ".join(f"json_extract_string(json, '$.{c}') AS {c}" for c in EVENT_COLUMNS)
        return f"SELECT {cols}, {index} AS source_index, row_number() OVER () AS source_row FROM {source}"  # noqa: S608
    return f"SELECT *, {index} AS source_index, {row} AS source_row FROM {source}"  # noqa: S608


def _load_raw(con: Any, files: list[Path]) -> None:
    """Create table ``raw``: every row of every file, canonical columns as VARCHAR."""
    selects = []
    for index, path in enumerate(files):
        rel = con.sql(_read_sql(path, index))
        present = set(rel.columns)
        cols = ", ".join(
            (f"CAST({c} AS VARCHAR) AS {c}" if c != "ts" else "CAST(ts AS VARCHAR) AS ts")
            if c in present
            else f"CAST(NULL AS VARCHAR) AS {c}"
            for c in EVENT_COLUMNS
        )
        selects.append(
            f"SELECT {cols}, source_index, CAST(source_row AS BIGINT) AS source_row FROM ({_read_sql(path, index)})"
        )
    if not selects:
        cols = ", ".join(f"CAST(NULL AS VARCHAR) AS {c}" for c in EVENT_COLUMNS)
        selects.append(f"SELECT {cols}, 0 AS source_index, CAST(0 AS BIGINT) AS source_row WHERE false")
    con.execute("CREATE TABLE raw AS " + " UNION ALL ".join(selects))


def validate_events(
    settings: Settings,
    hour: datetime,
    *,
    run_id: str = "manual",
    build_docs: bool = True,
    quality_suite: bool = True,
) -> dict[str, Any]:
    """Stage the valid events of hour ``hour`` per bucket, quarantine the rest, run the quality suite.

    ``quality_suite=False`` (bulk warm-ups) applies the row rules only and skips the
    Great Expectations suite and its Data Docs. Raises ``QuarantineThresholdExceeded`` after writing everything when the hour's
    quarantine share exceeds ``settings.quarantine_threshold``.
    """
    import duckdb

    lake = Lake(settings.lake)
    entries = read_ledger(lake, hour)
    if entries is None:
        raise FileNotFoundError(f"no ledger for hour {format_hour(hour)}: run extract_events first")
    files = [lake.path(e.path) for e in entries]
    end = hour + HOUR
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    _load_raw(con, files)
    staged_ids = _recent_staged_ids(lake, hour, settings)
    con.register("recent_ids", staged_ids)
    types = ", ".join(f"'{t}'" for t in EVENT_TYPES)
    con.execute(
        f"""
        CREATE TABLE checked AS
        WITH typed AS (
            SELECT *,
                TRY_CAST(price AS DOUBLE) AS price_v,
                COALESCE(TRY_CAST(quantity AS INTEGER), CASE WHEN quantity IS NULL OR quantity = '' THEN 1 END) AS quantity_v,
                TRY_CAST(ts AS TIMESTAMPTZ) AS ts_v,
                row_number() OVER (PARTITION BY event_id ORDER BY source_index, source_row) AS copy_no
            FROM raw
        )
        SELECT *, list_filter([
            CASE WHEN event_id IS NULL OR trim(event_id) = '' THEN '{MISSING_EVENT_ID}' END,
            CASE WHEN user_id IS NULL OR trim(user_id) = '' THEN '{MISSING_USER_ID}' END,
            CASE WHEN item_id IS NULL OR trim(item_id) = '' THEN '{MISSING_ITEM_ID}' END,
            CASE WHEN event_type IS NULL OR event_type NOT IN ({types}) THEN '{UNKNOWN_EVENT_TYPE}' END,
            CASE WHEN price IS NOT NULL AND price <> '' AND price_v IS NULL THEN '{BAD_PRICE}' END,
            CASE WHEN price_v < 0 THEN '{NEGATIVE_PRICE}' END,
            CASE WHEN quantity_v IS NULL OR quantity_v < 1 THEN '{BAD_QUANTITY}' END,
            CASE WHEN ts_v IS NULL THEN '{BAD_TS}' END,
            CASE WHEN ts_v >= $future THEN '{FUTURE_TS}' END,
            CASE WHEN ts_v < $too_late THEN '{TOO_LATE}' END,
            CASE WHEN copy_no > 1 OR event_id IN (SELECT event_id FROM recent_ids) THEN '{DUPLICATE_EVENT_ID}' END
        ], lambda r: r IS NOT NULL) AS reasons
        FROM typed
        """,
        {"future": end + FUTURE_SKEW, "too_late": hour - timedelta(hours=settings.lateness_hours)},
    )
    staged = con.sql(
        f"""
        SELECT event_id, user_id, event_type, item_id, NULLIF(category_id, '') AS category_id,
               price_v AS price, quantity_v AS quantity, NULLIF(order_id, '') AS order_id,
               ts_v AS ts, NULLIF(session_id, '') AS session_id, {bucket_sql("user_id", settings.buckets)} AS {BUCKET}
        FROM checked WHERE len(reasons) = 0
        ORDER BY {BUCKET}, user_id, ts, event_id
        """
    ).to_arrow_table()
    staged = staged.cast(STAGED_SCHEMA)
    quarantined = con.sql(
        f"""
        SELECT {", ".join(EVENT_COLUMNS)}, array_to_string(reasons, ',') AS reasons,
               $files[source_index + 1] AS source_file, source_row
        FROM checked WHERE len(reasons) > 0
        ORDER BY source_file, source_row
        """,
        params={"files": [e.path for e in entries] or [""]},
    ).to_arrow_table()
    quarantined = quarantined.cast(QUARANTINE_SCHEMA)
    reason_counts = dict(
        con.execute(
            "SELECT r, count(*) FROM (SELECT unnest(reasons) AS r FROM checked) GROUP BY r ORDER BY r"
        ).fetchall()
    )
    read_rows = con.execute("SELECT count(*) FROM raw").fetchall()[0][0]
    benign = ", ".join(f"'{r}'" for r in sorted(BENIGN_REASONS))
    defective = con.execute(
        f"SELECT count(*) FROM checked WHERE len(list_filter(reasons, lambda r: r NOT IN ({benign}))) > 0"
    ).fetchall()[0][0]
    con.close()

    per_bucket = []
    bucket_column = staged.column(BUCKET)
    for b in range(settings.buckets):
        part = staged.filter(pc.equal(bucket_column, b))
        lake.write_partition(lk.STAGING, hour, part, bucket=b, run_id=run_id)
        per_bucket.append(part.num_rows)
    lake.write_partition(lk.QUARANTINE, hour, quarantined, run_id=run_id, extra={"reasons": reason_counts})

    quality_summary: dict[str, Any] = {"status": "skipped", "reason": "bulk run: row rules only"}
    if quality_suite:
        from profile_engine import quality

        quality_summary = quality.run_quality(
            settings,
            hour,
            staged,
            quarantined_rows=quarantined.num_rows,
            read_rows=read_rows,
            run_id=run_id,
            build_docs=build_docs,
            defective_rows=defective,
        )
    summary = {
        "hour": format_hour(hour),
        "read": read_rows,
        "staged": staged.num_rows,
        "quarantined": quarantined.num_rows,
        "erased": 0,
        "reasons": reason_counts,
        "staged_per_bucket": per_bucket,
        "defective": defective,
        "held_back": int(
            pc.sum(pc.greater_equal(staged.column("ts"), pa.scalar(end, pa.timestamp("ms", "UTC")))).as_py() or 0
        ),
        "quality": quality_summary,
    }
    if summary["read"] != summary["staged"] + summary["quarantined"] + summary["erased"]:
        raise AssertionError(f"hour {format_hour(hour)}: counts do not add up: {summary}")
    if read_rows >= THRESHOLD_MIN_ROWS and defective / read_rows > settings.quarantine_threshold:
        raise QuarantineThresholdExceeded(
            f"hour {format_hour(hour)}: {defective} of {read_rows} rows quarantined as defective "
            f"({defective / read_rows:.1%} > threshold {settings.quarantine_threshold:.1%}); "
            f"reasons: {reason_counts}"
        )
    return summary


def _recent_staged_ids(lake: Lake, hour: datetime, settings: Settings) -> pa.Table:
    """Event ids staged in the lateness window before ``hour`` (producer re-sends are duplicates)."""
    files: list[Path] = []
    for previous in hour_range(hour - timedelta(hours=settings.lateness_hours), hour - HOUR):
        try:
            files += lake.data_files(lk.STAGING, previous)
        except FileNotFoundError:
            continue
    if not files:
        return pa.table({"event_id": pa.array([], pa.string())})
    return pa.concat_tables(pq.read_table(f, columns=["event_id"]) for f in files)
