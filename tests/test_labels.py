"""Tests for profile_engine.model.labels: label windows, finality, the out-of-time split, sampling and leakage.

The synthetic-lake helpers at the top are also used by test_model.py and test_evaluate.py.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from profile_engine.config import Settings
from profile_engine.contracts.events import EVENT_SCHEMA, PURCHASE, STAGED_SCHEMA, VIEW, bucket_sql
from profile_engine.contracts.profiles import SNAPSHOT_HOUR, SNAPSHOT_SCHEMA, USER_ID
from profile_engine.hours import HOUR, format_hour, hour_range
from profile_engine.lake.storage import MANIFEST, PROFILES, STAGING, TRAINING, Lake, read_json, write_json
from profile_engine.model import labels
from profile_engine.profiles.build import build_profiles, build_profiles_range, publish_profiles
from profile_engine.profiles.merge import with_local_hour
from profile_engine.profiles.replay import reproducible_hours

T0 = datetime(2026, 11, 1, 0, tzinfo=UTC)
NUMERIC = ("signal", "visits")
CATEGORICAL = ("segment",)
TS = pa.timestamp("ms", tz="UTC")


def make_settings(tmp_path: Path, **overrides: int) -> Settings:
    """Test settings: 1 h label horizon and 2 h lateness keep lakes tiny."""
    values = {"label_horizon_hours": 1, "lateness_hours": 2, "retrain_every_hours": 6, "seed": 7, **overrides}
    return Settings(lake=tmp_path / "lake", **values)  # type: ignore[arg-type]


def profile_table(hour: datetime, users: Sequence[str], rng: np.random.Generator) -> pa.Table:
    """A synthetic snapshot: one row per user with the test's own feature columns."""
    n = len(users)
    visits = rng.poisson(3.0, n).astype(np.int64)
    return pa.table(
        {
            USER_ID: pa.array(users, pa.string()),
            SNAPSHOT_HOUR: pa.array([hour] * n, TS),
            "signal": pa.array(rng.normal(0.0, 1.0, n)),
            "visits": pa.array(visits, pa.int64(), mask=rng.random(n) < 0.1),
            "segment": pa.array(rng.choice(["a", "b", "c"], n).tolist(), pa.string(), mask=rng.random(n) < 0.05),
            "visit_at": pa.array([hour + timedelta(minutes=30)] * n, TS),  # not an engine column
        }
    )


def write_snapshot(lake: Lake, hour: datetime, table: pa.Table, buckets: int = 2) -> None:
    """Commit a snapshot like publish_profiles: bucket partitions, then the hour-level marker."""
    index = np.arange(table.num_rows)
    for bucket in range(buckets):
        lake.write_partition(PROFILES, hour, table.filter(pa.array(index % buckets == bucket)), bucket=bucket)
    write_json(lake.partition(PROFILES, hour) / MANIFEST, {"data_hour": format_hour(hour), "buckets": buckets})


def record_reads() -> tuple[list[int], list[int], Callable[..., pa.Table]]:
    """Patch ``pyarrow.parquet.read_table`` (undone with the test's ``MonkeyPatch.context``) to record the rows
    of every read and, at every read, how many tables read before are still alive (held by the caller)."""
    reads: list[int] = []
    held: list[int] = []
    alive: list[weakref.ref[pa.Table]] = []
    read_table = pq.read_table

    def recording(*args: object, **kwargs: object) -> pa.Table:
        held.append(sum(ref() is not None for ref in alive))
        table = read_table(*args, **kwargs)  # type: ignore[arg-type]
        reads.append(table.num_rows)
        alive.append(weakref.ref(table))
        return table

    return reads, held, recording


def write_events(lake: Lake, events: Sequence[tuple[str, str, datetime, datetime]]) -> None:
    """Stage ``(user, event_type, ts, processing hour)`` events, one bucket-0 partition per processing hour."""
    by_hour: dict[datetime, list[tuple[str, str, datetime]]] = {}
    for user, kind, ts, staged in events:
        by_hour.setdefault(staged, []).append((user, kind, ts))
    for staged, rows in by_hour.items():
        n = len(rows)
        table = pa.table(
            {
                "event_id": [f"{staged:%Y%m%d%H}-{i}" for i in range(n)],
                "user_id": [r[0] for r in rows],
                "event_type": [r[1] for r in rows],
                "item_id": ["item"] * n,
                "category_id": ["cat"] * n,
                "price": [10.0] * n,
                "quantity": pa.array([1] * n, pa.int32()),
                "order_id": [None] * n,
                "ts": pa.array([r[2] for r in rows], TS),
                "session_id": [None] * n,
                "local_hour": pa.array([r[2].hour for r in rows], pa.int8()),  # a shop in UTC
                "bucket": pa.array([0] * n, pa.int32()),
            },
            schema=STAGED_SCHEMA,
        )
        lake.write_partition(STAGING, staged, table, bucket=0)


def purchase_probability(table: pa.Table) -> np.ndarray:
    """The synthetic truth: a non-linear signal (|signal| > 1) plus segment "a"."""
    signal = np.asarray(table.column("signal"))
    segment = np.asarray(table.column("segment").fill_null("").to_pylist(), dtype=object)
    logit = -3.0 + 2.5 * (np.abs(signal) > 1.0) + 1.5 * (segment == "a")
    return np.asarray(1.0 / (1.0 + np.exp(-logit)))


def synthetic_lake(
    settings: Settings, first: datetime, hours: int, users: int, seed: int = 11, shift: float = 0.0
) -> list[datetime]:
    """Snapshots for ``hours`` hours and purchases drawn from ``purchase_probability``.

    A user buys in the label window of a snapshot with that snapshot's probability;
    a fifth of the purchases are staged an hour late. ``shift`` moves the signal
    of every snapshot (for drift tests). Returns the snapshot hours.
    """
    lake = Lake(settings.lake)
    rng = np.random.default_rng(seed)
    names = [f"u{i:04d}" for i in range(users)]
    events: list[tuple[str, str, datetime, datetime]] = []
    snapshots = [first + i * HOUR for i in range(hours)]
    for hour in snapshots:
        table = profile_table(hour, names, rng)
        if shift:
            table = table.set_column(2, "signal", pa.array(np.asarray(table.column("signal")) + shift))
        write_snapshot(lake, hour, table)
        buyers = np.flatnonzero(rng.random(users) < purchase_probability(table))
        for i in buyers:
            ts = hour + HOUR + timedelta(minutes=int(rng.integers(0, 60)))
            staged = ts.replace(minute=0) + (HOUR if rng.random() < 0.2 else timedelta(0))
            events.append((names[i], PURCHASE, ts, staged))
    write_events(lake, events)
    return snapshots


# ---- label windows -------------------------------------------------------------------------------------------------
def test_label_counts_purchases_in_window_only_from_staged_hours_that_can_hold_them(tmp_path: Path) -> None:
    # Arrange: snapshot S = 10:00, E = 11:00, window [11:00, 12:00), lateness 2 h
    settings = make_settings(tmp_path)
    lake = Lake(settings.lake)
    s = T0 + 10 * HOUR
    e = s + HOUR
    ms = timedelta(milliseconds=1)
    write_events(
        lake,
        [
            ("before", PURCHASE, e - ms, s),  # just before E: not a label
            ("at_start", PURCHASE, e, e),
            ("at_end", PURCHASE, e + HOUR - ms, e),
            ("after", PURCHASE, e + HOUR, e + HOUR),  # window end is exclusive
            ("late", PURCHASE, e + timedelta(minutes=5), e + 2 * HOUR),  # staged 2 h late, still read
            ("viewer", VIEW, e + timedelta(minutes=5), e),  # not a purchase
        ],
    )
    users = ["before", "at_start", "at_end", "after", "late", "viewer", "nobody"]
    examples = pa.table({USER_ID: users, SNAPSHOT_HOUR: pa.array([s] * len(users), TS)})

    # Act
    labelled = labels.label_examples(settings, examples)

    # Assert
    got = dict(zip(users, labelled.column(labels.LABEL).to_pylist(), strict=True))
    assert got == {"before": 0, "at_start": 1, "at_end": 1, "after": 0, "late": 1, "viewer": 0, "nobody": 0}
    assert labelled.column(labels.LABEL).type == pa.int8()


def test_a_purchase_staged_through_the_clock_skew_in_the_hour_before_the_window_is_a_label(tmp_path: Path) -> None:
    # Arrange: snapshot S = 10:00, window [11:00, 12:00); a purchase at 11:02 is accepted by the
    # hour 10 ingestion (inside the 5-minute clock skew) and staged there, not in hour 11
    settings = make_settings(tmp_path, clock_skew_minutes=5)
    s = T0 + 10 * HOUR
    write_events(Lake(settings.lake), [("skewed", PURCHASE, s + HOUR + timedelta(minutes=2), s)])
    examples = pa.table({USER_ID: ["skewed"], SNAPSHOT_HOUR: pa.array([s], TS)})

    # Act
    labelled = labels.label_examples(settings, examples)

    # Assert
    assert labelled.column(labels.LABEL).to_pylist() == [1]


def test_staged_hours_cover_window_plus_lateness_and_the_clock_skew() -> None:
    # Arrange
    settings = Settings(label_horizon_hours=2, lateness_hours=3, clock_skew_minutes=5)
    start, end = labels.label_window(T0, settings.label_horizon_hours)

    # Act
    hours = labels.staged_hours_for_window(settings, start, end)
    no_skew = labels.staged_hours_for_window(replace(settings, clock_skew_minutes=0), start, end)
    long_skew = labels.staged_hours_for_window(replace(settings, clock_skew_minutes=61), start, end)

    # Assert: [01:00, 03:00) is staged from hour 00 (00:00 + 1 h + skew > 01:00) until it can
    # no longer arrive, 06:00, i.e. in processing hours 00..05
    assert hours == [T0 + i * HOUR for i in range(0, 6)]
    assert no_skew == [T0 + i * HOUR for i in range(1, 6)]
    assert long_skew == [T0 + i * HOUR for i in range(-1, 6)]


@hypothesis_settings(max_examples=60, deadline=None)
@given(
    start_minutes=st.integers(min_value=0, max_value=48 * 60),
    length_minutes=st.integers(min_value=1, max_value=48 * 60),
    lateness=st.integers(min_value=0, max_value=30),
    skew=st.integers(min_value=0, max_value=150),
)
def test_staged_hours_are_exactly_the_hours_whose_ingestion_accepts_a_ts_in_the_window(
    start_minutes: int, length_minutes: int, lateness: int, skew: int
) -> None:
    # Arrange: ingestion of hour H accepts ts in [H - lateness, H + 1 h + skew) (ingest.validate_events)
    settings = Settings(lateness_hours=lateness, clock_skew_minutes=skew)
    start = T0 + timedelta(minutes=start_minutes)
    end = start + timedelta(minutes=length_minutes)
    candidates = [T0 + i * HOUR for i in range(-10, 200)]

    def overlaps(h: datetime) -> bool:
        return h - lateness * HOUR < end and start < h + HOUR + timedelta(minutes=skew)

    # Act
    hours = labels.staged_hours_for_window(settings, start, end)

    # Assert
    assert hours == [h for h in candidates if overlaps(h)]


@hypothesis_settings(max_examples=50, deadline=None)
@given(
    horizon=st.integers(min_value=1, max_value=72),
    lateness=st.integers(min_value=0, max_value=48),
    offset=st.integers(min_value=0, max_value=10_000),
)
def test_newest_final_snapshot_is_the_last_with_final_labels(horizon: int, lateness: int, offset: int) -> None:
    # Arrange
    config = Settings(label_horizon_hours=horizon, lateness_hours=lateness)
    hour = T0 + offset * HOUR

    # Act
    newest = labels.newest_final_snapshot_hour(config, hour)

    # Assert
    assert labels.labels_final(config, newest, hour)
    assert not labels.labels_final(config, newest + HOUR, hour)


# ---- the out-of-time split -----------------------------------------------------------------------------------------
def test_choose_snapshots_is_out_of_time_and_spread() -> None:
    # Arrange: horizon 3 h, lateness 2 h, snapshots every hour for 40 hours
    config = Settings(label_horizon_hours=3, lateness_hours=2)
    available = [T0 + i * HOUR for i in range(40)]
    hour = T0 + 39 * HOUR

    # Act
    train, evaluation = labels.choose_snapshots(config, hour, available, max_snapshots=5)

    # Assert
    assert evaluation == hour - 5 * HOUR
    eval_start, _ = labels.label_window(evaluation, 3)
    assert all(labels.label_window(s, 3)[1] <= eval_start for s in train)
    assert len(train) == 5
    assert train == sorted(train)
    assert train[0] == T0  # spread back to the oldest snapshot
    assert train[-1] == evaluation - 3 * HOUR  # the newest allowed one is the validation slice


def test_choose_snapshots_says_why_when_history_is_too_short() -> None:
    config = Settings(label_horizon_hours=3, lateness_hours=2)
    available = [T0 + i * HOUR for i in range(6)]

    with pytest.raises(labels.InsufficientData, match="need 2"):
        labels.choose_snapshots(config, T0 + 8 * HOUR, available, max_snapshots=8)


# ---- sampling ------------------------------------------------------------------------------------------------------
@hypothesis_settings(max_examples=25, deadline=None)
@given(n=st.integers(min_value=1, max_value=60), limit=st.integers(min_value=1, max_value=80), seed=st.integers(0, 9))
def test_sample_depends_on_users_not_row_order(n: int, limit: int, seed: int) -> None:
    # Arrange
    users = [f"u{i}" for i in range(n)]
    table = pa.table({USER_ID: users, "x": list(range(n))})
    shuffled = table.take(pa.array(np.random.default_rng(seed).permutation(n)))

    # Act
    first = labels.sample_users(table, limit, seed=3, salt="s")
    second = labels.sample_users(shuffled, limit, seed=3, salt="s")

    # Assert
    assert first.equals(second)
    assert first.num_rows == min(n, limit)
    assert first.column(USER_ID).to_pylist() == sorted(first.column(USER_ID).to_pylist())


@hypothesis_settings(max_examples=20, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=60),
    buckets=st.integers(min_value=1, max_value=5),
    limit=st.integers(min_value=1, max_value=70),
)
def test_sample_snapshot_equals_sampling_the_whole_snapshot_reading_one_bucket_at_a_time(
    tmp_path_factory: pytest.TempPathFactory, n: int, buckets: int, limit: int
) -> None:
    # Arrange: a snapshot of n users over ``buckets`` buckets; every Parquet read recorded
    lake = Lake(tmp_path_factory.mktemp("lake"))
    write_snapshot(lake, T0, profile_table(T0, [f"u{i:03d}" for i in range(n)], np.random.default_rng(n)), buckets)
    bucket_rows = [lake.manifest(PROFILES, T0, b)["rows"] for b in range(buckets)]
    columns = [USER_ID, "signal", "segment", "absent"]
    whole = labels.sample_users(labels.read_snapshot(lake, T0, columns), limit, seed=5, salt="drift")
    reads, held, recording = record_reads()
    hashed: list[int] = []
    hash_positions = labels.hash_positions

    def recording_hash(users: pa.ChunkedArray | pa.Array, *args: Any) -> np.ndarray:
        hashed.append(len(users))
        return hash_positions(users, *args)

    # Act
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pq, "read_table", recording)
        patch.setattr(labels, "hash_positions", recording_hash)
        sampled = labels.sample_snapshot(lake, T0, limit, seed=5, salt="drift", columns=columns)

    # Assert: the same rows in the same order, and no read held more than one bucket
    assert sampled.equals(whole)
    assert sampled.column_names == [USER_ID, "signal", "segment"]
    assert sorted(reads) == sorted(bucket_rows)
    assert max(held) <= 1  # when a bucket was read, at most the bucket before was still held
    # the users are hashed bucket by bucket with the ones kept so far, never the whole population's ids at once
    assert all(rows <= limit + max(bucket_rows) for rows in hashed)


# ---- the training set ----------------------------------------------------------------------------------------------
def test_build_training_set_writes_labelled_out_of_time_sets_deterministically(tmp_path: Path) -> None:
    # Arrange: 12 hourly snapshots of 60 users
    settings = make_settings(tmp_path)
    snapshots = synthetic_lake(settings, T0, hours=12, users=60)
    hour = snapshots[-1]
    config = labels.TrainingConfig(max_snapshots=4, max_rows=150, min_train_rows=20, min_positives=1)

    # Act
    first = labels.build_training_set(settings, hour, "v1", config=config)
    second = labels.build_training_set(settings, hour, "v1", config=config)

    # Assert
    assert first.eval_snapshot == hour - 3 * HOUR  # horizon 1 + lateness 2
    assert max(first.train_snapshots) <= first.eval_snapshot - HOUR
    per_snapshot = 150 // (len(first.train_snapshots) + 1)
    assert first.eval.num_rows == per_snapshot
    assert first.train.num_rows == per_snapshot * len(first.train_snapshots)
    assert first.train.equals(second.train) and first.eval.equals(second.eval)
    directory = Lake(settings.lake).path(TRAINING, "v1")
    assert pq.read_table(directory / labels.EVAL_FILE).equals(first.eval)
    manifest = read_json(directory / MANIFEST)
    assert manifest["eval_snapshot"] == format_hour(first.eval_snapshot)
    assert manifest["train_positives"] == labels.positives(first.train) > 0
    # the whole profile row is kept, so any model can be re-evaluated later
    assert set(first.eval.column_names) >= {*NUMERIC, *CATEGORICAL, "visit_at", labels.LABEL}


def test_build_training_set_skips_without_positives(tmp_path: Path) -> None:
    # Arrange: snapshots but no staged purchases at all
    settings = make_settings(tmp_path)
    lake = Lake(settings.lake)
    rng = np.random.default_rng(0)
    for i in range(8):
        write_snapshot(lake, T0 + i * HOUR, profile_table(T0 + i * HOUR, ["a", "b", "c"], rng))
    config = labels.TrainingConfig(min_train_rows=1, min_positives=1)

    # Act / Assert
    with pytest.raises(labels.InsufficientData, match="0 positive labels in the training rows"):
        labels.build_training_set(settings, T0 + 7 * HOUR, "v1", config=config)


# ---- leakage -------------------------------------------------------------------------------------------------------
def test_a_feature_from_after_the_snapshot_is_caught(tmp_path: Path) -> None:
    # Arrange: one training snapshot where a feature was computed from a later event
    settings = make_settings(tmp_path)
    snapshots = synthetic_lake(settings, T0, hours=10, users=30)
    lake = Lake(settings.lake)
    leaky_hour = snapshots[2]
    leaky = lake.read(PROFILES, leaky_hour).sort_by(USER_ID)
    seen = leaky.column("visit_at").to_pylist()
    seen[0] = leaky_hour + HOUR + timedelta(minutes=10)  # an event after the snapshot end E leaked in
    write_snapshot(lake, leaky_hour, leaky.set_column(5, "visit_at", pa.array(seen, TS)))
    config = labels.TrainingConfig(max_snapshots=8, min_train_rows=1, min_positives=1)

    # Act / Assert
    with pytest.raises(labels.LeakageError, match="visit_at: 1 rows"):
        labels.build_training_set(settings, snapshots[-1], "v1", config=config)


def test_rows_joined_from_another_snapshot_are_caught(tmp_path: Path) -> None:
    # Arrange: the example is for 05:00 but its features come from the 06:00 snapshot
    rng = np.random.default_rng(1)
    rows = profile_table(T0 + 6 * HOUR, ["a", "b"], rng)
    expected = pa.array([T0 + 5 * HOUR] * 2, TS)

    # Act / Assert
    with pytest.raises(labels.LeakageError, match="another snapshot"):
        labels.check_no_leakage(make_settings(tmp_path), rows, expected)


def test_rows_without_engine_columns_pass_the_first_checks_and_are_not_recomputed(tmp_path: Path) -> None:
    rows = profile_table(T0, ["a", "b"], np.random.default_rng(2))

    checked = labels.check_no_leakage(make_settings(tmp_path), rows, pa.array([T0, T0], TS))

    assert checked == {"rows": 0, "columns": 0}


# ---- leakage on lakes built by the engine ----------------------------------------------------------------------
ENGINE_HOURS = 8


def engine_events(settings: Settings, hours: int, users: int = 40, seed: int = 5) -> list[pa.Table]:
    """Staged events (with their bucket) of ``hours`` processing hours from T0, the same for a seed.

    Each hour stages events of its own hour, events up to 2 h old (late, within the lateness)
    and events up to 5 minutes ahead (clock skew: held back until their hour).
    """
    rng = np.random.default_rng(seed)
    names = [f"u{i:03d}" for i in range(users)]
    out = []
    for h in range(hours):
        hour = T0 + h * HOUR
        offsets = rng.choice([0, 0, 0, -60, -110, 58], size=30)  # minutes from the hour start
        rows = [
            {
                "event_id": f"h{h}e{i}",
                "user_id": names[int(rng.integers(0, min(users, users - 5 + h // 2)))],  # newcomers appear later
                "event_type": str(rng.choice(["view", "view", "cart", "purchase", "fav", "remove_cart"])),
                "item_id": f"i{int(rng.integers(0, 4))}",
                "category_id": f"c{int(rng.integers(0, 3))}",
                "price": float(rng.choice([1.5, 10.0, 99.99])),
                "quantity": 1,
                "order_id": None,
                "ts": hour
                + timedelta(minutes=int(off) + int(rng.integers(0, 7)), milliseconds=int(rng.integers(0, 999))),
                "session_id": None,
            }
            for i, off in enumerate(offsets)
        ]
        out.append(_with_buckets(pa.Table.from_pylist(rows, schema=EVENT_SCHEMA), settings.buckets))
    return out


def stage(settings: Settings, hour: datetime, events: pa.Table) -> None:
    """Write one processing hour's staged events, one partition per bucket (empty ones too)."""
    lake = Lake(settings.lake)
    for b in range(settings.buckets):
        lake.write_partition(STAGING, hour, events.filter(pc.equal(events.column("bucket"), b)), bucket=b)


def engine_lake(tmp_path: Path, users: int = 40) -> Settings:
    """A lake the engine built hour by hour from staged events (``engine_events``), with late arrivals and held-back events.

    Snapshots are committed with an hour-level marker as ``publish_profiles`` writes it (no RFM: not checked).
    """
    settings = replace(make_settings(tmp_path), buckets=2, start=T0)
    lake = Lake(settings.lake)
    for h, events in enumerate(engine_events(settings, ENGINE_HOURS, users)):
        hour = T0 + h * HOUR
        stage(settings, hour, events)
        for b in range(settings.buckets):
            build_profiles(settings, hour, b)
        write_json(lake.partition(PROFILES, hour) / MANIFEST, {"data_hour": format_hour(hour)})
    return settings


def _with_buckets(table: pa.Table, buckets: int) -> pa.Table:
    import duckdb

    con = duckdb.connect()
    con.register("t", table)
    out = con.sql(f"SELECT *, {bucket_sql('user_id', buckets)} AS bucket FROM t").to_arrow_table()
    con.close()
    return with_local_hour(out, "UTC").select(STAGED_SCHEMA.names).cast(STAGED_SCHEMA)


@pytest.fixture(scope="module")
def engine_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """One engine lake for the tests that only read it."""
    return engine_lake(tmp_path_factory.mktemp("engine"))


def snapshot_rows(settings: Settings, hour: datetime) -> pa.Table:
    return Lake(settings.lake).read(PROFILES, hour).sort_by(USER_ID)


def test_features_built_by_the_engine_pass_the_recompute_with_later_events_deleted(engine_settings: Settings) -> None:
    # Arrange: snapshot of hour 3; hours 4..7 staged late events of hour 3 and before, and
    # hour 3 staged events of hour 4 (clock skew): none of them may be in its features
    settings = engine_settings
    hour = T0 + 3 * HOUR
    rows = snapshot_rows(settings, hour)
    staged_later = Lake(settings.lake).read(STAGING, hour + HOUR)
    assert pc.any(pc.less(staged_later.column("ts"), pa.scalar(hour + HOUR, TS))).as_py()  # late arrivals exist

    # Act
    checked = labels.check_no_leakage(settings, rows, pa.array([hour] * rows.num_rows, TS), sample=1000)

    # Assert: every row and every per-user engine column was recomputed
    assert checked == {"rows": rows.num_rows, "columns": len(SNAPSHOT_SCHEMA) - 2}


@pytest.mark.parametrize(
    "leak",
    [
        "count_view_lifetime",  # a count taken after late events of the snapshot's own hours arrived
        "decayed_view_1d",
        "session_count",
        "newcomer",  # a row of a user who only has events after the cutoff
    ],
)
def test_a_feature_computed_with_events_after_the_cutoff_is_caught(engine_settings: Settings, leak: str) -> None:
    # Arrange: rows of the snapshot of hour 3 with one feature taken from the snapshot of hour 6
    settings = engine_settings
    hour = T0 + 3 * HOUR
    rows = snapshot_rows(settings, hour)
    later = snapshot_rows(settings, hour + 3 * HOUR)
    if leak == "newcomer":
        new = later.filter(pc.invert(pc.is_in(later.column(USER_ID), value_set=rows.column(USER_ID))))
        assert new.num_rows > 0
        newcomer = new.slice(0, 1).to_pylist()[0] | {SNAPSHOT_HOUR: hour}
        newcomer |= {c: min(v, hour) for c, v in newcomer.items() if isinstance(v, datetime)}  # hide its times
        leaky = pa.concat_tables([rows, pa.Table.from_pylist([newcomer], schema=rows.schema)])
    else:
        common = later.filter(pc.is_in(later.column(USER_ID), value_set=rows.column(USER_ID)))
        assert common.column(USER_ID).equals(rows.column(USER_ID))
        leaky = rows.set_column(rows.column_names.index(leak), leak, common.column(leak))
        assert not leaky.equals(rows)
    expected = pa.array([hour] * leaky.num_rows, TS)

    # Act / Assert
    with pytest.raises(
        labels.LeakageError,
        match=f"features differ from a recompute.*{'not in the rebuild' if leak == 'newcomer' else leak}",
    ):
        labels.check_no_leakage(settings, leaky, expected, sample=1000)


def test_build_training_set_recomputes_a_sample_and_fails_on_a_leaking_committed_snapshot(tmp_path: Path) -> None:
    # Arrange: an engine lake; the committed snapshot of hour 2 then gets one feature from hour 6
    settings = engine_lake(tmp_path)
    lake = Lake(settings.lake)
    config = labels.TrainingConfig(max_snapshots=8, min_train_rows=1, min_positives=0, leakage_users=10)
    clean = labels.build_training_set(settings, T0 + 7 * HOUR, "v1", config=config)
    manifest = read_json(lake.path(TRAINING, "v1") / MANIFEST)
    leaky_hour = T0 + 2 * HOUR
    assert leaky_hour in clean.train_snapshots
    rows = snapshot_rows(settings, leaky_hour)
    later = snapshot_rows(settings, T0 + 6 * HOUR)
    later = later.filter(pc.is_in(later.column(USER_ID), value_set=rows.column(USER_ID)))
    leaky = rows.set_column(rows.column_names.index("count_view_24h"), "count_view_24h", later.column("count_view_24h"))
    write_snapshot(lake, leaky_hour, leaky)

    # Act / Assert
    assert manifest["leakage_check"]["columns"] == len(SNAPSHOT_SCHEMA) - 2
    assert manifest["leakage_check"]["rows"] == 10 * (len(clean.train_snapshots) + 1)
    with pytest.raises(labels.LeakageError, match="count_view_24h"):
        labels.build_training_set(settings, T0 + 7 * HOUR, "v2", config=replace(config, leakage_users=1000))


# ---- examples at hours without a committed snapshot ---------------------------------------------------------------
POINT_HOURS = 16
CHECKPOINT_EVERY = 4  # the "daily" lake commits hours 3, 7, 11 and 15


def hourly_and_checkpoint_lakes(tmp_path: Path) -> tuple[Settings, Settings]:
    """Two lakes over the same staged events: one built and published every hour (the reference), one
    built in bulk with a checkpoint every ``CHECKPOINT_EVERY`` hours (what warm-up and replay do)."""
    hourly = replace(make_settings(tmp_path / "hourly"), buckets=2, start=T0)
    sparse = replace(hourly, lake=tmp_path / "sparse" / "lake")
    events = engine_events(hourly, POINT_HOURS)
    for h, batch in enumerate(events):
        hour = T0 + h * HOUR
        stage(hourly, hour, batch)
        stage(sparse, hour, batch)
        for b in range(hourly.buckets):
            build_profiles(hourly, hour, b)
        publish_profiles(hourly, hour)
    last = T0 + (POINT_HOURS - 1) * HOUR
    for b in range(sparse.buckets):
        build_profiles_range(sparse, T0, last, b, first_hour=T0, snapshot_every=CHECKPOINT_EVERY)
    for hour in hour_range(T0, last):
        if Lake(sparse.lake).committed(PROFILES, hour, 0):  # built as a checkpoint: publish it as warm_up does
            publish_profiles(sparse, hour)
    return hourly, sparse


def assert_same_examples(ours: pa.Table, theirs: pa.Table) -> None:
    """Same users, snapshots and labels in the same order; every feature equal as ``verify`` compares
    (floats to 1e-9 relative: decayed counters merged in other batches differ in the last bit)."""
    from profile_engine.profiles.verify import compare_tables

    assert ours.column_names == theirs.column_names
    for column in (USER_ID, SNAPSHOT_HOUR, labels.LABEL):
        assert ours.column(column).equals(theirs.column(column))
    for hour in pc.unique(theirs.column(SNAPSHOT_HOUR)):
        mine, reference = (t.filter(pc.equal(t.column(SNAPSHOT_HOUR), hour)) for t in (ours, theirs))
        comparison = compare_tables("examples", reference, mine.cast(reference.schema), [USER_ID])
        assert comparison.equal, comparison.lines()


@pytest.fixture(scope="module")
def point_lakes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Settings]:
    return hourly_and_checkpoint_lakes(tmp_path_factory.mktemp("point"))


def test_a_lake_with_checkpoints_only_yields_examples_at_every_reproducible_hour_equal_to_the_hourly_path(
    point_lakes: tuple[Settings, Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: the same events; the sparse lake committed snapshots at 3, 7, 11 and 15 only
    hourly, sparse = point_lakes
    committed = [T0 + h * HOUR for h in (3, 7, 11, 15)]
    assert labels.committed_profile_hours(Lake(sparse.lake)) == committed
    monkeypatch.setenv("PROFILE_ENGINE_TRAINING_STRIDE_HOURS", "1")
    # 20 rows per snapshot of about 40 users: users are sampled before the reconstruction
    config = labels.TrainingConfig(max_rows=20 * 13, min_train_rows=1, min_positives=0, leakage_users=10)
    hour = T0 + 15 * HOUR  # newest final snapshot 12 (horizon 1 + lateness 2)

    # Act
    reference = labels.build_training_set(hourly, hour, "v1", config=config)
    rebuilt = labels.build_training_set(sparse, hour, "v1", config=config)

    # Assert: every hour is an example, features (RFM too) and labels equal the hourly path's
    assert rebuilt.train_snapshots == reference.train_snapshots == tuple(T0 + h * HOUR for h in range(12))
    assert rebuilt.eval_snapshot == reference.eval_snapshot == T0 + 12 * HOUR
    per_hour = pc.value_counts(reference.train.column(SNAPSHOT_HOUR)).field("counts").to_pylist()
    assert max(per_hour) == 20 and len(per_hour) == 12
    for ours, theirs in ((rebuilt.train, reference.train), (rebuilt.eval, reference.eval)):
        assert_same_examples(ours, theirs)
    manifest = read_json(Lake(sparse.lake).path(TRAINING, "v1") / MANIFEST)
    assert manifest["snapshots_read"] == [format_hour(h) for h in committed[:3]]
    assert manifest["snapshots_reconstructed"] == [
        format_hour(T0 + h * HOUR) for h in range(13) if T0 + h * HOUR not in committed
    ]
    assert manifest["stride_hours"] == 1
    assert manifest["leakage_check"]["rows"] == 10 * 13  # the recompute ran on reconstructed hours too
    reference_manifest = read_json(Lake(hourly.lake).path(TRAINING, "v1") / MANIFEST)
    assert reference_manifest["snapshots_reconstructed"] == []


def test_labels_of_reconstructed_examples_are_those_of_the_staged_purchases(
    point_lakes: tuple[Settings, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange
    _, sparse = point_lakes
    monkeypatch.setenv("PROFILE_ENGINE_TRAINING_STRIDE_HOURS", "1")
    config = labels.TrainingConfig(max_snapshots=6, min_train_rows=1, min_positives=0, leakage_users=3)

    # Act
    built = labels.build_training_set(sparse, T0 + 15 * HOUR, "v2", config=config)

    # Assert: most examples come from rebuilt hours; relabelling them from staged events gives the same labels
    assert len(read_json(Lake(sparse.lake).path(TRAINING, "v2") / MANIFEST)["snapshots_reconstructed"]) >= 4
    relabelled = labels.label_examples(sparse, built.train.drop_columns([labels.LABEL]))
    assert relabelled.column(labels.LABEL).equals(built.train.column(labels.LABEL))
    assert labels.positives(built.train) > 0


def test_stride_and_reproducible_hours(point_lakes: tuple[Settings, Settings], tmp_path: Path) -> None:
    # Arrange: a copy of the sparse lake whose staging of hour 5 (bucket 1) is lost
    import shutil

    _, sparse = point_lakes
    copy = replace(sparse, lake=tmp_path / "lake")
    shutil.copytree(sparse.lake, copy.lake)
    every = [T0 + h * HOUR for h in range(POINT_HOURS)]

    # Act / Assert: from the empty start, then from the checkpoint of hour 3
    assert sorted(reproducible_hours(sparse, 1)) == every
    assert reproducible_hours(sparse, 1)[T0 + 5 * HOUR] == T0 + 3 * HOUR
    assert reproducible_hours(sparse, 1)[T0 + 2 * HOUR] == T0 - HOUR  # before the first staged hour: empty
    shutil.rmtree(Lake(copy.lake).partition(STAGING, T0 + 5 * HOUR, 1))
    gap = reproducible_hours(copy, 1)
    assert sorted(gap) == [h for h in every if h not in (T0 + 5 * HOUR, T0 + 6 * HOUR, T0 + 7 * HOUR)]
    assert gap[T0 + 9 * HOUR] == T0 + 7 * HOUR
    # stride 4: the reproducible hours whose end is a multiple of 4 h, plus every committed hour
    hours, reconstructed = labels.training_hours(copy, 4)
    assert hours == [T0 + h * HOUR for h in (3, 7, 11, 15)] and reconstructed == []
    hours, reconstructed = labels.training_hours(copy, 2)
    assert hours == [T0 + h * HOUR for h in (1, 3, 7, 9, 11, 13, 15)]
    assert reconstructed == [T0 + h * HOUR for h in (1, 9, 13)]
    assert labels.training_hours(copy, 0) == ([T0 + h * HOUR for h in (3, 7, 11, 15)], [])
