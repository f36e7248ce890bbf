"""Tests of the event simulator: purity, realism, landing layout, defects and ground truth."""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profile_engine.contracts.events import CART, EVENT_SCHEMA, EVENT_TYPES, PURCHASE, REFUND, VIEW
from profile_engine.hours import hour_range, parse_hour
from profile_engine.lake.storage import LANDING, TRUTH, Lake
from profile_engine.sources.simulate import (
    DEFECT_KINDS,
    EMPTY_ITEM_ID,
    EMPTY_USER_ID,
    FILE_DEFECT_KINDS,
    FUTURE_TS,
    LATE_FILE,
    MALFORMED_KINDS,
    NEGATIVE_PRICE,
    ON_TIME,
    RESENT_FILE,
    TOO_LATE_FILE,
    TRUTH_DEFECTS,
    TRUTH_FILES,
    TRUTH_PROPENSITY,
    UNKNOWN_EVENT_TYPE,
    UNKNOWN_TYPE,
    ZERO_QUANTITY,
    SimulationSummary,
    landing_plan,
    simulate,
    simulate_hour,
)

# Seed 24 from this hour has every file defect kind within the first 24 arrival hours.
SEED = 24
FIRST = parse_hour("2026-11-07T00")
HOURS = 48
LAST = FIRST + timedelta(hours=HOURS - 1)
USERS = 2000  # the demo default
ORIGIN = FIRST - timedelta(days=10)
PATH_RE = re.compile(r"^dt=\d{4}-\d{2}-\d{2}/hour=\d{2}/[^/]+\.parquet$")


def _landing_files(lake: Lake) -> list[Path]:
    return sorted(p for p in lake.path(LANDING).rglob("*") if p.is_file())


def _snapshot(lake: Lake) -> dict[str, tuple[str, int]]:
    """Relative landing path -> (sha256, mtime in ns) of every landing file."""
    base = lake.path(LANDING)
    return {
        str(p.relative_to(base)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in _landing_files(lake)
    }


def _event_hours(files: pd.Series) -> pd.Series:
    """Event hour from landing file names (``sim-YYYYmmddTHH-...``)."""
    return pd.to_datetime(files.str.split("-").str[1], format="%Y%m%dT%H", utc=True)


def _truth(lake: Lake, name: str, first: datetime, last: datetime) -> pa.Table:
    return pa.concat_tables([lake.read_named(TRUTH, h, name) for h in hour_range(first, last)])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Lake, SimulationSummary]:
    """Two days of a small world, simulated once for the read-only tests."""
    lake = Lake(tmp_path_factory.mktemp("lake"))
    summary = simulate(lake, FIRST, LAST, users=USERS, seed=SEED, origin=ORIGIN)
    return lake, summary


@pytest.fixture(scope="module")
def landed(world: tuple[Lake, SimulationSummary]) -> pa.Table:
    """Every landing row with its file name and arrival hour."""
    lake, _ = world
    tables = []
    for path in _landing_files(lake):
        table = pq.read_table(path)
        arrival = datetime.strptime(f"{path.parent.parent.name}{path.parent.name}", "dt=%Y-%m-%dhour=%H")
        tables.append(
            table.append_column("file", pa.array([path.name] * table.num_rows)).append_column(
                "arrival_hour", pa.array([arrival.replace(tzinfo=UTC)] * table.num_rows, pa.timestamp("ms", tz="UTC"))
            )
        )
    return pa.concat_tables(tables)


# ---- determinism ------------------------------------------------------------------
def test_same_seed_gives_identical_rows_and_another_seed_does_not() -> None:
    hour = FIRST + timedelta(hours=18)

    first = simulate_hour(hour, users=300, seed=3)
    again = simulate_hour(hour, users=300, seed=3)
    other = simulate_hour(hour, users=300, seed=4)

    assert first.num_rows > 0
    assert first.equals(again)
    assert not first.equals(other)


def test_hour_by_hour_writes_the_same_files_and_truth_as_one_range(tmp_path: Path) -> None:
    whole, single = Lake(tmp_path / "whole"), Lake(tmp_path / "single")
    last = FIRST + timedelta(hours=47)

    summary = simulate(whole, FIRST, last, users=300, seed=SEED, origin=ORIGIN)
    parts = [simulate(single, h, h, users=300, seed=SEED, origin=ORIGIN) for h in hour_range(FIRST, last)]

    assert all(summary.defects[kind] > 0 for kind in FILE_DEFECT_KINDS)  # the case is not trivial
    assert _snapshot(whole) == _snapshot(single)
    for name in (TRUTH_PROPENSITY, TRUTH_DEFECTS, TRUTH_FILES):
        assert _truth(whole, name, FIRST, last).equals(_truth(single, name, FIRST, last))
    assert summary.files == sum(p.files for p in parts) == len(_snapshot(whole))
    assert summary.events == sum(p.events for p in parts)
    assert summary.defects == {k: sum(p.defects[k] for p in parts) for k in DEFECT_KINDS}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(split=st.integers(min_value=0, max_value=4), seed=st.integers(min_value=0, max_value=2**31))
def test_adjacent_ranges_compose(split: int, seed: int) -> None:
    first, last = FIRST + timedelta(hours=8), FIRST + timedelta(hours=13)
    middle = first + timedelta(hours=split)
    with tempfile.TemporaryDirectory() as tmp:
        whole, pieces = Lake(Path(tmp) / "whole"), Lake(Path(tmp) / "pieces")

        simulate(whole, first, last, users=80, seed=seed)
        simulate(pieces, first, middle, users=80, seed=seed)
        simulate(pieces, middle + timedelta(hours=1), last, users=80, seed=seed)

        assert _snapshot(whole) == _snapshot(pieces)


# ---- realism ------------------------------------------------------------------------
def test_funnel_rates_are_realistic(landed: pa.Table) -> None:
    counts = Counter(landed.column("event_type").to_pylist())

    assert set(EVENT_TYPES) <= set(counts)
    assert 0.005 <= counts[PURCHASE] / counts[VIEW] <= 0.05
    assert counts[VIEW] > counts[CART] > counts[PURCHASE] > 0


def test_orders_have_lines_with_shared_order_id_and_mostly_quantity_one(landed: pa.Table) -> None:
    purchases = landed.filter(pc.equal(landed["event_type"], PURCHASE))
    refunds = landed.filter(pc.equal(landed["event_type"], REFUND))
    others = landed.filter(pc.invert(pc.is_in(landed["event_type"], pa.array([PURCHASE, REFUND]))))
    lines = Counter(purchases.column("order_id").to_pylist())
    quantities = Counter(purchases.column("quantity").to_pylist())

    assert purchases.column("order_id").null_count == 0
    assert others.column("order_id").null_count == others.num_rows
    assert max(lines.values()) >= 2  # some orders have several lines
    assert quantities[1] / purchases.num_rows >= 0.7
    # cancellations: a few lines of those orders given back, with negative quantity
    assert 0 < refunds.num_rows < 0.1 * purchases.num_rows
    assert set(refunds.column("order_id").to_pylist()) <= set(lines)
    assert max(refunds.column("quantity").to_pylist()) <= -1


def test_fewer_events_at_local_night_than_in_the_afternoon(landed: pa.Table) -> None:
    berlin = ZoneInfo("Europe/Berlin")
    local_hours = Counter(ts.astimezone(berlin).hour for ts in landed.column("ts").to_pylist())

    night = sum(local_hours[h] for h in (1, 2, 3, 4))
    afternoon = sum(local_hours[h] for h in (14, 15, 16, 17))

    assert night * 3 < afternoon


def test_prices_depend_on_the_category_and_are_in_cents(landed: pa.Table) -> None:
    clean = landed.filter(pc.greater(landed["price"], 0)).to_pandas()

    medians = clean.groupby("category_id")["price"].median()

    assert np.allclose(clean["price"], clean["price"].round(2))
    assert medians.max() / medians.min() > 2


def test_purchasers_have_higher_latent_propensity(world: tuple[Lake, SimulationSummary], landed: pa.Table) -> None:
    lake, _ = world
    truth = _truth(lake, TRUTH_PROPENSITY, FIRST, LAST).to_pandas()
    per_user = truth.groupby("user_id")["propensity"].mean()
    buyers = set(landed.filter(pc.equal(landed["event_type"], PURCHASE)).column("user_id").to_pylist())
    visitors = set(landed.column("user_id").to_pylist()) - buyers - {""}

    assert per_user[sorted(buyers - {""})].mean() > per_user[sorted(visitors)].mean()


def test_users_arrive_over_time_and_dormant_users_have_no_sessions(world: tuple[Lake, SimulationSummary]) -> None:
    lake, _ = world
    truth = _truth(lake, TRUTH_PROPENSITY, FIRST, LAST).to_pandas()
    per_hour = truth.groupby("hour").size()

    assert per_hour.is_monotonic_increasing and per_hour.iloc[-1] > per_hour.iloc[0]  # new users signed up
    assert per_hour.iloc[-1] < USERS  # and more are still to come
    assert truth["dormant"].any()
    assert (truth.loc[truth["dormant"], "sessions"] == 0).all()
    assert truth["propensity"].between(0, 1).all()


# ---- landing layout ------------------------------------------------------------------
def test_landing_holds_only_event_files_in_zero_padded_arrival_partitions(
    world: tuple[Lake, SimulationSummary],
) -> None:
    lake, summary = world
    base = lake.path(LANDING)
    files = _landing_files(lake)

    assert len(files) == summary.files > HOURS
    for path in files:
        relative = str(path.relative_to(base))
        assert PATH_RE.match(relative), relative
        assert pq.read_schema(path) == EVENT_SCHEMA
        arrival = datetime.strptime(f"{path.parent.parent.name}{path.parent.name}", "dt=%Y-%m-%dhour=%H")
        start = arrival.replace(tzinfo=UTC).timestamp()
        assert start <= path.stat().st_mtime < start + 3600, relative
    assert not list(base.rglob("_manifest.json"))
    assert not any(p.is_file() for p in lake.path("_tmp").rglob("*"))


def test_truth_is_committed_apart_from_landing(world: tuple[Lake, SimulationSummary]) -> None:
    lake, _ = world

    assert all(lake.committed(TRUTH, h) for h in hour_range(FIRST, LAST))
    assert not lake.path(LANDING).joinpath("simulator").exists()
    assert set(lake.path().iterdir()) <= {lake.path("landing"), lake.path("simulator"), lake.path("_tmp")}


def test_files_hold_one_event_hour_and_never_arrive_before_it(landed: pa.Table) -> None:
    rows = landed.select(["ts", "arrival_hour", "file"]).to_pandas()
    event_hour = _event_hours(rows["file"])
    ts_hour = rows["ts"].dt.floor("h")

    # a ts a day ahead is a malformed row (checked with the defects)
    assert ((ts_hour == event_hour) | (ts_hour == event_hour + timedelta(days=1))).all()
    assert (rows["arrival_hour"] >= event_hour).all()
    assert (rows["arrival_hour"] == event_hour).mean() > 0.9


# ---- defects -------------------------------------------------------------------------
def test_malformed_rows_are_few_and_all_recorded_in_truth(
    world: tuple[Lake, SimulationSummary], landed: pa.Table
) -> None:
    lake, summary = world
    truth = _truth(lake, TRUTH_DEFECTS, FIRST, LAST).to_pandas()
    files = _truth(lake, TRUTH_FILES, FIRST, LAST).to_pandas()
    rows = landed.to_pandas()
    event_hour = _event_hours(rows["file"])
    observed = {
        EMPTY_USER_ID: rows["user_id"] == "",
        EMPTY_ITEM_ID: rows["item_id"] == "",
        UNKNOWN_TYPE: rows["event_type"] == UNKNOWN_EVENT_TYPE,
        NEGATIVE_PRICE: rows["price"] < 0,
        ZERO_QUANTITY: rows["quantity"] == 0,
        FUTURE_TS: rows["ts"] >= event_hour + timedelta(days=1),
    }
    # The truth covers event hours FIRST..LAST; original files of those hours that landed:
    covered = ~rows["file"].str.endswith("-resend.parquet") & event_hour.between(FIRST, LAST)
    landed_ids = set(rows.loc[covered, "event_id"])

    share = len(truth) / files["rows"].sum()
    assert 0.0005 <= share <= 0.008
    assert len(truth) > 0 and set(truth["kind"]) <= set(MALFORMED_KINDS)
    for kind, mask in observed.items():
        recorded = set(truth.loc[truth["kind"] == kind, "event_id"]) & landed_ids
        assert set(rows.loc[mask & covered, "event_id"]) == recorded, kind
        assert summary.defects[kind] == int(mask.sum()), kind
    assert sum(int(m.sum()) for m in observed.values()) == int(pd.concat(observed, axis=1).any(axis=1).sum())


def test_every_malformed_kind_appears_in_a_busy_hour_at_a_small_share() -> None:
    events = simulate_hour(FIRST + timedelta(hours=18), users=20_000, seed=SEED, intensity=5.0).to_pandas()
    hour = FIRST + timedelta(hours=18)

    found = {
        EMPTY_USER_ID: (events["user_id"] == "").sum(),
        EMPTY_ITEM_ID: (events["item_id"] == "").sum(),
        UNKNOWN_TYPE: (events["event_type"] == UNKNOWN_EVENT_TYPE).sum(),
        NEGATIVE_PRICE: (events["price"] < 0).sum(),
        ZERO_QUANTITY: (events["quantity"] == 0).sum(),
        FUTURE_TS: (events["ts"] >= hour + timedelta(days=1)).sum(),
    }

    assert len(events) > 10_000
    assert all(n > 0 for n in found.values()), found
    assert 0.0005 <= sum(found.values()) / len(events) <= 0.006


def test_late_too_late_and_resent_files_land_where_the_truth_says(
    world: tuple[Lake, SimulationSummary], landed: pa.Table
) -> None:
    lake, summary = world
    files = _truth(lake, TRUTH_FILES, FIRST, LAST - timedelta(hours=24)).to_pylist()
    landed_at = {(r["file"], r["arrival_hour"]) for r in landed.select(["file", "arrival_hour"]).to_pylist()}

    kinds = Counter(f["kind"] for f in files)
    for planned in files:
        name, arrival = planned["file"], planned["arrival_hour"]
        event_hour = datetime.strptime(name.split("-")[1], "%Y%m%dT%H").replace(tzinfo=UTC)
        lag = (arrival - event_hour) // timedelta(hours=1)
        assert (name, arrival) in landed_at
        if planned["kind"] == ON_TIME:
            assert lag == 0
        elif planned["kind"] == LATE_FILE:
            assert 1 <= lag <= 3
        elif planned["kind"] == TOO_LATE_FILE:
            assert lag > 24
        else:
            assert planned["kind"] == RESENT_FILE and planned["original"]
    assert kinds[ON_TIME] > 5 * sum(kinds[k] for k in FILE_DEFECT_KINDS)  # a small share
    assert all(summary.defects[k] > 0 for k in FILE_DEFECT_KINDS)


def test_event_ids_are_unique_except_for_resent_copies(landed: pa.Table) -> None:
    resent = landed.filter(pc.ends_with(landed["file"], "-resend.parquet"))
    originals = landed.filter(pc.invert(pc.ends_with(landed["file"], "-resend.parquet")))

    assert resent.num_rows > 0
    assert pc.count_distinct(originals["event_id"]).as_py() == originals.num_rows
    assert set(resent.column("event_id").to_pylist()) <= set(originals.column("event_id").to_pylist())


def test_resent_file_is_a_byte_identical_copy(world: tuple[Lake, SimulationSummary]) -> None:
    lake, _ = world
    copies = [p for p in _landing_files(lake) if p.name.endswith("-resend.parquet")]
    by_name = {p.name: p for p in _landing_files(lake)}

    assert copies
    for copy in copies:
        original = by_name.get(copy.name.replace("-resend", ""))
        if original is not None:  # the original may have arrived before the first simulated hour
            assert copy.read_bytes() == original.read_bytes()
            assert copy.stat().st_mtime_ns > original.stat().st_mtime_ns


def test_without_defects_everything_is_clean_and_on_time(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    last = FIRST + timedelta(hours=11)

    summary = simulate(lake, FIRST, last, users=300, seed=SEED, defects=False)
    rows = pa.concat_tables(pq.read_table(p) for p in _landing_files(lake))

    assert summary.defects == dict.fromkeys(DEFECT_KINDS, 0)
    assert set(rows.column("event_type").to_pylist()) <= set(EVENT_TYPES)
    assert pc.min(rows["quantity"]).as_py() >= 1 and pc.min(rows["price"]).as_py() > 0
    assert pc.count_distinct(rows["event_id"]).as_py() == rows.num_rows
    assert not any(p.name.endswith("-resend.parquet") for p in _landing_files(lake))
    assert _truth(lake, TRUTH_DEFECTS, FIRST, last).num_rows == 0
    for hour in hour_range(FIRST, last):
        assert all(planned.kind == ON_TIME for planned in landing_plan(hour, seed=SEED, defects=False))


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="users"):
        simulate(Lake(tmp_path), FIRST, FIRST, users=0, seed=1)
    with pytest.raises(ValueError, match="before"):
        simulate(Lake(tmp_path), FIRST, FIRST - timedelta(hours=1), users=10, seed=1)


# ---- invariants of generated hours ---------------------------------------------------
@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**40),
    users=st.integers(min_value=20, max_value=400),
    offset=st.integers(min_value=0, max_value=24 * 60),
)
def test_generated_hours_keep_the_funnel_and_the_contract(seed: int, users: int, offset: int) -> None:
    hour = FIRST + timedelta(hours=offset)
    # A purchase's cart may have happened up to two hours earlier in the same session.
    tables = [simulate_hour(hour - timedelta(hours=k), users=users, seed=seed, defects=False) for k in (2, 1, 0)]
    events = pa.concat_tables(tables).to_pandas()
    current = tables[-1].to_pandas()

    assert tables[-1].schema == EVENT_SCHEMA
    assert current["event_id"].is_unique
    assert ((current["ts"] >= hour) & (current["ts"] < hour + timedelta(hours=1))).all()
    carts = events[events["event_type"] == CART]
    bought = current[current["event_type"] == PURCHASE]
    joined = bought.merge(carts, on=["session_id", "item_id", "user_id"], suffixes=("", "_cart"))
    assert set(bought["event_id"]) == set(joined.loc[joined["ts_cart"] <= joined["ts"], "event_id"])
    assert (bought.groupby("order_id")["session_id"].nunique() == 1).all()
