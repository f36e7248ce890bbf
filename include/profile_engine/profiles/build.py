"""Lake stages of the profiles: build an hour of a bucket (or a range), read and upgrade state checkpoints,
publish the snapshot of an hour. docs/features.md.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias, cast
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profile_engine.config import Settings
from profile_engine.contracts.events import LOCAL_HOUR, STAGED_SCHEMA
from profile_engine.contracts.profiles import (
    CATEGORY_ID,
    CHANGE_NEW,
    CHANGE_TRACKED,
    FREQUENCY_ORDERS,
    LIFECYCLE_STAGE,
    MONETARY_TOTAL,
    RECENCY_HOURS,
    RFM_SEGMENT,
    TIMESTAMP,
    TOP_CATEGORIES,
    USER_ID,
    snapshot_schema,
)
from profile_engine.contracts.traits import load_traits, traits_digest
from profile_engine.hours import HOUR, MS_HOUR, floor_hour, format_hour, hour_range, parse_hour
from profile_engine.lake import db, faults
from profile_engine.lake.storage import (
    DATA_FILE,
    INTERESTS,
    MANIFEST,
    PROFILE_CHANGES,
    PROFILES,
    STAGING,
    STATE,
    STATE_TILES,
    Lake,
    manifest_extra,
    read_json,
    write_json,
    write_table_file,
    write_tables_file,
)
from profile_engine.lake.tiles import DAY_FILE, SEALED_MS, day_start_ms, sealed_hour_ms
from profile_engine.profiles.merge import advance
from profile_engine.profiles.population import (
    add_counts,
    add_population_features,
    change_counts,
    conform,
    profile_changes,
    rfm_cuts,
    value_counts,
)
from profile_engine.profiles.snapshot import (
    AFFINITY_SUMS,
    AFFINITY_SUMS_END,
    AffinitySums,
    PreviousHour,
    snapshot,
)
from profile_engine.profiles.state import (
    ADDED_STATE_COLUMNS,
    ADDED_STATE_TABLES,
    ANCHORS,
    BY_HOUR_TABLES,
    HOURLY,
    ITEM_VIEWS,
    META,
    PENDING,
    SEALED_MARKER,
    SEALED_TABLES,
    SEALED_TIME,
    SESSION_GAP,
    SESSIONS,
    STATE_END,
    STATE_SCHEMAS,
    STATE_TABLES,
    TRAIT_TILES,
    MissingStateError,
    ProfileState,
    SealedTiles,
    empty_state,
    fetch,
    hour_ms,
    interval_groups,
    sealed_longest_ms,
)


def read_state(lake: Lake, hour: datetime, bucket: int) -> ProfileState:
    """The committed state checkpoint of ``hour`` and ``bucket``, in the current layout.

    States written before the session buffer held one row per session (it held one
    ``ts_ms`` row per event) are converted on reading: grouping the points gives the
    sessions the current layout stores. A ``user_events`` written before ``decayed_ms``
    held its decayed sums as of the state's end: that end is their ``decayed_ms``.
    """
    base = lake.partition(STATE, hour, bucket)
    tables = {
        name: lake.read_named(STATE, hour, name, bucket)
        if name not in ADDED_STATE_TABLES or (base / f"{name}.parquet").is_file()
        else STATE_SCHEMAS[name].empty_table()
        for name in STATE_TABLES
    }
    meta = tables[META]
    end_ms = meta.column("end_ms")[0].as_py() if meta.num_rows else 0
    for name, defaults in ADDED_STATE_COLUMNS.items():
        for column, value in defaults.items():
            if column not in tables[name].column_names:
                kind = STATE_SCHEMAS[name].field(column).type
                filled = end_ms if value == STATE_END else value
                tables[name] = (
                    tables[name]
                    .append_column(column, pa.array([filled] * tables[name].num_rows, kind))
                    .select(STATE_SCHEMAS[name].names)
                )
    points = tables[SESSIONS]
    if "ts_ms" in points.column_names:
        con = db.cursor()
        try:
            con.register("points", points)
            gap = int(SESSION_GAP.total_seconds() * 1000)
            as_points = "SELECT user_id, ts_ms AS first_ms, ts_ms AS last_ms, 1 AS n FROM points"
            tables[SESSIONS] = fetch(
                con,
                f"SELECT user_id, grp_first AS first_ms, grp_last AS last_ms, n "
                f"FROM ({interval_groups(as_points, gap)}) ORDER BY user_id, first_ms",
                STATE_SCHEMAS[SESSIONS],
            )
        finally:
            con.close()
    sealed = None
    if lake.manifest(STATE, hour, bucket).get(SEALED_MARKER):
        sealed = SealedTiles(tiles_root(lake, bucket), hour_ms(hour + HOUR))
    return ProfileState(tables, sealed=sealed)


# ---- sealed tiles (docs/architecture.md, "Sealed state tiles") -------------------------------
def tiles_root(lake: Lake, bucket: int) -> Path:
    """The sealed tiles of a bucket: ``state_tiles/bucket=N/<table>/dt=YYYY-MM-DD/{hour=HH,day}.parquet``."""
    return lake.path(STATE_TILES, f"bucket={bucket}")


def seal_before(name: str, e: int, settings: Settings) -> int:
    """The time (``SEALED_TIME`` of table ``name``) before which a state ending at ``e`` seals its rows: the end
    for the by-hour tables (every row of an hour already built; a late event adds a row of its key, which the
    readers sum), the lateness horizon for the anchors (their lookups rely on it: ``state.anchor_lookup_sql``)."""
    return e if name in BY_HOUR_TABLES else e - settings.lateness_hours * MS_HOUR


def seal_state(lake: Lake, state: ProfileState, hour: datetime, bucket: int, settings: Settings) -> ProfileState:
    """Seal the rows of ``state``'s sealed tables (as of the end of ``hour``) into tile files: every by-hour row
    (all are of hours before the end), the anchors older than the lateness horizon (``seal_before``).

    Writes the rows as the tiles sealed by ``hour`` (``sealed_ms`` = its end), replacing every
    tile sealed after the state's previous checkpoint (its ``sealed.upto_ms``; all of them for
    a state without tiles: an empty or older-layout one) up to that end, so a rebuilt hour or range
    leaves no stale copy of its own; tiles sealed later belong to later checkpoints, which must be rebuilt
    in order after it (until then they read both); compacts the days before ``hour`` into day files. Returns the state the
    checkpoint holds: the recent anchors in memory (no by-hour row), the rest in the tiles up to the end.
    """
    e = hour_ms(hour + HOUR)
    after = state.sealed.upto_ms if state.sealed is not None else None
    if state.sealed is not None and state.sealed.users is not None:
        raise ValueError("a state restricted to some users cannot be sealed")
    root = tiles_root(lake, bucket)
    tables = dict(state.tables)
    for name in SEALED_TABLES:
        table = state.tables[name]
        old = pc.less(table.column(SEALED_TIME[name]), pa.scalar(seal_before(name, e, settings), pa.int64()))
        rows, tables[name] = split_rows(table, old)
        rows = rows.append_column(SEALED_MS, pa.array(np.full(rows.num_rows, e, dtype=np.int64)))
        write_tiles(lake, root / name, hour, after, e, rows, TILE_DICTIONARY.get(name, _STATE_DICTIONARY))
    return ProfileState(tables, buffered=state.buffered, sealed=SealedTiles(root, e))


def split_rows(table: pa.Table, mask: pa.ChunkedArray) -> tuple[pa.Table, pa.Table]:
    """The rows of ``table`` where ``mask`` (aligned with it) is true, and those where it is false, each in the
    order of ``table``: ``table.filter(mask)`` and ``table.filter(pc.invert(mask))`` (a null in ``mask`` drops its
    row from both), but a chunk of ``table`` whose rows all go one way is passed on as it is, not copied. The
    anchors a checkpoint keeps are such chunks (the buffer's recent rows, as read and filtered by ``advance``)
    but for the rows ``advance`` added: two filtered copies of the 4.4M rows (two id columns) took 0.3-0.6 CPU s
    of a 1M-event hour's bucket. (A comparison's mask is one chunk whatever the column's chunks: the table's
    chunks decide.)"""
    if table.num_rows == 0:
        return table, table
    flags = mask.chunk(0) if mask.num_chunks == 1 else pa.concat_arrays(mask.chunks)
    true: list[pa.RecordBatch] = []
    false: list[pa.RecordBatch] = []
    start = 0
    for batch in table.to_batches():  # the table's chunks (sliced where its columns' chunks differ), no copy
        bits = flags.slice(start, batch.num_rows)
        start += batch.num_rows
        if bits.null_count == 0 and bits.true_count in (0, batch.num_rows):
            (true if bits.true_count else false).append(batch)
        else:
            true.append(batch.filter(bits))
            false.append(batch.filter(pc.invert(bits)))
    return pa.Table.from_batches(true, table.schema), pa.Table.from_batches(false, table.schema)


def write_tiles(
    lake: Lake,
    table_dir: Path,
    hour: datetime,
    after: int | None,
    e: int,
    rows: pa.Table,
    dictionary: bool | list[str],
) -> None:
    """Make ``rows`` the tiles of ``table_dir`` sealed in (``after``, ``e``] (None: since ever), then compact older days.

    A day with a ``day.parquet`` is rewritten (its rows sealed in that range replaced);
    otherwise the hourly files sealed in the range are replaced by ``hour=HH.parquet`` of ``hour``.
    """
    built_day = table_dir / f"dt={hour:%Y-%m-%d}"
    days = sorted({*table_dir.glob("dt=*"), built_day}) if table_dir.is_dir() else [built_day]
    for day in days:
        start = day_start_ms(day)
        if (after is not None and start + 24 * MS_HOUR <= after) or start + MS_HOUR > e:
            continue  # every tile of the day was sealed outside (after, e]
        new = rows if day == built_day else rows.schema.empty_table()
        if (day / DAY_FILE).is_file():
            kept = _outside(after, e)  # the day file's rows sealed outside (after, e], then the new ones
            _replace_day(lake, day, [(day / DAY_FILE, kept), new], dictionary)
            continue
        for tile in day.glob("hour=*.parquet"):
            if (after is None or sealed_hour_ms(tile) > after) and sealed_hour_ms(tile) <= e:
                tile.unlink()
        if new.num_rows:
            _write_tile_file(lake, day / f"hour={hour:%H}.parquet", new, dictionary)
    for day in days:  # compaction: one file per day once the day is over
        hourly = sorted(day.glob("hour=*.parquet"))
        if (day / DAY_FILE).is_file():  # leftovers of an interrupted compaction: already in the day file
            for tile in hourly:
                tile.unlink()
        elif day < built_day and hourly:
            _replace_day(lake, day, [(f, None) for f in hourly], dictionary)
        _remove_empty(day)


def _outside(after: int | None, e: int) -> Callable[[pa.Table], pa.Array]:
    """The mask of the tile rows sealed outside (``after``, ``e``] (None: since ever)."""

    def keep(rows: pa.Table) -> pa.Array:
        sealed = rows.column(SEALED_MS)
        inside = pc.less_equal(sealed, e)
        if after is not None:
            inside = pc.and_(inside, pc.greater(sealed, after))
        return pc.invert(inside)

    return keep


# A part of a day file: a tile file (with the mask of its rows to keep, None: all), or rows in memory.
_DayPart: TypeAlias = tuple[Path, Callable[[pa.Table], pa.Array] | None] | pa.Table


def _replace_day(lake: Lake, day: Path, parts: list[_DayPart], dictionary: bool | list[str]) -> None:
    """Write a day's compacted tiles (first), then remove its hourly files (already in it).

    The day file holds the rows of ``parts`` in the order ``_write_tile_file`` writes their concatenation (a
    stable sort by ``TILE_ORDER``), but merged a row group at a time: every tile file written since the order
    is sorted by it, so a day (9.2M rows of the by-hour tables at the 1M-events bucket) is never held at once
    (``_merge_sorted``). A file found unsorted (written before the order) has the day read whole and sorted.
    """
    order = TILE_ORDER.get(day.parent.name)
    files = [p[0] for p in parts if isinstance(p, tuple)]
    schema = pq.read_schema(files[0]) if files else next(p.schema for p in parts if isinstance(p, pa.Table))
    parts = [p.cast(schema) if isinstance(p, pa.Table) else p for p in parts]
    sources = [_part_rows(p, order) for p in parts]
    try:
        merged = _merge_sorted(sources, order) if order else (rows for source in sources for rows in source)
        written = write_tables_file(lake, day / DAY_FILE, schema, merged, TILE_ROW_GROUP, dictionary=dictionary)
    except _Unsorted:
        rows = pa.concat_tables([_whole_part(p) for p in parts])
        if written := rows.num_rows:
            _write_tile_file(lake, day / DAY_FILE, rows, dictionary)
    finally:
        for source in sources:
            source.close()
    if not written:
        (day / DAY_FILE).unlink(missing_ok=True)
    for tile in day.glob("hour=*.parquet"):
        tile.unlink()


def _write_tile_file(lake: Lake, target: Path, rows: pa.Table, dictionary: bool | list[str]) -> None:
    """Write one tile file sorted by ``TILE_ORDER`` (its table: the folder two levels up) in row groups of at most
    ``TILE_ROW_GROUP`` rows, so the Parquet statistics of each row group let a scan skip the groups of other
    traits and hours (docs/architecture.md, "Sealed state tiles"). The rows are the same in any order."""
    order = TILE_ORDER.get(target.parent.parent.name)
    positions = _sorted_positions(rows, order) if order is not None and rows.num_rows else None
    # taken in order one row group at a time (write_table_file): no sorted copy of the rows is held
    write_table_file(lake, target, rows, dictionary=dictionary, row_group_size=TILE_ROW_GROUP, order=positions)


def _sorted_positions(rows: pa.Table, order: tuple[str, ...]) -> pa.Array:
    """The positions of ``rows`` in a stable sort by the columns ``order``."""
    # a string key sorted as the position of its value among its few distinct ones: the same order as sorting
    # the strings, at a third of the CPU (0.07 s against 0.19 for a day of 380k trait tile rows)
    keys = {}
    for c in order:
        column = rows.column(c)
        if pa.types.is_string(column.type):
            column = pc.index_in(column, value_set=pc.unique(column).sort())
        keys[c] = column
    return pc.sort_indices(pa.table(keys), [(c, "ascending") for c in order])


class _Unsorted(Exception):
    """A tile file not sorted by its table's ``TILE_ORDER`` (written before the order), or with a null key."""


def _part_rows(part: _DayPart, order: tuple[str, ...] | None) -> Generator[pa.Table]:
    """The rows of a day part a row group at a time (at most ``TILE_ROW_GROUP`` rows each): a file's in its
    order (the kept ones), rows in memory sorted by ``order``."""
    if isinstance(part, pa.Table):
        positions = _sorted_positions(part, order) if order and part.num_rows else None
        if positions is not None:
            part = part.combine_chunks()  # a take from a chunked table concatenates its chunks every time
        for start in range(0, part.num_rows, TILE_ROW_GROUP):
            if positions is None:
                yield part.slice(start, TILE_ROW_GROUP)
            else:
                yield part.take(positions[start : start + TILE_ROW_GROUP])
        return
    path, keep = part
    with pq.ParquetFile(path) as tiles:
        for batch in tiles.iter_batches(batch_size=TILE_ROW_GROUP):
            rows = pa.Table.from_batches([batch], schema=tiles.schema_arrow)
            yield rows if keep is None else rows.filter(keep(rows))


def _whole_part(part: _DayPart) -> pa.Table:
    """The rows of a day part at once (the kept ones of a file)."""
    if isinstance(part, pa.Table):
        return part
    rows = pq.read_table(part[0])
    return rows if part[1] is None else rows.filter(part[1](rows))


Key: TypeAlias = tuple[Any, ...]


def _merge_sorted(sources: list[Generator[pa.Table]], order: tuple[str, ...]) -> Iterator[pa.Table]:
    """The rows of ``sources``, each sorted by ``order``, in the order a stable sort of their concatenation gives
    (``_sorted_positions``), in sorted pieces, holding about a row group of each source at a time.

    Every later row of a source is at or above the last key read from it, so the rows below the smallest of
    those keys (the bound) are all read; so are the rows at the bound of the sources before the first one whose
    last key it is (their last keys are above it), and that source's rows at the bound come next among the rows
    of that key (a stable sort keeps the sources' order). Those rows are given (the sources' parts in the
    sources' order, then sorted stably), and that source reads its next row group: a key with many rows in one
    source (an hour of a trait) is given as it is read. Raises ``_Unsorted`` when a source is out of order or
    has a null key.
    """
    held: list[pa.Table | None] = [None] * len(sources)  # rows read and not yet given, per source
    last: list[Key | None] = [None] * len(sources)  # the last key read, per source
    live = [True] * len(sources)

    def read(i: int) -> None:
        for rows in sources[i]:
            if rows.num_rows:
                if any(rows.column(c).null_count for c in order) or not _in_order(rows, order, last[i]):
                    raise _Unsorted
                held[i] = rows if held[i] is None else pa.concat_tables([held[i], rows])
                last[i] = _key(rows, order, rows.num_rows - 1)
                return
        live[i] = False

    def given(parts: list[pa.Table]) -> pa.Table:
        rows = pa.concat_tables(parts)
        return rows if len(parts) == 1 else rows.take(_sorted_positions(rows, order))

    for i in range(len(sources)):
        read(i)
    while any(live):
        smallest = min((i for i in range(len(sources)) if live[i]), key=lambda i: cast(Key, last[i]))
        bound = cast(Key, last[smallest])
        parts = []
        for i, rows in enumerate(held):
            through = i <= smallest  # the rows at the bound too
            if rows is None or (_key(rows, order, 0) > bound if through else _key(rows, order, 0) >= bound):
                continue
            below = _count_below(rows, order, bound, through)
            parts.append(rows.slice(0, below))
            held[i] = rows.slice(below) if below < rows.num_rows else None
        if parts:
            yield given(parts)
        read(smallest)
    rest = [rows for rows in held if rows is not None]
    if rest:
        yield given(rest)


def _key(rows: pa.Table, order: tuple[str, ...], i: int) -> Key:
    return tuple(rows.column(c)[i].as_py() for c in order)


def _lexicographic(
    rows: pa.Table, order: tuple[str, ...], other: Callable[[str], Any], last: Callable[..., pa.Array]
) -> pa.Array:
    """Row by row, whether the key of ``rows`` is below that of ``other`` (a column or a scalar by column name),
    lexicographically by ``order``; on equal keys ``last`` of the last column decides (``pc.less`` or
    ``pc.less_equal``)."""
    result = None
    for c in reversed(order):
        mine, theirs = rows.column(c), other(c)
        if result is None:
            result = last(mine, theirs)
        else:
            result = pc.or_(pc.less(mine, theirs), pc.and_(pc.equal(mine, theirs), result))
    return cast(pa.Array, result)


def _in_order(rows: pa.Table, order: tuple[str, ...], after: Key | None) -> bool:
    """Whether the keys of ``rows`` never decrease, from ``after`` (the key before them) on."""
    if after is not None and _key(rows, order, 0) < after:
        return False
    if rows.num_rows < 2:
        return True
    head, tail = rows.slice(0, rows.num_rows - 1), rows.slice(1)
    return bool(pc.all(_lexicographic(head, order, tail.column, pc.less_equal)).as_py())


def _count_below(rows: pa.Table, order: tuple[str, ...], bound: Key, through: bool) -> int:
    """The rows (sorted by ``order``) with a key below ``bound`` (``through``: or at it): they come first."""
    scalars = {c: pa.scalar(v, rows.schema.field(c).type) for c, v in zip(order, bound, strict=True)}
    last = pc.less_equal if through else pc.less
    return int(pc.sum(_lexicographic(rows, order, scalars.__getitem__, last)).as_py() or 0)


def _remove_empty(day: Path) -> None:
    if day.is_dir() and not any(day.iterdir()):
        day.rmdir()


def expired_tile_days(lake: Lake, bucket: int, oldest_end: datetime, settings: Settings) -> list[Path]:
    """Tile day folders of ``bucket`` no state ending at or after ``oldest_end`` reads: every row is older
    than its table's longest window before that end (``sealed_longest_ms``; retention removes them with the
    older checkpoints)."""
    traits = load_traits(settings.traits)
    root = tiles_root(lake, bucket)
    days = sorted(root.glob("*/dt=*")) if root.is_dir() else []
    return [
        d
        for d in days
        if day_start_ms(d) + 24 * MS_HOUR
        <= hour_ms(oldest_end) - sealed_longest_ms(d.parent.name, traits, settings.lateness_hours)
    ]


def upgrade_state(lake: Lake, hour: datetime, bucket: int) -> bool:
    """Rewrite the committed state of ``hour`` and ``bucket`` in the current layout; whether it was older.

    Reading converts older layouts anyway (``read_state``: the session points, the columns of
    ``ADDED_STATE_COLUMNS`` such as ``user_events``' ``decayed_ms``); rewriting once saves that conversion on every later read of the
    same checkpoint (benchmarks reuse one). The
    ``SEALED_MARKER`` stays what it was: it says where the checkpoint's older rows are (in
    the bucket's tiles, or in the checkpoint itself), which converting the sessions does not
    change. An older-layout checkpoint predates the tiles and holds every hour: it stays
    unmarked (marked, its next hour would add the tiles to the rows it holds). Whatever else the
    manifest says of the checkpoint (``SNAPSHOT_TRAITS``) stays too: the rewrite changes its layout only.
    """
    base = lake.partition(STATE, hour, bucket)
    sessions = lake.read_named(STATE, hour, SESSIONS, bucket).column_names
    added = all(
        set(columns) <= set(pq.read_schema(base / f"{name}.parquet").names)
        for name, columns in ADDED_STATE_COLUMNS.items()
    )
    if "ts_ms" not in sessions and added:
        return False
    state = read_state(lake, hour, bucket)
    # the kept affinities (``AFFINITY_SUMS``) are not rewritten: without them the next snapshot computes every one
    dropped = (SEALED_MARKER, AFFINITY_SUMS_END)
    extra = {k: v for k, v in manifest_extra(lake.manifest(STATE, hour, bucket)).items() if k not in dropped}
    lake.write_partition(
        STATE,
        hour,
        state.tables,
        bucket=bucket,
        run_id="upgrade",
        dictionary=_STATE_DICTIONARY,
        statistics=_STATE_STATISTICS,
        extra={**extra, SEALED_MARKER: True} if state.sealed is not None else extra,
    )
    return True


def _load_state(lake: Lake, hour: datetime, bucket: int, first_hour: datetime | None) -> ProfileState:
    """The state of the hour before ``hour``, or an empty one when ``hour`` is the first hour."""
    previous = hour - HOUR
    if lake.committed(STATE, previous, bucket):
        return read_state(lake, previous, bucket)
    if first_hour is not None and floor_hour(first_hour) == hour:
        return empty_state()
    raise MissingStateError(
        f"state of hour {format_hour(previous)} bucket {bucket} is missing in {lake.partition(STATE, previous, bucket)}; "
        f"process {format_hour(previous)} first (or start at the first hour {format_hour(first_hour) if first_hour else 'unset'})"
    )


# Parquet dictionary encoding only where values repeat (user and item ids do not).
_STATE_DICTIONARY = ["event_type"]
# No column statistics in a checkpoint's files: every reader reads them whole (``read_state``), none skips a row
# group by them (the sealed tiles keep theirs: scans skip by them). Computing them took 0.17-0.24 CPU s of the
# 17 files of a 1M-event hour's bucket (the 4.2M recent anchors' ids most of it).
_STATE_STATISTICS = False
# Tiles: every column dictionary-encoded (a tile file holds many rows of each user, item, hour and key). Sealed
# anchors are looked up every hour by (user, item): reading their ids from dictionary pages took 0.12 s for 7.7M rows
# against 0.46 s plain. The by-hour tiles are read every hour by the semi join picking the changed users' rows
# (``snapshot.CHANGED_HOURLY``, ``c_<table>``), which decodes every row of the windows: 30 days of hourly tiles
# 0.79 -> 0.49 CPU s, item views 1.36 -> 0.53, trait tiles 2.04 -> 1.51 (100k users, 29 days; BENCHMARKS.md,
# "By-hour tiles dictionary-encoded"). Tiles written before read as they are.
TILE_DICTIONARY: dict[str, bool | list[str]] = dict.fromkeys((ANCHORS, *BY_HOUR_TABLES), True)
# The order of the rows in a tile file (``_write_tile_file``): by hour, and the trait tiles by trait first. Every
# window reads its table from an hour on, the crossing rule one hour of each, and a trait reads its own rows only:
# at 29 days of history the 30-day traits (a few percent of the trait tiles' rows) read 15M rows of every trait
# in one row group per day before (BENCHMARKS.md, "Tiles sorted by trait and hour").
TILE_ORDER: dict[str, tuple[str, ...]] = {
    HOURLY: ("hour_ms",),
    ITEM_VIEWS: ("hour_ms",),
    TRAIT_TILES: ("trait", "hour_ms"),
}
TILE_ROW_GROUP = 16_384
_PROFILE_DICTIONARY = [*TOP_CATEGORIES, RFM_SEGMENT, LIFECYCLE_STAGE]


# Key of a checkpoint manifest: the digest of the declared traits its hour's profiles were taken with.
SNAPSHOT_TRAITS = "snapshot_traits"


def previous_hour(
    lake: Lake, settings: Settings, state: ProfileState, events: pa.Table, bucket: int
) -> PreviousHour | None:
    """The committed profiles of ``state``'s hour and bucket, for a snapshot of the next hour to start from
    (``snapshot``): only when that checkpoint says they were taken with the current declared traits, and they
    hold at least ``settings.snapshot_from_previous_min_users`` users (a smaller bucket is faster in full)."""
    if state.end is None:
        return None
    hour = state.end - HOUR
    if not (lake.committed(STATE, hour, bucket) and lake.committed(PROFILES, hour, bucket)):
        return None
    traits = load_traits(settings.traits)
    if lake.manifest(STATE, hour, bucket).get(SNAPSHOT_TRAITS) != traits_digest(traits):
        return None
    profiles = lake.manifest(PROFILES, hour, bucket)
    if profiles.get("rows", 0) < settings.snapshot_from_previous_min_users:
        return None
    # The snapshot's columns only (a published bucket holds the population ones as well); one missing: no start.
    columns = snapshot_schema(traits).names
    if not set(columns) <= set(profiles.get("columns", ())):
        return None
    return PreviousHour(
        lake.read(PROFILES, hour, bucket, columns=columns), state, events, _read_kept_affinities(lake, hour, bucket)
    )


def _read_kept_affinities(lake: Lake, hour: datetime, bucket: int) -> AffinitySums | None:
    """The unrounded affinities the checkpoint of ``hour`` keeps for the next snapshot (``snapshot.AffinitySums``),
    when its manifest says of which end (a checkpoint written before them, or rewritten without them: None)."""
    manifest = lake.manifest(STATE, hour, bucket)
    end = manifest.get(AFFINITY_SUMS_END)
    files = {f.get("name") for f in manifest.get("files", ())}
    if not isinstance(end, int) or f"{AFFINITY_SUMS}.parquet" not in files:
        return None
    return AffinitySums(lake.read_named(STATE, hour, AFFINITY_SUMS, bucket), end)


def _write_hour(
    lake: Lake,
    state: ProfileState,
    hour: datetime,
    bucket: int,
    settings: Settings,
    run_id: str,
    previous: PreviousHour | None = None,
) -> tuple[dict[str, int], ProfileState]:
    """Write profiles, interests, the sealed tiles and (last, since the next hour builds on it) the state of
    ``hour``; returns the counts and the state as the checkpoint holds it (the next merge starts from it).
    ``previous``: the hour before, from which the snapshot computes the changed users only."""
    taken = snapshot(state, hour + HOUR, settings, previous, keep_affinities=True)
    profiles, interests, from_previous, from_state, affinities = taken[:5]
    # A rebuilt bucket invalidates a published snapshot of this hour until publish_profiles runs again.
    (lake.partition(PROFILES, hour) / MANIFEST).unlink(missing_ok=True)
    lake.write_partition(PROFILES, hour, profiles, bucket=bucket, run_id=run_id, dictionary=_PROFILE_DICTIONARY)
    lake.write_partition(INTERESTS, hour, interests, bucket=bucket, run_id=run_id, dictionary=[CATEGORY_ID])
    sealed = seal_state(lake, state, hour, bucket, settings)
    # the unrounded affinities beside the state tables, for the next hour's snapshot (``snapshot.AffinitySums``)
    kept = {AFFINITY_SUMS: affinities.table} if affinities is not None else {}
    lake.write_partition(
        STATE,
        hour,
        {**sealed.tables, **kept},
        bucket=bucket,
        run_id=run_id,
        dictionary=_STATE_DICTIONARY,
        statistics=_STATE_STATISTICS,
        extra={
            SEALED_MARKER: True,
            SNAPSHOT_TRAITS: traits_digest(load_traits(settings.traits)),
            **({AFFINITY_SUMS_END: affinities.end_ms} if affinities is not None else {}),
        },
    )
    # how the snapshot was taken: from the hour before with only the changed users computed from the state, or not
    written = {"users": profiles.num_rows, "interests": interests.num_rows, "users_from_state": from_state}
    moved = {
        "snapshot_from_previous_hour": from_previous,
        "affinities_from_previous_hour": taken.affinities_from_previous_hour,
    }
    return {**written, **moved}, sealed


def _merge_counts(
    events: pa.Table, before: ProfileState, after: ProfileState, horizon: datetime | None
) -> dict[str, int]:
    """How many events were merged, are held back, and arrived later than the lateness window allows."""
    late = 0
    if horizon is not None and events.num_rows:
        late = int(pc.sum(pc.less(events.column("ts"), pa.scalar(horizon, TIMESTAMP))).as_py() or 0)
    held_back = after.tables[PENDING].num_rows
    return {
        "events_read": events.num_rows,
        "events_merged": events.num_rows + before.tables[PENDING].num_rows - held_back,
        "held_back": held_back,
        "late_beyond_window": late,
    }


def _horizon(state: ProfileState, settings: Settings) -> datetime | None:
    return None if state.end is None else state.end - timedelta(hours=settings.lateness_hours)


def build_profiles(
    settings: Settings, hour: datetime, bucket: int, *, run_id: str = "manual", first_hour: datetime | None = None
) -> dict[str, Any]:
    """Build hour H of one bucket: merge its staged events into the state of H-1 and write state/profiles/interests.

    The state of H-1 must exist unless H is the first hour (``first_hour``, default
    ``settings.start``); otherwise this raises ``MissingStateError`` naming the hour
    and bucket, so no hour is ever built on an older state.
    """
    hour = floor_hour(hour)
    lake = Lake(settings.lake)
    state = _load_state(lake, hour, bucket, first_hour or settings.start)
    events = lake.read(STAGING, hour, bucket)
    new_state = advance(state, events, hour + HOUR, settings)
    previous = previous_hour(lake, settings, state, events, bucket)
    written, _ = _write_hour(lake, new_state, hour, bucket, settings, run_id, previous)
    faults.maybe_fail(faults.BETWEEN_BUILD_BUCKETS)
    counts = _merge_counts(events, state, new_state, _horizon(state, settings))
    return {"hour": format_hour(hour), "bucket": bucket, "run_id": run_id, **written, **counts}


def build_profiles_range(
    settings: Settings,
    first: datetime,
    last: datetime,
    bucket: int,
    *,
    run_id: str = "manual",
    first_hour: datetime | None = None,
    snapshot_every: int = 24,
) -> dict[str, Any]:
    """Build hours ``first..last`` of one bucket in a few big merges (the warm-up path).

    Reads every staged hour in one DuckDB pass, advances the state from checkpoint to
    checkpoint and writes state/profiles/interests only at checkpoints: hours whose end
    is a multiple of ``snapshot_every`` hours (UTC epoch) and ``last``. Each checkpoint
    equals what hourly ``build_profiles`` would have written.
    """
    if snapshot_every < 1:
        raise ValueError(f"snapshot_every must be >= 1, got {snapshot_every}")
    first, last = floor_hour(first), floor_hour(last)
    if last < first:
        raise ValueError(f"last hour {format_hour(last)} is before first hour {format_hour(first)}")
    lake = Lake(settings.lake)
    state = _load_state(lake, first, bucket, first_hour or settings.start)
    hours = list(hour_range(first, last))
    staged = read_staged(lake, hours, bucket, settings.business_tz)
    staged_hour = staged.column("staged_hour")

    checkpoints = [h for h in hours if (epoch_hour(h) + 1) % snapshot_every == 0 or h == last]
    totals = {"events_read": 0, "events_merged": 0, "held_back": 0, "late_beyond_window": 0}
    written: dict[str, int] = {}
    batch_start = epoch_hour(first)
    for checkpoint in checkpoints:
        mask = pc.and_(pc.greater_equal(staged_hour, batch_start), pc.less_equal(staged_hour, epoch_hour(checkpoint)))
        batch = staged.filter(mask).select(STAGED_SCHEMA.names).cast(STAGED_SCHEMA)
        batch_start = epoch_hour(checkpoint) + 1
        new_state = advance(state, batch, checkpoint + HOUR, settings)
        counts = _merge_counts(batch, state, new_state, _horizon(state, settings))
        for key in ("events_read", "events_merged", "late_beyond_window"):
            totals[key] += counts[key]
        totals["held_back"] = counts["held_back"]
        written, state = _write_hour(lake, new_state, checkpoint, bucket, settings, run_id)
    return {
        "first": format_hour(first),
        "last": format_hour(last),
        "bucket": bucket,
        "run_id": run_id,
        "hours": len(hours),
        "checkpoints": [format_hour(c) for c in checkpoints],
        **written,
        **totals,
    }


def epoch_hour(hour: datetime) -> int:
    return int(hour.timestamp()) // 3600


def read_staged(
    lake: Lake, hours: list[datetime], bucket: int, business_tz: str, users: pa.Array | None = None
) -> pa.Table:
    """The staged events of ``hours`` of one bucket in one DuckDB pass, with ``staged_hour`` (epoch hours).

    Files staged before ``local_hour`` existed get it in ``business_tz`` (``with_local_hour``).
    ``users``: only the events of these users (the filter runs in the scan).
    """
    import pyarrow.parquet as pq

    files = [str(f) for h in hours for f in lake.data_files(STAGING, h, bucket)]
    if not files:
        return STAGED_SCHEMA.append(pa.field("staged_hour", pa.int64())).empty_table()
    current = [f for f in files if LOCAL_HOUR in pq.read_schema(f).names]
    older = [f for f in files if f not in set(current)]
    ZoneInfo(business_tz)  # an unknown zone fails before it reaches SQL
    con = db.cursor()
    try:
        where = ""
        if users is not None:
            con.register("wanted_users", pa.table({USER_ID: pa.array(users, pa.string())}))
            where = f" WHERE s.user_id IN (SELECT {USER_ID} FROM wanted_users)"
        selects = []
        for group, local_hour in ((current, f"s.{LOCAL_HOUR}"), (older, f"hour(timezone('{business_tz}', s.ts))")):
            if not group:
                continue
            file_list = ", ".join("'" + f.replace("'", "''") + "'" for f in group)
            # The staged hour comes from the Hive keys of each file's path (dt=/hour=): a per-file
            # constant, several times cheaper than joining a filename column on every row.
            columns = ", ".join(f"s.{n}" for n in STAGED_SCHEMA.names if n != LOCAL_HOUR)
            selects.append(
                f"SELECT {columns}, CAST({local_hour} AS TINYINT) AS {LOCAL_HOUR}, "
                "CAST(epoch(s.dt) // 3600 + s.hour AS BIGINT) AS staged_hour "
                f"FROM read_parquet([{file_list}], hive_partitioning = true, "
                "hive_types = {'dt': DATE, 'hour': INTEGER}) s" + where
            )
        return con.sql(" UNION ALL ".join(selects)).to_arrow_table()
    finally:
        con.close()


def staged_hours(lake: Lake, bucket: int, layer: str = STAGING) -> list[datetime]:
    """Every hour with a committed partition of ``bucket`` in ``layer`` (staging by default), in order."""
    found = []
    for manifest in lake.path(layer).glob(f"dt=*/hour=*/bucket={bucket}/{MANIFEST}"):
        hour_dir = manifest.parent.parent
        found.append(parse_hour(f"{hour_dir.parent.name.removeprefix('dt=')}T{hour_dir.name.removeprefix('hour=')}"))
    return sorted(found)


def snapshot_committed(settings: Settings, hour: datetime) -> bool:
    """Whether the published snapshot of ``hour`` exists (its hour-level manifest is written)."""
    return (Lake(settings.lake).partition(PROFILES, hour) / MANIFEST).is_file()


def _previous_snapshot(lake: Lake, settings: Settings, hour: datetime) -> datetime | None:
    """The snapshot the change log compares against: H-1, else the one H was first compared with, else ``current``."""
    if snapshot_committed(settings, hour - HOUR):
        return hour - HOUR
    candidates = []
    marker = lake.partition(PROFILES, hour) / MANIFEST
    if marker.is_file():
        candidates.append(read_json(marker).get("previous_hour"))
    pointer = lake.path(PROFILES, "current")
    if pointer.is_file():
        candidates.append(read_json(pointer).get("hour"))
    for text in candidates:
        if text and parse_hour(text) < hour and snapshot_committed(settings, parse_hour(text)):
            return parse_hour(text)
    return None


def publish_profiles(settings: Settings, hour: datetime, *, run_id: str = "manual") -> dict[str, Any]:
    """Commit the snapshot of ``hour``: population features, validation, change log, markers; one bucket at a time.

    RFM cut points come from per-bucket summaries (``rfm_cuts``: value counts, then the
    few tie groups a cut falls in), so scores equal a ranking of the whole population.
    Then per bucket: add RFM, validate (``validate_profiles``: every expectation holds
    per bucket; ``user_id`` is unique across buckets by construction, a user's events all
    go to one bucket), rewrite the bucket, write its change log against the previous
    snapshot's bucket. Last the hour-level ``_manifest.json`` (the snapshot's commit
    point; removed before the first bucket is rewritten), the change log's hour-level
    manifest and the ``profiles/current`` pointer (moved forward only). The summary's
    counts are sums of the per-bucket counts.
    """
    hour = floor_hour(hour)
    lake = Lake(settings.lake)
    marker = lake.partition(PROFILES, hour) / MANIFEST
    previous_hour = _previous_snapshot(lake, settings, hour)
    buckets = range(settings.buckets)
    for bucket in buckets:
        if not lake.committed(PROFILES, hour, bucket):
            raise FileNotFoundError(f"profiles of hour {format_hour(hour)} bucket {bucket} are not built")
    ranked = [USER_ID, FREQUENCY_ORDERS, RECENCY_HOURS, MONETARY_TOTAL]
    # rfm_cuts passes over the buckets up to three times, reading the ranked columns of one bucket at a time:
    # holding them for every bucket would save reads (about 0.1-0.3 CPU s of the 1M-user hour) but hold 50 bytes
    # a profile of the whole population in one task (5 GB at 100M users; docs/deployment.md).
    cuts = rfm_cuts(lambda: (lake.read(PROFILES, hour, b, columns=ranked) for b in buckets))
    traits = load_traits(settings.traits)
    schema = snapshot_schema(traits)
    from profile_engine.quality.suites import validate_profiles  # imports Great Expectations when called

    marker.unlink(missing_ok=True)  # uncommitted while buckets are rewritten
    changes_dir = lake.partition(PROFILE_CHANGES, hour)
    for stale in (MANIFEST, DATA_FILE):  # an older change log of this hour, written whole
        (changes_dir / stale).unlink(missing_ok=True)
    # The change log compares the tracked columns only: reading the whole previous snapshot cost seconds.
    tracked = [USER_ID, *CHANGE_TRACKED]
    previous_text = format_hour(previous_hour) if previous_hour else None
    profiles = 0
    counted: dict[str, int] = {}
    lifecycle: dict[str, int] = {}
    segments: dict[str, int] = {}
    for bucket in buckets:
        part = add_population_features(
            conform(lake.read(PROFILES, hour, bucket), schema, hour, f"bucket {bucket}"), cuts
        )
        validate_profiles(part, hour, traits)  # raises ProfileValidationError naming the failed expectation
        lake.write_partition(PROFILES, hour, part, bucket=bucket, run_id=run_id, dictionary=_PROFILE_DICTIONARY)
        # a user stays in its bucket, so the previous snapshot's bucket holds everyone this bucket compares with
        previous = lake.read(PROFILES, previous_hour, bucket, columns=tracked) if previous_hour is not None else None
        changes = profile_changes(previous, part)
        lake.write_partition(
            PROFILE_CHANGES, hour, changes, bucket=bucket, run_id=run_id, extra={"previous_hour": previous_text}
        )
        profiles += part.num_rows
        add_counts(counted, change_counts(changes))
        add_counts(lifecycle, value_counts(part.column(LIFECYCLE_STAGE)))
        add_counts(segments, value_counts(part.column(RFM_SEGMENT)))
    write_json(
        changes_dir / MANIFEST,
        {
            "layer": PROFILE_CHANGES,
            "data_hour": format_hour(hour),
            "previous_hour": previous_text,
            "buckets": settings.buckets,
            "rows": counted["users"],
            "run_id": run_id,
            "written_at": datetime.now(UTC).isoformat(),
        },
    )
    summary: dict[str, Any] = {
        "hour": format_hour(hour),
        "run_id": run_id,
        "buckets": settings.buckets,
        "profiles": profiles,
        "new_users": counted[CHANGE_NEW],
        "profile_changes": counted,
        "previous_hour": previous_text,
        "lifecycle": lifecycle,
        "rfm_segments": segments,
    }
    write_json(
        marker,
        {**summary, "layer": PROFILES, "data_hour": format_hour(hour), "written_at": datetime.now(UTC).isoformat()},
    )
    pointer = lake.path(PROFILES, "current")
    current = read_json(pointer).get("hour") if pointer.is_file() else None
    if current is None or parse_hour(current) <= hour:
        write_json(pointer, {"hour": format_hour(hour), "run_id": run_id, "profiles": profiles})
    return summary
