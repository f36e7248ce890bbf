"""Drift: population stability index of features and scores between consecutive committed snapshots.
docs/model.md (Evaluation and the gate).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.config import Settings
from profile_engine.contracts.profiles import CATEGORICAL_FEATURES, NUMERIC_FEATURES, USER_ID
from profile_engine.contracts.scores import MODEL_VERSION, PROPENSITY
from profile_engine.hours import floor_hour, format_hour
from profile_engine.lake.storage import SCORES, Lake
from profile_engine.model import labels

if TYPE_CHECKING:
    from profile_engine.model.artifacts import LoadedModel


# PSI rule of thumb: below 0.1 stable, 0.1-0.25 moderate, above 0.25 a major shift worth a look.
PSI_MAJOR = 0.25


def psi(expected: np.ndarray, actual: np.ndarray, *, bins: int = 10) -> float:
    """Population stability index of a numeric variable; NaN is its own bin.

    Bins are deciles of ``expected``; empty bins get a small floor so the index stays finite.
    """
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    known = expected[~np.isnan(expected)]
    edges = np.unique(np.quantile(known, np.linspace(0, 1, bins + 1)[1:-1])) if known.size else np.array([])

    def shares(values: np.ndarray) -> np.ndarray:
        index = np.where(np.isnan(values), edges.size + 1, np.searchsorted(edges, values, side="right"))
        return np.bincount(index, minlength=edges.size + 2) / max(values.size, 1)

    return _psi_from_shares(shares(expected), shares(actual))


def psi_categorical(expected: Sequence[Any] | np.ndarray, actual: Sequence[Any] | np.ndarray) -> float:
    """Population stability index of a categorical variable (None is a category)."""
    expected_codes = np.asarray([str(v) for v in expected], dtype=object)
    actual_codes = np.asarray([str(v) for v in actual], dtype=object)
    levels, inverse = np.unique(np.concatenate([expected_codes, actual_codes]), return_inverse=True)
    first = inverse[: expected_codes.size]
    second = inverse[expected_codes.size :]
    return _psi_from_shares(
        np.bincount(first, minlength=levels.size) / max(first.size, 1),
        np.bincount(second, minlength=levels.size) / max(second.size, 1),
    )


def psi_categorical_columns(expected: pa.ChunkedArray | pa.Array, actual: pa.ChunkedArray | pa.Array) -> float:
    """``psi_categorical`` of two Arrow columns from their value counts, with no Python object per value.

    The same levels (``str`` of each value, None as ``"None"``) in the same order, so the same shares summed in
    the same order: the same float. The per-value conversion took 0.35 CPU s of the run report's drift (issue 19).
    """
    first, second = _str_counts(expected), _str_counts(actual)
    levels = sorted(first.keys() | second.keys())
    return _psi_from_shares(
        np.array([first.get(k, 0) for k in levels], dtype=np.int64) / max(len(expected), 1),
        np.array([second.get(k, 0) for k in levels], dtype=np.int64) / max(len(actual), 1),
    )


def _str_counts(column: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """Rows per ``str`` of the value (None as ``"None"``), as ``psi_categorical`` counts them."""
    counts: dict[str, int] = {}
    if len(column) == 0:
        return counts
    pairs = pc.value_counts(column)
    for value, count in zip(pairs.field("values").to_pylist(), pairs.field("counts").to_pylist(), strict=True):
        key = str(value)
        counts[key] = counts.get(key, 0) + int(count)
    return counts


def _psi_from_shares(expected: np.ndarray, actual: np.ndarray, floor: float = 1e-4) -> float:
    e = np.maximum(expected, floor)
    a = np.maximum(actual, floor)
    return float(np.sum((a - e) * np.log(a / e)))


def _numeric(table: pa.Table, column: str) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.cast(table.column(column), pa.float64()), np.nan))


def feature_drift(
    previous: pa.Table, current: pa.Table, numeric: Sequence[str], categorical: Sequence[str]
) -> dict[str, float]:
    """PSI of every feature from the previous snapshot to the current one."""
    drift = {c: psi(_numeric(previous, c), _numeric(current, c)) for c in numeric}
    drift.update({c: psi_categorical_columns(previous.column(c), current.column(c)) for c in categorical})
    return drift


def snapshot_drift(settings: Settings, hour: datetime, model: LoadedModel, *, max_rows: int = 50_000) -> dict[str, Any]:
    """PSI of the model's features and of its score from the previous committed snapshot to the hour's.

    Both snapshots are sampled by the same user hash, so a stable population compares
    with itself.
    """
    lake = Lake(settings.lake)
    earlier = [h for h in labels.committed_profile_hours(lake) if h < hour]
    if not earlier or not labels.profile_committed(lake, hour):
        return {"previous_hour": None, "features": {}, "score": None, "reason": "no two committed snapshots to compare"}
    previous = labels.sample_snapshot(lake, earlier[-1], max_rows, settings.seed, "drift")
    current = labels.sample_snapshot(lake, hour, max_rows, settings.seed, "drift")
    features = feature_drift(previous, current, model.numeric, model.categorical)
    worst = max(features, key=lambda k: features[k]) if features else None
    return {
        "previous_hour": format_hour(earlier[-1]),
        "features": features,
        "max_feature": worst,
        "score": psi(model.predict(previous), model.predict(current)),
    }


def _scores_of(lake: Lake, hour: datetime) -> tuple[np.ndarray, list[str]] | None:
    """Non-null propensities and the model versions of an hour's committed scores, or None.

    One data file (bucket) at a time: the values in file order; of the versions, each file's
    distinct ones (a list of every row's version held a Python string per profile).
    """
    import pyarrow.parquet as pq

    try:
        files = lake.data_files(SCORES, hour)
    except FileNotFoundError:
        return None
    values: list[np.ndarray] = []
    versions: set[Any] = set()
    for file in files:
        table = pq.read_table(file, columns=[PROPENSITY, MODEL_VERSION])
        part = np.asarray(pc.fill_null(table.column(PROPENSITY), np.nan), dtype=np.float64)
        values.append(part[~np.isnan(part)])
        versions.update(pc.unique(table.column(MODEL_VERSION)).to_pylist())
    return np.concatenate(values), sorted(versions)


def hourly_drift(settings: Settings, hour: datetime, *, max_rows: int = 50_000, top: int = 5) -> dict[str, Any]:
    """Drift of the hour's snapshot and scores against the previous committed snapshot, for the run report.

    Feature PSI over the profile contract's features (same users sampled in both
    snapshots), score PSI from the ``scores/`` layer when both hours were scored
    (no model is loaded). Lists the ``top`` drifting features and every feature
    above ``PSI_MAJOR``.
    """

    hour = floor_hour(hour)
    lake = Lake(settings.lake)
    earlier = [h for h in labels.committed_profile_hours(lake) if h < hour]
    if not earlier or not labels.profile_committed(lake, hour):
        return {"previous_hour": None, "reason": "no two committed snapshots to compare"}
    previous_hour = earlier[-1]
    # Only the compared columns: two whole snapshots of 654k users took 2-5 s to read. One bucket at a time
    # (``sample_snapshot``): the whole snapshots held 0.6 KB per profile of the hour (issue 19).
    wanted = [USER_ID, *NUMERIC_FEATURES, *CATEGORICAL_FEATURES]
    previous = labels.sample_snapshot(lake, previous_hour, max_rows, settings.seed, "drift", wanted)
    current = labels.sample_snapshot(lake, hour, max_rows, settings.seed, "drift", wanted)
    shared = set(previous.column_names) & set(current.column_names)
    features = feature_drift(
        previous,
        current,
        [c for c in NUMERIC_FEATURES if c in shared],
        [c for c in CATEGORICAL_FEATURES if c in shared],
    )
    ranked = sorted(features.items(), key=lambda item: (-item[1], item[0]))
    before, now = _scores_of(lake, previous_hour), _scores_of(lake, hour)
    score: dict[str, Any] | None = None
    if before is not None and now is not None and before[0].size and now[0].size:
        score = {"psi": psi(before[0], now[0]), "versions": {"previous": before[1], "current": now[1]}}
    return {
        "previous_hour": format_hour(previous_hour),
        "score": score,
        "top_features": {k: round(v, 4) for k, v in ranked[:top]},
        "major_shifts": [k for k, v in ranked if v > PSI_MAJOR],
        "features": {k: round(v, 6) for k, v in ranked},
    }
