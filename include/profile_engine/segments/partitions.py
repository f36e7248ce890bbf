"""One bucket's users in the segments-side layers (``segments``, ``contacts``), however an hour was written.

``publish_segments`` writes these layers per bucket (a folder per bucket of the hour's snapshot, users placed
by ``bucket_sql`` over ``Settings.buckets``; the hour-level manifest lists ``buckets`` and ``bucket_count``);
older code wrote an hour whole. Readers that go one bucket at a time (``publish_segments``' previous hour and
recent contacts, ``restate_segments``, the run report's uplift) read through ``bucket_rows``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from itertools import chain
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from profile_engine.contracts.events import bucket_sql
from profile_engine.contracts.profiles import USER_ID
from profile_engine.lake import db
from profile_engine.lake import storage as lk
from profile_engine.segments.rules import sql_literal


def bucket_rows(
    lake: lk.Lake,
    layer: str,
    manifests: Mapping[datetime, Mapping[str, Any]],
    bucket: int,
    count: int,
    columns: Sequence[str],
) -> pa.Table | None:
    """``columns`` of the rows of ``bucket``'s users (``bucket_sql`` over ``count`` buckets) in the committed
    ``layer`` partitions of the hours of ``manifests`` (their hour-level manifests, read once by the caller for
    every bucket), with the types of the layer's files.

    An hour written per bucket over ``count`` buckets (its manifest's ``bucket_count``) is read from that
    bucket's folder; no folder, or one not committed, holds none of the bucket's users (a partition's data
    files skip an uncommitted folder). An hour written whole (by older code) or over another count is
    filtered to the bucket's users while DuckDB reads it (sorted by ``user_id``). So one bucket is held
    either way. The rows of the per-bucket hours come first, in the order of ``manifests``. None: the hours
    have no data file at all (no ``manifests``).
    """
    own: list[datetime] = []
    whole: list[Path] = []
    for hour, manifest in manifests.items():
        if manifest.get("bucket_count") == count:
            if bucket in manifest.get("buckets", ()) and lake.committed(layer, hour, bucket):
                own.append(hour)
        else:
            whole.extend(lake.data_files(layer, hour))
    first = next(  # lazily: the bucket's own files first, any file of the hours only when the bucket has none
        chain(
            (f for hour in own for f in lake.data_files(layer, hour, bucket)),
            whole,
            (f for hour in manifests for f in lake.data_files(layer, hour)),
        ),
        None,
    )
    if first is None:
        return None
    schema = pq.read_schema(first)
    wanted = pa.schema([schema.field(c) for c in columns])
    tables = [lake.read(layer, hour, bucket, columns=list(columns)).cast(wanted) for hour in own]
    if whole:
        con = db.cursor()
        try:
            listed = ", ".join(sql_literal(str(f)) for f in whole)
            tables.append(
                con.sql(
                    f"SELECT {', '.join(columns)} FROM read_parquet([{listed}], hive_partitioning = false) "
                    f"WHERE {bucket_sql(USER_ID, count)} = {int(bucket)} ORDER BY {USER_ID}"
                )
                .to_arrow_table()
                .cast(wanted)
            )
        finally:
            con.close()
    if not tables:
        return wanted.empty_table()
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
