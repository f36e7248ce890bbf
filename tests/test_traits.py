"""Declared traits: loading and refusing specs, tiles merged by ``advance``, window values equal to the same
aggregate computed by hand over the staged events (hourly path and rebuild, late events), docs table."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profile_engine.config import Settings
from profile_engine.contracts.events import EVENT_TYPES, REFUND
from profile_engine.contracts.profiles import USER_ID, profile_schema, snapshot_schema
from profile_engine.contracts.traits import (
    DEFAULT_TRAITS_PATH,
    Trait,
    TraitConfigError,
    load_traits,
    traits_markdown,
)
from profile_engine.hours import HOUR, floor_hour
from profile_engine.lake.storage import STAGING, STATE, Lake
from profile_engine.profiles import snapshot as snapshot_module
from profile_engine.profiles.build import build_profiles, read_state
from profile_engine.profiles.merge import advance, rebuild
from profile_engine.profiles.population import population_snapshot
from profile_engine.profiles.snapshot import snapshot
from profile_engine.profiles.state import TRAIT_TILES, empty_state
from profile_engine.quality.suites import ProfileValidationError, validate_profiles
from profile_engine.segments.rules import known_columns
from tests.test_features import (
    PROPERTY_SETTINGS,
    T0,
    assert_snapshots_from_the_hour_before_equal_full_ones,
    at,
    events,
    hourly_chain,
)

ROOT = Path(__file__).resolve().parents[1]
HOUR_END = T0 + HOUR
USER_TRAITS = """
version: 1
traits:
  - name: views
    events: [view]
    aggregation: count
    windows: [1h, 24h, 7d]
  - name: spend
    events: [purchase, refund]
    aggregation: sum
    of: value
    windows: [24h, 30d]
  - name: units
    events: [purchase]
    aggregation: sum
    of: quantity
    windows: [7d]
  - name: viewed_items
    events: [view, cart]
    aggregation: distinct_count
    of: item_id
    windows: [24h, 7d]
  - name: last_cart_item
    events: [cart]
    aggregation: last
    of: item_id
    windows: [24h]
  - name: last_price
    events: [view, purchase]
    aggregation: last
    of: price
    windows: [7d]
  - name: heat
    events: [view, cart]
    aggregation: decayed_count
    half_life: 6h
    windows: [24h]
  - name: top_viewed
    events: [view]
    aggregation: count
    group_by: category_id
    windows: [7d]
  - name: top_spend
    events: [purchase]
    aggregation: sum
    of: value
    group_by: category_id
    windows: [30d]
  - name: items_by_category
    events: [view]
    aggregation: distinct_count
    of: item_id
    group_by: category_id
    windows: [24h]
"""


@pytest.fixture(scope="module")
def user_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("traits") / "traits.yaml"
    path.write_text(USER_TRAITS)
    return path


def cfg_for(path: Path | None) -> Settings:
    return Settings(lateness_hours=6, traits=path)


# ---- the reference: the same aggregates by hand, in Python, over the staged events ---------------
def cents(amount: float) -> int:
    return math.floor(abs(amount) * 100 + 0.5) * (1 if amount >= 0 else -1)


def reference(trait: Trait, rows: list[dict[str, Any]], end: datetime) -> dict[str, dict[str, Any]]:
    """Column -> user -> value of ``trait`` as of ``end`` over staged ``rows`` (every user of ``rows``)."""
    out: dict[str, dict[str, Any]] = {}
    users = {r["user_id"] for r in rows if r["ts"] < end}
    for window, hours in trait.windows:
        start = floor_hour(end) - timedelta(hours=hours)
        for user in users:
            picked = [
                r for r in rows if r["user_id"] == user and start <= r["ts"] < end and r["event_type"] in trait.events
            ]
            # an event whose aggregated column (a sum's price) is null adds nothing, not even a group
            needed = "price" if trait.of in ("value", "price") else trait.of
            picked = [r for r in picked if needed is None or r[needed] is not None]
            if trait.group_by is not None:
                picked = [r for r in picked if r[trait.group_by] is not None]
                groups = sorted({r[trait.group_by] for r in picked})
                values = {g: aggregate(trait, [r for r in picked if r[trait.group_by] == g], end) for g in groups}
                top = min(groups, key=lambda g: (-values[g], g)) if groups else None
                out.setdefault(trait.column(window), {})[user] = top
                out.setdefault(trait.value_column(window), {})[user] = values[top] if top is not None else None
            else:
                out.setdefault(trait.column(window), {})[user] = aggregate(trait, picked, end)
    return out


def aggregate(trait: Trait, rows: list[dict[str, Any]], end: datetime) -> Any:
    if trait.aggregation == "count":
        return len(rows)
    if trait.aggregation == "sum":
        if trait.of == "quantity":
            return sum(r["quantity"] for r in rows)
        priced = [r for r in rows if r["price"] is not None]
        amount = (lambda r: r["price"] * r["quantity"]) if trait.of == "value" else (lambda r: r["price"])
        return sum(cents(amount(r)) for r in priced) / 100
    of = str(trait.of)
    if trait.aggregation == "distinct_count":
        return len({r[of] for r in rows if r[of] is not None})
    if trait.aggregation == "decayed_count":
        half_life = float(trait.half_life_hours or 0) * 3600
        return sum(2 ** (-(end - r["ts"]).total_seconds() / half_life) for r in rows)
    with_value = [r for r in rows if r[of] is not None]
    return max(with_value, key=lambda r: (r["ts"], r["event_id"]))[of] if with_value else None


def assert_traits_match(
    profiles: pa.Table, rows: list[dict[str, Any]], end: datetime, traits: tuple[Trait, ...]
) -> None:
    by_user = {r[USER_ID]: r for r in profiles.to_pylist()}
    for trait in traits:
        for column, expected in reference(trait, rows, end).items():
            for user, value in expected.items():
                got = by_user[user][column]
                if isinstance(value, float) and got is not None:
                    assert got == pytest.approx(value, rel=1e-9, abs=1e-6), f"{column} of {user} at {end}"
                else:
                    assert got == value, f"{column} of {user} at {end}: got {got!r}, by hand {value!r}"


# ---- loading -------------------------------------------------------------------------------------
def test_defaults_load_and_name_no_hand_written_column() -> None:
    traits = load_traits()
    columns = [c for t in traits for c, _ in t.columns()]

    assert traits and all(c.startswith("trait_") for c in columns)
    assert snapshot_schema(traits).names[-len(columns) :] == columns
    assert len(set(snapshot_schema(traits).names)) == len(snapshot_schema(traits))


def test_a_user_file_adds_replaces_and_disables_defaults(tmp_path: Path) -> None:
    defaults = load_traits()
    path = tmp_path / "t.yaml"
    path.write_text(
        f"version: 1\ndisable: [{defaults[0].name}]\ntraits:\n"
        f"  - {{name: {defaults[1].name}, events: [view], aggregation: count, windows: [1h]}}\n"
        "  - {name: new_one, events: [fav], aggregation: count, windows: [2d]}\n"
    )

    traits = load_traits(path)

    names = [t.name for t in traits]
    assert defaults[0].name not in names and names[-2:] == [defaults[1].name, "new_one"]
    assert traits[-1].windows == (("2d", 48),)
    assert Settings.from_env({"PROFILE_ENGINE_TRAITS": str(path)}).traits == path.resolve()


BASE = "name: t, events: [view], aggregation: count, windows: [24h]"


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("{" + BASE + ", colour: red}", "unknown key"),
        ("{name: t, events: [view], aggregation: count}", "missing windows"),
        ("{name: T-1, events: [view], aggregation: count, windows: [24h]}", "lower_snake_case"),
        ("{name: t, events: [click], aggregation: count, windows: [24h]}", "event types"),
        ("{name: t, events: [view], aggregation: median, windows: [24h]}", "aggregation 'median'"),
        ("{name: t, events: [view], aggregation: sum, windows: [24h]}", "sum needs 'of'"),
        ("{name: t, events: [view], aggregation: sum, of: colour, windows: [24h]}", "sum needs 'of'"),
        ("{name: t, events: [view], aggregation: distinct_count, of: price, windows: [24h]}", "distinct_count needs"),
        ("{" + BASE + ", of: item_id}", "takes no 'of'"),
        ("{name: t, events: [view], aggregation: decayed_count, windows: [24h]}", "needs 'half_life'"),
        ("{" + BASE + ", half_life: 6h}", "half_life is for decayed_count"),
        ("{name: t, events: [view], aggregation: count, windows: [24x]}", "not a duration"),
        ("{name: t, events: [view], aggregation: count, windows: [24h, 1d]}", "repeat a length"),
        ("{name: t, events: [view], aggregation: count, windows: [91d]}", "longer than the limit"),
        ("{" + BASE + ", group_by: price}", "group_by 'price'"),
        (
            "{name: t, events: [view], aggregation: last, of: item_id, group_by: category_id, windows: [1h]}",
            "no top group",
        ),
    ],
)
def test_a_bad_spec_is_refused_with_the_file_the_trait_and_the_reason(tmp_path: Path, entry: str, reason: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"version: 1\ntraits:\n  - {entry}\n")

    with pytest.raises(TraitConfigError) as raised:
        load_traits(path)

    message = str(raised.value)
    assert str(path) in message and reason in message
    assert "trait 't'" in message or "trait 'T-1'" in message


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("version: 1\ntraits:\n  - {" + BASE + "}\n  - {" + BASE + "}\n", "trait 't': declared twice"),
        ("version: 2\ntraits: []\n", "version: 1"),
        ("version: 1\ntraits: [\n", "cannot read traits"),
        ("version: 1\ndisable: [no_such]\n", "disable names no default trait"),
        ("version: 1\nextra: 1\n", "unknown top-level key"),
        (
            "version: 1\ntraits:\n  - {name: a, events: [view], aggregation: count, group_by: category_id, windows: [1h]}\n"
            "  - {name: a_1h, events: [view], aggregation: count, windows: [value]}\n",
            "not a duration",
        ),
    ],
)
def test_a_bad_file_is_refused_naming_it(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)

    with pytest.raises(TraitConfigError, match=reason) as raised:
        load_traits(path)

    assert str(path) in str(raised.value)


def test_a_missing_user_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(TraitConfigError, match="cannot read traits") as raised:
        load_traits(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(raised.value)


# ---- values equal the aggregate by hand --------------------------------------------------------
def scenario() -> tuple[pa.Table, list[datetime]]:
    """Three days of two users with late events (staged up to the lateness after their hour)."""
    rows, staged = [], []
    for i in range(120):
        hour = (i * 7) % 70
        ts = at(hours=hour, minutes=(i * 13) % 60, ms=i)
        event_type = EVENT_TYPES[i % len(EVENT_TYPES)]
        rows.append(
            {
                "user_id": f"u{i % 2}",
                "event_type": event_type,
                "item_id": f"i{i % 5}",
                "category_id": None if i % 11 == 0 else f"c{i % 3}",
                "price": None if i % 9 == 0 else (i % 40) + 0.25,
                "quantity": (1 + i % 3) * (-1 if event_type == REFUND else 1),
                "ts": ts,
            }
        )
        staged.append(floor_hour(ts) + HOUR * (0 if i % 4 else min(6, i % 7)))  # every 4th arrives late
    return events(*rows), staged


@pytest.mark.parametrize("end_hours", [24, 49, 76])
def test_traits_equal_the_aggregates_by_hand_hourly_and_rebuilt(user_file: Path, end_hours: int) -> None:
    cfg = cfg_for(user_file)
    traits = load_traits(user_file)
    table, staged = scenario()
    end = at(hours=end_hours)
    merged = [r for r, s in zip(table.to_pylist(), staged, strict=True) if s < end]

    hourly = snapshot(hourly_chain(table, staged, T0, end, cfg), end, cfg)[0]
    rebuilt = snapshot(rebuild(table.filter(pa.array([s < end for s in staged])), end, cfg), end, cfg)[0]

    assert hourly.schema == snapshot_schema(traits)
    assert_traits_match(hourly, merged, end, traits)
    assert_traits_match(rebuilt, merged, end, traits)


@st.composite
def streams(draw: st.DrawFn) -> tuple[pa.Table, list[datetime], int]:
    hours = draw(st.integers(2, 60))
    rows, staged = [], []
    for _ in range(draw(st.integers(1, 40))):
        ts = at(hours=draw(st.integers(0, hours - 1)), minutes=draw(st.integers(0, 59)), ms=draw(st.integers(0, 9)))
        event_type = draw(st.sampled_from(EVENT_TYPES))
        rows.append(
            {
                "user_id": draw(st.sampled_from(["a", "b", "c"])),
                "event_type": event_type,
                "item_id": draw(st.sampled_from(["i1", "i2", "i3"])),
                "category_id": draw(st.sampled_from(["c1", "c2", None])),
                "price": draw(st.sampled_from([None, 0.99, 10.0, 123.45])),
                "quantity": draw(st.integers(1, 3)) * (-1 if event_type == REFUND else 1),
                "ts": ts,
            }
        )
        staged.append(floor_hour(ts) + HOUR * draw(st.sampled_from([0, 0, 1, 6])))  # late within the lateness
    return events(*rows), staged, hours


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams())
def test_property_hourly_and_rebuilt_traits_equal_the_aggregates_by_hand(
    user_file: Path, stream: tuple[pa.Table, list[datetime], int]
) -> None:
    cfg = cfg_for(user_file)
    traits = load_traits(user_file)
    table, staged, hours = stream
    end = at(hours=hours)
    merged = [r for r, s in zip(table.to_pylist(), staged, strict=True) if s < end]

    state = hourly_chain(table, staged, T0, end, cfg)
    rebuilt = rebuild(table.filter(pa.array([s < end for s in staged])), end, cfg)

    assert_traits_match(snapshot(state, end, cfg)[0], merged, end, traits)
    assert_traits_match(snapshot(rebuilt, end, cfg)[0], merged, end, traits)


# ---- tiles: pruning, adding and removing a trait, older states ------------------------------------
def test_tiles_are_pruned_after_the_longest_window(user_file: Path) -> None:
    cfg = cfg_for(user_file)
    longest = max(h for t in load_traits(user_file) for _, h in t.windows)
    state = rebuild(events({"ts": at(minutes=5)}, {"ts": at(hours=longest - 1, minutes=5)}), at(hours=longest), cfg)
    first, last = (int(at(hours=h).timestamp()) * 1000 for h in (0, longest - 1))

    assert pc.unique(state.tables[TRAIT_TILES].column("hour_ms")).to_pylist() == [first, last]
    later = advance(state, events().slice(0, 0), at(hours=longest + 1), cfg)
    assert pc.unique(later.tables[TRAIT_TILES].column("hour_ms")).to_pylist() == [last]


def test_an_added_trait_starts_at_the_hour_it_was_added_and_a_rebuild_fills_it(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("version: 1\ntraits: []\n")
    cfg = cfg_for(path)
    table = events({"ts": at(minutes=5)}, {"ts": at(hours=1, minutes=5)}, {"ts": at(hours=2, minutes=5)})
    staged = [floor_hour(t) for t in table.column("ts").to_pylist()]
    before = hourly_chain(table, staged, T0, at(hours=2), cfg)

    path.write_text("version: 1\ntraits:\n  - {name: v, events: [view], aggregation: count, windows: [24h]}\n")
    after = advance(before, table.slice(2), at(hours=3), cfg)

    assert snapshot(after, at(hours=3), cfg)[0].column("trait_v_24h").to_pylist() == [1]
    assert snapshot(rebuild(table, at(hours=3), cfg), at(hours=3), cfg)[0].column("trait_v_24h").to_pylist() == [3]
    path.write_text("version: 1\ntraits: []\n")
    removed = advance(after, table.slice(0, 0), at(hours=4), cfg)
    keys = removed.tables[TRAIT_TILES].column("trait").to_pylist()
    assert keys and not [k for k in keys if k.startswith("v:")]  # the defaults' tiles stay
    assert not [c for c in snapshot(removed, at(hours=4), cfg)[0].column_names if c.startswith("trait_v")]


def test_a_changed_definition_starts_new_tiles_instead_of_mixing(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("version: 1\ntraits:\n  - {name: v, events: [view], aggregation: count, windows: [24h]}\n")
    cfg = cfg_for(path)
    state = rebuild(events({"ts": at(minutes=5)}), at(hours=1), cfg)

    path.write_text("version: 1\ntraits:\n  - {name: v, events: [cart], aggregation: count, windows: [24h]}\n")
    later = advance(state, events({"ts": at(hours=1, minutes=5), "event_type": "cart"}), at(hours=2), cfg)

    assert snapshot(later, at(hours=2), cfg)[0].column("trait_v_24h").to_pylist() == [1]


def test_an_older_state_without_tiles_reads_as_empty(tmp_path: Path, user_file: Path) -> None:
    cfg = replace(cfg_for(user_file), lake=tmp_path, buckets=1, start=T0)
    lake = Lake(tmp_path)
    lake.write_partition(STAGING, T0, events({"ts": at(minutes=5)}), bucket=0)
    build_profiles(cfg, T0, 0)
    (lake.partition(STATE, T0, 0) / f"{TRAIT_TILES}.parquet").unlink()

    state = read_state(lake, T0, 0)

    assert state.tables[TRAIT_TILES].num_rows == 0
    assert snapshot(advance(state, events().slice(0, 0), at(hours=2), cfg), at(hours=2), cfg)[0].num_rows == 1


def test_an_empty_state_has_no_tiles() -> None:
    assert empty_state().tables[TRAIT_TILES].num_rows == 0


# ---- docs, CLI and segments ------------------------------------------------------------------------
def test_docs_hold_the_table_of_the_shipped_traits() -> None:
    assert traits_markdown(load_traits()) in (ROOT / "docs" / "features.md").read_text()
    assert DEFAULT_TRAITS_PATH.is_file()


def test_cli_prints_the_loaded_traits(user_file: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "profile_engine", "traits"],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT / "include"), "PROFILE_ENGINE_TRAITS": str(user_file), "PATH": ""},
    )
    assert result.stdout == traits_markdown(load_traits(user_file))


def test_segment_rules_may_use_trait_columns(user_file: Path) -> None:
    columns = known_columns(load_traits(user_file))

    assert "trait_views_24h" in columns and "trait_top_viewed_7d_value" in columns


def test_the_profile_suite_checks_trait_counts_and_keeps_every_trait_column(user_file: Path) -> None:
    cfg = cfg_for(user_file)
    traits = load_traits(user_file)
    profiles = population_snapshot(
        [snapshot(rebuild(events({"ts": at(minutes=5)}), HOUR_END, cfg), HOUR_END, cfg)[0]], T0, traits
    )
    broken = profiles.set_column(
        profiles.schema.get_field_index("trait_views_24h"), "trait_views_24h", pa.array([-1], pa.int64())
    )

    assert profiles.schema == profile_schema(traits)
    assert validate_profiles(profiles, T0)["rows"] == 1
    with pytest.raises(ProfileValidationError, match="trait_views_24h"):
        validate_profiles(broken, T0, traits)


def test_publishing_parts_built_with_other_traits_is_refused_naming_the_columns(user_file: Path) -> None:
    cfg = cfg_for(user_file)
    part = snapshot(rebuild(events({"ts": at(minutes=5)}), HOUR_END, cfg), HOUR_END, cfg)[0]
    older = part.select([n for n in part.column_names if not n.startswith("trait_views")])

    with pytest.raises(ValueError, match=r"part 1\) lack column\(s\) \['trait_views_1h'"):
        population_snapshot([part, older], T0, load_traits(user_file))


def test_window_values_from_tiles_where_a_user_lacks_some_traits(user_file: Path) -> None:
    """``trait_ctes`` over hand-made tiles: a distinct count (its own grouping of latest hours per value)
    counts a value once per window it has a tile in, skips nulls and tiles older than its longest window;
    a user with tiles of one kind of trait only gets 0 (counts) and null (last values) for the others."""
    from profile_engine.hours import MS_HOUR
    from profile_engine.lake.db import cursor as connect
    from profile_engine.profiles.state import STATE_SCHEMAS, tiled
    from profile_engine.profiles.traits import trait_ctes

    traits = tiled(load_traits(user_file))  # those read from item_views have no tiles
    distinct = next(t for t in traits if t.aggregation == "distinct_count" and t.group_by is None)
    count = next(t for t in traits if t.aggregation == "count" and t.group_by is None)
    last = next(t for t in traits if t.aggregation == "last" and t.of == "item_id")
    (short, short_h), (long, long_h) = distinct.windows
    e = 1_000 * MS_HOUR
    rows = [  # user, trait, hours before e (the tile's hour starts then), val, n, last_ms, last_id, last_str
        ("a", distinct, 1, "i1", 2, None, None, None),
        ("a", distinct, long_h, "i1", 1, None, None, None),  # i1 again, older: one value in both windows
        ("a", distinct, short_h + 1, "i2", 1, None, None, None),  # outside the short window only
        ("a", distinct, long_h + 1, "i3", 1, None, None, None),  # older than every window
        ("a", distinct, 2, None, 1, None, None, None),  # a null value counts nothing
        ("b", count, 3, None, 4, None, None, None),  # no distinct tiles
        ("b", last, 3, None, 1, e - 3 * MS_HOUR, "ev1", "x9"),
        ("c", distinct, long_h + 1, "i4", 1, None, None, None),  # only tiles outside every window
    ]
    tiles = pa.table(
        {
            "user_id": [r[0] for r in rows],
            "trait": [r[1].key for r in rows],
            "hour_ms": [e - r[2] * MS_HOUR for r in rows],
            "grp": [None] * len(rows),
            "val": [r[3] for r in rows],
            "n": [r[4] for r in rows],
            "total": [None] * len(rows),
            "decayed": [None] * len(rows),
            "last_ms": [r[5] for r in rows],
            "last_id": [r[6] for r in rows],
            "last_num": [None] * len(rows),
            "last_str": [r[7] for r in rows],
        },
        schema=STATE_SCHEMAS[TRAIT_TILES],
    )
    ctes, cols = trait_ctes(traits, e, "tiles")
    con = connect()
    try:
        con.register("tiles", tiles)
        with_ = ", ".join(f"{name} AS ({sql})" for name, sql in ctes.items())
        joins = " ".join(f"LEFT JOIN {name} USING (user_id)" for name in ctes)
        got = {
            r["user_id"]: r
            for r in con.sql(
                f"WITH {with_} SELECT u.user_id, {', '.join(f'{x} AS {c}' for c, x in cols.items())} "
                f"FROM (SELECT DISTINCT user_id FROM tiles) u {joins}"
            )
            .to_arrow_table()
            .to_pylist()
        }
    finally:
        con.close()

    assert {u: (got[u][distinct.column(short)], got[u][distinct.column(long)]) for u in "abc"} == {
        "a": (1, 2),
        "b": (0, 0),
        "c": (0, 0),
    }
    assert [got[u][count.column(count.windows[-1][0])] for u in "abc"] == [0, 4, 0]
    assert [got[u][last.column(last.windows[0][0])] for u in "abc"] == [None, "x9", None]


# ---- distinct counts of viewed items: read from item_views, no tiles of their own -------------------
ITEM_VIEW_TRAITS = """
version: 1
traits:
  - name: seen
    events: [view]
    aggregation: distinct_count
    of: item_id
    windows: [5h, 50h]
  - name: seen_or_carted
    events: [view, cart]
    aggregation: distinct_count
    of: item_id
    windows: [24h]
  - name: seen_month
    events: [view]
    aggregation: distinct_count
    of: item_id
    windows: [30d]
  - name: seen_categories
    events: [view]
    aggregation: distinct_count
    of: category_id
    windows: [24h]
"""


@pytest.fixture(scope="module")
def item_view_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("item_view_traits") / "traits.yaml"
    path.write_text(ITEM_VIEW_TRAITS)
    return path


def test_distinct_items_viewed_within_a_week_come_from_item_views_and_keep_no_tiles(item_view_file: Path) -> None:
    """A distinct count of the items viewed, ungrouped, whose windows all fit the repeat-view table
    (``item_views``, 7 days) is read from it: the same (user, item, hour) rows its tiles would hold. Its
    values equal the aggregate by hand (hourly path and rebuild); every other trait keeps its tiles."""
    cfg = cfg_for(item_view_file)
    traits = load_traits(item_view_file)
    table, staged = scenario()
    end = at(hours=76)
    merged = [r for r, s in zip(table.to_pylist(), staged, strict=True) if s < end]

    hourly_state = hourly_chain(table, staged, T0, end, cfg)
    rebuilt_state = rebuild(table.filter(pa.array([s < end for s in staged])), end, cfg)

    for state in (hourly_state, rebuilt_state):
        keys = {k.split(":")[0] for k in state.tables[TRAIT_TILES].column("trait").to_pylist()}
        assert "seen" not in keys and "items_viewed" not in keys  # the shipped default is one of them
        assert {"seen_or_carted", "seen_month", "seen_categories"} <= keys
        assert_traits_match(snapshot(state, end, cfg)[0], merged, end, traits)


@pytest.mark.parametrize("seed", [1, 2])
def test_distinct_items_viewed_from_the_hour_before_equal_full_snapshots_at_their_bounds(
    item_view_file: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """The crossing rule reads ``item_views`` at the bounds of those traits' windows (5h, 50h: bounds of no
    other window the snapshot reads), so a user whose viewed item left such a window is computed again, not
    moved on from the hour before."""
    monkeypatch.setattr(snapshot_module, "MOST_CHANGED", 1.0)
    assert_snapshots_from_the_hour_before_equal_full_ones(seed, replace(PROPERTY_SETTINGS, traits=item_view_file))
