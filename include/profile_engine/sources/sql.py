"""Table sources: rows read through SQLAlchemy by an increasing cursor column, an hour at a time.

docs/sources.md ("Table sources").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from profile_engine.lake import db
from profile_engine.sources.mappings import Mapping, MappingError, SourceError
from profile_engine.sources.readers import ROW_COLUMN, mapped_select


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
            names = [n for n in dict.fromkeys([*mapping.source_columns(), spec.cursor]) if n in table.c]
            missing = mapping.missing_columns(names) + ([] if spec.cursor in table.c else [f"{spec.cursor} (cursor)"])
            if missing:
                raise SourceError(
                    f"{label}: missing required column(s) {', '.join(missing)} for source {mapping.name!r}; "
                    f"the table has columns: {', '.join(c.name for c in table.c)}"
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
