"""Extract and validate an hour: landing files to the ingestion ledger, rows to staging or quarantine.

Every row read is staged, quarantined with its reasons or counted as erased. docs/sources.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profile_engine.config import Settings
from profile_engine.contracts.events import (
    BUCKET,
    EVENT_COLUMNS,
    EVENT_TYPES,
    LOCAL_HOUR,
    QUARANTINE_SCHEMA,
    REFUND,
    STAGED_SCHEMA,
    bucket_sql,
)
from profile_engine.hours import HOUR, format_hour, hour_range, parse_hour
from profile_engine.lake import db, faults
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake, read_json, sha256_file, write_json
from profile_engine.privacy.tombstones import count_erased, drop_erased
from profile_engine.sources import mappings as sources
from profile_engine.sources import readers as source_readers
from profile_engine.sources import sql as source_sql

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"
# Every landing path any ledger has named (taken or skipped), kept up to date by the
# first run of each hour, so files outside the listing window are named once.
LANDING_INDEX = "landing_index.json"
# High-water marks of table sources: the newest ledger range per source, so the next
# hour starts where the last one stopped without reading the whole ledger history.
WATERMARKS = "watermarks"
SQL_PREFIX = "sql://"
# Why a landing file is not read (the ledger's ``skipped`` entries and the run report).
UNSUPPORTED_FORMAT = "unsupported_format"
UNKNOWN_FOLDER = "unknown_folder"
ARRIVED_TOO_LATE = "arrived_too_late"
SKIP_REASONS: dict[str, str] = {
    UNSUPPORTED_FORMAT: "its ending is no format its source reads (see docs/sources.md)",
    UNKNOWN_FOLDER: "it is not in an arrival folder dt=YYYY-MM-DD/hour=HH, directly or in a source=<name> folder",
    ARRIVED_TOO_LATE: "its arrival folder is older than the listing window (lateness + listing margin)",
}
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

    Raised after staging and quarantine (and, with ``check_staged``, the quality
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
    # Set for a file the hour names but does not read (one of ``SKIP_REASONS``).
    reason: str | None = None

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
        if self.reason is not None:
            entry["reason"] = self.reason
        return {**entry, "lower": self.lower, "upper": self.upper} if self.is_sql() else entry

    def skipped_dict(self) -> dict[str, Any]:
        """How the extract summary and the run report name a skipped file."""
        return {
            "path": self.path,
            "reason": self.reason,
            "why": SKIP_REASONS.get(self.reason or "", ""),
            "source": self.source,
            "arrival_hour": self.arrival_hour,
            "size": self.size,
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


def read_skipped(lake: Lake, hour: datetime) -> list[LedgerEntry]:
    """The landing files hour ``hour`` named but did not read, with their reasons ([] for older ledgers)."""
    path = ledger_path(lake, hour)
    if not path.is_file():
        return []
    return [LedgerEntry(**entry) for entry in read_json(path).get("skipped", [])]


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
    fmt = source_readers.file_format(mapping, path)
    if fmt == "parquet":
        try:
            return int(pq.ParquetFile(path).metadata.num_rows)
        except (OSError, pa.ArrowException):
            return 0  # unreadable: validate_events fails the hour naming the file
    import gzip

    opener = gzip.open if source_readers.is_gzip(path) else open
    try:
        with opener(path, "rb") as handle:
            lines = sum(1 for line in handle if line.strip())
    except (OSError, EOFError):
        return 0
    header = fmt == "csv" and mapping.header
    return max(lines - 1, 0) if header else lines


@dataclass
class Listing:
    """What the landing listing of an hour found."""

    # Files of arrival partitions in the window (and root files by modification time).
    window: list[tuple[Path, datetime]] = field(default_factory=list)
    # Files that will never be read: (path, arrival hour if the path has one, reason).
    outside: list[tuple[Path, datetime | None, str]] = field(default_factory=list)


def _list_landing(lake: Lake, hour: datetime, lookback_hours: int) -> Listing:
    """Every file under ``landing/events`` as of the end of ``hour``.

    Files of the arrival partitions of the last ``lookback_hours`` (directly or in a
    ``source=<name>`` folder) and files directly under ``landing/events`` whose
    modification time lies in that window are candidates (``window``). Everything
    else that has arrived is ``outside``: in another sub-folder (``UNKNOWN_FOLDER``)
    or in an arrival partition, or with a modification time, before the window
    (``ARRIVED_TOO_LATE``). Files of later arrival partitions, or modified after the
    hour, have not arrived yet and wait.
    """
    listing = Listing()
    root = lake.path(lk.LANDING)
    if not root.is_dir():
        return listing
    first = hour - timedelta(hours=lookback_hours)
    for top in sorted(root.iterdir()):
        if top.is_file():
            mtime = top.stat().st_mtime
            if first.timestamp() <= mtime < (hour + HOUR).timestamp():
                arrival = datetime.fromtimestamp(mtime, hour.tzinfo).replace(minute=0, second=0, microsecond=0)
                listing.window.append((top, arrival))
            elif mtime < first.timestamp():
                listing.outside.append((top, None, ARRIVED_TOO_LATE))
            continue
        days = [top] if top.name.startswith("dt=") else []
        if not days:
            listing.outside += [(f, None, UNKNOWN_FOLDER) for f in _files_under(top)]
        for day in days:
            for folder in sorted(day.iterdir()):
                folder_hour = _folder_hour(folder)
                if folder_hour is None:
                    listing.outside += [(f, None, UNKNOWN_FOLDER) for f in _files_under(folder)]
                elif folder_hour > hour:
                    continue  # not arrived yet
                else:
                    _list_arrival(folder, folder_hour, in_window=folder_hour >= first, listing=listing)
    return listing


def _folder_hour(folder: Path) -> datetime | None:
    """The arrival hour of a ``dt=YYYY-MM-DD/hour=HH`` folder; None for anything else."""
    if not folder.is_dir() or not folder.name.startswith("hour="):
        return None
    try:
        return _arrival_hour(folder)
    except ValueError:
        return None


def _list_arrival(folder: Path, arrival: datetime, *, in_window: bool, listing: Listing) -> None:
    """Sort the files of one arrival partition into ``listing``."""
    for p in sorted(folder.iterdir()):
        if p.is_dir() and p.name.startswith(f"{sources.SOURCE_KEY}="):
            for f in sorted(p.iterdir()):
                if f.is_dir():
                    listing.outside += [(g, arrival, UNKNOWN_FOLDER) for g in _files_under(f)]
                elif in_window:
                    listing.window.append((f, arrival))
                else:
                    listing.outside.append((f, arrival, ARRIVED_TOO_LATE))
        elif p.is_dir():
            listing.outside += [(f, arrival, UNKNOWN_FOLDER) for f in _files_under(p)]
        elif in_window:
            listing.window.append((p, arrival))
        else:
            listing.outside.append((p, arrival, ARRIVED_TOO_LATE))


def _files_under(path: Path) -> list[Path]:
    """``path`` itself when it is a file, else every file below it, sorted."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def _index_path(lake: Lake) -> Path:
    return lake.path(lk.LEDGER, LANDING_INDEX)


def _ledger_paths(lake: Lake, hour: datetime) -> set[str]:
    """Landing paths hour ``hour``'s ledger named, taken or skipped."""
    path = ledger_path(lake, hour)
    if not path.is_file():
        return set()
    document = read_json(path)
    return {e["path"] for e in document["files"] + document.get("skipped", []) if not e["path"].startswith(SQL_PREFIX)}


def _named_before(lake: Lake, hour: datetime) -> set[str]:
    """Every landing path a ledger of an hour before ``hour`` named (``LANDING_INDEX``, brought up to date).

    The index holds the paths through its ``hour``; ledgers written after it (a crash
    between a ledger and the index, or a lake from before the index) are merged in.
    """
    index = _index_path(lake)
    document = read_json(index) if index.is_file() else None
    if document is not None:
        named = set(document["paths"])
        through = parse_hour(document["hour"])
        for previous in hour_range(through + HOUR, hour - HOUR):
            named |= _ledger_paths(lake, previous)
        return named
    named = set()
    for ledger in lake.path(lk.LEDGER).glob(f"dt=*/hour=*/{LEDGER_FILE}"):
        written = _arrival_hour(ledger.parent)
        if written is not None and written < hour:
            named |= _ledger_paths(lake, written)
    return named


def _write_index(lake: Lake, hour: datetime, named: set[str]) -> None:
    """Record the paths named through ``hour``, keeping only files still in landing (retention deletes)."""
    write_json(
        _index_path(lake),
        {"hour": format_hour(hour), "paths": sorted(p for p in named if lake.path(p).is_file())},
    )


def _skipped_entry(lake: Lake, path: Path, arrival: datetime, reason: str) -> LedgerEntry:
    source = _source_of(path) if reason != UNKNOWN_FOLDER else sources.CANONICAL
    return LedgerEntry(
        str(path.relative_to(lake.root)),
        path.stat().st_size,
        sha256_file(path),
        0,
        format_hour(arrival),
        source,
        reason=reason,
    )


def _warn_skipped(hour: datetime, skipped: list[LedgerEntry]) -> None:
    for entry in skipped:
        log.warning(
            "hour %s: landing file %s is not read: %s (%s)",
            format_hour(hour),
            entry.path,
            entry.reason,
            SKIP_REASONS.get(entry.reason or "", ""),
        )


def extract_events(
    settings: Settings, hour: datetime, *, run_id: str = "manual", now: datetime | None = None
) -> dict[str, Any]:
    """Record in the ledger which landing files hour ``hour`` takes, and return a summary.

    A first run takes every file that arrived by the end of the hour and is in no
    earlier hour's ledger; a rerun keeps the ledger's list and checks that those
    files are unchanged (``LedgerError`` names the file otherwise). Files that changed
    after an earlier hour took them are reported, not re-read. ``now`` (default: the
    clock) is the moment of reading, for table sources (``_extract_tables``).
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
        named_then = read_skipped(lake, hour)
        _warn_skipped(hour, named_then)
        return _extract_summary(hour, existing, rerun=True, changed=[], skipped=named_then)

    lookback = settings.lateness_hours + LISTING_MARGIN_HOURS
    taken: dict[str, LedgerEntry] = {}
    for previous in hour_range(hour - timedelta(hours=lookback + 1), hour - HOUR):
        for entry in (read_ledger(lake, previous) or []) + read_skipped(lake, previous):
            taken[entry.path] = entry
    named = _named_before(lake, hour)
    listing = _list_landing(lake, hour, lookback)
    entries: list[LedgerEntry] = []
    skipped: list[LedgerEntry] = []
    changed: list[str] = []
    mappings: dict[str, sources.Mapping] = {}
    for path, arrival in listing.window:
        relative = str(path.relative_to(lake.root))
        size = path.stat().st_size
        if relative in taken:
            old = taken[relative]
            if old.reason is None and (size != old.size or sha256_file(path) != old.sha256):
                changed.append(relative)
            continue
        if relative in named:
            continue
        source = _source_of(path)
        if source not in mappings:
            mappings[source] = sources.load_mapping(source, lake.root)
        try:
            source_readers.file_format(mappings[source], path)
        except sources.SourceError:
            skipped.append(_skipped_entry(lake, path, _arrival_hour(path) or arrival, UNSUPPORTED_FORMAT))
            continue
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
    for path, folder_arrival, reason in listing.outside:
        relative = str(path.relative_to(lake.root))
        if relative not in named and relative not in taken:
            skipped.append(_skipped_entry(lake, path, folder_arrival or hour, reason))
    entries += _extract_tables(settings, lake, hour, now or datetime.now(UTC))
    faults.maybe_fail(faults.LEDGER_UPDATE)
    write_json(
        ledger_path(lake, hour),
        {
            "hour": format_hour(hour),
            "run_id": run_id,
            "files": [e.as_dict() for e in entries],
            "skipped": [e.as_dict() for e in skipped],
            "changed": changed,
        },
    )
    _write_watermarks(lake, hour, entries)
    _write_index(lake, hour, named | {e.path for e in entries + skipped if not e.is_sql()})
    _warn_skipped(hour, skipped)
    return _extract_summary(hour, entries, rerun=False, changed=changed, skipped=skipped)


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


def _extract_tables(settings: Settings, lake: Lake, hour: datetime, now: datetime) -> list[LedgerEntry]:
    """Ledger entries of the table sources (``settings.sql_sources``) for a first run of ``hour``.

    Each takes the rows after its high-water mark that belong to ``hour``, however
    late the run: a time cursor the rows with cursor before the hour's end, an id
    cursor the rows in id order up to the first whose event time is at or after the
    hour's end (docs/sources.md). Only an event time after ``now`` plus the clock skew
    (no real event) does not stop an id range. Hours run in order, so a mark at or
    after ``hour`` means an out-of-order run: ``LedgerError``.
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
        batch = source_sql.read_sql_batch(
            mapping,
            lower=mark["upper"] if mark else None,
            before=hour + HOUR,
            impossible_from=max(now, hour + HOUR) + timedelta(minutes=settings.clock_skew_minutes),
            default_conn_id=settings.sql_conn_id,
        )
        entries.append(
            LedgerEntry(
                source_sql.sql_label(mapping),
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


def _extract_summary(
    hour: datetime, entries: list[LedgerEntry], *, rerun: bool, changed: list[str], skipped: list[LedgerEntry]
) -> dict[str, Any]:
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
        "skipped": [e.skipped_dict() for e in skipped],
    }


def _read_range(entry: LedgerEntry, mappings: dict[str, sources.Mapping], settings: Settings) -> pa.Table:
    """The rows of a table source's ledger range, exactly as the first run read them (else ``LedgerError``)."""
    batch = source_sql.read_sql_batch(
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
    """Create table ``raw``: every row of every file through its mapping (see ``source_readers.source_select``)."""
    mappings: dict[str, sources.Mapping] = {}
    selects = []
    for index, entry in enumerate(entries):
        if entry.source not in mappings:
            mappings[entry.source] = sources.load_mapping(entry.source, lake.root)
        if entry.is_sql():
            selects.append(
                source_sql.sql_select(con, mappings[entry.source], _read_range(entry, mappings, settings), index)
            )
        else:
            selects.append(source_readers.source_select(con, mappings[entry.source], lake.path(entry.path), index))
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
    check_staged: Callable[[dict[str, Any], pa.Table], dict[str, Any]] | None = None,
    enforce_threshold: bool = True,
) -> dict[str, Any]:
    """Stage the valid events of hour ``hour`` per bucket and quarantine the rest, with reasons.

    The row rules only: the hourly DAG runs the Great Expectations suite over the
    staged batch in its own task, ``check_quality`` (``quality.check_staged_hour``),
    beside ``build_profiles``. ``check_staged(summary, staged)`` runs such a step here
    instead, on the table just staged (replays: ``runner.warm_up`` passes the quality
    suite), and adds its result under ``quality``. When a source's share of defective rows (reasons other than
    benign ones and those its mapping expects) exceeds its threshold in an hour with at
    least ``settings.quarantine_min_rows`` of its rows (``threshold_verdict``), the summary
    lists it under ``threshold_breaches`` and says ``threshold_exceeded``; with ``enforce_threshold`` (the hourly run)
    ``QuarantineThresholdExceeded`` is raised after everything is written. A file that
    cannot be read, lacks a required column or has an unmappable column type raises
    ``sources.SourceError`` before anything of the hour is written.

    Staged rows are ordered by bucket, user, event time and event id; quarantined rows by
    source file and row (docs/sources.md).
    """
    lake = Lake(settings.lake)
    entries = read_ledger(lake, hour)
    if entries is None:
        raise FileNotFoundError(f"no ledger for hour {format_hour(hour)}: run extract_events first")
    end = hour + HOUR
    too_late = hour - timedelta(hours=settings.lateness_hours)
    future = end + timedelta(minutes=settings.clock_skew_minutes)
    con = db.connect(settings)
    try:
        con.execute("SET TimeZone = 'UTC'")
        mappings = _load_raw(con, lake, entries, settings)
        # Rows of erased users (tombstones) are dropped before any rule and counted as erased.
        erased = drop_erased(con, settings, "raw", [e.source for e in entries])
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
        per_source = count_erased(_per_source(con, entries, mappings, settings), erased)
        # Staged rows of later hours (clock skew), counted here: an Arrow scalar of ``end`` imported pandas.
        held_back = int(
            con.execute(
                "SELECT count(*) FROM checked WHERE len(reasons) = 0 AND ts_v >= $end", {"end": end}
            ).fetchall()[0][0]
        )
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
        "threshold_exceeded": bool(breaches),
        "held_back": held_back,
    }
    if summary["read"] != summary["staged"] + summary["quarantined"] + summary["erased"]:
        raise AssertionError(f"hour {format_hour(hour)}: counts do not add up: {summary}")
    if check_staged is not None:
        summary["quality"] = check_staged(summary, staged)
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
    """Each row's hour of day in the time zone of its source's shop (``source_readers.local_hour_sql``)."""
    by_expression: dict[str, list[int]] = {}
    for index, entry in enumerate(entries):
        expression = source_readers.local_hour_sql(mappings[entry.source], "ts_v", default_tz)
        by_expression.setdefault(expression, []).append(index)
    if not by_expression:
        return "CAST(NULL AS TINYINT)"
    cases = " ".join(
        f"WHEN source_index IN ({', '.join(map(str, indices))}) THEN {expression}"
        for expression, indices in by_expression.items()
    )
    return f"CASE {cases} END"


def _bucket_bounds(staged: pa.Table, buckets: int) -> list[int]:
    """Offsets of the first row of each bucket (and the end) in ``staged``, which is ordered by bucket.

    Bucket b starts after the rows of the smaller buckets, counted in Arrow (``value_counts``). ``to_numpy``
    imported pandas (as does any pyarrow conversion of Python or NumPy values: ``pa.scalar(1)``), 0.2-0.3 CPU s of
    a task that has no other use for it (issue 19, BENCHMARKS.md).
    """
    rows = {int(c["values"]): int(c["counts"]) for c in pc.value_counts(staged.column(BUCKET)).to_pylist()}
    starts = [sum(n for b, n in rows.items() if b < bucket) for bucket in range(buckets)]
    return [*starts, staged.num_rows]


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
        share, exceeded = threshold_verdict(int(defective), int(read), threshold, settings.quarantine_min_rows)
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
            "threshold_exceeded": exceeded,
        }
    return result


def defective_share(defective_rows: int, read_rows: int) -> float:
    """Share of the rows read that count as defective; 0 when nothing was read (nothing was rejected)."""
    if defective_rows < 0 or read_rows < 0:
        raise ValueError(f"row counts must be >= 0, got defective={defective_rows} read={read_rows}")
    if defective_rows > read_rows:
        raise ValueError(f"defective rows ({defective_rows}) exceed rows read ({read_rows})")
    return defective_rows / read_rows if read_rows else 0.0


def threshold_verdict(defective_rows: int, read_rows: int, threshold: float, min_rows: int) -> tuple[float, bool]:
    """The quarantine-threshold verdict of one source in one hour: its defective share and whether it breaches.

    The one definition of a breach (docs/sources.md): the share exceeds ``threshold`` and the
    source read at least ``min_rows`` rows (one bad row must not fail a quiet hour). The hour
    breaches when any source does (``validate_events``' ``threshold_exceeded``); the quality
    stage reports that verdict and never judges the whole hour's share again.
    """
    share = defective_share(defective_rows, read_rows)
    return share, read_rows >= min_rows and share > threshold


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
