"""Source mappings: YAML files that say how a source's columns become the canonical event.

Loading validates a mapping and names the file, the key and the problem; docs/sources.md.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from profile_engine.config import CONFIG_DIR
from profile_engine.contracts.events import EVENT_COLUMNS, EVENT_TYPES, REFUND

SOURCES_DIR = CONFIG_DIR / "sources"
# Mappings given by path are copied here by a replay, so reruns find them by name.
LAKE_SOURCES_DIR = "_meta/sources"
CANONICAL = "canonical"
# Landing files of a mapped source sit in a ``source=<name>`` folder of their arrival partition.
SOURCE_KEY = "source"
FORMATS = ("csv", "parquet", "jsonl")
TS_FORMATS = ("iso", "epoch_s", "epoch_ms")
REQUIRED = ("event_id", "user_id", "event_type", "item_id", "ts")
# Per-column cleaning steps (``clean:``), applied in order to the text of a mapped column.
CLEAN_STEPS = ("trim", "lower", "upper", "integer")

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
    fields: dict[str, str]  # canonical column -> source column (its first spelling)
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
    # Further spellings of a canonical column's source column (a file has one of them).
    alternatives: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # canonical column -> cleaning steps (``CLEAN_STEPS``) applied in order to its text.
    clean: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def spellings(self, canonical: str) -> tuple[str, ...]:
        """The source column names that ``canonical`` may have in a file, preferred first."""
        if canonical not in self.fields:
            return ()
        return (self.fields[canonical], *self.alternatives.get(canonical, ()))

    def missing_columns(self, present: Collection[str]) -> list[str]:
        """The mapped columns none of whose spellings is in ``present``, as ``A or B (canonical)``.

        Canonical landing files may leave out optional columns (they are null).
        """
        return [
            f"{' or '.join(self.spellings(canon))} ({canon})"
            for canon in self.fields
            if not any(c in present for c in self.spellings(canon)) and (canon in REQUIRED or self.name != CANONICAL)
        ]

    def event_id_from_hash(self) -> bool:
        """Whether ``event_id`` is derived from the row (the source has none)."""
        return "event_id" not in self.fields and "event_id" not in self.constants

    def source_columns(self) -> list[str]:
        """The source columns the mapping reads, in a fixed order (first use wins)."""
        return list(dict.fromkeys(c for canon in self.fields for c in self.spellings(canon)))


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
        "clean",
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
    spellings: dict[str, tuple[str, ...]] = {}
    for key, value in fields.items():
        names = value if isinstance(value, list) else [value]
        if not names or not all(isinstance(n, str) and n for n in names):
            raise fail(f"fields.{key}", f"must name a source column or list its spellings, got {value!r}")
        for spelled in names:
            if columns and spelled not in columns:
                raise fail(f"fields.{key}", f"{spelled!r} is not in columns {columns}")
        spellings[str(key)] = tuple(dict.fromkeys(names))
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

    clean_doc = document.get("clean") or {}
    if not isinstance(clean_doc, dict):
        raise fail("clean", f"must map canonical columns to steps ({', '.join(CLEAN_STEPS)})")
    clean: dict[str, tuple[str, ...]] = {}
    for key, steps in clean_doc.items():
        if key not in EVENT_COLUMNS:
            raise fail(f"clean.{key}", f"not a canonical column ({', '.join(EVENT_COLUMNS)})")
        if key not in fields:
            raise fail(f"clean.{key}", "not mapped in fields (only values read from the file are cleaned)")
        listed = steps if isinstance(steps, list) else [steps]
        for step in listed:
            if step not in CLEAN_STEPS:
                raise fail(f"clean.{key}", f"unknown step {step!r}; known: {', '.join(CLEAN_STEPS)}")
        if "lower" in listed and "upper" in listed:
            raise fail(f"clean.{key}", "lower and upper exclude each other")
        clean[str(key)] = tuple(str(step) for step in listed)

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
        fields={k: v[0] for k, v in spellings.items()},
        alternatives={k: v[1:] for k, v in spellings.items() if len(v) > 1},
        clean=clean,
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


# strptime directives that carry a time of day
_TIME_DIRECTIVES = ("%H", "%I", "%M", "%X", "%c", "%T", "%R", "%s")
