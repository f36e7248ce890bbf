"""Per-bucket population ranks equal the global ranks: RFM scores and propensity deciles (exactness)."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import given, settings
from hypothesis import strategies as st

from profile_engine.config import Settings
from profile_engine.contracts.events import CART, LOCAL_HOUR, PURCHASE, STAGED_SCHEMA, VIEW
from profile_engine.contracts.profiles import (
    FREQUENCY_ORDERS,
    LIFECYCLE_STAGE,
    MONETARY_TOTAL,
    RECENCY_HOURS,
    RFM_SEGMENT,
    SNAPSHOT_SCHEMA,
    USER_ID,
)
from profile_engine.contracts.scores import DECILE, MODEL_VERSION, PROPENSITY
from profile_engine.contracts.traits import load_traits
from profile_engine.hours import format_hour
from profile_engine.lake.storage import PROFILE_CHANGES, PROFILES, SCORES, STAGING, Lake
from profile_engine.model import scoring
from profile_engine.model.calibration import population_deciles
from profile_engine.model.scoring import heuristic_scores, score_table
from profile_engine.profiles.build import build_profiles, publish_profiles
from profile_engine.profiles.merge import with_local_hour
from profile_engine.profiles.population import (
    add_population_features,
    change_counts,
    population_snapshot,
    profile_changes,
    rfm_cuts,
    rfm_specs,
    value_counts,
)
from profile_engine.profiles.ranks import (
    apply_scores,
    bucket_deciles,
    decile_positions,
    deciles_of,
    quintile_positions,
    rank_cuts,
)

# a user: (frequency, recency, monetary); few distinct values so ties straddle the cuts
USERS = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 1, 1, 2, 5]),
        st.sampled_from([0.0, 3.0, 3.0, 48.0, 700.0]),
        st.one_of(st.none(), st.sampled_from([500.0, 500.0, 1999.0, 12.5])),
    ),
    max_size=40,
)


def _profiles(users: list[tuple[int, float, float | None]], prefix: str) -> pa.Table:
    n = len(users)
    columns = {f.name: pa.nulls(n, f.type) for f in SNAPSHOT_SCHEMA}
    for f in SNAPSHOT_SCHEMA:
        if not f.nullable:  # required columns: any value (RFM does not read them)
            columns[f.name] = pa.array([0 if pa.types.is_timestamp(f.type) else "x"] * n).cast(f.type)
    columns[USER_ID] = pa.array([f"{prefix}{i}" for i in range(n)], pa.string())
    columns[FREQUENCY_ORDERS] = pa.array([u[0] for u in users], pa.int64())
    columns[RECENCY_HOURS] = pa.array([u[1] for u in users], pa.float64())
    columns[MONETARY_TOTAL] = pa.array([u[2] for u in users], pa.float64())
    return pa.table(columns, schema=SNAPSHOT_SCHEMA)


def _per_bucket_rfm(buckets: list[pa.Table], coarse: bool = False) -> pa.Table:
    specs = rfm_specs()
    if coarse:  # two bins: tie groups keep many users per bin (the collect pass sorts them)
        specs = [dataclasses.replace(s, bin=f"({s.tiebreak} >> 127)") for s in specs]
    cuts = rank_cuts(specs, lambda: iter(buckets)) if coarse else rfm_cuts(lambda: iter(buckets))
    parts = [add_population_features(b, cuts) for b in buckets]
    return pa.concat_tables(parts).sort_by(USER_ID)


@settings(max_examples=60, deadline=None)
@given(st.lists(USERS, min_size=1, max_size=5), st.booleans())
def test_rfm_per_bucket_equals_global(buckets_users: list[list[tuple[int, float, float | None]]], coarse: bool) -> None:
    buckets = [_profiles(users, f"b{i}-u") for i, users in enumerate(buckets_users)]
    whole = add_population_features(pa.concat_tables(buckets)).sort_by(USER_ID)
    assert _per_bucket_rfm(buckets, coarse).equals(whole)


def test_rfm_single_buyer_and_no_buyers() -> None:
    lone = [_profiles([(1, 3.0, 500.0)], "a"), _profiles([(0, 3.0, None)] * 3, "b")]
    scored = _per_bucket_rfm(lone)
    assert scored.equals(add_population_features(pa.concat_tables(lone)).sort_by(USER_ID))
    assert scored.column("rfm_r").to_pylist() == [3, None, None, None]
    nobody = [_profiles([(0, 1.0, None)], "a"), _profiles([], "b")]
    assert _per_bucket_rfm(nobody).equals(add_population_features(pa.concat_tables(nobody)).sort_by(USER_ID))


def test_step_positions_match_the_score_formulas() -> None:
    for n in range(1, 60):
        ranks = np.arange(1, n + 1)
        quintile = np.minimum(5, 1 + np.floor(5 * (ranks - 0.5) / n)).astype(int)
        steps = quintile_positions(n)
        assert [1 + sum(p >= s for s in steps) for p in range(n)] == quintile.tolist()
        decile = 10 - (10 * (n - 1 - np.arange(n))) // n
        steps = decile_positions(n)
        assert [1 + sum(p >= s for s in steps) for p in range(n)] == decile.tolist()


SCORE_LISTS = st.lists(st.one_of(st.sampled_from([0.1, 0.1, 0.5, 0.9, float("nan")]), st.floats(0, 1)), max_size=30)


@settings(max_examples=60, deadline=None)
@given(st.lists(SCORE_LISTS, min_size=1, max_size=4))
def test_deciles_per_bucket_equal_population_deciles(buckets_scores: list[list[float]]) -> None:
    buckets = [
        pa.table({USER_ID: pa.array([f"u{i}-{j}" for j in range(len(s))], pa.string()), "s": pa.array(s, pa.float64())})
        for i, s in enumerate(buckets_scores)
    ]
    whole = pa.concat_tables(buckets)
    expected = population_deciles(whole.column(USER_ID), np.asarray(whole.column("s"), dtype=np.float64))
    _, deciles = bucket_deciles(lambda: iter(buckets))
    got = pc.fill_null(pa.concat_arrays([deciles(b) for b in buckets]), 0)
    assert np.asarray(got).tolist() == expected.tolist()


TIED_LISTS = st.lists(
    st.one_of(st.sampled_from([0.0, 0.0, 0.0, 0.25, 0.5, 0.5, -0.0, float("nan")]), st.none(), st.floats(0, 1)),
    max_size=40,
)


@settings(max_examples=80, deadline=None)
@given(st.lists(TIED_LISTS, min_size=1, max_size=4))
def test_deciles_of_equal_the_deciles_the_rank_sql_gives(buckets_scores: list[list[float | None]]) -> None:
    """``ranks.deciles_of`` (Arrow and NumPy, md5 only for the tied rows; what ``bucket_deciles`` gives) assigns
    each bucket the deciles the generic rank SQL (``apply_scores`` of the decile spec) gives, ties inside a cut's
    group, NaN and null (unranked) included."""
    buckets = [
        pa.table({USER_ID: pa.array([f"u{i}-{j}" for j in range(len(s))], pa.string()), "s": pa.array(s, pa.float64())})
        for i, s in enumerate(buckets_scores)
    ]
    ranked, deciles = bucket_deciles(lambda: iter(buckets))
    for bucket in buckets:
        got = deciles(bucket)
        assert got.type == pa.int8()
        assert got.to_pylist() == deciles_of(ranked, bucket).to_pylist()
        expected = apply_scores(bucket, [ranked], ["d"]).column("d")
        assert got.to_pylist() == expected.to_pylist()


# ---- publish_profiles one bucket at a time ---------------------------------------------------
T0 = datetime(2026, 11, 2, tzinfo=UTC)
BUCKETS = 3


def _stage(lake: Lake, hours: int) -> None:
    """60 users over ``BUCKETS`` buckets, many buyers with tied order counts and totals."""
    rng = random.Random(11)
    without_hour = pa.schema([f for f in STAGED_SCHEMA if f.name != LOCAL_HOUR])
    for h in range(hours):
        for bucket in range(BUCKETS):
            rows: list[dict[str, Any]] = []
            for i in range(bucket, 60, BUCKETS):
                if rng.random() < 0.5:
                    continue
                kind = rng.choice([VIEW, CART, PURCHASE, PURCHASE])
                rows.append(
                    {
                        "event_id": f"h{h}u{i}e{len(rows)}",
                        "user_id": f"u{i:02d}",
                        "event_type": kind,
                        "item_id": "i1",
                        "category_id": rng.choice(["c1", "c2"]),
                        "price": rng.choice([10.0, 10.0, 25.5]),
                        "quantity": 1,
                        "order_id": f"o{h}-{i}" if kind == PURCHASE else None,
                        "session_id": None,
                        "ts": T0 + timedelta(hours=h, minutes=rng.randrange(0, 60)),
                        "bucket": bucket,
                    }
                )
            table = with_local_hour(pa.Table.from_pylist(rows, schema=without_hour), "Europe/Berlin")
            lake.write_partition(STAGING, T0 + timedelta(hours=h), table, bucket=bucket)


def test_publish_profiles_per_bucket_writes_what_the_whole_population_gives(tmp_path: Path) -> None:
    cfg = Settings(lake=tmp_path, buckets=BUCKETS, start=T0, lateness_hours=2)
    lake = Lake(tmp_path)
    _stage(lake, 3)
    previous: pa.Table | None = None
    for h in range(3):
        hour = T0 + timedelta(hours=h)
        for b in range(BUCKETS):
            build_profiles(cfg, hour, b)
        parts = [lake.read(PROFILES, hour, b) for b in range(BUCKETS)]
        whole = population_snapshot(
            parts, hour, load_traits(cfg.traits)
        )  # what publish_profiles wrote before: one table of everyone
        summary = publish_profiles(cfg, hour)

        for b, part in enumerate(parts):
            mine = pc.is_in(whole.column(USER_ID), value_set=part.column(USER_ID))
            assert lake.read(PROFILES, hour, b).equals(whole.filter(mine)), (h, b)
        assert lake.read(PROFILE_CHANGES, hour).sort_by(USER_ID).equals(profile_changes(previous, whole))
        assert summary["profiles"] == whole.num_rows
        assert summary["rfm_segments"] == value_counts(whole.column(RFM_SEGMENT))
        assert summary["lifecycle"] == value_counts(whole.column(LIFECYCLE_STAGE))
        assert summary["profile_changes"] == change_counts(profile_changes(previous, whole))
        assert lake.manifest(PROFILE_CHANGES, hour)["previous_hour"] == (
            format_hour(hour - timedelta(hours=1)) if h else None
        )
        assert set(whole.column(RFM_SEGMENT).to_pylist()) - {"no_orders"}, "the lake has buyers"
        previous = whole


def test_read_scores_deciles_per_bucket_equal_the_population_deciles(tmp_path: Path) -> None:
    cfg = Settings(lake=tmp_path, buckets=BUCKETS, start=T0, lateness_hours=2)
    lake = Lake(tmp_path)
    _stage(lake, 1)
    for b in range(BUCKETS):
        build_profiles(cfg, T0, b)
    publish_profiles(cfg, T0)
    keys = []
    for b in range(BUCKETS):
        profiles = lake.read(PROFILES, T0, b)
        scores = score_table(profiles, None, heuristic=True)  # ranked by the heuristic: heavy ties
        if b == 2:  # one bucket with a model's propensities, ties included, one unscored user
            values = [None if i == 0 else [0.2, 0.2, 0.7][i % 3] for i in range(scores.num_rows)]
            scores = scores.set_column(1, PROPENSITY, pa.array(values, pa.float64()))
            scores = scores.set_column(3, MODEL_VERSION, pa.array(["v1"] * scores.num_rows))
            keys.append(np.array([np.nan if v is None else v for v in values]))
        else:
            by_user = dict(
                zip(profiles.column(USER_ID).to_pylist(), heuristic_scores(profiles, "open_cart"), strict=True)
            )
            keys.append(np.array([by_user[u] for u in scores.column(USER_ID).to_pylist()]))
        lake.write_partition(SCORES, T0, scores, bucket=b)

    whole = scoring.read_scores(lake, T0)

    expected = population_deciles(whole.column(USER_ID), np.concatenate(keys))
    assert np.asarray(pc.fill_null(whole.column(DECILE), 0)).tolist() == expected.tolist()
    assert whole.column(DECILE).null_count == 1
    for b in range(BUCKETS):
        assert scoring.read_scores(lake, T0, b).equals(whole.filter(pc.equal(pa.array(_bucket_of(whole, lake)), b)))


def _bucket_of(scores: pa.Table, lake: Lake) -> list[int]:
    where = {u: b for b in range(BUCKETS) for u in lake.read(SCORES, T0, b).column(USER_ID).to_pylist()}
    return [where[u] for u in scores.column(USER_ID).to_pylist()]
