"""Sources: column-mapping files that put any event log onto the canonical event.

DESIGN.md §3. A mapping (YAML under ``include/config/sources/``) says how to read a
source's files (CSV with or without header, delimiter, encoding; Parquet; JSON Lines)
and how its columns become the canonical columns: column names, event-type names,
the timestamp format and zone, constants (an order-lines table has only purchases),
defaults, the ``event_id`` rule when the source has none, and the source's own
quarantine policy. ``load_mapping`` validates a file on load and names the file, the
key and the problem. ``source_select`` turns one landing file into a DuckDB query
that ``ingest`` validates; ``land_for_replay`` splits one large file into landing
files by event hour, so ``runner.replay`` can process its hours in order.

Values are read as text and never through float, so 19-digit ids survive; the
original text of every canonical column is kept for the quarantine.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pyarrow as pa
import yaml

from profile_engine.config import CONFIG_DIR, Settings
from profile_engine.contracts.events import EVENT_COLUMNS, EVENT_TYPES, REFUND
from profile_engine.hours import format_hour
from profile_engine.lake import db
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake

SOURCES_DIR = CONFIG_DIR / "sources"
# Mappings given by path are copied here by a replay, so reruns find them by name.
LAKE_SOURCES_DIR = "_meta/sources"
CANONICAL = "canonical"
# Landing files of a mapped source sit in a ``source=<name>`` folder of their arrival partition.
SOURCE_KEY = "source"
FORMATS = ("csv", "parquet", "jsonl")
TS_FORMATS = ("iso", "epoch_s", "epoch_ms")
REQUIRED = ("event_id", "user_id", "event_type", "item_id", "ts")
# Columns a replay slice carries besides the source's own: where the row was in the
# original file and, for lines that could not be parsed, the raw line.
ROW_COLUMN = "_source_row"
LINE_COLUMN = "_source_line"
MAX_LINE_BYTES = 8 << 20

# Reasons decided while reading (ingest names the others).
MALFORMED_ROW = "malformed_row"
BAD_TS = "bad_ts"
TS_WITHOUT_ZONE = "ts_without_zone"
KNOWN_REASONS = frozenset(
    {
        MALFORMED_ROW,
        BAD_TS,
        TS_WITHOUT_ZONE,
        "missing_event_id",
        "missing_user_id",
        "missing_item_id",
        "id_too_long",
        "unknown_event_type",
        "bad_price",
        "negative_price",
        "bad_quantity",
        "negative_quantity",
        "future_ts",
        "too_late",
        "duplicate",
    }
)


class MappingError(ValueError):
    """A mapping file is invalid; the message names the file, the key and the problem."""


class SourceError(RuntimeError):
    """A landing file cannot be read as its source at all (the batch fails, naming the file)."""


@dataclass(frozen=True)
class Timestamp:
    """How a source writes event time: ``iso``, ``epoch_s``, ``epoch_ms`` or a strptime pattern."""

    format: str = "iso"
    timezone: str | None = None  # zone of naive timestamps; None: naive ones are quarantined
    date_only: bool = False  # the source writes days, not times: no hour-of-day features


@dataclass(frozen=True)
class Policy:
    """A source's quarantine policy: its own threshold and the reasons expected from it."""

    quarantine_threshold: float | None = None
    expected_reasons: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SqlTable:
    """A table source: rows read through a SQLAlchemy connection by an increasing column.

    ``conn_id`` is an Airflow Connection id (or a plain SQLAlchemy URL); None falls back
    to ``Settings.sql_conn_id``. ``cursor`` is the increasing column (an id or an
    ingestion time); with ``cursor_type: time`` an hour takes only rows whose cursor is
    before the hour's end (UTC), so a backfill does not pull later rows into its first hour.
    """

    table: str
    cursor: str
    cursor_type: str = "id"  # id | time
    conn_id: str | None = None
    schema: str | None = None


@dataclass(frozen=True)
class Mapping:
    """A validated column mapping."""

    name: str
    fields: dict[str, str]  # canonical column -> source column
    constants: dict[str, str] = field(default_factory=dict)  # canonical column -> constant text
    event_types: dict[str, str] = field(default_factory=dict)  # lower-case source name -> canonical
    timestamp: Timestamp = Timestamp()
    format: str | None = None  # None: by file extension
    header: bool = True
    columns: tuple[str, ...] = ()  # source columns in file order (headerless CSV)
    delimiter: str = ","
    encoding: str = "utf-8"
    policy: Policy = Policy()
    description: str = ""
    origin: Path | None = None
    sql: SqlTable | None = None  # a table source instead of landing files
    # The shop's own time zone: local hours of its events (``local_hour``, peak hour) are
    # read in it. None: ``Settings.business_tz`` (canonical landing files).
    timezone: str | None = None
    # What a row with a negative quantity is: quarantined (``negative_quantity``) or a
    # ``refund`` event (returns and cancellations of an order-lines table).
    negative_quantity: str = "quarantine"

    def event_id_from_hash(self) -> bool:
        """Whether ``event_id`` is derived from the row (the source has none)."""
        return "event_id" not in self.fields and "event_id" not in self.constants

    def source_columns(self) -> list[str]:
        """The source columns the mapping reads, in a fixed order (first use wins)."""
        return list(dict.fromkeys(self.fields.values()))


def canonical_mapping() -> Mapping:
    """The identity mapping of landing files written with canonical column names."""
    return Mapping(
        name=CANONICAL,
        fields={c: c for c in EVENT_COLUMNS},
        event_types={t: t for t in EVENT_TYPES},
        description="canonical columns (schema v1); naive timestamps are rejected",
    )


def mapping_names() -> list[str]:
    """Names of the shipped mappings."""
    return sorted(p.stem for p in SOURCES_DIR.glob("*.yaml"))


def resolve_mapping_path(name_or_path: str, lake_root: Path | None = None) -> Path:
    """The YAML file of a mapping given by name (lake copy first, then shipped) or by path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.is_file():
        if not candidate.is_file():
            raise MappingError(f"{candidate}: no such mapping file")
        return candidate
    for directory in ([lake_root / LAKE_SOURCES_DIR] if lake_root else []) + [SOURCES_DIR]:
        path = directory / f"{name_or_path}.yaml"
        if path.is_file():
            return path
    raise MappingError(f"no mapping named {name_or_path!r} (shipped: {', '.join(mapping_names())})")


def load_mapping(name_or_path: str, lake_root: Path | None = None) -> Mapping:
    """Load and validate a mapping by name or path; ``canonical`` is the identity mapping."""
    if name_or_path == CANONICAL:
        return canonical_mapping()
    path = resolve_mapping_path(name_or_path, lake_root)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise MappingError(f"{path}: not readable YAML: {error}") from error
    return parse_mapping(document, origin=path)


def parse_mapping(document: Any, *, origin: Path | None = None) -> Mapping:
    """Validate a mapping document (the parsed YAML); errors name the file, key and problem."""
    where = str(origin or "<mapping>")

    def fail(key: str, problem: str) -> MappingError:
        return MappingError(f"{where}: {key}: {problem}")

    if not isinstance(document, dict):
        raise fail("(top level)", "must be a mapping of keys")
    allowed = {
        "name",
        "description",
        "format",
        "header",
        "columns",
        "delimiter",
        "encoding",
        "fields",
        "constants",
        "event_types",
        "timestamp",
        "policy",
        "sql",
        "timezone",
        "negative_quantity",
    }
    unknown = sorted(set(document) - allowed)
    if unknown:
        raise fail(", ".join(unknown), f"unknown key(s); allowed: {', '.join(sorted(allowed))}")
    name = document.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name == CANONICAL:
        raise fail("name", f"must be a lower-case identifier other than {CANONICAL!r}, got {name!r}")
    fmt = document.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise fail("format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    header = document.get("header", True)
    if not isinstance(header, bool):
        raise fail("header", f"must be true or false, got {header!r}")
    columns = document.get("columns") or []
    if not isinstance(columns, list) or not all(isinstance(c, str) and c for c in columns):
        raise fail("columns", "must be a list of column names")
    if not header and not columns:
        raise fail("columns", "a file without header needs its column names in file order")
    if len(set(columns)) != len(columns):
        raise fail("columns", "names must be unique")
    delimiter = document.get("delimiter", ",")
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise fail("delimiter", f"must be one character, got {delimiter!r}")
    encoding = str(document.get("encoding", "utf-8")).lower().replace("_", "-")
    if encoding not in ("utf-8", "latin-1", "utf-16"):
        raise fail("encoding", f"must be utf-8, latin-1 or utf-16, got {encoding!r}")

    fields = document.get("fields") or {}
    constants = {k: str(v) for k, v in (document.get("constants") or {}).items()}
    if not isinstance(fields, dict):
        raise fail("fields", "must map canonical columns to source columns")
    for key in list(fields) + list(constants):
        if key not in EVENT_COLUMNS:
            raise fail(f"fields.{key}", f"not a canonical column ({', '.join(EVENT_COLUMNS)})")
    for key, value in fields.items():
        if not isinstance(value, str) or not value:
            raise fail(f"fields.{key}", f"must name a source column, got {value!r}")
        if columns and value not in columns:
            raise fail(f"fields.{key}", f"{value!r} is not in columns {columns}")
    for key in set(fields) & set(constants):
        raise fail(f"constants.{key}", "is also mapped in fields")
    for key in REQUIRED:
        if key not in fields and key not in constants and key != "event_id":
            raise fail("fields", f"required canonical column {key!r} is not mapped")
    if "ts" in constants:
        raise fail("constants.ts", "event time cannot be a constant")

    types = document.get("event_types") or {}
    if not isinstance(types, dict) or (not types and "event_type" in fields):
        raise fail("event_types", "must map the source's event names to canonical types")
    event_types: dict[str, str] = {}
    for source_name, target in types.items():
        if target not in EVENT_TYPES:
            raise fail(f"event_types.{source_name}", f"{target!r} is not one of {', '.join(EVENT_TYPES)}")
        event_types[str(source_name).strip().lower()] = str(target)
    if "event_type" in constants:
        if constants["event_type"] not in EVENT_TYPES:
            raise fail("constants.event_type", f"{constants['event_type']!r} is not one of {', '.join(EVENT_TYPES)}")
        event_types.setdefault(constants["event_type"], constants["event_type"])

    ts_doc = document.get("timestamp") or {}
    if not isinstance(ts_doc, dict):
        raise fail("timestamp", "must have format and timezone")
    ts_format = str(ts_doc.get("format", "iso"))
    if ts_format not in TS_FORMATS and "%" not in ts_format:
        raise fail("timestamp.format", f"must be {', '.join(TS_FORMATS)} or a strptime pattern, got {ts_format!r}")
    tz = ts_doc.get("timezone")
    if tz is not None:
        try:
            ZoneInfo(str(tz))
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise fail("timestamp.timezone", f"unknown time zone {tz!r}") from error
    # A strptime pattern without a time of day gives days; iso files must say so.
    date_only = ts_doc.get("date_only", "%" in ts_format and not any(d in ts_format for d in _TIME_DIRECTIVES))
    if not isinstance(date_only, bool):
        raise fail("timestamp.date_only", f"must be true or false, got {date_only!r}")
    shop_tz = document.get("timezone", tz)
    if shop_tz is not None:
        try:
            ZoneInfo(str(shop_tz))
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise fail("timezone", f"unknown time zone {shop_tz!r}") from error
    negative = document.get("negative_quantity", "quarantine")
    if negative not in ("quarantine", REFUND):
        raise fail("negative_quantity", f"must be quarantine or {REFUND}, got {negative!r}")

    policy_doc = document.get("policy") or {}
    threshold = policy_doc.get("quarantine_threshold")
    if threshold is not None and not (isinstance(threshold, int | float) and 0 <= threshold <= 1):
        raise fail("policy.quarantine_threshold", f"must be a share in [0, 1], got {threshold!r}")
    expected = policy_doc.get("expected_reasons") or []
    bad = sorted(set(expected) - KNOWN_REASONS)
    if bad:
        raise fail("policy.expected_reasons", f"unknown reason(s) {bad}; known: {', '.join(sorted(KNOWN_REASONS))}")

    sql_doc = document.get("sql")
    sql: SqlTable | None = None
    if sql_doc is not None:
        if not isinstance(sql_doc, dict):
            raise fail("sql", "must give table and cursor (and optionally conn_id, schema, cursor_type)")
        unknown_sql = sorted(set(sql_doc) - {"table", "cursor", "cursor_type", "conn_id", "schema"})
        if unknown_sql:
            raise fail(f"sql.{unknown_sql[0]}", "unknown key; allowed: table, cursor, cursor_type, conn_id, schema")
        for key in ("table", "cursor"):
            if not isinstance(sql_doc.get(key), str) or not sql_doc[key]:
                raise fail(f"sql.{key}", f"must name a {'table' if key == 'table' else 'column'}")
        cursor_type = sql_doc.get("cursor_type", "id")
        if cursor_type not in ("id", "time"):
            raise fail("sql.cursor_type", f"must be id or time, got {cursor_type!r}")
        for key in ("conn_id", "schema"):
            if sql_doc.get(key) is not None and not isinstance(sql_doc[key], str):
                raise fail(f"sql.{key}", f"must be text, got {sql_doc[key]!r}")
        sql = SqlTable(sql_doc["table"], sql_doc["cursor"], cursor_type, sql_doc.get("conn_id"), sql_doc.get("schema"))

    return Mapping(
        name=name,
        fields={str(k): str(v) for k, v in fields.items()},
        constants=constants,
        event_types=event_types,
        timestamp=Timestamp(ts_format, None if tz is None else str(tz), date_only),
        format=fmt,
        header=header,
        columns=tuple(columns),
        delimiter=delimiter,
        encoding=encoding,
        policy=Policy(None if threshold is None else float(threshold), frozenset(expected)),
        description=str(document.get("description", "")),
        origin=origin,
        sql=sql,
        timezone=None if shop_tz is None else str(shop_tz),
        negative_quantity=str(negative),
    )


# File name endings (compared in lower case, after an optional ``.gz``) and how they are read.
# ``.txt`` and other endings are read only when the mapping names a ``format``.
EXTENSIONS: dict[str, str] = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",  # tab-separated whatever the mapping's delimiter
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",  # one JSON object per line
}
TAB_SEPARATED = ".tsv"
# Plain-text endings (and names without one) that a mapping's ``format`` may read; any other
# ending (.xlsx, .zip, ...) is never guessed to be text.
TEXT_ENDINGS = (".txt", ".dat")


def _plain_name(path: Path) -> str:
    """The file name in lower case without a ``.gz`` ending."""
    return path.name.lower().removesuffix(".gz")


def is_gzip(path: Path) -> bool:
    """Whether a landing file is gzip-compressed (by its ending, in any case)."""
    return path.name.lower().endswith(".gz")


# strptime directives that carry a time of day
_TIME_DIRECTIVES = ("%H", "%I", "%M", "%X", "%c", "%T", "%R", "%s")


def local_hour_sql(mapping: Mapping, ts_sql: str, default_tz: str) -> str:
    """DuckDB expression of an event's hour of day in its shop's time zone (TINYINT).

    The zone is the mapping's ``timezone``, else ``default_tz`` (``Settings.business_tz``);
    NULL for a source whose timestamps are days only (their hour would be midnight, a
    constant that says nothing about the user).
    """
    if mapping.timestamp.date_only:
        return "CAST(NULL AS TINYINT)"
    zone = mapping.timezone or default_tz
    ZoneInfo(zone)  # an unknown zone fails before it reaches SQL
    return f"CAST(hour(timezone({_lit(zone)}, {ts_sql})) AS TINYINT)"


def file_format(mapping: Mapping, path: Path) -> str:
    """``csv``, ``parquet`` or ``jsonl`` of a landing file, by its ending in any case (replay slices are Parquet).

    Endings: ``.parquet``; ``.csv``, ``.tsv`` (tab-separated); ``.jsonl``, ``.ndjson``,
    ``.json`` (JSON Lines); each optionally ``.gz``. ``.txt``, ``.dat`` and names without
    an ending are read as the mapping's ``format`` when it names one; anything else is
    ``SourceError`` (unsupported).
    """
    name = _plain_name(path)
    for ending, fmt in EXTENSIONS.items():
        if name.endswith(ending):
            return fmt
    if mapping.format and (name.endswith(TEXT_ENDINGS) or "." not in name):
        return mapping.format
    raise SourceError(
        f"{path}: unsupported file type for source {mapping.name!r} (expected "
        f"{', '.join(EXTENSIONS)}, optionally .gz, in any case; {', '.join(TEXT_ENDINGS)} and names "
        "without an ending only with `format:` in the mapping)"
    )


def file_delimiter(mapping: Mapping, path: Path) -> str:
    """The field delimiter of a CSV landing file: a tab for ``.tsv``, else the mapping's."""
    return "\t" if _plain_name(path).endswith(TAB_SEPARATED) else mapping.delimiter


def _q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def source_select(con: Any, mapping: Mapping, path: Path, index: int) -> str:
    """Load one landing file into DuckDB and return a SELECT of its rows, canonical and typed.

    Columns: the canonical columns as the source's original text, ``event_type_v`` (the
    canonical type or NULL), ``ts_v`` (TIMESTAMPTZ or NULL), ``ts_problem``
    (``bad_ts``/``ts_without_zone``), ``source_index``, ``source_row``, ``source_line``
    (raw text of a line that could not be parsed) and ``malformed``. Raises
    ``SourceError`` naming the file when it cannot be read at all, lacks a required
    column or has a column that cannot be read as text.
    """
    import duckdb

    table = f"src_{index}"
    fmt = file_format(mapping, path)
    quoted = _lit(str(path))
    rejects: str | None = None
    if path.stat().st_size == 0:
        names = list(mapping.columns) or mapping.source_columns()
        cols = ", ".join(f"CAST(NULL AS VARCHAR) AS {_q(c)}" for c in names)
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT {cols}, CAST(NULL AS BIGINT) AS {ROW_COLUMN}, CAST(NULL AS VARCHAR) AS {LINE_COLUMN} WHERE false"
        )
    else:
        try:
            if fmt == "parquet":
                # A view: the file is scanned once, by the validation query, not copied first.
                scan = f"read_parquet({quoted}, file_row_number=true)"
                names = [str(r[0]) for r in con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()]
                row = "" if ROW_COLUMN in names else f", file_row_number + 1 AS {ROW_COLUMN}"
                con.execute(
                    f"CREATE OR REPLACE TEMP VIEW {table} AS SELECT * EXCLUDE (file_row_number){row} FROM {scan}"
                )
            elif fmt == "csv":
                rejects = f"rej_{index}"
                options = [
                    "all_varchar=true",
                    f"header={'true' if mapping.header else 'false'}",
                    f"delim={_lit(file_delimiter(mapping, path))}",
                    f"compression={_lit('gzip' if is_gzip(path) else 'none')}",
                    "quote='\"'",
                    "escape='\"'",
                    f"encoding={_lit(mapping.encoding)}",
                    "store_rejects=true",
                    f"rejects_table={_lit(rejects)}",
                    f"rejects_scan={_lit('scan_' + str(index))}",
                    f"max_line_size={MAX_LINE_BYTES}",
                ]
                names = list(mapping.columns) if not mapping.header else _csv_header(path, mapping)
                options.append("auto_detect=false")
                options.append("columns={" + ", ".join(f"{_lit(c)}: 'VARCHAR'" for c in names) + "}")
                con.execute(
                    f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT *, row_number() OVER () AS {ROW_COLUMN} "
                    f"FROM read_csv({quoted}, {', '.join(options)})"
                )
            else:
                names = mapping.source_columns()
                extracted = ", ".join(
                    f"CASE WHEN ok THEN json_extract_string(line, {_lit('$.' + _q(c))}) END AS {_q(c)}" for c in names
                )
                con.execute(
                    f"""CREATE OR REPLACE TEMP TABLE {table} AS
                    SELECT {extracted}, n AS {ROW_COLUMN},
                           CASE WHEN NOT ok THEN line END AS {LINE_COLUMN}
                    FROM (SELECT line, row_number() OVER () AS n,
                                 coalesce(CASE WHEN json_valid(line) THEN json_type(line) = 'OBJECT' END, false) AS ok
                          FROM read_csv({quoted}, columns={{'line': 'VARCHAR'}}, header=false, delim=chr(0),
                                        compression={_lit("gzip" if is_gzip(path) else "none")},
                                        quote='', escape='', auto_detect=false, max_line_size={MAX_LINE_BYTES})
                          WHERE trim(line) <> '')"""
                )
        except duckdb.Error as error:
            raise SourceError(f"{path}: cannot be read as {fmt} of source {mapping.name!r}: {error}") from error
    return mapped_select(con, mapping, table, index, str(path), rejects)


def mapped_select(con: Any, mapping: Mapping, table: str, index: int, label: str, rejects: str | None = None) -> str:
    """The canonical SELECT (see ``source_select``) over DuckDB relation ``table`` of source rows.

    ``table`` holds the source's columns and ``_source_row`` (and optionally
    ``_source_line``); ``label`` names the file or table in errors; ``rejects`` is the
    DuckDB rejects table of a CSV scan.
    """
    path = label
    described = con.execute(f"DESCRIBE {table}").fetchall()
    types = {str(row[0]): str(row[1]).upper() for row in described}
    missing = [
        f"{c} ({canon})"
        for canon, c in mapping.fields.items()
        if c not in types and (canon in REQUIRED or mapping.name != CANONICAL)
    ]
    if missing:
        raise SourceError(f"{path}: missing required column(s) {', '.join(missing)} for source {mapping.name!r}")
    for column in mapping.source_columns():
        kind = types.get(column)
        if kind is not None and (kind.endswith("[]") or kind.startswith(("STRUCT", "MAP", "UNION", "BLOB"))):
            raise SourceError(f"{path}: column {column!r} has type {kind}, which cannot be mapped to text")

    def raw(canonical: str) -> str:
        if canonical in mapping.constants:
            return _lit(mapping.constants[canonical])
        column = mapping.fields.get(canonical)
        if column is None or column not in types:
            return "CAST(NULL AS VARCHAR)"
        return f"CAST({_q(column)} AS VARCHAR)"

    ts_col = mapping.fields.get("ts")
    ts_v, ts_problem = _ts_sql(mapping, raw("ts"), types.get(ts_col or "", "VARCHAR"), _q(ts_col or ""))
    event_type_v = (
        "CASE lower(trim("
        + raw("event_type")
        + ")) "
        + " ".join(f"WHEN {_lit(k)} THEN {_lit(v)}" for k, v in sorted(mapping.event_types.items()))
        + " END"
    )
    if mapping.negative_quantity == REFUND:  # returns and cancellations: refund events, not quarantined
        event_type_v = (
            f"CASE WHEN TRY_CAST(trim({raw('quantity')}) AS INTEGER) < 0 THEN '{REFUND}' ELSE {event_type_v} END"
        )
    present = [c for c in mapping.source_columns() if c in types]
    if mapping.event_id_from_hash():
        values = ", ".join(f"coalesce(CAST({_q(c)} AS VARCHAR), chr(0))" for c in present)
        occurrence = f"row_number() OVER (PARTITION BY {', '.join(_q(c) for c in present)} ORDER BY {ROW_COLUMN})"
        event_id = f"md5(concat_ws(chr(31), {_lit(mapping.name)}, {values}, CAST({occurrence} AS VARCHAR)))"
    else:
        event_id = raw("event_id")
    line = _q(LINE_COLUMN) if LINE_COLUMN in types else "CAST(NULL AS VARCHAR)"
    canon = ", ".join(f"{event_id if c == 'event_id' else raw(c)} AS {c}" for c in EVENT_COLUMNS)
    parsed = (
        f"SELECT {canon}, {event_type_v} AS event_type_v, {ts_v} AS ts_v, {ts_problem} AS ts_problem, "
        f"{index} AS source_index, CAST({ROW_COLUMN} AS BIGINT) AS source_row, {line} AS source_line, "
        f"{line} IS NOT NULL AS malformed FROM {table}"
    )
    if rejects is None:
        return parsed
    nulls = ", ".join(f"CAST(NULL AS VARCHAR) AS {c}" for c in EVENT_COLUMNS)
    return (
        f"{parsed} UNION ALL SELECT {nulls}, CAST(NULL AS VARCHAR), CAST(NULL AS TIMESTAMPTZ), CAST(NULL AS VARCHAR), "
        f"{index}, CAST(line AS BIGINT), CAST(any_value(csv_line) AS VARCHAR), true FROM {rejects} GROUP BY line"
    )


def _csv_header(path: Path, mapping: Mapping) -> list[str]:
    """Column names from a CSV file's header line (BOM removed), read without DuckDB's sniffer.

    The sniffer gives up on files with one broken quote; with the names given, DuckDB
    reads every other line and hands the broken ones to the rejects table.
    """
    import csv
    import gzip
    import io

    try:
        opener = gzip.open if is_gzip(path) else open
        with opener(path, "rb") as handle:
            first = handle.readline(MAX_LINE_BYTES)
    except (OSError, EOFError) as error:
        raise SourceError(f"{path}: cannot be read: {error}") from error
    text = first.decode("latin-1" if mapping.encoding == "latin-1" else "utf-8", errors="replace").lstrip("\ufeff")
    names = next(csv.reader(io.StringIO(text), delimiter=file_delimiter(mapping, path)), [])
    names = [n.strip() for n in names]
    if not names or len(set(names)) != len(names) or not all(names):
        raise SourceError(f"{path}: header line {text.strip()!r} does not name unique columns")
    return names


_ZONED = r"\d:\d\d(:\d\d(\.\d+)?)?\s*([Zz]|[+-]\d\d(:?\d\d)?|[A-Za-z][A-Za-z_/+0-9-]*)$"


def _ts_sql(mapping: Mapping, text: str, kind: str, column: str) -> tuple[str, str]:
    """(TIMESTAMPTZ expression, problem expression) for the source's event time."""
    tz = mapping.timestamp.timezone
    fmt = mapping.timestamp.format
    if kind.startswith("TIMESTAMP WITH TIME ZONE"):
        return column, f"CASE WHEN {column} IS NULL THEN '{BAD_TS}' END"
    if kind.startswith("TIMESTAMP") and fmt == "iso":
        if tz is None:
            return (
                "CAST(NULL AS TIMESTAMPTZ)",
                f"CASE WHEN {column} IS NULL THEN '{BAD_TS}' ELSE '{TS_WITHOUT_ZONE}' END",
            )
        return f"timezone({_lit(tz)}, {column})", f"CASE WHEN {column} IS NULL THEN '{BAD_TS}' END"
    if fmt == "epoch_s":
        value = f"TRY_CAST({text} AS DOUBLE)"
        ts = f"CASE WHEN abs({value}) < 1e11 THEN to_timestamp({value}) END"
    elif fmt == "epoch_ms":
        value = f"TRY_CAST({text} AS BIGINT)"
        ts = f"CASE WHEN abs({value}) < 1e14 THEN timezone('UTC', epoch_ms({value})) END"
    else:
        naive = f"TRY_CAST({text} AS TIMESTAMP)" if fmt == "iso" else f"try_strptime({text}, {_lit(fmt)})"
        zoned = f"regexp_matches(trim({text}), {_lit(_ZONED)})"
        if "%z" in fmt or "%Z" in fmt:
            ts = f"CAST({naive} AS TIMESTAMPTZ)"
        elif tz is not None:
            ts = f"CASE WHEN {zoned} THEN TRY_CAST(trim({text}) AS TIMESTAMPTZ) ELSE timezone({_lit(tz)}, {naive}) END"
        else:
            ts = f"CASE WHEN {zoned} THEN TRY_CAST(trim({text}) AS TIMESTAMPTZ) END"
            problem = (
                f"CASE WHEN ({ts}) IS NOT NULL THEN NULL WHEN {naive} IS NOT NULL AND NOT {zoned} "
                f"THEN '{TS_WITHOUT_ZONE}' ELSE '{BAD_TS}' END"
            )
            return ts, problem
    return ts, f"CASE WHEN ({ts}) IS NULL THEN '{BAD_TS}' END"


# ---- SQL table sources: rows by an increasing column ----------------------------------


def connection_url(conn_id: str) -> str:
    """The SQLAlchemy URL of ``conn_id``, resolved at run time (never at DAG parse time).

    ``conn_id`` may itself be a SQLAlchemy URL (``sqlite:////data/shop.db``). Else an
    ``AIRFLOW_CONN_<ID>`` environment variable holding a URL is used as written (Airflow
    mangles SQLite paths when it re-renders them); else the Airflow Connection (metadata
    database, secrets backend or a JSON ``AIRFLOW_CONN_<ID>``) through
    ``airflow.sdk.BaseHook``: its extra ``sqlalchemy_url`` if set, a ``sqlite`` host (or
    schema) as the database file, otherwise ``get_uri()`` (``postgres`` as ``postgresql``).
    """
    import os

    if "://" in conn_id:
        return conn_id
    raw = os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}", "").strip()
    if "://" in raw and not raw.startswith("{"):
        return raw
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException as error:
        raise SourceError(
            f"Airflow Connection {conn_id!r} is not defined (nor AIRFLOW_CONN_{conn_id.upper()})"
        ) from error
    extra = conn.extra_dejson
    if extra.get("sqlalchemy_url"):
        return str(extra["sqlalchemy_url"])
    if conn.conn_type == "sqlite":
        return f"sqlite:///{conn.host or conn.schema or ':memory:'}"
    uri = str(conn.get_uri())
    return "postgresql" + uri.removeprefix("postgres") if uri.startswith("postgres://") else uri


def sql_label(mapping: Mapping) -> str:
    """How a table source appears in the ledger and in quarantine's ``source_file``."""
    if mapping.sql is None:
        raise ValueError(f"source {mapping.name!r} is not a table source")
    table = f"{mapping.sql.schema}.{mapping.sql.table}" if mapping.sql.schema else mapping.sql.table
    return f"sql://{mapping.name}/{table}"


def _sql_conn_id(mapping: Mapping, default: str | None) -> str:
    assert mapping.sql is not None
    conn_id = mapping.sql.conn_id or default
    if not conn_id:
        raise MappingError(
            f"{mapping.origin or mapping.name}: sql.conn_id: not set, and no PROFILE_ENGINE_SQL_CONN_ID default"
        )
    return conn_id


@dataclass(frozen=True)
class SqlBatch:
    """Rows of a table source in ``(lower, upper]`` of its cursor, as text."""

    rows: pa.Table  # the mapping's source columns as strings + ``_source_row``
    lower: Any  # exclusive; None: from the first row
    upper: Any  # inclusive; None: the table had no rows
    digest: str  # sha256 of the rows' text, to detect a range changed after ingestion


def _jsonable(value: Any) -> Any:
    """A cursor value as JSON (bound values are compared in the database's own type)."""
    if isinstance(value, datetime):
        return {"datetime": value.isoformat()}
    if value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return {"float": repr(value)}
    return {"text": str(value)}


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if "datetime" in value:
            return datetime.fromisoformat(value["datetime"])
        if "float" in value:
            return float(value["float"])
        return value["text"]
    return value


# Rows read per query while looking for the end of an hour's id range; doubled each time,
# so an hour reads at most about twice its own rows plus this.
ID_SCAN_FIRST = 1000


def _text(value: Any) -> str | None:
    """A database value as the text the mapping reads (integers never through float)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _rows_table(mapping: Mapping, names: list[str], selected: list[Any]) -> pa.Table:
    """The mapping's source columns of ``selected`` as text, plus ``_source_row`` (1-based)."""
    wanted = set(mapping.source_columns())
    return pa.table(
        {
            **{n: pa.array([_text(r[i]) for r in selected], pa.string()) for i, n in enumerate(names) if n in wanted},
            ROW_COLUMN: pa.array(range(1, len(selected) + 1), pa.int64()),
        }
    )


def _event_times(mapping: Mapping, names: list[str], selected: list[Any]) -> list[datetime | None]:
    """Each row's event time as validation will read it (the mapping's format and zone); None if unreadable."""
    con = db.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        select = sql_select(con, mapping, _rows_table(mapping, names, selected), 0)
        return [r[0] for r in con.execute(f"SELECT ts_v FROM ({select}) ORDER BY source_row").fetchall()]
    finally:
        con.close()


def _id_range_end(
    conn: Any,
    mapping: Mapping,
    query: Any,
    cursor: Any,
    names: list[str],
    low: Any,
    end: datetime,
    impossible: datetime,
) -> list[Any]:
    """The rows after ``low`` in id order up to, not including, the first one whose event time is at or after ``end``.

    That row and everything after it wait for a later hour, so each row is taken once
    and by the hour it belongs to when ids increase with event time; a late row (old
    time, new id) joins the hour whose rows surround it. Rows without a readable time
    and rows dated at or after ``impossible`` (after the moment of reading: no real
    event) do not stop the range; they are taken and quarantined (``bad_ts``,
    ``future_ts``), so one bad row cannot hold the source back for ever.
    """
    position = names.index(cursor.name)
    taken: list[Any] = []
    start, limit = low, ID_SCAN_FIRST
    while True:
        page = query.order_by(cursor).limit(limit)
        if start is not None:
            page = page.where(cursor > start)
        chunk = list(conn.execute(page).fetchall())
        for index, ts in enumerate(_event_times(mapping, names, chunk) if chunk else []):
            if ts is not None and end <= ts < impossible:
                return taken + chunk[:index]
        taken += chunk
        if len(chunk) < limit:
            return taken
        start, limit = chunk[-1][position], limit * 2


def read_sql_batch(
    mapping: Mapping,
    *,
    lower: Any,
    upper: Any = None,
    before: datetime | None = None,
    impossible_from: datetime | None = None,
    default_conn_id: str | None = None,
    bounded: bool = False,
) -> SqlBatch:
    """Read a table source's rows with ``lower < cursor <= upper``.

    ``lower``/``upper`` are JSON cursor values from the ledger (None: unbounded). With
    ``bounded`` (a rerun) the range is exactly the ledger's, an empty one included.
    Otherwise (a first extraction) the upper bound is chosen here. ``before`` is the
    end of the hour being extracted: a time cursor takes the rows with cursor before it
    (naive UTC, as SQLAlchemy binds it); an id cursor takes rows in id order up to the
    first whose event time is at or after it (``_id_range_end``; rows dated at or after
    ``impossible_from`` never stop it). Without ``before`` the bound is the largest
    cursor now in the table. Rows come ordered by the cursor and numbered from 1;
    every value is text (integers are never read through float, so 19-digit ids survive).
    """
    import sqlalchemy as sa

    assert mapping.sql is not None
    spec = mapping.sql
    label = sql_label(mapping)
    try:
        engine = sa.create_engine(connection_url(_sql_conn_id(mapping, default_conn_id)))
    except sa.exc.ArgumentError as error:
        raise SourceError(f"{label}: not a SQLAlchemy URL: {error}") from error
    try:
        with engine.connect() as conn:
            try:
                table = sa.Table(spec.table, sa.MetaData(), schema=spec.schema, autoload_with=conn)
            except sa.exc.NoSuchTableError as error:
                raise SourceError(f"{label}: no table {spec.table!r} in the database") from error
            names = list(dict.fromkeys([*mapping.source_columns(), spec.cursor]))
            missing = [n for n in names if n not in table.c]
            if missing:
                raise SourceError(
                    f"{label}: missing required column(s) {', '.join(missing)} for source {mapping.name!r}"
                )
            cursor = table.c[spec.cursor]
            columns = sa.select(*[table.c[n] for n in names])
            low = _from_json(lower)
            high = _from_json(upper)
            selected: list[Any] = []
            if high is None and not bounded and spec.cursor_type == "id" and before is not None:
                end = before.astimezone(UTC)
                impossible = max(end, (impossible_from or end).astimezone(UTC))
                selected = _id_range_end(conn, mapping, columns, cursor, names, low, end, impossible)
                high = selected[-1][names.index(spec.cursor)] if selected else low
            else:
                if high is None and not bounded:
                    query = sa.select(sa.func.max(cursor))
                    if low is not None:
                        query = query.where(cursor > low)
                    if before is not None and spec.cursor_type == "time":
                        query = query.where(cursor < before.astimezone(UTC).replace(tzinfo=None))
                    high = conn.execute(query).scalar()
                    if high is None:  # nothing new: the range is empty, the mark stays
                        high = low
                if high is not None:
                    query = columns.where(cursor <= high).order_by(cursor)
                    if low is not None:
                        query = query.where(cursor > low)
                    selected = list(conn.execute(query).fetchall())
    except sa.exc.SQLAlchemyError as error:
        raise SourceError(f"{label}: cannot be read: {error}") from error
    finally:
        engine.dispose()

    digest = hashlib.sha256()
    for r in selected:
        digest.update("\x1f".join("\x00" if v is None else str(_text(v)) for v in r).encode() + b"\x1e")
    return SqlBatch(_rows_table(mapping, names, selected), lower, _jsonable(high), digest.hexdigest())


def sql_select(con: Any, mapping: Mapping, rows: pa.Table, index: int) -> str:
    """Register a table source's rows in DuckDB and return their canonical SELECT."""
    table = f"src_{index}"
    con.register(f"{table}_arrow", rows)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT * FROM {table}_arrow")
    con.unregister(f"{table}_arrow")
    return mapped_select(con, mapping, table, index, sql_label(mapping))


# ---- replay: one large file -> landing files by event hour -------------------------


@dataclass(frozen=True)
class ReplayPlan:
    """What ``land_for_replay`` wrote: the hours to process and where the rows went."""

    source: str
    file: str
    first: datetime
    last: datetime
    rows: int
    files: int
    rows_per_hour: dict[str, int]
    outliers_before: int  # ts far before the main range: landed in the first hour
    outliers_after: int  # ts far after it: landed in the last hour
    without_ts: int  # unreadable ts or malformed line: landed in the first hour

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "source": self.source,
            "file": self.file,
            "first_hour": format_hour(self.first),
            "last_hour": format_hour(self.last),
            "hours": len(self.rows_per_hour),
            "rows": self.rows,
            "files": self.files,
            "outliers_before": self.outliers_before,
            "outliers_after": self.outliers_after,
            "without_ts": self.without_ts,
        }


# A replay's main range (``main_range``): a group of hours beyond a gap of more than a month,
# further away than the span of the rest and with fewer rows than the rest, is a stray
# (epoch 0, a year typo), not history; every other gap is processed hour by hour.
OUTLIER_GAP_HOURS = 31 * 24


def main_range(
    hour_counts: dict[datetime, int], outlier_gap_hours: int = OUTLIER_GAP_HOURS
) -> tuple[datetime, datetime]:
    """The span of a file's event hours, without stray timestamps far from the rest.

    Hours are grouped where they are at most ``outlier_gap_hours`` apart, so nights,
    closing days and holidays of a few weeks never split the file. From the group
    holding the median row, neighbouring groups are joined (the nearer first) unless a
    group is further away than both the gap limit and the span joined so far and holds
    fewer rows than the groups joined so far. A stray year neither stretches the replay
    over thousands of empty hours nor disappears: its rows go to the nearest end of the
    range and are counted as outliers.
    """
    if not hour_counts:
        raise ValueError("no event has a readable timestamp")
    limit = timedelta(hours=outlier_gap_hours)
    groups: list[list[Any]] = []  # [first hour, last hour, rows]
    for hour in sorted(hour_counts):
        if groups and hour - groups[-1][1] <= limit:
            groups[-1][1] = hour
            groups[-1][2] += hour_counts[hour]
        else:
            groups.append([hour, hour, hour_counts[hour]])
    total = sum(hour_counts.values())
    seen = 0
    low = high = len(groups) - 1
    for index, group in enumerate(groups):
        seen += group[2]
        if 2 * seen >= total:
            low = high = index
            break

    def joins(group: list[Any], gap: timedelta) -> bool:
        joined = sum(g[2] for g in groups[low : high + 1])
        return bool(group[2] >= joined or gap <= max(limit, groups[high][1] - groups[low][0]))

    while True:
        joinable: list[tuple[timedelta, int]] = []
        if low > 0 and joins(groups[low - 1], gap := groups[low][0] - groups[low - 1][1]):
            joinable.append((gap, -1))
        if high < len(groups) - 1 and joins(groups[high + 1], gap := groups[high + 1][0] - groups[high][1]):
            joinable.append((gap, 1))
        if not joinable:
            return groups[low][0], groups[high][1]
        if min(joinable)[1] < 0:  # the nearer joinable neighbour first
            low -= 1
        else:
            high += 1


def land_for_replay(settings: Settings, file: Path, mapping: Mapping) -> ReplayPlan:
    """Split ``file`` of source ``mapping`` into landing files, one per event hour.

    Each hour H of the main range gets ``landing/events/dt=/hour=H/source=<name>/<file>-<digest>.parquet``
    holding the source's own columns as text (plus the original row number and, for
    unparseable lines, the raw line), so validation applies the same mapping and
    quarantines the original values. Rows outside the main range or without a
    readable time land in the first or last hour and are validated there (quarantined
    as too_late / future_ts / bad_ts, and counted). The same file replayed again
    lands the same files under the same names.
    """
    lake = Lake(settings.lake)
    if mapping.origin is not None and mapping.origin.parent != SOURCES_DIR:
        target = lake.path(LAKE_SOURCES_DIR, f"{mapping.name}.yaml")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mapping.origin, target)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", file.name.split(".")[0])
    con = db.connect(settings)
    try:
        con.execute("SET TimeZone = 'UTC'")
        select = source_select(con, mapping, file, 0)
        con.execute(
            f"CREATE TEMP TABLE mapped AS SELECT source_row, source_line, date_trunc('hour', ts_v) AS h FROM ({select})"
        )
        counts = {
            row[0].astimezone(UTC): int(row[1])
            for row in con.execute("SELECT h, count(*) FROM mapped WHERE h IS NOT NULL GROUP BY h").fetchall()
        }
        first, last = main_range(counts)
        con.execute(
            "CREATE TEMP TABLE placed AS SELECT source_row, source_line, "
            "CASE WHEN h IS NULL OR h < $first THEN $first WHEN h > $last THEN $last ELSE h END AS landing_hour, "
            "h IS NULL AS no_ts, h < $first AS before, h > $last AS after FROM mapped",
            {"first": first, "last": last},
        )
        stats = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE before), count(*) FILTER (WHERE after), count(*) FILTER (WHERE no_ts) FROM placed"
        ).fetchall()[0]
        columns = [c for c in (list(mapping.columns) or mapping.source_columns())]
        described = {str(r[0]) for r in con.execute("DESCRIBE src_0").fetchall()}
        keep = ", ".join(f"CAST(s.{_q(c)} AS VARCHAR) AS {_q(c)}" for c in columns if c in described)
        per_hour: dict[str, int] = {}
        hours = [
            r[0].astimezone(UTC) for r in con.execute("SELECT DISTINCT landing_hour FROM placed ORDER BY 1").fetchall()
        ]
        for hour in hours:
            directory = lake.partition(lk.LANDING, hour) / f"{SOURCE_KEY}={mapping.name}"
            directory.mkdir(parents=True, exist_ok=True)
            target = directory / f"{stem}-{digest}.parquet"
            tmp = lake.tmp_dir() / target.name
            con.execute(
                f"""COPY (
                    SELECT {keep + ", " if keep else ""}p.source_row AS {ROW_COLUMN}, p.source_line AS {LINE_COLUMN}
                    FROM placed p LEFT JOIN src_0 s ON s.{ROW_COLUMN} = p.source_row AND p.source_line IS NULL
                    WHERE p.landing_hour = $hour ORDER BY p.source_row
                ) TO {_lit(str(tmp))} (FORMAT parquet, COMPRESSION zstd)""",
                {"hour": hour},
            )
            tmp.replace(target)
            shutil.rmtree(tmp.parent, ignore_errors=True)
            per_hour[format_hour(hour)] = int(
                con.execute("SELECT count(*) FROM placed WHERE landing_hour = $hour", {"hour": hour}).fetchall()[0][0]
            )
    finally:
        con.close()
    return ReplayPlan(
        source=mapping.name,
        file=str(file),
        first=first,
        last=last,
        rows=int(stats[0]),
        files=len(per_hour),
        rows_per_hour=per_hour,
        outliers_before=int(stats[1]),
        outliers_after=int(stats[2]),
        without_ts=int(stats[3]),
    )
