"""``advance``: merge staged events into a ``ProfileState`` and move its end (``rebuild`` from an empty state).

The result depends only on the merged events and the end, never on batching. docs/features.md.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.config import Settings
from profile_engine.contracts.events import CART, FAV, LOCAL_HOUR, PURCHASE, REFUND, REMOVE_CART, STAGED_SCHEMA, VIEW
from profile_engine.contracts.profiles import CATEGORY_ID, HALF_LIVES, OPEN_WINDOWS, USER_ID
from profile_engine.contracts.traits import Trait, load_traits
from profile_engine.hours import MS_HOUR, format_hour
from profile_engine.lake import db
from profile_engine.profiles.state import (
    ANCHORS,
    BUFFERED_SCHEMA,
    CARTS,
    DECAYED_MS,
    FAVS,
    HOURLY,
    HOURS_OF_DAY,
    ITEM_VIEWS,
    LATENCY_LOOKBACK,
    META,
    OPEN_CART_TTL,
    ORDER_GAP,
    ORDERS,
    PENDING,
    SESSION_GAP,
    SESSIONS,
    STATE_SCHEMAS,
    TARGETS,
    TRAIT_TILES,
    USER_EVENT_FIELDS,
    USER_EVENTS,
    USER_FIELDS,
    USERS,
    ProfileState,
    affinity_decay_sql,
    anchor_lookup_sql,
    buffered_sql,
    by_hour_oldest,
    cents_sql,
    decay,
    decayed_as_of,
    empty_state,
    fetch,
    gap_groups,
    hour_ms,
    interval_groups,
    latency_totals,
    order_totals,
    register_sealed_anchors,
    session_totals,
    target_latencies,
    tiled,
)
from profile_engine.profiles.traits import TILE_KEYS, TILE_MERGE, tile_rows_sql

if TYPE_CHECKING:
    import duckdb


def _duck_type(arrow_type: pa.DataType) -> str:
    return "DOUBLE" if pa.types.is_floating(arrow_type) else "BIGINT"


def as_staged(events: pa.Table, business_tz: str) -> pa.Table:
    """The events as ``STAGED_SCHEMA`` (column order and types), or a clear error."""
    events = with_local_hour(events, business_tz)
    missing = [n for n in STAGED_SCHEMA.names if n not in events.column_names]
    if missing:
        raise ValueError(f"events lack staged columns {missing}")
    return events.select(STAGED_SCHEMA.names).cast(STAGED_SCHEMA)


def with_local_hour(events: pa.Table, business_tz: str) -> pa.Table:
    """Staged events with ``local_hour``; events staged before it existed get their hour in ``business_tz``.

    That is what the profiles of those events used (the business time zone was the only
    one), so an older lake keeps its peak hours.
    """
    if LOCAL_HOUR in events.column_names:
        return events
    ZoneInfo(business_tz)  # raises for an unknown zone
    hours = pc.hour(events.column("ts").cast(pa.timestamp("ms", tz=business_tz)))  # hour of the zone's local time
    return events.append_column(pa.field(LOCAL_HOUR, pa.int8()), hours.cast(pa.int8()))


def advance(state: ProfileState, events: pa.Table, end: datetime, settings: Settings) -> ProfileState:
    """Merge staged events into ``state`` and move its end to ``end``.

    ``events`` (``STAGED_SCHEMA``) may have any ``ts``: those at or after ``end`` are held
    back in the state and merged by a later call. ``end`` may be many hours after the
    state's end; the result equals advancing hour by hour, which is what lets the
    warm-up process a day at once.
    """
    e = hour_ms(end)
    previous = state.end
    e0 = hour_ms(previous) if previous is not None else e  # an empty state has nothing to decay
    if e < e0:
        raise ValueError(f"cannot move the state back from {format_hour(previous or end)} to {format_hour(end)}")
    horizon = e - settings.lateness_hours * MS_HOUR  # no future event is older than this
    session_gap = int(SESSION_GAP.total_seconds() * 1000)
    order_gap = int(ORDER_GAP.total_seconds() * 1000)
    con = db.cursor()
    try:
        for name, table in state.tables.items():
            con.register(f"s_{name}", table)
        incoming = [as_staged(state.tables[PENDING], settings.business_tz), as_staged(events, settings.business_tz)]
        con.register("s_pending", incoming[0])
        con.register("new_events", incoming[1])
        con.execute(
            f"CREATE TEMP TABLE due AS SELECT *, epoch_ms(ts) AS t FROM "
            f"(SELECT * FROM s_pending UNION ALL SELECT * FROM new_events) WHERE epoch_ms(ts) < {e}"
        )
        # The held-back events picked in Arrow (a comparison of the ts column) and only they sorted: a second
        # scan of every incoming event in DuckDB cost 0.15 CPU s of a rebuild of 2.5M events.
        held = pa.scalar(end, STAGED_SCHEMA.field("ts").type)
        con.register("held", pa.concat_tables([t.filter(pc.greater_equal(t.column("ts"), held)) for t in incoming]))
        pending = fetch(con, "SELECT * FROM held ORDER BY user_id, ts, event_id", STAGED_SCHEMA)

        # sessions: merge the buffered sessions with the new events (points), fold sessions no
        # future event can touch; the buffer keeps one row per open session, not per event
        con.execute(
            "CREATE TEMP TABLE sess AS "
            + interval_groups(
                # every due event a point: tied points share a group, so grouping them by time first is not needed
                "SELECT user_id, first_ms, last_ms, n FROM s_sessions UNION ALL SELECT user_id, t, t, 1 FROM due",
                session_gap,
            )
        )
        sessions = fetch(
            con,
            f"SELECT user_id, grp_first AS first_ms, grp_last AS last_ms, n FROM sess "
            f"WHERE grp_last + {session_gap} > {horizon} ORDER BY user_id, first_ms",
            STATE_SCHEMAS[SESSIONS],
        )
        # orders: lines of one (user, order key) grouped the same way; no order_id = one order per event
        order_lines = (
            "SELECT user_id, order_key, ts_ms, cents FROM s_orders UNION ALL "
            f"SELECT user_id, coalesce(order_id, 'event:' || event_id), t, {cents_sql('coalesce(price, 0) * quantity')} "
            f"FROM due WHERE event_type = '{PURCHASE}'"
        )
        con.execute("CREATE TEMP TABLE ord AS " + gap_groups(order_lines, "user_id, order_key", order_gap))
        orders = fetch(
            con,
            f"SELECT user_id, order_key, ts_ms, cents FROM ord WHERE grp_last + {order_gap} > {horizon} "
            "ORDER BY user_id, order_key, ts_ms, cents",
            STATE_SCHEMAS[ORDERS],
        )
        # latencies: targets become final once no earlier anchor can still arrive
        con.execute(
            "CREATE TEMP VIEW anc AS SELECT user_id, item_id, event_type, ts_ms FROM s_anchors UNION ALL "
            f"SELECT user_id, item_id, event_type, t FROM due WHERE event_type IN ('{VIEW}', '{CART}')"
        )
        con.execute(
            "CREATE TEMP TABLE tgt AS SELECT user_id, item_id, event_type, ts_ms FROM s_targets UNION ALL "
            f"SELECT user_id, item_id, event_type, t FROM due WHERE event_type IN ('{CART}', '{PURCHASE}')"
        )
        con.execute(f"CREATE TEMP TABLE tgt_final AS SELECT * FROM tgt WHERE ts_ms < {horizon}")
        lookback = int(LATENCY_LOOKBACK.total_seconds() * 1000)
        # Anchors sealed into tile files (docs/architecture.md, "Sealed state tiles") are read only for the
        # targets without an in-memory anchor (buffered or due: ``anc``) newer than every sealed one, often none;
        # the lookups see what the buffer of a state that never sealed holds.
        horizon0 = e0 - settings.lateness_hours * MS_HOUR
        sealed_anchors = register_sealed_anchors(con, state, horizon0 - lookback, "tgt", "anc")
        anchors0 = f"({anchor_lookup_sql('s_anchors', horizon0)})" if sealed_anchors else "s_anchors"
        con.execute(
            f"CREATE TEMP VIEW anc_lookup AS SELECT user_id, item_id, event_type, ts_ms FROM {anchors0} UNION ALL "
            f"SELECT user_id, item_id, event_type, t FROM due WHERE event_type IN ('{VIEW}', '{CART}')"
        )
        targets = fetch(
            con,
            f"SELECT * FROM tgt WHERE ts_ms >= {horizon} ORDER BY user_id, item_id, event_type, ts_ms",
            STATE_SCHEMAS[TARGETS],
        )
        # Keep every anchor a future target may see: the recent ones and the latest older one per item.
        # The buffer holds each anchor once, so its recent rows pass through in their order (sorting
        # millions of them again cost more than the rest of the buffer work); the new recent anchors
        # not in it yet and the latest older ones per item are sorted and appended. The parts are
        # disjoint: in ts_ms (recent or older) and, among the recent ones, by the anti join. In a state with
        # sealed anchors the older ones come from the in-memory rows only (those that crossed the horizon
        # since the checkpoint): the tiles keep each key's earlier latest, and the lookups take the maximum.
        old_anchors = state.tables[ANCHORS]
        kept = old_anchors.filter(pc.greater_equal(old_anchors.column("ts_ms"), pa.scalar(horizon, pa.int64())))
        # Only buffered anchors at or after the first due event can equal a new one (ts_ms is in the key): the
        # anti join hashes those instead of the whole buffer (0.29 -> 0.15 CPU s over 4.2M buffered anchors).
        first_due = con.sql("SELECT coalesce(min(t), 0) FROM due").fetchall()[0][0]
        added = fetch(
            con,
            f"""
            SELECT * FROM (
                SELECT * FROM (
                    SELECT DISTINCT user_id, item_id, event_type, t AS ts_ms FROM due
                    WHERE event_type IN ('{VIEW}', '{CART}') AND t >= {horizon}
                ) d ANTI JOIN (SELECT * FROM s_anchors WHERE ts_ms >= {first_due}) s
                USING (user_id, item_id, event_type, ts_ms)
                UNION ALL
                SELECT user_id, item_id, event_type, max(ts_ms) FROM anc WHERE ts_ms < {horizon}
                GROUP BY user_id, item_id, event_type HAVING max(ts_ms) >= {horizon - lookback}
            ) ORDER BY user_id, item_id, event_type, ts_ms
            """,
            STATE_SCHEMAS[ANCHORS],
        )
        # Chunked as read and filtered: DuckDB, the filters of sealing and the Parquet writer take chunks, and
        # copying the ~4M rows (two string columns) into one chunk cost 0.15-0.4 CPU s of a 1M-event hour's bucket.
        anchors = pa.concat_tables([kept.select(added.schema.names).cast(added.schema), added])
        con.register("kept_targets", targets)
        con.register("kept_anchors", anchors)
        kept_lookup = f"({anchor_lookup_sql('kept_anchors', horizon)})" if sealed_anchors else "kept_anchors"
        # The kept sessions and orders are whole groups, separated from the folded ones by a
        # gap: grouping the new buffers again would give these same groups.
        buffered = fetch(
            con,
            buffered_sql(
                f"(SELECT * FROM sess WHERE grp_last + {session_gap} > {horizon})",
                f"(SELECT * FROM ord WHERE grp_last + {order_gap} > {horizon})",
                "kept_targets",
                kept_lookup,
            ),
            BUFFERED_SCHEMA,
        )

        new_events, merged_events, only_new_events = _user_events_sql(e)
        user_events = merge_touched(
            con, state.tables[USER_EVENTS], USER_EVENTS, new_events, merged_events, new_only_sql=only_new_events
        )
        users = merge_touched(con, state.tables[USERS], USERS, *_users_sql(horizon, session_gap, order_gap))
        hourly = _merge_hourly(con, state.tables[HOURLY], e)
        hours_of_day = merge_touched(
            con,
            state.tables[HOURS_OF_DAY],
            HOURS_OF_DAY,
            f"SELECT user_id, {LOCAL_HOUR} AS hour_of_day, count(*) AS n FROM due "
            f"WHERE {LOCAL_HOUR} IS NOT NULL GROUP BY ALL",
            "SELECT user_id, hour_of_day, sum(n) AS n FROM merge_rows GROUP BY ALL ORDER BY user_id, hour_of_day",
            new_only_sql="SELECT user_id, hour_of_day, n FROM merge_new ORDER BY user_id, hour_of_day",
        )
        carts = merge_touched(con, state.tables[CARTS], CARTS, *_carts_sql(e, horizon))
        favs = merge_touched(con, state.tables[FAVS], FAVS, *_favs_sql(e, horizon))
        item_views = _merge_item_views(con, state.tables[ITEM_VIEWS], e)
        trait_tiles = _merge_trait_tiles(con, state.tables[TRAIT_TILES], e, load_traits(settings.traits))
    finally:
        con.close()

    return ProfileState(
        {
            META: pa.table({"end_ms": pa.array([e], pa.int64())}),
            USER_EVENTS: user_events,
            USERS: users,
            HOURLY: hourly,
            HOURS_OF_DAY: hours_of_day,
            SESSIONS: sessions,
            ORDERS: orders,
            CARTS: carts,
            FAVS: favs,
            ITEM_VIEWS: item_views,
            TRAIT_TILES: trait_tiles,
            ANCHORS: anchors,
            TARGETS: targets,
            PENDING: pending,
        },
        buffered=buffered,
        sealed=state.sealed,  # sealed tiles never change: late rows of their hours stay in memory
    )


def _merged(fields: list[tuple[str, pa.DataType, str]]) -> str:
    """Select list merging rows of one key: sums (0 when absent), minima and maxima."""
    merged = []
    for name, arrow_type, how in fields:
        total = "fsum" if pa.types.is_floating(arrow_type) else "sum"  # float: the same to the last bit in any order
        agg = f"coalesce({total}({name}), 0)" if how == "sum" else f"{how}({name})"
        merged.append(f"CAST({agg} AS {_duck_type(arrow_type)}) AS {name}")
    return ", ".join(merged)


def merge_touched(
    con: duckdb.DuckDBPyConnection,
    old: pa.Table,
    name: str,
    new_rows: str,
    merged_sql: str,
    kept: str | None = None,
    new_only_sql: str | None = None,
) -> pa.Table:
    """Per-user state table ``name`` with ``new_rows`` (SQL) merged in; only the rows of their users change.

    ``merged_sql`` groups the view ``merge_rows``: the old rows of the users of ``new_rows`` and the new
    rows (``UNION ALL BY NAME``). Every other row passes through untouched and in its order (an
    Arrow filter), so an hour costs its own users, not the whole table: the untouched rows come
    first, the merged ones (sorted by ``merged_sql``) after them, so the table is not sorted by user.
    ``kept``: the SQL condition of the rows kept as of this end (``merged_sql`` applies it to its own rows).
    ``new_only_sql``: the same rows as ``merged_sql`` when no old row is touched (a rebuild), read from the
    temp table ``merge_new`` without grouping it again (its rows have the table's key already).
    """
    con.execute(f"CREATE OR REPLACE TEMP TABLE merge_new AS {new_rows}")
    touched = con.sql("SELECT DISTINCT user_id FROM merge_new").to_arrow_table().column(0)
    schema = STATE_SCHEMAS[name]
    hit = pc.is_in(old.column(USER_ID), value_set=touched.combine_chunks()) if len(touched) else None
    untouched = old if hit is None else old.filter(pc.invert(hit))
    if kept is not None:  # a filter, not a regrouping: the rows stay as they are
        con.register("merge_untouched", untouched)
        untouched = con.sql(f"SELECT * FROM merge_untouched WHERE {kept}").to_arrow_table()
    untouched = untouched.select(schema.names).cast(schema)
    if hit is None:
        return untouched
    if new_only_sql is not None and not pc.any(hit).as_py():
        return pa.concat_tables([untouched, fetch(con, new_only_sql, schema)])
    con.register("merge_old", old.filter(hit))
    con.execute(
        "CREATE OR REPLACE TEMP VIEW merge_rows AS SELECT * FROM merge_old UNION ALL BY NAME SELECT * FROM merge_new"
    )
    return pa.concat_tables([untouched, fetch(con, merged_sql, schema)])


def _user_events_sql(e: int) -> tuple[str, str, str]:
    """``merge_touched`` SQL of ``user_events``: the due events per user and type with their decayed sums
    as of ``e``, the merge of a user's rows, whose old sums are decayed from their ``DECAYED_MS`` to ``e``,
    and the merged rows when no old row is touched: the new rows (decayed as of ``e`` already, a factor
    of exactly 1) with a sum over no priced event 0, as the merge gives it."""
    half_life = {f"decayed_{h}": hours for h, hours in HALF_LIVES}
    decayed = ", ".join(f"fsum({decay(f'{e} - t', hours)}) AS decayed_{h}" for h, hours in HALF_LIVES)
    new_rows = f"""
        SELECT user_id, event_type, count(*) AS n, min(t) AS first_ms, max(t) AS last_ms, {decayed},
               count(price) AS price_n, sum({cents_sql("price")}) AS price_cents, {e} AS {DECAYED_MS}
        FROM due GROUP BY user_id, event_type
    """
    as_of_e = ", ".join(
        f"{decayed_as_of(e, n, half_life[n])} AS {n}" if n in half_life else n for n, _, _ in USER_EVENT_FIELDS
    )
    merged = f"""
        SELECT user_id, event_type, {_merged(USER_EVENT_FIELDS)}, CAST({e} AS BIGINT) AS {DECAYED_MS}
        FROM (SELECT user_id, event_type, {as_of_e} FROM merge_rows)
        GROUP BY user_id, event_type ORDER BY user_id, event_type
    """
    sums = {name for name, _, how in USER_EVENT_FIELDS if how == "sum"}
    as_merged = ", ".join(f"coalesce({n}, 0) AS {n}" if n in sums else n for n, _, _ in USER_EVENT_FIELDS)
    new_only = f"SELECT user_id, event_type, {as_merged}, {DECAYED_MS} FROM merge_new ORDER BY user_id, event_type"
    return new_rows, merged, new_only


def _users_sql(horizon: int, session_gap: int, order_gap: int) -> tuple[str, str]:
    """``merge_touched`` SQL of ``users``: the totals of the sessions, orders and latencies that became
    final and of the due refunds, and their merge with the users' totals."""
    final_sessions = f"(SELECT * FROM sess WHERE grp_last + {session_gap} <= {horizon})"
    final_orders = f"(SELECT * FROM ord WHERE grp_last + {order_gap} <= {horizon})"
    new_rows = f"""
        {session_totals(final_sessions)}
        UNION ALL BY NAME {order_totals(final_orders)}
        UNION ALL BY NAME {latency_totals(f"({target_latencies('tgt_final', 'anc_lookup')})")}
        UNION ALL BY NAME SELECT user_id, sum({cents_sql("coalesce(price, 0) * quantity")}) AS refund_cents
            FROM due WHERE event_type = '{REFUND}' GROUP BY user_id
    """
    return new_rows, f"SELECT user_id, {_merged(USER_FIELDS)} FROM merge_rows GROUP BY user_id ORDER BY user_id"


def _merge_hourly(con: duckdb.DuckDBPyConnection, old: pa.Table, e: int) -> pa.Table:
    """The hourly buckets with the due events added and buckets older than 30 days dropped.

    ``decay_sum`` is the bucket's events decayed to the bucket's end, so the affinity as of
    any later end is ``decay_sum`` times one more exact factor.
    """
    bucket = f"(t - t % {MS_HOUR})"
    return _merge_by_hour(
        con,
        old,
        HOURLY,
        f"""SELECT user_id, {bucket} AS hour_ms, event_type, category_id, count(*) AS n,
                   fsum({affinity_decay_sql(f"{bucket} + {MS_HOUR} - t")}) AS decay_sum
            FROM due GROUP BY ALL""",
        (USER_ID, "hour_ms", "event_type", CATEGORY_ID),
        {"n": "sum(n)", "decay_sum": "fsum(decay_sum)"},
        by_hour_oldest(HOURLY, e, ()) or 0,
    )


def _merge_item_views(con: duckdb.DuckDBPyConnection, old: pa.Table, e: int) -> pa.Table:
    """Views per user, item and hour with the due views added, kept for the longest repeat-view window."""
    return _merge_by_hour(
        con,
        old,
        ITEM_VIEWS,
        f"SELECT user_id, item_id, t - t % {MS_HOUR} AS hour_ms, count(*) AS n FROM due "
        f"WHERE event_type = '{VIEW}' GROUP BY ALL",
        (USER_ID, "item_id", "hour_ms"),
        {"n": "sum(n)"},
        by_hour_oldest(ITEM_VIEWS, e, ()) or 0,
    )


def _merge_trait_tiles(con: duckdb.DuckDBPyConnection, old: pa.Table, e: int, traits: tuple[Trait, ...]) -> pa.Table:
    """The hourly tiles of the declared traits with the due events added, kept for the longest window.

    Tiles of a trait no longer declared (removed, or its definition changed: another key), or read
    from ``item_views`` (``state.from_item_views``), are dropped; late due events re-touch the tiles of
    their hours.
    """
    schema = STATE_SCHEMAS[TRAIT_TILES]
    traits = tiled(traits)
    if not traits:
        return schema.empty_table()
    keys = pa.array([t.key for t in traits], pa.string())
    declared = old.filter(pc.is_in(old.column("trait"), value_set=keys))
    con.register("s_declared_tiles", declared)
    return _merge_by_hour(
        con,
        declared,
        TRAIT_TILES,
        tile_rows_sql(traits, "due"),
        TILE_KEYS,
        TILE_MERGE,
        by_hour_oldest(TRAIT_TILES, e, traits) or 0,
        source="s_declared_tiles",
    )


def _merge_by_hour(
    con: duckdb.DuckDBPyConnection,
    old: pa.Table,
    name: str,
    new_rows: str,
    keys: tuple[str, ...],
    aggregates: dict[str, str],
    retention: int,
    source: str | None = None,
) -> pa.Table:
    """State table ``name`` (one row per ``keys``, sorted by ``hour_ms`` first) with ``new_rows`` merged in.

    ``new_rows``: SQL of at most one row per key. ``aggregates``: column -> SQL aggregate merging
    the rows of one key. ``source``: the registered view of ``old`` (default ``s_<name>``).
    Rows of hours before ``retention`` are dropped. Only the hours the due events fall in
    can change: older rows pass through untouched (in Arrow, no regrouping), the rest is
    merged in SQL, so the untouched head stays in order. When ``old`` has no row in those
    hours (a rebuild), nothing is to merge and the new rows are only sorted: grouping them
    again (one row per key already) cost a third of the trait tiles of a rebuild.
    """
    first_due = con.sql(f"SELECT min(t - t % {MS_HOUR}) FROM due").fetchall()[0][0]
    hours = old.column("hour_ms")
    if first_due is None:  # nothing due: every row within the retention passes through
        schema = STATE_SCHEMAS[name]
        return old.filter(pc.greater_equal(hours, retention)).select(schema.names).cast(schema).combine_chunks()
    cut = int(first_due)
    untouched = old.filter(pc.and_(pc.greater_equal(hours, retention), pc.less(hours, cut)))
    order = ", ".join(["hour_ms", *(k for k in keys if k != "hour_ms")])
    if pc.any(pc.greater_equal(hours, max(cut, retention))).as_py():
        columns = ", ".join((*keys, *aggregates))
        rows = f"""
            SELECT {", ".join(keys)}, {", ".join(f"{sql} AS {v}" for v, sql in aggregates.items())} FROM (
                SELECT {columns} FROM {source or f"s_{name}"} WHERE hour_ms >= {cut}
                UNION ALL BY NAME
                {new_rows}
            ) WHERE hour_ms >= {retention}
            GROUP BY ALL"""
    else:
        rows = f"SELECT {', '.join((*keys, *aggregates))} FROM ({new_rows}) WHERE hour_ms >= {retention}"
    merged = fetch(con, f"{rows} ORDER BY {order} NULLS FIRST", STATE_SCHEMAS[name])
    return pa.concat_tables([untouched.select(merged.schema.names).cast(merged.schema), merged])  # no copy: as anchors


def _carts_sql(e: int, horizon: int) -> tuple[str, str, str]:
    """``merge_touched`` SQL of ``carts``: per user and item, the latest cart line and the latest close
    (remove or purchase), and the condition keeping a row.

    A row is dropped once no future event can make it matter: closed before the lateness
    horizon, or untouched for longer than the open-cart time to live.
    """
    ttl = int(OPEN_CART_TTL.total_seconds() * 1000)
    kept = _open_items_kept("cart_ms", "closed_ms", e - ttl, horizon)
    new_rows = f"""
        SELECT user_id, item_id,
               CASE WHEN event_type = '{CART}' THEN t END AS cart_ms,
               CASE WHEN event_type = '{CART}' THEN {cents_sql("coalesce(price, 0) * quantity")} END AS cart_cents,
               CASE WHEN event_type <> '{CART}' THEN t END AS closed_ms
        FROM due WHERE event_type IN ('{CART}', '{REMOVE_CART}', '{PURCHASE}')
    """
    merged = f"""
        SELECT * FROM (
            SELECT user_id, item_id, max(cart_ms) AS cart_ms,
                   arg_max(cart_cents, [cart_ms, cart_cents]) FILTER (WHERE cart_ms IS NOT NULL) AS cart_cents,
                   max(closed_ms) AS closed_ms
            FROM merge_rows GROUP BY user_id, item_id
        )
        WHERE {kept} ORDER BY user_id, item_id
    """
    return new_rows, merged, kept


def _open_items_kept(opened: str, closed: str, oldest: int, horizon: int) -> str:
    """SQL condition keeping a per-item row of last open/last close times while a future event can make it matter.

    Dropped once closed (the close at or after the open) before the lateness horizon (any
    later event is newer than the close), or untouched since before ``oldest``.
    """
    return (
        f"NOT ({closed} IS NOT NULL AND {closed} >= coalesce({opened}, {closed}) AND {closed} < {horizon}) "
        f"AND greatest({opened}, {closed}) >= {oldest}"
    )


def _favs_sql(e: int, horizon: int) -> tuple[str, str, str]:
    """``merge_touched`` SQL of ``favs``: per user and item, the latest favourite and the latest purchase,
    and the condition keeping a row while they can matter.

    A favourite is open while no purchase of its item is at or after it; only favourites
    within the longest ``OPEN_WINDOWS`` count, so rows untouched for longer are dropped
    (a late favourite that old is outside every window too).
    """
    oldest = e - max(h for _, h in OPEN_WINDOWS) * MS_HOUR
    kept = _open_items_kept("fav_ms", "bought_ms", oldest, horizon)
    new_rows = f"""
        SELECT user_id, item_id, CASE WHEN event_type = '{FAV}' THEN t END AS fav_ms,
               CASE WHEN event_type = '{PURCHASE}' THEN t END AS bought_ms
        FROM due WHERE event_type IN ('{FAV}', '{PURCHASE}')
    """
    merged = f"""
        SELECT * FROM (
            SELECT user_id, item_id, max(fav_ms) AS fav_ms, max(bought_ms) AS bought_ms
            FROM merge_rows GROUP BY user_id, item_id
        )
        WHERE {kept} ORDER BY user_id, item_id
    """
    return new_rows, merged, kept


def rebuild(events: pa.Table, end: datetime, settings: Settings) -> ProfileState:
    """The state as of ``end`` from all staged events at once (replay, verification, retention restarts).

    Uses exactly the merge and pruning rules of the incremental path, in one pass over
    all events: the result equals any chain of ``advance`` calls over the same events.
    """
    return advance(empty_state(), events, end, settings)
