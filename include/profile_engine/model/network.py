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
    categorical_values,
    normalisation_variance,
    numeric_matrix,
    vocabulary,
)


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
