"""The opt-out list: users who withdrew marketing consent, from files under the lake and a SQL table.

Opted-out users are never exported nor contacted: docs/segments.md.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from profile_engine.contracts.profiles import USER_ID
from profile_engine.lake import storage as lk

OPTOUT_TABLE = "marketing_optouts"
_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


def read_optouts(lake: lk.Lake, engine: Any | None = None, table: str = OPTOUT_TABLE) -> pa.Table:
    """Users who withdrew marketing consent (one ``user_id`` column, distinct, sorted).

    Every ``*.csv`` (with a ``user_id`` header) and ``*.parquet`` file under
    ``<lake>/_meta/optout/``, plus, when a SQLAlchemy ``engine`` is given (from an Airflow
    Connection), the ``user_id`` column of SQL table ``table``. The list is read when the
    hour is published, so a rerun honours opt-outs recorded since.
    """
    ids: set[str] = set()
    folder = lake.path(lk.OPTOUT)
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if path.suffix == ".csv":
            options = pacsv.ConvertOptions(column_types={USER_ID: pa.string()})
            found = pacsv.read_csv(path, convert_options=options)
        elif path.suffix == ".parquet":
            found = pq.read_table(path)
        else:
            continue
        if USER_ID not in found.column_names:
            raise ValueError(f"{path}: an opt-out file needs a {USER_ID!r} column, found {found.column_names}")
        ids.update(str(v) for v in found.column(USER_ID).to_pylist() if v not in (None, ""))
    if engine is not None:
        import sqlalchemy as sa

        if not _IDENTIFIER_RE.match(table):
            raise ValueError(f"opt-out table name {table!r} is not a plain SQL identifier")
        with engine.connect() as connection:
            rows = connection.execute(sa.text(f"SELECT {USER_ID} FROM {table}")).fetchall()
        ids.update(str(row[0]) for row in rows if row[0] not in (None, ""))
    return pa.table({USER_ID: pa.array(sorted(ids), pa.string())})
