"""Model quality against the simulator's ground truth (issue 6): the gate promotes what is good and nothing else.

One simulated shop per module (2,000 users at intensity 3, 14 days, a snapshot every
6 hours, built with the in-process runner's warm-up) gives a challenger trained on
32 snapshots with a 24 h label horizon. The simulator's latent purchase propensity
(``simulator/truth``, never read by the pipeline) scores the same evaluation rows
as the ceiling a model of the features can approach.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from profile_engine.config import Settings
from profile_engine.contracts.profiles import USER_ID
from profile_engine.hours import HOUR, format_hour, hour_range
from profile_engine.lake.storage import TRAINING, TRUTH, Lake
from profile_engine.model import artifacts, gate, labels, metrics, promotion, registry
from profile_engine.model import training as trainer
from profile_engine.ops import runner
from profile_engine.sources.simulate import TRUTH_PROPENSITY, simulate

FIRST = datetime(2026, 10, 1, tzinfo=UTC)
DAYS = 14
TRAINED_AT = FIRST + timedelta(days=DAYS) - HOUR


@dataclass(frozen=True)
class Shop:
    """The module's simulated lake, its first challenger and the gate's verdict on it."""

    settings: Settings
    version: str
    trained: dict[str, Any]
    evaluated: dict[str, Any]


def true_propensity(settings: Settings, rows: pa.Table, snapshot: datetime) -> np.ndarray:
    """Mean latent propensity of each row's user over the hours of its label window (0 before signup)."""
    lake = Lake(settings.lake)
    start, end = labels.label_window(snapshot, settings.label_horizon_hours)
    hours = list(hour_range(start, end - HOUR))
    total = np.zeros(rows.num_rows)
    for hour in hours:
        truth = lake.read_named(TRUTH, hour, TRUTH_PROPENSITY)
        index = pc.index_in(rows.column(USER_ID), value_set=truth.column(USER_ID))
        total += np.asarray(pc.fill_null(pc.take(truth.column("propensity"), index), 0.0), dtype=np.float64)
    return total / len(hours)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """Simulate, warm up, train the challenger of the last hour and let the gate decide (about a minute and a half)."""
    root: Path = tmp_path_factory.mktemp("quality") / "lake"
    settings = Settings(lake=root, buckets=2, start=FIRST, label_horizon_hours=24, lateness_hours=6)
    simulate(
        Lake(root), FIRST, TRAINED_AT, users=2000, seed=7, business_tz=settings.business_tz, origin=FIRST, intensity=3.0
    )
    runner.warm_up(settings, FIRST, TRAINED_AT, snapshot_every=6)
    trained = trainer.train_challenger(settings, TRAINED_AT, force=True)
    assert trained["status"] == "trained", trained
    evaluated = promotion.evaluate_and_promote(settings, TRAINED_AT, gate_config=gate.GateConfig(), n_boot=100)
    yield Shop(settings, trained["version"], trained, evaluated)


def eval_rows(shop: Shop) -> tuple[pa.Table, np.ndarray, datetime]:
    _, rows, manifest = labels.read_training_set(shop.settings, shop.version)
    return (
        rows,
        np.asarray(rows.column(labels.LABEL), dtype=np.float64),
        datetime.fromisoformat(manifest["eval_snapshot"]),
    )


def copy_training_set(settings: Settings, source: str, target: str) -> labels.TrainingSet:
    """The source version's training set written again under ``target`` (the same rows, another version)."""
    lake = Lake(settings.lake)
    train, rows, manifest = labels.read_training_set(settings, source)
    directory = lake.path(TRAINING, target)
    files = [
        (name, (lake.path(TRAINING, source) / name).read_bytes()) for name in (labels.TRAIN_FILE, labels.EVAL_FILE)
    ]
    lake.write_dir(directory, files, {k: v for k, v in manifest.items() if k != "files"})
    snapshots = tuple(datetime.fromisoformat(s) for s in manifest["train_snapshots"])
    return labels.TrainingSet(
        target, str(directory), train, rows, snapshots, datetime.fromisoformat(manifest["eval_snapshot"])
    )


def test_the_promoted_model_approaches_the_true_propensity_and_matches_the_baseline(shop: Shop) -> None:
    # Arrange
    rows, y, snapshot = eval_rows(shop)
    entry = registry.champion_as_of(shop.settings, TRAINED_AT)
    assert entry is not None, shop.evaluated["reasons"]
    challenger = artifacts.load_model(shop.settings, shop.version, registry.entry_kind(entry)).predict(rows)
    baseline = artifacts.load_model(shop.settings, shop.version, "baseline").predict(rows)
    truth = true_propensity(shop.settings, rows, snapshot)
    config = gate.GateConfig()

    # Act
    auc = {"model": metrics.auc(y, challenger), "baseline": metrics.auc(y, baseline), "truth": metrics.auc(y, truth)}

    # Assert
    assert shop.evaluated["status"] == "promoted", shop.evaluated["reasons"]
    assert shop.evaluated["reference"].startswith(f"baseline {shop.version}")
    assert entry["version"] == shop.version and entry["kind"] == shop.evaluated["kind"]
    assert auc["truth"] > 0.65, auc  # the labels do follow the latent propensity
    assert auc["model"] >= 0.9 * auc["truth"], auc
    assert auc["model"] >= auc["baseline"] - config.margins["auc"], auc
    assert metrics.ece(y, challenger) <= config.floors["ece"]


def test_a_challenger_trained_on_shuffled_labels_is_never_promoted(shop: Shop) -> None:
    # Arrange: the same rows with the labels permuted, as the challenger of the next hour
    hour = TRAINED_AT + HOUR
    version = registry.model_version(hour)
    training = copy_training_set(shop.settings, shop.version, version)
    shuffled = np.random.default_rng(11).permutation(np.asarray(training.train.column(labels.LABEL)))
    train = training.train.set_column(
        training.train.schema.get_field_index(labels.LABEL), labels.LABEL, pa.array(shuffled, pa.int8())
    )
    features = artifacts.load_model(shop.settings, shop.version, "model")
    fitted = trainer.fit_models(train, features.numeric, features.categorical, seed=shop.settings.seed)
    artifacts.write_model_dir(shop.settings, version, fitted, training, hour, "test")

    # Act
    result = promotion.evaluate_and_promote(shop.settings, hour, gate_config=gate.GateConfig(), n_boot=20)

    # Assert
    assert result["status"] == "rejected"
    assert any(r.split(": ", 1)[-1].startswith("auc") for r in result["reasons"]), result["reasons"]
    assert registry.champion_as_of(shop.settings, hour)["version"] == shop.version  # type: ignore[index]
    decision = [d for d in registry.decision_log(shop.settings) if d["version"] == version]
    assert len(decision) == 1 and decision[0]["promoted"] is False


def test_a_degraded_challenger_is_rejected_with_a_reason_naming_the_metric(shop: Shop) -> None:
    # Arrange: one feature only, trained two hours later on the same kind of data
    hour = TRAINED_AT + 2 * HOUR
    config = gate.GateConfig()

    # Act
    trained = trainer.train_challenger(shop.settings, hour, force=True, numeric=("count_view_7d",), categorical=())
    result = promotion.evaluate_and_promote(shop.settings, hour, gate_config=config, n_boot=20)

    # Assert
    assert trained["status"] == "trained"
    assert result["status"] == "rejected"
    champion = registry.champion_as_of(shop.settings, hour)
    assert champion is not None
    assert result["reference"] == f"champion {registry.kind_label(shop.version, registry.entry_kind(champion))}"
    # reasons are "<candidate>: <metric> ..." (and "cause (<candidate>): ..." notes)
    named = [reason.split(": ", 1)[1].split()[0] for reason in result["reasons"] if not reason.startswith("cause")]
    assert set(named) <= set(metrics.HIGHER_IS_BETTER)
    assert {config.primary_metric, "auc"} & set(named), result["reasons"]
    assert registry.champion_as_of(shop.settings, hour)["version"] == shop.version  # type: ignore[index]
    assert format_hour(hour) not in [e["from_hour"] for e in registry.promotion_log(shop.settings)]
