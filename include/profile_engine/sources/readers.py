"""Reading landing files through a mapping: file types, delimiters, the canonical SELECT, event times.

Values are read as text, never through float, so 19-digit ids survive; docs/sources.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from profile_engine.contracts.events import EVENT_COLUMNS, REFUND
from profile_engine.sources.mappings import (
    BAD_TS,
    TS_WITHOUT_ZONE,
    Mapping,
    SourceError,
)

# Columns a replay slice carries besides the source's own: where the row was in the
# original file and, for lines that could not be parsed, the raw line.
ROW_COLUMN = "_source_row"
LINE_COLUMN = "_source_line"
MAX_LINE_BYTES = 8 << 20

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
    return f"CAST(hour(timezone({quote_literal(zone)}, {ts_sql})) AS TINYINT)"


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


def quote_ident(identifier: str) -> str:
    """A DuckDB identifier in double quotes."""
    return '"' + identifier.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """A DuckDB string literal in single quotes."""
    return "'" + text.replace("'", "''") + "'"


def clean_sql(steps: tuple[str, ...], text: str) -> str:
    """DuckDB expression applying a mapping's cleaning steps, in order, to the text expression ``text``.

    ``integer`` drops the zero decimals of a whole number written as a float (``17850.0``,
    ``1234567890123456789.000``), as text, never through float; any other value stays as written.
    """
    for step in steps:
        if step == "trim":
            text = f"trim({text})"
        elif step in ("lower", "upper"):
            text = f"{step}({text})"
        elif step == "integer":
            text = f"regexp_replace({text}, '^(\\s*[+-]?[0-9]+)\\.0*(\\s*)$', '\\1\\2')"
        else:
            raise ValueError(f"unknown cleaning step {step!r}")
    return text


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
    quoted = quote_literal(str(path))
    rejects: str | None = None
    if path.stat().st_size == 0:
        names = list(mapping.columns) or mapping.source_columns()
        cols = ", ".join(f"CAST(NULL AS VARCHAR) AS {quote_ident(c)}" for c in names)
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
                    f"delim={quote_literal(file_delimiter(mapping, path))}",
                    f"compression={quote_literal('gzip' if is_gzip(path) else 'none')}",
                    "quote='\"'",
                    "escape='\"'",
                    f"encoding={quote_literal(mapping.encoding)}",
                    "store_rejects=true",
                    f"rejects_table={quote_literal(rejects)}",
                    f"rejects_scan={quote_literal('scan_' + str(index))}",
                    f"max_line_size={MAX_LINE_BYTES}",
                ]
                names = list(mapping.columns) if not mapping.header else _csv_header(path, mapping)
                options.append("auto_detect=false")
                options.append("columns={" + ", ".join(f"{quote_literal(c)}: 'VARCHAR'" for c in names) + "}")
                con.execute(
                    f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT *, row_number() OVER () AS {ROW_COLUMN} "
                    f"FROM read_csv({quoted}, {', '.join(options)})"
                )
            else:
                names = mapping.source_columns()
                extracted = ", ".join(
                    f"CASE WHEN ok THEN json_extract_string(line, {quote_literal('$.' + quote_ident(c))}) END AS {quote_ident(c)}"
                    for c in names
                )
                con.execute(
                    f"""CREATE OR REPLACE TEMP TABLE {table} AS
                    SELECT {extracted}, n AS {ROW_COLUMN},
                           CASE WHEN NOT ok THEN line END AS {LINE_COLUMN}
                    FROM (SELECT line, row_number() OVER () AS n,
                                 coalesce(CASE WHEN json_valid(line) THEN json_type(line) = 'OBJECT' END, false) AS ok
                          FROM read_csv({quoted}, columns={{'line': 'VARCHAR'}}, header=false, delim=chr(0),
                                        compression={quote_literal("gzip" if is_gzip(path) else "none")},
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
    missing = mapping.missing_columns(types)
    if missing:
        raise SourceError(
            f"{path}: missing required column(s) {', '.join(missing)} for source {mapping.name!r}; "
            f"the file has columns: {', '.join(c for c in types if c not in (ROW_COLUMN, LINE_COLUMN)) or '(none)'}"
        )
    for column in mapping.source_columns():
        kind = types.get(column)
        if kind is not None and (kind.endswith("[]") or kind.startswith(("STRUCT", "MAP", "UNION", "BLOB"))):
            raise SourceError(f"{path}: column {column!r} has type {kind}, which cannot be mapped to text")

    def raw(canonical: str) -> str:
        if canonical in mapping.constants:
            return quote_literal(mapping.constants[canonical])
        present = [f"CAST({quote_ident(c)} AS VARCHAR)" for c in mapping.spellings(canonical) if c in types]
        if not present:
            return "CAST(NULL AS VARCHAR)"
        text = present[0] if len(present) == 1 else f"coalesce({', '.join(present)})"
        return clean_sql(mapping.clean.get(canonical, ()), text)

    ts_col = next((c for c in mapping.spellings("ts") if c in types), None)
    ts_v, ts_problem = _ts_sql(mapping, raw("ts"), types.get(ts_col or "", "VARCHAR"), quote_ident(ts_col or ""))
    event_type_v = (
        "CASE lower(trim("
        + raw("event_type")
        + ")) "
        + " ".join(f"WHEN {quote_literal(k)} THEN {quote_literal(v)}" for k, v in sorted(mapping.event_types.items()))
        + " END"
    )
    if mapping.negative_quantity == REFUND:  # returns and cancellations: refund events, not quarantined
        event_type_v = (
            f"CASE WHEN TRY_CAST(trim({raw('quantity')}) AS INTEGER) < 0 THEN '{REFUND}' ELSE {event_type_v} END"
        )
    present = [c for c in mapping.source_columns() if c in types]
    if mapping.event_id_from_hash():
        values = ", ".join(f"coalesce(CAST({quote_ident(c)} AS VARCHAR), chr(0))" for c in present)
        occurrence = (
            f"row_number() OVER (PARTITION BY {', '.join(quote_ident(c) for c in present)} ORDER BY {ROW_COLUMN})"
        )
        event_id = f"md5(concat_ws(chr(31), {quote_literal(mapping.name)}, {values}, CAST({occurrence} AS VARCHAR)))"
    else:
        event_id = raw("event_id")
    line = quote_ident(LINE_COLUMN) if LINE_COLUMN in types else "CAST(NULL AS VARCHAR)"
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
        return f"timezone({quote_literal(tz)}, {column})", f"CASE WHEN {column} IS NULL THEN '{BAD_TS}' END"
    if fmt == "epoch_s":
        value = f"TRY_CAST({text} AS DOUBLE)"
        ts = f"CASE WHEN abs({value}) < 1e11 THEN to_timestamp({value}) END"
    elif fmt == "epoch_ms":
        value = f"TRY_CAST({text} AS BIGINT)"
        ts = f"CASE WHEN abs({value}) < 1e14 THEN timezone('UTC', epoch_ms({value})) END"
    else:
        naive = f"TRY_CAST({text} AS TIMESTAMP)" if fmt == "iso" else f"try_strptime({text}, {quote_literal(fmt)})"
        zoned = f"regexp_matches(trim({text}), {quote_literal(_ZONED)})"
        if "%z" in fmt or "%Z" in fmt:
            ts = f"CAST({naive} AS TIMESTAMPTZ)"
        elif tz is not None:
            ts = f"CASE WHEN {zoned} THEN TRY_CAST(trim({text}) AS TIMESTAMPTZ) ELSE timezone({quote_literal(tz)}, {naive}) END"
        else:
            ts = f"CASE WHEN {zoned} THEN TRY_CAST(trim({text}) AS TIMESTAMPTZ) END"
            problem = (
                f"CASE WHEN ({ts}) IS NOT NULL THEN NULL WHEN {naive} IS NOT NULL AND NOT {zoned} "
                f"THEN '{TS_WITHOUT_ZONE}' ELSE '{BAD_TS}' END"
            )
            return ts, problem
    return ts, f"CASE WHEN ({ts}) IS NULL THEN '{BAD_TS}' END"
