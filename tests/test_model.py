"""Tests for profile_engine.model training, calibration, artifacts and scoring: cadence, deciles, the fitted model.

One small Keras fit (module fixture) serves every TensorFlow test.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from profile_engine import cli
from profile_engine.config import Settings
from profile_engine.contracts.profiles import USER_ID
from profile_engine.contracts.scores import DECILE, MODEL_VERSION, PROPENSITY, SCORES_SCHEMA
from profile_engine.hours import HOUR
from profile_engine.lake.storage import MANIFEST, MODELS, PROFILES, SCORES, Lake, read_json
from profile_engine.model import artifacts, inference, labels, registry, scoring, training
from profile_engine.model import calibration as calibrate
from profile_engine.model import inputs as network_inputs
from profile_engine.model import metrics as measures
from profile_engine.model import network as networks
from tests.test_labels import CATEGORICAL, NUMERIC, T0, make_settings, synthetic_lake

FAST = networks.ModelConfig(hidden_units=(32, 16), max_epochs=15, patience=3)
SMALL = labels.TrainingConfig(max_snapshots=8, min_train_rows=50, min_positives=3)


# ---- cadence, calibration and deciles (no TensorFlow) --------------------------------------------------------------
@hypothesis_settings(max_examples=50, deadline=None)
@given(every=st.integers(min_value=1, max_value=48), offset=st.integers(min_value=0, max_value=100_000))
def test_retraining_is_due_once_per_period_as_a_function_of_the_hour(every: int, offset: int) -> None:
    # Arrange
    config = Settings(retrain_every_hours=every)
    hours = [T0 + (offset + i) * HOUR for i in range(every)]

    # Act
    due = [training.retrain_due(config, h) for h in hours]

    # Assert
    assert sum(due) == 1
    assert training.retrain_due(config, hours[0]) == training.retrain_due(config, hours[0] + every * HOUR)


def test_platt_scaling_recovers_a_known_distortion() -> None:
    # Arrange: true p = sigmoid(2 * logit(raw) - 1)
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.02, 0.98, 20_000)
    truth = 1 / (1 + np.exp(-(2 * np.log(raw / (1 - raw)) - 1)))
    y = (rng.random(raw.size) < truth).astype(float)

    # Act
    calibration = calibrate.fit_platt(raw, y)

    # Assert
    assert calibration["a"] == pytest.approx(2.0, abs=0.1)
    assert calibration["b"] == pytest.approx(-1.0, abs=0.1)
    assert measures.log_loss(y, calibrate.apply_calibration(raw, calibration)) < measures.log_loss(y, raw)


@pytest.mark.parametrize("case", ["separable", "near-constant"])
def test_platt_calibration_cannot_diverge(case: str) -> None:
    # Arrange: perfectly separated scores, or a network that collapsed to one score (+- float noise);
    # unregularised Newton steps ran to coefficients around 1e10 on such slices
    rng = np.random.default_rng(3)
    y = (rng.random(2_000) < 0.15).astype(float)
    if case == "separable":
        raw = np.where(y > 0, rng.uniform(0.6, 0.9, y.size), rng.uniform(0.1, 0.4, y.size))
    else:
        raw = 0.5 + rng.normal(0, 1e-7, y.size) * (1 + y)

    # Act
    calibration = calibrate.fit_calibration(raw, y)
    calibrated = calibrate.apply_calibration(raw, calibration)

    # Assert: finite, bounded, monotone; a flat score is calibrated to the base rate, not to 0 and 1
    assert np.isfinite([calibration["a"], calibration["b"]]).all()
    assert 0 <= calibration["a"] <= calibrate.PLATT_MAX_SLOPE
    assert np.all(np.diff(calibrated[np.argsort(raw)]) >= 0)
    assert calibrated.min() >= calibrate.CALIBRATION_BOUNDS[0] and calibrated.max() <= calibrate.CALIBRATION_BOUNDS[1]
    if case == "near-constant":
        assert calibrated.mean() == pytest.approx(y.mean(), abs=0.02)
        assert calibrated.max() - calibrated.min() < 0.05
    else:
        assert measures.auc(y, calibrated) == 1.0


def test_calibration_falls_back_and_says_why_with_too_few_positives() -> None:
    # Arrange: 3 buyers in the calibration slice
    rng = np.random.default_rng(4)
    raw = rng.uniform(0, 1, 500)
    y = np.zeros(raw.size)
    y[:3] = 1

    # Act
    calibration = calibrate.fit_calibration(raw, y)

    # Assert: the slope is kept at 1 (only the intercept moves to the base rate) and the decision is recorded
    assert calibration["method"] == "platt_intercept"
    assert "3 positives" in calibration["fallback"]
    assert calibration["a"] == 1.0
    assert calibrate.apply_calibration(raw, calibration).mean() == pytest.approx(y.mean(), abs=0.01)


@hypothesis_settings(max_examples=25, deadline=None)
@given(
    n=st.integers(min_value=1_000, max_value=20_000),
    tied=st.floats(min_value=0.0, max_value=0.95),
    levels=st.integers(min_value=1, max_value=4),
)
def test_population_deciles_are_tenths_of_users_under_heavy_ties(n: int, tied: float, levels: int) -> None:
    # Arrange: a share of users on a few tied scores (ties at 0 and at a handful of values), the rest distinct
    rng = np.random.default_rng(n)
    scores = rng.uniform(0, 1, n)
    heavy = rng.random(n) < tied
    scores[heavy] = rng.integers(0, levels, int(heavy.sum())) / 10
    users = np.array([f"user-{i}" for i in rng.permutation(n)], dtype=object)

    # Act
    deciles = calibrate.population_deciles(pa.array(users, pa.string()), scores)

    # Assert: each decile is 10% of the users within one user per thousand, ordered by score
    counts = np.bincount(deciles, minlength=11)[1:]
    assert np.all(np.abs(counts - n / 10) <= max(1.0, n / 1000)), counts
    assert _ties_only_disorder(scores, deciles)
    shuffled = rng.permutation(n)
    again = calibrate.population_deciles(pa.array(users[shuffled], pa.string()), scores[shuffled])
    assert np.array_equal(again, deciles[shuffled])  # deterministic: by score, ties by a hash of the user


def _ties_only_disorder(scores: np.ndarray, deciles: np.ndarray) -> bool:
    """Higher scores never get a lower decile (users with equal scores may straddle a cut)."""
    for d in range(1, 10):
        low, high = scores[deciles == d], scores[deciles == d + 1]
        if low.size and high.size and low.max() > high.min():
            return False
    return True


def test_stored_cut_points_put_a_quarter_of_tied_users_in_the_top_decile() -> None:
    # Arrange: the old scheme (training cut points, "a score on a cut goes up") on scores with heavy ties
    scores = np.r_[np.full(700, 0.1), np.full(250, 0.3), np.linspace(0.31, 0.9, 50)]
    users = pa.array([f"u{i}" for i in range(scores.size)], pa.string())

    # Act
    stored = calibrate.assign_deciles(scores, calibrate.decile_cut_points(scores))
    population = calibrate.population_deciles(users, scores)

    # Assert
    assert np.sum(stored == 10) > 250  # what high_intent used to target
    assert np.sum(population == 10) == 100


def test_deciles_come_from_stored_cut_points() -> None:
    # Arrange
    cuts = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    scores = np.array([0.0, 0.05, 0.1, 0.55, 0.9, 0.95, 1.0])

    # Act
    deciles = calibrate.assign_deciles(scores, cuts)

    # Assert
    assert deciles.tolist() == [1, 1, 2, 6, 10, 10, 10]
    assert deciles.dtype == np.int8


@hypothesis_settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=20, max_size=300, unique=True))
def test_training_scores_fill_the_deciles_evenly_and_monotonically(values: list[float]) -> None:
    # Arrange
    scores = np.array(values)

    # Act
    deciles = calibrate.assign_deciles(scores, calibrate.decile_cut_points(scores))

    # Assert
    order = np.argsort(scores)
    assert np.all(np.diff(deciles[order]) >= 0)
    counts = np.bincount(deciles, minlength=11)[1:]
    assert counts.max() - counts.min() <= 2
    assert deciles.min() >= 1 and deciles.max() <= 10


def test_train_challenger_skips_when_not_due(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)

    result = training.train_challenger(settings, T0 + HOUR)

    assert result["status"] == "skipped"
    assert "not due" in result["reason"]


def test_train_challenger_says_why_without_enough_labelled_data(tmp_path: Path) -> None:
    # Arrange: only three snapshots, so no training snapshot can precede the evaluation one
    settings = make_settings(tmp_path)
    snapshots = synthetic_lake(settings, T0, hours=3, users=20)

    # Act
    result = training.train_challenger(
        settings, snapshots[-1] + 3 * HOUR, force=True, numeric=NUMERIC, categorical=CATEGORICAL
    )

    # Assert
    assert result["status"] == "skipped"
    assert result["reason"].startswith("not enough final labelled examples")
    assert not registry.model_versions(settings)


def test_scoring_without_any_model_writes_null_propensities(tmp_path: Path) -> None:
    # Arrange
    settings = make_settings(tmp_path)
    synthetic_lake(settings, T0, hours=1, users=10)

    # Act
    summary = scoring.score_profiles(settings, T0, 1)

    # Assert
    scores = Lake(settings.lake).read(SCORES, T0, 1)
    assert summary["model"] == "heuristic" and summary[MODEL_VERSION] == scoring.HEURISTIC_VERSION
    assert scores.schema == SCORES_SCHEMA
    assert scores.column(PROPENSITY).null_count == scores.num_rows == 5
    assert set(scores.column(MODEL_VERSION).to_pylist()) == {scoring.HEURISTIC_VERSION}


# ---- one trained version -------------------------------------------------------------------------------------------
@dataclass
class Trained:
    settings: Settings
    hour: datetime
    summary: dict[str, Any]
    training: labels.TrainingSet


def test_a_column_constant_in_training_is_normalised_with_unit_variance() -> None:
    # Arrange: column 0 varies, column 1 is constant (e.g. an is-missing indicator never set in training)
    filled = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])

    # Act
    variance = network_inputs.normalisation_variance(filled)

    # Assert
    assert variance.tolist() == pytest.approx([8 / 3, 1.0])


def test_a_value_never_seen_in_a_constant_training_column_does_not_pin_the_score() -> None:
    # Arrange: "spend" is never missing in training; at scoring it is missing (NaN), so its
    # is-missing indicator is 1 where training only saw 0 (Keras would divide by 1e-7)
    import keras

    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(0)
    train = pa.table(
        {
            "views": rng.poisson(3.0, 200).astype(float),
            "spend": rng.uniform(0, 50, 200),
            "label": rng.integers(0, 2, 200),
        }
    )
    network = networks.build_network(train, ["views", "spend"], [], FAST, logistic=True)
    rows = pa.table({"views": [3.0, 3.0], "spend": [20.0, None]})

    # Act
    scores = np.asarray(network.predict(network_inputs.model_inputs(rows, ["views", "spend"], []), verbose=0)).ravel()

    # Assert
    assert np.all((scores > 1e-3) & (scores < 1 - 1e-3)), scores


def test_a_nearly_constant_float32_column_scored_far_outside_training_does_not_pin_the_score() -> None:
    # Arrange: "peak_hour" is 1 in all but 2 of 60,000 training rows (a float32 variance of about 1e-5, not 0);
    # at scoring it is 2 (hundreds of training standard deviations away) or absurdly large
    import keras

    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(5)
    n = 60_000
    peak = np.ones(n)
    peak[:2] = 2.0
    train = pa.table({"views": rng.poisson(3.0, n).astype(float), "peak_hour": peak, "label": rng.integers(0, 2, n)})
    columns = ["views", "peak_hour"]
    rows = pa.table({"views": [3.0, 3.0, 1e12], "peak_hour": [2.0, 1e9, 1.0]})

    for logistic in (True, False):
        network = networks.build_network(train, columns, [], FAST, logistic=logistic)
        spec, weights = inference.export_network(
            network,
            networks.custom_layers()["FillMissing"],
            source_sha256="-",
            clip_class=networks.custom_layers()["Clip"],
            custom=networks.custom_layers(),
        )
        exported = inference.InferenceNetwork.from_bytes(inference.spec_bytes(spec), weights)
        first_dense = next(layer for layer in network.layers if isinstance(layer, keras.layers.Dense))

        # Act
        keras_scores = np.asarray(network.predict(network_inputs.model_inputs(rows, columns, []), verbose=0)).ravel()
        numpy_scores = exported.predict(network_inputs.numpy_inputs(rows, columns, []))
        encoded = keras.Model(network.inputs, first_dense.input).predict(
            network_inputs.model_inputs(rows, columns, []), verbose=0
        )

        # Assert: the encoded inputs (standardised and clipped, or the network's quantile pieces in [0, 1]) are
        # bounded, and numpy mirrors Keras
        assert np.abs(encoded).max() <= network_inputs.NORMALISED_CLIP
        assert np.all((keras_scores > 1e-3) & (keras_scores < 1 - 1e-3)), keras_scores
        assert numpy_scores == pytest.approx(keras_scores, abs=1e-6)


def test_a_nearly_constant_column_gets_unit_scale_by_a_tolerance() -> None:
    # Arrange: float32 rounding leaves a variance of ~1e-7 on a column that is constant in fact
    filled = np.c_[np.linspace(0, 4, 1000), np.full(1000, 0.6931472, dtype=np.float32) + np.r_[1e-3, np.zeros(999)]]

    # Act
    variance = network_inputs.normalisation_variance(filled.astype(np.float32))

    # Assert
    assert variance[1] == 1.0
    assert variance[0] == pytest.approx(np.var(filled[:, 0]), rel=1e-4)


# ---- the network's numeric encoding: quantile pieces for the non-count inputs ------------------------------------
def test_count_columns_are_the_profiles_int64_inputs() -> None:
    # Arrange: an int64 count, a float64 recency, an int8 RFM score, the int8 peak hour, a column outside the schema
    numeric = ["recency_hours", "count_cart_24h", "rfm_r", "peak_hour_local", "signal", "session_count"]

    # Act
    counts = network_inputs.count_columns(numeric)

    # Assert
    assert counts == ["count_cart_24h", "session_count"]


def test_quantile_edges_merge_bins_too_narrow_for_float32_and_give_a_constant_column_one_edge() -> None:
    # Arrange: half the values in a cluster 1e-7 wide around 1 (float32 cannot tell most of its quantiles
    # apart: widths of 0 or subnormals, (x - left) / width = NaN), the rest spread over [2, 100]
    rng = np.random.default_rng(3)
    spread = np.r_[1.0 + rng.uniform(0, 1e-7, 500), rng.uniform(2, 100, 500)]
    fit_rows = pa.table({"spread": spread, "constant": np.full(1000, 4.0), "empty": pa.nulls(1000, pa.float64())})

    # Act
    spread_edges, constant_edges, empty_edges = network_inputs.quantile_edges(
        fit_rows, ["spread", "constant", "empty"], 16
    )
    encoded = _encode(
        [0, 1, 2],
        [spread_edges, constant_edges, empty_edges],
        network_inputs.numeric_matrix(fit_rows, ["spread", "constant", "empty"]),
    )

    # Assert: strictly increasing float32 edges from the minimum to the maximum, the cluster's quantiles merged
    assert spread_edges.dtype == np.float32
    assert spread_edges[0] == np.float32(spread.min()) and spread_edges[-1] == np.float32(spread.max())
    widths = np.diff(spread_edges.astype(np.float64))
    assert np.all(widths > 1e-6 * np.maximum(1.0, np.abs(spread_edges[1:])))
    assert len(spread_edges) == 10  # the 8 quantiles inside the cluster merged into its minimum
    assert constant_edges.tolist() == [4.0] and empty_edges.size == 1
    assert np.isfinite(encoded).all()
    assert encoded.shape[1] == len(spread_edges) - 1 + 3  # no pieces for the constant and empty columns


def _encode(columns: list[int], edges: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    layer = networks.custom_layers()["QuantilePieces"](columns, edges)
    return np.asarray(layer(np.asarray(x, dtype=np.float32)))


def test_quantile_pieces_are_monotone_saturate_outside_their_bin_and_flag_missing_values() -> None:
    # Arrange: column 0 on bins [0, 1], [1, 3], [3, 7]; column 1 is not encoded; column 2 constant in training
    edges = [np.array([0.0, 1.0, 3.0, 7.0]), np.array([5.0])]
    sweep = np.r_[-4.0, np.linspace(-1.0, 8.0, 181), 1e9]
    x = np.c_[sweep, np.full(sweep.size, 123.0), np.linspace(-50, 50, sweep.size)]

    # Act
    encoded = _encode([0, 2], edges, x)
    missing = _encode([0, 2], edges, np.array([[np.nan, 1.0, 5.0], [0.0, np.nan, np.nan]]))

    # Assert: 3 pieces of column 0, then the indicators of columns 0 and 2
    pieces, indicators = encoded[:, :3], encoded[:, 3:]
    assert encoded.shape == (sweep.size, 5)
    assert np.all(np.diff(pieces, axis=0) >= 0)  # each piece non-decreasing in its input
    assert np.all(np.diff(pieces.sum(axis=1)[(sweep > 0) & (sweep < 7)]) > 0)  # and their sum strictly inside
    for j, (left, right) in enumerate([(0.0, 1.0), (1.0, 3.0), (3.0, 7.0)]):
        assert np.all(pieces[sweep <= left, j] == 0) and np.all(pieces[sweep >= right, j] == 1)
    assert _encode([0, 2], edges, np.array([[2.0, 0.0, 0.0]]))[0, :3].tolist() == [1.0, 0.5, 0.0]
    assert np.all(indicators == 0)
    # a missing value is read as 0 and flagged; column 1 (not encoded) changes nothing
    assert missing.tolist() == [[0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]]


def test_quantile_pieces_refuse_edges_that_do_not_increase() -> None:
    # Arrange / Act / Assert: a bin of width 0 would encode every value as NaN (0 / 0)
    with pytest.raises(ValueError, match="increase strictly"):
        networks.custom_layers()["QuantilePieces"]([0], [[1.0, 1.0, 2.0]])


QUANTILE_NUMERIC = ["count_cart_24h", "recency_hours", "session_count", "monetary_total", "peak_hour_local"]


def _quantile_table(n: int, seed: int) -> pa.Table:
    """Profile-like rows: two counts, a recency with missing values, money, and a peak hour constant in training."""
    rng = np.random.default_rng(seed)
    recency = rng.exponential(200.0, n)
    return pa.table(
        {
            "count_cart_24h": rng.poisson(1.0, n),
            "recency_hours": pa.array(recency, mask=rng.random(n) < 0.2),
            "session_count": rng.poisson(4.0, n),
            "monetary_total": rng.gamma(2.0, 30.0, n),
            "peak_hour_local": np.full(n, 1.0),
            "segment": rng.choice(["a", "b"], n),
            labels.LABEL: (rng.random(n) < 1 / (1 + recency / 100)).astype(np.int64),
        }
    )


# rows beyond the fit range, missing values and a new value of the constant column
QUANTILE_EDGE_ROWS = pa.table(
    {
        "count_cart_24h": [0, 3, 1_000, None],
        "recency_hours": [None, -5.0, 1e9, 12.0],
        "session_count": [2, None, 10_000, 0],
        "monetary_total": [None, -1e6, 1e12, 15.0],
        "peak_hour_local": [1.0, 23.0, None, 1e9],
        "segment": ["a", "b", "zzz", None],
    }
)


def test_the_network_pieces_the_non_count_inputs_and_reloads_from_its_saved_file(tmp_path: Path) -> None:
    # Arrange
    import keras

    keras.utils.set_random_seed(4)
    train = _quantile_table(400, 1)
    network = networks.build_network(train, QUANTILE_NUMERIC, ["segment"], FAST, logistic=False)
    inputs = network_inputs.model_inputs(QUANTILE_EDGE_ROWS, QUANTILE_NUMERIC, ["segment"])

    # Act
    network.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", custom_objects=networks.custom_layers())

    # Assert: pieces for the recency, money and peak hour (input positions 1, 3, 4; the peak hour only its
    # indicator), the counts (0, 2) through the log1p path; the baseline keeps the log1p path for all
    pieces = network.get_layer("quantile_pieces")
    assert pieces.columns == [1, 3, 4] and [len(e) for e in pieces.edges][2] == 1
    assert pieces.edges == [
        e.tolist() for e in network_inputs.quantile_edges(train, [QUANTILE_NUMERIC[i] for i in (1, 3, 4)], 16)
    ]
    assert {type(layer).__name__ for layer in network.layers} >= {"QuantilePieces", "SelectColumns", "Clip"}
    baseline = networks.build_network(train, QUANTILE_NUMERIC, ["segment"], FAST, logistic=True)
    assert "QuantilePieces" not in {type(layer).__name__ for layer in baseline.layers}
    assert loaded.get_layer("quantile_pieces").edges == pieces.edges
    before, after = networks.predict_network(network, inputs), networks.predict_network(loaded, inputs)
    assert np.isfinite(before).all() and np.array_equal(before, after)


def test_the_log_encoding_is_still_available() -> None:
    # Arrange
    train = _quantile_table(200, 2)
    config = replace(FAST, numeric_encoding="log")

    # Act
    network = networks.build_network(train, QUANTILE_NUMERIC, [], config, logistic=False)

    # Assert
    assert "QuantilePieces" not in {type(layer).__name__ for layer in network.layers}
    with pytest.raises(ValueError, match="numeric_encoding 'bins'"):
        networks.build_network(train, QUANTILE_NUMERIC, [], replace(FAST, numeric_encoding="bins"), logistic=False)


def test_a_new_shop_gets_heuristic_deciles_from_its_first_hour(tmp_path: Path) -> None:
    # Arrange: one committed snapshot, no model trained; some users have an open cart or past purchases
    settings = make_settings(tmp_path)
    n = 2_000
    rng = np.random.default_rng(9)
    users = [f"u{i:05d}" for i in range(n)]
    carts = rng.poisson(0.3, n)
    bought_24h = rng.poisson(0.1, n)
    purchases = rng.poisson(0.5, n)
    table = pa.table(
        {
            USER_ID: pa.array(users, pa.string()),
            "snapshot_hour": pa.array([T0] * n, pa.timestamp("ms", tz="UTC")),
            "hours_since_last_event": pa.array(rng.integers(0, 48, n).astype(float)),
            "count_cart_24h": pa.array(carts, pa.int64()),
            "count_purchase_24h": pa.array(bought_24h, pa.int64()),
            "count_purchase_lifetime": pa.array(purchases + bought_24h, pa.int64()),
        }
    )
    from tests.test_labels import write_snapshot

    write_snapshot(Lake(settings.lake), T0, table)

    # Act
    summaries = [scoring.score_profiles(settings, T0, bucket) for bucket in (0, 1)]
    scores = scoring.read_scores(Lake(settings.lake), T0)

    # Assert: a score from the first hour, named as the heuristic; no probability is claimed without labels
    assert {s["model"] for s in summaries} == {"heuristic"}
    assert "open cart" in summaries[0]["reason"]
    assert set(scores.column(MODEL_VERSION).to_pylist()) == {scoring.HEURISTIC_VERSION}
    assert scores.column(PROPENSITY).null_count == n
    deciles = np.asarray(scores.column(DECILE))
    assert np.all(np.abs(np.bincount(deciles, minlength=11)[1:] - n / 10) <= 2)
    by_user = dict(zip(users, (carts > 0) & (bought_24h == 0), strict=True))
    top = [by_user[u] for u, d in zip(scores.column(USER_ID).to_pylist(), deciles, strict=True) if d == 10]
    assert all(top)  # open carts rank first


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """A lake of 16 hourly snapshots x 400 users and the version trained at its last hour."""
    settings = make_settings(tmp_path_factory.mktemp("model"))
    snapshots = synthetic_lake(settings, T0, hours=16, users=400)
    hour = snapshots[-1]
    summary = training.train_version(
        settings, hour, NUMERIC, CATEGORICAL, training_config=SMALL, model_config=FAST, run_id="test"
    )
    train, evaluation, _ = labels.read_training_set(settings, registry.model_version(hour))
    yield Trained(settings, hour, summary, labels.TrainingSet("", "", train, evaluation, (), hour))


def test_trained_model_learns_the_signal_and_calibration_helps(trained: Trained) -> None:
    # Arrange
    metrics = read_json(Lake(trained.settings.lake).path(MODELS, trained.summary["version"], registry.METRICS_FILE))
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
    loaded = artifacts.load_model(trained.settings, version)
    again = artifacts.load_model(trained.settings, version)
    probabilities = loaded.predict(odd)

    # Assert
    assert again is loaded  # loaded once per process
    assert np.all(np.isfinite(probabilities)) and np.all((probabilities > 0) & (probabilities < 1))
    stored = read_json(Lake(trained.settings.lake).path(MODELS, version, artifacts.DECILES_FILE))
    assert list(loaded.cut_points) == stored["model"]
    files = {p.name for p in Lake(trained.settings.lake).path(MODELS, version).iterdir()}
    assert {"model.keras", "baseline.keras", "calibration.json", "deciles.json", "model_card.md"} <= files
    exported = {name for pair in artifacts.INFERENCE_FILES.values() for name in pair}
    assert exported == {
        "model.inference.json",
        "model.inference.npz",
        "baseline.inference.json",
        "baseline.inference.npz",
    }
    listed = {f["name"] for f in read_json(Lake(trained.settings.lake).path(MODELS, version, MANIFEST))["files"]}
    assert exported <= files and exported <= listed
    # the sequence candidates are off by default: the version holds the other three kinds only
    assert not trained.settings.sequence_candidates
    assert artifacts.version_kinds(trained.settings, version) == ["ensemble", "model", "lightgbm", "baseline"]
    assert not {"sequence.keras", "combined.keras"} & listed


def test_score_profiles_uses_baseline_before_promotion_then_the_champion(trained: Trained) -> None:
    # Arrange
    settings, hour = trained.settings, trained.hour
    version = str(trained.summary["version"])
    lake = Lake(settings.lake)

    # Act
    before = scoring.score_profiles(settings, hour, 0)
    baseline_versions = set(lake.read(SCORES, hour, 0).column(MODEL_VERSION).to_pylist())
    registry.promote(settings, version, hour, reason="test")
    after = scoring.score_profiles(settings, hour, 0)
    scores = lake.read(SCORES, hour, 0)
    earlier = scoring.score_profiles(settings, hour - HOUR, 0)  # the version did not exist an hour before

    # Assert
    assert before["model"] == "baseline" and "baseline" in before["reason"]
    assert baseline_versions == {version + artifacts.BASELINE_SUFFIX}
    assert after["model"] == "champion" and after[MODEL_VERSION] == version
    assert scores.schema == SCORES_SCHEMA
    users = scores.column(USER_ID).to_pylist()
    assert users == sorted(users) and len(users) == 200
    profiles = lake.read(PROFILES, hour, 0).sort_by(USER_ID)
    propensity = np.asarray(scores.column(PROPENSITY))
    assert propensity == pytest.approx(artifacts.load_model(settings, version).predict(profiles))
    assert scores.column(DECILE).null_count == scores.num_rows  # deciles are a population property
    population = scoring.read_scores(lake, hour).filter(pc.equal(pc.field(MODEL_VERSION), version))
    expected = calibrate.population_deciles(population.column(USER_ID), np.asarray(population.column(PROPENSITY)))
    assert np.asarray(population.column(DECILE)).tolist() == expected.tolist()
    assert earlier["model"] == "heuristic"


# ---- TensorFlow-free scoring (profile_engine.model.inference) -------------------------------------------------------------
KINDS = ("model", "baseline")


@pytest.fixture(scope="module")
def keras_networks(trained: Trained) -> dict[str, Any]:
    """The version's Keras networks, loaded from their .keras files (the reference the numpy scorer must match)."""
    import keras

    directory = Lake(trained.settings.lake).path(MODELS, str(trained.summary["version"]))
    return {
        kind: keras.saving.load_model(directory / name, custom_objects=networks.custom_layers())
        for kind, name in artifacts.NETWORK_FILES.items()
    }


def keras_probabilities(trained: Trained, network: Any, kind: str, table: pa.Table) -> np.ndarray:
    """Keras ``predict`` plus the version's calibration: what scoring returned before the numpy export."""
    raw = network.predict(network_inputs.model_inputs(table, NUMERIC, CATEGORICAL), verbose=0)
    directory = Lake(trained.settings.lake).path(MODELS, str(trained.summary["version"]))
    calibration = artifacts.network_calibration(read_json(directory / artifacts.CALIBRATION_FILE), kind)
    return calibrate.apply_calibration(np.asarray(raw, dtype=np.float64).ravel(), calibration)


def odd_rows(trained: Trained) -> pa.Table:
    """Evaluation rows, then copies with one column made odd each, so no odd value masks another.

    Unseen, empty and null categories; null numbers; NaN, null, negative and huge floats.
    """
    rows = trained.training.eval.slice(0, 40)

    def with_column(name: str, values: list[Any], kind: pa.DataType) -> pa.Table:
        return rows.set_column(rows.schema.get_field_index(name), name, pa.array(values * 10, kind))

    return pa.concat_tables(
        [
            trained.training.eval,
            with_column("segment", ["zzz", "", None, "[UNK]"], pa.string()),
            with_column("visits", [None, 3, None, 0], pa.int64()),
            with_column("signal", [float("nan"), None, -2.5, 1e6], pa.float64()),
        ]
    )


def copy_lake(trained: Trained, tmp_path: Path) -> Settings:
    """Settings over a copy of the trained lake, so a test may rewrite the version."""
    shutil.copytree(trained.settings.lake, tmp_path / "lake")
    return replace(trained.settings, lake=tmp_path / "lake")


def strip_inference_files(settings: Settings, version: str) -> None:
    """Rewrite the version as older code wrote it: without the inference export."""
    lake = Lake(settings.lake)
    directory = lake.path(MODELS, version)
    manifest = read_json(directory / MANIFEST)
    exported = {name for pair in artifacts.INFERENCE_FILES.values() for name in pair}
    names = [f["name"] for f in manifest.pop("files") if f["name"] not in exported]
    lake.write_dir(directory, [(n, (directory / n).read_bytes()) for n in names], manifest)


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_scores_equal_keras_predict_and_calibration(
    trained: Trained, keras_networks: dict[str, Any], kind: str
) -> None:
    # Arrange
    version = str(trained.summary["version"])
    rows = odd_rows(trained)
    expected = keras_probabilities(trained, keras_networks[kind], kind, rows)

    # Act
    loaded = artifacts.load_model(trained.settings, version, kind)
    actual = loaded.predict(rows)

    # Assert
    assert loaded.engine == "numpy"
    assert actual.dtype == np.float64 and actual.shape == (rows.num_rows,)
    assert np.max(np.abs(actual - expected)) <= 1e-6
    assert np.all(np.isfinite(actual))
    cuts = loaded.cut_points
    assert calibrate.assign_deciles(actual, cuts).tolist() == calibrate.assign_deciles(expected, cuts).tolist()


def test_numpy_scorer_scores_an_empty_table(trained: Trained) -> None:
    # Arrange
    loaded = artifacts.load_model(trained.settings, str(trained.summary["version"]))
    empty = trained.training.eval.slice(0, 0)

    # Act
    scores = scoring.score_table(empty, loaded)
    raw = loaded.network.predict(network_inputs.numpy_inputs(empty, loaded.numeric, loaded.categorical))

    # Assert
    assert scores.num_rows == 0 and scores.schema == SCORES_SCHEMA
    assert raw.shape == (0,) and raw.dtype == np.float32


def test_numpy_forward_pass_is_the_same_in_batches(trained: Trained) -> None:
    # Arrange
    loaded = artifacts.load_model(trained.settings, str(trained.summary["version"]))
    inputs = network_inputs.numpy_inputs(odd_rows(trained), loaded.numeric, loaded.categorical)

    # Act
    whole = loaded.network.predict(inputs)
    batched = loaded.network.predict(inputs, batch_rows=7)

    # Assert: equal up to float32 rounding (BLAS blocks a matrix product differently by size)
    assert np.max(np.abs(whole - batched)) <= 1e-6


@hypothesis_settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.one_of(st.none(), st.just(float("nan")), st.floats(-1e6, 1e6, allow_nan=False)),
            st.one_of(st.none(), st.integers(0, 10**6)),
            st.one_of(st.none(), st.sampled_from(["a", "b", "c", "", "zzz", "ü", "[UNK]"])),
        ),
        min_size=1,
        max_size=20,
    ),
    kind=st.sampled_from(KINDS),
)
def test_numpy_scorer_matches_keras_on_any_feature_rows(
    trained: Trained, keras_networks: dict[str, Any], rows: list[tuple[float | None, int | None, str | None]], kind: str
) -> None:
    # Arrange
    signal, visits, segment = (list(column) for column in zip(*rows, strict=True))
    table = pa.table(
        {
            USER_ID: pa.array([f"u{i}" for i in range(len(rows))], pa.string()),
            "signal": pa.array(signal, pa.float64()),
            "visits": pa.array(visits, pa.int64()),
            "segment": pa.array(segment, pa.string()),
        }
    )
    expected = keras_probabilities(trained, keras_networks[kind], kind, table)

    # Act
    actual = artifacts.load_model(trained.settings, str(trained.summary["version"]), kind).predict(table)

    # Assert
    assert np.max(np.abs(actual - expected)) <= 1e-6


# Scoring in a child process, so this process's TensorFlow does not count (the tests that scoring never imports it).
_SCORING_CHILD = (
    "import json, pickle, sys\n"
    "from datetime import datetime\n"
    "from profile_engine.model import scoring\n"
    "settings = pickle.loads(open(sys.argv[1], 'rb').read())\n"
    "summary = scoring.score_profiles(settings, datetime.fromisoformat(sys.argv[2]), 0, run_id='child')\n"
    "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))\n"
    "print(json.dumps({'summary': summary, 'heavy': heavy}))\n"
)


def score_in_a_child(settings: Settings, hour: datetime, tmp_path: Path) -> dict[str, Any]:
    """``score_profiles`` of bucket 0 in a fresh interpreter: ``{"summary": ..., "heavy": [TF/Keras modules]}``."""
    (tmp_path / "settings.pickle").write_bytes(pickle.dumps(settings))
    done = subprocess.run(
        [sys.executable, "-c", _SCORING_CHILD, str(tmp_path / "settings.pickle"), hour.isoformat()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_score_profiles_with_the_export_never_imports_tensorflow(trained: Trained, tmp_path: Path) -> None:
    # Arrange: a child process, so this process's TensorFlow does not count
    settings = copy_lake(trained, tmp_path)

    # Act
    result = score_in_a_child(settings, trained.hour, tmp_path)

    # Assert
    assert result["heavy"] == []
    assert result["summary"]["engine"] == "numpy" and result["summary"]["rows"] == 200
    scores = Lake(settings.lake).read(SCORES, trained.hour, 0)
    profiles = Lake(settings.lake).read(PROFILES, trained.hour, 0).sort_by(USER_ID)
    loaded = scoring.scoring_model(settings, trained.hour)  # baseline or champion, depending on the tests before
    assert loaded is not None and result["summary"][MODEL_VERSION] == loaded.label
    assert np.asarray(scores.column(PROPENSITY)) == pytest.approx(loaded.predict(profiles), abs=1e-12)


def test_version_without_the_export_falls_back_to_keras_then_export_inference_adds_it(
    trained: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrange: a version as older code wrote it
    settings = copy_lake(trained, tmp_path)
    version = str(trained.summary["version"])
    strip_inference_files(settings, version)
    rows = odd_rows(trained)
    directory = Lake(settings.lake).path(MODELS, version)

    # Act
    with caplog.at_level(logging.WARNING, logger="profile_engine.model.artifacts"):
        old = artifacts.load_model(settings, version)
        # A rewritten version (newer manifest) is loaded afresh; the same process logs nothing new.
        manifest = directory / MANIFEST
        touched = manifest.stat().st_mtime_ns + 1_000_000_000
        os.utime(manifest, ns=(touched, touched))
        artifacts.load_model(settings, version)
        old_scores = old.predict(rows)
    files = artifacts.export_inference(settings, version)
    stamp = (directory / MANIFEST).stat().st_mtime_ns
    again = artifacts.export_inference(settings, version)
    new = artifacts.load_model(settings, version)

    # Assert
    assert old.engine == "keras"
    warnings = [r.getMessage() for r in caplog.records if "export-inference" in r.getMessage()]
    assert len(warnings) == 1 and version in warnings[0] and "no inference export" in warnings[0]
    assert files == again == sorted(name for pair in artifacts.INFERENCE_FILES.values() for name in pair)
    assert (directory / MANIFEST).stat().st_mtime_ns == stamp  # idempotent: identical files are not rewritten
    assert set(files) <= {f["name"] for f in read_json(directory / MANIFEST)["files"]}
    assert new.engine == "numpy"
    assert np.max(np.abs(new.predict(rows) - old_scores)) <= 1e-6


def test_an_export_of_another_keras_file_is_stale_and_not_used(trained: Trained, tmp_path: Path) -> None:
    # Arrange: model.keras replaced (here by the baseline network) without a new export
    settings = copy_lake(trained, tmp_path)
    version = str(trained.summary["version"])
    directory = Lake(settings.lake).path(MODELS, version)
    registry.update_model_dir(
        settings, version, {registry.MODEL_FILE: (directory / registry.BASELINE_FILE).read_bytes()}
    )

    # Act
    loaded = artifacts.load_model(settings, version)

    # Assert
    assert loaded.engine == "keras"


def test_an_export_in_an_unknown_format_is_not_used(trained: Trained, tmp_path: Path) -> None:
    # Arrange: a spec written by some future format
    settings = copy_lake(trained, tmp_path)
    version = str(trained.summary["version"])
    directory = Lake(settings.lake).path(MODELS, version)
    spec_name = artifacts.INFERENCE_FILES["model"][0]
    spec = {**read_json(directory / spec_name), "format": "profile_engine.model.inference/99"}
    registry.update_model_dir(settings, version, {spec_name: json.dumps(spec).encode()})

    # Act
    loaded = artifacts.load_model(settings, version)

    # Assert
    assert loaded.engine == "keras"


def test_cli_exports_a_version(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange
    settings = copy_lake(trained, tmp_path)
    version = str(trained.summary["version"])
    strip_inference_files(settings, version)
    monkeypatch.setenv("PROFILE_ENGINE_LAKE", str(settings.lake))

    # Act
    status = cli.main(["models", "export-inference", version])
    missing = cli.main(["models", "export-inference", "v20000101T00"])

    # Assert
    assert status == 0 and missing == 1
    assert artifacts.load_model(settings, version).engine == "numpy"


# ---- gradient-boosted trees (LightGBM) as a candidate ---------------------------------------------------------------
def test_lightgbm_candidate_is_saved_calibrated_and_reproducible(trained: Trained) -> None:
    # Arrange
    from profile_engine.model import candidates, gbm

    settings, version = trained.settings, str(trained.summary["version"])
    directory = Lake(settings.lake).path(MODELS, version)
    train = trained.training.train
    snapshot = np.asarray(pc.cast(pc.cast(train.column("snapshot_hour"), pa.timestamp("ms")), pa.int64()))
    newest = snapshot == snapshot.max()
    y = np.asarray(train.column(labels.LABEL), dtype=np.float64)

    def refit() -> str:
        fitted = gbm.fit_gbm(
            train.filter(pa.array(~newest)),
            y[~newest],
            train.filter(pa.array(newest)),
            y[newest],
            NUMERIC,
            CATEGORICAL,
            seed=settings.seed,
            threads=settings.model_threads,
        )
        return fitted.files()[gbm.LIGHTGBM_FILE].decode()

    # Act
    loaded = artifacts.load_model(settings, version, "lightgbm")
    probabilities = loaded.predict(odd_rows(trained))
    metrics = read_json(directory / registry.METRICS_FILE)["eval"]
    listed = {f["name"] for f in read_json(directory / MANIFEST)["files"]}

    # Assert: stored with its calibration and cut points, listed in the manifest, scored like every kind
    assert {gbm.LIGHTGBM_FILE, gbm.LIGHTGBM_SPEC} <= listed
    assert loaded.engine == "lightgbm" and loaded.label == f"{version}-lightgbm"
    assert loaded.calibration is not None and loaded.calibration["method"] in ("platt", "platt_intercept")
    assert np.all((probabilities >= 1e-4) & (probabilities <= 1 - 1e-4))
    assert metrics["lightgbm"]["auc"] > 0.6  # the synthetic signal is learnable by trees too
    assert metrics["lightgbm"]["auc"] == pytest.approx(
        measures.auc(np.asarray(trained.training.eval.column(labels.LABEL)), loaded.predict(trained.training.eval))
    )
    assert refit() == refit() == (directory / gbm.LIGHTGBM_FILE).read_text()  # deterministic, as saved
    assert [c.name for c in candidates.version_candidates(settings, version)] == [
        "ensemble",
        "network",
        "lightgbm",
        "baseline",
    ]


@pytest.mark.parametrize(("kind", "engine"), [("lightgbm", "lightgbm"), ("ensemble", "numpy+lightgbm")])
def test_score_profiles_with_a_tree_champion_never_imports_tensorflow(
    trained: Trained, tmp_path: Path, kind: str, engine: str
) -> None:
    """LightGBM, or the ensemble (numpy network + LightGBM), promoted as the champion scores without TensorFlow."""
    # Arrange: the kind promoted as the champion; a child process, so this process's TensorFlow does not count
    settings = copy_lake(trained, tmp_path)
    version = str(trained.summary["version"])
    registry.promote(settings, version, trained.hour, reason="test", kind=kind)

    # Act
    result = score_in_a_child(settings, trained.hour, tmp_path)

    # Assert: the normal scoring path, the kind's label on every score
    assert result["heavy"] == []
    summary = result["summary"]
    assert (summary["model"], summary["kind"], summary["engine"]) == ("champion", kind, engine)
    assert summary[MODEL_VERSION] == f"{version}-{kind}" and summary["rows"] == 200
    scores = Lake(settings.lake).read(SCORES, trained.hour, 0)
    profiles = Lake(settings.lake).read(PROFILES, trained.hour, 0).sort_by(USER_ID)
    expected = artifacts.load_model(settings, version, kind).predict(profiles)
    assert np.asarray(scores.column(PROPENSITY)) == pytest.approx(expected, abs=1e-12)
    assert set(scores.column(MODEL_VERSION).to_pylist()) == {f"{version}-{kind}"}


def test_a_version_trained_before_lightgbm_still_loads_and_scores(trained: Trained, tmp_path: Path) -> None:
    # Arrange: the version as the previous code wrote it (no trees), promoted by an entry without a kind
    from profile_engine.lake.storage import PROMOTIONS, write_json
    from profile_engine.model import candidates, gbm

    settings = copy_lake(trained, tmp_path)
    version = str(trained.summary["version"])
    lake = Lake(settings.lake)
    directory = lake.path(MODELS, version)
    manifest = read_json(directory / MANIFEST)
    names = [f["name"] for f in manifest.pop("files") if f["name"] not in (gbm.LIGHTGBM_FILE, gbm.LIGHTGBM_SPEC)]
    lake.write_dir(directory, [(n, (directory / n).read_bytes()) for n in names], manifest)
    entry = registry.promote(settings, version, trained.hour, reason="old")
    entry.pop("kind")
    write_json(lake.path(PROMOTIONS, trained.hour.strftime("%Y-%m-%dT%H") + ".json"), entry)

    # Act
    found = [c.name for c in candidates.version_candidates(settings, version)]
    summary = scoring.score_profiles(settings, trained.hour, 0)

    # Assert
    assert found == ["network", "baseline"]
    assert (summary["kind"], summary[MODEL_VERSION]) == ("model", version)
    with pytest.raises(FileNotFoundError, match="no LightGBM model"):
        artifacts.load_model(settings, version, "lightgbm")


# ---- the ensemble: the network and LightGBM of the same version, blended and calibrated again -------------------
def test_ensemble_candidate_blends_the_versions_network_and_trees_and_is_calibrated(trained: Trained) -> None:
    # Arrange
    from profile_engine.model import candidates, ensemble

    settings, version = trained.settings, str(trained.summary["version"])
    directory = Lake(settings.lake).path(MODELS, version)
    rows = odd_rows(trained)

    # Act
    loaded = artifacts.load_model(settings, version, "ensemble")
    probabilities = loaded.predict(rows)
    members = [artifacts.load_model(settings, version, kind) for kind in ("model", "lightgbm")]
    blended = ensemble.blend([m.predict(rows) for m in members], ensemble.WEIGHTS)
    stored = read_json(directory / artifacts.CALIBRATION_FILE)
    metrics = read_json(directory / registry.METRICS_FILE)["eval"]
    listed = {f["name"] for f in read_json(directory / MANIFEST)["files"]}
    found = candidates.version_candidates(settings, version)

    # Assert: probabilities inside the calibration's bounds, from the version's own network and trees
    assert np.all(np.isfinite(probabilities)) and np.all((probabilities >= 1e-4) & (probabilities <= 1 - 1e-4))
    assert probabilities == pytest.approx(calibrate.apply_calibration(blended, loaded.calibration), abs=1e-12)
    # monotone in the blend (a positive slope): the calibration keeps the blend's ranking
    order = np.argsort(blended, kind="stable")
    assert np.all(np.diff(probabilities[order]) >= 0)
    # its calibration is recorded like every candidate's, fitted on the newest training snapshot
    recorded = stored["ensemble"]
    assert recorded["method"] in ("platt", "platt_intercept") and 0 < recorded["a"] <= calibrate.PLATT_MAX_SLOPE
    assert recorded["fitted_on"] == stored["fitted_on"] and recorded["rows"] == stored["lightgbm"]["rows"]
    assert loaded.calibration is not None and loaded.calibration["b"] == recorded["b"]
    network_own = artifacts.network_calibration(stored, "model")
    assert network_own is not None and "ensemble" not in network_own  # the network's own stays apart
    # saved, listed and loaded like every kind: spec file, cut points, metrics of the calibrated and raw blend
    assert ensemble.ENSEMBLE_FILE in listed
    assert read_json(directory / ensemble.ENSEMBLE_FILE)["members"] == ["model", "lightgbm"]
    assert list(loaded.cut_points) == read_json(directory / artifacts.DECILES_FILE)["ensemble"]
    assert loaded.label == f"{version}-ensemble" and loaded.engine == "numpy+lightgbm"
    assert {"ensemble", "ensemble_uncalibrated"} <= set(metrics)
    assert metrics["ensemble"]["auc"] == pytest.approx(
        measures.auc(np.asarray(trained.training.eval.column(labels.LABEL)), loaded.predict(trained.training.eval))
    )
    assert metrics["ensemble"]["auc"] > 0.6
    assert [c.name for c in found][:2] == ["ensemble", "network"]  # first in the tie order, then the network
    assert found[0].kind == "ensemble" and found[0].metrics["auc"] == metrics["ensemble"]["auc"]
    assert artifacts.load_model(settings, version, "ensemble") is loaded  # loaded once per process


def test_a_version_without_the_ensemble_still_offers_its_other_candidates(trained: Trained, tmp_path: Path) -> None:
    # Arrange: the version as the previous code wrote it (no ensemble file, no ensemble calibration)
    from profile_engine.model import candidates, ensemble

    settings = copy_lake(trained, tmp_path)
    version = str(trained.summary["version"])
    lake = Lake(settings.lake)
    directory = lake.path(MODELS, version)
    manifest = read_json(directory / MANIFEST)
    names = [f["name"] for f in manifest.pop("files") if f["name"] != ensemble.ENSEMBLE_FILE]
    lake.write_dir(directory, [(n, (directory / n).read_bytes()) for n in names], manifest)

    # Act
    found = [c.name for c in candidates.version_candidates(settings, version)]

    # Assert
    assert found == ["network", "lightgbm", "baseline"]
    with pytest.raises(FileNotFoundError, match="no ensemble"):
        artifacts.load_model(settings, version, "ensemble")


def test_fit_network_applies_sample_weights_together_with_class_weights(trained: Trained) -> None:
    # Arrange: the version's training rows; one fit ignores the buyers (weight 0), the other the non-buyers
    train = trained.training.train
    y = np.asarray(train.column(labels.LABEL), dtype=np.float32)
    inputs = network_inputs.model_inputs(train, NUMERIC, CATEGORICAL)
    config = replace(FAST, max_epochs=3, patience=3)

    def mean_score(weight: np.ndarray) -> float:
        network = networks.build_network(train, NUMERIC, CATEGORICAL, config, logistic=False)
        networks.fit_network(
            network, (inputs, y), (inputs, y), networks.class_weights(y), 1e-2, config, sample_weight=weight
        )
        return float(np.mean(networks.predict_network(network, inputs)))

    # Act
    without_buyers = mean_score((y == 0).astype(np.float32))
    without_others = mean_score((y == 1).astype(np.float32))

    # Assert: Keras refuses class and sample weights at once; fit_network multiplies them, so both count
    assert without_buyers < 0.5 < without_others
