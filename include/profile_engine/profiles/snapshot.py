"""``snapshot``: the per-bucket profiles and interests of a state as of its end (SQL over the state tables).

docs/features.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.config import Settings
from profile_engine.contracts.events import CART, EVENT_TYPES, FAV, PURCHASE, VIEW
from profile_engine.contracts.profiles import (
    AVG_ORDER_VALUE,
    CART_VIEW_RATE,
    CATEGORY_ID,
    DISTINCT_CATEGORIES,
    EVENTS_PER_SESSION,
    FIRST_SEEN_AT,
    FREQUENCY_ORDERS,
    HALF_LIVES,
    HOURS_SINCE_LAST_CART,
    HOURS_SINCE_LAST_EVENT,
    HOURS_SINCE_LAST_FAV,
    HOURS_SINCE_LAST_PURCHASE,
    HOURS_SINCE_LAST_VIEW,
    INTERESTS_SCHEMA,
    LAST_SEEN_AT,
    LIFECYCLE_ACTIVE,
    LIFECYCLE_CHURNED,
    LIFECYCLE_DORMANT,
    LIFECYCLE_NEW,
    LIFECYCLE_STAGE,
    MAX_ORDER_VALUE,
    MEAN_CART_TO_PURCHASE_HOURS,
    MEAN_HOURS_BETWEEN_ORDERS,
    MEAN_PRICE_PURCHASED,
    MEAN_PRICE_VIEWED,
    MEAN_SESSION_MINUTES,
    MEAN_VIEW_TO_CART_HOURS,
    MONETARY_TOTAL,
    OPEN_CART_ITEMS,
    OPEN_CART_VALUE,
    OPEN_WINDOWS,
    PEAK_HOUR_LOCAL,
    PURCHASE_CART_RATE,
    PURCHASE_VIEW_RATE,
    RATE_WINDOWS,
    RECENCY_HOURS,
    REPEAT_WINDOWS,
    SESSION_COUNT,
    SHORT_WINDOW_TYPES,
    SHORT_WINDOWS,
    SNAPSHOT_HOUR,
    TOP_CATEGORIES,
    TOP_CATEGORY_SCORES,
    USER_ID,
    WINDOWS,
    count_column,
    decayed_column,
    first_at_column,
    last_at_column,
    open_items_column,
    rate_column,
    repeat_columns,
    snapshot_schema,
)
from profile_engine.contracts.traits import DECAYED_COUNT, Trait, load_traits
from profile_engine.hours import MS_HOUR, format_hour
from profile_engine.lake import db
from profile_engine.profiles.state import (
    AFFINITY_DECIMALS,
    AFFINITY_WEIGHTS,
    BY_HOUR_TABLES,
    CARTS,
    CHURNED_AFTER,
    DORMANT_AFTER,
    FAVS,
    HOURLY,
    HOURLY_RETENTION,
    HOURS_OF_DAY,
    ITEM_VIEWS,
    LATENCY_LOOKBACK,
    MIN_AFFINITY,
    NEW_USER_AGE,
    OPEN_CART_TTL,
    ORDER_GAP,
    PENDING,
    TRAIT_TILES,
    USER_EVENTS,
    USERS,
    ProfileState,
    affinity_decay_sql,
    anchor_lookup_sql,
    buffered_sql,
    decayed_as_of,
    fetch,
    from_item_views,
    gap_groups,
    hour_ms,
    register_by_hour,
    register_sealed_anchors,
    tiled,
)
from profile_engine.profiles.traits import item_view_counts, trait_ctes

if TYPE_CHECKING:
    import duckdb


@dataclass(frozen=True)
class AffinitySums:
    """The unrounded affinities of a snapshot (``AFFINITY_SUMS_SCHEMA``: every (user, category) of the retention,
    also those below ``MIN_AFFINITY``, with their ``views_<w>``), kept for the snapshot of the next hour
    (docs/architecture.md, "The snapshot of the changed users"). ``end_ms``: the end of the snapshot they belong
    to. Each row's ``affinity_sum`` is the decayed sum as of its own ``sum_ms`` (the end of the hour that last
    summed that user's hourly rows): its affinity at a later end is that times one exact decay factor."""

    table: pa.Table
    end_ms: int


@dataclass(frozen=True)
class PreviousHour:
    """The hour before a snapshot, from which ``snapshot`` recomputes only the rows that can differ
    (docs/architecture.md, "The snapshot of the changed users").

    ``profiles``: the snapshot of ``state`` as of its end (at least the ``snapshot_schema`` columns, e.g. the
    published bucket with its population columns); ``state``: the state that ``advance`` moved by one hour,
    merging ``events`` (the hour's staged events), into the state being snapshotted; ``affinities``: the
    unrounded affinities of that snapshot (``Snapshot.affinities``), from which the affinities of the users
    that did not change are moved on (None, or of another end: every affinity is computed).
    """

    profiles: pa.Table
    state: ProfileState
    events: pa.Table
    affinities: AffinitySums | None = None


class Snapshot(NamedTuple):
    """A bucket's snapshot (``snapshot``): the profiles, the interests long table, and how they were computed."""

    profiles: pa.Table
    interests: pa.Table
    # whether the rows of the hour before were used (``PreviousHour``), and how many users were computed from
    # the state tables (every user when not, or when more than ``MOST_CHANGED`` of them changed)
    from_previous_hour: bool
    users_from_state: int
    # the unrounded affinities, for the next hour's snapshot (``keep_affinities``; else None)
    affinities: AffinitySums | None = None
    # whether the affinities of the users that did not change were moved on from ``PreviousHour.affinities``
    affinities_from_previous_hour: bool = False


def snapshot(
    state: ProfileState,
    end: datetime,
    settings: Settings,
    previous: PreviousHour | None = None,
    *,
    keep_affinities: bool = False,
) -> Snapshot:
    """The profile snapshot as of ``end`` (the state's end) and the interests long table.

    Profiles carry every contract column (``snapshot_schema``: the declared traits of
    ``settings.traits`` last) except the population ones (RFM), which need
    all buckets and are added by ``add_population_features``. Rows are sorted by
    ``user_id`` (interests by ``user_id, category_id``). Contains no event at or after ``end``.

    With ``previous`` (the snapshot one hour earlier and the state it was taken of), only the users with
    events in the hour or a row crossing a window bound are computed from the state tables; every other
    row is the previous one with its time-dependent columns (``time_columns``) moved to ``end``. The
    result is the same table. A ``previous`` that does not continue ``state`` (another end, other
    columns) is ignored. With its unrounded affinities (``PreviousHour.affinities``) too, only the
    changed users' affinities are computed from the hourly rows; the others' are moved on by one decay factor.
    ``keep_affinities``: return the unrounded affinities (``Snapshot.affinities``) for the next hour.
    """
    e = hour_ms(end)
    if state.end is not None and state.end != end:
        raise ValueError(f"state ends at {format_hour(state.end)}, not {format_hour(end)}: advance it first")
    traits = load_traits(settings.traits)
    con = db.cursor()
    try:
        for name, table in state.tables.items():
            if name not in BY_HOUR_TABLES:
                con.register(f"s_{name}", table)
        register_by_hour(con, state, e, traits)  # in memory, or the hour's rows in memory and sealed tiles
        if state.buffered is not None:
            con.register("s_buffered", state.buffered)
        else:  # a state read from the lake: its sessions are groups already, its orders lines
            order_gap = int(ORDER_GAP.total_seconds() * 1000)
            sessions = "(SELECT user_id, first_ms AS grp_first, last_ms AS grp_last, n FROM s_sessions)"
            orders = f"({gap_groups('SELECT * FROM s_orders', 'user_id, order_key', order_gap)})"
            horizon = e - settings.lateness_hours * MS_HOUR  # the oldest buffered target
            lookback = int(LATENCY_LOOKBACK.total_seconds() * 1000)
            anchors = "s_anchors"
            if register_sealed_anchors(con, state, horizon - lookback, "s_targets", "s_anchors"):
                anchors = f"({anchor_lookup_sql('s_anchors', horizon)})"
            con.execute(f"CREATE TEMP TABLE s_buffered AS {buffered_sql(sessions, orders, 's_targets', anchors)}")
        schema = snapshot_schema(traits)
        moved = previous is not None and _continues(previous, state, end, schema)
        kept = None
        changed, most = 0, False  # how many users changed, and whether that is most of them (every row computed)
        if previous is not None and moved:
            changed = changed_users(con, previous, e, traits, schema)
            most = _most_changed(changed, previous)
            kept = None if most else _kept_affinities(previous, e)
        if kept is not None:  # the changed users' from their hourly rows, the others' moved on
            con.register("p_affinity_sums", kept)
            # their hourly rows picked once (a semi join over every tile row) for this and their profiles
            con.execute(
                f"CREATE TEMP TABLE {CHANGED_HOURLY} AS "
                f"SELECT * FROM s_{HOURLY} WHERE user_id IN (SELECT user_id FROM {CHANGED})"
            )
            sums = (
                f"{_affinity_sums_sql(e, CHANGED_HOURLY)} UNION ALL BY NAME "
                f"SELECT * FROM p_affinity_sums WHERE user_id NOT IN (SELECT user_id FROM {CHANGED})"
            )
        else:
            sums = _affinity_sums_sql(e, f"s_{HOURLY}")
        con.execute(f"CREATE TEMP TABLE s_affinity_sums AS {sums}")
        con.execute(f"CREATE TEMP TABLE s_affinities AS {_affinities_sql(e)}")
        con.execute(f"CREATE TEMP VIEW s_interests AS SELECT * FROM s_affinities WHERE affinity >= {MIN_AFFINITY}")
        interests = fetch(con, "SELECT * FROM s_interests ORDER BY user_id, category_id", INTERESTS_SCHEMA)
        affinities = (
            AffinitySums(fetch(con, "SELECT * FROM s_affinity_sums", AFFINITY_SUMS_SCHEMA), e)
            if keep_affinities
            else None
        )
        if moved and not most:
            picked = {HOURLY: CHANGED_HOURLY} if kept is not None else {}
            profiles = from_previous_hour(con, e, traits, schema, picked)
            return Snapshot(profiles, interests, True, changed, affinities, kept is not None)
        profiles = fetch(con, _profiles_sql(e, traits), schema)  # every row
    finally:
        con.close()
    return Snapshot(profiles, interests, moved, profiles.num_rows, affinities)


# The temp table of the users ``from_previous_hour`` computes from the state (``_crossed_sql``), and of their
# hourly rows when the affinities of the others are moved on (the changed users' are grouped from it).
CHANGED = "changed"
CHANGED_HOURLY = "changed_hourly"
# The relations ``_profiles_sql`` reads (each as ``<src><name>``).
SOURCES: tuple[str, ...] = (
    USER_EVENTS,
    USERS,
    HOURLY,
    CARTS,
    FAVS,
    HOURS_OF_DAY,
    ITEM_VIEWS,
    TRAIT_TILES,
    "buffered",
    "affinities",
    "interests",
)
# The relations the time-dependent columns come from (``time_columns``): the decayed sums, last and
# first times of ``user_events``, the interests (decayed every hour) and the tiles of the decayed traits.
_TIME_SOURCES: tuple[str, ...] = (USER_EVENTS, TRAIT_TILES, "interests")


# Above this share of changed users the snapshot computes every row: the changed users' rows cost about as much
# as everyone's then (100k users, 29 days: 2.23 s at 5 % changed, 2.67 s at 50 %, 2.94 s at 75 %, every row
# 2.85 s; BENCHMARKS.md, "The snapshot of the changed users").
MOST_CHANGED = 0.6


def _most_changed(changed: int, previous: PreviousHour) -> bool:
    """Whether ``changed`` users are more than ``MOST_CHANGED`` of the hour before's: then every row is computed."""
    return bool(changed > MOST_CHANGED * previous.profiles.num_rows)


def _decayed_traits(traits: tuple[Trait, ...]) -> tuple[Trait, ...]:
    return tuple(t for t in traits if t.aggregation == DECAYED_COUNT)


def time_columns(traits: tuple[Trait, ...]) -> tuple[str, ...]:
    """The snapshot columns computed for every user every hour: those that move with the end alone (the hour, the
    hours since and recency, the lifecycle stage, the decayed counters, the decayed-count traits, the top
    categories and their scores: ranked by the rounded decayed affinity, so ties and the interest threshold move
    with the end). Every other column of a user changes only with their events or a row crossing a window bound
    (``_crossed_sql``): the distinct categories and the repeat views of a category too, though read from the
    affinities, which are computed for every user (a category's row leaves them when its last hourly row leaves
    the retention, a bound of the crossing rule)."""
    return (
        SNAPSHOT_HOUR,
        HOURS_SINCE_LAST_EVENT,
        HOURS_SINCE_LAST_VIEW,
        HOURS_SINCE_LAST_CART,
        HOURS_SINCE_LAST_FAV,
        HOURS_SINCE_LAST_PURCHASE,
        RECENCY_HOURS,
        LIFECYCLE_STAGE,
        *(decayed_column(t, h) for t in EVENT_TYPES for h, _ in HALF_LIVES),
        *TOP_CATEGORIES,
        *TOP_CATEGORY_SCORES,
        *trait_ctes(_decayed_traits(traits), 0, "tiles")[1],
    )


def _crossing_hours(traits: tuple[Trait, ...]) -> dict[str, set[int]]:
    """Per state table and time column, the lengths (hours) of every window the snapshot reads it with."""
    hourly = {h for _, h in (*WINDOWS, *SHORT_WINDOWS, *RATE_WINDOWS, *REPEAT_WINDOWS)}
    opened = {h for _, h in OPEN_WINDOWS}
    return {
        f"{HOURLY}.hour_ms": hourly | {int(HOURLY_RETENTION.total_seconds()) // 3600},
        f"{ITEM_VIEWS}.hour_ms": {h for _, h in REPEAT_WINDOWS}
        | {h for t in traits if from_item_views(t) for _, h in t.windows},
        f"{TRAIT_TILES}.hour_ms": {h for t in tiled(traits) for _, h in t.windows},
        f"{CARTS}.cart_ms": opened | {int(OPEN_CART_TTL.total_seconds()) // 3600},
        f"{FAVS}.fav_ms": opened,
    }


def _crossed_sql(e: int, traits: tuple[Trait, ...]) -> str:
    """SQL of the users the snapshot at ``e`` must compute from the state (``from_previous_hour``): those with
    events in the hour (merged or held back: ``p_events``, ``p_pending``), those new since the previous
    snapshot, and those with a row of the previous state (``p_<table>`` as of ``e - 1h``) that one of
    the snapshot's windows held at ``e - 1h`` and no longer holds at ``e``."""
    parts = [
        "SELECT user_id FROM p_events",
        "SELECT user_id FROM p_pending",
        f"(SELECT user_id FROM s_{USER_EVENTS} EXCEPT SELECT user_id FROM p_profiles)",
    ]
    for column, lengths in _crossing_hours(traits).items():
        table, time = column.split(".")
        bounds = " OR ".join(
            f"({time} >= {e - (h + 1) * MS_HOUR} AND {time} < {e - h * MS_HOUR})" for h in sorted(lengths)
        )
        if bounds:
            parts.append(f"SELECT user_id FROM p_{table} WHERE {bounds}")
    return "SELECT DISTINCT user_id FROM (" + " UNION ALL ".join(parts) + ")"


def _continues(previous: PreviousHour, state: ProfileState, end: datetime, schema: pa.Schema) -> bool:
    """Whether ``previous`` is the snapshot of the hour before ``state`` with every column ``schema`` has."""
    before = previous.state.end
    if before is None or state.end != end or hour_ms(end) - hour_ms(before) != MS_HOUR:
        return False
    fields = previous.profiles.schema
    if any(fields.get_field_index(f.name) < 0 for f in schema):
        return False
    if previous.profiles.num_rows == 0:
        return True
    hours = pc.min_max(previous.profiles.column(SNAPSHOT_HOUR).cast(pa.int64())).as_py()
    return bool(hours["min"] == hours["max"] == hour_ms(before) - MS_HOUR)


def changed_users(
    con: duckdb.DuckDBPyConnection, previous: PreviousHour, e: int, traits: tuple[Trait, ...], schema: pa.Schema
) -> int:
    """Register the hour before (``p_<table>``, ``p_profiles`` in ``schema``) and create ``CHANGED``, the users the snapshot at
    ``e`` computes from the state (``_crossed_sql``); how many they are."""
    before = previous.state
    con.register("p_events", previous.events.select([USER_ID]))
    con.register("p_pending", before.tables[PENDING].select([USER_ID]))
    for name in (CARTS, FAVS):
        con.register(f"p_{name}", before.tables[name])
    register_by_hour(con, before, e - MS_HOUR, traits, prefix="p_")
    # as the SQL computes them: times in epoch ms (``fetch`` casts them to the contract's timestamps)
    as_computed = pa.schema([pa.field(f.name, pa.int64()) if pa.types.is_timestamp(f.type) else f for f in schema])
    con.register("p_profiles", previous.profiles.select(schema.names).cast(schema).cast(as_computed))
    con.execute(f"CREATE TEMP TABLE {CHANGED} AS {_crossed_sql(e, traits)}")
    return int(con.sql(f"SELECT count(*) FROM {CHANGED}").fetchall()[0][0])


def _kept_affinities(previous: PreviousHour, e: int) -> pa.Table | None:
    """The unrounded affinities of the hour before in ``AFFINITY_SUMS_SCHEMA``, or None when there are none, they
    are of another end or lack a column (every affinity is then computed from the hourly rows)."""
    kept = previous.affinities
    if kept is None or kept.end_ms != e - MS_HOUR:
        return None
    names = kept.table.column_names
    if any(f.name not in names for f in AFFINITY_SUMS_SCHEMA):
        return None
    try:
        return kept.table.select(AFFINITY_SUMS_SCHEMA.names).cast(AFFINITY_SUMS_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def from_previous_hour(
    con: duckdb.DuckDBPyConnection,
    e: int,
    traits: tuple[Trait, ...],
    schema: pa.Schema,
    picked: dict[str, str] | None = None,
) -> pa.Table:
    """The snapshot as of ``e`` from the one of ``e - 1h``: the changed users (``CHANGED``, made by
    ``changed_users``) computed by ``_profiles_sql`` over their rows only (``c_<source>``); every other user of
    the state keeps their row of ``previous.profiles`` with the ``time_columns`` computed over the time sources
    of those users only (``t_<source>``; the other sources empty). ``picked``: sources whose changed users' rows
    are already in a table (source -> table). The caller computes every row instead when more than ``MOST_CHANGED``
    of the users changed (``_most_changed``)."""
    decayed = _decayed_traits(traits)
    for name in SOURCES:
        rows = f"s_{name} WHERE user_id IN (SELECT user_id FROM {CHANGED})"
        con.execute(f"CREATE TEMP VIEW c_{name} AS SELECT * FROM {(picked or {}).get(name, rows)}")
        kept = f"NOT IN (SELECT user_id FROM {CHANGED})" if name in _TIME_SOURCES else "IS NULL AND false"
        con.execute(f"CREATE TEMP VIEW t_{name} AS SELECT * FROM s_{name} WHERE user_id {kept}")
    moved = time_columns(traits)
    replaced = ", ".join(f"t.{c} AS {c}" for c in moved if c != USER_ID)
    kept_rows = (
        f"SELECT p.* REPLACE ({replaced}) FROM p_profiles p "
        f"JOIN ({_profiles_sql(e, decayed, 't_', ordered=False)}) t USING (user_id)"
    )
    return fetch(
        con,
        f"SELECT * FROM ({_profiles_sql(e, traits, 'c_', ordered=False)}) UNION ALL BY NAME {kept_rows} ORDER BY user_id",
        schema,
    )


# The unrounded affinities a snapshot keeps for the next hour's (``AffinitySums``): the name of their table in the
# state checkpoint and the key of its manifest saying which end they are of.
AFFINITY_SUMS = "affinity_sums"
AFFINITY_SUMS_END = "affinity_sums_end"
AFFINITY_SUMS_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.string()),
        pa.field(CATEGORY_ID, pa.string()),
        *(pa.field(f"views_{w}", pa.int64()) for w, _ in REPEAT_WINDOWS),
        pa.field("affinity_sum", pa.float64()),
        pa.field("sum_ms", pa.int64()),
    ]
)


def _affinity_sums_sql(e: int, hourly: str) -> str:
    """Unrounded affinity (as of ``e``: ``sum_ms``) and ``views_<w>`` of every (user, category) of ``hourly``'s rows
    within the retention, before the pruning rule.

    ``fsum`` (a compensated sum) gives the same value to the last bit whatever order DuckDB reads the rows in (tile
    files are scanned in parallel): the sums are kept in the lake, and a rerun of an hour must write what the hour
    wrote (tests/reliability). ``sum`` differed in the last bit between runs; it costs the same."""
    weight = "CASE event_type " + " ".join(f"WHEN '{t}' THEN {w}" for t, w in AFFINITY_WEIGHTS.items()) + " END"
    retention = int(HOURLY_RETENTION.total_seconds() * 1000)
    views = ", ".join(
        f"CAST(sum(n) FILTER (WHERE event_type = '{VIEW}' AND hour_ms >= {e - h * MS_HOUR}) AS BIGINT) AS views_{w}"
        for w, h in REPEAT_WINDOWS
    )
    return f"""
        SELECT user_id, category_id, {views},
               fsum({weight} * decay_sum * {affinity_decay_sql(f"{e} - hour_ms - {MS_HOUR}")}) AS affinity_sum,
               CAST({e} AS BIGINT) AS sum_ms
        FROM {hourly} WHERE category_id IS NOT NULL AND hour_ms >= {e - retention}
        GROUP BY user_id, category_id
    """


def _affinities_sql(e: int) -> str:
    """Affinity of every (user, category) seen within the retention, before the pruning rule: the unrounded sums
    (``s_affinity_sums``) as of ``e`` (one exact decay factor from their ``sum_ms``), rounded.

    The interests are the rows at or above ``MIN_AFFINITY``; the number of distinct
    categories counts every row, so both come from this one table.
    """
    views = ", ".join(f"views_{w}" for w, _ in REPEAT_WINDOWS)
    moved = f"affinity_sum * {affinity_decay_sql(f'{e} - sum_ms')}"
    return f"""
        SELECT user_id, category_id, {views},
               round(CASE WHEN sum_ms = {e} THEN affinity_sum ELSE {moved} END, {AFFINITY_DECIMALS}) AS affinity
        FROM s_affinity_sums
    """


def _funnel_sql(e: int, src: str, traits: tuple[Trait, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """The funnel columns of the snapshot: (name -> SQL of a per-user CTE, column -> expression).

    The expressions may use the columns of ``_profiles_sql`` (``n_{t}`` lifetime counts,
    ``c_{t}_{w}`` window counts, ``last_{t}_ms``). Open carts and favourites come from the
    ``carts`` and ``favs`` state, repeat views of an item from ``item_views`` and of a
    category from the hourly buckets (the ``views_{w}`` of the ``affinities`` table); ``src``
    prefixes the relations read (``_profiles_sql``). The grouping of ``item_views`` per (user, item)
    also counts the declared traits read from it (``traits.item_view_counts``).
    """
    hours = f"/ {float(MS_HOUR)}"
    oldest = e - max(h for _, h in OPEN_WINDOWS) * MS_HOUR

    def open_counts(table: str, kind: str, opened: str, closed: str) -> str:
        counts = ", ".join(
            f"count(*) FILTER (WHERE {opened} >= {e - h * MS_HOUR}) AS {open_items_column(kind, w)}"
            for w, h in OPEN_WINDOWS
        )
        return (
            f"SELECT user_id, {counts} FROM {table} "
            f"WHERE {opened} >= {oldest} AND ({closed} IS NULL OR {closed} < {opened}) GROUP BY user_id"
        )

    def repeats(table: str, prefix: str, more: Sequence[str] = ()) -> str:
        return (
            ", ".join(
                [
                    f"max(views_{w}) AS {prefix}_max_{w}, count(*) FILTER (WHERE views_{w} >= 2) AS {prefix}_repeat_{w}"
                    for w, _ in REPEAT_WINDOWS
                ]
                + list(more)
            )
            + f" FROM {table} GROUP BY user_id"
        )

    counted = item_view_counts(traits, e)
    item_views = ", ".join(
        [f"sum(n) FILTER (WHERE hour_ms >= {e - h * MS_HOUR}) AS views_{w}" for w, h in REPEAT_WINDOWS]
        + (["max(hour_ms) AS latest"] if counted else [])
    )
    ctes = {
        "fo_cart": open_counts(f"{src}carts", CART, "cart_ms", "closed_ms"),
        "fo_fav": open_counts(f"{src}favs", FAV, "fav_ms", "bought_ms"),
        "fr_item": "SELECT user_id, "
        + repeats(
            f"(SELECT user_id, item_id, {item_views} FROM {src}item_views GROUP BY user_id, item_id)", "item", counted
        ),
        "fr_cat": "SELECT user_id, " + repeats(f"{src}affinities", "category"),
    }

    def ratio(numerator: str, denominator: str) -> str:
        return f"CASE WHEN {denominator} > 0 THEN {numerator} / {denominator} END"

    cols = {count_column(t, w): f"coalesce(c_{t}_{w}, 0)" for t in SHORT_WINDOW_TYPES for w, _ in SHORT_WINDOWS}
    cols |= {
        open_items_column(k, w): f"coalesce({open_items_column(k, w)}, 0)" for k in (CART, FAV) for w, _ in OPEN_WINDOWS
    }
    cols[PURCHASE_CART_RATE] = ratio(f"n_{PURCHASE}", f"n_{CART}")
    for w, _ in RATE_WINDOWS:
        cols[rate_column(CART_VIEW_RATE, w)] = ratio(f"c_{CART}_{w}", f"coalesce(c_{VIEW}_{w}, 0)")
        cols[rate_column(PURCHASE_CART_RATE, w)] = ratio(f"c_{PURCHASE}_{w}", f"coalesce(c_{CART}_{w}, 0)")
    for w, _ in REPEAT_WINDOWS:
        max_item, repeat_items, max_category, repeat_categories = repeat_columns(w)
        cols[max_item], cols[repeat_items] = f"coalesce(item_max_{w}, 0)", f"coalesce(item_repeat_{w}, 0)"
        cols[max_category] = f"coalesce(category_max_{w}, 0)"
        cols[repeat_categories] = f"coalesce(category_repeat_{w}, 0)"
    cols[HOURS_SINCE_LAST_VIEW] = f"({e} - last_{VIEW}_ms) {hours}"
    cols[HOURS_SINCE_LAST_FAV] = f"({e} - last_{FAV}_ms) {hours}"
    return ctes, cols


def _profiles_sql(e: int, traits: tuple[Trait, ...], src: str = "s_", ordered: bool = True) -> str:
    """SQL of the per-bucket snapshot: the users rows plus what the buffers hold (``s_buffered``) as of ``e``,
    then the columns of the declared ``traits`` from their tiles.

    ``src`` prefixes every relation read (``SOURCES``: the state tables, ``buffered``, ``affinities`` and
    ``interests``), so one SQL computes the rows of other relations of the same shape (``from_previous_hour``).
    """
    hours = f"/ {float(MS_HOUR)}"
    ttl = int(OPEN_CART_TTL.total_seconds() * 1000)
    # Window counts: the hourly rows first summed per user, type and the shortest window holding them (windows
    # all end at e, so a row is in window h when that one is at most h): the filtered sums then run over a
    # few rows per user instead of every hour's (0.95-1.07 s against 1.45-1.57 s over 4.1M rows at 29 days).
    spans = sorted({h for _, h in (*WINDOWS, *SHORT_WINDOWS)})
    span = "CASE " + " ".join(f"WHEN hour_ms >= {e - h * MS_HOUR} THEN {h}" for h in spans) + " END"
    windows = [
        f"coalesce(sum(n) FILTER (WHERE event_type = '{t}' AND span <= {h}), 0) AS c_{t}_{w}"
        for t, w, h in (
            *((t, w, h) for t in EVENT_TYPES for w, h in WINDOWS),
            *((t, w, h) for t in SHORT_WINDOW_TYPES for w, h in SHORT_WINDOWS),
        )
    ]
    spans_sql = (
        f"SELECT user_id, event_type, {span} AS span, sum(n) AS n FROM {src}hourly "
        f"WHERE hour_ms >= {e - spans[-1] * MS_HOUR} GROUP BY user_id, event_type, span"
    )
    per_type = []
    for t in EVENT_TYPES:
        where = f"FILTER (WHERE event_type = '{t}')"
        per_type += [f"coalesce(sum({n}) {where}, 0) AS {n}_{t}" for n in ("n", "price_n", "price_cents")]
        per_type += [f"min(first_ms) {where} AS first_{t}_ms", f"max(last_ms) {where} AS last_{t}_ms"]
        per_type += [
            f"coalesce(sum({decayed_as_of(e, f'decayed_{h}', hours)}) {where}, 0) AS decayed_{h}_{t}"
            for h, hours in HALF_LIVES
        ]
    cols: dict[str, str] = {USER_ID: "ue.user_id", SNAPSHOT_HOUR: str(e - MS_HOUR)}
    for t in EVENT_TYPES:
        cols[count_column(t, "lifetime")] = f"n_{t}"
        cols |= {count_column(t, w): f"coalesce(c_{t}_{w}, 0)" for w, _ in WINDOWS}
        cols |= {decayed_column(t, h): f"decayed_{h}_{t}" for h, _ in HALF_LIVES}
        cols |= {first_at_column(t): f"first_{t}_ms", last_at_column(t): f"last_{t}_ms"}
    first_seen = "least(" + ", ".join(f"first_{t}_ms" for t in EVENT_TYPES) + ")"
    last_seen = "greatest(" + ", ".join(f"last_{t}_ms" for t in EVENT_TYPES) + ")"
    n_orders = "(coalesce(orders_n, 0) + coalesce(b_orders_n, 0))"
    # net spend: purchase lines plus refunds (negative); money is null for a user none of
    # whose events carries a price (a source without prices), never a made-up 0
    cents = "(coalesce(orders_cents, 0) + coalesce(b_orders_cents, 0) + coalesce(refund_cents, 0))"
    priced = "(" + " + ".join(f"price_n_{t}" for t in EVENT_TYPES) + " > 0)"
    first_order = "least(first_order_ms, b_first_order_ms)"
    last_order = "greatest(last_order_ms, b_last_order_ms)"
    n_sessions = "(coalesce(sessions_n, 0) + coalesce(b_sessions_n, 0))"
    v2c_n, c2p_n = "(coalesce(v2c_n, 0) + coalesce(b_v2c_n, 0))", "(coalesce(c2p_n, 0) + coalesce(b_c2p_n, 0))"
    cols |= {
        FIRST_SEEN_AT: first_seen,
        LAST_SEEN_AT: last_seen,
        HOURS_SINCE_LAST_EVENT: f"({e} - {last_seen}) {hours}",
        HOURS_SINCE_LAST_CART: f"({e} - last_{CART}_ms) {hours}",
        HOURS_SINCE_LAST_PURCHASE: f"({e} - last_{PURCHASE}_ms) {hours}",
        FREQUENCY_ORDERS: n_orders,
        MONETARY_TOTAL: f"CASE WHEN {priced} THEN {cents} / 100.0 END",
        AVG_ORDER_VALUE: f"CASE WHEN {priced} AND {n_orders} > 0 THEN round({cents} / {n_orders}) / 100.0 END",
        MAX_ORDER_VALUE: f"CASE WHEN {priced} THEN greatest(orders_max_cents, b_orders_max_cents) / 100.0 END",
        RECENCY_HOURS: f"({e} - last_{PURCHASE}_ms) {hours}",
        MEAN_HOURS_BETWEEN_ORDERS: f"CASE WHEN {n_orders} > 1 THEN ({last_order} - {first_order}) {hours} / ({n_orders} - 1) END",
        MEAN_VIEW_TO_CART_HOURS: f"CASE WHEN {v2c_n} > 0 THEN (coalesce(v2c_ms, 0) + coalesce(b_v2c_ms, 0)) {hours} / {v2c_n} END",
        MEAN_CART_TO_PURCHASE_HOURS: f"CASE WHEN {c2p_n} > 0 THEN (coalesce(c2p_ms, 0) + coalesce(b_c2p_ms, 0)) {hours} / {c2p_n} END",
        SESSION_COUNT: n_sessions,
        MEAN_SESSION_MINUTES: f"CASE WHEN {n_sessions} > 0 THEN (coalesce(sessions_ms, 0) + coalesce(b_sessions_ms, 0)) / 60000.0 / {n_sessions} END",
        EVENTS_PER_SESSION: f"CASE WHEN {n_sessions} > 0 THEN (coalesce(sessions_events, 0) + coalesce(b_sessions_events, 0)) / {n_sessions} END",
        CART_VIEW_RATE: f"CASE WHEN n_{VIEW} > 0 THEN n_{CART} / n_{VIEW} END",
        PURCHASE_VIEW_RATE: f"CASE WHEN n_{VIEW} > 0 THEN n_{PURCHASE} / n_{VIEW} END",
        OPEN_CART_ITEMS: "coalesce(open_items, 0)",
        OPEN_CART_VALUE: f"CASE WHEN {priced} THEN coalesce(open_cents, 0) / 100.0 END",
        **{c: f"top_{i}" for i, c in enumerate(TOP_CATEGORIES, 1)},
        **{c: f"top_{i}_score" for i, c in enumerate(TOP_CATEGORY_SCORES, 1)},
        DISTINCT_CATEGORIES: "coalesce(n_categories, 0)",
        MEAN_PRICE_VIEWED: f"CASE WHEN price_n_{VIEW} > 0 THEN round(price_cents_{VIEW} / price_n_{VIEW}) / 100.0 END",
        MEAN_PRICE_PURCHASED: f"CASE WHEN price_n_{PURCHASE} > 0 THEN round(price_cents_{PURCHASE} / price_n_{PURCHASE}) / 100.0 END",
        PEAK_HOUR_LOCAL: "peak_hour",
        LIFECYCLE_STAGE: f"""CASE
            WHEN {last_seen} < {e - int(CHURNED_AFTER.total_seconds() * 1000)} THEN '{LIFECYCLE_CHURNED}'
            WHEN {last_seen} < {e - int(DORMANT_AFTER.total_seconds() * 1000)} THEN '{LIFECYCLE_DORMANT}'
            WHEN {first_seen} >= {e - int(NEW_USER_AGE.total_seconds() * 1000)} THEN '{LIFECYCLE_NEW}'
            ELSE '{LIFECYCLE_ACTIVE}' END""",
    }
    funnel_ctes, funnel_cols = _funnel_sql(e, src, traits)
    cols |= funnel_cols
    declared_ctes, declared_cols = trait_ctes(traits, e, f"{src}trait_tiles")
    funnel_ctes |= declared_ctes
    cols |= declared_cols
    select = ",\n".join(f"{expr} AS {name}" for name, expr in cols.items())
    top = ", ".join(
        f"max(category_id) FILTER (WHERE rank = {i}) AS top_{i}, max(affinity) FILTER (WHERE rank = {i}) AS top_{i}_score"
        for i in range(1, len(TOP_CATEGORIES) + 1)
    )
    return f"""
        WITH ue AS (SELECT user_id, {", ".join(per_type)} FROM {src}user_events GROUP BY user_id),
        win AS (SELECT user_id, {", ".join(windows)} FROM ({spans_sql}) GROUP BY user_id),
        oc AS (SELECT user_id, count(*) AS open_items, sum(cart_cents) AS open_cents FROM {src}carts
               WHERE cart_ms >= {e - ttl} AND (closed_ms IS NULL OR closed_ms < cart_ms) GROUP BY user_id),
        tc AS (SELECT user_id, {top} FROM (
                 SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY affinity DESC, category_id) AS rank
                 FROM {src}interests) WHERE rank <= {len(TOP_CATEGORIES)} GROUP BY user_id),
        dc AS (SELECT user_id, count(*) AS n_categories FROM {src}affinities GROUP BY user_id),
        pk AS (SELECT user_id, arg_max(hour_of_day, n * 24 + (23 - hour_of_day)) AS peak_hour
               FROM {src}hours_of_day GROUP BY user_id),
        {", ".join(f"{name} AS ({sql})" for name, sql in funnel_ctes.items())}
        SELECT {select}
        FROM ue LEFT JOIN {src}users USING (user_id)
        LEFT JOIN win USING (user_id) LEFT JOIN {src}buffered USING (user_id)
        LEFT JOIN oc USING (user_id) LEFT JOIN tc USING (user_id)
        LEFT JOIN dc USING (user_id) LEFT JOIN pk USING (user_id)
        {" ".join(f"LEFT JOIN {name} USING (user_id)" for name in funnel_ctes)}
        {"ORDER BY ue.user_id" if ordered else ""}
    """
