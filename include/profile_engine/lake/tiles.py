"""The file layout of the state's sealed tiles (``state_tiles/bucket=N/<table>/dt=D/hour=HH.parquet`` and a day's
compacted ``day.parquet``): which build sealed a file, and the newest. The state's tables and what it seals are in
``profile_engine.profiles.state``; docs/architecture.md ("Sealed tiles").
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from pathlib import Path

from profile_engine.hours import MS_HOUR

SEALED_MS = "sealed_ms"  # tile column: the end of the state whose checkpoint sealed the row
DAY_FILE = "day.parquet"  # a day's tile files compacted into one


def day_start_ms(day_dir: Path) -> int:
    """The first ms of a tile folder ``dt=YYYY-MM-DD``."""
    return int(datetime.fromisoformat(day_dir.name.removeprefix("dt=")).replace(tzinfo=UTC).timestamp()) * 1000


def sealed_hour_ms(tile: Path) -> int:
    """The end of the hour whose build sealed an hourly tile file ``hour=HH.parquet`` (its rows' ``sealed_ms``)."""
    return day_start_ms(tile.parent) + (int(tile.name.removeprefix("hour=").removesuffix(".parquet")) + 1) * MS_HOUR


def newest_sealed_ms(root: Path) -> int | None:
    """The end of the newest build that sealed tiles under ``root`` (``state_tiles/``), over every bucket and table;
    None: no tile. Per table, its newest day: hourly tiles by name (``sealed_hour_ms``), a compacted day file by
    the ``sealed_ms`` statistics of its footer (read only where a row group has none). A file removed meanwhile
    (a compaction, retention) is skipped."""
    newest: int | None = None
    for table_dir in root.glob("bucket=*/*"):
        for day in sorted(table_dir.glob("dt=*"), reverse=True):
            found: list[int | None] = [sealed_hour_ms(f) for f in day.glob("hour=*.parquet")]
            with contextlib.suppress(FileNotFoundError):
                found.append(_largest(day / DAY_FILE, SEALED_MS))
            ends = [e for e in found if e is not None]
            if ends:
                newest = max(ends) if newest is None else max(newest, *ends)
                break
    return newest


def _largest(path: Path, column: str) -> int | None:
    """The largest value of an integer ``column`` of a Parquet file, from its footer's statistics; None: no row."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    index = meta.schema.names.index(column)
    values = []
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(index).statistics
        if meta.row_group(group).num_rows == 0:
            continue
        if stats is None or not stats.has_min_max:
            return max(pq.read_table(path, columns=[column]).column(column).to_pylist(), default=None)
        values.append(int(stats.max))
    return max(values, default=None)
