"""Tests of profile_engine.profiles.verify: the table comparison, and ``verify`` on a temporary lake
(clean hours, a deliberately corrupted committed snapshot, retention, gaps) and its CLI."""

from __future__ import annotations

import math
import random
import re
import shutil
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profile_engine.cli import EXIT_INPUT_ERROR, main
from profile_engine.config import Settings
from profile_engine.contracts.events import EVENT_TYPES, STAGED_SCHEMA
from profile_engine.hours import format_hour
from profile_engine.lake.storage import INTERESTS, PROFILES, STAGING, STATE, TMP, Lake
from profile_engine.profiles import replay
from profile_engine.profiles.build import build_profiles, publish_profiles, read_staged
from profile_engine.profiles.verify import compare_tables, verify_hour, verify_hours

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
