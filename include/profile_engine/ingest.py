"""Extract and validate: landing files -> ingestion ledger -> staging and quarantine.

DESIGN.md §3. ``extract_events`` decides which landing files hour H takes (every
file that arrived by the end of H and is not in the ledger yet) and records them
in the ledger with the source whose mapping reads them; a rerun of H re-reads
exactly the ledger's files. ``validate_events`` reads those files through their
mappings (``sources``), applies the row rules in DuckDB, stages valid events per
user bucket and quarantines the rest with their original values and every reason,
so that ``rows read = staged + quarantined + erased`` for every hour and source.

Landing layout: ``landing/events/dt=/hour=/<file>`` holds canonical files;
``landing/events/dt=/hour=/source=<name>/<file>`` files of a mapped source. Files
directly under ``landing/events`` are canonical and placed by modification time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profile_engine import erasure, faults, sources
from profile_engine import lake as lk
from profile_engine.config import Settings
from profile_engine.hours import HOUR, format_hour, hour_range, parse_hour
from profile_engine.lake import Lake, read_json, sha256_file, write_json
from profile_engine.schema import (
    BUCKET,
    EVENT_COLUMNS,
    EVENT_TYPES,
    LOCAL_HOUR,
    QUARANTINE_SCHEMA,
    REFUND,
    STAGED_SCHEMA,
    bucket_sql,
)

LEDGER_FILE = "ledger.json"
# High-water marks of table sources: the newest ledger range per source, so the next
# hour starts where the last one stopped without reading the whole ledger history.
WATERMARKS = "watermarks"
SQL_PREFIX = "sql://"
LANDING_SUFFIXES = (".parquet", ".csv", ".csv.gz", ".jsonl", ".jsonl.gz", ".json", ".json.gz")
# Arrival partitions older than the lateness window plus this margin are not listed.
LISTING_MARGIN_HOURS = 24
# Longer ids are not ids (a broken producer, an injection attempt): quarantined.
MAX_ID_LENGTH = 256

# Quarantine reasons, named once (the reading ones live in ``sources``).
MALFORMED_ROW = sources.MALFORMED_ROW
BAD_TS = sources.BAD_TS
TS_WITHOUT_ZONE = sources.TS_WITHOUT_ZONE
MISSING_EVENT_ID = "missing_event_id"
MISSING_USER_ID = "missing_user_id"
MISSING_ITEM_ID = "missing_item_id"
ID_TOO_LONG = "id_too_long"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
NEGATIVE_PRICE = "negative_price"
BAD_PRICE = "bad_price"
BAD_QUANTITY = "bad_quantity"
NEGATIVE_QUANTITY = "negative_quantity"
FUTURE_TS = "future_ts"
TOO_LATE = "too_late"
DUPLICATE = "duplicate"
# Producer re-sends and late deliveries are routine: such rows are quarantined but do
# not count towards the quarantine threshold, which exists to catch broken sources.
BENIGN_REASONS = frozenset({DUPLICATE, TOO_LATE})

# Quarantined rows: the canonical columns as the source wrote them, the reasons, where
# the row came from, and the raw text of a line that could not be parsed at all.
SOURCE_LINE = "source_line"
QUARANTINE_ROW_SCHEMA = QUARANTINE_SCHEMA.append(pa.field(SOURCE_LINE, pa.string()))


class LedgerError(RuntimeError):
    """A file the ledger gave an hour is gone or changed, so the hour cannot be reproduced."""


class QuarantineThresholdExceeded(RuntimeError):
    """More than the allowed share of an hour's rows went to quarantine (a policy failure).

    Raised after staging and quarantine (and, with ``quality_suite``, the quality
    results) are written; ``summary`` is the hour's summary, so the run report still has it.
    """

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass(frozen=True)
class LedgerEntry:
    """One landing file taken by one hour."""

    path: str  # relative to the lake root
    size: int
    sha256: str
    rows: int
    arrival_hour: str
    source: str = sources.CANONICAL
    # A table source (path ``sql://<source>/<table>``): the cursor range the hour took,
    # ``lower < cursor <= upper`` (JSON values; ``sha256`` is over the rows' text).
    lower: Any = None
    upper: Any = None

    def is_sql(self) -> bool:
        """Whether the entry is a range of a table source rather than a landing file."""
        return self.path.startswith(SQL_PREFIX)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        entry = {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "rows": self.rows,
            "arrival_hour": self.arrival_hour,
            "source": self.source,
        }
        return {**entry, "lower": self.lower, "upper": self.upper} if self.is_sql() else entry


def ledger_path(lake: Lake, hour: datetime) -> Path:
    """Where the ledger records the files hour ``hour`` took."""
    return lake.partition(lk.LEDGER, hour) / LEDGER_FILE


def read_ledger(lake: Lake, hour: datetime) -> list[LedgerEntry] | None:
    """The ledger entries of ``hour``, or None when the hour has not been extracted."""
    path = ledger_path(lake, hour)
    if not path.is_file():
        return None
    return [LedgerEntry(**entry) for entry in read_json(path)["files"]]


def _path_keys(path: Path) -> dict[str, str]:
    return {p.split("=", 1)[0]: p.split("=", 1)[1] for p in path.parts if "=" in p}


def _arrival_hour(path: Path) -> datetime | None:
    """Arrival hour from a ``dt=YYYY-MM-DD/hour=HH`` path, None when the path says nothing."""
    parts = _path_keys(path)
    if "dt" in parts and "hour" in parts:
        return parse_hour(f"{parts['dt']}T{int(parts['hour']):02d}")
    return None


def _source_of(path: Path) -> str:
    """The source whose mapping reads a landing file (``source=<name>`` in its path)."""
    return _path_keys(path).get(sources.SOURCE_KEY, sources.CANONICAL)


def _file_rows(path: Path, mapping: sources.Mapping) -> int:
    """Row count of a landing file (Parquet from metadata; text files counted by non-blank lines)."""
    if path.name.endswith(".parquet"):
        try:
            return int(pq.ParquetFile(path).metadata.num_rows)
        except (OSError, pa.ArrowException):
            return 0  # unreadable: validate_events fails the hour naming the file
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            lines = sum(1 for line in handle if line.strip())
    except (OSError, EOFError):
        return 0
    header = ".csv" in path.name and mapping.header
    return max(lines - 1, 0) if header else lines


def _list_landing(lake: Lake, hour: datetime, lookback_hours: int) -> list[tuple[Path, datetime]]:
    """Landing files that arrived by the end of ``hour``, in recent arrival partitions only."""
    found: list[tuple[Path, datetime]] = []
    for arrival in hour_range(hour - timedelta(hours=lookback_hours), hour):
        directory = lake.partition(lk.LANDING, arrival)
        if directory.is_dir():
            for p in sorted(directory.iterdir()):
                if p.is_dir() and p.name.startswith(f"{sources.SOURCE_KEY}="):
                    found += [(f, arrival) for f in sorted(p.iterdir()) if f.name.endswith(LANDING_SUFFIXES)]
                elif p.name.endswith(LANDING_SUFFIXES):
                    found.append((p, arrival))
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
            if entry.is_sql():
                continue  # validate_events re-reads the range and compares its digest
            path = lake.path(entry.path)
            if not path.is_file():
                raise LedgerError(f"{path}: taken by hour {format_hour(hour)} but no longer in landing")
            if path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
                raise LedgerError(f"{path}: changed since hour {format_hour(hour)} ingested it")
        _write_watermarks(lake, hour, existing)  # in case a crash came between ledger and marks
        return _extract_summary(hour, existing, rerun=True, changed=[])

    lookback = settings.lateness_hours + LISTING_MARGIN_HOURS
    taken: dict[str, LedgerEntry] = {}
    for previous in hour_range(hour - timedelta(hours=lookback + 1), hour - HOUR):
        for entry in read_ledger(lake, previous) or []:
            taken[entry.path] = entry
    entries: list[LedgerEntry] = []
    changed: list[str] = []
    mappings: dict[str, sources.Mapping] = {}
    for path, arrival in _list_landing(lake, hour, lookback):
        relative = str(path.relative_to(lake.root))
        size = path.stat().st_size
        if relative in taken:
            old = taken[relative]
            if size != old.size or sha256_file(path) != old.sha256:
                changed.append(relative)
            continue
        source = _source_of(path)
        if source not in mappings:
            mappings[source] = sources.load_mapping(source, lake.root)
        entries.append(
            LedgerEntry(
                relative,
                size,
                sha256_file(path),
                _file_rows(path, mappings[source]),
                format_hour(_arrival_hour(path) or arrival),
                source,
            )
        )
    entries += _extract_tables(settings, lake, hour)
    faults.maybe_fail(faults.LEDGER_UPDATE)
    write_json(
        ledger_path(lake, hour),
        {"hour": format_hour(hour), "run_id": run_id, "files": [e.as_dict() for e in entries], "changed": changed},
    )
    _write_watermarks(lake, hour, entries)
    return _extract_summary(hour, entries, rerun=False, changed=changed)


def watermark_path(lake: Lake, source: str) -> Path:
    """Where the high-water mark of table source ``source`` is kept (a copy of its newest ledger range)."""
    return lake.path(lk.LEDGER, WATERMARKS, f"{source}.json")


def _write_watermarks(lake: Lake, hour: datetime, entries: list[LedgerEntry]) -> None:
    for entry in entries:
        if not entry.is_sql():
            continue
        path = watermark_path(lake, entry.source)
        current = read_json(path) if path.is_file() else None
        if current is None or parse_hour(current["hour"]) <= hour:
            write_json(path, {"hour": format_hour(hour), "lower": entry.lower, "upper": entry.upper})


def _extract_tables(settings: Settings, lake: Lake, hour: datetime) -> list[LedgerEntry]:
    """Ledger entries of the table sources (``settings.sql_sources``) for a first run of ``hour``.

    Each takes the rows after its high-water mark up to the largest cursor now in the
    table (for a time cursor: before the hour's end). Hours run in order, so a mark
    at or after ``hour`` means an out-of-order run: ``LedgerError``.
    """
    entries: list[LedgerEntry] = []
    for name in settings.sql_sources:
        mapping = sources.load_mapping(name, lake.root)
        if mapping.sql is None:
            raise sources.MappingError(
                f"{mapping.origin or name}: sql: missing, but PROFILE_ENGINE_SQL_SOURCES lists {name!r} as a table source"
            )
        path = watermark_path(lake, name)
        mark = read_json(path) if path.is_file() else None
        if mark is not None and parse_hour(mark["hour"]) >= hour:
            raise LedgerError(
                f"table source {name!r}: its high-water mark was set by hour {mark['hour']}, "
                f"not before hour {format_hour(hour)}, which has no ledger: hours run in order"
            )
        batch = sources.read_sql_batch(
            mapping,
            lower=mark["upper"] if mark else None,
            before=hour + HOUR,
            default_conn_id=settings.sql_conn_id,
        )
        entries.append(
            LedgerEntry(
                sources.sql_label(mapping),
                0,
                batch.digest,
                batch.rows.num_rows,
                format_hour(hour),
                name,
                batch.lower,
                batch.upper,
            )
        )
    return entries


def _extract_summary(hour: datetime, entries: list[LedgerEntry], *, rerun: bool, changed: list[str]) -> dict[str, Any]:
    late = sum(1 for e in entries if parse_hour(e.arrival_hour) < hour)
    return {
        "hour": format_hour(hour),
        "files": len(entries),
        "rows": sum(e.rows for e in entries),
        "bytes": sum(e.size for e in entries),
        "late_files": late,
        "sources": sorted({e.source for e in entries}),
        "rerun": rerun,
        "changed_after_ingestion": changed,
    }


def _read_range(entry: LedgerEntry, mappings: dict[str, sources.Mapping], settings: Settings) -> pa.Table:
    """The rows of a table source's ledger range, exactly as the first run read them (else ``LedgerError``)."""
    batch = sources.read_sql_batch(
        mappings[entry.source],
        lower=entry.lower,
        upper=entry.upper,
        bounded=True,
        default_conn_id=settings.sql_conn_id,
    )
    if batch.rows.num_rows != entry.rows or batch.digest != entry.sha256:
        raise LedgerError(
            f"{entry.path}: rows in cursor range ({entry.lower}, {entry.upper}] changed since hour "
            f"{entry.arrival_hour} ingested them ({entry.rows} rows then, {batch.rows.num_rows} now)"
        )
    return batch.rows


def _load_raw(con: Any, lake: Lake, entries: list[LedgerEntry], settings: Settings) -> dict[str, sources.Mapping]:
    """Create table ``raw``: every row of every file through its mapping (see ``sources.source_select``)."""
    mappings: dict[str, sources.Mapping] = {}
    selects = []
    for index, entry in enumerate(entries):
        if entry.source not in mappings:
            mappings[entry.source] = sources.load_mapping(entry.source, lake.root)
        if entry.is_sql():
            selects.append(
                sources.sql_select(con, mappings[entry.source], _read_range(entry, mappings, settings), index)
            )
        else:
            selects.append(sources.source_select(con, mappings[entry.source], lake.path(entry.path), index))
    if not selects:
        cols = ", ".join(f"CAST(NULL AS VARCHAR) AS {c}" for c in EVENT_COLUMNS)
        selects.append(
            f"SELECT {cols}, CAST(NULL AS VARCHAR) AS event_type_v, CAST(NULL AS TIMESTAMPTZ) AS ts_v, "
            "CAST(NULL AS VARCHAR) AS ts_problem, 0 AS source_index, CAST(0 AS BIGINT) AS source_row, "
            "CAST(NULL AS VARCHAR) AS source_line, false AS malformed WHERE false"
        )
    # Parquet of canonical sources is scanned where it is used; rows whose event id is a
    # hash over a window are computed once.
    kind = "TABLE" if any(m.event_id_from_hash() for m in mappings.values()) else "VIEW"
    con.execute(f"CREATE TEMP {kind} raw AS " + " UNION ALL ".join(f"({s})" for s in selects))
    return mappings


def validate_events(
    settings: Settings,
    hour: datetime,
    *,
    run_id: str = "manual",
    quality_suite: bool = False,
    build_docs: bool = True,
    enforce_threshold: bool = True,
) -> dict[str, Any]:
    """Stage the valid events of hour ``hour`` per bucket and quarantine the rest, with reasons.

    The row rules only: the hourly DAG runs the Great Expectations suite over the
    staged batch in its own task, ``check_quality`` (``quality.check_staged_hour``),
    beside ``build_profiles``. ``quality_suite=True`` runs that step here as well, on
    the table just staged (with ``build_docs``: its Data Docs), and adds its summary
    under ``quality``. When a source's share of defective rows (reasons other than
    benign ones and those its mapping expects) exceeds its threshold in an hour with at
    least ``settings.quarantine_min_rows`` of its rows, the summary says so under
    ``threshold_breaches``; with ``enforce_threshold`` (the hourly run)
    ``QuarantineThresholdExceeded`` is raised after everything is written. A file that
    cannot be read, lacks a required column or has an unmappable column type raises
    ``sources.SourceError`` before anything of the hour is written.

    Staged rows are ordered by bucket, user, event time and event id (DESIGN.md §3:
    output rows are sorted before writing); quarantined rows by source file and row.
    """
    import duckdb

    lake = Lake(settings.lake)
    entries = read_ledger(lake, hour)
    if entries is None:
        raise FileNotFoundError(f"no ledger for hour {format_hour(hour)}: run extract_events first")
    end = hour + HOUR
    too_late = hour - timedelta(hours=settings.lateness_hours)
    future = end + timedelta(minutes=settings.clock_skew_minutes)
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        mappings = _load_raw(con, lake, entries, settings)
        # Rows of erased users (tombstones) are dropped before any rule and counted as erased.
        erased = erasure.drop_erased(con, settings, "raw", [e.source for e in entries])
        recent = _recent_staged_files(lake, hour, settings)
        # Ids staged in the lateness window that this hour repeats. The window holds about
        # 25 hours of events: hashing this hour's ids and probing the window's ids against
        # them keeps the hash table at one hour (hashing the window instead: 2.1 GB peak
        # and 12.5 s CPU against 0.7 GB and 9.7 s for 1M events on 24 hours).
        con.execute("CREATE TEMP TABLE seen_ids (event_id VARCHAR)")
        if recent:
            con.execute(
                f"INSERT INTO seen_ids SELECT DISTINCT event_id FROM read_parquet({[str(f) for f in recent]!r}) "
                "WHERE ts >= $too_late AND event_id IN (SELECT event_id FROM raw WHERE event_id IS NOT NULL)",
                {"too_late": too_late},
            )
        # Ids that occur more than once in this hour, with their first occurrence (by file,
        # then row): every later copy is a duplicate. One scan of raw joined to this small
        # table instead of a window over all rows (a sort of 1M strings) or two scans.
        # ``position`` orders rows as (source_index, source_row) does, in one number.
        position = f"CAST(source_index AS HUGEINT) * {1 << 64} + source_row"
        con.execute(
            f"CREATE TEMP TABLE dup_ids AS SELECT event_id, min({position}) AS first_copy "
            "FROM raw WHERE event_id IS NOT NULL GROUP BY event_id HAVING count(*) > 1"
        )
        types = ", ".join(f"'{t}'" for t in EVENT_TYPES)
        ids = ("event_id", "user_id", "item_id", "order_id", "session_id", "category_id")
        # (condition, reason) in the order reasons are listed; a NULL condition is false.
        # Conditions are SQL; reasons are names, except ts_problem, which reads its reason from its column.
        rules = [
            ("event_id IS NULL OR trim(event_id) = ''", f"'{MISSING_EVENT_ID}'"),
            ("user_id IS NULL OR trim(user_id) = ''", f"'{MISSING_USER_ID}'"),
            ("item_id IS NULL OR trim(item_id) = ''", f"'{MISSING_ITEM_ID}'"),
            (f"greatest({', '.join(f'coalesce(length({c}), 0)' for c in ids)}) > {MAX_ID_LENGTH}", f"'{ID_TOO_LONG}'"),
            (f"event_type_v IS NULL OR event_type_v NOT IN ({types})", f"'{UNKNOWN_EVENT_TYPE}'"),
            (
                "price IS NOT NULL AND trim(price) <> '' AND (price_v IS NULL OR isnan(price_v) OR isinf(price_v))",
                f"'{BAD_PRICE}'",
            ),
            ("price_v < 0 AND NOT isinf(price_v)", f"'{NEGATIVE_PRICE}'"),
            ("quantity_v IS NULL OR quantity_v = 0", f"'{BAD_QUANTITY}'"),
            (f"quantity_v < 0 AND event_type_v IS DISTINCT FROM '{REFUND}'", f"'{NEGATIVE_QUANTITY}'"),
            ("ts_problem IS NOT NULL", "ts_problem"),
            ("ts_v >= $future", f"'{FUTURE_TS}'"),
            ("ts_v < $too_late", f"'{TOO_LATE}'"),
            ("later_copy OR seen", f"'{DUPLICATE}'"),
        ]
        listed = ", ".join(f"CASE WHEN {condition} THEN {reason} END" for condition, reason in rules)
        # The list is built only for rows that break a rule (a few per thousand); the others get [].
        con.execute(
            f"""
            CREATE TABLE checked AS
            WITH typed AS (
                SELECT raw.*,
                    TRY_CAST(price AS DOUBLE) AS price_v,
                    CASE WHEN quantity IS NULL OR trim(quantity) = '' THEN 1 ELSE TRY_CAST(trim(quantity) AS INTEGER) END AS quantity_v,
                    NOT (malformed OR event_id IS NULL OR trim(event_id) = '') AND dup_ids.first_copy IS NOT NULL
                        AND {position} IS DISTINCT FROM dup_ids.first_copy AS later_copy,
                    event_id IN (SELECT event_id FROM seen_ids) AS seen
                FROM raw LEFT JOIN dup_ids USING (event_id)
            )
            SELECT * EXCLUDE (later_copy, seen), CASE
                WHEN malformed THEN ['{MALFORMED_ROW}']
                WHEN {" OR ".join(f"({condition})" for condition, _ in rules)}
                    THEN list_filter([{listed}], lambda r: r IS NOT NULL)
                ELSE []::VARCHAR[]
            END AS reasons
            FROM typed
            """,
            {"future": future, "too_late": too_late},
        )
        # A refund's quantity is staged negative whatever sign its source wrote (schema.REFUND).
        quantity = f"CASE WHEN event_type_v = '{REFUND}' THEN -abs(quantity_v) ELSE quantity_v END"
        staged = con.sql(
            f"""
            SELECT event_id, user_id, event_type_v AS event_type, item_id, NULLIF(category_id, '') AS category_id,
                   price_v AS price, {quantity} AS quantity, NULLIF(order_id, '') AS order_id,
                   ts_v AS ts, NULLIF(session_id, '') AS session_id, {bucket_sql("user_id", settings.buckets)} AS {BUCKET},
                   {_local_hour_sql(entries, mappings, settings.business_tz)} AS {LOCAL_HOUR}
            FROM checked WHERE len(reasons) = 0
            ORDER BY {BUCKET}, user_id, ts, event_id
            """
        ).to_arrow_table()
        staged = staged.cast(STAGED_SCHEMA)
        quarantined = con.sql(
            f"""
            SELECT {", ".join(EVENT_COLUMNS)}, array_to_string(reasons, ',') AS reasons,
                   $files[source_index + 1] AS source_file, source_row, source_line
            FROM checked WHERE len(reasons) > 0
            ORDER BY source_file, source_row
            """,
            params={"files": [e.path for e in entries] or [""]},
        ).to_arrow_table()
        quarantined = quarantined.cast(QUARANTINE_ROW_SCHEMA)
        reason_counts = {
            str(r): int(n)
            for r, n in con.execute(
                "SELECT r, count(*) FROM (SELECT unnest(reasons) AS r FROM checked) GROUP BY r ORDER BY r"
            ).fetchall()
        }
        per_source = erasure.count_erased(_per_source(con, entries, mappings, settings), erased)
    finally:
        con.close()

    # Rows are ordered by bucket first: each bucket is a slice (no copy).
    bounds = _bucket_bounds(staged, settings.buckets)
    per_bucket = []
    for b in range(settings.buckets):
        part = staged.slice(bounds[b], bounds[b + 1] - bounds[b])
        lake.write_partition(lk.STAGING, hour, part, bucket=b, run_id=run_id)
        per_bucket.append(part.num_rows)
    lake.write_partition(
        lk.QUARANTINE, hour, quarantined, run_id=run_id, extra={"reasons": reason_counts, "sources": per_source}
    )
    read_rows = sum(s["read"] for s in per_source.values())
    defective = sum(s["defective"] for s in per_source.values())
    breaches = [name for name, s in per_source.items() if s["threshold_exceeded"]]

    summary: dict[str, Any] = {
        "hour": format_hour(hour),
        "read": read_rows,
        "staged": staged.num_rows,
        "quarantined": quarantined.num_rows,
        "erased": sum(erased.values()),
        "reasons": reason_counts,
        "sources": per_source,
        "staged_per_bucket": per_bucket,
        "defective": defective,
        "threshold_breaches": breaches,
        "held_back": int(
            pc.sum(pc.greater_equal(staged.column("ts"), pa.scalar(end, pa.timestamp("ms", "UTC")))).as_py() or 0
        ),
    }
    if summary["read"] != summary["staged"] + summary["quarantined"] + summary["erased"]:
        raise AssertionError(f"hour {format_hour(hour)}: counts do not add up: {summary}")
    if quality_suite:
        from profile_engine import quality

        summary["quality"] = quality.check_staged_hour(
            settings, hour, summary, run_id=run_id, build_docs=build_docs, staged=staged
        )
    if breaches and enforce_threshold:
        details = "; ".join(
            f"{name}: {per_source[name]['defective']} of {per_source[name]['read']} rows quarantined as defective "
            f"({per_source[name]['defective_share']:.1%} > threshold {per_source[name]['threshold']:.1%})"
            for name in breaches
        )
        raise QuarantineThresholdExceeded(
            f"hour {format_hour(hour)}: {details}; reasons: {reason_counts}; see quarantine/events and the run report",
            summary,
        )
    return summary


def _local_hour_sql(entries: list[LedgerEntry], mappings: dict[str, sources.Mapping], default_tz: str) -> str:
    """Each row's hour of day in the time zone of its source's shop (``sources.local_hour_sql``)."""
    by_expression: dict[str, list[int]] = {}
    for index, entry in enumerate(entries):
        expression = sources.local_hour_sql(mappings[entry.source], "ts_v", default_tz)
        by_expression.setdefault(expression, []).append(index)
    if not by_expression:
        return "CAST(NULL AS TINYINT)"
    cases = " ".join(
        f"WHEN source_index IN ({', '.join(map(str, indices))}) THEN {expression}"
        for expression, indices in by_expression.items()
    )
    return f"CASE {cases} END"


def _bucket_bounds(staged: pa.Table, buckets: int) -> list[int]:
    """Offsets of the first row of each bucket (and the end) in ``staged``, which is ordered by bucket."""
    import numpy as np

    column = staged.column(BUCKET).to_numpy()
    return [int(i) for i in np.searchsorted(column, np.arange(buckets + 1), side="left")[:buckets]] + [len(column)]


def _per_source(
    con: Any, entries: list[LedgerEntry], mappings: dict[str, sources.Mapping], settings: Settings
) -> dict[str, dict[str, Any]]:
    """Rows read, staged, quarantined and defective per source, and its threshold decision."""
    by_index = [e.source for e in entries]
    result: dict[str, dict[str, Any]] = {}
    for name in sorted(set(by_index)):
        mapping = mappings[name]
        indexes = [i for i, s in enumerate(by_index) if s == name]
        not_counted = sorted(BENIGN_REASONS | mapping.policy.expected_reasons)
        read, quarantined, defective = con.execute(
            """SELECT count(*), count(*) FILTER (WHERE len(reasons) > 0),
                       count(*) FILTER (WHERE len(list_filter(reasons, lambda r: NOT list_contains($benign, r))) > 0)
                FROM checked WHERE list_contains($indexes, source_index)""",
            {"benign": not_counted, "indexes": indexes},
        ).fetchall()[0]
        threshold = (
            mapping.policy.quarantine_threshold
            if mapping.policy.quarantine_threshold is not None
            else settings.quarantine_threshold
        )
        share = defective / read if read else 0.0
        result[name] = {
            "files": len(indexes),
            "read": int(read),
            "staged": int(read - quarantined),
            "quarantined": int(quarantined),
            "erased": 0,
            "defective": int(defective),
            "defective_share": share,
            "threshold": threshold,
            "expected_reasons": sorted(mapping.policy.expected_reasons),
            "threshold_applies": read >= settings.quarantine_min_rows,
            "threshold_exceeded": read >= settings.quarantine_min_rows and share > threshold,
        }
    return result


def _recent_staged_files(lake: Lake, hour: datetime, settings: Settings) -> list[Path]:
    """Staged files of the hours whose events a re-sent row of ``hour`` could duplicate.

    An event staged earlier has ``ts`` >= its processing hour minus the lateness window;
    a row of this hour that is not too late has ``ts`` >= this hour minus the window.
    So the staged hours of the window (plus one for clock skew) are enough, and the
    cost does not grow with history.
    """
    files: list[Path] = []
    for previous in hour_range(hour - timedelta(hours=settings.lateness_hours + 1), hour - HOUR):
        try:
            files += lake.data_files(lk.STAGING, previous)
        except FileNotFoundError:
            continue
    return files
