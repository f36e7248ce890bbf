"""The purchase-propensity model: training, the saved model directory and hourly scoring (DESIGN.md §5).

A Keras 3 network on TensorFlow carries its own preprocessing, so a saved
``model.keras`` scores raw profile columns: numeric features are log-compressed
(sign * log1p |x|, so counts and money have comparable scales), missing values
become 0 plus an is-missing indicator, and a ``Normalization`` layer holds the
training statistics; categorical features go through ``StringLookup`` and an
``Embedding``. Dense layers with dropout, class weights for the rare positive
class and early stopping on the newest training snapshot (a time-based
validation slice) follow. Platt scaling fitted on that slice turns the score
into a probability. The baseline is logistic regression on the same
preprocessing (one-hot categories), trained without class weights, so its
output is a probability too.

``models/<version>/`` holds ``model.keras``, ``baseline.keras``,
``calibration.json``, ``deciles.json`` (cut points of the training scores, so
deciles are stable across hours), ``features.json``, ``metrics.json`` and
``model_card.md``; ``evaluate`` adds ``evaluation.json`` and rewrites the card with
its plots (ROC, PR, calibration, lift by decile, permutation importance; PNGs
drawn with matplotlib's Agg backend). Each network is also exported for
TensorFlow-free scoring (``model.inference.json/.npz``,
``baseline.inference.json/.npz``; ``profile_engine.model.inference``): loading a
version for scoring then never imports TensorFlow, whose import costs more than
the prediction itself. Versions written before that fall back to Keras
(``export_inference`` adds the files). TensorFlow is only imported inside
functions: importing this module stays cheap for DAG parsing.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.config import Settings
from profile_engine.contracts.profiles import CATEGORICAL_FEATURES, NUMERIC_FEATURES, SNAPSHOT_HOUR, USER_ID
from profile_engine.contracts.scores import DECILE, MODEL_VERSION, NO_MODEL, PROPENSITY, SCORES_SCHEMA
from profile_engine.hours import floor_hour, format_hour
from profile_engine.lake import db, faults
from profile_engine.lake.storage import MANIFEST, MODELS, PROFILES, SCORES, TRAINING, Lake, read_json
from profile_engine.model import evaluate, gbm, inference, labels, registry
from profile_engine.model.registry import BASELINE_FILE, MODEL_FILE, model_version

# The model directory's file names live in the registry; re-exported here for writers and tests.
from profile_engine.model.registry import CARD_FILE as CARD_FILE
from profile_engine.model.registry import EVALUATION_FILE as EVALUATION_FILE
from profile_engine.model.registry import METRICS_FILE as METRICS_FILE

if TYPE_CHECKING:
    from profile_engine.model.sequence import SequenceConfig, SequenceModel

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
DECILES_FILE = "deciles.json"
FEATURES_FILE = "features.json"
# The model card's plots (PNG, next to model_card.md).
PLOT_FILES: dict[str, str] = {
    "roc": "roc.png",
    "pr": "pr.png",
    "calibration": "calibration.png",
    "lift": "lift_by_decile.png",
    "importance": "importance.png",
}

# The TensorFlow-free export of each network (spec, weights), next to its .keras file.
NETWORK_FILES: dict[str, str] = {"model": MODEL_FILE, "baseline": BASELINE_FILE}
INFERENCE_FILES: dict[str, tuple[str, str]] = {
    kind: inference.inference_file_names(name) for kind, name in NETWORK_FILES.items()
}

NUMERIC_INPUT = "numeric"
CATEGORICAL_PREFIX = "cat__"

BASELINE_SUFFIX = "-baseline"
# The behaviour-sequence encoder over the users' last events, alone and with the aggregate inputs
# (``profile_engine.model.sequence``; trained when ``Settings.sequence_candidates`` is on).
SEQUENCE_KINDS: tuple[str, ...] = ("sequence", "combined")
# What a version can score with (``load_model``'s kinds), in the gate's order of preference: the network,
# gradient-boosted trees, the sequence kinds (they cost a TensorFlow import and a staging read at scoring),
# the baseline.
MODEL_KINDS: tuple[str, ...] = ("model", "lightgbm", *SEQUENCE_KINDS, "baseline")


@dataclass(frozen=True)
class ModelConfig:
    """Network and training knobs; the defaults train a demo set (~20k rows) in a few seconds on 2 cores."""

    # One hidden layer: on simulated shops (2,000 users, 32 snapshots) it matched the logistic baseline's
    # AUC (0.738 vs 0.740) where 64 -> 32 overfit (0.713) and trained in about half the time.
    hidden_units: tuple[int, ...] = (32,)
    dropout: float = 0.3
    learning_rate: float = 3e-3
    baseline_learning_rate: float = 0.05  # a convex model with one layer: large steps converge in a few epochs
    batch_size: int = 512
    max_epochs: int = 30
    patience: int = 3
    max_vocabulary: int = 500
    embedding_dim: int = 8


def retrain_due(settings: Settings, hour: datetime) -> bool:
    """Whether retraining is due at ``hour``: hours since the epoch divisible by ``retrain_every_hours``.

    A pure function of the hour, so a rerun makes the same decision.
    """
    return (int(floor_hour(hour).timestamp()) // 3600) % settings.retrain_every_hours == 0


# ---- inputs and network --------------------------------------------------------------------------------------------
def numeric_matrix(table: pa.Table, numeric: Sequence[str]) -> np.ndarray:
    """Numeric features as a float32 matrix, nulls as NaN (the model handles missing values itself)."""
    out = np.empty((table.num_rows, len(numeric)), dtype=np.float32)
    for i, column in enumerate(numeric):
        # float64 in Arrow, float32 on assignment: one rounding to float32 whatever the column's type
        out[:, i] = pc.cast(table.column(column), pa.float64()).to_numpy(zero_copy_only=False)  # nulls are NaN
    return out


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


@functools.cache
def custom_layers() -> dict[str, Any]:
    """Layers of this package that saved models reference; registered once per process."""
    import keras

    @keras.saving.register_keras_serializable(package="profile_engine")
    class FillMissing(keras.layers.Layer):  # type: ignore[misc]
        """Compress magnitudes (sign * log1p |x|), replace NaN by 0 and append one is-missing indicator per column."""

        def call(self, x: Any) -> Any:
            ops = keras.ops
            missing = ops.isnan(x)
            filled = ops.where(missing, ops.zeros_like(x), x)
            compressed = ops.sign(filled) * ops.log1p(ops.abs(filled))
            return ops.concatenate([compressed, ops.cast(missing, x.dtype)], axis=-1)

        def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
            width = input_shape[-1]
            return (*input_shape[:-1], None if width is None else 2 * width)

    @keras.saving.register_keras_serializable(package="profile_engine")
    class Clip(keras.layers.Layer):  # type: ignore[misc]
        """Clip standardised inputs to ``[-limit, limit]``: a value far outside the training range
        (a new category of behaviour, a unit error upstream) cannot push the score to 0 or 1."""

        def __init__(self, limit: float = NORMALISED_CLIP, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.limit = float(limit)

        def call(self, x: Any) -> Any:
            return keras.ops.clip(x, -self.limit, self.limit)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "limit": self.limit}

        def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
            return input_shape

    return {"FillMissing": FillMissing, "Clip": Clip}


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


def build_network(
    train: pa.Table, numeric: Sequence[str], categorical: Sequence[str], config: ModelConfig, *, logistic: bool
) -> Any:
    """An uncompiled Keras model whose preprocessing is fitted on ``train``.

    ``logistic=True`` gives the baseline: one-hot categories and a single sigmoid
    unit on the normalised inputs; otherwise embeddings and dense layers with dropout.
    """
    import keras

    layers = custom_layers()
    fill = layers["FillMissing"]()
    numeric_in = keras.Input(shape=(len(numeric),), dtype="float32", name=NUMERIC_INPUT)
    filled_train = np.asarray(fill(numeric_matrix(train, numeric)))
    norm = keras.layers.Normalization(mean=filled_train.mean(axis=0), variance=normalisation_variance(filled_train))
    parts = [layers["Clip"](NORMALISED_CLIP, name="clip")(norm(fill(numeric_in)))]
    inputs = [numeric_in]
    for column in categorical:
        cat_in = keras.Input(shape=(1,), dtype="string", name=CATEGORICAL_PREFIX + column)
        vocab = vocabulary(categorical_values(train, column), config.max_vocabulary)
        if logistic:
            parts.append(keras.layers.StringLookup(vocabulary=vocab, output_mode="one_hot")(cat_in))
        else:
            index = keras.layers.StringLookup(vocabulary=vocab)(cat_in)
            embedded = keras.layers.Embedding(len(vocab) + 1, config.embedding_dim)(index)
            parts.append(keras.layers.Flatten()(embedded))
        inputs.append(cat_in)
    x = keras.layers.Concatenate()(parts) if len(parts) > 1 else parts[0]
    if not logistic:
        for units in config.hidden_units:
            x = keras.layers.Dense(units, activation="relu")(x)
            x = keras.layers.Dropout(config.dropout)(x)
    # Starting at the base rate (the baseline sees unweighted classes) saves the first epochs.
    rate = float(np.clip(np.mean(np.asarray(train.column(labels.LABEL))), 1e-4, 1 - 1e-4)) if logistic else 0.5
    bias = keras.initializers.Constant(float(np.log(rate / (1 - rate))))
    output = keras.layers.Dense(1, activation="sigmoid", bias_initializer=bias, name="propensity")(x)
    return keras.Model(inputs, output, name="baseline" if logistic else "propensity")


# ---- calibration and deciles ---------------------------------------------------------------------------------------
def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(q / (1 - q))


# Calibration: a Platt fit whose slope leaves (0, PLATT_MAX_SLOPE] or a slice with fewer than
# CALIBRATION_MIN_CLASS rows of either class falls back to the intercept only (slope 1: the raw ranking and
# spread are kept, the mean moves to the base rate). Probabilities are kept inside CALIBRATION_BOUNDS.
PLATT_MAX_SLOPE = 20.0
PLATT_RIDGE = 1.0  # Gaussian prior on (slope - 1), in pseudo-observations (the intercept is free)
CALIBRATION_MIN_CLASS = 10
CALIBRATION_BOUNDS = (1e-4, 1 - 1e-4)
# A network whose output spreads less than this (std of logit over the calibration slice) has not learnt.
FLAT_LOGIT_STD = 1e-3


def fit_platt(raw: np.ndarray, y: np.ndarray, *, slope: bool = True, iterations: int = 100) -> dict[str, Any]:
    """Platt scaling ``p = sigmoid(a * logit(raw) + b)`` by damped Newton steps on Platt's smoothed targets.

    The smoothed targets ((N+ + 1)/(N+ + 2), 1/(N- + 2)) keep a small slice from
    producing overconfident extremes; a ridge prior (``PLATT_RIDGE``) pulls the slope
    towards 1, so a separable slice or a near-constant
    score (the curvature in ``a`` vanishes) cannot run the coefficients to infinity.
    ``slope=False`` fits the intercept only (``a`` = 1).
    """
    y = np.asarray(y, dtype=np.float64)
    n_pos = y.sum()
    n_neg = y.size - n_pos
    target = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    x = np.column_stack([_logit(raw), np.ones(y.size)])
    free = np.array([slope, True])
    prior = np.array([1.0, 0.0])
    ridge = np.array([PLATT_RIDGE, 1e-9])  # a free intercept: a base rate of 1% needs b near -4.6
    w = prior.copy()

    def loss(v: np.ndarray) -> float:
        z = x @ v
        return float(np.sum(np.logaddexp(0, z) - target * z) + np.sum(ridge / 2 * (v - prior) ** 2))

    current = loss(w)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(x @ w)))
        gradient = (x.T @ (p - target) + ridge * (w - prior)) * free
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + np.diag(ridge)
        hessian = np.where(np.outer(free, free), hessian, np.eye(2))
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-6 and not loss(w - scale * step) <= current:  # halve until the loss does not rise
            scale /= 2
        w = w - scale * step
        current = loss(w)
        if np.max(np.abs(scale * step)) < 1e-10:
            break
    return {"method": "platt" if slope else "platt_intercept", "a": float(w[0]), "b": float(w[1])}


def fit_calibration(raw: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The calibration of one network from its scores on the held-out (newest) time slice.

    Regularised Platt scaling, checked: a finite slope in (0, ``PLATT_MAX_SLOPE``]
    (monotone, no step function) and enough rows of both classes. Otherwise the
    intercept alone is fitted and ``fallback`` says why; ``flat`` notes a network
    whose output hardly varies (it has not learnt: any calibration of it is the base
    rate). Outputs are clipped to ``CALIBRATION_BOUNDS`` by ``apply_calibration``.
    """
    y = np.asarray(y, dtype=np.float64)
    raw = np.asarray(raw, dtype=np.float64)
    positives, rows = int(y.sum()), int(y.size)
    spread = float(np.std(_logit(raw))) if rows else 0.0
    fallback = None
    if min(positives, rows - positives) < CALIBRATION_MIN_CLASS:
        fallback = (
            f"{positives} positives and {rows - positives} negatives in the calibration slice "
            f"(fewer than {CALIBRATION_MIN_CLASS} of a class): slope kept at 1, intercept fitted"
        )
    else:
        platt = fit_platt(raw, y)
        if not (np.isfinite(platt["a"]) and np.isfinite(platt["b"]) and 0 < platt["a"] <= PLATT_MAX_SLOPE):
            fallback = f"platt slope {platt['a']:.4g} outside (0, {PLATT_MAX_SLOPE}]: slope kept at 1, intercept fitted"
    fitted = fit_platt(raw, y, slope=False) if fallback else platt
    return {
        **fitted,
        "bounds": list(CALIBRATION_BOUNDS),
        "rows": rows,
        "positives": positives,
        "logit_std": spread,
        "flat": bool(spread < FLAT_LOGIT_STD),
        "fallback": fallback,
    }


def calibration_note(calibration: Mapping[str, Any] | None) -> str | None:
    """A short sentence on what went wrong with a calibration (fallback, flat network), or None."""
    if not calibration:
        return None
    notes = []
    if calibration.get("flat"):
        notes.append(
            f"output nearly constant on the calibration slice (logit std {calibration['logit_std']:.2g}): "
            "the model did not learn"
        )
    if calibration.get("fallback"):
        notes.append(f"calibration fell back ({calibration['fallback']})")
    return "; ".join(notes) or None


def apply_calibration(raw: np.ndarray, calibration: Mapping[str, Any] | None) -> np.ndarray:
    """Calibrated probabilities (identity without a calibration), inside the calibration's bounds if it has any."""
    if calibration is None:
        return np.asarray(raw, dtype=np.float64)
    p = np.asarray(1 / (1 + np.exp(-(calibration["a"] * _logit(raw) + calibration["b"]))), dtype=np.float64)
    bounds = calibration.get("bounds")
    return np.clip(p, bounds[0], bounds[1]) if bounds else p


def decile_cut_points(scores: np.ndarray) -> list[float]:
    """The nine cut points (10th..90th percentiles) of the training scores (``deciles.json``, for reference).

    Scoring does not use them: tied scores at a cut all went up, so the top decile held a
    quarter of the users. Hourly deciles come from ``population_deciles``.
    """
    return [float(v) for v in np.quantile(np.asarray(scores, dtype=np.float64), np.linspace(0.1, 0.9, 9))]


def assign_deciles(scores: np.ndarray, cut_points: Sequence[float]) -> np.ndarray:
    """Decile 1-10 (10 = highest) of each score against stored cut points; a score on a cut goes up."""
    return (1 + np.searchsorted(np.asarray(cut_points), np.asarray(scores), side="right")).astype(np.int8)


def population_deciles(user_ids: pa.Array | pa.ChunkedArray, scores: np.ndarray) -> np.ndarray:
    """Decile 1-10 (10 = highest) of every user by rank in the scored population; 0 where the score is NaN.

    Users are ordered by score, ties by ``md5(user_id)`` (stable across processes,
    versions and row orders), and the user with t users above it (of n) gets
    ``10 - floor(10 t / n)``: every decile holds n/10 users within one user, however many
    scores are tied, and the highest score is in decile 10 even with fewer than ten users. The cut between two deciles may fall inside a group of equal
    scores; which of those users go up is decided by the hash, the same every hour.
    """

    values = np.asarray(scores, dtype=np.float64)
    scored = ~np.isnan(values)
    out = np.zeros(values.size, dtype=np.int8)
    n = int(scored.sum())
    if n == 0:
        return out
    index = np.flatnonzero(scored)
    ids = pc.cast(user_ids, pa.string()).take(pa.array(index))
    table = pa.table({"i": pa.array(index, pa.int64()), "u": ids, "s": pa.array(values[scored])})
    con = db.connect()
    try:
        con.register("population", table)
        order = con.execute("SELECT i FROM population ORDER BY s, md5(u), u").fetchnumpy()["i"]
    finally:
        con.close()
    from_top = np.arange(n - 1, -1, -1, dtype=np.int64)  # 0 for the highest score
    out[np.asarray(order, dtype=np.int64)] = (10 - (10 * from_top) // n).astype(np.int8)
    return out


# ---- training ------------------------------------------------------------------------------------------------------
@dataclass
class FittedModels:
    """The fitted network, its calibration and cut points, the baseline and the gradient-boosted trees."""

    model: Any
    baseline: Any
    calibration: dict[str, Any]
    baseline_calibration: dict[str, Any]
    cut_points: list[float]
    baseline_cut_points: list[float]
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    report: dict[str, Any]
    lightgbm: gbm.GBMModel | None = None
    lightgbm_calibration: dict[str, Any] | None = None
    lightgbm_cut_points: list[float] | None = None
    # The sequence kinds (``SEQUENCE_KINDS``) when trained, each with its calibration; their cut points.
    sequences: dict[str, SequenceModel] = field(default_factory=dict)
    sequence_cut_points: dict[str, list[float]] = field(default_factory=dict)


# Rows per predict step: Keras' per-step overhead dominated at 4,096 (measured on 164k profiles:
# 1.4 s at 4,096 against 0.4 s at 65,536); 65,536 rows of float32 features are a few MB.
PREDICT_BATCH = 65_536


def predict_network(network: Any, inputs: Mapping[str, Any]) -> np.ndarray:
    """A Keras network's raw output for an input dict, as a flat float64 array (``PREDICT_BATCH`` rows a step)."""
    return np.asarray(network.predict(dict(inputs), batch_size=PREDICT_BATCH, verbose=0), dtype=np.float64).ravel()


def validation_split(train: pa.Table) -> np.ndarray:
    """True for the rows of the newest training snapshot: the time-based validation (and calibration) slice.

    Every candidate that trains on a version's rows uses it (``fit_models``, ``sequence.train_sequence``).
    Raises ``labels.InsufficientData`` when the rows hold a single snapshot.
    """
    snapshots = train.column(SNAPSHOT_HOUR)
    is_validation = np.asarray(pc.fill_null(pc.equal(snapshots, pc.max(snapshots)), False), dtype=bool)
    if is_validation.all():
        raise labels.InsufficientData("the training rows hold a single snapshot: no time-based validation slice")
    return is_validation


def class_weights(y: np.ndarray) -> dict[int, float]:
    """Keras class weights that balance the classes of labels ``y`` (each class weighs half of the rows)."""
    n_pos = max(float(np.sum(y)), 1.0)
    return {0: y.size / (2 * max(y.size - n_pos, 1.0)), 1: y.size / (2 * n_pos)}


def _take(inputs: Mapping[str, Any], mask: np.ndarray) -> dict[str, Any]:
    import tensorflow as tf

    return {k: (v[mask] if isinstance(v, np.ndarray) else tf.boolean_mask(v, mask)) for k, v in inputs.items()}


def fit_network(
    network: Any,
    fit: tuple[Any, np.ndarray],
    validation: tuple[Any, np.ndarray],
    class_weight: dict[int, float] | None,
    learning_rate: float,
    config: Any,
) -> int:
    """Train a Keras binary classifier with early stopping on the validation slice's AUC; returns the epochs run.

    ``config`` carries ``patience``, ``max_epochs`` and ``batch_size`` (``ModelConfig`` or a sequence config);
    the best weights are restored. Shared by the aggregate network, its baseline and the sequence encoders.
    """
    import keras

    network.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc")],
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_auc", mode="max", patience=config.patience, restore_best_weights=True
    )
    history = network.fit(
        fit[0],
        fit[1],
        validation_data=validation,
        epochs=config.max_epochs,
        batch_size=config.batch_size,
        class_weight=class_weight,
        callbacks=[stop],
        shuffle=True,
        verbose=0,
    )
    return len(history.history["loss"])


def fit_models(
    train: pa.Table,
    numeric: Sequence[str],
    categorical: Sequence[str],
    *,
    config: ModelConfig | None = None,
    seed: int = 7,
    threads: int = 1,
    gbm_config: gbm.GBMConfig | None = None,
) -> FittedModels:
    """Fit network, baseline and LightGBM, each with its calibration, on a training table with ``LABEL``
    and ``SNAPSHOT_HOUR``.

    Rows of the newest snapshot are the validation slice: early stopping watches
    its AUC and Platt scaling is fitted on it; the older rows fit the weights.
    ``threads`` is LightGBM's thread count (its trees are reproducible for a given count).
    """
    import keras
    import tensorflow as tf

    config = config or ModelConfig()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    is_validation = validation_split(train)
    y = np.asarray(train.column(labels.LABEL), dtype=np.float32)
    inputs = model_inputs(train, numeric, categorical)
    fit_in, val_in = _take(inputs, ~is_validation), _take(inputs, is_validation)
    fit_y, val_y = y[~is_validation], y[is_validation]
    fit_rows = train.filter(pa.array(~is_validation))
    class_weight = class_weights(fit_y)

    model = build_network(fit_rows, numeric, categorical, config, logistic=False)
    model_epochs = fit_network(model, (fit_in, fit_y), (val_in, val_y), class_weight, config.learning_rate, config)
    baseline = build_network(fit_rows, numeric, categorical, config, logistic=True)
    baseline_epochs = fit_network(
        baseline, (fit_in, fit_y), (val_in, val_y), None, config.baseline_learning_rate, config
    )

    # Both networks are calibrated on the held-out newest slice: the network's class weights distort its
    # output, and the baseline, fitted on older snapshots, misses the slice's base rate (0.33 against 0.16).
    calibration = fit_calibration(predict_network(model, val_in), val_y)
    baseline_calibration = fit_calibration(predict_network(baseline, val_in), val_y)
    # Gradient-boosted trees on the same rows, validation slice and calibration (the analyst's first try).
    validation_rows = train.filter(pa.array(is_validation))
    trees = gbm.fit_gbm(
        fit_rows, fit_y, validation_rows, val_y, numeric, categorical, seed=seed, threads=threads, config=gbm_config
    )
    trees_calibration = fit_calibration(trees.predict(validation_rows), val_y)
    return FittedModels(
        model=model,
        baseline=baseline,
        calibration=calibration,
        baseline_calibration=baseline_calibration,
        cut_points=decile_cut_points(apply_calibration(predict_network(model, inputs), calibration)),
        baseline_cut_points=decile_cut_points(
            apply_calibration(predict_network(baseline, inputs), baseline_calibration)
        ),
        numeric=tuple(numeric),
        categorical=tuple(categorical),
        report={
            "fit_rows": int(fit_y.size),
            "validation_rows": int(val_y.size),
            "class_weight": {str(k): v for k, v in class_weight.items()},
            "epochs": {"model": model_epochs, "baseline": baseline_epochs},
            "lightgbm": {k: trees.info[k] for k in ("best_iteration", "rounds")},
        },
        lightgbm=trees,
        lightgbm_calibration=trees_calibration,
        lightgbm_cut_points=decile_cut_points(apply_calibration(trees.predict(train), trees_calibration)),
    )


def fit_sequences(
    settings: Settings,
    fitted: FittedModels,
    train: pa.Table,
    *,
    config: SequenceConfig | None = None,
    model_config: ModelConfig | None = None,
) -> None:
    """Fit the sequence kinds on the rows ``fitted`` was fitted on and add them (with cut points) to it.

    The users' sequences are read from staging once for both kinds; the combined kind uses
    the aggregate features of ``fitted``. Imports TensorFlow (as training does anyway).
    """
    from profile_engine.model import sequence

    sequences = sequence.sequence_inputs(settings, train, config)
    for kind in SEQUENCE_KINDS:
        trained = sequence.train_sequence(
            settings,
            train,
            kind=kind,
            numeric=fitted.numeric,
            categorical=fitted.categorical,
            config=config,
            model_config=model_config,
            sequences=sequences,
        )
        fitted.sequences[kind] = trained
        fitted.sequence_cut_points[kind] = decile_cut_points(trained.predict(train, sequences))
        fitted.report.setdefault("sequences", {})[kind] = trained.report


# ---- the model directory -------------------------------------------------------------------------------------------
def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, indent=2, sort_keys=True, default=str).encode()


def _keras_bytes(network: Any, scratch: Path, name: str) -> bytes:
    path = scratch / name
    network.save(path)
    return path.read_bytes()


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(
    version: str,
    training: Mapping[str, Any],
    features: Mapping[str, Any],
    metrics: Mapping[str, Any],
    evaluation: Mapping[str, Any] | None = None,
) -> str:
    """The human-readable card of a version (Markdown): data windows and sizes, base rates, features,
    metrics with intervals, the gate decision, drift, and links to the plots once evaluated."""
    horizon = training["label_horizon_hours"]
    train_snapshots = training["train_snapshots"]
    first_window = label_window(train_snapshots[0], horizon)
    eval_window = label_window(training["eval_snapshot"], horizon)
    lines = [
        f"# Model card: {version}",
        "",
        f"Purchase propensity: the probability that a user purchases within {horizon} h after the end of a "
        "profile snapshot. Candidates, each with Platt calibration on the newest training snapshot: the Keras "
        "network with its own preprocessing (the main model), gradient-boosted trees (LightGBM)"
        + (
            ", the behaviour-sequence encoder over each user's last events alone (sequence) and with the "
            "network's inputs (combined)"
            if any(kind in metrics.get("eval", {}) for kind in SEQUENCE_KINDS)
            else ""
        )
        + " and the baseline, logistic regression on the network's preprocessing; the gate promotes at most one.",
        "",
        "## Data",
        "",
        f"- training hour: {training['training_hour']}",
        f"- training snapshots: {train_snapshots[0]} .. {train_snapshots[-1]} ({len(train_snapshots)} snapshots; "
        "the newest is the validation and calibration slice)",
        f"- training label windows: {first_window[0]} .. {label_window(train_snapshots[-1], horizon)[1]}",
        f"- training rows: {training['train_rows']}, positives: {training['train_positives']} "
        f"(base rate {_rate(training['train_positives'], training['train_rows'])})",
        f"- evaluation snapshot (out of time): {training['eval_snapshot']}, label window "
        f"{eval_window[0]} .. {eval_window[1]}",
        f"- evaluation rows: {training['eval_rows']}, positives: {training['eval_positives']} "
        f"(base rate {_rate(training['eval_positives'], training['eval_rows'])})",
        f"- labels final after horizon {horizon} h + lateness {training['lateness_hours']} h",
        "",
        "## Features",
        "",
        f"- numeric ({len(features['numeric'])}): {', '.join(features['numeric'])}",
        f"- categorical ({len(features['categorical'])}): {', '.join(features['categorical']) or 'none'}",
        "",
        "## Metrics on the evaluation snapshot",
    ]
    if evaluation is None:
        lines += ["", "| model | " + " | ".join(evaluate.HIGHER_IS_BETTER) + " |"]
        lines += ["|---" * (len(evaluate.HIGHER_IS_BETTER) + 1) + "|"]
        for name, values in metrics["eval"].items():
            lines.append(f"| {name} | " + " | ".join(_fmt(values[k]) for k in evaluate.HIGHER_IS_BETTER) + " |")
        lines += ["", "## Gate", "", "Not evaluated yet."]
        return "\n".join(lines) + "\n"
    names = list(evaluation["metrics"])
    compared = evaluation.get("compared_with", "reference")  # evaluations written before 2026-12 say "reference"
    chosen = registry.evaluated_candidate(dict(evaluation))
    lines += [
        "",
        f"Reference: {evaluation['reference']}. 95% paired bootstrap intervals in brackets; "
        f"the last column is the interval of {chosen} minus {compared}. Heuristics are ranks: "
        "only their ranking metrics are shown.",
        "",
        "| metric | " + " | ".join(names) + " | difference |",
        "|---" * (len(names) + 2) + "|",
    ]
    intervals = evaluation["intervals"]
    difference = intervals.get(f"{chosen} - {compared}", {})
    for key in evaluate.HIGHER_IS_BETTER:
        cells = [
            f"{_fmt(evaluation['metrics'][n][key])} [{_fmt(intervals[n][key][0])}, {_fmt(intervals[n][key][1])}]"
            for n in names
        ]
        diff = f"[{_fmt(difference[key][0])}, {_fmt(difference[key][1])}]" if key in difference else ""
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {diff} |")
    if "model_uncalibrated" in metrics.get("eval", {}):
        raw = metrics["eval"]["model_uncalibrated"]
        lines += ["", f"Before calibration: log loss {_fmt(raw['log_loss'])}, ECE {_fmt(raw['ece'])}."]
    decision = evaluation["decision"]
    verdict = "promoted" if evaluation["promoted"] else "not promoted"
    config = decision.get("config") or {}
    lines += [
        "",
        "## Gate",
        "",
        f"- rule: floors {config.get('floors')}, primary metric {config.get('primary_metric')} "
        f"(margin {config.get('margin')}), guard margins {config.get('margins')}",
        f"- reference: {evaluation['reference']}",
        f"- decision: {verdict}{' (forced)' if evaluation['forced'] else ''}; " + "; ".join(decision["reasons"]),
    ]
    choice = decision.get("choice") or {}
    if choice:
        lines.append(
            f"- candidate: {decision.get('candidate') or 'none'} ({choice.get('reason') or choice.get('rule')}); "
            f"tie rule: {choice.get('rule')}"
        )
    for name, verdict_of in (decision.get("candidates") or {}).items():
        lines.append(
            f"  - {name}: {'passes' if verdict_of['promote'] else 'fails'}; " + "; ".join(verdict_of["reasons"])
        )
    deciding = decision.get("deciding") or {}
    if deciding:
        interval = deciding.get("interval")
        lines.append(
            f"- deciding check: {deciding['check']} on {deciding['metric']} ({_fmt(deciding['value'])}"
            + (f", 95% interval [{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else "")
            + ")"
        )
    if evaluation.get("from_hour"):
        lines.append(f"- champion from hour {evaluation['from_hour']}")
    drift = evaluation.get("drift") or {}
    if drift.get("score") is not None:
        worst = drift.get("max_feature")
        lines.append(
            f"- drift against the previous snapshot ({drift['previous_hour']}): score PSI {_fmt(drift['score'])}"
            + (f", largest feature PSI {worst} {_fmt(drift['features'][worst])}" if worst else "")
        )
    lines += [
        "",
        "## Plots",
        "",
        "![ROC curve](roc.png) ![Precision-recall curve](pr.png)",
        "",
        "![Calibration curve](calibration.png) ![Lift by decile](lift_by_decile.png)",
        "",
        "![Permutation feature importance](importance.png)",
    ]
    importance = (evaluation.get("importance") or {}).get("features") or {}
    if importance:
        lines += ["", "Permutation importance (mean AUC drop when the feature is shuffled), top 10:", ""]
        lines += [f"- {name}: {_fmt(value)}" for name, value in list(importance.items())[:10]]
    return "\n".join(lines) + "\n"


def _rate(positives: int, rows: int) -> str:
    return f"{positives / rows:.4f}" if rows else "n/a"


def label_window(snapshot: str, horizon_hours: int) -> tuple[str, str]:
    """The label window of a snapshot given as an ISO hour, as ISO hours."""
    start, end = labels.label_window(datetime.fromisoformat(snapshot), horizon_hours)
    return format_hour(start), format_hour(end)


def card_plots(curves: Mapping[str, Any], importance: Mapping[str, float]) -> dict[str, bytes]:
    """The card's PNGs (``PLOT_FILES``) from ``evaluate.card_curves`` output and permutation importance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(figure: Any) -> bytes:
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=90)
        plt.close(figure)
        return buffer.getvalue()

    models = curves["models"]
    base = curves["base_rate"]
    out: dict[str, bytes] = {}
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, c in models.items():
        auc = evaluate.auc_from_curve(c["roc"]["fpr"], c["roc"]["tpr"])
        ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="random")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve")
    ax.legend(loc="lower right")
    out[PLOT_FILES["roc"]] = png(fig)

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, c in models.items():
        ax.step(c["pr"]["recall"], c["pr"]["precision"], where="post", label=name)
    ax.axhline(base, color="grey", linestyle=":", label=f"base rate {base:.3f}")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall curve", ylim=(0, 1.02))
    ax.legend(loc="upper right")
    out[PLOT_FILES["pr"]] = png(fig)

    fig, ax = plt.subplots(figsize=(5, 4.5))
    top = 0.0
    for name, c in models.items():
        cal = c["calibration"]
        ax.plot(cal["predicted"], cal["observed"], marker="o", label=name)
        top = max(top, *cal["predicted"], *cal["observed"])
    ax.plot([0, top], [0, top], color="grey", linestyle=":", label="perfect calibration")
    ax.set(xlabel="mean predicted probability", ylabel="observed purchase rate", title="Calibration (10 bins)")
    ax.legend(loc="upper left")
    out[PLOT_FILES["calibration"]] = png(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    width = 0.8 / max(len(models), 1)
    for i, (name, c) in enumerate(models.items()):
        ax.bar(np.arange(1, 11) + (i - (len(models) - 1) / 2) * width, c["lift_by_decile"], width, label=name)
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set(xlabel="score decile (10 = highest)", ylabel="lift (rate / base rate)", title="Lift by decile")
    ax.set_xticks(range(1, 11))
    ax.legend(loc="upper left")
    out[PLOT_FILES["lift"]] = png(fig)

    shown = list(importance.items())[:20][::-1]
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.3 * len(shown) + 1)))
    ax.barh([n for n, _ in shown], [v for _, v in shown])
    ax.set(xlabel="mean AUC drop when shuffled", title="Permutation feature importance (top 20)")
    out[PLOT_FILES["importance"]] = png(fig)
    return out


def card_files(
    version: str,
    training: Mapping[str, Any],
    features: Mapping[str, Any],
    metrics: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    curves: Mapping[str, Any],
) -> dict[str, bytes]:
    """The evaluated card (``CARD_FILE``) and its plots, ready for ``update_model_dir``."""
    files = {CARD_FILE: model_card(version, training, features, metrics, evaluation).encode()}
    files.update(card_plots(curves, (evaluation.get("importance") or {}).get("features") or {}))
    return files


def write_model_dir(
    settings: Settings, version: str, fitted: FittedModels, training: labels.TrainingSet, hour: datetime, run_id: str
) -> dict[str, Any]:
    """Write ``models/<version>/`` atomically and return its metrics."""
    lake = Lake(settings.lake)
    eval_inputs = model_inputs(training.eval, fitted.numeric, fitted.categorical)
    y = np.asarray(training.eval.column(labels.LABEL), dtype=np.float64)
    raw = predict_network(fitted.model, eval_inputs)
    baseline_raw = predict_network(fitted.baseline, eval_inputs)
    metrics = {
        "eval": {
            "model": evaluate.metrics(y, apply_calibration(raw, fitted.calibration)),
            "model_uncalibrated": evaluate.metrics(y, raw),
            "baseline": evaluate.metrics(y, apply_calibration(baseline_raw, fitted.baseline_calibration)),
            "baseline_uncalibrated": evaluate.metrics(y, baseline_raw),
        },
        "training": fitted.report,
    }
    if fitted.lightgbm is not None:
        trees_raw = fitted.lightgbm.predict(training.eval)
        metrics["eval"]["lightgbm"] = evaluate.metrics(y, apply_calibration(trees_raw, fitted.lightgbm_calibration))
        metrics["eval"]["lightgbm_uncalibrated"] = evaluate.metrics(y, trees_raw)
    encoder_files: dict[str, bytes] = {}
    if fitted.sequences:
        from profile_engine.model import sequence

        eval_sequences = sequence.sequence_inputs(settings, training.eval, next(iter(fitted.sequences.values())).config)
        for kind, trained in fitted.sequences.items():
            sequence_raw = trained.predict_raw(training.eval, eval_sequences)
            metrics["eval"][kind] = evaluate.metrics(y, apply_calibration(sequence_raw, trained.calibration))
            metrics["eval"][f"{kind}_uncalibrated"] = evaluate.metrics(y, sequence_raw)
    fitted_on = training.summary()["train_snapshots"][-1]
    calibrations: dict[str, Any] = {
        **fitted.calibration,
        "fitted_on": fitted_on,
        "baseline": {**fitted.baseline_calibration, "fitted_on": fitted_on},
    }
    cut_points: dict[str, Any] = {"model": fitted.cut_points, "baseline": fitted.baseline_cut_points}
    tree_files: dict[str, bytes] = {}
    if fitted.lightgbm is not None:
        calibrations["lightgbm"] = {**(fitted.lightgbm_calibration or {}), "fitted_on": fitted_on}
        cut_points["lightgbm"] = fitted.lightgbm_cut_points
        tree_files = fitted.lightgbm.files()
    cut_points.update(fitted.sequence_cut_points)
    features = {"numeric": list(fitted.numeric), "categorical": list(fitted.categorical), "label": labels.LABEL}
    training_info = {
        **training.summary(),
        "training_hour": format_hour(hour),
        "label_horizon_hours": settings.label_horizon_hours,
        "lateness_hours": settings.lateness_hours,
    }
    scratch = lake.tmp_dir()
    try:
        networks = {"model": fitted.model, "baseline": fitted.baseline}
        saved = {kind: _keras_bytes(networks[kind], scratch, name) for kind, name in NETWORK_FILES.items()}
        for trained in fitted.sequences.values():
            encoder_files.update(sequence.sequence_files(trained, scratch))
        files = [
            (MODEL_FILE, saved["model"]),
            (BASELINE_FILE, saved["baseline"]),
            *[
                item
                for kind, network in networks.items()
                for item in inference_files(
                    network,
                    kind,
                    saved[kind],
                    numeric=fitted.numeric,
                    categorical=fitted.categorical,
                    check_rows=training.eval,
                ).items()
            ],
            *tree_files.items(),
            *encoder_files.items(),
            (CALIBRATION_FILE, _json_bytes(calibrations)),
            (DECILES_FILE, _json_bytes(cut_points)),
            (FEATURES_FILE, _json_bytes(features)),
            (METRICS_FILE, _json_bytes(metrics)),
            (CARD_FILE, model_card(version, training_info, features, metrics).encode()),
        ]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lake.write_dir(
        lake.path(MODELS, version),
        files,
        {"version": version, "training": training_info, "seed": settings.seed, "run_id": run_id},
    )
    return metrics


class ExportMismatch(ValueError):
    """The numpy export of a network does not reproduce its Keras predictions."""


# Rows of the evaluation set on which an export is checked against Keras, and the largest difference allowed
# (float32 forward passes in different orders differ by a few ulp; 1e-5 leaves two orders of magnitude of room).
EXPORT_CHECK_ROWS = 1_000
EXPORT_TOLERANCE = 1e-5


def inference_files(
    network: Any,
    kind: str,
    keras_bytes: bytes,
    *,
    numeric: Sequence[str],
    categorical: Sequence[str],
    check_rows: pa.Table | None = None,
) -> dict[str, bytes]:
    """The inference spec and weights of one network (``kind`` "model" or "baseline") as files.

    ``keras_bytes`` is the network's saved ``.keras`` file: its checksum goes into
    the spec, so a later rewrite of the network makes the export stale. With
    ``check_rows``, the numpy forward pass is compared with Keras on up to
    ``EXPORT_CHECK_ROWS`` of them (``ExportMismatch`` beyond ``EXPORT_TOLERANCE``).
    Raises ``inference.UnsupportedLayer`` for a layer the export does not know.
    """
    layers = custom_layers()
    spec, weights = inference.export_network(
        network,
        layers["FillMissing"],
        source_sha256=hashlib.sha256(keras_bytes).hexdigest(),
        clip_class=layers["Clip"],
    )
    spec_name, weights_name = INFERENCE_FILES[kind]
    files = {spec_name: inference.spec_bytes(spec), weights_name: weights}
    if check_rows is not None and check_rows.num_rows:
        rows = check_rows.slice(0, EXPORT_CHECK_ROWS)
        exported = inference.InferenceNetwork.from_bytes(files[spec_name], files[weights_name])
        expected = predict_network(network, model_inputs(rows, numeric, categorical))
        actual = exported.predict(numpy_inputs(rows, numeric, categorical)).astype(np.float64)
        worst = float(np.max(np.abs(expected - actual)))
        if not worst <= EXPORT_TOLERANCE:
            raise ExportMismatch(
                f"{kind} network {network.name!r}: numpy export differs from Keras by {worst:.3g} "
                f"(> {EXPORT_TOLERANCE}) on {rows.num_rows} rows"
            )
    return files


def update_model_dir(settings: Settings, version: str, updates: Mapping[str, bytes]) -> None:
    """Rewrite ``models/<version>/`` atomically with files added or replaced."""
    lake = Lake(settings.lake)
    directory = lake.path(MODELS, version)
    manifest = read_json(directory / MANIFEST)
    names = [f["name"] for f in manifest.pop("files")]
    files = [(n, (directory / n).read_bytes()) for n in names if n not in updates] + list(updates.items())
    lake.write_dir(directory, files, manifest)


def export_inference(settings: Settings, version: str) -> list[str]:
    """Add the TensorFlow-free inference files of both networks to an existing version; their names.

    For versions written before the export existed (they score through Keras
    until then). The export is checked against Keras on the version's evaluation
    rows when its training set is still in the lake, and added atomically through
    ``update_model_dir``; when the version already holds identical files nothing
    is rewritten (idempotent). Imports TensorFlow.
    """
    import keras
    import pyarrow.parquet as pq

    lake = Lake(settings.lake)
    directory = lake.path(MODELS, version)
    if not registry.model_dir_committed(settings, version):
        raise FileNotFoundError(f"model version {version} is not committed ({directory})")
    features = read_json(directory / FEATURES_FILE)
    eval_file = lake.path(TRAINING, version, labels.EVAL_FILE)
    check_rows = None
    if eval_file.is_file():
        first = next(pq.ParquetFile(eval_file).iter_batches(batch_size=EXPORT_CHECK_ROWS), None)
        check_rows = None if first is None else pa.Table.from_batches([first])
    updates: dict[str, bytes] = {}
    for kind, name in NETWORK_FILES.items():
        payload = (directory / name).read_bytes()
        network = keras.saving.load_model(directory / name, custom_objects=custom_layers())
        updates.update(
            inference_files(
                network,
                kind,
                payload,
                numeric=features["numeric"],
                categorical=features["categorical"],
                check_rows=check_rows,
            )
        )
    listed = {f["name"] for f in read_json(directory / MANIFEST)["files"]}
    if any(n not in listed or (directory / n).read_bytes() != b for n, b in updates.items()):
        update_model_dir(settings, version, updates)
    return sorted(updates)


# ---- loading and scoring -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score: network, calibration and decile cut points of one version and kind.

    ``network`` is an ``inference.InferenceNetwork`` (numpy, no TensorFlow) when
    the version holds the export, else the Keras model; for kind ``lightgbm`` a
    ``gbm.GBMModel`` (LightGBM, no TensorFlow either); for the ``SEQUENCE_KINDS`` a
    ``sequence.SequenceScorer`` (Keras, reading each row's events from staging).
    """

    version: str
    kind: str  # one of MODEL_KINDS: "model" (the network), "lightgbm", "sequence", "combined" or "baseline"
    network: Any
    calibration: dict[str, Any] | None
    cut_points: tuple[float, ...]
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]

    @property
    def label(self) -> str:
        """What scores record as ``model_version``: the version for the network, else ``<version>-<kind>``."""
        return kind_label(self.version, self.kind)

    @property
    def engine(self) -> str:
        """``numpy`` (the inference export), ``keras`` (the fallback and the sequence kinds) or ``lightgbm``."""
        if isinstance(self.network, gbm.GBMModel):
            return "lightgbm"
        return "numpy" if isinstance(self.network, inference.InferenceNetwork) else "keras"

    @property
    def columns(self) -> list[str]:
        """The profile columns ``predict`` reads: the user and the features (and the snapshot hour, whose
        cutoff the sequence kinds read the user's events up to)."""
        keys = [USER_ID, SNAPSHOT_HOUR] if self.kind in SEQUENCE_KINDS else [USER_ID]
        return list(dict.fromkeys([*keys, *self.numeric, *self.categorical]))

    def predict(self, table: pa.Table) -> np.ndarray:
        """Purchase probabilities (float64) for profile rows (with ``SNAPSHOT_HOUR`` for the sequence kinds)."""
        if table.num_rows == 0:
            return np.zeros(0, dtype=np.float64)
        if self.kind in SEQUENCE_KINDS:
            raw = self.network.predict_raw(table)
        elif isinstance(self.network, gbm.GBMModel):
            raw = self.network.predict(table)
        elif isinstance(self.network, inference.InferenceNetwork):
            inputs = numpy_inputs(table, self.numeric, self.categorical)
            raw = self.network.predict(inputs).astype(np.float64)
        else:
            raw = predict_network(self.network, model_inputs(table, self.numeric, self.categorical))
        return apply_calibration(raw, self.calibration)


def _inference_network(path: Path, kind: str) -> tuple[inference.InferenceNetwork | None, str]:
    """The version's numpy network of ``kind``, or None and why not (missing or stale export)."""
    listed = {f["name"]: f["sha256"] for f in read_json(path / MANIFEST)["files"]}
    spec_name, weights_name = INFERENCE_FILES[kind]
    if spec_name not in listed or weights_name not in listed:
        return None, "has no inference export"
    try:
        network = inference.InferenceNetwork.from_bytes(
            (path / spec_name).read_bytes(), (path / weights_name).read_bytes()
        )
    except (ValueError, KeyError) as error:  # e.g. a format written by newer code
        return None, f"has an unreadable inference export ({error})"
    if network.source_sha256 != listed.get(NETWORK_FILES[kind]):
        return None, f"has an inference export of another {NETWORK_FILES[kind]} (stale)"
    return network, ""


_FELL_BACK: set[tuple[str, str]] = set()


def kind_label(version: str, kind: str) -> str:
    """``model_version`` of a version's ``kind``: the version for the network, else ``<version>-<kind>``."""
    return version if kind == "model" else f"{version}-{kind}"


def network_calibration(stored: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    """The calibration of ``kind`` in a version's ``calibration.json``: the network's at the top level,
    the others' under their kind (``baseline``: None in versions written before the baseline was calibrated)."""
    if kind == "model":
        return {k: v for k, v in stored.items() if k not in MODEL_KINDS}
    other = stored.get(kind)
    return dict(other) if other else None


def _lightgbm(path: Path) -> gbm.GBMModel:
    """The version's LightGBM model; ``FileNotFoundError`` for a version trained before LightGBM was a candidate."""
    listed = {f["name"] for f in read_json(path / MANIFEST)["files"]}
    if gbm.LIGHTGBM_FILE not in listed or gbm.LIGHTGBM_SPEC not in listed:
        raise FileNotFoundError(f"model version {path.name} has no LightGBM model ({gbm.LIGHTGBM_FILE}) in {path}")
    return gbm.GBMModel.from_bytes((path / gbm.LIGHTGBM_SPEC).read_bytes(), (path / gbm.LIGHTGBM_FILE).read_bytes())


def version_kinds(settings: Settings, version: str) -> list[str]:
    """The kinds a committed version can score with, in ``MODEL_KINDS`` order (older versions: no lightgbm;
    the sequence kinds only when they were trained)."""
    listed = {f["name"] for f in read_json(Lake(settings.lake).path(MODELS, version, MANIFEST))["files"]}
    present = {
        "model": MODEL_FILE in listed,
        "lightgbm": gbm.LIGHTGBM_FILE in listed,
        "baseline": BASELINE_FILE in listed,
        **{kind: sequence_file_names(kind)[0] in listed for kind in SEQUENCE_KINDS},
    }
    return [kind for kind in MODEL_KINDS if present[kind]]


@functools.lru_cache(maxsize=6)
def _load(directory: str, kind: str, stamp: str) -> LoadedModel:
    path = Path(directory)
    features = read_json(path / FEATURES_FILE)
    network: Any
    if kind == "lightgbm":
        network, why = _lightgbm(path), ""
    else:
        network, why = _inference_network(path, kind)
    if network is None:
        import keras

        if (directory, kind) not in _FELL_BACK:
            _FELL_BACK.add((directory, kind))
            log.warning(
                "model version %s (%s) %s: scoring with Keras, which imports TensorFlow (seconds per process); "
                "add the export with `python -m profile_engine models export-inference %s`",
                path.name,
                kind,
                why,
                path.name,
            )
        network = keras.saving.load_model(path / NETWORK_FILES[kind], custom_objects=custom_layers())
    return LoadedModel(
        version=path.name,
        kind=kind,
        network=network,
        calibration=network_calibration(read_json(path / CALIBRATION_FILE), kind),
        cut_points=tuple(read_json(path / DECILES_FILE)[kind]),
        numeric=tuple(features["numeric"]),
        categorical=tuple(features["categorical"]),
    )


def sequence_file_names(kind: str) -> tuple[str, str]:
    """``(network, metadata)`` file names of a sequence kind in a model version directory."""
    return f"{kind}.keras", f"{kind}.json"


@functools.lru_cache(maxsize=2)
def _load_sequence(settings: Settings, directory: str, kind: str, stamp: str) -> LoadedModel:
    from profile_engine.model import sequence

    path = Path(directory)
    fitted = sequence.load_sequence(settings, path.name, kind)  # imports TensorFlow: no numpy export of the GRU
    return LoadedModel(
        version=path.name,
        kind=kind,
        network=sequence.SequenceScorer(settings, fitted),
        calibration=fitted.calibration,
        cut_points=tuple(read_json(path / DECILES_FILE)[kind]),
        numeric=fitted.numeric,
        categorical=fitted.categorical,
    )


def load_model(settings: Settings, version: str, kind: str = "model") -> LoadedModel:
    """Load a version's scorer (``kind`` one of ``MODEL_KINDS``) once per process.

    The cache key includes the manifest's modification time, so a retrained (rewritten)
    version is loaded afresh. Only the ``SEQUENCE_KINDS`` import TensorFlow (and read
    staging when they predict); the others never do when the version holds its exports.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    directory = Lake(settings.lake).path(MODELS, version)
    stamp = str((directory / MANIFEST).stat().st_mtime_ns)
    if kind in SEQUENCE_KINDS:
        return _load_sequence(settings, str(directory), kind, stamp)
    return _load(str(directory), kind, stamp)


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


# ---- heuristics and population deciles -----------------------------------------------------------------------------
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


def read_scores(lake: Lake, hour: datetime) -> pa.Table:
    """The hour's committed scores (every bucket) with ``propensity_decile`` filled on the scored population.

    Deciles are ranks over all buckets (``population_deciles``): cut points of one
    bucket, or of the training scores, do not make tenths of the population. Rows
    scored by the first-hour heuristic (null propensity) are ranked by that heuristic,
    recomputed from the hour's committed profiles. An hour whose every row already
    carries a decile (scores written by older code) is returned as written. Raises
    ``FileNotFoundError`` when no scores are committed.
    """
    scores = lake.read(SCORES, hour)
    if scores.num_rows and scores.column(DECILE).null_count == 0:
        return scores  # written with deciles (by older code, which used training cut points): kept as written
    versions = np.asarray(scores.column(MODEL_VERSION).to_pylist(), dtype=object)
    key = np.asarray(pc.fill_null(scores.column(PROPENSITY), np.nan), dtype=np.float64)
    by_heuristic = versions == HEURISTIC_VERSION
    if by_heuristic.any():
        import pyarrow.parquet as pq

        present = set(pq.read_schema(lake.data_files(PROFILES, hour)[0]).names)
        wanted = [USER_ID, *[c for c in HEURISTIC_COLUMNS if c in present]]
        profiles = lake.read(PROFILES, hour, columns=wanted)
        ranked = heuristic_scores(profiles, FIRST_HOUR_HEURISTIC)
        position = pc.index_in(scores.column(USER_ID), value_set=profiles.column(USER_ID))
        found = np.asarray(pc.fill_null(position, -1), dtype=np.int64)
        key = np.where(by_heuristic & (found >= 0), ranked[np.maximum(found, 0)], key)
    deciles = population_deciles(scores.column(USER_ID), key)
    column = pa.array(deciles, pa.int8(), mask=deciles == 0)
    return scores.set_column(scores.schema.get_field_index(DECILE), DECILE, column)


# ---- stages --------------------------------------------------------------------------------------------------------
def train_version(
    settings: Settings,
    hour: datetime,
    numeric: Sequence[str],
    categorical: Sequence[str],
    *,
    training_config: labels.TrainingConfig | None = None,
    model_config: ModelConfig | None = None,
    sequence_config: SequenceConfig | None = None,
    run_id: str = "manual",
) -> dict[str, Any]:
    """Build the training set of ``hour``, fit, and write ``models/<version>/``; a summary dict.

    The sequence kinds are fitted on the same rows when ``settings.sequence_candidates`` is on.
    Returns ``{"status": "skipped", "reason": ...}`` when the data cannot support a model.
    """
    hour = floor_hour(hour)
    version = model_version(hour)
    try:
        training = labels.build_training_set(settings, hour, version, config=training_config, run_id=run_id)
        fitted = fit_models(
            training.train,
            numeric,
            categorical,
            config=model_config,
            seed=settings.seed,
            threads=settings.model_threads,
        )
        if settings.sequence_candidates:
            fit_sequences(settings, fitted, training.train, config=sequence_config, model_config=model_config)
    except labels.InsufficientData as reason:
        return {"status": "skipped", "reason": f"not enough final labelled examples: {reason}"}
    metrics = write_model_dir(settings, version, fitted, training, hour, run_id)
    return {
        "status": "trained",
        "version": version,
        "model_dir": str(Lake(settings.lake).path(MODELS, version)),
        "training": training.summary(),
        "metrics": {name: {k: round(v, 4) for k, v in m.items()} for name, m in metrics["eval"].items()},
        "epochs": fitted.report["epochs"],
    }


def train_challenger(
    settings: Settings,
    hour: datetime,
    *,
    run_id: str = "manual",
    force: bool = False,
    numeric: Sequence[str] = NUMERIC_FEATURES,
    categorical: Sequence[str] = CATEGORICAL_FEATURES,
    training_config: labels.TrainingConfig | None = None,
    model_config: ModelConfig | None = None,
    sequence_config: SequenceConfig | None = None,
) -> dict[str, Any]:
    """Stage: train the challenger of ``hour`` when retraining is due (or forced); a small summary.

    A rerun of the hour retrains the same version deterministically and overwrites it.
    The feature lists default to the profile contract's (``profile_engine.contracts.profiles``).
    """
    if not force and not retrain_due(settings, hour):
        return {
            "status": "skipped",
            "reason": f"retraining not due at {format_hour(hour)} (every {settings.retrain_every_hours} h)",
        }
    return train_version(
        settings,
        hour,
        numeric,
        categorical,
        training_config=training_config,
        model_config=model_config,
        sequence_config=sequence_config,
        run_id=run_id,
    )


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
