"""Sealed state tiles (issue 19): the by-hour state rows older than the lateness horizon live in immutable tile
files of the bucket, not in the checkpoint; every hour still equals a full rebuild, older checkpoints that
hold every hour still build their next hour, retention drops expired tiles and erasure removes users from them.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from profile_engine.config import Settings
from profile_engine.contracts.events import STAGED_SCHEMA
from profile_engine.contracts.profiles import (
    CATEGORY_ID,
    MEAN_CART_TO_PURCHASE_HOURS,
    MEAN_VIEW_TO_CART_HOURS,
    USER_ID,
    snapshot_schema,
)
from profile_engine.contracts.traits import load_traits
from profile_engine.hours import HOUR, MS_HOUR
from profile_engine.lake import db
from profile_engine.lake.storage import INTERESTS, PROFILES, STAGING, STATE, STATE_TILES, Lake
from profile_engine.lake.tiles import DAY_FILE
from profile_engine.ops import erasure, retention
from profile_engine.profiles import build as build_module
from profile_engine.profiles import snapshot as snapshot_module
from profile_engine.profiles.build import (
    SNAPSHOT_TRAITS,
    build_profiles,
    build_profiles_range,
    previous_hour,
    publish_profiles,
    read_state,
    upgrade_state,
)
from profile_engine.profiles.merge import advance, with_local_hour
from profile_engine.profiles.replay import rebuild_bucket
from profile_engine.profiles.snapshot import snapshot
from profile_engine.profiles.state import (
    ANCHORS,
    BY_HOUR_TABLES,
    HOURLY,
    ITEM_VIEWS,
    SEALED_MARKER,
    SESSIONS,
    STATE_SCHEMAS,
    TRAIT_TILES,
    USERS,
    hour_ms,
)
from profile_engine.profiles.verify import compare_tables

T0 = datetime(2026, 11, 3, 21, tzinfo=UTC)  # three hours before midnight: day 1 is compacted when day 2 starts
HOURS = 10
BASE = Settings(buckets=1, lateness_hours=2, start=T0)


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def staged(rows: list[dict[str, Any]], hour: int) -> pa.Table:
    """Staged events (``STAGED_SCHEMA``) from partial rows, with event ids unique across hours."""
    defaults = {"event_type": "view", "item_id": "i1", "category_id": "c1", "price": 5.0, "quantity": 1}
    full = [
        {"order_id": None, "session_id": None, **defaults, **r, "event_id": f"h{hour}e{i}", "bucket": 0}
        for i, r in enumerate(rows)
    ]
    without_hour = pa.schema([f for f in STAGED_SCHEMA if f.name != "local_hour"])
    return with_local_hour(pa.Table.from_pylist(full, schema=without_hour), BASE.business_tz)


def stage_shop(lake: Lake) -> None:
    """Hours 0..HOURS-1: three users every hour, late events within the lateness (2 hours after their hour)
    and one view of a user who has no other event, arriving 5 hours after its hour (beyond the lateness)."""
    for h in range(HOURS):
        rows: list[dict[str, Any]] = []
        for i, user in enumerate(("a", "b", "c")):
            for k in range(3):
                rows.append(
                    {
                        "user_id": user,
                        "event_type": ("view", "cart", "purchase", "fav")[(h + i + k) % 4],
                        "item_id": f"i{(h + k) % 3}",
                        "category_id": f"c{(h * 7 + i + k) % 4}",
                        "ts": at(h) + timedelta(minutes=10 * k + i),
                    }
                )
        if h >= 2:  # late within the window: an event of hour h-2 arrives now
            rows.append({"user_id": "b", "category_id": "c9", "ts": at(h - 2) + timedelta(minutes=55)})
        if h == 7:  # beyond the window: a view of hour 2 arrives 5 hours late
            rows.append({"user_id": "late", "category_id": "c5", "ts": at(2) + timedelta(minutes=30)})
        lake.write_partition(STAGING, at(h), staged(rows, h), bucket=0)


def assert_equals_rebuild(settings: Settings, hour: datetime) -> None:
    """The committed profiles and interests of ``hour`` equal a rebuild of the bucket from staging."""
    lake = Lake(settings.lake)
    _, state = rebuild_bucket(settings, hour, 0)
    profiles, interests, *_ = snapshot(state, hour + HOUR, settings)
    for name, expected, got, keys in (
        ("profiles", profiles, lake.read(PROFILES, hour, 0), [USER_ID]),
        ("interests", interests, lake.read(INTERESTS, hour, 0), [USER_ID, CATEGORY_ID]),
    ):
        comparison = compare_tables(name, expected, got, keys)
        assert comparison.equal, f"{name} of {hour}: " + "; ".join(comparison.lines())


def tile_rows(lake: Lake, user: str | None = None) -> int:
    """Rows in every tile file of the lake (of ``user`` only when given)."""
    total = 0
    for path in lake.path(STATE_TILES).rglob("*.parquet"):
        column = pq.read_table(path, columns=[USER_ID]).column(USER_ID)
        total += column.length() if user is None else pc.sum(pc.equal(column, user)).as_py() or 0
    return total


@pytest.fixture
def shop(tmp_path: Path) -> Settings:
    settings = replace(BASE, lake=tmp_path / "lake")
    stage_shop(Lake(settings.lake))
    return settings


def test_hourly_builds_with_sealed_tiles_equal_a_rebuild_at_every_hour_and_after_rerunning(shop: Settings) -> None:
    lake = Lake(shop.lake)
    for h in range(HOURS):
        build_profiles(shop, at(h), 0)
        assert_equals_rebuild(shop, at(h))
        state = read_state(lake, at(h), 0)
        for name in BY_HOUR_TABLES:  # every by-hour row is sealed by its hour's build, late rows included
            assert state.tables[name].num_rows == 0, (h, name)
        assert state.sealed is not None and state.sealed.upto_ms == hour_ms(at(h + 1))
    hourly = lake.path(STATE_TILES, "bucket=0", HOURLY)
    assert (hourly / "dt=2026-11-03" / DAY_FILE).is_file()  # day 1 compacted once day 2 began
    assert not list((hourly / "dt=2026-11-03").glob("hour=*.parquet"))
    assert list((hourly / "dt=2026-11-04").glob("hour=*.parquet"))
    sealed = tile_rows(lake)
    assert sealed > 0

    # Rerunning from hour 1 replaces the tiles those hours sealed (in the compacted day too): no stale copy.
    for h in range(1, HOURS):
        build_profiles(shop, at(h), 0)
        assert_equals_rebuild(shop, at(h))
    assert tile_rows(lake) == sealed

    # A range build (checkpoints every 3 hours) seals the same rows and gives the same snapshots.
    bulk = replace(shop, lake=shop.lake.parent / "bulk")
    shutil.copytree(lake.path(STAGING), Lake(bulk.lake).path(STAGING))
    built = build_profiles_range(bulk, T0, at(HOURS - 1), 0, snapshot_every=3)
    for text in built["checkpoints"]:
        hour = datetime.fromisoformat(text)
        comparison = compare_tables(
            "profiles", lake.read(PROFILES, hour, 0), Lake(bulk.lake).read(PROFILES, hour, 0), [USER_ID]
        )
        assert comparison.equal, "; ".join(comparison.lines())


def test_a_checkpoint_that_holds_every_hour_reads_as_before_and_builds_its_next_hour_exactly(shop: Settings) -> None:
    lake = Lake(shop.lake)
    for h in range(6):
        build_profiles(shop, at(h), 0)
    # The layout before sealed tiles: the checkpoint holds every hour, the lake has no tile files.
    _, everything = rebuild_bucket(shop, at(5), 0)
    lake.write_partition(STATE, at(5), everything.tables, bucket=0, dictionary=["event_type"])
    shutil.rmtree(lake.path(STATE_TILES))
    old = read_state(lake, at(5), 0)
    assert old.sealed is None and old.tables == everything.tables
    assert everything.tables[HOURLY].num_rows > 0

    for h in range(6, HOURS):
        build_profiles(shop, at(h), 0)
        assert_equals_rebuild(shop, at(h))
    assert tile_rows(lake) > 0 and read_state(lake, at(HOURS - 1), 0).sealed is not None


def test_retention_drops_tiles_no_kept_checkpoint_reads(tmp_path: Path) -> None:
    settings = replace(BASE, lake=tmp_path / "lake", lateness_hours=2, retention_days=2, start=T0)
    lake = Lake(settings.lake)
    days = 34
    for h in range(days * 24):  # one user, a view every 6 hours, past the 30-day window
        rows = [{"user_id": "a", "category_id": f"c{h % 5}", "ts": at(h) + timedelta(minutes=5)}] if h % 6 == 0 else []
        lake.write_partition(STAGING, at(h), staged(rows, h), bucket=0)
    last = at(days * 24 - 1)
    build_profiles_range(settings, T0, last, 0, snapshot_every=24)
    hourly = lake.path(STATE_TILES, "bucket=0", HOURLY)
    before = sorted(p.name for p in hourly.glob("dt=*"))
    assert before[0] == "dt=2026-11-03"

    result = retention.apply_retention(settings, last + HOUR)

    checkpoint = datetime.fromisoformat(result["rebuild_checkpoint"])
    limit = checkpoint + HOUR - timedelta(days=30)
    after = sorted(p.name for p in hourly.glob("dt=*"))
    gone = [d for d in before if d not in after]
    assert gone and result["deleted"][STATE_TILES]["partitions"] >= len(gone)
    for name in gone:  # only days whose every row is older than the longest window before the checkpoint
        day = datetime.fromisoformat(name.removeprefix("dt=")).replace(tzinfo=UTC)
        assert day + timedelta(days=1) <= limit
    assert any(
        datetime.fromisoformat(d.removeprefix("dt=")).replace(tzinfo=UTC) + timedelta(days=1) > limit for d in after
    )
    # Sealed anchors are read for the latency lookback before the oldest buffered target (the horizon).
    anchors = lake.path(STATE_TILES, "bucket=0", ANCHORS)
    kept = sorted(datetime.fromisoformat(p.name.removeprefix("dt=")).replace(tzinfo=UTC) for p in anchors.glob("dt=*"))
    anchor_limit = checkpoint + HOUR - timedelta(days=30, hours=settings.lateness_hours)
    assert kept[0] > T0 and kept == [kept[0] + timedelta(days=i) for i in range(len(kept))]
    assert kept[0] <= anchor_limit < kept[0] + timedelta(days=1)  # the days before went, none still needed
    # The rebuild starts from the kept checkpoint and its tiles and equals the committed hour.
    assert_equals_rebuild(settings, last)


def test_erasure_removes_the_users_rows_from_sealed_tiles(shop: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PROFILE_ENGINE_EXPORT_KEY", "PROFILE_ENGINE_ERASURE_KEY"):
        monkeypatch.delenv(name, raising=False)
    lake = Lake(shop.lake)
    for h in range(6):
        build_profiles(shop, at(h), 0)
    assert tile_rows(lake, "a") > 0
    assert pc.sum(pc.equal(anchor_tile_rows(lake).column(USER_ID), "a")).as_py()  # sealed anchors too

    result = erasure.erase_users(shop, ["a"], requested_by="test", reason="test")

    assert result["erased"] == 1
    assert tile_rows(lake, "a") == 0 and tile_rows(lake) > 0
    assert not pc.sum(pc.equal(anchor_tile_rows(lake).column(USER_ID), "a")).as_py()
    assert result["rows_removed"][STATE_TILES] > 0
    for h in range(6, HOURS):  # the next hours build on the erased state and tiles
        build_profiles(shop, at(h), 0)
        assert_equals_rebuild(shop, at(h))
    assert "a" not in lake.read(PROFILES, at(HOURS - 1), 0).column(USER_ID).to_pylist()


# ---- sealed anchors: the view -> cart -> purchase anchor buffer ------------------------------------
def anchor_tile_rows(lake: Lake) -> pa.Table:
    """Every sealed anchor row of bucket 0 (with ``sealed_ms``)."""
    files = sorted(lake.path(STATE_TILES, "bucket=0", ANCHORS).rglob("*.parquet"))
    return (
        pa.concat_tables([pq.read_table(f) for f in files])
        if files
        else pa.table({"sealed_ms": pa.array([], pa.int64())})
    )


def stage_latencies(lake: Lake) -> list[dict[str, Any]]:
    """Hours 0..HOURS-1 where carts and purchases find their anchor hours earlier, long sealed: user u views x
    at hour 0 and carts it at hour 6 and 9, a late view of x (hour 5, arriving at hour 7, within the lateness)
    is the anchor of both carts; v views y at hour 1, carts it at hour 2, buys it at hour 8 (its cart, sealed,
    is the anchor) and views z every hour (many anchors of one key). Returns every staged row with its hour."""
    plan: dict[int, list[dict[str, Any]]] = {h: [] for h in range(HOURS)}

    def add(hour: int, arrives: int, **row: Any) -> None:
        plan[arrives].append({**row, "ts": at(hour) + timedelta(minutes=20)})

    add(0, 0, user_id="u", event_type="view", item_id="x")
    add(6, 6, user_id="u", event_type="cart", item_id="x")
    add(5, 7, user_id="u", event_type="view", item_id="x")
    add(9, 9, user_id="u", event_type="cart", item_id="x")
    add(1, 1, user_id="v", event_type="view", item_id="y")
    add(2, 2, user_id="v", event_type="cart", item_id="y")
    add(8, 8, user_id="v", event_type="purchase", item_id="y")
    for h in range(HOURS):
        add(h, h, user_id="v", event_type="view", item_id="z")
    for h, rows in plan.items():
        lake.write_partition(STAGING, at(h), staged(rows, h), bucket=0)
    return [{**r, "hour": h} for h, rows in plan.items() for r in rows]


def test_the_checkpoint_keeps_recent_anchors_only_and_each_hour_seals_no_more_than_its_own(tmp_path: Path) -> None:
    settings = replace(BASE, lake=tmp_path / "lake")
    lake = Lake(settings.lake)
    rows = stage_latencies(lake)
    for h in range(HOURS):
        build_profiles(settings, at(h), 0)
        assert_equals_rebuild(settings, at(h))
        e = hour_ms(at(h + 1))
        horizon = e - settings.lateness_hours * MS_HOUR
        checkpoint = read_state(lake, at(h), 0)
        kept = checkpoint.tables[ANCHORS].column("ts_ms").to_pylist()
        assert all(t >= horizon for t in kept), (h, kept, horizon)  # older anchors are not rewritten hourly
        # a snapshot of the checkpoint as read (its buffered latencies recomputed from memory and tiles)
        comparison = compare_tables(
            "profiles", lake.read(PROFILES, at(h), 0), snapshot(checkpoint, at(h + 1), settings)[0], [USER_ID]
        )
        assert comparison.equal, f"{h}: " + "; ".join(comparison.lines())
        sealed = anchor_tile_rows(lake)
        now = sealed.filter(pc.equal(sealed.column("sealed_ms"), e))
        # what this hour seals is bounded by its own anchors: those that crossed the horizon this hour
        # (or arrived this hour already older than it), at most one row each
        crossed = [
            r
            for r in rows
            if r["event_type"] in ("view", "cart")
            and hour_ms(r["ts"].replace(minute=0)) < horizon
            and (hour_ms(r["ts"].replace(minute=0)) >= horizon - MS_HOUR or r["hour"] == h)
        ]
        assert now.num_rows <= len(crossed), (h, now.to_pylist(), crossed)
    assert anchor_tile_rows(lake).num_rows > 0
    profiles = {r[USER_ID]: r for r in lake.read(PROFILES, at(HOURS - 1), 0).to_pylist()}
    # u: the late view 5:20 is the latest before both carts: 6:20 (1 h) and 9:20 (4 h, the view sealed by then);
    # v: view 1:20 -> cart 2:20 (1 h), cart 2:20 -> purchase 8:20 (6 h): both anchors sealed when their target
    # became final
    assert profiles["u"][MEAN_VIEW_TO_CART_HOURS] == pytest.approx(2.5)
    assert profiles["v"][MEAN_VIEW_TO_CART_HOURS] == pytest.approx(1.0)
    assert profiles["v"][MEAN_CART_TO_PURCHASE_HOURS] == pytest.approx(6.0)


def test_a_checkpoint_whose_anchors_are_all_in_it_builds_its_next_hours_exactly(tmp_path: Path) -> None:
    """A lake written before anchors were sealed (by-hour tiles, every anchor in the checkpoint) keeps working."""
    settings = replace(BASE, lake=tmp_path / "lake")
    lake = Lake(settings.lake)
    stage_latencies(lake)
    for h in range(5):
        build_profiles(settings, at(h), 0)
    _, everything = rebuild_bucket(settings, at(4), 0)
    assert pc.min(everything.tables[ANCHORS].column("ts_ms")).as_py() < hour_ms(at(3))
    state = read_state(lake, at(4), 0)
    lake.write_partition(
        STATE,
        at(4),
        {**state.tables, ANCHORS: everything.tables[ANCHORS]},
        bucket=0,
        dictionary=["event_type"],
        extra={"sealed_tiles": True},
    )
    shutil.rmtree(lake.path(STATE_TILES, "bucket=0", ANCHORS))
    for h in range(5, HOURS):
        build_profiles(settings, at(h), 0)
        assert_equals_rebuild(settings, at(h))
    assert anchor_tile_rows(lake).num_rows > 0


def as_points(sessions: pa.Table) -> pa.Table:
    """A session buffer in the layout before one row per session (``user_id``, ``ts_ms``: one row per event): each
    session's ``n`` points spread evenly from its first to its last, so no two are further apart than its events
    were and grouping them (``read_state``) gives the same session back."""
    users, points = [], []
    columns = (sessions.column(c).to_pylist() for c in ("user_id", "first_ms", "last_ms", "n"))
    for user, first, last, n in zip(*columns, strict=True):
        for k in range(n):
            users.append(user)
            points.append(first + (k * (last - first)) // (n - 1) if n > 1 else first)
    return pa.table({"user_id": pa.array(users, pa.string()), "ts_ms": pa.array(points, pa.int64())})


def write_older_sessions(lake: Lake, hour: datetime, tables: dict[str, pa.Table], sealed: bool) -> None:
    """Commit ``tables`` as the checkpoint of ``hour`` with its session buffer in the older layout (one row per
    event), marked as sealed (``SEALED_MARKER``) or not; reading it gives ``tables`` back."""
    older = {**tables, SESSIONS: as_points(tables[SESSIONS])}
    extra = {SEALED_MARKER: True} if sealed else None
    lake.write_partition(STATE, hour, older, bucket=0, dictionary=["event_type"], extra=extra)
    assert read_state(lake, hour, 0).tables == tables


@pytest.mark.parametrize("sealed", [False, True], ids=["every-hour-in-the-checkpoint", "sealed-tiles"])
def test_an_upgraded_checkpoint_is_marked_sealed_exactly_when_its_content_is(shop: Settings, sealed: bool) -> None:
    """``upgrade_state`` keeps what the checkpoint's marker says about its content: a checkpoint that holds every
    hour (the layout of every older-layout state: the session buffer changed before tiles existed) stays unmarked,
    so its next hour does not add the bucket's tiles to the rows it already holds; a sealed one stays marked, so
    its next hour reads the sealed rows from the tiles. Either way the next hours equal a rebuild."""
    lake = Lake(shop.lake)
    for h in range(6):
        build_profiles(shop, at(h), 0)
    assert tile_rows(lake) > 0  # tiles the hours up to 5 sealed: a marked checkpoint of hour 5 reads them
    if sealed:
        tables = read_state(lake, at(5), 0).tables
    else:
        _, everything = rebuild_bucket(shop, at(5), 0)
        tables = everything.tables
        assert tables[HOURLY].num_rows > read_state(lake, at(5), 0).tables[HOURLY].num_rows
    write_older_sessions(lake, at(5), tables, sealed)

    assert upgrade_state(lake, at(5), 0)

    upgraded = read_state(lake, at(5), 0)
    assert "ts_ms" not in lake.read_named(STATE, at(5), SESSIONS, 0).column_names
    assert bool(lake.manifest(STATE, at(5), 0).get(SEALED_MARKER)) is sealed
    assert (upgraded.sealed is not None) is sealed and upgraded.tables == tables
    for h in range(6, HOURS):
        build_profiles(shop, at(h), 0)
        assert_equals_rebuild(shop, at(h))


def test_an_upgraded_checkpoint_keeps_the_traits_digest_and_the_hour_before_is_read_with_the_snapshot_columns(
    shop: Settings,
) -> None:
    """``upgrade_state`` rewrites a checkpoint's tables, not what its manifest says of them: the digest of the
    declared traits its hour's profiles were taken with (``SNAPSHOT_TRAITS``) stays, so the next hour's snapshot
    still starts from the hour before. That hour's published profiles are read with the snapshot's columns only
    (not the population columns ``publish_profiles`` added)."""
    settings = replace(shop, snapshot_from_previous_min_users=0)
    lake = Lake(settings.lake)
    for h in range(6):
        build_profiles(settings, at(h), 0)
    publish_profiles(settings, at(5))
    manifest = lake.manifest(STATE, at(5), 0)
    tables = read_state(lake, at(5), 0).tables
    older = {**tables, USERS: tables[USERS].drop_columns(["refund_cents"])}  # written before refunds
    extra = {key: manifest[key] for key in (SEALED_MARKER, SNAPSHOT_TRAITS)}
    lake.write_partition(STATE, at(5), older, bucket=0, dictionary=["event_type"], extra=extra)

    assert upgrade_state(lake, at(5), 0)

    assert lake.manifest(STATE, at(5), 0)[SNAPSHOT_TRAITS] == manifest[SNAPSHOT_TRAITS]
    previous = previous_hour(lake, settings, read_state(lake, at(5), 0), lake.read(STAGING, at(6), 0), 0)
    assert previous is not None
    assert lake.read(PROFILES, at(5), 0).num_columns > previous.profiles.num_columns
    assert previous.profiles.column_names == snapshot_schema(load_traits(settings.traits)).names
    build_profiles(settings, at(6), 0)
    assert_equals_rebuild(settings, at(6))


class RecordingConnection:
    """A DuckDB connection that records the SQL of every ``execute`` and ``sql`` call."""

    def __init__(self, con: Any, seen: list[str]) -> None:
        self.con, self.seen = con, seen

    def execute(self, sql: str, *args: Any) -> Any:
        self.seen.append(sql)
        return self.con.execute(sql, *args)

    def sql(self, sql: str, *args: Any) -> Any:
        self.seen.append(sql)
        return self.con.sql(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.con, name)


def record_statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQL every DuckDB connection opened from now on runs (a list filled as they run)."""
    seen: list[str] = []
    cursor = db.cursor
    monkeypatch.setattr(db, "cursor", lambda *a, **k: RecordingConnection(cursor(*a, **k), seen))
    return seen


def anchor_tile_reads(statements: list[str]) -> list[str]:
    """The statements that read sealed anchor tile files."""
    return [s for s in statements if "read_parquet" in s and f"{ANCHORS}/dt=" in s]


def test_the_anchor_tiles_are_read_only_for_targets_without_a_newer_anchor_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """u views x at 0:20 (sealed from hour 2 on) and carts it at 5:30: only the sealed view is its anchor, so the
    hour reads the tiles. w views and carts y in hour 5: the view is in memory, the tiles are not read, not by
    ``advance`` nor by the snapshot of the checkpoint read back (which recomputes the buffered latencies)."""
    settings = replace(BASE, lake=tmp_path / "lake")
    lake = Lake(settings.lake)
    rows = {h: [{"user_id": "v", "item_id": "z", "ts": at(h) + timedelta(minutes=5)}] for h in range(7)}
    rows[0].append({"user_id": "u", "item_id": "x", "ts": at(0) + timedelta(minutes=20)})
    for h, hour_rows in rows.items():
        lake.write_partition(STAGING, at(h), staged(hour_rows, h), bucket=0)
    for h in range(5):
        build_profiles(settings, at(h), 0)
    state = read_state(lake, at(4), 0)
    assert anchor_tile_rows(lake).num_rows > 0 and state.sealed is not None
    w_rows = [
        {"user_id": "w", "item_id": "y", "ts": at(5) + timedelta(minutes=10)},
        {"user_id": "w", "item_id": "y", "event_type": "cart", "ts": at(5) + timedelta(minutes=20)},
    ]
    u_cart = {"user_id": "u", "item_id": "x", "event_type": "cart", "ts": at(5) + timedelta(minutes=30)}
    seen = record_statements(monkeypatch)
    w_only = advance(state, staged([*rows[5], *w_rows], 5), at(6), settings)
    assert anchor_tile_reads(seen) == []
    with_u = advance(state, staged([*rows[5], *w_rows, u_cart], 5), at(6), settings)
    assert anchor_tile_reads(seen), seen
    profiles = {r[USER_ID]: r for r in snapshot(with_u, at(6), settings)[0].to_pylist()}
    assert profiles["u"][MEAN_VIEW_TO_CART_HOURS] == pytest.approx(5 + 10 / 60)
    assert profiles["w"][MEAN_VIEW_TO_CART_HOURS] == pytest.approx(10 / 60)
    # the checkpoints read back: w's buffered cart needs no tile, u's does
    monkeypatch.undo()
    lake.write_partition(STAGING, at(5), staged([*rows[5], *w_rows], 5), bucket=0)
    build_profiles(settings, at(5), 0)
    checkpoint = read_state(lake, at(5), 0)
    seen = record_statements(monkeypatch)
    expected = snapshot(w_only, at(6), settings)[0]
    got = snapshot(checkpoint, at(6), settings)[0]
    assert anchor_tile_reads(seen) == []
    assert compare_tables("profiles", expected, got, [USER_ID]).equal
    monkeypatch.undo()
    lake.write_partition(STAGING, at(6), staged([*rows[6], u_cart], 6), bucket=0)
    build_profiles(settings, at(6), 0)
    seen = record_statements(monkeypatch)
    profiles = {r[USER_ID]: r for r in snapshot(read_state(lake, at(6), 0), at(7), settings)[0].to_pylist()}
    assert anchor_tile_reads(seen), seen
    assert profiles["u"][MEAN_VIEW_TO_CART_HOURS] == pytest.approx(5 + 10 / 60)  # the cart arrived an hour late


def _stage_a_late_view(lake: Lake, late: int, hours: int) -> None:
    """Stage ``hours`` hours of bucket 0: u views x at 0:20, again at 0:10 arriving in hour ``late`` with a cart
    of x at ``late``:30; v views z every hour (the hours move on)."""
    plan: dict[int, list[dict[str, Any]]] = {h: [] for h in range(hours)}
    plan[0].append({"user_id": "u", "item_id": "x", "ts": at(0) + timedelta(minutes=20)})
    plan[late].append({"user_id": "u", "item_id": "x", "ts": at(0) + timedelta(minutes=10)})
    plan[late].append({"user_id": "u", "item_id": "x", "event_type": "cart", "ts": at(late) + timedelta(minutes=30)})
    for h in range(hours):
        plan[h].append({"user_id": "v", "item_id": "z", "ts": at(h) + timedelta(minutes=5)})
        lake.write_partition(STAGING, at(h), staged(plan[h], h), bucket=0)


def test_a_late_anchor_in_memory_older_than_a_sealed_one_does_not_hide_it(tmp_path: Path) -> None:
    """Sealed anchors are older than the horizon of their checkpoint, not older than every anchor in memory: a view
    arriving beyond the lateness (ts 0:10, in hour 5) is in memory, the later view 0:20 only in the tiles. The
    cart at 5:30 takes 0:20, as a rebuild and a state that never sealed do."""
    settings = replace(BASE, lake=tmp_path / "lake")
    lake = Lake(settings.lake)
    _stage_a_late_view(lake, 5, 9)
    for h in range(9):
        build_profiles(settings, at(h), 0)
        if h >= 5:
            profiles = {r[USER_ID]: r for r in lake.read(PROFILES, at(h), 0).to_pylist()}
            assert profiles["u"][MEAN_VIEW_TO_CART_HOURS] == pytest.approx(5 + 10 / 60), h
    assert anchor_tile_rows(lake).num_rows > 0


def test_a_longer_lateness_after_sealing_does_not_hide_a_sealed_anchor(tmp_path: Path) -> None:
    """Tiles sealed with a lateness of 1 hour hold the view at 0:20; the lateness is then raised to 4 hours and a
    view at 0:10 arrives in hour 4 with a cart at 4:30. The in-memory view is older than the sealed one although
    it is within the new lateness of the tiles' end: the cart takes 0:20 (a bound of the sealed anchors taken
    from the current lateness would let the in-memory view hide it)."""
    short = replace(BASE, lake=tmp_path / "lake", lateness_hours=1)
    longer = replace(short, lateness_hours=4)
    lake = Lake(short.lake)
    _stage_a_late_view(lake, 4, 6)
    for h in range(4):
        build_profiles(short, at(h), 0)
    assert anchor_tile_rows(lake).num_rows > 0  # the view at 0:20 is sealed
    for h in (4, 5):
        build_profiles(longer, at(h), 0)
        profiles = {r[USER_ID]: r for r in lake.read(PROFILES, at(h), 0).to_pylist()}
        assert profiles["u"][MEAN_VIEW_TO_CART_HOURS] == pytest.approx(4 + 10 / 60), h


def test_tile_files_are_sorted_by_trait_and_hour_in_small_row_groups_and_still_equal_a_rebuild(
    shop: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Row groups of 4 rows here, so a scan of one trait or hour can skip the others' by their statistics.
    monkeypatch.setattr(build_module, "TILE_ROW_GROUP", 4)
    lake = Lake(shop.lake)
    for h in range(HOURS):
        build_profiles(shop, at(h), 0)
    assert_equals_rebuild(shop, at(HOURS - 1))

    def check() -> set[tuple[str, bool]]:
        checked = set()
        for name, order in build_module.TILE_ORDER.items():
            for path in sorted(lake.path(STATE_TILES, "bucket=0", name).rglob("*.parquet")):
                table = pq.read_table(path)
                assert table.equals(table.sort_by([(c, "ascending") for c in order])), path
                meta = pq.ParquetFile(path).metadata
                assert meta.num_row_groups == -(-meta.num_rows // 4), path
                # every column dictionary-encoded: the changed users' pick decodes user ids (and the rest) from
                # dictionary pages (BENCHMARKS.md, "By-hour tiles dictionary-encoded")
                for i in range(meta.num_columns):
                    assert all(meta.row_group(g).column(i).has_dictionary_page for g in range(meta.num_row_groups)), (
                        path,
                        meta.schema.column(i).name,
                    )
                checked.add((name, path.name == DAY_FILE))
        return checked

    assert check() == {(n, d) for n in build_module.TILE_ORDER for d in (True, False)}
    # An erasure rewrites the files holding the user in the same order and row groups' size.
    for name in ("PROFILE_ENGINE_EXPORT_KEY", "PROFILE_ENGINE_ERASURE_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert erasure.erase_users(shop, ["b"], requested_by="test", reason="test")["rows_removed"][STATE_TILES] > 0
    assert tile_rows(lake, "b") == 0
    check()


# ---- the by-hour tables sealed every hour (issue 19) ------------------------------------------------------------
def test_a_checkpoint_holding_its_recent_by_hour_rows_reads_right_and_its_next_hour_seals_them(
    shop: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint with the marker written when the by-hour rows were sealed at the lateness horizon (the
    recent hours in it, the older in tiles) reads as before; the next hour seals those rows once."""
    lake = Lake(shop.lake)
    with monkeypatch.context() as older:  # the rule before: every table sealed at the lateness horizon
        older.setattr(build_module, "seal_before", lambda name, e, settings: e - settings.lateness_hours * MS_HOUR)
        for h in range(6):
            build_profiles(shop, at(h), 0)
    kept = read_state(lake, at(5), 0)
    assert kept.sealed is not None and all(kept.tables[name].num_rows > 0 for name in BY_HOUR_TABLES)
    assert_equals_rebuild(shop, at(5))
    before = tile_rows(lake)

    build_profiles(shop, at(6), 0)
    after = read_state(lake, at(6), 0)
    assert all(after.tables[name].num_rows == 0 for name in BY_HOUR_TABLES)
    assert tile_rows(lake) > before + sum(kept.tables[name].num_rows for name in BY_HOUR_TABLES)
    for h in range(6, HOURS):
        if h > 6:
            build_profiles(shop, at(h), 0)
        assert_equals_rebuild(shop, at(h))


# Every aggregation kind, windows short enough for the late rows to re-touch hours inside and leaving them.
EVERY_KIND = """
version: 1
traits:
  - {name: views, events: [view], aggregation: count, windows: [1h, 3h]}
  - {name: spend, events: [purchase, refund], aggregation: sum, of: value, windows: [2h, 24h]}
  - {name: seen, events: [view, cart], aggregation: distinct_count, of: item_id, windows: [1h, 4h]}
  - {name: heat, events: [view, cart], aggregation: decayed_count, half_life: 2h, windows: [3h]}
  - {name: last_cat, events: [view, cart], aggregation: last, of: category_id, windows: [2h, 24h]}
  - {name: last_price, events: [purchase], aggregation: last, of: price, windows: [3h]}
  - {name: top_cat, events: [view, purchase], aggregation: count, group_by: category_id, windows: [2h, 5h]}
  - {name: top_spend, events: [purchase], aggregation: sum, of: value, group_by: item_id, windows: [3h]}
  - {name: items_by_cat, events: [view], aggregation: distinct_count, of: item_id, group_by: category_id, windows: [3h]}
"""


def stage_retouching(lake: Lake) -> None:
    """Hours 0..HOURS-1 of three users; from hour 1 on, an event of every type of each of the last two hours
    (within the lateness of 2 h) arrives with the same user, item and category as a row of that hour (the same
    by-hour keys, sealed already), at its hour's last minute (the latest of that hour: a new ``last``); at hours
    7 and 9, events of hour 2 arrive 5 and 7 hours late (beyond the lateness), of one user."""
    types = ("view", "cart", "purchase", "fav", "refund", "remove_cart")
    for h in range(HOURS):
        rows: list[dict[str, Any]] = []
        for i, user in enumerate(("a", "b", "c")):
            for k in range(4):
                rows.append(
                    {
                        "user_id": user,
                        "event_type": types[(h + i + k) % len(types)],
                        "item_id": f"i{(h + k) % 3}",
                        "category_id": f"c{(h + i + k) % 3}",
                        "price": 2.0 + h + k,
                        "quantity": -1 if types[(h + i + k) % len(types)] == "refund" else 1,
                        "ts": at(h) + timedelta(minutes=10 * k + i),
                    }
                )
        for back in (1, 2):
            if h >= back:
                for j, kind in enumerate(types):
                    rows.append(
                        {
                            "user_id": ("a", "b")[j % 2],
                            "event_type": kind,
                            "item_id": f"i{(h - back + j) % 3}",
                            "category_id": f"c{(h - back + j) % 3}",
                            "price": 7.0 + back,
                            "quantity": -2 if kind == "refund" else 2,
                            "ts": at(h - back) + timedelta(minutes=59, seconds=j),
                        }
                    )
        # Beyond the lateness: events of hour 2 of a user without others (sessions, orders and latencies an event
        # that late belongs to may differ from a rebuild, docs/features.md), every type at hour 7, then at hour 9
        # views of the same keys an hour-2 session later (rows of keys sealed by hour 7's build).
        for j, kind in enumerate(types if h == 7 else ("view", "view") if h == 9 else ()):
            rows.append(
                {
                    "user_id": "late",
                    "event_type": kind,
                    "item_id": f"i{j % 3}" if h == 9 else f"i{(2 + j) % 3}",
                    "category_id": f"c{j % 3}" if h == 9 else f"c{(2 + j) % 3}",
                    "price": 11.0,
                    "quantity": -1 if kind == "refund" else 3,
                    "ts": at(2) + timedelta(minutes=59 if h == 9 else 1, seconds=j),
                }
            )
        lake.write_partition(STAGING, at(h), staged(rows, h), bucket=0)


@pytest.mark.parametrize("from_previous", [False, True], ids=["full-snapshot", "snapshot-from-the-hour-before"])
def test_late_rows_of_sealed_hours_equal_a_rebuild_at_every_hour_for_every_trait_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, from_previous: bool
) -> None:
    """Every by-hour row is sealed by its hour's build; late events within and beyond the lateness add rows of
    keys sealed already (in the tiles of a later hour), and every hour equals a rebuild, for every aggregation
    kind of the declared traits, with the snapshot in full or started from the hour before."""
    traits = tmp_path / "traits.yaml"
    traits.write_text(EVERY_KIND)
    assert {t.aggregation for t in load_traits(traits)} >= {"count", "sum", "distinct_count", "decayed_count", "last"}
    settings = replace(
        BASE, lake=tmp_path / "lake", traits=traits, snapshot_from_previous_min_users=0 if from_previous else 10**9
    )
    if from_previous:
        monkeypatch.setattr(snapshot_module, "MOST_CHANGED", 1.0)
    lake = Lake(settings.lake)
    stage_retouching(lake)
    used = 0
    for h in range(HOURS):
        built = build_profiles(settings, at(h), 0)
        used += bool(built["snapshot_from_previous_hour"])
        assert_equals_rebuild(settings, at(h))
        assert all(read_state(lake, at(h), 0).tables[name].num_rows == 0 for name in BY_HOUR_TABLES)
    assert used == (HOURS - 1 if from_previous else 0)
    # the late rows are extra rows of keys sealed before: some key has rows in several tiles
    tiles = pa.concat_tables(
        pq.read_table(p).drop_columns(["sealed_ms"])
        for p in lake.path(STATE_TILES, "bucket=0", "trait_tiles").rglob("*.parquet")
    )
    keys = ["user_id", "trait", "hour_ms", "grp", "val"]
    assert tiles.group_by(keys).aggregate([("n", "count")]).num_rows < tiles.num_rows


# ---- the day's compaction (issue 19: an hour that costs what happened in it) ------------------------------------
DAY = datetime(2026, 11, 3, tzinfo=UTC)


def tile_table(name: str, hour: datetime, seed: int, rows: int = 40) -> pa.Table:
    """Rows of table ``name`` sealed by ``hour``'s build: mostly of that hour, some late ones of the hours before
    (the day before too), several traits, keys repeated within and across hours (ties of ``TILE_ORDER``)."""
    rng = random.Random(seed)
    fields = STATE_SCHEMAS[name]
    hours = [hour_ms(hour - timedelta(hours=k)) for k in (0, 0, 0, 1, 2, 20)]
    columns: dict[str, list[Any]] = {}
    for f in fields:
        if f.name == "hour_ms":
            values: list[Any] = [rng.choice(hours) for _ in range(rows)]
        elif f.name == "trait":
            values = [rng.choice(["views", "spend", "seen", "last_cat"]) for _ in range(rows)]
        elif pa.types.is_string(f.type):
            values = [f"{f.name}{rng.randrange(5)}" for _ in range(rows)]
        elif pa.types.is_floating(f.type):
            values = [rng.random() for _ in range(rows)]
        else:
            values = [rng.randrange(hours[-1], hours[0] + MS_HOUR) for _ in range(rows)]
        columns[f.name] = values
    columns["user_id"] = [f"s{seed}r{i}" for i in range(rows)]  # every row told apart: the order is checked
    table = pa.table(columns, schema=fields)
    return table.append_column("sealed_ms", pa.array([hour_ms(hour + HOUR)] * rows, pa.int64()))


def seal_hour(lake: Lake, name: str, hour: datetime, rows: pa.Table, after: int | None = None) -> None:
    e = hour_ms(hour + HOUR)
    table_dir = lake.path(STATE_TILES, "bucket=0", name)
    after = hour_ms(hour) if after is None else after
    build_module.write_tiles(lake, table_dir, hour, after, e, rows, build_module.TILE_DICTIONARY[name])


def assert_written_as_sorted_whole(path: Path, rows: pa.Table, name: str, like: Path) -> None:
    """``path`` holds ``rows`` in the order a stable sort of them by ``TILE_ORDER`` gives (as they are without one),
    with ``like``'s schema and encodings, in row groups of ``TILE_ROW_GROUP`` rows (the last one fewer)."""
    order = build_module.TILE_ORDER.get(name)
    expected = rows.sort_by([(c, "ascending") for c in order]) if order else rows
    got = pq.read_table(path)
    assert got.schema.equals(pq.read_schema(like), check_metadata=True)
    assert got.equals(expected)
    meta, model = pq.ParquetFile(path).metadata, pq.ParquetFile(like).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    size = build_module.TILE_ROW_GROUP
    assert sizes == [size] * (len(rows) // size) + ([len(rows) % size] if len(rows) % size else [])
    for c in range(meta.num_columns):
        assert meta.row_group(0).column(c).encodings == model.row_group(0).column(c).encodings


@pytest.mark.parametrize("name", [HOURLY, ITEM_VIEWS, TRAIT_TILES, ANCHORS])
def test_the_day_file_holds_the_hourly_files_sorted_whole_without_reading_one_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The 00:00 hour compacts the day before: the day file equals what sorting the concatenated hourly files
    gives (rows, order, schema, encodings, row groups), though no file (nor the day) is read whole; a rerun of an
    hour of that day rewrites the day file the same way."""
    monkeypatch.setattr(build_module, "TILE_ROW_GROUP", 7)
    lake = Lake(tmp_path / "lake")
    hours = [0, 1, 2, 5, 11, 23]
    sealed = {h: tile_table(name, DAY + timedelta(hours=h), seed=h) for h in hours}
    for h in hours:
        seal_hour(lake, name, DAY + timedelta(hours=h), sealed[h])
    day = lake.path(STATE_TILES, "bucket=0", name, f"dt={DAY:%Y-%m-%d}")
    hourly = sorted(day.glob("hour=*.parquet"))
    assert len(hourly) == len(hours)
    whole = pa.concat_tables(pq.read_table(p) for p in hourly)
    like = tmp_path / "like.parquet"
    shutil.copy(hourly[0], like)

    with monkeypatch.context() as whole_reads:
        whole_reads.setattr(pq, "read_table", lambda *a, **k: pytest.fail("a tile file read whole"))
        seal_hour(lake, name, DAY + timedelta(days=1), tile_table(name, DAY + timedelta(days=1), seed=99))
    assert sorted(p.name for p in day.iterdir()) == [DAY_FILE]
    assert_written_as_sorted_whole(day / DAY_FILE, whole, name, like)

    # a rerun of 05:00 replaces the rows it sealed in the day file (the rows kept first, then the new ones)
    rerun = tile_table(name, DAY + timedelta(hours=5), seed=55, rows=30)
    kept = whole.filter(pc.not_equal(whole.column("sealed_ms"), hour_ms(DAY + timedelta(hours=6))))
    with monkeypatch.context() as whole_reads:
        whole_reads.setattr(pq, "read_table", lambda *a, **k: pytest.fail("a tile file read whole"))
        seal_hour(lake, name, DAY + timedelta(hours=5), rerun)
    assert_written_as_sorted_whole(day / DAY_FILE, pa.concat_tables([kept, rerun]), name, like)


def test_hourly_files_written_unsorted_before_the_order_are_compacted_sorted_all_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tile files written before ``TILE_ORDER`` (one row group, unsorted): the day file is the same as from
    sorted ones."""
    monkeypatch.setattr(build_module, "TILE_ROW_GROUP", 7)
    lake = Lake(tmp_path / "lake")
    day = lake.path(STATE_TILES, "bucket=0", TRAIT_TILES, f"dt={DAY:%Y-%m-%d}")
    day.mkdir(parents=True)
    tables = [tile_table(TRAIT_TILES, DAY + timedelta(hours=h), seed=h) for h in (3, 4, 9)]
    for h, table in zip((3, 4, 9), tables, strict=True):
        pq.write_table(
            table,
            day / f"hour={h:02d}.parquet",
            use_dictionary=build_module.TILE_DICTIONARY[TRAIT_TILES],
            compression="zstd",
        )
    like = tmp_path / "like.parquet"
    shutil.copy(day / "hour=03.parquet", like)
    seal_hour(lake, TRAIT_TILES, DAY + timedelta(days=1), tile_table(TRAIT_TILES, DAY + timedelta(days=1), seed=9))
    assert sorted(p.name for p in day.iterdir()) == [DAY_FILE]
    assert_written_as_sorted_whole(day / DAY_FILE, pa.concat_tables(tables), TRAIT_TILES, like)


def test_splitting_rows_to_seal_equals_two_filters_and_passes_whole_pieces_on_without_a_copy() -> None:
    """``split_rows`` (what ``seal_state`` seals and what the checkpoint keeps) equals filtering by the mask and
    by its inverse, in order, nulls dropped from both; a piece whose rows all go one way is the same buffers."""
    rng = random.Random(19)
    pieces, masks = [], []
    for kind in ("all", "none", "mixed", "nulls", "empty", "none", "mixed"):
        n = 0 if kind == "empty" else rng.randint(1, 50)
        pieces.append(
            pa.table(
                {
                    USER_ID: pa.array([f"u{rng.randint(0, 9)}" for _ in range(n)], pa.string()),
                    "ts_ms": pa.array([rng.randint(0, 100) for _ in range(n)], pa.int64()),
                }
            )
        )
        if kind == "mixed":
            bits: list[bool | None] = [rng.random() < 0.5 for _ in range(n)]
        elif kind == "nulls":
            bits = [None if rng.random() < 0.3 else rng.random() < 0.5 for _ in range(n)]
        else:
            bits = [kind == "all"] * n
        masks.append(pa.array(bits, pa.bool_()))
    table = pa.concat_tables(pieces)
    # the mask chunked as the table, or in one chunk (what a comparison of a chunked column gives)
    for mask in (pa.chunked_array(masks, pa.bool_()), pa.chunked_array([pa.concat_arrays(masks)])):
        true, false = build_module.split_rows(table, mask)
        assert true.equals(table.filter(mask)) and false.equals(table.filter(pc.invert(mask)))
        assert true.num_rows + false.num_rows == table.num_rows - mask.null_count
        passed = {c.buffers()[2].address for t in (true, false) for c in t.column(USER_ID).chunks if c.buffers()[2]}
        assert pieces[0].column(USER_ID).chunk(0).buffers()[2].address in passed  # all true: not copied
        assert pieces[1].column(USER_ID).chunk(0).buffers()[2].address in passed  # all false: not copied
    empty_true, empty_false = build_module.split_rows(table.schema.empty_table(), pa.chunked_array([], pa.bool_()))
    assert empty_true.num_rows == empty_false.num_rows == 0 and empty_true.schema == table.schema


def test_checkpoint_files_are_written_without_column_statistics_and_tiles_with_them(shop: Settings) -> None:
    """A checkpoint's files are only ever read whole: no footer statistics (their cost is wasted). The sealed
    tiles keep theirs: scans skip row groups by them."""
    for h in range(2):
        build_profiles(shop, at(h), 0)
    lake = Lake(shop.lake)
    state_files = sorted(lake.partition(STATE, at(1), 0).glob("*.parquet"))
    tile_files = sorted(lake.path(STATE_TILES).rglob("*.parquet"))
    assert state_files and tile_files
    for path in state_files:
        meta = pq.read_metadata(path)
        assert all(
            not meta.row_group(g).column(c).is_stats_set
            for g in range(meta.num_row_groups)
            for c in range(meta.num_columns)
        ), path.name
    for path in tile_files:
        meta = pq.read_metadata(path)
        assert meta.num_rows == 0 or meta.row_group(0).column(0).is_stats_set, path
