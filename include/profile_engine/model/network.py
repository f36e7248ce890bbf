"""The Keras propensity network and its logistic baseline: building, fitting, predicting; TensorFlow is
imported inside functions only. docs/model.md (Model).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.contracts.profiles import SNAPSHOT_HOUR
from profile_engine.model import labels
from profile_engine.model.inputs import (
    CATEGORICAL_PREFIX,
    NORMALISED_CLIP,
    NUMERIC_INPUT,
    QUANTILE_BINS,
    categorical_values,
    count_columns,
    normalisation_variance,
    numeric_matrix,
    quantile_edges,
    vocabulary,
)

# How the network (not the logistic baseline) encodes its numeric inputs: "quantile" (the count-like columns,
# ``inputs.count_columns``, log1p-compressed, standardised and clipped; every other numeric column piecewise-linear
# on its quantile bins, ``QuantilePieces``) or "log" (every column log1p-compressed, standardised and clipped, the
# encoding of versions trained before issue 20's measurements). docs/model.md (Model).
NUMERIC_ENCODINGS = ("quantile", "log")


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
    # The network's numeric encoding (``NUMERIC_ENCODINGS``): "quantile" was above LightGBM on AUC and lift@10
    # beyond the paired intervals at 7 and 30 days on UCI Online Retail, where "log" was not at 7 days.
    numeric_encoding: str = "quantile"
    quantile_bins: int = QUANTILE_BINS


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

    @keras.saving.register_keras_serializable(package="profile_engine")
    class SelectColumns(keras.layers.Layer):  # type: ignore[misc]
        """The input columns at positions ``columns``, in that order (a part of the numeric matrix)."""

        def __init__(self, columns: Sequence[int], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.columns = [int(c) for c in columns]

        def call(self, x: Any) -> Any:
            return keras.ops.take(x, np.asarray(self.columns, dtype=np.int32), axis=1)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "columns": self.columns}

        def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
            return (*input_shape[:-1], len(self.columns))

    @keras.saving.register_keras_serializable(package="profile_engine")
    class QuantilePieces(keras.layers.Layer):  # type: ignore[misc]
        """Piecewise-linear encoding of the input columns at positions ``columns`` on their bin ``edges``
        (``inputs.quantile_edges``): one output per bin, ``clip((x - left) / width, 0, 1)`` (0 below the bin,
        1 above it, the position inside it), NaN read as 0; then one is-missing indicator per column.

        A column with a single edge (one distinct value in training) has no bins: only its indicator.
        The edges are the layer's config (float32 values written as JSON numbers), so a saved model reloads.
        """

        def __init__(self, columns: Sequence[int], edges: Sequence[Sequence[float]], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            if len(columns) != len(edges):
                raise ValueError(f"QuantilePieces: {len(columns)} columns but {len(edges)} lists of edges")
            self.columns = [int(c) for c in columns]
            self.edges = [np.asarray(e, dtype=np.float32).tolist() for e in edges]
            arrays = [np.asarray(e, dtype=np.float32) for e in self.edges]
            self.piece_columns = np.asarray(
                [c for c, e in zip(self.columns, arrays, strict=True) for _ in range(len(e) - 1)], dtype=np.int32
            )
            self.left = np.concatenate([np.zeros(0, np.float32), *(e[:-1] for e in arrays)])
            self.width = np.concatenate([np.zeros(0, np.float32), *(np.diff(e) for e in arrays)])
            if not np.all(self.width > 0):
                raise ValueError("QuantilePieces: the edges of every column must increase strictly")

        def call(self, x: Any) -> Any:
            ops = keras.ops
            missing = ops.isnan(x)
            indicators = ops.take(ops.cast(missing, x.dtype), np.asarray(self.columns, dtype=np.int32), axis=1)
            if not self.piece_columns.size:
                return indicators
            filled = ops.where(missing, ops.zeros_like(x), x)
            position = (ops.take(filled, self.piece_columns, axis=1) - self.left) / self.width
            return ops.concatenate([ops.clip(position, 0.0, 1.0), indicators], axis=-1)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "columns": self.columns, "edges": self.edges}

        def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
            return (*input_shape[:-1], int(self.piece_columns.size) + len(self.columns))

    return {"FillMissing": FillMissing, "Clip": Clip, "SelectColumns": SelectColumns, "QuantilePieces": QuantilePieces}


def standardised_inputs(train: pa.Table, columns: Sequence[str], x: Any) -> Any:
    """``x`` (the ``columns`` of a numeric input) log1p-compressed with its is-missing indicators
    (``FillMissing``), standardised on ``train`` and clipped at +-``NORMALISED_CLIP``."""
    import keras

    layers = custom_layers()
    fill = layers["FillMissing"]()
    filled_train = np.asarray(fill(numeric_matrix(train, columns)))
    norm = keras.layers.Normalization(mean=filled_train.mean(axis=0), variance=normalisation_variance(filled_train))
    return layers["Clip"](NORMALISED_CLIP, name="clip")(norm(fill(x)))


def numeric_parts(train: pa.Table, numeric: Sequence[str], x: Any, config: ModelConfig) -> list[Any]:
    """The network's encoded numeric input ``x`` under ``config.numeric_encoding`` (``NUMERIC_ENCODINGS``):
    for "quantile" the non-count columns' ``QuantilePieces`` on ``config.quantile_bins`` quantile bins of
    ``train``, then the count columns (``count_columns``) standardised; for "log" all columns standardised."""
    if config.numeric_encoding not in NUMERIC_ENCODINGS:
        raise ValueError(f"unknown numeric_encoding {config.numeric_encoding!r}; expected one of {NUMERIC_ENCODINGS}")
    if config.numeric_encoding == "log":
        return [standardised_inputs(train, numeric, x)]
    layers = custom_layers()
    counts = count_columns(numeric)
    others = [c for c in numeric if c not in counts]
    position = {c: i for i, c in enumerate(numeric)}
    parts = []
    if others:
        edges = quantile_edges(train, others, config.quantile_bins)
        pieces = layers["QuantilePieces"]([position[c] for c in others], edges, name="quantile_pieces")
        parts.append(pieces(x))
    if counts:
        selected = x if counts == list(numeric) else layers["SelectColumns"]([position[c] for c in counts])(x)
        parts.append(standardised_inputs(train, counts, selected))
    return parts


def build_network(
    train: pa.Table, numeric: Sequence[str], categorical: Sequence[str], config: ModelConfig, *, logistic: bool
) -> Any:
    """An uncompiled Keras model whose preprocessing is fitted on ``train``.

    ``logistic=True`` gives the baseline: one-hot categories and a single sigmoid
    unit on the normalised inputs (log1p, standardised, clipped); otherwise the numeric inputs encoded as
    ``config.numeric_encoding`` says (``numeric_parts``), embeddings and dense layers with dropout.
    """
    import keras

    numeric_in = keras.Input(shape=(len(numeric),), dtype="float32", name=NUMERIC_INPUT)
    if logistic:
        parts = [standardised_inputs(train, numeric, numeric_in)]
    else:
        parts = numeric_parts(train, numeric, numeric_in, config)
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


def fit_network(
    network: Any,
    fit: tuple[Any, np.ndarray],
    validation: tuple[Any, np.ndarray],
    class_weight: dict[int, float] | None,
    learning_rate: float,
    config: Any,
    *,
    sample_weight: np.ndarray | None = None,
) -> int:
    """Train a Keras binary classifier with early stopping on the validation slice's AUC; returns the epochs run.

    ``config`` carries ``patience``, ``max_epochs`` and ``batch_size`` (``ModelConfig`` or a sequence config);
    the best weights are restored. Shared by the aggregate network, its baseline and the sequence encoders.
    ``sample_weight`` (one per fit row) is multiplied by the class weights here (Keras refuses both at once).
    """
    import keras

    if sample_weight is not None and class_weight is not None:
        labels_fit = np.asarray(fit[1])
        sample_weight = np.asarray(sample_weight, dtype=np.float32) * np.where(
            labels_fit > 0.5, class_weight[1], class_weight[0]
        ).astype(np.float32)
        class_weight = None

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
        sample_weight=sample_weight,
        callbacks=[stop],
        shuffle=True,
        verbose=0,
    )
    return len(history.history["loss"])
