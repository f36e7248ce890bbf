"""Population features (RFM over every bucket of a snapshot) and the profile change log. docs/features.md."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.contracts.profiles import (
    CHANGE_NEW,
    CHANGE_REMOVED,
    CHANGE_TRACKED,
    CHANGE_UPDATED,
    CHANGED,
    CHANGES_SCHEMA,
    FREQUENCY_ORDERS,
    MONETARY_TOTAL,
    PROFILE_SCHEMA,
    RECENCY_HOURS,
    RFM_F,
    RFM_M,
    RFM_R,
    RFM_SEGMENT,
    RFM_SEGMENTS,
    SNAPSHOT_SCHEMA,
    USER_ID,
    after_column,
    before_column,
    snapshot_schema,
)
from profile_engine.contracts.traits import TRAIT_PREFIX, Trait
from profile_engine.hours import format_hour
from profile_engine.lake import db
from profile_engine.profiles.ranks import Buckets, RankCuts, RankSpec, quintile_positions, rank_cuts, score_sql


def rfm_specs() -> list[RankSpec]:
    """The R, F and M rankings of ``add_population_features`` as ``RankSpec`` (for per-bucket cut points)."""

    def spec(value: str, where: str, descending: bool = False) -> RankSpec:
        salted = f"md5_number('{value}:' || {USER_ID})"
        return RankSpec(
            name=value,
            value=value,
            value_type="DOUBLE" if PROFILE_SCHEMA.field(value).type == pa.float64() else "BIGINT",
            tiebreak=salted,
            tiebreak_type="UHUGEINT",
            bin=f"({salted} >> 112)",
            where=where,
            positions=quintile_positions,
            descending=descending,
        )

    buyers = f"{FREQUENCY_ORDERS} >= 1"
    return [
        spec(RECENCY_HOURS, buyers, descending=True),
        spec(FREQUENCY_ORDERS, buyers),
        spec(MONETARY_TOTAL, f"{buyers} AND {MONETARY_TOTAL} IS NOT NULL"),
    ]


RFM_COLUMNS = (RFM_R, RFM_F, RFM_M)


def rfm_cuts(buckets: Buckets) -> list[RankCuts]:
    """The RFM cut points over every bucket's profiles (one bucket in memory at a time); see ``rank_cuts``."""
    return rank_cuts(rfm_specs(), buckets)


def add_population_features(profiles: pa.Table, cuts: Sequence[RankCuts] | None = None) -> pa.Table:
    """Add RFM scores and segment over the whole population; return ``PROFILE_COLUMNS`` in order, then the
    declared trait columns ``profiles`` carries (``trait_*``, in their order).

    Scores are 1-5 quintiles among the n users with at least one order (the monetary
    score among those whose spend is known): users are ranked by the value, ties broken
    by a stable hash of ``user_id`` salted with the score's column (``md5_number``), and the user at rank k (1..n)
    scores ``1 + floor(5 (k - 1/2) / n)``. Every score is reached once there are 5 buyers,
    even when most of them tie (55% of a shop's customers with one order); a better
    value never scores lower; a lone buyer scores 3. Nothing depends on row order or
    float noise (money is in cents, recency in exact hours). Users without orders get
    null scores and the segment ``no_orders``.

    ``cuts`` (``rfm_cuts`` over every bucket): ``profiles`` is one bucket and scores come
    from the population's cut points, the same scores as ranking the whole population.
    """
    base = profiles.select([*SNAPSHOT_SCHEMA.names, *_trait_columns(profiles.schema)])
    champions, loyal, potential, new_customer, at_risk, hibernating, lost, no_orders = RFM_SEGMENTS

    def score(value: str, order: str = "") -> str:
        # centred rank over the buyers, ties broken by a stable hash of the user salted per
        # score (one hash for all three would tie low F to low R: correlated scores)
        rank = f"row_number() OVER (ORDER BY {value} {order}, md5_number('{value}:' || user_id), user_id)"
        return f"CAST(least(5, 1 + floor(5 * ({rank} - 0.5) / count(*) OVER ())) AS TINYINT)"

    if cuts is None:
        scored = f"""
            WITH s AS (
                SELECT user_id, {score(RECENCY_HOURS, "DESC")} AS r, {score(FREQUENCY_ORDERS)} AS f
                FROM p WHERE {FREQUENCY_ORDERS} >= 1
            ), sm AS (
                SELECT user_id, {score(MONETARY_TOTAL)} AS m
                FROM p WHERE {FREQUENCY_ORDERS} >= 1 AND {MONETARY_TOTAL} IS NOT NULL
            ), q AS (SELECT p.*, r, f, m FROM p LEFT JOIN s USING (user_id) LEFT JOIN sm USING (user_id))"""
    else:
        r, f, m = (score_sql(c) for c in cuts)
        scored = f"WITH q AS (SELECT p.*, {r} AS r, {f} AS f, {m} AS m FROM p)"
    # Only the ranked columns go through DuckDB, with each row's position: the whole bucket (120 columns) went
    # there and back for four new ones, 0.6 CPU s a bucket of the 1M-user hour (issue 19, BENCHMARKS.md). The
    # rows are then taken in the query's order (none when already in user order) and the scores appended.
    ranked = base.select([USER_ID, RECENCY_HOURS, FREQUENCY_ORDERS, MONETARY_TOTAL]).append_column(
        _ROW, pa.array(np.arange(base.num_rows, dtype=np.int64))
    )
    con = db.cursor()
    try:
        con.register("p", ranked)
        added = con.sql(
            f"""
            {scored}
            SELECT {_ROW}, r AS {RFM_R}, f AS {RFM_F}, m AS {RFM_M},
                   CASE WHEN r IS NULL THEN '{no_orders}'
                        WHEN r >= 4 AND f >= 4 THEN '{champions}'
                        WHEN r >= 3 AND f >= 3 THEN '{loyal}'
                        WHEN r >= 4 AND f <= 1 THEN '{new_customer}'
                        WHEN r >= 3 THEN '{potential}'
                        WHEN f >= 3 THEN '{at_risk}'
                        WHEN r = 2 THEN '{hibernating}'
                        ELSE '{lost}' END AS {RFM_SEGMENT}
            FROM q ORDER BY user_id, {_ROW}
            """
        ).to_arrow_table()
    finally:
        con.close()
    order = np.asarray(added.column(_ROW))
    table = base if np.array_equal(order, np.arange(base.num_rows)) else base.take(pa.array(order))
    for name in (RFM_R, RFM_F, RFM_M, RFM_SEGMENT):
        table = table.append_column(name, added.column(name))
    schema = pa.schema([*PROFILE_SCHEMA, *(profiles.schema.field(n) for n in _trait_columns(profiles.schema))])
    return table.select(schema.names).cast(schema)


_ROW = "__row"  # a row's position in the bucket, carried through ``add_population_features``' query


def _trait_columns(schema: pa.Schema) -> list[str]:
    return [n for n in schema.names if n.startswith(TRAIT_PREFIX)]


def profile_changes(previous: pa.Table | None, current: pa.Table) -> pa.Table:
    """Every user whose lifecycle stage, RFM segment or top interest changed since ``previous``.

    One row per such user with the value before and after of each tracked column
    (``CHANGE_TRACKED``) and ``changed``, the tracked columns that differ. ``change`` is
    ``new`` (not in ``previous``: before is null), ``removed`` (not in ``current``, e.g.
    erased: after is null) or ``updated``. Nulls compare as values (a first top interest
    is a change). With no previous snapshot every user is new. Sorted by ``user_id``.
    """
    prev = current.select([USER_ID, *CHANGE_TRACKED]).schema.empty_table() if previous is None else previous
    con = db.cursor()
    try:
        con.register("p", prev.select([USER_ID, *CHANGE_TRACKED]))
        con.register("c", current.select([USER_ID, *CHANGE_TRACKED]))
        diffs = ", ".join(f"CASE WHEN p.{c} IS DISTINCT FROM c.{c} THEN '{c}' END" for c in CHANGE_TRACKED)
        values = ", ".join(f"p.{c} AS {before_column(c)}, c.{c} AS {after_column(c)}" for c in CHANGE_TRACKED)
        table = con.sql(
            f"""
            SELECT * FROM (
                SELECT coalesce(c.user_id, p.user_id) AS user_id,
                       CASE WHEN p.user_id IS NULL THEN '{CHANGE_NEW}' WHEN c.user_id IS NULL THEN '{CHANGE_REMOVED}'
                            ELSE '{CHANGE_UPDATED}' END AS change,
                       list_filter([{diffs}], lambda x: x IS NOT NULL) AS {CHANGED},
                       {values}
                FROM p FULL OUTER JOIN c ON p.user_id = c.user_id
            ) WHERE change <> '{CHANGE_UPDATED}' OR len({CHANGED}) > 0
            ORDER BY user_id
            """
        ).to_arrow_table()
    finally:
        con.close()
    return table.select(CHANGES_SCHEMA.names).cast(CHANGES_SCHEMA)


def change_counts(changes: pa.Table) -> dict[str, int]:
    """What the run report counts: users in the change log, by kind and by tracked column."""
    counts = {"users": changes.num_rows, CHANGE_NEW: 0, CHANGE_REMOVED: 0} | dict.fromkeys(CHANGE_TRACKED, 0)
    counts |= value_counts(changes.column("change"))
    counts.pop(CHANGE_UPDATED, None)
    return counts | value_counts(pc.list_flatten(changes.column(CHANGED)))


def population_snapshot(bucket_profiles: list[pa.Table], hour: datetime, traits: tuple[Trait, ...] | None) -> pa.Table:
    """The whole snapshot of ``hour`` from its per-bucket profiles: uniqueness check, then RFM.

    ``traits``: the declared traits the buckets were built with (``load_traits``), whose
    columns every part must have; None keeps the trait columns of the first part (a
    snapshot republished as it was, e.g. after an erasure).
    Raises ``ValueError`` counting duplicated users (a user in two buckets); it does not
    name them, since the message reaches task logs, which must hold no raw user id.
    """
    schema = snapshot_schema(traits) if traits is not None else _carried(bucket_profiles)
    combined = pa.concat_tables([conform(t, schema, hour, f"part {i}") for i, t in enumerate(bucket_profiles)])
    if pc.count_distinct(combined.column(USER_ID)).as_py() != combined.num_rows:
        counts = combined.group_by(USER_ID).aggregate([(USER_ID, "count")])
        dupes = counts.filter(pc.greater(counts.column(f"{USER_ID}_count"), 1)).num_rows
        raise ValueError(
            f"user_id not unique in snapshot {format_hour(hour)}: {dupes} user(s) in more than one bucket "
            "(ids not logged; find them in the hour's profiles/ partitions)"
        )
    return add_population_features(combined)


def conform(part: pa.Table, schema: pa.Schema, hour: datetime, label: str) -> pa.Table:
    """``part`` (profiles of one bucket) as ``schema`` (``snapshot_schema`` of the loaded traits), or a clear error."""
    missing = [n for n in schema.names if n not in part.column_names]
    if missing:
        raise ValueError(
            f"profiles of snapshot {format_hour(hour)} ({label}) lack column(s) {missing}: built with other "
            "declared traits; build the hour's buckets again with the loaded traits"
        )
    return part.select(schema.names).cast(schema)


def _carried(bucket_profiles: list[pa.Table]) -> pa.Schema:
    first = bucket_profiles[0].schema if bucket_profiles else SNAPSHOT_SCHEMA
    return pa.schema([*SNAPSHOT_SCHEMA, *(first.field(n) for n in _trait_columns(first))])


def value_counts(column: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """Each value's number of rows in ``column``, keyed by its text (a null as ``"None"``), in one Arrow pass."""
    counts = pc.value_counts(column)
    return {str(v.as_py()): int(n.as_py()) for v, n in zip(counts.field("values"), counts.field("counts"), strict=True)}


def add_counts(total: dict[str, int], counts: Mapping[str, int]) -> None:
    """Add ``counts`` into the running ``total`` (counts of buckets or batches summed into one)."""
    for key, value in counts.items():
        total[key] = total.get(key, 0) + value
