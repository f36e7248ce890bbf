"""Declared traits compiled to SQL: the hourly tiles ``advance`` merges and the window values ``snapshot`` reads.

docs/features.md ("Declared traits").
"""

from __future__ import annotations

import pyarrow as pa

from profile_engine.contracts.traits import (
    COUNT,
    DECAYED_COUNT,
    DISTINCT_COUNT,
    LAST,
    LAST_OF,
    PRICE,
    QUANTITY,
    SUM,
    VALUE,
    Trait,
    longest_window_hours,
)
from profile_engine.hours import MS_HOUR
from profile_engine.profiles.state import cents_sql, decay, from_item_views

# Decayed values are rounded so that the float noise of summing tiles in another order (hourly path,
# rebuild) can neither change a value beyond the verification tolerance nor the top group of a window.
DECAYED_DECIMALS = 6

# How two tiles of one (user, trait, hour, group, value) merge: the partial aggregate of each column.
TILE_MERGE: dict[str, str] = {
    "n": "sum(n)",
    "total": "sum(total)",
    "decayed": "fsum(decayed)",
    "last_ms": "max(last_ms)",
    "last_id": "arg_max(last_id, (last_ms, last_id))",
    "last_num": "arg_max(last_num, (last_ms, last_id))",
    "last_str": "arg_max(last_str, (last_ms, last_id))",
}
TILE_KEYS: tuple[str, ...] = ("user_id", "trait", "hour_ms", "grp", "val")


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _summed(trait: Trait) -> str:
    """SQL of one event's contribution to a sum (cents for money)."""
    return {VALUE: cents_sql("price * quantity"), PRICE: cents_sql("price"), QUANTITY: "quantity"}[str(trait.of)]


def tile_rows_sql(traits: tuple[Trait, ...], events: str) -> str:
    """SQL of the tile rows of ``events`` (staged events with ``t`` = epoch ms), one SELECT per trait.

    Events whose group or aggregated column is null add nothing to that trait (a sum skips a
    missing price). ``decayed`` is decayed to the tile's end, so one more exact factor gives
    its value at any later end.
    """
    hour = f"(t - t % {MS_HOUR})"
    selects = []
    for trait in traits:
        where = [f"event_type IN ({', '.join(_quoted(e) for e in trait.events)})"]
        if trait.group_by is not None:
            where.append(f"{trait.group_by} IS NOT NULL")
        if trait.aggregation == SUM:
            where.append(f"{_summed(trait)} IS NOT NULL")
        elif trait.of is not None:
            where.append(f"{trait.of} IS NOT NULL")
        grp = f"CAST({trait.group_by} AS VARCHAR)" if trait.group_by else "CAST(NULL AS VARCHAR)"
        val = f"CAST({trait.of} AS VARCHAR)" if trait.aggregation == DISTINCT_COUNT else "CAST(NULL AS VARCHAR)"
        total = f"sum({_summed(trait)})" if trait.aggregation == SUM else "NULL"
        decayed = (
            f"fsum({decay(f'{hour} + {MS_HOUR} - t', float(trait.half_life_hours or 0))})"
            if trait.aggregation == DECAYED_COUNT
            else "NULL"
        )
        if trait.aggregation == LAST:
            # the latest event's (t, event_id, value) in one struct maximum: the same row as arg_max by (t,
            # event_id) (an event id is unique), at half the cost of two arg_max with a struct key
            text = _last_column(trait) == "last_str"
            latest = f"max({{'t': t, 'id': event_id, 'v': CAST({trait.of} AS {'VARCHAR' if text else 'DOUBLE'})}})"
            last = (
                f"{latest}.t AS last_ms, {latest}.id AS last_id, "
                f"{'NULL' if text else f'{latest}.v'} AS last_num, {f'{latest}.v' if text else 'NULL'} AS last_str"
            )
        else:
            last = "NULL AS last_ms, NULL AS last_id, NULL AS last_num, NULL AS last_str"
        selects.append(
            f"SELECT user_id, {_quoted(trait.key)} AS trait, {hour} AS hour_ms, {grp} AS grp, {val} AS val, "
            f"count(*) AS n, {total} AS total, {decayed} AS decayed, {last} "
            f"FROM {events} WHERE {' AND '.join(where)} GROUP BY user_id, hour_ms, grp, val"
        )
    return " UNION ALL BY NAME ".join(selects)


def _window_value(trait: Trait, e: int, condition: str) -> str:
    """SQL aggregate of ``trait`` as of ``e`` over the tiles where ``condition`` holds."""
    inside = f"FILTER (WHERE {condition})"
    if trait.aggregation == COUNT:
        return f"coalesce(sum(n) {inside}, 0)"
    if trait.aggregation == SUM:
        scale = " / 100.0" if trait.of in (VALUE, PRICE) else ""
        return f"coalesce(sum(total) {inside}, 0){scale}"
    if trait.aggregation == DISTINCT_COUNT:
        return f"count(DISTINCT val) {inside}"
    if trait.aggregation == DECAYED_COUNT:
        factor = decay(f"{e} - hour_ms - {MS_HOUR}", float(trait.half_life_hours or 0))
        return f"round(coalesce(sum(decayed * {factor}) {inside}, 0), {DECAYED_DECIMALS})"
    return f"arg_max({_last_column(trait)}, (last_ms, last_id)) {inside}"


def _last_column(trait: Trait) -> str:
    """The tile column holding a last value: ``last_num`` for numbers, ``last_str`` for text."""
    return "last_str" if pa.types.is_string(LAST_OF[str(trait.of)]) else "last_num"


def _distinct_counts_sql(trait: Trait, prefix: str, e: int, tiles: str) -> str:
    """SQL of an ungrouped distinct count's windows (``<prefix>_<window>``), per user: each value's latest hour
    in the longest window, then per window the values whose latest hour falls inside it.

    Equal to ``count(DISTINCT val) FILTER (...)`` per window (a value is in a window when one of its tiles
    is), in two hash groupings of this trait's tiles: 3-4x faster than the distinct aggregates in the shared
    pass over every trait's tiles (BENCHMARKS.md, "Snapshot profile").
    """
    longest = longest_window_hours((trait,))
    counts = ", ".join(
        f"count(*) FILTER (WHERE latest >= {e - hours * MS_HOUR}) AS {prefix}_{window}"
        for window, hours in trait.windows
    )
    return (
        f"SELECT user_id, {counts} FROM ("
        f"SELECT user_id, val, max(hour_ms) AS latest FROM {tiles} WHERE trait = {_quoted(trait.key)} "
        f"AND hour_ms >= {e - longest * MS_HOUR} AND val IS NOT NULL GROUP BY user_id, val) GROUP BY user_id"
    )


def trait_ctes(traits: tuple[Trait, ...], e: int, tiles: str) -> tuple[dict[str, str], dict[str, str]]:
    """The trait columns of the snapshot as of ``e``: (name -> SQL of a per-user CTE, column -> expression).

    Ungrouped traits share one pass over ``tiles`` (distinct counts get one CTE per trait,
    ``_distinct_counts_sql``; those read from ``item_views`` none: ``item_view_counts`` gives their
    aggregates, which the caller computes in its grouping of that table); a grouped trait gets one CTE per window
    holding the top group (highest value, ties to the smallest group) and its value.
    Users without tiles in a window get 0 (counts, sums, distinct and decayed counts) or
    null (last values, top groups).
    """
    ctes: dict[str, str] = {}
    cols: dict[str, str] = {}
    # per longest window (hours) of the ungrouped traits: their keys and their values
    plain: dict[int, tuple[list[str], list[str]]] = {}
    for i, trait in enumerate(traits):
        is_trait = f"trait = {_quoted(trait.key)}"
        if from_item_views(trait):  # counted in the repeat views' grouping of item_views (``item_view_counts``)
            cols |= {trait.column(window): f"coalesce(t{i}_{window}, 0)" for window, _ in trait.windows}
            continue
        if trait.group_by is None and trait.aggregation == DISTINCT_COUNT:
            ctes[f"t{i}_distinct"] = _distinct_counts_sql(trait, f"t{i}", e, tiles)
            cols |= {trait.column(window): f"coalesce(t{i}_{window}, 0)" for window, _ in trait.windows}
            continue
        if trait.group_by is None:
            keys, values = plain.setdefault(longest_window_hours((trait,)), ([], []))
            keys.append(_quoted(trait.key))
        for window, hours in trait.windows:
            start = f"hour_ms >= {e - hours * MS_HOUR}"
            name = f"t{i}_{window}"
            if trait.group_by is None:
                values.append(f"{_window_value(trait, e, f'{is_trait} AND {start}')} AS {name}")
                cols[trait.column(window)] = name if trait.aggregation == LAST else f"coalesce({name}, 0)"
                continue
            ctes[name] = f"""
                SELECT user_id, grp AS {name}_group, v AS {name}_value FROM (
                    SELECT user_id, grp, v, row_number() OVER (PARTITION BY user_id ORDER BY v DESC, grp) AS rank
                    FROM (SELECT user_id, grp, {_window_value(trait, e, "true")} AS v FROM {tiles}
                          WHERE {is_trait} AND {start} GROUP BY user_id, grp)
                ) WHERE rank = 1"""
            cols[trait.column(window)] = f"{name}_group"
            cols[trait.value_column(window)] = f"{name}_value"
    # The ungrouped traits share one pass over their tiles per longest window (a 7-day trait does not read 30 days of
    # tiles beside a 30-day one); only their tiles and hours: the filter reaches the Parquet scan, whose row groups
    # are sorted by trait and hour (``build.TILE_ORDER``). A user without any gets 0 or null all the same.
    for longest, (keys, values) in sorted(plain.items()):
        ctes[f"t_plain_{longest}"] = (
            f"SELECT user_id, {', '.join(values)} FROM {tiles} "
            f"WHERE trait IN ({', '.join(keys)}) AND hour_ms >= {e - longest * MS_HOUR} GROUP BY user_id"
        )
    return ctes, cols


def item_view_counts(traits: tuple[Trait, ...], e: int) -> list[str]:
    """The aggregates of the traits read from ``item_views`` (``state.from_item_views``) as of ``e``, named as
    ``trait_ctes`` names their columns, over rows per (user, item) with ``latest``, the item's latest view
    hour in the table (the same rows and filter as ``_distinct_counts_sql`` over the trait's own tiles)."""
    return [
        f"count(*) FILTER (WHERE item_id IS NOT NULL AND latest >= {e - hours * MS_HOUR}) AS t{i}_{window}"
        for i, trait in enumerate(traits)
        if from_item_views(trait)
        for window, hours in trait.windows
    ]
