"""Tests for profile_engine.evaluate: metrics, bootstrap intervals, PSI, the gate and the evaluate_and_promote stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from profile_engine import evaluate, model, registry
from profile_engine.hours import HOUR, format_hour
from profile_engine.lake import MODELS, Lake, read_json
from tests.test_labels import CATEGORICAL, NUMERIC, T0, make_settings, synthetic_lake
from tests.test_model import FAST, SMALL


# ---- metrics -------------------------------------------------------------------------------------------------------
@hypothesis_settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=2, max_size=40).filter(
        lambda rows: 0 < sum(y for y, _ in rows) < len(rows)
    )
)
def test_auc_equals_the_pairwise_definition_with_ties(rows: list[tuple[bool, int]]) -> None:
    # Arrange
    y = np.array([r[0] for r in rows])
    p = np.array([r[1] for r in rows], dtype=float)
    pos, neg = p[y], p[~y]
    pairwise = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        pos.size * neg.size
    )

    # Act
    value = evaluate.auc(y, p)

    # Assert
    assert value == pytest.approx(pairwise)
    assert evaluate.auc(y, -p) == pytest.approx(1 - value)


def test_hand_computed_metrics() -> None:
    # Arrange: ten rows, the single positive has the highest score
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    p = np.array([0.1] * 9 + [0.9])

    # Act
    values = evaluate.metrics(y, p)

    # Assert
    assert values["auc"] == 1.0 and values["pr_auc"] == 1.0
    assert values["top_decile_precision"] == 1.0 and values["top_decile_lift"] == pytest.approx(10.0)
    assert values["brier"] == pytest.approx((9 * 0.01 + 0.01) / 10)
    assert values["log_loss"] == pytest.approx(-np.log(0.9))
    assert values["ece"] == pytest.approx(0.1)  # every bin is off by 0.1


def test_pr_auc_of_a_hand_ranked_list() -> None:
    # ranking: +, -, +  -> precision at the two recalls: 1 and 2/3
    assert evaluate.pr_auc(np.array([1, 0, 1]), np.array([0.9, 0.5, 0.1])) == pytest.approx((1 + 2 / 3) / 2)


def test_bootstrap_intervals_contain_the_point_estimate_and_are_seeded() -> None:
    # Arrange
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 1, 1500)
    y = (rng.random(p.size) < p).astype(float)
    scores = {"good": p, "noisy": np.clip(p + rng.normal(0, 0.3, p.size), 0, 1)}

    # Act
    intervals = evaluate.bootstrap_intervals(y, scores, n_boot=100, seed=5)
    again = evaluate.bootstrap_intervals(y, scores, n_boot=100, seed=5)

    # Assert
    assert intervals == again
    for name, score in scores.items():
        point = evaluate.metrics(y, score)
        for metric, (low, high) in intervals[name].items():
            assert low <= point[metric] <= high, (name, metric)
    assert intervals["good"]["auc"][0] > intervals["noisy"]["auc"][0]


# ---- drift ---------------------------------------------------------------------------------------------------------
def test_psi_is_zero_for_identical_and_large_for_shifted_distributions() -> None:
    # Arrange
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 5000)
    base[:100] = np.nan

    # Act / Assert
    assert evaluate.psi(base, base.copy()) == pytest.approx(0.0, abs=1e-12)
    same = np.r_[np.full(100, np.nan), rng.normal(0, 1, 4900)]
    assert evaluate.psi(base, same) < 0.05
    assert evaluate.psi(base, same + 1.5) > 1.0
    assert evaluate.psi(base, np.r_[np.full(1000, np.nan), same[1000:]]) > 0.1  # missing values are drift too
    assert evaluate.psi_categorical(["a", "b"] * 50, ["a", "b"] * 50) == pytest.approx(0.0)
    assert evaluate.psi_categorical(["a", "b"] * 50, ["a"] * 90 + [None] * 10) > 1.0


# ---- the gate ------------------------------------------------------------------------------------------------------
def scores(auc: float, log_loss: float = 0.4, lift: float = 2.0) -> dict[str, float]:
    return {"auc": auc, "log_loss": log_loss, "top_decile_lift": lift}


def test_gate_promotes_a_challenger_within_the_margin() -> None:
    decision = evaluate.gate(scores(0.745), scores(0.75))

    assert decision.promote
    assert decision.reasons == ["all checks passed"]


def test_gate_rejects_a_challenger_worse_than_the_champion_beyond_the_margin() -> None:
    decision = evaluate.gate(scores(0.72), scores(0.75))

    assert not decision.promote
    assert decision.reasons == ["auc 0.7200 worse than reference 0.7500 beyond margin 0.01"]


def test_gate_rejects_below_a_floor_and_knows_lower_is_better_metrics() -> None:
    config = evaluate.GateConfig(floors={"auc": 0.6}, margins={"log_loss": 0.02})

    low_auc = evaluate.gate(scores(0.55), None, config)
    worse_loss = evaluate.gate(scores(0.8, log_loss=0.45), scores(0.8, log_loss=0.40), config)
    better_loss = evaluate.gate(scores(0.8, log_loss=0.30), scores(0.8, log_loss=0.40), config)

    assert not low_auc.promote and "below" not in low_auc.reasons[0] and "floor 0.6" in low_auc.reasons[0]
    assert not worse_loss.promote
    assert better_loss.promote


# ---- the stage -----------------------------------------------------------------------------------------------------
def test_evaluate_and_promote_is_skipped_without_a_challenger(tmp_path: Path) -> None:
    result = evaluate.evaluate_and_promote(make_settings(tmp_path), T0)

    assert result == {"status": "skipped", "reason": f"no challenger trained at {format_hour(T0)}"}


def test_lifecycle_promotes_against_baseline_then_gates_against_the_champion(tmp_path: Path) -> None:
    # Arrange: 22 hourly snapshots; retraining is due every 6 h (12:00 and 18:00)
    settings = make_settings(tmp_path)
    synthetic_lake(settings, T0, hours=22, users=300)
    first_hour, second_hour = T0 + 12 * HOUR, T0 + 18 * HOUR
    options = {"numeric": NUMERIC, "categorical": CATEGORICAL, "training_config": SMALL, "model_config": FAST}
    first = model.train_challenger(settings, first_hour, **options)  # type: ignore[arg-type]

    # Act 1: no champion yet, so the challenger is compared with its own baseline
    promoted = evaluate.evaluate_and_promote(settings, first_hour, n_boot=50)

    # Assert 1
    assert promoted["status"] == "promoted", promoted["reasons"]
    assert promoted["reference"] == f"baseline {first['version']}"
    assert registry.champion_as_of(settings, first_hour)["version"] == first["version"]  # type: ignore[index]
    model_dir = Lake(settings.lake).path(MODELS, first["version"])
    evaluation = read_json(model_dir / model.EVALUATION_FILE)
    for name in ("challenger", "reference"):
        low, high = evaluation["intervals"][name]["auc"]
        assert low <= evaluation["metrics"][name]["auc"] <= high
    assert evaluation["drift"]["previous_hour"] == format_hour(first_hour - HOUR)
    assert set(evaluation["drift"]["features"]) == {*NUMERIC, *CATEGORICAL}
    assert "decision: promoted" in (model_dir / model.CARD_FILE).read_text()

    # Act 2: a second challenger meets an impossible floor, then is forced through
    second = model.train_challenger(settings, second_hour, **options)  # type: ignore[arg-type]
    strict = evaluate.GateConfig(floors={"auc": 0.99}, margins={"auc": 0.01})
    rejected = evaluate.evaluate_and_promote(settings, second_hour, gate_config=strict, n_boot=20)
    still = registry.champion_as_of(settings, second_hour)
    forced = evaluate.evaluate_and_promote(settings, second_hour, gate_config=strict, force_promote=True, n_boot=20)

    # Assert 2
    assert rejected["status"] == "rejected"
    assert rejected["reference"] == f"champion {first['version']}"
    assert any("floor 0.99" in r for r in rejected["reasons"])
    assert still is not None and still["version"] == first["version"]
    assert forced["status"] == "promoted" and forced["forced"] is True
    entry = registry.champion_as_of(settings, second_hour)
    assert entry is not None and entry["version"] == second["version"] and entry["forced"] is True
    assert registry.champion_as_of(settings, second_hour - HOUR)["version"] == first["version"]  # type: ignore[index]
    assert "(forced)" in (Lake(settings.lake).path(MODELS, second["version"]) / model.CARD_FILE).read_text()
