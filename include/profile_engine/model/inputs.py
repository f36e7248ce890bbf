"""Profile columns as network inputs: the numeric matrix, categorical strings, vocabularies and the
normalisation statistics. docs/model.md (Model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.contracts.profiles import PROFILE_SCHEMA

NUMERIC_INPUT = "numeric"
CATEGORICAL_PREFIX = "cat__"


def numeric_matrix(table: pa.Table, numeric: Sequence[str]) -> np.ndarray:
    """Numeric features as a float32 matrix, nulls as NaN (the model handles missing values itself)."""
    out = np.empty((table.num_rows, len(numeric)), dtype=np.float32, order="F")  # a column at a time: contiguous
    for i, column in enumerate(numeric):
        # float64 in Arrow, float32 on assignment: one rounding to float32 whatever the column's type
        out[:, i] = pc.cast(table.column(column), pa.float64()).to_numpy(zero_copy_only=False)  # nulls are NaN
    return np.ascontiguousarray(out)  # rows contiguous, as the forward pass reads them (one transposing copy)


def category_strings(table: pa.Table, column: str) -> pa.ChunkedArray:
    """A categorical feature as Arrow strings, null as the empty string (what the networks' lookups see)."""
    return pc.fill_null(pc.cast(table.column(column), pa.string()), "")


def categorical_values(table: pa.Table, column: str) -> np.ndarray:
    """A categorical feature as an (n, 1) array of strings, null as the empty string."""
    values = category_strings(table, column)
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=object).reshape(-1, 1)


def model_inputs(table: pa.Table, numeric: Sequence[str], categorical: Sequence[str]) -> dict[str, Any]:
    """The Keras input dict of a profile table (string inputs as TensorFlow tensors, which Keras requires)."""
    import tensorflow as tf

    inputs: dict[str, Any] = {NUMERIC_INPUT: numeric_matrix(table, numeric)}
    for column in categorical:
        inputs[CATEGORICAL_PREFIX + column] = tf.constant(categorical_values(table, column), dtype=tf.string)
    return inputs


def numpy_inputs(table: pa.Table, numeric: Sequence[str], categorical: Sequence[str]) -> dict[str, Any]:
    """The input dict of ``model_inputs`` for ``inference.InferenceNetwork``: strings stay Arrow arrays."""
    inputs: dict[str, Any] = {NUMERIC_INPUT: numeric_matrix(table, numeric)}
    for column in categorical:
        inputs[CATEGORICAL_PREFIX + column] = category_strings(table, column)
    return inputs


def vocabulary(values: np.ndarray, limit: int) -> list[str]:
    """The ``limit`` most frequent values (ties by value), so the lookup is deterministic."""
    levels, counts = np.unique(values.ravel().astype(str), return_counts=True)
    order = np.lexsort((levels, -counts))[:limit]
    return sorted(levels[order].tolist())


# A training column whose standard deviation (after FillMissing) is at or below this is treated as constant.
# An equality test with 0 missed float32 rounding (a variance of 1.7e-7 on a column constant in fact, so a
# 2 at scoring became about +970 standard units); log-compressed real features vary far more than 1e-3.
NORMALISATION_MIN_STD = 1e-3
# Standardised numeric inputs are clipped to +-NORMALISED_CLIP (the Clip layer after Normalization).
NORMALISED_CLIP = 6.0


def normalisation_variance(filled: np.ndarray) -> np.ndarray:
    """Per-column variance for the Normalization layer, 1 where the training column is (nearly) constant.

    Keras divides by ``max(sqrt(variance), 1e-7)``: a column constant in training (a
    missing-indicator of a feature that was never missing, a count that was always 0)
    would turn any other value at scoring into about 1e7 and pin the score at 0 or 1.
    Unit variance leaves such a column at its offset from the training value, as
    scikit-learn's StandardScaler does. "Constant" is a tolerance
    (``NORMALISATION_MIN_STD``, variance computed in float64), not an equality test.
    """
    variance = np.asarray(filled, dtype=np.float64).var(axis=0)
    return np.where(variance > NORMALISATION_MIN_STD**2, variance, 1.0)


# Quantile bins per non-count numeric input of the network (``ModelConfig.quantile_bins``): 16 is the one setting
# measured on real data (BENCHMARKS.md, issue 20).
QUANTILE_BINS = 16
# Quantile edges closer than this (relative to max(1, |edge|)) are merged: a float32 bin that narrow has a width
# that can be flushed to 0 (a subnormal), and (x - left) / 0 is NaN.
QUANTILE_MIN_WIDTH = 1e-6


def count_columns(numeric: Sequence[str]) -> list[str]:
    """The count-like inputs of ``numeric``: the profile's int64 columns (event counts, lifetime and per window,
    orders, sessions, open and repeatedly viewed items, distinct categories); not the rates, recencies, money,
    decayed values (float64), the RFM scores or the peak hour (int8), nor a column the profile schema lacks."""
    return [c for c in numeric if c in PROFILE_SCHEMA.names and PROFILE_SCHEMA.field(c).type == pa.int64()]


def quantile_edges(fit_rows: pa.Table, numeric: Sequence[str], bins: int) -> list[np.ndarray]:
    """Per column of ``numeric``, the float32 quantiles (0, 1/bins, .., 1) of its non-missing values in
    ``fit_rows``, edges closer than ``QUANTILE_MIN_WIDTH`` (relative) to the previous kept one dropped.

    A column with a single distinct value (or no value at all) gets one edge: no bins, so the
    network sees only its is-missing indicator (``network.custom_layers()["QuantilePieces"]``).
    """
    matrix = numeric_matrix(fit_rows, numeric).astype(np.float64)
    edges = []
    for j in range(matrix.shape[1]):
        present = matrix[:, j][~np.isnan(matrix[:, j])]
        quantiles = np.quantile(present, np.linspace(0, 1, bins + 1)) if present.size else np.zeros(1)
        kept = [quantiles[0]]
        for edge in quantiles[1:]:
            if edge - kept[-1] > QUANTILE_MIN_WIDTH * max(1.0, abs(edge)):
                kept.append(edge)
        edges.append(np.asarray(kept, dtype=np.float32))
    return edges
