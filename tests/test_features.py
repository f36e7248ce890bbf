"""Tests of profile_engine.profiles (state, merge, snapshot, population, build): every feature family on
hand-made events, the incremental == batch == rebuild property, and the lake stages on a temporary lake."""

from __future__ import annotations

import math
import random
import re
import tempfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profile_engine.config import Settings
from profile_engine.contracts.events import EVENT_TYPES, REFUND, STAGED_SCHEMA
from profile_engine.contracts.profiles import (
    AFFINITY,
    CATEGORICAL_FEATURES,
    CATEGORY_ID,
    CHANGES_SCHEMA,
    FIRST_SEEN_AT,
    FREQUENCY_ORDERS,
    HOURS_SINCE_LAST_EVENT,
    LAST_SEEN_AT,
    LIFECYCLE_STAGE,
    MONETARY_TOTAL,
    NUMERIC_FEATURES,
    POPULATION_COLUMNS,
    PROFILE_COLUMNS,
    PROFILE_SCHEMA,
    SESSION_COUNT,
    SNAPSHOT_SCHEMA,
    TOP_CATEGORIES,
    TOP_CATEGORY_SCORES,
    USER_ID,
    WINDOWS,
    count_column,
    first_at_column,
    last_at_column,
    profile_schema,
    snapshot_schema,
)
from profile_engine.contracts.traits import load_traits
from profile_engine.hours import HOUR, floor_hour, format_hour
from profile_engine.lake.db import cursor as connect
from profile_engine.lake.storage import (
    INTERESTS,
    MANIFEST,
    PROFILE_CHANGES,
    PROFILES,
    STAGING,
    STATE,
    Lake,
    manifest_extra,
    read_json,
    write_json,
)
from profile_engine.ops import report
from profile_engine.profiles import merge as merge_module
from profile_engine.profiles import snapshot as snapshot_module
from profile_engine.profiles.build import (
    build_profiles,
    build_profiles_range,
    publish_profiles,
    read_state,
    seal_state,
    snapshot_committed,
    upgrade_state,
)
from profile_engine.profiles.merge import advance, rebuild, with_local_hour
from profile_engine.profiles.population import (
    add_population_features,
    change_counts,
    population_snapshot,
    profile_changes,
)
from profile_engine.profiles.snapshot import AFFINITY_SUMS_END, AffinitySums, PreviousHour, snapshot
from profile_engine.profiles.state import (
    BY_HOUR_TABLES,
    CARTS,
    DECAYED_MS,
    FAVS,
    HOURLY,
    HOURS_OF_DAY,
    PENDING,
    SESSION_GAP,
    SESSIONS,
    STATE_TABLES,
    USER_EVENTS,
    USERS,
    MissingStateError,
    ProfileState,
    empty_state,
    gap_groups,
    hour_ms,
    interval_groups,
)
from profile_engine.profiles.verify import compare_tables

T0 = datetime(2026, 11, 2, tzinfo=UTC)  # November: Europe/Berlin is UTC+1
SETTINGS = Settings(lateness_hours=6)
DEFAULTS: dict[str, Any] = {
    "user_id": "u1",
    "event_type": "view",
    "item_id": "i1",
    "category_id": "c1",
    "price": 10.0,
    "quantity": 1,
    "order_id": None,
    "session_id": None,
    "bucket": 0,
}


def events(*rows: dict[str, Any]) -> pa.Table:
    """Staged events from partial rows (``ts`` required), with unique event ids."""
    full = [{**DEFAULTS, "event_id": f"e{i}", **row} for i, row in enumerate(rows)]
    without_hour = pa.schema([f for f in STAGED_SCHEMA if f.name != "local_hour"])
    return with_local_hour(pa.Table.from_pylist(full, schema=without_hour), SETTINGS.business_tz)


def at(days: float = 0, hours: float = 0, minutes: float = 0, ms: int = 0) -> datetime:
    return T0 + timedelta(days=days, hours=hours, minutes=minutes, milliseconds=ms)


def profiles_at(table: pa.Table, end: datetime, cfg: Settings = SETTINGS) -> tuple[pa.Table, pa.Table]:
    profiles, interests, *_ = snapshot(rebuild(table, end, cfg), end, cfg)
    return profiles, interests


def row(profiles: pa.Table, user: str = "u1") -> dict[str, Any]:
    rows = profiles.filter(pc.equal(profiles.column(USER_ID), user)).to_pylist()
    assert len(rows) == 1, f"{user} not exactly once in {profiles.column(USER_ID).to_pylist()}"
    return rows[0]


def hourly_chain(
    table: pa.Table, staged_hours: list[datetime], first: datetime, end: datetime, cfg: Settings = SETTINGS
) -> ProfileState:
    """Advance hour by hour from ``first``; event i is staged in ``staged_hours[i]``."""
    staged = pa.array(staged_hours, pa.timestamp("ms", tz="UTC"))
    state = empty_state()
    hour = first
    while hour < end:
        state = advance(state, table.filter(pc.equal(staged, pa.scalar(hour, staged.type))), hour + HOUR, cfg)
        hour += HOUR
    return state


def assert_same(a: pa.Table, b: pa.Table) -> None:
    """Equal tables, floats to tolerance."""
    assert a.schema == b.schema
    assert a.column(USER_ID).to_pylist() == b.column(USER_ID).to_pylist()
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        if pa.types.is_floating(a.schema.field(name).type):
            assert [v is None for v in x] == [v is None for v in y], name
            assert [v for v in x if v is not None] == pytest.approx(
                [v for v in y if v is not None], rel=1e-9, abs=1e-9
            ), name
        else:
            assert x == y, name


# ---- contract ------------------------------------------------------------------------
def test_contract_columns_are_fixed() -> None:
    per_type = [
        c
        for t in EVENT_TYPES
        for c in (
            f"count_{t}_lifetime",
            f"count_{t}_24h",
            f"count_{t}_7d",
            f"count_{t}_30d",
            f"decayed_{t}_1d",
            f"decayed_{t}_7d",
            f"first_{t}_at",
            f"last_{t}_at",
        )
    ]

    assert PROFILE_COLUMNS[:2] == ("user_id", "snapshot_hour")
    assert PROFILE_COLUMNS[2 : 2 + len(per_type)] == tuple(per_type)
    assert PROFILE_COLUMNS[-1] == "lifecycle_stage"
    assert CATEGORICAL_FEATURES == ("top_category_1", "rfm_segment", "lifecycle_stage")
    assert set(NUMERIC_FEATURES).isdisjoint(CATEGORICAL_FEATURES)
    assert not any(c.endswith("_at") for c in NUMERIC_FEATURES)
    assert PROFILE_SCHEMA.field("rfm_r").type == pa.int8()
    assert SNAPSHOT_SCHEMA.names == [c for c in PROFILE_COLUMNS if c not in POPULATION_COLUMNS]


# ---- feature families ------------------------------------------------------------------
def test_count_windows_are_exact_at_their_boundaries() -> None:
    end = at(days=40)
    table = events(
        {"ts": end - timedelta(milliseconds=1)},
        {"ts": end - timedelta(hours=24)},
        {"ts": end - timedelta(hours=24, milliseconds=1)},
        {"ts": end - timedelta(days=7)},
        {"ts": end - timedelta(days=30)},
        {"ts": end - timedelta(days=30, milliseconds=1)},
    )

    state = rebuild(table, end, SETTINGS)
    first = row(snapshot(state, end, SETTINGS)[0])
    later = row(snapshot(advance(state, events(), end + HOUR, SETTINGS), end + HOUR, SETTINGS)[0])

    assert [first[f"count_view_{w}"] for w in ("24h", "7d", "30d", "lifetime")] == [2, 4, 5, 6]
    assert [later[f"count_view_{w}"] for w in ("24h", "7d", "30d", "lifetime")] == [1, 3, 4, 6]


def test_decayed_counters_halve_every_half_life_and_merge_exactly() -> None:
    end = at(days=2)
    state = rebuild(events({"ts": end - timedelta(hours=24)}), end, SETTINGS)

    first = row(snapshot(state, end, SETTINGS)[0])
    state = advance(state, events({"ts": end + timedelta(hours=12)}), end + timedelta(hours=24), SETTINGS)
    later = row(snapshot(state, end + timedelta(hours=24), SETTINGS)[0])

    assert first["decayed_view_1d"] == pytest.approx(0.5, rel=1e-12)
    assert first["decayed_view_7d"] == pytest.approx(2 ** (-1 / 7), rel=1e-12)
    assert later["decayed_view_1d"] == pytest.approx(0.25 + 2**-0.5, rel=1e-12)
    assert first["decayed_cart_1d"] == 0.0


def test_advancing_an_hour_leaves_the_state_rows_of_users_without_events_untouched() -> None:
    """An hour costs its own users: u1 (no event this hour, its sessions and orders final) keeps its
    ``user_events``, ``users``, ``hours_of_day``, ``carts`` and ``favs`` rows as they were, decayed sums
    included; the snapshot still decays them to the new end."""
    u1 = events(
        {"ts": at(hours=1)},
        {"ts": at(hours=1, minutes=5), "event_type": "purchase", "order_id": "o1"},
        {"ts": at(hours=1, minutes=10), "event_type": "cart", "item_id": "i2"},  # open: kept 30 days
        {"ts": at(hours=1, minutes=15), "event_type": "fav", "item_id": "i3"},  # kept 72 hours
    )
    before = rebuild(u1, at(hours=12), SETTINGS)
    u2 = events(*({"user_id": "u2", "ts": at(hours=12, minutes=1), "event_type": t} for t in ("cart", "fav")))
    after = advance(before, u2, at(hours=13), SETTINGS)

    for name in (USER_EVENTS, USERS, HOURS_OF_DAY, CARTS, FAVS):
        old, new = (s.tables[name].filter(pc.equal(s.tables[name].column(USER_ID), "u1")) for s in (before, after))
        assert old.num_rows > 0 and new.equals(old), name
    assert row(snapshot(after, at(hours=13), SETTINGS)[0])["decayed_view_1d"] == pytest.approx(2 ** (-12 / 24))


def test_first_last_and_hours_since() -> None:
    table = events(
        {"ts": at(hours=1)},
        {"ts": at(hours=3, minutes=30)},
        {"ts": at(hours=2), "event_type": "cart"},
    )

    p = row(profiles_at(table, at(hours=4))[0])

    assert p["first_view_at"] == at(hours=1) and p["last_view_at"] == at(hours=3, minutes=30)
    assert p["first_seen_at"] == at(hours=1) and p["last_seen_at"] == at(hours=3, minutes=30)
    assert p["hours_since_last_event"] == 0.5 and p["hours_since_last_cart"] == 2.0
    assert p["hours_since_last_purchase"] is None and p["recency_hours"] is None
    assert p["first_purchase_at"] is None and p["frequency_orders"] == 0 and p["avg_order_value"] is None
    assert p["snapshot_hour"] == at(hours=3)
    assert p["cart_view_rate"] == 0.5 and p["purchase_view_rate"] == 0.0


def test_orders_values_in_cents_and_mean_interval() -> None:
    buy = {"event_type": "purchase"}
    table = events(
        {**buy, "ts": at(hours=1), "order_id": "o1", "price": 10.0, "quantity": 2},
        {**buy, "ts": at(hours=1, minutes=0.5), "order_id": "o1", "price": 2.5},
        {**buy, "ts": at(hours=20), "order_id": "o1", "price": 1.0},  # same id after a long gap: a new order
        {**buy, "ts": at(hours=10), "price": 3.333, "quantity": 3},  # no order_id: one order
    )

    p = row(profiles_at(table, at(hours=24))[0])

    assert p["frequency_orders"] == 3
    assert p["monetary_total"] == 33.5 and p["max_order_value"] == 22.5
    assert p["avg_order_value"] == 11.17
    assert p["mean_hours_between_orders"] == pytest.approx(9.5)
    assert p["mean_price_purchased"] == 4.21  # (1000 + 250 + 100 + 333) cents / 4 lines
    assert p["recency_hours"] == p["hours_since_last_purchase"] == 4.0


def test_rfm_scores_break_ties_by_a_hash_of_the_user_whatever_the_row_order() -> None:
    end = at(days=1)
    buy = {"event_type": "purchase", "price": 10.0}
    table = events(
        {**buy, "user_id": "a", "ts": end - timedelta(hours=1)},
        {**buy, "user_id": "b", "ts": end - timedelta(hours=1)},
        {**buy, "user_id": "c", "ts": end - timedelta(hours=8), "price": 20.0},
        {**buy, "user_id": "c", "ts": end - timedelta(hours=5), "price": 30.0},
        *[{**buy, "user_id": "d", "ts": end - timedelta(hours=h), "price": 5.0} for h in (20, 15, 10)],
        {"user_id": "e", "ts": end - timedelta(hours=1)},
    )
    profiles, _ = profiles_at(table, end)
    shuffled = profiles.take(pa.array([3, 0, 4, 2, 1]))

    scored = add_population_features(profiles)
    again = add_population_features(shuffled)

    got = {r["user_id"]: (r["rfm_r"], r["rfm_f"], r["rfm_m"], r["rfm_segment"]) for r in scored.to_pylist()}
    assert got == {
        # a and b tie on every value: a salted hash of the user orders them, per score
        "a": (5, 1, 2, "new_customer"),
        "b": (4, 2, 1, "potential_loyalist"),
        "c": (2, 4, 5, "at_risk"),
        "d": (1, 5, 4, "at_risk"),
        "e": (None, None, None, "no_orders"),
    }
    assert scored.equals(again)
    assert scored.schema == profile_schema(load_traits())


def test_view_to_cart_to_purchase_latencies_with_a_late_view() -> None:
    table = events(
        {"ts": at(hours=0)},
        {"ts": at(hours=1)},
        {"ts": at(hours=2, minutes=30), "event_type": "cart"},
        {"ts": at(hours=3), "event_type": "cart", "item_id": "i2"},  # never viewed
        {"ts": at(hours=4), "event_type": "purchase"},
        {"ts": at(hours=2, minutes=15)},  # a late view, staged at 04:00
    )
    staged = [floor_hour(t) for t in table.column("ts").to_pylist()[:-1]] + [at(hours=4)]

    before = row(snapshot(hourly_chain(table, staged, T0, at(hours=4)), at(hours=4), SETTINGS)[0])
    after_state = hourly_chain(table, staged, T0, at(hours=5))
    after = row(snapshot(after_state, at(hours=5), SETTINGS)[0])

    assert before["mean_view_to_cart_hours"] == pytest.approx(1.5)
    assert after["mean_view_to_cart_hours"] == pytest.approx(0.25)
    assert after["mean_cart_to_purchase_hours"] == pytest.approx(1.5)
    assert_same(snapshot(after_state, at(hours=5), SETTINGS)[0], profiles_at(table, at(hours=5))[0])


def test_sessions_span_hour_boundaries_and_merge_on_a_late_event() -> None:
    table = events(
        {"ts": at(minutes=50)},
        {"ts": at(hours=1, minutes=10)},
        {"ts": at(hours=1, minutes=40)},  # exactly 30 minutes of inactivity: a new session
        {"ts": at(hours=1, minutes=45)},
        {"ts": at(hours=1, minutes=25)},  # late, staged at 02:00: bridges the two sessions
    )
    staged = [T0, at(hours=1), at(hours=1), at(hours=1), at(hours=2)]

    two = row(snapshot(hourly_chain(table, staged, T0, at(hours=2)), at(hours=2), SETTINGS)[0])
    one = row(snapshot(hourly_chain(table, staged, T0, at(hours=3)), at(hours=3), SETTINGS)[0])

    assert (two["session_count"], two["mean_session_minutes"], two["events_per_session"]) == (2, 12.5, 2.0)
    assert (one["session_count"], one["mean_session_minutes"], one["events_per_session"]) == (1, 55.0, 5.0)


_GAP_ROWS = [  # (user, minute): ties at both ends of the gap between 10 and 40, and a lone row
    ("a", 0),
    ("a", 10),
    ("a", 10),
    ("a", 10),
    ("a", 40),
    ("a", 40),
    ("a", 45),
    ("b", 10),
]
_GAP_EXPECTED = {  # minute -> (group's first minute, group's last minute), gap 30 minutes
    ("a", 0): (0, 10),
    ("a", 10): (0, 10),
    ("a", 40): (40, 45),
    ("a", 45): (40, 45),
    ("b", 10): (10, 10),
}


@settings(max_examples=30, deadline=None)
@given(order=st.permutations(range(len(_GAP_ROWS))))
def test_gap_groups_keep_tied_timestamps_together_whatever_the_row_order(order: list[int]) -> None:
    rows = [_GAP_ROWS[i] for i in order]
    table = pa.table({"user_id": [u for u, _ in rows], "ts_ms": [m * 60_000 for _, m in rows]})
    con = connect()
    try:
        con.register("rows", table)
        result = con.sql(gap_groups("SELECT * FROM rows", "user_id", 30 * 60_000)).to_arrow_table()
    finally:
        con.close()

    got = {
        (u, t // 60_000): (f // 60_000, last // 60_000)
        for u, t, f, last in zip(
            *(result.column(c).to_pylist() for c in ("user_id", "ts_ms", "grp_first", "grp_last")), strict=True
        )
    }
    assert result.num_rows == len(_GAP_ROWS)
    assert got == _GAP_EXPECTED


def _groups_of(con: Any, sql: str) -> set[tuple[str, int, int, int]]:
    return {(str(u), int(f), int(last), int(n)) for u, f, last, n in con.sql(sql).fetchall()}


@settings(max_examples=40, deadline=None)
@given(
    points=st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 300)), max_size=40),
    split=st.integers(0, 40),
)
def test_interval_groups_of_grouped_points_and_new_points_equal_the_gap_groups_of_all_points(
    points: list[tuple[str, int]], split: int
) -> None:
    # Arrange: minutes; the first `split` points are grouped first (the buffer), the rest arrive later
    gap = 30 * 60_000
    table = pa.table(
        {
            "user_id": pa.array([u for u, _ in points], pa.string()),
            "ts_ms": pa.array([m * 60_000 for _, m in points], pa.int64()),
        }
    )
    con = connect()
    try:
        con.register("pts", table)
        con.execute("CREATE TEMP TABLE numbered AS SELECT *, row_number() OVER () AS i FROM pts")
        as_points = "SELECT user_id, ts_ms AS first_ms, ts_ms AS last_ms, 1 AS n FROM numbered"
        expected = _groups_of(
            con,
            "SELECT user_id, grp_first, any_value(grp_last), count(*) "
            f"FROM ({gap_groups('SELECT user_id, ts_ms FROM numbered', 'user_id', gap)}) GROUP BY user_id, grp_first",
        )

        # Act
        all_at_once = _groups_of(con, interval_groups(as_points, gap))
        buffer = interval_groups(f"{as_points} WHERE i <= {split}", gap)
        in_two_steps = _groups_of(
            con,
            interval_groups(
                f"SELECT user_id, grp_first AS first_ms, grp_last AS last_ms, n FROM ({buffer}) "
                f"UNION ALL {as_points} WHERE i > {split}",
                gap,
            ),
        )
    finally:
        con.close()

    # Assert
    assert all_at_once == expected
    assert in_two_steps == expected


def test_a_state_written_with_one_session_row_per_event_reads_as_sessions(tmp_path: Path) -> None:
    # Arrange: a state as the current code writes it, and the same state in the older layout
    # (the session buffer as the timestamps of the events of the open sessions)
    rows = [
        {"user_id": u, "ts": at(hours=h, minutes=m)}
        for u, h, m in (("a", 0, 5), ("a", 0, 20), ("a", 2, 0), ("b", 1, 10), ("b", 1, 10), ("b", 5, 59))
    ]
    table = events(*rows)
    end = at(hours=6)
    state = advance(empty_state(), table, end, SETTINGS)
    horizon = hour_ms(end) - SETTINGS.lateness_hours * 3_600_000
    gap = int(SESSION_GAP.total_seconds() * 1000)
    con = connect()
    try:
        con.register("ev", table)
        old_layout = con.sql(
            f"SELECT user_id, ts_ms FROM ({gap_groups('SELECT user_id, epoch_ms(ts) AS ts_ms FROM ev', 'user_id', gap)}) "
            f"WHERE grp_last + {gap} > {horizon} ORDER BY user_id, ts_ms"
        ).to_arrow_table()
    finally:
        con.close()
    lake = Lake(tmp_path)
    lake.write_partition(STATE, end - HOUR, {**state.tables, SESSIONS: old_layout}, bucket=0)

    # Act
    read = read_state(lake, end - HOUR, 0)

    # Assert
    assert old_layout.num_rows == 6  # every event is within the 6 h lateness window
    assert read.tables[SESSIONS].equals(state.tables[SESSIONS])
    assert state.tables[SESSIONS].num_rows == 4  # a: 00:05-00:20 and 02:00; b: 01:10 (2 events) and 05:59
    assert_same(snapshot(read, end, SETTINGS)[0], snapshot(state, end, SETTINGS)[0])


def test_a_state_written_before_decayed_ms_reads_its_decayed_sums_as_of_its_end(tmp_path: Path) -> None:
    """Older checkpoints held ``user_events``' decayed sums as of the state's end, without ``decayed_ms``: read
    (and upgraded) they get that end, so the next hour's snapshot decays them from there."""
    table = events({"ts": at(hours=1)}, {"user_id": "u2", "ts": at(hours=2, minutes=30)})
    end = at(hours=6)
    state = rebuild(table, end, SETTINGS)
    lake = Lake(tmp_path)
    older = {**state.tables, USER_EVENTS: state.tables[USER_EVENTS].drop_columns([DECAYED_MS])}
    lake.write_partition(STATE, end - HOUR, older, bucket=0)

    read = read_state(lake, end - HOUR, 0)
    assert upgrade_state(lake, end - HOUR, 0) and not upgrade_state(lake, end - HOUR, 0)

    assert read.tables == state.tables == read_state(lake, end - HOUR, 0).tables
    assert set(read.tables[USER_EVENTS].column(DECAYED_MS).to_pylist()) == {hour_ms(end)}
    later = at(hours=30)
    got = snapshot(advance(read, events(), later, SETTINGS), later, SETTINGS)[0]
    assert_same(got, profiles_at(table, later)[0])


def test_upgrade_state_rewrites_a_checkpoint_missing_any_added_column(tmp_path: Path) -> None:
    """``upgrade_state`` looks for every column of ``ADDED_STATE_COLUMNS``: a checkpoint written before
    ``users.refund_cents`` is rewritten once (the refund is 0), like one before ``decayed_ms``."""
    table = events({"ts": at(hours=1), "event_type": "purchase"})
    end = at(hours=6)
    state = rebuild(table, end, SETTINGS)
    lake = Lake(tmp_path)
    lake.write_partition(
        STATE, end - HOUR, {**state.tables, USERS: state.tables[USERS].drop_columns(["refund_cents"])}, bucket=0
    )

    assert upgrade_state(lake, end - HOUR, 0) and not upgrade_state(lake, end - HOUR, 0)
    assert read_state(lake, end - HOUR, 0).tables == state.tables


def test_open_cart_counts_items_not_removed_or_bought() -> None:
    end = at(days=40)
    cart = {"event_type": "cart"}
    table = events(
        {**cart, "ts": end - timedelta(hours=5), "item_id": "i1"},
        {**cart, "ts": end - timedelta(hours=5), "item_id": "i2", "price": 4.25, "quantity": 2},
        {"event_type": "remove_cart", "ts": end - timedelta(hours=4), "item_id": "i1"},
        {**cart, "ts": end - timedelta(hours=3), "item_id": "i3"},
        {"event_type": "purchase", "ts": end - timedelta(hours=2), "item_id": "i3"},
        {**cart, "ts": end - timedelta(hours=1), "item_id": "i1", "price": 9.99},  # back in the cart
        {**cart, "ts": end - timedelta(days=31), "item_id": "i4"},  # abandoned long ago
    )

    p = row(profiles_at(table, end)[0])

    assert p["open_cart_items"] == 2
    assert p["open_cart_value"] == 18.49


def test_interests_top_three_with_tie_break_and_pruning() -> None:
    end = at(days=40)
    ts = end - timedelta(hours=1)
    table = events(
        {"ts": ts, "category_id": "c1", "event_type": "purchase"},
        {"ts": ts, "category_id": "c2", "event_type": "cart"},
        {"ts": ts, "category_id": "c4", "event_type": "fav"},
        {"ts": ts, "category_id": "c3", "event_type": "fav"},  # ties with c4: c3 ranks first
        {"ts": ts, "category_id": "c5", "event_type": "remove_cart"},  # zero weight: pruned
        {"ts": end - timedelta(days=31), "category_id": "c6"},  # outside the 30-day window
        {"ts": ts, "category_id": "c7"},
        {"ts": ts, "category_id": None},
    )

    profiles, interests = profiles_at(table, end)

    k = 2 ** (-1 / (7 * 24))
    p = row(profiles)
    assert [p[c] for c in TOP_CATEGORIES] == ["c1", "c2", "c3"]
    assert [p[c] for c in TOP_CATEGORY_SCORES] == pytest.approx([5 * k, 3 * k, 2 * k], abs=1e-6)
    assert p["distinct_categories"] == 6
    assert interests.column(CATEGORY_ID).to_pylist() == ["c1", "c2", "c3", "c4", "c7"]
    assert interests.column(AFFINITY).to_pylist()[-1] == round(k, 6)


def test_lifecycle_stages() -> None:
    end = at(days=60)
    table = events(
        {"user_id": "new", "ts": end - timedelta(days=2)},
        {"user_id": "active", "ts": end - timedelta(days=20)},
        {"user_id": "active", "ts": end - timedelta(days=1)},
        {"user_id": "edge", "ts": end - timedelta(days=8)},
        {"user_id": "edge", "ts": end - timedelta(days=7)},  # seen exactly 7 days ago: not yet dormant
        {"user_id": "dormant", "ts": end - timedelta(days=10)},
        {"user_id": "churned", "ts": end - timedelta(days=40)},
    )

    profiles, _ = profiles_at(table, end)

    got = dict(zip(profiles.column("user_id").to_pylist(), profiles.column("lifecycle_stage").to_pylist(), strict=True))
    assert got == {"active": "active", "churned": "churned", "dormant": "dormant", "edge": "active", "new": "new"}


def test_peak_hour_is_local_with_ties_to_the_earlier_hour() -> None:
    table = events(
        {"ts": at(hours=22, minutes=30)},
        {"ts": at(hours=22, minutes=40)},
        {"ts": at(hours=5)},
        {"ts": at(hours=5, minutes=1)},
    )

    p = row(profiles_at(table, at(days=1))[0])

    assert p["peak_hour_local"] == 6  # 05:00 UTC is 06:00 in Berlin, before 23:00


def test_future_events_are_held_back_until_their_hour() -> None:
    table = events({"ts": at(hours=1)}, {"ts": at(hours=1, minutes=10), "user_id": "u2"})

    state = advance(empty_state(), table, at(hours=1), SETTINGS)
    held = snapshot(state, at(hours=1), SETTINGS).profiles
    state = advance(state, events(), at(hours=2), SETTINGS)
    merged = snapshot(state, at(hours=2), SETTINGS).profiles

    assert held.num_rows == 0
    assert merged.column("user_id").to_pylist() == ["u1", "u2"]
    assert state.tables[PENDING].num_rows == 0


def test_advance_refuses_to_go_back_and_snapshot_needs_the_state_end() -> None:
    state = advance(empty_state(), events({"ts": at(hours=1)}), at(hours=3), SETTINGS)

    with pytest.raises(ValueError, match="back"):
        advance(state, events(), at(hours=2), SETTINGS)
    with pytest.raises(ValueError, match="advance it first"):
        snapshot(state, at(hours=4), SETTINGS)


def test_change_log_lists_lifecycle_rfm_and_top_interest_changes_with_before_and_after() -> None:
    end = at(days=20)
    table = events(
        {"user_id": "u1", "ts": end - timedelta(days=10)},
        {"user_id": "u1", "ts": end + timedelta(minutes=10)},  # back after 10 days: dormant -> active
        {"user_id": "u2", "ts": end - timedelta(hours=2)},
        {"user_id": "u3", "ts": end + timedelta(minutes=20)},  # first seen: new
        {"user_id": "u4", "ts": end - timedelta(hours=2)},
        {"user_id": "u4", "ts": end + timedelta(minutes=5)},  # more activity, nothing tracked changes
        {"user_id": "u5", "ts": end - timedelta(hours=2), "category_id": "c1"},
        {"user_id": "u5", "ts": end + timedelta(minutes=5), "category_id": "c2", "event_type": "purchase"},
    )
    state = rebuild(table, end, SETTINGS)
    previous = add_population_features(snapshot(state, end, SETTINGS)[0])
    current = add_population_features(snapshot(advance(state, events(), end + HOUR, SETTINGS), end + HOUR, SETTINGS)[0])
    current = current.filter(pc.not_equal(current.column("user_id"), "u2"))  # e.g. erased

    changes = {c["user_id"]: c for c in profile_changes(previous, current).to_pylist()}
    counts = change_counts(profile_changes(previous, current))

    assert sorted(changes) == ["u1", "u2", "u3", "u5"]
    assert changes["u1"]["change"] == "updated" and changes["u1"]["changed"] == ["lifecycle_stage"]
    assert (changes["u1"]["lifecycle_stage_before"], changes["u1"]["lifecycle_stage_after"]) == ("dormant", "active")
    assert changes["u1"]["top_category_1_before"] == changes["u1"]["top_category_1_after"] == "c1"
    assert changes["u2"]["change"] == "removed" and changes["u2"]["lifecycle_stage_after"] is None
    assert changes["u3"]["change"] == "new" and changes["u3"]["lifecycle_stage_before"] is None
    assert changes["u3"]["changed"] == ["lifecycle_stage", "rfm_segment", "top_category_1"]
    assert changes["u5"]["changed"] == ["rfm_segment", "top_category_1"]
    assert (changes["u5"]["top_category_1_before"], changes["u5"]["top_category_1_after"]) == ("c1", "c2")
    assert changes["u5"]["rfm_segment_before"] == "no_orders" != changes["u5"]["rfm_segment_after"]
    assert counts == {
        "users": 4,
        "new": 1,
        "removed": 1,
        "lifecycle_stage": 3,
        "rfm_segment": 3,
        "top_category_1": 3,
    }
    first = profile_changes(None, current)
    assert first.column("change").to_pylist() == ["new"] * current.num_rows
    assert first.schema == CHANGES_SCHEMA


# ---- an independent reference: a few feature families in plain Python ---------------------
REFERENCE_COLUMNS: tuple[str, ...] = (
    *[count_column(t, w) for t in EVENT_TYPES for w in ("lifetime", *(w for w, _ in WINDOWS))],
    *[c(t) for t in EVENT_TYPES for c in (first_at_column, last_at_column)],
    FIRST_SEEN_AT,
    LAST_SEEN_AT,
    MONETARY_TOTAL,
    SESSION_COUNT,
)


def reference_profiles(rows: list[dict[str, Any]], end: datetime) -> dict[str, dict[str, Any]]:
    """``REFERENCE_COLUMNS`` per user from the events (staged so far) before ``end``, from their definitions.

    No state, no merge, no SQL: counts of each type in the lifetime and the last 24 h / 7 d /
    30 d, first and last times, spend (purchase lines, in cents) and sessions (a new one
    after 30 minutes without an event). ``rows`` are distinct events (one per event id).
    """
    by_user: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["ts"] < end:
            by_user.setdefault(r["user_id"], []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for user, evs in by_user.items():
        got: dict[str, Any] = {}
        for t in EVENT_TYPES:
            times = [e["ts"] for e in evs if e["event_type"] == t]
            got[count_column(t, "lifetime")] = len(times)
            for w, hours in WINDOWS:
                got[count_column(t, w)] = sum(1 for ts in times if ts >= end - timedelta(hours=hours))
            got[first_at_column(t)] = min(times, default=None)
            got[last_at_column(t)] = max(times, default=None)
        got[FIRST_SEEN_AT] = min(e["ts"] for e in evs)
        got[LAST_SEEN_AT] = max(e["ts"] for e in evs)
        # Net spend: purchase lines minus refund lines (staging makes refund quantities negative,
        # whatever sign a landing file gave), each rounded to cents half away from zero; unknown
        # (None) when none of the user's events carries a price.
        cents = [
            (-1 if e["event_type"] == "refund" else 1)
            * math.floor(abs((e["price"] or 0.0) * e["quantity"]) * 100 + 0.5)
            for e in evs
            if e["event_type"] in ("purchase", "refund")
        ]
        priced = any(e["price"] is not None for e in evs)
        got[MONETARY_TOTAL] = sum(cents) / 100.0 if priced else None
        times = sorted({e["ts"] for e in evs})
        got[SESSION_COUNT] = 1 + sum(1 for a, b in zip(times, times[1:], strict=False) if b - a >= SESSION_GAP)
        out[user] = got
    return out


def assert_matches_reference(profiles: pa.Table, rows: list[dict[str, Any]], end: datetime, where: str) -> None:
    """The profiles have exactly the reference's users, and its values in ``REFERENCE_COLUMNS``."""
    expected = reference_profiles(rows, end)
    got = {r[USER_ID]: r for r in profiles.select([USER_ID, *REFERENCE_COLUMNS]).to_pylist()}
    assert sorted(got) == sorted(expected), f"{where}: users differ from the reference"
    wrong = [
        (user, column, expected[user][column], got[user][column])
        for user in sorted(expected)
        for column in REFERENCE_COLUMNS
        if expected[user][column] != got[user][column]
        and not (
            column == MONETARY_TOTAL
            and None not in (got[user][column], expected[user][column])
            and got[user][column] == pytest.approx(expected[user][column], rel=1e-12)
        )
    ]
    assert not wrong, f"{where}: {len(wrong)} values differ from the reference, e.g. {wrong[:5]}"


# ---- the main property: incremental == rebuild -------------------------------------------
PROPERTY_SETTINGS = Settings(lateness_hours=3)
PROPERTY_DAYS = 40  # past the 30-day windows, the churn threshold, pruning and the cart TTL


@st.composite
def event_streams(draw: st.DrawFn) -> tuple[pa.Table, list[int], int]:
    """A random stream: users appear, vanish for days and return; late and clock-skewed arrivals.

    Returns the events, the hour each one is staged in (at most ``lateness`` hours after
    its own, or the hour before it: held back) and the number of hours covered.
    """
    horizon = draw(st.integers(48, PROPERTY_DAYS * 24))
    lateness = PROPERTY_SETTINGS.lateness_hours
    rows, staged = [], []
    for user in draw(st.lists(st.sampled_from(["u1", "u2", "u3"]), min_size=1, max_size=3, unique=True)):
        for visit in draw(st.lists(st.integers(0, horizon - 3), min_size=1, max_size=2, unique=True)):
            for _ in range(draw(st.integers(1, 3))):
                ts = at(hours=visit, minutes=draw(st.integers(0, 150)), ms=draw(st.integers(0, 999)))
                delay = draw(st.sampled_from([0, 0, 1, lateness, -1]))  # on time, late within the window, skewed
                event_type = draw(st.sampled_from(EVENT_TYPES))
                rows.append(
                    {
                        "user_id": user,
                        "event_type": event_type,
                        "item_id": draw(st.sampled_from(["i1", "i2"])),
                        "category_id": draw(st.sampled_from(["c1", "c2", "c3", None])),
                        "price": draw(st.sampled_from([None, 0.99, 10.0, 123.45])),
                        # staging gives refunds negative quantities (ingest's refund rule)
                        "quantity": draw(st.integers(1, 3)) * (-1 if event_type == REFUND else 1),
                        "order_id": draw(st.sampled_from([None, "o1", "o2"])),
                        "ts": ts,
                    }
                )
                staged.append(max(0, int((floor_hour(ts) - T0) / HOUR) + delay))
    return events(*rows), staged, horizon + 3


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(stream=event_streams())
def test_a_rebuild_without_regrouping_its_new_rows_equals_the_merge_of_them(
    stream: tuple[pa.Table, list[int], int],
) -> None:
    """From an empty state no old row is touched: ``user_events`` and ``hours_of_day`` take the new rows as they
    are (``new_only_sql``), which must give the rows the merge (regrouping them with no old row) gives."""
    table, _, hours = stream
    end = at(hours=hours)
    rebuilt = rebuild(table, end, PROPERTY_SETTINGS)
    merge_touched = merge_module.merge_touched

    def always_merged(*args: Any, **kwargs: Any) -> pa.Table:
        return merge_touched(*args, **{**kwargs, "new_only_sql": None})

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(merge_module, "merge_touched", always_merged)
        merged = rebuild(table, end, PROPERTY_SETTINGS)

    for name in (USER_EVENTS, HOURS_OF_DAY):
        assert rebuilt.tables[name].num_rows > 0, name
        assert rebuilt.tables[name].equals(merged.tables[name]), name


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(stream=event_streams(), data=st.data())
def test_incremental_snapshots_equal_a_full_rebuild(
    stream: tuple[pa.Table, list[int], int], data: st.DataObject
) -> None:
    table, staged_hour, hours = stream
    staged = pa.array(staged_hour, pa.int64())
    # Hourly steps around every staged hour (the production path; hours with nothing staged
    # included), multi-hour jumps across the quiet days between visits (the warm-up path).
    boundaries = {hours} | {h + d for h in staged_hour for d in (0, 1)}
    boundaries |= set(data.draw(st.lists(st.integers(1, hours), max_size=2), label="extra ends"))
    ends = sorted(e for e in boundaries if 0 < e <= hours)
    checks = {hours, *data.draw(st.lists(st.sampled_from(ends), max_size=1), label="checked ends")}

    def staged_between(lo: int, hi: int) -> pa.Table:
        return table.filter(pc.and_(pc.greater_equal(staged, lo), pc.less(staged, hi)))

    def profiles_and_interests(state: ProfileState, end: datetime) -> tuple[pa.Table, pa.Table]:
        profiles, interests, *_ = snapshot(state, end, PROPERTY_SETTINGS)
        return add_population_features(profiles), interests

    # The lake path seals the by-hour rows (and the anchors older than the lateness horizon) into tile files at
    # every checkpoint (``seal_state``): the same chain with a seal after each step must give the same snapshots.
    tiles = tempfile.TemporaryDirectory()
    lake = Lake(Path(tiles.name))
    state, sealed, previous = empty_state(), empty_state(), 0
    for end in ends:
        state = advance(state, staged_between(previous, end), at(hours=end), PROPERTY_SETTINGS)
        sealed = advance(sealed, staged_between(previous, end), at(hours=end), PROPERTY_SETTINGS)
        sealed = seal_state(lake, sealed, at(hours=end) - HOUR, 0, PROPERTY_SETTINGS)
        for name in BY_HOUR_TABLES:  # every by-hour row is sealed at the end of the hour that built it
            assert sealed.tables[name].num_rows == 0, name
        previous = end
        if end in checks:
            sealed_got = profiles_and_interests(sealed, at(hours=end))
            in_memory = profiles_and_interests(state, at(hours=end))
            for name, columns, pair in (
                ("profiles", [USER_ID], (in_memory[0], sealed_got[0])),
                ("interests", [USER_ID, CATEGORY_ID], (in_memory[1], sealed_got[1])),
            ):
                comparison = compare_tables(name, pair[0], pair[1], columns)
                assert comparison.equal, f"sealed {name} at hour {end}: " + "; ".join(comparison.lines())
            rebuilt = rebuild(staged_between(0, end), at(hours=end), PROPERTY_SETTINGS)
            expected, expected_interests = profiles_and_interests(rebuilt, at(hours=end))
            got, got_interests = profiles_and_interests(state, at(hours=end))
            # A state read back from the lake has no derived buffer totals: snapshot groups the buffers.
            loaded, _ = profiles_and_interests(ProfileState(state.tables), at(hours=end))
            assert state.buffered is not None
            assert loaded.equals(got), "snapshot of the loaded state differs from the advanced one"
            for name, comparison in (
                ("profiles", compare_tables("profiles", expected, got, [USER_ID])),
                (
                    "interests",
                    compare_tables("interests", expected_interests, got_interests, [USER_ID, CATEGORY_ID]),
                ),
            ):
                assert comparison.equal, f"{name} at hour {end}: " + "; ".join(comparison.lines())
            assert got.schema == profile_schema(load_traits())
            assert_matches_reference(got, staged_between(0, end).to_pylist(), at(hours=end), f"hour {end}")

    in_snapshot = pc.less(table.column("ts"), pa.scalar(at(hours=hours), table.schema.field("ts").type))
    views = pc.sum(pc.and_(in_snapshot, pc.equal(table.column("event_type"), "view"))).as_py() or 0
    assert (pc.sum(expected.column("count_view_lifetime")).as_py() or 0) == views
    assert state.tables[PENDING].num_rows == table.num_rows - (pc.sum(in_snapshot).as_py() or 0)
    tiles.cleanup()


def _bounded_stream(seed: int) -> tuple[pa.Table, list[int]]:
    """Four users' events of every type in the first three days (late, on time and held back), and the hour
    each is staged in."""
    rng = random.Random(seed)
    rows, staged = [], []
    for _ in range(40):
        ts = at(hours=rng.randrange(0, 72), minutes=rng.randrange(0, 60))
        event_type = rng.choice(EVENT_TYPES)
        rows.append(
            {
                "user_id": rng.choice(["u1", "u2", "u3", "u4"]),
                "event_type": event_type,
                "item_id": rng.choice(["i1", "i2", "i3"]),
                "category_id": rng.choice(["c1", "c2", None]),
                "price": rng.choice([None, 0.99, 10.0]),
                "quantity": rng.randint(1, 2) * (-1 if event_type == REFUND else 1),
                "order_id": rng.choice([None, "o1"]),
                "ts": ts,
            }
        )
        staged.append(max(0, int((floor_hour(ts) - T0) / HOUR) + rng.choice([0, 0, 1, 3, -1])))
    return events(*rows), staged


@pytest.fixture
def any_share_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start from the hour before however many of the (few) users changed."""
    monkeypatch.setattr(snapshot_module, "MOST_CHANGED", 1.0)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.usefixtures("any_share_changed")
def test_a_snapshot_from_the_hour_before_equals_the_full_snapshot_around_every_window_bound(seed: int) -> None:
    """The hourly path's snapshot (changed users from the state, the others moved on from the hour before)
    equals the full snapshot of the same state in the hours around every bound of every window the snapshot
    reads (the declared traits', the cart time to live, the retention), chained hour after hour, on a state
    that seals its older rows as the lake path does."""
    assert_snapshots_from_the_hour_before_equal_full_ones(seed, PROPERTY_SETTINGS)


def assert_snapshots_from_the_hour_before_equal_full_ones(seed: int, cfg: Settings) -> None:
    """The check of the test above, with the declared traits of ``cfg`` (``MOST_CHANGED`` patched to 1.0)."""
    table, staged_hour = _bounded_stream(seed)
    staged = pa.array(staged_hour, pa.int64())
    traits = load_traits(cfg.traits)
    lengths = {1, 24, 72, 7 * 24, 30 * 24} | {h for t in traits for _, h in t.windows}
    hours = sorted({int((floor_hour(t) - T0) / HOUR) for t in table.column("ts").to_pylist()})
    starts = random.Random(seed).sample(hours, 3)
    checked = sorted({s + n + d for s in starts for n in lengths for d in (0, 1, 2)})
    tiles = tempfile.TemporaryDirectory()
    lake = Lake(Path(tiles.name))
    state, done, previous, incremental = empty_state(), 0, None, 0
    affinities: AffinitySums | None = None
    for end in checked:
        before = state
        hour_events = table.filter(pc.and_(pc.greater_equal(staged, done), pc.less(staged, end)))
        state = advance(state, hour_events, at(hours=end), cfg)
        state = seal_state(lake, state, at(hours=end) - HOUR, 0, cfg)
        full = snapshot(state, at(hours=end), cfg, keep_affinities=True)
        expected, expected_interests = full.profiles, full.interests
        if previous is not None and done == end - 1:
            taken = snapshot(
                state,
                at(hours=end),
                cfg,
                PreviousHour(previous, before, hour_events, affinities),
                keep_affinities=True,
            )
            got, got_interests = taken.profiles, taken.interests
            for name, comparison in (
                ("profiles", compare_tables("profiles", expected, got, [USER_ID])),
                ("interests", compare_tables("interests", expected_interests, got_interests, [USER_ID, CATEGORY_ID])),
            ):
                assert comparison.equal, f"{name} at hour {end}: " + "; ".join(comparison.lines())
            assert got.schema == expected.schema
            assert taken.affinities_from_previous_hour
            # the kept affinities carried on (the quiet users' summed hours before) are the full ones moved on
            assert taken.affinities is not None and full.affinities is not None
            assert_same_affinities(taken.affinities, full.affinities)
            previous, affinities, incremental = got, taken.affinities, incremental + 1
        else:
            previous, affinities = expected, full.affinities
        done = end
    assert incremental >= 2 * len(checked) // 3 - len(starts)
    tiles.cleanup()


def assert_same_affinities(got: AffinitySums, expected: AffinitySums) -> None:
    """The same (user, category) rows and views, each affinity as of the same end to 1e-9 relative."""
    half_life = 7 * 24 * 3600 * 1000

    def as_of(sums: AffinitySums) -> dict[tuple[str, str], tuple[Any, ...]]:
        rows = sums.table.to_pylist()
        return {
            (r[USER_ID], r[CATEGORY_ID]): (
                *(v for k, v in r.items() if k.startswith("views_")),
                r["affinity_sum"] * 2 ** (-(sums.end_ms - r["sum_ms"]) / half_life),
            )
            for r in rows
        }

    assert got.end_ms == expected.end_ms
    moved, full = as_of(got), as_of(expected)
    assert moved.keys() == full.keys()
    for key, values in full.items():
        assert moved[key][:-1] == values[:-1], key
        assert moved[key][-1] == pytest.approx(values[-1], rel=1e-9), key


@pytest.mark.usefixtures("any_share_changed")
def test_the_kept_affinities_do_not_depend_on_the_order_of_the_hourly_rows() -> None:
    """The kept unrounded sums are written to the lake: a rerun of an hour must write the same values, whatever the
    order in which DuckDB reads the hourly rows (tile files are scanned in parallel). Sums of many terms of
    different sizes, taken in the opposite order, are equal to the last bit."""
    rng = random.Random(7)
    rows = [
        {
            "user_id": f"u{i % 3}",
            "event_type": rng.choice(("view", "cart", "purchase", "fav")),
            "category_id": f"c{i % 2}",
            "ts": at(hours=rng.randrange(0, 28 * 24), minutes=rng.randrange(60)),
        }
        for i in range(600)
    ]
    state = rebuild(events(*rows), at(days=29), SETTINGS)
    hourly = state.tables[HOURLY]
    assert hourly.num_rows > 300
    backwards = ProfileState({**state.tables, HOURLY: hourly.take(pa.array(range(hourly.num_rows - 1, -1, -1)))})
    sums = [snapshot(s, at(days=29), SETTINGS, keep_affinities=True).affinities for s in (state, backwards)]
    assert sums[0] is not None and sums[1] is not None
    order = [("user_id", "ascending"), ("category_id", "ascending")]
    assert sums[0].table.sort_by(order).equals(sums[1].table.sort_by(order))


def test_a_snapshot_from_the_hour_before_moves_the_quiet_users_affinities_on() -> None:
    """u1 is quiet in the hour: its affinities are its unrounded ones of the hour before times one decay factor
    (here made wrong on purpose, doubled, to see where they come from); u2 buys in the hour and its affinities
    are computed from its hourly rows. Kept affinities of another end are not used: every one is computed."""
    cfg = Settings(lateness_hours=1)
    old = events(
        {"user_id": "u1", "event_type": "cart", "category_id": "c1", "ts": at(hours=1)},
        {"user_id": "u2", "category_id": "c2", "ts": at(hours=1)},
    )
    first = advance(empty_state(), old, at(days=4, hours=5), cfg)
    before = snapshot(first, at(days=4, hours=5), cfg, keep_affinities=True)
    assert before.affinities is not None and before.affinities.end_ms == int(at(days=4, hours=5).timestamp() * 1000)
    sums = before.affinities.table
    doubled = pc.if_else(
        pc.equal(sums.column(USER_ID), "u1"), pc.multiply(sums.column("affinity_sum"), 2.0), sums.column("affinity_sum")
    )
    wrong = AffinitySums(
        sums.set_column(sums.schema.get_field_index("affinity_sum"), "affinity_sum", doubled), before.affinities.end_ms
    )
    new = events({"user_id": "u2", "event_type": "purchase", "category_id": "c2", "ts": at(days=4, hours=5, minutes=5)})
    second = advance(first, new, at(days=4, hours=6), cfg)
    expected = snapshot(second, at(days=4, hours=6), cfg)
    got = snapshot(
        second, at(days=4, hours=6), cfg, PreviousHour(before.profiles, first, new, wrong), keep_affinities=True
    )
    assert got.affinities_from_previous_hour and got.users_from_state == 1

    def scores(interests: pa.Table) -> dict[str, float]:
        return dict(zip(interests.column(USER_ID).to_pylist(), interests.column("affinity").to_pylist(), strict=True))

    assert scores(got.interests)["u1"] == pytest.approx(2 * scores(expected.interests)["u1"], abs=1e-6)
    assert scores(got.interests)["u2"] == scores(expected.interests)["u2"]
    assert row(got.profiles)["top_category_1_score"] == scores(got.interests)["u1"]
    # kept as summed: u1's as of the hour before, u2's as of this hour
    assert got.affinities is not None
    kept = {r[USER_ID]: r["sum_ms"] for r in got.affinities.table.to_pylist()}
    assert kept == {"u1": before.affinities.end_ms, "u2": before.affinities.end_ms + 3_600_000}
    # of another end (or none): every affinity computed, the same as the full snapshot
    for other in (AffinitySums(wrong.table, wrong.end_ms - 3_600_000), None):
        computed = snapshot(second, at(days=4, hours=6), cfg, PreviousHour(before.profiles, first, new, other))
        assert computed.from_previous_hour and not computed.affinities_from_previous_hour
        assert_same(computed.profiles, expected.profiles)
        assert computed.interests.equals(expected.interests)


@pytest.mark.usefixtures("any_share_changed")
def test_a_snapshot_from_the_hour_before_moves_the_time_columns_and_keeps_the_rest() -> None:
    """u1 is quiet in the hour: its row is the previous one with the hours since, the decays, the affinity
    and the lifecycle moved; u2 buys in the hour and is computed from the state. A previous snapshot of
    another hour is ignored."""
    cfg = Settings(lateness_hours=1)
    old = events({"user_id": "u1", "event_type": "cart", "ts": at(hours=1)}, {"user_id": "u2", "ts": at(hours=1)})
    first = advance(empty_state(), old, at(days=7, hours=1), cfg)  # u1 and u2 first seen 7 days before the end
    before = snapshot(first, at(days=7, hours=1), cfg).profiles
    new = events({"user_id": "u2", "event_type": "purchase", "ts": at(days=7, hours=1, minutes=5)})
    second = advance(first, new, at(days=7, hours=2), cfg)
    expected = snapshot(second, at(days=7, hours=2), cfg).profiles
    got = snapshot(second, at(days=7, hours=2), cfg, PreviousHour(before, first, new)).profiles
    assert_same(got, expected)
    assert row(before)[LIFECYCLE_STAGE] == "new" and row(got)[LIFECYCLE_STAGE] == "dormant"
    assert row(got)[HOURS_SINCE_LAST_EVENT] == row(before)[HOURS_SINCE_LAST_EVENT] + 1
    assert row(got, "u2")[FREQUENCY_ORDERS] == 1
    # a snapshot of another state, taken an hour earlier: not the hour before, so it is not used
    other = events({"user_id": "u1", "ts": at(hours=1)}, {"user_id": "u1", "ts": at(hours=2)})
    stale = snapshot(advance(empty_state(), other, at(days=7), cfg), at(days=7), cfg).profiles
    assert row(stale)[count_column("view", "lifetime")] == 2
    ignored = snapshot(second, at(days=7, hours=2), cfg, PreviousHour(stale, first, new))
    assert_same(ignored.profiles, expected)
    assert not ignored.from_previous_hour and ignored.users_from_state == 2


# ---- lake stages --------------------------------------------------------------------------
def stage_hours(lake: Lake, hours: int) -> None:
    """Write staged partitions for two buckets over ``hours`` hours (bucket 1 has one user)."""
    rng = random.Random(3)
    for h in range(hours):
        for bucket, users in ((0, ["a", "b"]), (1, ["c"])):
            rows = [
                {
                    "user_id": rng.choice(users),
                    "event_type": rng.choice(EVENT_TYPES),
                    "ts": at(hours=h, minutes=rng.randrange(-30, 70)),  # some late, some held back
                    "bucket": bucket,
                    "order_id": rng.choice([None, "o1"]),
                }
                for _ in range(6)
            ] + [{"user_id": users[0], "ts": at(hours=h + 1, minutes=5), "bucket": bucket}]  # clock skew: held back
            table = events(*rows)
            ids = pa.array([f"h{h}b{bucket}e{i}" for i in range(table.num_rows)])
            lake.write_partition(STAGING, at(hours=h), table.set_column(0, "event_id", ids), bucket=bucket)


def test_a_snapshot_with_most_users_changed_computes_every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above ``MOST_CHANGED`` of the users changed, the rows of the hour before are not used."""
    cfg = Settings(lateness_hours=1)
    first = advance(
        empty_state(), events({"user_id": "u1", "ts": at()}, {"user_id": "u2", "ts": at()}), at(hours=5), cfg
    )
    before = snapshot(first, at(hours=5), cfg).profiles
    new = events({"user_id": "u2", "ts": at(hours=5, minutes=5)})
    second = advance(first, new, at(hours=6), cfg)
    wrong = before.set_column(before.schema.get_field_index(SESSION_COUNT), SESSION_COUNT, pa.array([7, 7]))
    expected = snapshot(second, at(hours=6), cfg).profiles
    monkeypatch.setattr(snapshot_module, "MOST_CHANGED", 0.5)  # 1 of 2 changed: u1 moved on from the hour before
    moved = snapshot(second, at(hours=6), cfg, PreviousHour(wrong, first, new))
    assert row(moved.profiles)[SESSION_COUNT] == 7
    assert moved.from_previous_hour and moved.users_from_state == 1
    monkeypatch.setattr(snapshot_module, "MOST_CHANGED", 0.4)  # more than 40 % changed: every row
    computed = snapshot(second, at(hours=6), cfg, PreviousHour(wrong, first, new))
    assert_same(computed.profiles, expected)
    assert computed.from_previous_hour and computed.users_from_state == 2


@pytest.mark.parametrize("from_previous", [False, True], ids=["every_row", "from_previous_hour"])
@pytest.mark.usefixtures("any_share_changed")
def test_lake_round_trip_build_publish_and_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, from_previous: bool
) -> None:
    """Hourly builds (with their snapshots started from the published hour before, or not) equal range builds."""
    minimum = 0 if from_previous else SETTINGS.snapshot_from_previous_min_users
    cfg = replace(SETTINGS, lake=tmp_path / "hourly", buckets=2, start=T0, snapshot_from_previous_min_users=minimum)
    bulk = replace(cfg, lake=tmp_path / "bulk")
    for c in (cfg, bulk):
        stage_hours(Lake(c.lake), 3)
    lake = Lake(cfg.lake)

    builds = [build_profiles(cfg, at(hours=h), b, run_id="t") for h in range(3) for b in range(2)]
    published = [publish_profiles(cfg, at(hours=h), run_id="t") for h in range(3)]
    ranges = [build_profiles_range(bulk, T0, at(hours=2), b, snapshot_every=2) for b in range(2)]

    assert all(snapshot_committed(cfg, at(hours=h)) for h in range(3))
    assert read_json(lake.path(PROFILES, "current"))["hour"] == format_hour(at(hours=2))
    final = lake.read(PROFILES, at(hours=2))
    assert final.schema == profile_schema(load_traits())
    assert sorted(final.column("user_id").to_pylist()) == ["a", "b", "c"]
    assert published[2]["profiles"] == 3 and published[2]["previous_hour"] == format_hour(at(hours=1))
    assert sum(published[2]["rfm_segments"].values()) == 3
    assert published[0]["new_users"] == published[0]["profiles"]
    assert published[0]["profile_changes"]["users"] == published[0]["profiles"]
    changes = lake.read(PROFILE_CHANGES, at(hours=2))
    assert published[2]["profile_changes"] == change_counts(changes)
    headline = report.build_report(at(hours=2), {"publish_profiles": published[2]}, run_id="t")["headline"]
    assert headline["profile_changes"] == published[2]["profile_changes"]
    assert lake.manifest(PROFILE_CHANGES, at(hours=2))["previous_hour"] == format_hour(at(hours=1))
    hour0 = lake.read(STAGING, T0, 0)
    future = pc.sum(pc.greater_equal(hour0.column("ts"), pa.scalar(at(hours=1), hour0.schema.field("ts").type))).as_py()
    assert builds[0]["held_back"] == future > 0
    assert builds[0]["events_merged"] == hour0.num_rows - future
    assert ranges[0]["checkpoints"] == [format_hour(at(hours=1)), format_hour(at(hours=2))]
    assert not Lake(bulk.lake).committed(STATE, T0) and Lake(bulk.lake).committed(STATE, at(hours=1), 0)
    for h in (1, 2):
        for b in range(2):
            hourly = lake.read(PROFILES, at(hours=h), b).select(snapshot_schema(load_traits()).names)
            assert_same(Lake(bulk.lake).read(PROFILES, at(hours=h), b), hourly)
    assert (lake.partition(PROFILES, at(hours=2)) / MANIFEST).is_file()
    started = [b["snapshot_from_previous_hour"] for b in builds]  # hours 1 and 2 of both buckets when asked
    assert started == [False, False, *([from_previous] * 4)]
    # the quiet users' affinities moved on from the unrounded ones the checkpoint of the hour before keeps
    assert [b["affinities_from_previous_hour"] for b in builds] == started
    for h in (1, 2):
        for b in range(2):
            comparison = compare_tables(
                "interests",
                Lake(bulk.lake).read(INTERESTS, at(hours=h), b),
                lake.read(INTERESTS, at(hours=h), b),
                [USER_ID, CATEGORY_ID],
            )
            assert comparison.equal, "; ".join(comparison.lines())
    assert all(0 < b["users_from_state"] <= b["users"] for b in builds)
    assert ranges[0]["snapshot_from_previous_hour"] is False and ranges[0]["users_from_state"] == ranges[0]["users"]


@pytest.mark.parametrize("kept", ["missing", "of_another_end"])
@pytest.mark.usefixtures("any_share_changed")
def test_an_hour_after_a_checkpoint_without_its_kept_affinities_computes_every_one(tmp_path: Path, kept: str) -> None:
    """A checkpoint without the unrounded affinities (written before them, or rewritten by ``upgrade_state``), or
    whose manifest says they are of another end: the next hour computes every affinity from the hourly rows, and
    its profiles and interests equal those of a lake whose checkpoint kept them."""
    lakes = {}
    for name in ("kept", "altered"):
        cfg = replace(SETTINGS, lake=tmp_path / name, buckets=2, start=T0, snapshot_from_previous_min_users=0)
        stage_hours(Lake(cfg.lake), 3)
        for h in range(2):
            build_profiles(cfg, at(hours=h), 0, run_id="t")
        lakes[name] = cfg
    lake = Lake(lakes["altered"].lake)
    manifest = lake.manifest(STATE, at(hours=1), 0)
    if kept == "missing":
        tables = {name: lake.read_named(STATE, at(hours=1), name, 0) for name in STATE_TABLES}
        extra = {k: v for k, v in manifest_extra(manifest).items() if k != AFFINITY_SUMS_END}
        lake.write_partition(STATE, at(hours=1), tables, bucket=0, run_id="older", extra=extra)
    else:
        write_json(
            lake.partition(STATE, at(hours=1), 0) / MANIFEST,
            {**manifest, AFFINITY_SUMS_END: manifest[AFFINITY_SUMS_END] - 3_600_000},
        )
    built = {name: build_profiles(cfg, at(hours=2), 0, run_id="t") for name, cfg in lakes.items()}
    assert built["kept"]["affinities_from_previous_hour"] and built["kept"]["snapshot_from_previous_hour"]
    assert not built["altered"]["affinities_from_previous_hour"] and built["altered"]["snapshot_from_previous_hour"]
    for layer, keys in ((PROFILES, [USER_ID]), (INTERESTS, [USER_ID, CATEGORY_ID])):
        expected, got = (Lake(cfg.lake).read(layer, at(hours=2), 0) for cfg in lakes.values())
        comparison = compare_tables(layer, expected, got, keys)
        assert comparison.equal, "; ".join(comparison.lines())
    # the hour computed in full keeps them again for the next one
    assert lake.manifest(STATE, at(hours=2), 0)[AFFINITY_SUMS_END] == int(at(hours=3).timestamp() * 1000)


def test_rebuilding_a_bucket_uncommits_the_published_hour(tmp_path: Path) -> None:
    cfg = replace(SETTINGS, lake=tmp_path, buckets=2, start=T0)
    stage_hours(Lake(cfg.lake), 1)
    for b in range(2):
        build_profiles(cfg, T0, b)
    publish_profiles(cfg, T0)

    build_profiles(cfg, T0, 1)

    assert not snapshot_committed(cfg, T0)


def test_missing_previous_hour_is_an_error_naming_it(tmp_path: Path) -> None:
    cfg = replace(SETTINGS, lake=tmp_path, buckets=1, start=T0)
    stage_hours(Lake(cfg.lake), 2)

    with pytest.raises(MissingStateError, match=re.escape(f"{format_hour(T0)} bucket 0")):
        build_profiles(cfg, at(hours=1), 0)
    assert build_profiles(cfg, T0, 0)["users"] >= 1  # the first hour starts from an empty state


def test_a_user_in_two_buckets_is_refused_without_naming_the_user() -> None:
    """The error reaches task logs: it counts the duplicated users and never names them (raw ids)."""
    profiles, _ = profiles_at(events({"user_id": "u-secret-7", "ts": at(minutes=5)}), at(hours=1))
    part = profiles.select(SNAPSHOT_SCHEMA.names)

    with pytest.raises(ValueError, match="1 user") as raised:
        population_snapshot([part, part], at(hours=1), ())

    assert "u-secret-7" not in str(raised.value)


# ---- funnel features (open carts/favourites, short windows, windowed rates, repeat views) ----
def chain_with_late(table: pa.Table, late: dict[int, int], end: datetime) -> ProfileState:
    """Advance hour by hour through every staged hour (jumping over quiet ones); event i arrives
    ``late[i]`` hours after its own hour, always before ``end``."""
    staged = [floor_hour(t) + late.get(i, 0) * HOUR for i, t in enumerate(table.column("ts").to_pylist())]
    assert all(h < end for h in staged) and max(late.values(), default=0) <= SETTINGS.lateness_hours
    hours = pa.array(staged, pa.timestamp("ms", tz="UTC"))
    state, previous = empty_state(), min(staged)
    for stop in sorted({end} | {h + d * HOUR for h in staged for d in (1, 2)}):
        if previous < stop <= end:
            mask = pc.and_(
                pc.greater_equal(hours, pa.scalar(previous, hours.type)), pc.less(hours, pa.scalar(stop, hours.type))
            )
            state, previous = advance(state, table.filter(mask), stop, SETTINGS), stop
    return state


def both_paths(table: pa.Table, late: dict[int, int], end: datetime) -> dict[str, Any]:
    """The user's row from a rebuild, after checking that an hourly chain with late arrivals equals it."""
    rebuilt = snapshot(rebuild(table, end, SETTINGS), end, SETTINGS)[0]
    chained = snapshot(chain_with_late(table, late, end), end, SETTINGS)[0]
    comparison = compare_tables("profiles", rebuilt, chained, [USER_ID])
    assert comparison.equal, "; ".join(comparison.lines())
    return row(rebuilt)


def test_cart_and_fav_counts_in_the_last_1h_and_72h_are_exact_at_the_boundaries() -> None:
    end = at(days=20)
    table = events(
        {"event_type": "cart", "ts": end - timedelta(milliseconds=1)},
        {"event_type": "cart", "ts": end - timedelta(hours=1)},  # boundary: inside 1h
        {"event_type": "cart", "ts": end - timedelta(hours=1, milliseconds=1)},  # outside 1h, inside 72h
        {"event_type": "fav", "ts": end - timedelta(hours=72)},  # boundary: inside 72h; arrives 6 hours late
        {"event_type": "fav", "ts": end - timedelta(hours=72, milliseconds=1)},  # outside 72h
        {"event_type": "fav", "ts": end - timedelta(minutes=30)},
    )

    p = both_paths(table, {3: 6, 2: 1}, end)

    assert (p["count_cart_1h"], p["count_cart_24h"], p["count_cart_72h"]) == (2, 3, 3)
    assert (p["count_fav_1h"], p["count_fav_24h"], p["count_fav_72h"]) == (1, 1, 2)


def test_open_carts_and_favourites_within_1h_24h_72h() -> None:
    end = at(days=20)
    cart, fav, buy = {"event_type": "cart"}, {"event_type": "fav"}, {"event_type": "purchase"}
    table = events(
        {**cart, "item_id": "i1", "ts": end - timedelta(minutes=30)},  # open: 1h, 24h, 72h
        {**cart, "item_id": "i2", "ts": end - timedelta(hours=24)},  # boundary: open 24h, 72h
        {**cart, "item_id": "i3", "ts": end - timedelta(hours=10)},
        {**buy, "item_id": "i3", "ts": end - timedelta(hours=5)},  # bought later: closed (arrives 4 h late)
        {**buy, "item_id": "i4", "ts": end - timedelta(hours=50)},  # bought before the cart: does not close it
        {**cart, "item_id": "i4", "ts": end - timedelta(hours=48)},  # open 72h
        {**cart, "item_id": "i5", "ts": end - timedelta(hours=72, milliseconds=1)},  # open, outside 72h
        {**fav, "item_id": "i1", "ts": end - timedelta(hours=1)},  # boundary: open 1h, 24h, 72h
        {**fav, "item_id": "i7", "ts": end - timedelta(hours=20)},
        {**buy, "item_id": "i7", "ts": end - timedelta(hours=19)},  # closes the favourite of i7
        {**fav, "item_id": "i6", "ts": end - timedelta(hours=72)},  # boundary: open 72h (arrives 6 h late)
    )

    p = both_paths(table, {3: 4, 10: 6}, end)

    assert p["open_cart_items"] == 4  # i1, i2, i4, i5
    assert [p[f"open_cart_items_{w}"] for w in ("1h", "24h", "72h")] == [1, 2, 3]
    assert [p[f"open_fav_items_{w}"] for w in ("1h", "24h", "72h")] == [1, 1, 2]


def test_a_late_purchase_closes_a_favourite_and_an_old_one_does_not_reopen_it() -> None:
    end = at(days=20)
    table = events(
        {"event_type": "fav", "item_id": "i1", "ts": end - timedelta(hours=10)},
        {"event_type": "purchase", "item_id": "i1", "ts": end - timedelta(hours=9)},  # 6 h late
        {"event_type": "purchase", "item_id": "i2", "ts": end - timedelta(hours=30)},
        {"event_type": "fav", "item_id": "i2", "ts": end - timedelta(hours=29)},  # after the purchase: open; 6 h late
    )

    p = both_paths(table, {1: 6, 3: 6}, end)

    assert [p[f"open_fav_items_{w}"] for w in ("1h", "24h", "72h")] == [0, 0, 1]


def test_view_to_cart_and_cart_to_purchase_rates_over_7d_and_30d() -> None:
    end = at(days=40)
    table = events(
        {"event_type": "view", "ts": end - timedelta(days=7)},  # boundary: inside 7d
        {"event_type": "view", "ts": end - timedelta(days=1)},
        {"event_type": "view", "ts": end - timedelta(days=7, milliseconds=1)},  # 30d only
        {"event_type": "view", "ts": end - timedelta(days=20)},
        {"event_type": "cart", "ts": end - timedelta(hours=5)},  # 3 hours late
        {"event_type": "cart", "ts": end - timedelta(days=10)},
        {"event_type": "purchase", "ts": end - timedelta(days=10)},
        {"event_type": "purchase", "ts": end - timedelta(days=31)},  # lifetime only
    )

    p = both_paths(table, {4: 3}, end)

    assert (p["cart_view_rate_7d"], p["cart_view_rate_30d"]) == (0.5, 0.5)
    assert p["purchase_cart_rate_7d"] == 0.0
    assert p["purchase_cart_rate_30d"] == 0.5
    assert p["purchase_cart_rate"] == 1.0  # lifetime: 2 purchases / 2 carts
    only_purchases = row(profiles_at(events({"event_type": "purchase", "ts": end - HOUR}), end)[0])
    assert only_purchases["cart_view_rate_7d"] is None and only_purchases["purchase_cart_rate_30d"] is None
    assert only_purchases["purchase_cart_rate"] is None


def test_hours_since_the_last_view_and_favourite() -> None:
    end = at(days=20)
    table = events(
        {"event_type": "view", "ts": end - timedelta(hours=30)},
        {"event_type": "view", "ts": end - timedelta(hours=2, minutes=30)},  # 2 hours late
        {"event_type": "fav", "ts": end - timedelta(hours=50)},
    )

    p = both_paths(table, {1: 2}, end)

    assert (p["hours_since_last_view"], p["hours_since_last_fav"]) == (2.5, 50.0)
    assert row(profiles_at(events({"ts": end - HOUR}), end)[0])["hours_since_last_fav"] is None


def test_repeat_views_of_one_item_and_one_category_within_24h_and_7d() -> None:
    end = at(days=20)
    view = {"event_type": "view"}
    table = events(
        {**view, "item_id": "i1", "category_id": "c1", "ts": end - timedelta(hours=24)},  # boundary: inside 24h
        {**view, "item_id": "i1", "category_id": "c1", "ts": end - timedelta(hours=2)},
        {**view, "item_id": "i1", "category_id": "c1", "ts": end - timedelta(minutes=10)},
        {**view, "item_id": "i2", "category_id": "c1", "ts": end - timedelta(hours=24, milliseconds=1)},  # 7d only
        {**view, "item_id": "i2", "category_id": "c1", "ts": end - timedelta(hours=5)},  # 4 hours late
        {**view, "item_id": "i3", "category_id": "c2", "ts": end - timedelta(days=7)},  # boundary: inside 7d
        {**view, "item_id": "i3", "category_id": "c2", "ts": end - timedelta(days=7, milliseconds=1)},  # outside
        {**view, "item_id": "i4", "category_id": "c2", "ts": end - timedelta(hours=1)},
        {"event_type": "cart", "item_id": "i4", "category_id": "c2", "ts": end - timedelta(hours=1)},  # not a view
    )

    p = both_paths(table, {4: 4}, end)

    assert (p["max_item_views_24h"], p["repeat_view_items_24h"]) == (3, 1)  # i1: 3; i2: 1, i4: 1
    assert (p["max_item_views_7d"], p["repeat_view_items_7d"]) == (3, 2)  # i1: 3, i2: 2, i3: 1, i4: 1
    assert (p["max_category_views_24h"], p["repeat_view_categories_24h"]) == (4, 1)  # c1: 4, c2: 1
    assert (p["max_category_views_7d"], p["repeat_view_categories_7d"]) == (5, 2)  # c1: 5, c2: 2


def test_the_state_does_not_depend_on_the_order_of_the_hours_events() -> None:
    """The state's float sums (``user_events``' decayed sums, ``hourly``'s ``decay_sum``, the tiles of the decayed and
    summed traits) are written to the lake: a rerun of an hour must write the same values whatever order DuckDB reads
    its events in (staged files are scanned in parallel). Many events of different sizes and ages a key, taken in
    the opposite order, give the same state to the last bit."""
    rng = random.Random(11)
    rows = [
        {
            "user_id": f"u{i % 3}",
            "event_type": rng.choice(("view", "cart", "purchase", "fav")),
            "category_id": f"c{i % 2}",
            "price": rng.choice((0.1, 1.7, 3.3, 120.49, 9999.99)),
            "ts": at(minutes=rng.randrange(0, 59), ms=rng.randrange(60_000)),
        }
        for i in range(900)
    ]
    forward = events(*rows)
    backwards = forward.take(pa.array(range(forward.num_rows - 1, -1, -1)))
    states = [advance(empty_state(), e, at(hours=1), SETTINGS) for e in (forward, backwards)]
    for name, table in states[0].tables.items():
        if table.num_rows == 0 or USER_ID not in table.column_names:
            continue
        keys = [(c, "ascending") for c in table.column_names if not pa.types.is_floating(table.schema.field(c).type)]
        other = states[1].tables[name]
        assert table.sort_by(keys).equals(other.sort_by(keys)), name
