"""The hourly lake path equals an independent rebuild, over hundreds of users (split from tests/test_verify.py
so that pytest-xdist's ``--dist loadfile`` runs it beside the other slow files; the variant whose snapshots start
from the hour before is in tests/test_verify_lake_path_from_previous.py)."""

from __future__ import annotations

import os
import random
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profile_engine.config import Settings
from profile_engine.contracts.events import EVENT_TYPES
from profile_engine.contracts.profiles import USER_ID
from profile_engine.ingest import events as ingest
from profile_engine.lake.storage import PROFILES, STAGING, Lake
from profile_engine.ops import erasure
from profile_engine.profiles import snapshot as snapshot_module
from profile_engine.profiles.build import build_profiles
from profile_engine.profiles.replay import rebuild_bucket
from profile_engine.profiles.snapshot import snapshot
from profile_engine.profiles.verify import compare_tables
from tests.test_features import assert_matches_reference

T0 = datetime(2026, 11, 2, tzinfo=UTC)


def at(hours: float = 0, minutes: float = 0) -> datetime:
    return T0 + timedelta(hours=hours, minutes=minutes)


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
