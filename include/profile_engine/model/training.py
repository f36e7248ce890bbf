"""The training stage: fit every candidate of a version on the hour's training set and write
``models/<version>/``. docs/model.md (Model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from profile_engine.config import Settings
from profile_engine.contracts.profiles import CATEGORICAL_FEATURES, NUMERIC_FEATURES
from profile_engine.hours import floor_hour, format_hour
from profile_engine.lake.storage import MODELS, Lake
from profile_engine.model import ensemble, gbm, labels
from profile_engine.model.artifacts import FittedModels, write_model_dir
from profile_engine.model.calibration import apply_calibration, decile_cut_points, fit_calibration
from profile_engine.model.inputs import model_inputs
from profile_engine.model.network import (
    ModelConfig,
    build_network,
    class_weights,
    fit_network,
    predict_network,
    validation_split,
)
from profile_engine.model.registry import SEQUENCE_KINDS, model_version

if TYPE_CHECKING:
    from profile_engine.model.sequence import SequenceConfig


def retrain_due(settings: Settings, hour: datetime) -> bool:
    """Whether retraining is due at ``hour``: hours since the epoch divisible by ``retrain_every_hours``.

    A pure function of the hour, so a rerun makes the same decision.
    """
    return (int(floor_hour(hour).timestamp()) // 3600) % settings.retrain_every_hours == 0


def take_inputs(inputs: Mapping[str, Any], mask: np.ndarray) -> dict[str, Any]:
    import tensorflow as tf

    return {k: (v[mask] if isinstance(v, np.ndarray) else tf.boolean_mask(v, mask)) for k, v in inputs.items()}


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
    """Fit network, baseline and LightGBM, each with its calibration, and the ensemble of network and
    LightGBM (their blend, calibrated), on a training table with ``LABEL`` and ``SNAPSHOT_HOUR``.

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
    fit_in, val_in = take_inputs(inputs, ~is_validation), take_inputs(inputs, is_validation)
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
    # The ensemble reuses both fits: the blend of their calibrated probabilities, calibrated on the same slice.
    network_p = apply_calibration(predict_network(model, inputs), calibration)
    trees_p = apply_calibration(trees.predict(train), trees_calibration)
    members = {"model": network_p, "lightgbm": trees_p}
    blended = ensemble.blend([members[kind] for kind in ensemble.MEMBERS], ensemble.WEIGHTS)
    ensemble_calibration = fit_calibration(blended[is_validation], val_y)
    return FittedModels(
        model=model,
        baseline=baseline,
        calibration=calibration,
        baseline_calibration=baseline_calibration,
        cut_points=decile_cut_points(network_p),
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
            "ensemble": {"members": list(ensemble.MEMBERS), "weights": list(ensemble.WEIGHTS)},
        },
        lightgbm=trees,
        lightgbm_calibration=trees_calibration,
        lightgbm_cut_points=decile_cut_points(trees_p),
        ensemble_calibration=ensemble_calibration,
        ensemble_cut_points=decile_cut_points(apply_calibration(blended, ensemble_calibration)),
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
