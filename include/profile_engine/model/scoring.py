"""The scoring stage: score a bucket of the hour's snapshot with the champion (else the baseline, else
the first-hour heuristic) and read scores back with population deciles. docs/model.md (Scoring).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.config import Settings
from profile_engine.contracts.profiles import USER_ID
from profile_engine.contracts.scores import DECILE, MODEL_VERSION, NO_MODEL, PROPENSITY, SCORES_SCHEMA
from profile_engine.hours import floor_hour, format_hour
from profile_engine.lake import faults
from profile_engine.lake.storage import MANIFEST, PROFILES, SCORES, Lake
from profile_engine.model import labels, registry
from profile_engine.model.artifacts import LoadedModel, load_model
from profile_engine.profiles.ranks import bucket_deciles, deciles_of


def score_table(profiles: pa.Table, model: LoadedModel | None, *, heuristic: bool = False) -> pa.Table:
    """The scores table of profile rows, sorted by user; deciles are left null (see ``read_scores``).

    Without a model: null propensity and ``HEURISTIC_VERSION`` when ``heuristic`` (the
    deciles then rank the heuristic), else ``NO_MODEL``.
    """
    n = profiles.num_rows
    if model is None:
        propensity = pa.nulls(n, pa.float64())
        decile = pa.nulls(n, pa.int8())
        version = HEURISTIC_VERSION if heuristic else NO_MODEL
    else:
        propensity = pa.array(model.predict(profiles), pa.float64())
        decile = pa.nulls(n, pa.int8())  # a population property: filled by read_scores over every bucket
        version = model.label
    scores = pa.table(
        [profiles.column(USER_ID), propensity, decile, pa.repeat(pa.scalar(version, pa.string()), n)],
        schema=SCORES_SCHEMA,
    )
    return scores.take(pc.sort_indices(scores, [(USER_ID, "ascending")]))  # sort 4 columns, not the profile


def scoring_model(settings: Settings, hour: datetime) -> LoadedModel | None:
    """The model that scores ``hour``: the champion as of the hour from the promotion log (the kind the
    gate promoted; entries written before candidates existed promoted the network), else the baseline of
    the newest version trained at or before it, else None."""
    entry = registry.champion_as_of(settings, hour)
    if entry is not None:
        return load_model(settings, entry["version"], registry.entry_kind(entry))
    version = registry.newest_model_at_or_before(settings, hour)
    return load_model(settings, version, "baseline") if version is not None else None


# Rules a shop can use before any model exists, and that every challenger must beat before the first promotion.
# Each maps profile rows to a score in [0, 1) (higher = more likely to buy); a rank, not a probability.
HEURISTICS: dict[str, str] = {
    "recency": "fewer hours since the last event first",
    "open_cart": "open cart (carted in the last 24 h and not bought) first, then more past purchases",
}
HEURISTIC_COLUMNS: tuple[str, ...] = (
    "hours_since_last_event",
    "count_cart_24h",
    "count_purchase_24h",
    "count_purchase_lifetime",
)
# What scores record as model_version when a new shop is ranked by the open-cart heuristic (no model yet).
FIRST_HOUR_HEURISTIC = "open_cart"
HEURISTIC_VERSION = "heuristic-" + FIRST_HOUR_HEURISTIC


def _column_or_nan(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return np.asarray(pc.fill_null(pc.cast(table.column(column), pa.float64()), np.nan), dtype=np.float64)


def heuristic_scores(table: pa.Table, name: str) -> np.ndarray:
    """The ``HEURISTICS[name]`` score of profile rows in [0, 1); missing columns or values rank lowest.

    ``recency``: 1 / (1 + hours since the last event). ``open_cart``: 0.5 for an open
    cart (a cart in the last 24 h and no purchase in them) plus 0.5 * p / (1 + p) for p
    lifetime purchases, so an open cart outranks any purchase history and purchases
    order the rest.
    """
    if name == "recency":
        hours = _column_or_nan(table, "hours_since_last_event")
        return np.where(np.isnan(hours), 0.0, 1.0 / (1.0 + np.maximum(hours, 0.0)))
    if name == "open_cart":
        carts = np.nan_to_num(_column_or_nan(table, "count_cart_24h"))
        bought = np.nan_to_num(_column_or_nan(table, "count_purchase_24h"))
        purchases = np.maximum(np.nan_to_num(_column_or_nan(table, "count_purchase_lifetime")), 0.0)
        return np.asarray(0.5 * ((carts > 0) & (bought == 0)) + 0.5 * purchases / (1.0 + purchases), dtype=np.float64)
    raise ValueError(f"unknown heuristic {name!r}; known: {sorted(HEURISTICS)}")


def _score_buckets(lake: Lake, hour: datetime) -> list[int | None]:
    """The committed buckets of the hour's scores ([None]: written as one partition); raises when none."""
    base = lake.partition(SCORES, hour)
    found = sorted(int(m.parent.name.split("=")[1]) for m in base.glob(f"bucket=*/{MANIFEST}"))
    if found:
        return list(found)
    lake.data_files(SCORES, hour)  # raises FileNotFoundError naming the partition
    return [None]


def _ranking_key(lake: Lake, hour: datetime, bucket: int | None, scores: pa.Table) -> pa.Table:
    """``user_id`` and the value deciles rank (``s``): the propensity, or the heuristic where it ranked the hour."""
    versions = np.asarray(scores.column(MODEL_VERSION).to_pylist(), dtype=object)
    key = np.asarray(pc.fill_null(scores.column(PROPENSITY), np.nan), dtype=np.float64)
    by_heuristic = versions == HEURISTIC_VERSION
    if by_heuristic.any():
        import pyarrow.parquet as pq

        present = set(pq.read_schema(lake.data_files(PROFILES, hour, bucket)[0]).names)
        wanted = [USER_ID, *[c for c in HEURISTIC_COLUMNS if c in present]]
        profiles = lake.read(PROFILES, hour, bucket, columns=wanted)
        ranked = heuristic_scores(profiles, FIRST_HOUR_HEURISTIC)
        position = pc.index_in(scores.column(USER_ID), value_set=profiles.column(USER_ID))
        found = np.asarray(pc.fill_null(position, -1), dtype=np.int64)
        key = np.where(by_heuristic & (found >= 0), ranked[np.maximum(found, 0)], key)
    return pa.table({USER_ID: scores.column(USER_ID), "s": pa.array(key, pa.float64())})


def read_scores(lake: Lake, hour: datetime, bucket: int | None = None) -> pa.Table:
    """The hour's committed scores (``bucket``, else every bucket) with ``propensity_decile`` on the scored population.

    Deciles are ranks over all buckets (the ranking of ``population_deciles``), found
    one bucket at a time: per-bucket summaries give the nine cut points
    (``profiles.ranks.bucket_deciles``), then each bucket's deciles; cut points of one
    bucket, or of the training scores, do not make tenths of the population. Rows
    scored by the first-hour heuristic (null propensity) are ranked by that heuristic,
    recomputed from the hour's committed profiles. Scores whose every row already
    carries a decile (written by older code) are returned as written. Raises
    ``FileNotFoundError`` when no scores are committed.
    """
    read = score_reader(lake, hour)
    wanted = _score_buckets(lake, hour) if bucket is None else [bucket]
    return pa.concat_tables([read(b) for b in wanted])


def score_reader(lake: Lake, hour: datetime) -> Callable[[int | None], pa.Table]:
    """A function giving one bucket's committed scores with deciles over every bucket (``read_scores``).

    The cut points are found once, so a caller walking the buckets reads each bucket's
    scores twice (summary, then its rows), not once per bucket per call. Raises
    ``FileNotFoundError`` when no scores are committed.
    """
    buckets = _score_buckets(lake, hour)
    written_with_deciles = all(
        t.num_rows and t.column(DECILE).null_count == 0
        for t in (lake.read(SCORES, hour, b, columns=[DECILE]) for b in buckets)
    )

    def keys() -> Iterator[pa.Table]:
        for b in buckets:
            yield _ranking_key(lake, hour, b, lake.read(SCORES, hour, b, columns=[USER_ID, PROPENSITY, MODEL_VERSION]))

    ranked = None if written_with_deciles else bucket_deciles(keys)[0]

    def read(bucket: int | None) -> pa.Table:
        scores = lake.read(SCORES, hour, bucket)
        if ranked is None:
            return scores  # written with deciles (by older code, which used training cut points)
        column = deciles_of(ranked, _ranking_key(lake, hour, bucket, scores))
        return scores.set_column(scores.schema.get_field_index(DECILE), DECILE, column)

    return read


def score_profiles(settings: Settings, hour: datetime, bucket: int, *, run_id: str = "manual") -> dict[str, Any]:
    """Stage: score one bucket of the hour's committed snapshot and write ``scores/`` for it.

    Uses the champion as of the hour, else the newest baseline (and says so), else
    writes null scores with model version ``none``.
    """
    hour = floor_hour(hour)
    lake = Lake(settings.lake)
    if not labels.profile_committed(lake, hour):
        raise FileNotFoundError(f"profile snapshot of {format_hour(hour)} is not committed; publish_profiles first")
    model = scoring_model(settings, hour)
    columns = [USER_ID] if model is None else model.columns
    scores = score_table(lake.read(PROFILES, hour, bucket, columns=columns), model, heuristic=True)
    champion = registry.champion_as_of(settings, hour) is not None
    kind = "heuristic" if model is None else ("champion" if champion else "baseline")
    lake.write_partition(
        SCORES, hour, scores, bucket=bucket, run_id=run_id, extra={MODEL_VERSION: scores_version(model), "model": kind}
    )
    faults.maybe_fail(faults.BETWEEN_SCORE_BUCKETS)
    summary: dict[str, Any] = {
        "status": "scored" if model is not None else "heuristic",
        "bucket": bucket,
        "rows": scores.num_rows,
        "model": kind,
        MODEL_VERSION: scores_version(model),
    }
    if model is not None:
        summary["engine"] = model.engine  # "keras" means the version lacks the export: see export_inference
        summary["kind"] = model.kind
    if model is None:
        summary["reason"] = (
            f"no model trained yet: deciles rank the {HEURISTICS[FIRST_HOUR_HEURISTIC]} heuristic; "
            "propensity is null (no labels to calibrate a probability)"
        )
    elif not champion:
        summary["reason"] = "no champion promoted yet: scored with the calibrated baseline"
    return summary


def scores_version(model: LoadedModel | None) -> str:
    """The ``model_version`` value scores record for ``model`` (None: the first-hour heuristic)."""
    return HEURISTIC_VERSION if model is None else model.label
