"""Tests of profile_engine.profiles.verify: the table comparison, and ``verify`` on a temporary lake
(clean hours, a deliberately corrupted committed snapshot, retention, gaps) and its CLI."""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import tempfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profile_engine.cli import EXIT_INPUT_ERROR, main
from profile_engine.config import Settings
from profile_engine.contracts.events import EVENT_TYPES, STAGED_SCHEMA
from profile_engine.contracts.profiles import USER_ID
from profile_engine.hours import format_hour
from profile_engine.ingest import events as ingest
from profile_engine.lake.storage import INTERESTS, PROFILES, STAGING, STATE, TMP, Lake
from profile_engine.ops import erasure
from profile_engine.profiles import replay
from profile_engine.profiles import snapshot as snapshot_module
from profile_engine.profiles.build import build_profiles, publish_profiles, read_staged
from profile_engine.profiles.replay import rebuild_bucket
from profile_engine.profiles.snapshot import snapshot
from profile_engine.profiles.verify import compare_tables, verify_hour, verify_hours
from tests.test_features import assert_matches_reference

T0 = datetime(2026, 11, 2, tzinfo=UTC)
HOURS = 4


def at(hours: float = 0, minutes: float = 0) -> datetime:
    return T0 + timedelta(hours=hours, minutes=minutes)


def table(**columns: Any) -> pa.Table:
    return pa.table(columns)


# ---- compare_tables ------------------------------------------------------------------
def test_equal_tables_within_the_relative_tolerance() -> None:
    expected = table(user_id=["a", "b"], x=[1.0, None], n=[1, 2], s=["p", None])
    actual = table(user_id=["b", "a"], x=[None, 1.0 + 1e-12], n=[2, 1], s=[None, "p"])  # other row order

    result = compare_tables("t", expected, actual, ["user_id"])

    assert result.equal and result.lines() == []


def test_differences_name_the_column_the_rows_and_the_values() -> None:
    expected = table(user_id=["a", "b", "c"], x=[1.0, 2.0, 3.0], n=[1, 2, 3], s=["p", "q", None])
    actual = table(user_id=["a", "b", "d"], x=[1.0 + 1e-6, 2.0, 3.0], n=[1, None, 3], s=["p", "q", "r"])

    result = compare_tables("t", expected, actual, ["user_id"])

    assert not result.equal
    assert result.missing_keys == ["c"] and result.extra_keys == ["d"]
    assert {d.column: d.rows for d in result.columns} == {"x": 1, "n": 1}
    assert result.columns[0].examples == [("a", 1.0, 1.0 + 1e-6)]
    assert result.columns[1].examples == [("b", 2, None)]
    text = "\n".join(result.lines())
    assert "t.x: 1 rows differ" in text and "t.n: 1 rows differ" in text and "'c'" in text


def test_schema_problems_and_composite_keys() -> None:
    expected = table(user_id=["a", "a"], category_id=["c1", "c2"], affinity=[1.0, 2.0])
    actual = table(user_id=["a", "a"], category_id=["c2", "c1"], affinity=[2.0, 1.5], extra=[1, 2])

    result = compare_tables("interests", expected, actual, ["user_id", "category_id"])
    retyped = compare_tables("t", table(k=["a"], n=[1]), table(k=["a"], n=["1"]), ["k"])

    assert [d.column for d in result.columns] == ["affinity"] and result.columns[0].examples[0][0] == "a\x1fc1"
    assert result.schema_problems == ["unexpected column extra in the committed table"]
    assert retyped.schema_problems == ["column n is string, expected int64"] and not retyped.equal


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.none(), min_size=1, max_size=20),
    factor=st.floats(min_value=-1e-10, max_value=1e-10),
)
def test_a_table_equals_itself_and_relative_noise_below_tolerance(values: list[float | None], factor: float) -> None:
    keys = [f"u{i}" for i in range(len(values))]
    noisy = [v * (1 + factor) if v is not None and math.isfinite(v) else v for v in values]
    base = table(user_id=keys, x=pa.array(values, pa.float64()))

    same = compare_tables("t", base, base, ["user_id"])
    close = compare_tables("t", base, table(user_id=keys, x=pa.array(noisy, pa.float64())), ["user_id"])

    assert same.equal and close.equal


# ---- verify on a lake -------------------------------------------------------------------
def stage(lake: Lake, hours: range, buckets: int) -> None:
    """Staged partitions for ``hours``: late events, clock skew, an empty bucket-hour, users in both buckets."""
    rng = random.Random(11)
    for h in hours:
        for bucket in range(buckets):
            users = [f"b{bucket}u{i}" for i in range(3)]
            rows = [
                {
                    "event_id": f"h{h}b{bucket}e{i}",
                    "user_id": rng.choice(users),
                    "event_type": rng.choice(EVENT_TYPES),
                    "item_id": rng.choice(["i1", "i2"]),
                    "category_id": rng.choice(["c1", "c2", None]),
                    "price": rng.choice([None, 1.5, 20.0]),
                    "quantity": 1,
                    "order_id": rng.choice([None, "o1"]),
                    "ts": at(hours=h, minutes=rng.randrange(-90, 75)),  # late (within 6 h) and held back
                    "session_id": None,
                    "bucket": bucket,
                }
                for i in range(0 if (h, bucket) == (1, 1) else 8)
            ]
            lake.write_partition(STAGING, at(hours=h), pa.Table.from_pylist(rows, schema=STAGED_SCHEMA), bucket=bucket)


@pytest.fixture(scope="module")
def built_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lake with HOURS staged, built and published hours over two buckets (built once per module)."""
    cfg = replace(Settings(), lake=tmp_path_factory.mktemp("built") / "lake", buckets=2, start=T0, lateness_hours=6)
    stage(Lake(cfg.lake), range(HOURS), cfg.buckets)
    for h in range(HOURS):
        for b in range(cfg.buckets):
            build_profiles(cfg, at(hours=h), b, run_id="t")
        publish_profiles(cfg, at(hours=h), run_id="t")
    return cfg.lake


@pytest.fixture
def built(built_once: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A private copy of the built lake; the CLI's environment points at it."""
    shutil.copytree(built_once, tmp_path / "lake")
    cfg = replace(Settings(), lake=tmp_path / "lake", buckets=2, start=T0, lateness_hours=6)
    monkeypatch.setenv("PROFILE_ENGINE_LAKE", str(cfg.lake))
    monkeypatch.setenv("PROFILE_ENGINE_BUCKETS", str(cfg.buckets))
    return cfg


def test_verify_passes_on_every_committed_hour_and_cleans_its_scratch(built: Settings) -> None:
    lake = Lake(built.lake)

    results = [verify_hour(built, at(hours=h)) for h in range(HOURS)]

    assert all(r.equal for r in results), [r.render() for r in results if not r.equal]
    assert results[-1].rebuilt_from == {0: format_hour(T0), 1: format_hour(T0)}
    assert "EQUAL (profiles 6 rows" in results[-1].render()
    assert not any((lake.path(TMP)).iterdir())


def test_verify_finds_a_corrupted_committed_snapshot(built: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    lake, hour = Lake(built.lake), at(hours=HOURS - 1)
    committed = lake.read(PROFILES, hour, 1)
    views = committed.column("count_view_lifetime")
    corrupted = committed.set_column(
        committed.schema.get_field_index("count_view_lifetime"), "count_view_lifetime", pc.add(views, 1)
    )
    lake.write_partition(PROFILES, hour, corrupted.cast(committed.schema), bucket=1)
    interests = lake.read(INTERESTS, hour, 0)
    lake.write_partition(INTERESTS, hour, interests.slice(1), bucket=0)

    result = verify_hour(built, hour)
    code = main(["verify", "--hour", hour.strftime("%Y-%m-%dT%H:%M")])

    assert not result.equal
    assert [(d.column, d.rows) for d in result.comparisons[0].columns] == [("count_view_lifetime", 3)]
    first = result.comparisons[0].columns[0].examples[0]
    assert first[2] == first[1] + 1
    assert result.comparisons[1].missing_keys == [
        f"{interests.column('user_id')[0]}\x1f{interests.column('category_id')[0]}"
    ]
    out = capsys.readouterr().out
    assert code == 1
    assert "profiles.count_view_lifetime: 3 rows differ" in out and "interests: 1 rows missing" in out
    assert out.rstrip().endswith("DIFFERENT")


def test_cli_exits_zero_on_an_equal_hour(built: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["verify", "--hour", format_hour(at(hours=2)), "--keep"])

    out = capsys.readouterr().out
    assert code == 0 and "EQUAL" in out
    kept = Path(out.strip().splitlines()[-1].removeprefix("rebuild kept in "))
    assert Lake(kept).committed(PROFILES, at(hours=2), 1)


def test_verify_after_retention_starts_from_the_oldest_retained_checkpoint(built: Settings) -> None:
    lake = Lake(built.lake)
    for h in range(2):  # retention: staged hours 0-1 and the state of hour 0 are gone, the state of hour 1 kept
        shutil.rmtree(lake.partition(STAGING, at(hours=h)))
    shutil.rmtree(lake.partition(STATE, T0))

    result = verify_hour(built, at(hours=3))

    assert result.equal, result.render()
    assert set(result.rebuilt_from.values()) == {format_hour(at(hours=2))}


def test_verify_refuses_a_staging_gap_and_an_uncommitted_snapshot(built: Settings) -> None:
    lake = Lake(built.lake)
    shutil.rmtree(lake.partition(STAGING, at(hours=1)))

    with pytest.raises(
        FileNotFoundError, match=re.escape(f"staged hour {format_hour(at(hours=1))} bucket 0 is missing")
    ):
        verify_hour(built, at(hours=3))
    with pytest.raises(FileNotFoundError, match="no committed profile snapshot"):
        verify_hour(built, at(hours=HOURS))


def test_verify_of_a_range_checks_every_hour_with_one_rebuild_per_bucket(
    built: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``verify --hour A --to B``: each hour's outcome is the one ``verify_hour`` gives for it alone, but each
    bucket is rebuilt once (from the oldest staged hour to A) and then moved on one staged hour at a time."""
    reads = []

    def recorded(lake: Lake, hours: list[datetime], bucket: int, *args: Any) -> pa.Table:
        reads.append((bucket, [h - T0 for h in hours]))
        return read_staged(lake, hours, bucket, *args)

    monkeypatch.setattr(replay, "read_staged", recorded)

    results = verify_hours(built, at(hours=1), at(hours=HOURS - 1))

    assert [r.hour for r in results] == [at(hours=h) for h in range(1, HOURS)]
    assert all(r.equal for r in results), [r.render() for r in results if not r.equal]
    hour = timedelta(hours=1)
    each_bucket = [[0 * hour, 1 * hour]] + [[h * hour] for h in range(2, HOURS)]  # hours 0-1 at once, then one by one
    assert reads == [(b, staged) for b in range(built.buckets) for staged in each_bucket]
    alone = [verify_hour(built, at(hours=h)) for h in (1, HOURS - 1)]
    assert [r.render() for r in alone] == [results[0].render(), results[-1].render()]


def test_verify_of_a_range_names_the_hours_that_differ(built: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    lake, hour = Lake(built.lake), at(hours=2)
    committed = lake.read(PROFILES, hour, 0)
    views = committed.column("count_view_lifetime")
    corrupted = committed.set_column(
        committed.schema.get_field_index("count_view_lifetime"), "count_view_lifetime", pc.add(views, 1)
    )
    lake.write_partition(PROFILES, hour, corrupted.cast(committed.schema), bucket=0)

    code = main(["verify", "--hour", format_hour(at(hours=1)), "--to", format_hour(at(hours=3))])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.count("EQUAL (") == 2 and "profiles.count_view_lifetime: 3 rows differ" in captured.out
    assert captured.out.rstrip().endswith(f"verify: 3 hours, 2 equal, 1 different: {format_hour(hour)}")
    assert "[verify] bucket 2/2 rebuilt, 3 hour(s)" in captured.err


def test_verify_of_a_range_refuses_a_gap_an_uncommitted_hour_and_an_empty_range(built: Settings) -> None:
    lake = Lake(built.lake)
    shutil.rmtree(lake.partition(STAGING, at(hours=3)))

    with pytest.raises(FileNotFoundError, match=re.escape(f"staged hour {format_hour(at(hours=3))} bucket 0")):
        verify_hours(built, at(hours=1), at(hours=3))  # a gap after the first hour
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"no committed profile snapshot for {format_hour(at(hours=HOURS))}")
    ):
        verify_hours(built, at(hours=1), at(hours=HOURS))
    with pytest.raises(ValueError, match="is before the first"):
        verify_hours(built, at(hours=2), at(hours=1))


def test_verify_cli_names_what_it_cannot_verify(built: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    codes = [
        main(["verify", "--hour", format_hour(at(hours=2)), "--to", format_hour(at(hours=1))]),
        main(["verify", "--hour", format_hour(at(hours=1)), "--to", format_hour(at(hours=HOURS))]),
    ]

    err = capsys.readouterr().err
    assert codes == [EXIT_INPUT_ERROR, EXIT_INPUT_ERROR]
    assert f"verify: the last hour {format_hour(at(hours=1))} is before the first {format_hour(at(hours=2))}" in err
    assert f"verify: no committed profile snapshot for {format_hour(at(hours=HOURS))}" in err


# ---- the hourly lake path == an independent rebuild, over hundreds of users ----------------------
LAKE_HOURS = 26  # past the 24 h window


def simulated_arrivals(seed: int, users: int, lateness: int) -> tuple[dict[int, list[dict[str, Any]]], list[str]]:
    """Landing rows per arrival hour, and the users to erase.

    Events on time, late within the lateness, past it (quarantined), a few minutes ahead
    of the clock (staged the hour before their own), exact re-sends of an event id an hour
    or more later and copies within one file.
    """
    rng = random.Random(seed)
    arrivals: dict[int, list[dict[str, Any]]] = {}
    n = 0
    for u in range(users):
        for _ in range(rng.randint(1, 3)):  # visits
            start = at(hours=rng.randrange(0, LAKE_HOURS), minutes=rng.randrange(0, 60))
            for _ in range(rng.randint(1, 4)):
                n += 1
                ts = start + timedelta(minutes=rng.randrange(0, 50), milliseconds=rng.randrange(0, 1000))
                row = {
                    "event_id": f"e{n}",
                    "user_id": f"user{u:04d}",
                    "event_type": rng.choice(EVENT_TYPES),
                    "item_id": f"i{rng.randrange(5)}",
                    "category_id": rng.choice(["c1", "c2", None]),
                    "price": rng.choice([None, 0.99, 10.0, 123.45]),
                    "quantity": rng.randint(1, 3),
                    "order_id": rng.choice([None, "o1"]),
                    "ts": ts,
                    "session_id": None,
                }
                own = int((ts - T0) // timedelta(hours=1))
                ahead = ts.minute < 4 and own > 0 and rng.random() < 0.5  # within the 5-minute clock skew
                delay = rng.choice([0, 0, 0, 1, lateness, lateness + 1]) if not ahead else -1
                arrivals.setdefault(own + delay, []).append(row)
                if rng.random() < 0.1:  # a re-send of the same event, later or in the same file
                    arrivals.setdefault(own + delay + rng.choice([0, 1, 2]), []).append(dict(row))
    erased = rng.sample([f"user{u:04d}" for u in range(users)], 3)
    return arrivals, erased


def land(lake: Lake, hour: int, rows: list[dict[str, Any]]) -> None:
    from profile_engine.contracts.events import EVENT_SCHEMA
    from profile_engine.lake.storage import LANDING

    arrival = at(hours=hour)
    directory = lake.partition(LANDING, arrival)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "events.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=EVENT_SCHEMA), path)
    os.utime(path, (arrival.timestamp() + 60, arrival.timestamp() + 60))


@settings(max_examples=3, deadline=None)  # about 20 s an example: 26 hours of ingest + build
@given(seed=st.integers(0, 10_000), users=st.integers(200, 300), erase_after=st.integers(2, LAKE_HOURS - 3))
def test_hourly_lake_path_equals_an_independent_rebuild_with_resends_late_events_and_erasures(
    seed: int, users: int, erase_after: int
) -> None:
    check_hourly_lake_path(seed, users, erase_after, from_previous=False)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000), users=st.integers(200, 300), erase_after=st.integers(2, LAKE_HOURS - 3))
def test_hourly_lake_path_from_the_hour_before_equals_an_independent_rebuild_with_resends_late_events_and_erasures(
    seed: int, users: int, erase_after: int
) -> None:
    """The same with every bucket's snapshot started from the hour before (``snapshot.from_previous_hour``)
    whatever the bucket's size and the share of its users that changed; erasures rewrite the hour before."""
    check_hourly_lake_path(seed, users, erase_after, from_previous=True)


def check_hourly_lake_path(seed: int, users: int, erase_after: int, from_previous: bool) -> None:
    """26 hours of arrivals through ingest and ``build_profiles`` equal an independent reference and a rebuild
    (``from_previous``: each hour's snapshot starts from the hour before, which it did for every hour but the first)."""
    arrivals, erased = simulated_arrivals(seed, users, lateness=3)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        for name in ("PROFILE_ENGINE_EXPORT_KEY", "PROFILE_ENGINE_ERASURE_KEY"):
            patch.delenv(name, raising=False)  # the development key in the lake
        if from_previous:
            patch.setattr(snapshot_module, "MOST_CHANGED", 1.0)
        cfg = Settings(
            lake=Path(tmp) / "lake",
            buckets=2,
            lateness_hours=3,
            clock_skew_minutes=5,
            start=T0,
            snapshot_from_previous_min_users=0 if from_previous else Settings.snapshot_from_previous_min_users,
        )
        lake = Lake(cfg.lake)
        started = 0  # bucket-hours whose snapshot started from the hour before
        for hour in range(LAKE_HOURS):
            if arrivals.get(hour):
                land(lake, hour, arrivals[hour])
            ingest.extract_events(cfg, at(hours=hour))
            ingest.validate_events(cfg, at(hours=hour), enforce_threshold=False)
            built = [build_profiles(cfg, at(hours=hour), bucket) for bucket in range(cfg.buckets)]
            started += sum(b["snapshot_from_previous_hour"] for b in built)
            if hour == erase_after:
                # tombstone_unknown: a user with no event yet is kept out of later hours too
                erasure.erase_users(cfg, erased, requested_by="test", reason="property", tombstone_unknown=True)
        last = at(hours=LAKE_HOURS - 1)
        committed = lake.read(PROFILES, last)

        # the independent reference: each event id once, nothing of the erased users, nothing
        # that arrived more than the lateness after its time, nothing not arrived by the end
        distinct: dict[str, dict[str, Any]] = {}
        for hour in sorted(arrivals):
            for row in arrivals[hour]:
                if hour < LAKE_HOURS and row["ts"] >= at(hours=hour - 3) and row["user_id"] not in erased:
                    distinct.setdefault(row["event_id"], row)
        staged = [lake.read(STAGING, at(hours=h), columns=["event_id"]) for h in range(LAKE_HOURS)]
        staged_ids = pa.concat_tables(staged).column("event_id").to_pylist()
        assert sorted(staged_ids) == sorted(distinct)  # ingestion staged each of these once, and nothing else
        assert_matches_reference(committed, list(distinct.values()), last + timedelta(hours=1), f"seed {seed}")
        # and the rebuild from staged events (replay.rebuild_bucket) on every column
        for bucket in range(cfg.buckets):
            _, state = rebuild_bucket(cfg, last, bucket)
            rebuilt = snapshot(state, last + timedelta(hours=1), cfg).profiles
            comparison = compare_tables("profiles", rebuilt, lake.read(PROFILES, last, bucket), [USER_ID])
            assert comparison.equal, "; ".join(comparison.lines())
        # every hour after the first of both buckets, the hour after the erasure too (it keeps the checkpoint's digest)
        assert started == (cfg.buckets * (LAKE_HOURS - 1) if from_previous else 0)
