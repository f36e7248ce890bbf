"""The demo producer (``demo.land_demo_hours``, the ``demo_producer`` DAG's task): it continues the demo's shop."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from profile_engine.config import Settings
from profile_engine.hours import HOUR, format_hour, hour_range
from profile_engine.ingest import events as ingest
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake, read_json, write_json
from profile_engine.ops import demo
from profile_engine.sources.simulate import simulate
from tests.conftest import HOUR0

USERS = 120
SEED = 5
START = HOUR0 - 6 * HOUR  # the shop's origin and the demo's first hour
DEMO_LAST = HOUR0 - HOUR  # the last hour the demo itself landed


def _demo_lake(settings: Settings) -> Lake:
    """A lake as ``make demo`` leaves it, as far as the producer cares: the marker of the shop."""
    lake = Lake(settings.lake)
    write_json(
        lake.path(demo.DEMO_MARKER),
        {
            "users": USERS,
            "seed": SEED,
            "start": format_hour(START),
            "window": [format_hour(START), format_hour(DEMO_LAST)],
            "business_tz": settings.business_tz,
            "intensity": demo.DEMO_INTENSITY,
        },
    )
    return lake


def _landing(lake: Lake, first: datetime, last: datetime) -> dict[str, str]:
    """Relative path -> sha256 of every landing file of arrival hours ``first..last``."""
    return {
        p.relative_to(lake.root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for hour in hour_range(first, last)
        for p in sorted(lake.partition(lk.LANDING, hour).glob("*.parquet"))
    }


def test_landed_hour_is_taken_by_extract_events(settings: Settings) -> None:
    # Arrange
    lake = _demo_lake(settings)

    # Act
    landed = demo.land_demo_hours(settings, HOUR0)
    extracted = ingest.extract_events(settings, HOUR0, run_id="test")

    # Assert
    files = sorted(lake.partition(lk.LANDING, HOUR0).glob("*.parquet"))
    assert landed["status"] == "landed" and landed["hours"] == 1 and landed["landed_through"] == format_hour(HOUR0)
    assert files and landed["files"] == len(files) and landed["events"] > 0
    assert extracted["files"] == len(files) and extracted["rows"] == landed["events"]
    taken = {entry.path for entry in ingest.read_ledger(lake, HOUR0) or []}
    assert taken == {p.relative_to(lake.root).as_posix() for p in files}
    assert read_json(lake.path(demo.DEMO_MARKER))["landed_through"] == format_hour(HOUR0)


def test_catches_up_every_missing_hour_and_never_rewrites_a_landed_one(settings: Settings) -> None:
    # Arrange
    lake = _demo_lake(settings)
    first = demo.land_demo_hours(settings, HOUR0 + HOUR)
    before = {p: p.stat().st_mtime_ns for p in lake.path(lk.LANDING).rglob("*.parquet")}

    # Act
    again = demo.land_demo_hours(settings, HOUR0)
    later = demo.land_demo_hours(settings, HOUR0 + 2 * HOUR)

    # Assert
    assert first["hours"] == 2 and first["first_hour"] == format_hour(HOUR0)
    assert again == {
        "status": "up to date",
        "landed_through": format_hour(HOUR0 + HOUR),
        "hours": 0,
        "files": 0,
        "events": 0,
    }
    assert later["hours"] == 1 and later["first_hour"] == format_hour(HOUR0 + 2 * HOUR)
    assert {p: p.stat().st_mtime_ns for p in before} == before


@hyp_settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=3))
def test_hour_by_hour_lands_what_the_demo_would_have_landed(tmp_path: Path, steps: list[int]) -> None:
    # Arrange: the producer in uneven steps, and the demo's own range simulation in one call.
    base = Settings(lake=tmp_path / f"producer-{'-'.join(map(str, steps))}", buckets=2, start=START)
    producer = _demo_lake(base)
    reference = Lake(tmp_path / f"reference-{'-'.join(map(str, steps))}")
    last = DEMO_LAST + sum(steps) * HOUR

    # Act
    until = DEMO_LAST
    for step in steps:
        until += step * HOUR
        demo.land_demo_hours(base, until)
    simulate(
        reference,
        DEMO_LAST + HOUR,
        last,
        users=USERS,
        seed=SEED,
        business_tz=base.business_tz,
        origin=START,
        intensity=demo.DEMO_INTENSITY,
    )

    # Assert: the same files, byte for byte, so profile_refresh sees the shop the demo would have shown.
    produced = _landing(producer, DEMO_LAST + HOUR, last)
    assert produced and produced == _landing(reference, DEMO_LAST + HOUR, last)


@pytest.mark.parametrize("case", ["no marker", "production"])
def test_leaves_a_lake_that_no_demo_made_alone(settings: Settings, case: str) -> None:
    # Arrange
    if case == "production":
        _demo_lake(settings)
        settings = replace(settings, environment="production")

    # Act
    result = demo.land_demo_hours(settings, HOUR0)

    # Assert
    assert result["status"] == "skipped" and "not a demo lake" in result["reason"]
    assert not Lake(settings.lake).path(lk.LANDING).exists()


def test_dag_is_paused_on_creation_only_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange
    import runpy

    path = str(Path(__file__).resolve().parents[1] / "dags" / "demo_producer.py")
    paused = {}

    # Act
    for env in ("development", "production"):
        monkeypatch.setenv("PROFILE_ENGINE_ENV", env)
        paused[env] = runpy.run_path(path)["demo_producer"]().is_paused_upon_creation

    # Assert
    assert paused == {"development": False, "production": True}


def test_demo_last_pins_the_window_end(monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: the demo itself is replaced; only the arguments it gets matter
    from profile_engine import cli

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: calls.append(kwargs))

    # Act
    code = cli.main(["demo", "--users", "10", "--hours", "3", "--last", "2026-11-30T13:00"])
    cli.main(["demo"])

    # Assert: a fixed hour, else None (the clock's last complete hour)
    assert code == 0
    assert calls[0] == {
        "users": 10,
        "history_days": 30,
        "hours": 3,
        "seed": 7,
        "last": datetime(2026, 11, 30, 13, tzinfo=UTC),
    }
    assert calls[1]["last"] is None
