"""Tests for profile_engine.model: retraining cadence, calibration, deciles, the fitted model and scoring.

One small Keras fit (module fixture) serves every TensorFlow test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from profile_engine import evaluate, labels, model, registry
from profile_engine.config import Settings
from profile_engine.features import USER_ID
from profile_engine.hours import HOUR
from profile_engine.lake import MODELS, PROFILES, SCORES, Lake, read_json
from tests.test_labels import CATEGORICAL, NUMERIC, T0, make_settings, synthetic_lake

FAST = model.ModelConfig(hidden_units=(32, 16), max_epochs=15, patience=3)
SMALL = labels.TrainingConfig(max_snapshots=8, min_train_rows=50, min_positives=3)


# ---- cadence, calibration and deciles (no TensorFlow) --------------------------------------------------------------
@hypothesis_settings(max_examples=50, deadline=None)
@given(every=st.integers(min_value=1, max_value=48), offset=st.integers(min_value=0, max_value=100_000))
def test_retraining_is_due_once_per_period_as_a_function_of_the_hour(every: int, offset: int) -> None:
    # Arrange
    config = Settings(retrain_every_hours=every)
    hours = [T0 + (offset + i) * HOUR for i in range(every)]

    # Act
    due = [model.retrain_due(config, h) for h in hours]

    # Assert
    assert sum(due) == 1
    assert model.retrain_due(config, hours[0]) == model.retrain_due(config, hours[0] + every * HOUR)


def test_platt_scaling_recovers_a_known_distortion() -> None:
    # Arrange: true p = sigmoid(2 * logit(raw) - 1)
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.02, 0.98, 20_000)
    truth = 1 / (1 + np.exp(-(2 * np.log(raw / (1 - raw)) - 1)))
    y = (rng.random(raw.size) < truth).astype(float)

    # Act
    calibration = model.fit_platt(raw, y)

    # Assert
    assert calibration["a"] == pytest.approx(2.0, abs=0.1)
    assert calibration["b"] == pytest.approx(-1.0, abs=0.1)
    assert evaluate.log_loss(y, model.apply_calibration(raw, calibration)) < evaluate.log_loss(y, raw)


def test_deciles_come_from_stored_cut_points() -> None:
    # Arrange
    cuts = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    scores = np.array([0.0, 0.05, 0.1, 0.55, 0.9, 0.95, 1.0])

    # Act
    deciles = model.assign_deciles(scores, cuts)

    # Assert
    assert deciles.tolist() == [1, 1, 2, 6, 10, 10, 10]
    assert deciles.dtype == np.int8


@hypothesis_settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=20, max_size=300, unique=True))
def test_training_scores_fill_the_deciles_evenly_and_monotonically(values: list[float]) -> None:
    # Arrange
    scores = np.array(values)

    # Act
    deciles = model.assign_deciles(scores, model.decile_cut_points(scores))

    # Assert
    order = np.argsort(scores)
    assert np.all(np.diff(deciles[order]) >= 0)
    counts = np.bincount(deciles, minlength=11)[1:]
    assert counts.max() - counts.min() <= 2
    assert deciles.min() >= 1 and deciles.max() <= 10


def test_train_challenger_skips_when_not_due(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)

    result = model.train_challenger(settings, T0 + HOUR)

    assert result["status"] == "skipped"
    assert "not due" in result["reason"]


def test_train_challenger_says_why_without_enough_labelled_data(tmp_path: Path) -> None:
    # Arrange: only three snapshots, so no training snapshot can precede the evaluation one
    settings = make_settings(tmp_path)
    snapshots = synthetic_lake(settings, T0, hours=3, users=20)

    # Act
    result = model.train_challenger(
        settings, snapshots[-1] + 3 * HOUR, force=True, numeric=NUMERIC, categorical=CATEGORICAL
    )

    # Assert
    assert result["status"] == "skipped"
    assert result["reason"].startswith("not enough final labelled examples")
    assert not registry.model_versions(settings)


def test_scoring_without_any_model_writes_null_scores(tmp_path: Path) -> None:
    # Arrange
    settings = make_settings(tmp_path)
    synthetic_lake(settings, T0, hours=1, users=10)

    # Act
    summary = model.score_profiles(settings, T0, 1)

    # Assert
    scores = Lake(settings.lake).read(SCORES, T0, 1)
    assert summary["model"] == "none" and summary[model.MODEL_VERSION] == model.NO_MODEL
    assert scores.schema == model.SCORES_SCHEMA
    assert scores.column(model.PROPENSITY).null_count == scores.num_rows == 5
    assert set(scores.column(model.MODEL_VERSION).to_pylist()) == {model.NO_MODEL}


# ---- one trained version -------------------------------------------------------------------------------------------
@dataclass
class Trained:
    settings: Settings
    hour: datetime
    summary: dict[str, Any]
    training: labels.TrainingSet


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """A lake of 16 hourly snapshots x 400 users and the version trained at its last hour."""
    settings = make_settings(tmp_path_factory.mktemp("model"))
    snapshots = synthetic_lake(settings, T0, hours=16, users=400)
    hour = snapshots[-1]
    summary = model.train_version(
        settings, hour, NUMERIC, CATEGORICAL, training_config=SMALL, model_config=FAST, run_id="test"
    )
    train, evaluation, _ = labels.read_training_set(settings, registry.model_version(hour))
    yield Trained(settings, hour, summary, labels.TrainingSet("", "", train, evaluation, (), hour))


def test_trained_model_learns_the_signal_and_calibration_helps(trained: Trained) -> None:
    # Arrange
    metrics = read_json(Lake(trained.settings.lake).path(MODELS, trained.summary["version"], model.METRICS_FILE))
    calibrated, raw = metrics["eval"]["model"], metrics["eval"]["model_uncalibrated"]

    # Assert: a real, out-of-time signal; Platt scaling turns the class-weighted score into a probability
    assert trained.summary["status"] == "trained"
    assert calibrated["auc"] > 0.7
    assert calibrated["auc"] > metrics["eval"]["baseline"]["auc"]  # the signal is non-linear: the MLP wins
    assert calibrated["log_loss"] < raw["log_loss"]
    assert calibrated["ece"] < raw["ece"]
    assert calibrated["auc"] == pytest.approx(raw["auc"])  # a monotone map keeps the ranking


def test_saved_model_scores_raw_profile_rows_like_the_fitted_one(trained: Trained) -> None:
    # Arrange: rows with missing numbers and a category never seen in training
    version = str(trained.summary["version"])
    rows = trained.training.eval.slice(0, 20)
    odd = rows.set_column(
        rows.schema.get_field_index("segment"), "segment", pa.array(["zzz"] * 10 + [None] * 10, pa.string())
    )
    odd = odd.set_column(odd.schema.get_field_index("visits"), "visits", pa.nulls(20, pa.int64()))

    # Act
    loaded = model.load_model(trained.settings, version)
    again = model.load_model(trained.settings, version)
    probabilities = loaded.predict(odd)

    # Assert
    assert again is loaded  # loaded once per process
    assert np.all(np.isfinite(probabilities)) and np.all((probabilities > 0) & (probabilities < 1))
    stored = read_json(Lake(trained.settings.lake).path(MODELS, version, model.DECILES_FILE))
    assert list(loaded.cut_points) == stored["model"]
    files = {p.name for p in Lake(trained.settings.lake).path(MODELS, version).iterdir()}
    assert {"model.keras", "baseline.keras", "calibration.json", "deciles.json", "model_card.md"} <= files


def test_score_profiles_uses_baseline_before_promotion_then_the_champion(trained: Trained) -> None:
    # Arrange
    settings, hour = trained.settings, trained.hour
    version = str(trained.summary["version"])
    lake = Lake(settings.lake)

    # Act
    before = model.score_profiles(settings, hour, 0)
    baseline_versions = set(lake.read(SCORES, hour, 0).column(model.MODEL_VERSION).to_pylist())
    registry.promote(settings, version, hour, reason="test")
    after = model.score_profiles(settings, hour, 0)
    scores = lake.read(SCORES, hour, 0)
    earlier = model.score_profiles(settings, hour - HOUR, 0)  # the version did not exist an hour before

    # Assert
    assert before["model"] == "baseline" and "baseline" in before["reason"]
    assert baseline_versions == {version + model.BASELINE_SUFFIX}
    assert after["model"] == "champion" and after[model.MODEL_VERSION] == version
    assert scores.schema == model.SCORES_SCHEMA
    users = scores.column(USER_ID).to_pylist()
    assert users == sorted(users) and len(users) == 200
    profiles = lake.read(PROFILES, hour, 0).sort_by(USER_ID)
    propensity = np.asarray(scores.column(model.PROPENSITY))
    assert propensity == pytest.approx(model.load_model(settings, version).predict(profiles))
    cuts = read_json(lake.path(MODELS, version, model.DECILES_FILE))["model"]
    assert np.asarray(scores.column(model.DECILE)).tolist() == model.assign_deciles(propensity, cuts).tolist()
    assert earlier["model"] == "none"
