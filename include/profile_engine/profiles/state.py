"""Profile state: the feature constants, the state tables and their schemas, ``ProfileState``, the DuckDB
connection and the SQL that groups sessions, orders and latencies. docs/features.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from profile_engine.contracts.events import CART, FAV, PURCHASE, REFUND, REMOVE_CART, STAGED_SCHEMA, VIEW
from profile_engine.contracts.profiles import CATEGORY_ID, HALF_LIVES, REPEAT_WINDOWS, USER_ID
from profile_engine.contracts.traits import DISTINCT_COUNT, Trait, longest_window_hours
from profile_engine.hours import MS_HOUR, floor_hour
from profile_engine.lake.tiles import DAY_FILE, SEALED_MS, day_start_ms, sealed_hour_ms

if TYPE_CHECKING:
    import duckdb


# ---- feature definitions ----------------------------------------------------------
SESSION_GAP = timedelta(minutes=30)  # inactivity that splits sessions
ORDER_GAP = timedelta(hours=1)  # lines of one order_id further apart than this are separate orders
LATENCY_LOOKBACK = timedelta(days=30)  # a view (cart) counts for a cart (purchase) this long
OPEN_CART_TTL = timedelta(days=30)  # a cart line older than this is abandoned, no longer open
HOURLY_RETENTION = timedelta(days=30)  # longest window; hourly buckets older than this are pruned
AFFINITY_HALF_LIFE = timedelta(days=7)
AFFINITY_WEIGHTS: dict[str, float] = {VIEW: 1.0, FAV: 2.0, CART: 3.0, REMOVE_CART: 0.0, PURCHASE: 5.0, REFUND: 0.0}
MIN_AFFINITY = 0.01  # interest rows below this are dropped (same rule for every path)
AFFINITY_DECIMALS = 6  # rounding keeps equal-looking scores equal, so top-k ties break on category_id
NEW_USER_AGE = timedelta(days=7)
DORMANT_AFTER = timedelta(days=7)
CHURNED_AFTER = timedelta(days=30)


# ---- state tables -------------------------------------------------------------------
META, USER_EVENTS, USERS, HOURLY, HOURS_OF_DAY, SESSIONS, ORDERS, CARTS, ANCHORS, TARGETS, PENDING = (
    "meta",
    "user_events",
    "users",
    "hourly",
    "hours_of_day",
    "sessions",
    "orders",
    "carts",
    "anchors",
    "targets",
    "pending",
)

# user_events, one row per user and event type, and users: (column, Arrow type, how two rows merge).
# Long rather than wide: DuckDB plans a query over few columns much faster, and advance runs hourly.
USER_EVENT_FIELDS: list[tuple[str, pa.DataType, str]] = [
    ("n", pa.int64(), "sum"),
    ("first_ms", pa.int64(), "min"),
    ("last_ms", pa.int64(), "max"),
    *[(f"decayed_{h}", pa.float64(), "sum") for h, _ in HALF_LIVES],
    ("price_n", pa.int64(), "sum"),
    ("price_cents", pa.int64(), "sum"),
]
# The time (epoch ms) the row's ``decayed_*`` sums are as of: set when ``advance`` merges events into the
# row, so the rows of users without events pass through unchanged; readers decay them to their own end
# (``decayed_as_of``). A state written before the column existed had them as of its end (``read_state``).
DECAYED_MS = "decayed_ms"
USER_FIELDS: list[tuple[str, pa.DataType, str]] = [
    ("orders_n", pa.int64(), "sum"),
    ("orders_cents", pa.int64(), "sum"),
    ("orders_max_cents", pa.int64(), "max"),
    ("first_order_ms", pa.int64(), "min"),
    ("last_order_ms", pa.int64(), "max"),
    ("sessions_n", pa.int64(), "sum"),
    ("sessions_ms", pa.int64(), "sum"),
    ("sessions_events", pa.int64(), "sum"),
    ("v2c_n", pa.int64(), "sum"),
    ("v2c_ms", pa.int64(), "sum"),
    ("c2p_n", pa.int64(), "sum"),
    ("c2p_ms", pa.int64(), "sum"),
    # value of the user's refunds (negative cents): final at once, nothing groups them
    ("refund_cents", pa.int64(), "sum"),
]
# The value "the state's end" (its ``meta`` ``end_ms``) of an added column (``ADDED_STATE_COLUMNS``).
STATE_END = "state end"
# Columns added to a state table after lakes were written, with the value an older state
# means by their absence (read by ``read_state``, rewritten by ``upgrade_state``): no refund, and
# decayed sums as of the state's end (``DECAYED_MS``).
ADDED_STATE_COLUMNS: dict[str, dict[str, int | str]] = {
    USERS: {"refund_cents": 0},
    USER_EVENTS: {DECAYED_MS: STATE_END},
}


def _schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t in fields])


_S, _I64 = pa.string(), pa.int64()
STATE_SCHEMAS: dict[str, pa.Schema] = {
    META: _schema(("end_ms", _I64)),
    USER_EVENTS: _schema(
        (USER_ID, _S), ("event_type", _S), *[(n, t) for n, t, _ in USER_EVENT_FIELDS], (DECAYED_MS, _I64)
    ),
    USERS: _schema((USER_ID, _S), *[(n, t) for n, t, _ in USER_FIELDS]),
    HOURLY: _schema(
        (USER_ID, _S),
        ("hour_ms", _I64),
        ("event_type", _S),
        (CATEGORY_ID, _S),
        ("n", _I64),
        ("decay_sum", pa.float64()),
    ),
    HOURS_OF_DAY: _schema((USER_ID, _S), ("hour_of_day", pa.int8()), ("n", _I64)),
    SESSIONS: _schema((USER_ID, _S), ("first_ms", _I64), ("last_ms", _I64), ("n", _I64)),
    ORDERS: _schema((USER_ID, _S), ("order_key", _S), ("ts_ms", _I64), ("cents", _I64)),
    CARTS: _schema((USER_ID, _S), ("item_id", _S), ("cart_ms", _I64), ("cart_cents", _I64), ("closed_ms", _I64)),
    ANCHORS: _schema((USER_ID, _S), ("item_id", _S), ("event_type", _S), ("ts_ms", _I64)),
    TARGETS: _schema((USER_ID, _S), ("item_id", _S), ("event_type", _S), ("ts_ms", _I64)),
    PENDING: STAGED_SCHEMA,
}
FAVS, ITEM_VIEWS = "favs", "item_views"  # added with the funnel features: older states lack them
STATE_SCHEMAS |= {
    FAVS: _schema((USER_ID, _S), ("item_id", _S), ("fav_ms", _I64), ("bought_ms", _I64)),
    ITEM_VIEWS: _schema((USER_ID, _S), ("item_id", _S), ("hour_ms", _I64), ("n", _I64)),
}
# Hourly tiles of the declared traits (docs/features.md, "Declared traits"): one row per user, trait key,
# hour, group and (distinct counts) value, with the partial aggregates every aggregation needs.
TRAIT_TILES = "trait_tiles"
STATE_SCHEMAS[TRAIT_TILES] = _schema(
    (USER_ID, _S),
    ("trait", _S),
    ("hour_ms", _I64),
    ("grp", _S),
    ("val", _S),
    ("n", _I64),
    ("total", _I64),
    ("decayed", pa.float64()),
    ("last_ms", _I64),
    ("last_id", _S),
    ("last_num", pa.float64()),
    ("last_str", _S),
)
# read as empty from a state written before them
ADDED_STATE_TABLES: tuple[str, ...] = (FAVS, ITEM_VIEWS, TRAIT_TILES)
STATE_TABLES: tuple[str, ...] = tuple(STATE_SCHEMAS)
_BUFFERED_SESSIONS = ("sessions_n", "sessions_ms", "sessions_events")
_BUFFERED_ORDERS = ("orders_n", "orders_cents", "orders_max_cents", "first_order_ms", "last_order_ms")
_BUFFERED_LATENCIES = ("v2c_n", "v2c_ms", "c2p_n", "c2p_ms")
BUFFERED_SCHEMA = _schema(
    (USER_ID, _S), *((f"b_{n}", _I64) for n in (*_BUFFERED_SESSIONS, *_BUFFERED_ORDERS, *_BUFFERED_LATENCIES))
)


# ---- sealed tiles (docs/architecture.md, "Sealed state tiles") -------------------------------
# The by-hour tables: every reader combines the rows of one key, so a row never changes once its hour is
# built (a late event only adds a row of its key). A checkpoint of the current layout holds none: every
# row is sealed into immutable tile files of the bucket by the build of its hour (``build.seal_before``).
BY_HOUR_TABLES: tuple[str, ...] = (HOURLY, ITEM_VIEWS, TRAIT_TILES)
# Every sealed table and the column whose value below the horizon seals a row. The anchor buffer is sealed
# too: an anchor older than the horizon is only ever looked up (``anchor_lookup_sql``), never changed.
SEALED_TIME: dict[str, str] = {**dict.fromkeys(BY_HOUR_TABLES, "hour_ms"), ANCHORS: "ts_ms"}
SEALED_TABLES: tuple[str, ...] = tuple(SEALED_TIME)
TILE_ANCHORS = "t_anchors"  # the sealed anchors a merge or snapshot looks up (``register_sealed_anchors``)
# SQL of the anchor type of a target row ``t`` (a cart takes a view, a purchase a cart)
_ANCHOR_TYPE = f"CASE t.event_type WHEN '{CART}' THEN '{VIEW}' ELSE '{CART}' END"
SEALED_MARKER = "sealed_tiles"  # key of a checkpoint manifest whose sealed tables hold the unsealed rows only


ITEM_VIEWS_HOURS = max(h for _, h in REPEAT_WINDOWS)  # how long ``item_views`` keeps its rows


def from_item_views(trait: Trait) -> bool:
    """Whether declared ``trait`` is read from ``item_views`` and has no tiles of its own: an ungrouped distinct
    count of the items viewed whose every window fits in the hours ``item_views`` keeps. That table holds views
    per (user, item, hour), the rows the trait's tiles would hold (and the views without an item, which the
    count skips), so the snapshot counts them in the grouping it makes for the repeat views anyway."""
    return (
        trait.aggregation == DISTINCT_COUNT
        and trait.of == "item_id"
        and trait.group_by is None
        and set(trait.events) == {VIEW}
        and longest_window_hours((trait,)) <= ITEM_VIEWS_HOURS
    )


def tiled(traits: tuple[Trait, ...]) -> tuple[Trait, ...]:
    """The declared traits with tiles of their own in ``trait_tiles`` (``from_item_views``: the others)."""
    return tuple(t for t in traits if not from_item_views(t))


def by_hour_oldest(name: str, e: int, traits: tuple[Trait, ...]) -> int | None:
    """The oldest ``hour_ms`` table ``name`` keeps as of ``e`` (its longest window); None: it keeps nothing."""
    if name == HOURLY:
        return e - int(HOURLY_RETENTION.total_seconds() * 1000)
    if name == ITEM_VIEWS:
        return e - ITEM_VIEWS_HOURS * MS_HOUR
    traits = tiled(traits)
    return e - longest_window_hours(traits) * MS_HOUR if traits else None


def by_hour_longest_ms(traits: tuple[Trait, ...]) -> int:
    """The longest window of every by-hour table: tiles older than this before a state's end are never read."""
    return max(-(by_hour_oldest(n, 0, traits) or 0) for n in BY_HOUR_TABLES)


def sealed_longest_ms(name: str, traits: tuple[Trait, ...], lateness_hours: int) -> int:
    """How long before a state's end the sealed rows of table ``name`` are still read: the by-hour tables'
    longest window; anchors, the latency lookback before the oldest target a state buffers (its horizon)."""
    if name == ANCHORS:
        return int(LATENCY_LOOKBACK.total_seconds() * 1000) + lateness_hours * MS_HOUR
    return by_hour_longest_ms(traits)


def tile_files(table_dir: Path, upto_ms: int, since_ms: int | None) -> list[Path]:
    """The tile files of one by-hour table of a bucket that can hold rows sealed by ``upto_ms`` at or after
    ``since_ms``: per day the compacted ``day.parquet`` when there is one (hourly files beside it are
    leftovers of an interrupted compaction, already in it), else the hourly files.

    Rows of day D were sealed by the builds of D's hours: ``sealed_ms`` in (D, D + 24h], ``hour_ms`` before that.
    """
    if not table_dir.is_dir():
        return []
    files: list[Path] = []
    for day in sorted(table_dir.glob("dt=*")):
        start = day_start_ms(day)
        if start + MS_HOUR > upto_ms or (since_ms is not None and start + 24 * MS_HOUR <= since_ms):
            continue
        if (day / DAY_FILE).is_file():
            files.append(day / DAY_FILE)
        else:
            files += [f for f in sorted(day.glob("hour=*.parquet")) if sealed_hour_ms(f) <= upto_ms]
    return files


@dataclass(frozen=True)
class SealedTiles:
    """Where the sealed rows of a state's by-hour tables are: the tile files under ``root``
    (``state_tiles/bucket=N``), rows with ``sealed_ms <= upto_ms`` (the checkpoint's end; later
    files belong to later checkpoints); ``users``: only these users' rows (a sampled rebuild)."""

    root: Path
    upto_ms: int
    users: pa.Array | None = field(default=None, compare=False)


def _tile_rows_sql(name: str, sealed: SealedTiles, files: list[Path], where: list[str]) -> str:
    """SQL of the rows of table ``name`` in the tile ``files`` the state of ``sealed`` holds (``where``: more filters)."""
    conditions = [f"{SEALED_MS} <= {sealed.upto_ms}", *where]
    if sealed.users is not None:
        conditions.append(f"{USER_ID} IN (SELECT {USER_ID} FROM sealed_users)")
    listed = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
    columns = ", ".join(STATE_SCHEMAS[name].names)
    return f"SELECT {columns} FROM read_parquet([{listed}]) WHERE {' AND '.join(conditions)}"


def _register_sealed_users(con: duckdb.DuckDBPyConnection, sealed: SealedTiles | None) -> None:
    if sealed is not None and sealed.users is not None:
        con.register("sealed_users", pa.table({USER_ID: pa.array(sealed.users, pa.string())}))


def register_by_hour(
    con: duckdb.DuckDBPyConnection, state: ProfileState, e: int, traits: tuple[Trait, ...], prefix: str = "s_"
) -> None:
    """Register the by-hour tables of ``state`` as of ``e`` (its end) as views ``<prefix><name>``: the in-memory
    rows plus, for a state with sealed tiles, the tile rows it holds within each table's retention (what
    ``advance`` would have kept in memory: the union equals the table of a state that never sealed)."""
    sealed = state.sealed
    _register_sealed_users(con, sealed)
    for name in BY_HOUR_TABLES:
        con.register(f"m{prefix}{name}", state.tables[name])
        oldest = by_hour_oldest(name, e, traits)
        files = [] if sealed is None or oldest is None else tile_files(sealed.root / name, sealed.upto_ms, oldest)
        if sealed is None or not files:
            con.execute(f"CREATE OR REPLACE TEMP VIEW {prefix}{name} AS SELECT * FROM m{prefix}{name}")
            continue
        where = [f"hour_ms >= {oldest}"]
        if name == TRAIT_TILES:
            where.append("trait IN (" + ", ".join("'" + t.key.replace("'", "''") + "'" for t in tiled(traits)) + ")")
        columns = ", ".join(STATE_SCHEMAS[name].names)
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW {prefix}{name} AS SELECT {columns} FROM m{prefix}{name} UNION ALL "
            + _tile_rows_sql(name, sealed, files, where)
        )


def register_sealed_anchors(
    con: duckdb.DuckDBPyConnection, state: ProfileState, since_ms: int, targets: str, memory: str
) -> bool:
    """Make ``t_anchors`` (``TILE_ANCHORS``) the anchors of ``state`` sealed into tile files with ``ts_ms >=
    since_ms`` (older ones cannot give a latency) of the targets in the relation ``targets`` that can still take
    one: a temp table, since every lookup reads it. False, and nothing registered nor read: the state has no
    sealed anchors, or no target needs them.

    A target needs none when ``memory`` (the in-memory anchors a lookup sees, with the hour's due ones) has an
    anchor of its user, item and anchor type at or before it and newer than every sealed one (the newest
    ``ts_ms`` of the tile files, from their Parquet statistics): the latest anchor before the target is then that
    one or a later one, whatever the tiles hold, and the maximum of the key's older anchors
    (``anchor_lookup_sql``) is an in-memory one. The tiles are read for the other targets' keys only.
    """
    sealed = state.sealed
    files = [] if sealed is None else tile_files(sealed.root / ANCHORS, sealed.upto_ms, since_ms)
    if sealed is None or not files:
        return False
    keys = f"{TILE_ANCHORS}_keys"
    newest = _newest_ts(files)
    in_memory = f"SELECT * FROM {memory}" + ("" if newest is None else f" WHERE ts_ms > {newest}")
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {keys} AS "
        f"SELECT DISTINCT t.user_id, t.item_id, t.event_type "
        f"FROM (SELECT user_id, item_id, {_ANCHOR_TYPE} AS event_type, ts_ms FROM {targets} t) t "
        f"ANTI JOIN ({in_memory}) m ON m.user_id = t.user_id "
        "AND m.item_id = t.item_id AND m.event_type = t.event_type AND m.ts_ms <= t.ts_ms"
    )
    if not con.execute(f"SELECT count(*) FROM {keys}").fetchall()[0][0]:
        return False
    _register_sealed_users(con, sealed)
    where = [
        f"ts_ms >= {since_ms}",
        f"(user_id, item_id, event_type) IN (SELECT user_id, item_id, event_type FROM {keys})",
    ]
    # The newest day first: it holds the anchors that crossed the horizon last, those the remaining targets
    # mostly take. A key whose latest anchor there is newer than every row of the earlier days (their newest
    # ``ts_ms``, from the statistics) is done: the lookups keep the latest only.
    newest_day = files[-1].parent
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {TILE_ANCHORS} AS "
        + _tile_rows_sql(ANCHORS, sealed, [f for f in files if f.parent == newest_day], where)
    )
    older = [f for f in files if f.parent != newest_day]
    if older:
        older_newest = _newest_ts(older)
        if older_newest is not None:
            con.execute(
                f"DELETE FROM {keys} WHERE (user_id, item_id, event_type) IN (SELECT user_id, item_id, event_type "
                f"FROM {TILE_ANCHORS} GROUP BY ALL HAVING max(ts_ms) > {older_newest})"
            )
        if con.execute(f"SELECT count(*) FROM {keys}").fetchall()[0][0]:
            con.execute(f"INSERT INTO {TILE_ANCHORS} " + _tile_rows_sql(ANCHORS, sealed, older, where))
    return True


def _newest_ts(files: list[Path]) -> int | None:
    """The largest ``ts_ms`` in the anchor tile ``files``, from their Parquet footers (None: a row group without
    statistics). An upper bound of the rows a state reads from them (a day file may hold later-sealed rows too),
    whatever lateness sealed them."""
    import pyarrow.parquet as pq

    newest: int | None = None
    for path in files:
        meta = pq.read_metadata(path)
        column = meta.schema.to_arrow_schema().get_field_index("ts_ms")
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(column).statistics
            if stats is None or not stats.has_min_max:
                return None
            newest = stats.max if newest is None else max(newest, stats.max)
    return newest


class MissingStateError(FileNotFoundError):
    """The state of the hour before is not in the lake: the hour cannot be built on it."""


@dataclass
class ProfileState:
    """Mergeable per-user state of one bucket as of ``end`` (named Arrow tables, docs/features.md)."""

    tables: dict[str, pa.Table]
    # Per-user totals of the sessions, orders and latencies the buffers hold (``BUFFERED_SCHEMA``):
    # derived from the buffers, never written. ``advance`` keeps them from its own grouping of
    # the buffers (regrouping about 4M buffered session rows took 1 s of a 10 s bucket at 1M
    # users); a state read from the lake has None and ``snapshot`` computes them.
    buffered: pa.Table | None = field(default=None, compare=False, repr=False)
    # The sealed rows of the by-hour tables (``BY_HOUR_TABLES``) when they live in tile files, not in
    # ``tables`` (a checkpoint of the current layout); None: ``tables`` hold every row.
    sealed: SealedTiles | None = field(default=None, compare=False)

    @property
    def end(self) -> datetime | None:
        """The exclusive end of the events merged so far (None for an empty state)."""
        meta = self.tables[META]
        if meta.num_rows == 0:
            return None
        return datetime.fromtimestamp(meta.column("end_ms")[0].as_py() / 1000, tz=UTC)


def empty_state() -> ProfileState:
    """A state with no users and no end: the start of the first hour."""
    return ProfileState({name: schema.empty_table() for name, schema in STATE_SCHEMAS.items()})


# ---- SQL helpers --------------------------------------------------------------------


def hour_ms(moment: datetime) -> int:
    if moment.tzinfo is None or moment != floor_hour(moment):
        raise ValueError(f"end must be a UTC hour boundary with tzinfo, got {moment!r}")
    return int(moment.timestamp()) * 1000


def cents_sql(amount_sql: str) -> str:
    """SQL of an amount in whole cents (money is summed in cents: exact in any order)."""
    return f"CAST(round(({amount_sql}) * 100) AS BIGINT)"


def decay(age_ms_sql: str, half_life_hours: float) -> str:
    """SQL factor 2^(-age / half-life): exact exponential decay of a count."""
    return f"pow(2.0, -CAST({age_ms_sql} AS DOUBLE) / {half_life_hours * MS_HOUR})"


def decayed_as_of(e: int, column: str, half_life_hours: float) -> str:
    """SQL of the ``user_events`` sum ``column`` (as of its row's ``DECAYED_MS``) decayed to ``e``."""
    return f"{column} * {decay(f'{e} - {DECAYED_MS}', half_life_hours)}"


def gap_groups(rows_sql: str, keys: str, gap_ms: int) -> str:
    """SQL marking gap-separated groups of ``rows_sql`` (a new group after a gap >= ``gap_ms``).

    Adds ``grp_first`` and ``grp_last`` (the group's first and last ``ts_ms``, which also
    identify the group within its keys) to each row. Rows with equal ``ts_ms`` always
    share a group, so the result does not depend on their order: only one of several
    tied rows sees the gap before (after) them, and RANGE frames include every tied row.
    Two sorted window passes: neighbours (lag, lead), then the running start and the
    trailing end.
    """
    order = f"PARTITION BY {keys} ORDER BY ts_ms"
    return f"""
        SELECT * EXCLUDE (starts, ends),
               max(CASE WHEN starts THEN ts_ms END) OVER ({order} RANGE UNBOUNDED PRECEDING) AS grp_first,
               min(CASE WHEN ends THEN ts_ms END)
                   OVER ({order} RANGE BETWEEN CURRENT ROW AND UNBOUNDED FOLLOWING) AS grp_last
        FROM (
            SELECT *, coalesce(ts_ms - lag(ts_ms) OVER ({order}) >= {gap_ms}, true) AS starts,
                      coalesce(lead(ts_ms) OVER ({order}) - ts_ms >= {gap_ms}, true) AS ends
            FROM ({rows_sql})
        )
    """


def interval_groups(intervals_sql: str, gap_ms: int) -> str:
    """SQL merging per-user intervals (``first_ms``, ``last_ms``, ``n`` events) into gap-separated groups.

    Sorted by start, an interval opens a new group when it starts ``gap_ms`` or more after
    the latest end of every earlier interval of its user. For points (first = last) this is
    ``gap_groups``; for intervals that are such groups it gives the groups of all their
    points, because within a group consecutive points are less than the gap apart, so only
    a group's ends can be near another point. Tied points always share a group (so points need
    no grouping by time first). Returns one row per group: ``user_id, grp_first, grp_last, n``.

    One sorted window pass: an interval ends its group when the next one starts ``gap_ms`` or more
    after the running maximum of the ends (the group's end: every earlier group ended a gap before
    this one's start), and the running sum of ``n`` there less the previous group's is the group's
    count. Only those last intervals (one per group) are sorted again, for the previous group's end:
    the interval after it starts this group. Two window passes over every interval cost about a third
    more (BENCHMARKS.md, "The full build's sessions").
    """
    running = "PARTITION BY user_id ORDER BY first_ms, last_ms ROWS UNBOUNDED PRECEDING"
    before = "PARTITION BY user_id ORDER BY grp_last"  # the last intervals: one per group, distinct ends
    return f"""
        SELECT user_id, coalesce(lag(next_first) OVER ({before}), user_first) AS grp_first, grp_last,
               cum_n - coalesce(lag(cum_n) OVER ({before}), 0) AS n
        FROM (
            SELECT user_id, lead(first_ms) OVER w AS next_first, max(last_ms) OVER w AS grp_last,
                   sum(n) OVER w AS cum_n, min(first_ms) OVER w AS user_first
            FROM ({intervals_sql})
            WINDOW w AS ({running})
        ) WHERE next_first IS NULL OR next_first - grp_last >= {gap_ms}
    """


def session_totals(groups: str) -> str:
    """Per-user session count, summed duration and events of the session groups in ``groups``
    (one row per session: ``user_id, grp_first, grp_last, n``)."""
    return f"""
        SELECT user_id, count(*) AS sessions_n, sum(grp_last - grp_first) AS sessions_ms, sum(n) AS sessions_events
        FROM {groups} GROUP BY user_id
    """


def order_totals(grouped: str) -> str:
    """Per-user order count, value, largest value and first/last order time of the orders in ``grouped``."""
    return f"""
        SELECT user_id, count(*) AS orders_n, sum(cents) AS orders_cents, max(cents) AS orders_max_cents,
               min(grp_first) AS first_order_ms, max(grp_first) AS last_order_ms
        FROM (SELECT user_id, order_key, grp_first, sum(cents) AS cents
              FROM {grouped} GROUP BY user_id, order_key, grp_first)
        GROUP BY user_id
    """


def target_latencies(targets: str, anchors: str) -> str:
    """Each target (cart, purchase) with the time since the latest earlier anchor (view, cart) of its item."""
    lookback = int(LATENCY_LOOKBACK.total_seconds() * 1000)
    return f"""
        SELECT t.user_id, t.event_type, t.ts_ms,
               CASE WHEN t.ts_ms - a.ts_ms <= {lookback} THEN t.ts_ms - a.ts_ms END AS lag_ms
        FROM (SELECT *, {_ANCHOR_TYPE} AS anchor_type FROM {targets} t) t
        ASOF LEFT JOIN (
            -- only anchors of items with a target: a hash probe, so the ASOF join sorts far fewer rows
            SELECT * FROM {anchors} a0 WHERE EXISTS (
                SELECT 1 FROM {targets} t0 WHERE t0.user_id = a0.user_id AND t0.item_id = a0.item_id)
        ) a
          ON t.user_id = a.user_id AND t.item_id = a.item_id AND t.anchor_type = a.event_type AND t.ts_ms >= a.ts_ms
    """


def anchor_lookup_sql(memory: str, horizon: int) -> str:
    """The anchors a state with end horizon ``horizon`` holds, from its in-memory anchors ``memory`` and its sealed
    ones (``t_anchors``): the recent ones and, per (user, item, type), the latest older one within the lookback.

    That is the anchor buffer of a state that never sealed (``advance`` keeps exactly these), so every
    latency equals: the sealed tiles hold, with the memory rows, each key's latest anchor before the horizon.
    """
    lookback = int(LATENCY_LOOKBACK.total_seconds() * 1000)
    return f"""
        SELECT user_id, item_id, event_type, ts_ms FROM {memory} WHERE ts_ms >= {horizon}
        UNION ALL
        SELECT user_id, item_id, event_type, max(ts_ms) AS ts_ms FROM (
            SELECT user_id, item_id, event_type, ts_ms FROM {memory} WHERE ts_ms < {horizon}
            UNION ALL SELECT user_id, item_id, event_type, ts_ms FROM {TILE_ANCHORS}
        ) GROUP BY user_id, item_id, event_type HAVING max(ts_ms) >= {horizon - lookback}
    """


def latency_totals(latencies: str) -> str:
    return f"""
        SELECT user_id,
               count(lag_ms) FILTER (WHERE event_type = '{CART}') AS v2c_n,
               sum(lag_ms) FILTER (WHERE event_type = '{CART}') AS v2c_ms,
               count(lag_ms) FILTER (WHERE event_type = '{PURCHASE}') AS c2p_n,
               sum(lag_ms) FILTER (WHERE event_type = '{PURCHASE}') AS c2p_ms
        FROM {latencies} GROUP BY user_id
    """


def buffered_sql(sessions: str, orders: str, targets: str, anchors: str) -> str:
    """Per-user totals (``BUFFERED_SCHEMA``) of gap-grouped buffered sessions and orders and the
    latencies of buffered targets: what the snapshot adds to the users' final totals."""

    def prefixed(sql: str, names: tuple[str, ...]) -> str:
        return f"SELECT user_id, {', '.join(f'CAST({n} AS BIGINT) AS b_{n}' for n in names)} FROM ({sql})"

    columns = ", ".join(f"max(b_{n}) AS b_{n}" for n in (*_BUFFERED_SESSIONS, *_BUFFERED_ORDERS, *_BUFFERED_LATENCIES))
    return f"""
        SELECT user_id, {columns} FROM (
            {prefixed(session_totals(sessions), _BUFFERED_SESSIONS)}
            UNION ALL BY NAME {prefixed(order_totals(orders), _BUFFERED_ORDERS)}
            UNION ALL BY NAME {prefixed(latency_totals(f"({target_latencies(targets, anchors)})"), _BUFFERED_LATENCIES)}
        ) GROUP BY user_id
    """


def fetch(con: duckdb.DuckDBPyConnection, sql: str, schema: pa.Schema) -> pa.Table:
    return con.sql(sql).to_arrow_table().select(schema.names).cast(schema)


def affinity_decay_sql(age_ms_sql: str) -> str:
    return decay(age_ms_sql, AFFINITY_HALF_LIFE.total_seconds() / 3600)
