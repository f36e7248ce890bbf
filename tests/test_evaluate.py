"""Tests for profile_engine.model metrics, drift, gate and promotion (evaluate_and_promote)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from profile_engine.contracts.profiles import USER_ID
from profile_engine.contracts.scores import DECILE, MODEL_VERSION, PROPENSITY, SCORES_SCHEMA
from profile_engine.hours import HOUR, format_hour
from profile_engine.lake.storage import MODELS, SCORES, Lake, read_json
from profile_engine.model import card as cards
from profile_engine.model import drift, gate, metrics, promotion, registry, training
from tests.test_labels import CATEGORICAL, NUMERIC, T0, make_settings, record_reads, synthetic_lake
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
    value = metrics.auc(y, p)

    # Assert
    assert value == pytest.approx(pairwise)
    assert metrics.auc(y, -p) == pytest.approx(1 - value)


def test_hand_computed_metrics() -> None:
    # Arrange: ten rows, the single positive has the highest score
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    p = np.array([0.1] * 9 + [0.9])

    # Act
    values = metrics.metrics(y, p)

    # Assert
    assert values["auc"] == 1.0 and values["pr_auc"] == 1.0
    assert values["precision_at_10"] == 1.0 and values["lift_at_10"] == pytest.approx(10.0)
    assert values["precision_at_20"] == 0.5 and values["lift_at_20"] == pytest.approx(5.0)
    assert values["brier"] == pytest.approx((9 * 0.01 + 0.01) / 10)
    assert values["log_loss"] == pytest.approx(-np.log(0.9))
    assert metrics.ece(y, p) == pytest.approx(0.1)  # every bin is off by 0.1 (plug-in)
    assert values["ece"] == metrics.ece_debiased(y, p)  # less the binning noise


def test_pr_auc_of_a_hand_ranked_list() -> None:
    # ranking: +, -, +  -> precision at the two recalls: 1 and 2/3
    assert metrics.pr_auc(np.array([1, 0, 1]), np.array([0.9, 0.5, 0.1])) == pytest.approx((1 + 2 / 3) / 2)


def test_bootstrap_intervals_contain_the_point_estimate_and_are_seeded() -> None:
    # Arrange
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 1, 1500)
    y = (rng.random(p.size) < p).astype(float)
    scores = {"good": p, "noisy": np.clip(p + rng.normal(0, 0.3, p.size), 0, 1)}

    # Act
    intervals = metrics.bootstrap_intervals(y, scores, n_boot=100, seed=5, differences=[("good", "noisy")])
    again = metrics.bootstrap_intervals(y, scores, n_boot=100, seed=5, differences=[("good", "noisy")])

    # Assert
    assert intervals == again
    for name, score in scores.items():
        point = metrics.metrics(y, score)
        assert set(intervals[name]) == set(metrics.HIGHER_IS_BETTER)
        for metric, (low, high) in intervals[name].items():
            assert low <= point[metric] <= high, (name, metric)
    assert intervals["good"]["auc"][0] > intervals["noisy"]["auc"][0]
    assert intervals["good - noisy"]["auc"][0] > 0  # the paired difference excludes 0
    assert intervals["good - noisy"]["log_loss"][1] < 0


def test_top_share_of_an_all_tied_scorer_is_the_base_rate() -> None:
    # Arrange: a flat scorer (every row tied); positives first, so row order would put them all in the top 10%
    y = np.array([1.0] * 3 + [0.0] * 17)
    p = np.full(y.size, 0.25)

    # Act
    precision, lift = metrics.top_share(y, p, 0.1)
    values = metrics.metrics(y, p)

    # Assert: whatever the row order, a scorer that ranks nobody above anybody has lift exactly 1
    assert precision == pytest.approx(0.15) and lift == 1.0
    assert values["lift_at_10"] == 1.0 and values["lift_at_20"] == 1.0


def test_top_share_counts_rows_tied_at_the_cut_with_their_expected_share() -> None:
    # Arrange: k = 2 of 10 rows; one row above the cut (a positive), three tied at it (one positive) for one place
    y = np.array([1, 0, 1, 0, 0, 1, 0, 0, 0, 0], dtype=float)
    p = np.array([0.9, 0.8, 0.8, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])

    # Act
    precision, lift = metrics.top_share(y, p, 0.2)
    reordered = metrics.top_share(y[::-1], p[::-1], 0.2)

    # Assert: (1 + 1/3 of a positive) / 2 rows = 2/3; base rate 3/10, so lift 20/9; row order does not matter
    assert precision == pytest.approx(2 / 3) and lift == pytest.approx(20 / 9)
    assert reordered == pytest.approx((precision, lift))


@hypothesis_settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2)), min_size=1, max_size=6))
def test_top_share_is_the_mean_over_every_order_of_the_tied_rows(rows: list[tuple[bool, int]]) -> None:
    # Arrange
    y = np.array([r[0] for r in rows], dtype=float)
    p = np.array([r[1] for r in rows], dtype=float)
    k = max(1, int(np.ceil(0.4 * y.size)))

    # Act
    precision, _ = metrics.top_share(y, p, 0.4)

    # Assert: the average, over every permutation of the rows, of the top-k precision with ties by position
    orders = [list(order) for order in itertools.permutations(range(y.size))]
    expected = np.mean([y[o][np.argsort(-p[o], kind="stable")[:k]].mean() for o in orders])
    assert precision == pytest.approx(expected)


@hypothesis_settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(0, 1)), min_size=5, max_size=60))
def test_top_share_precision_is_the_positive_rate_of_the_highest_scores(rows: list[tuple[bool, float]]) -> None:
    # Arrange
    y = np.array([r[0] for r in rows], dtype=float)
    p = np.array([r[1] for r in rows])

    # Act
    p10, lift10 = metrics.top_share(y, p, 0.1)
    p20, _ = metrics.top_share(y, p, 0.2)
    p_all, lift_all = metrics.top_share(y, p, 1.0)

    # Assert
    k = int(np.ceil(0.2 * y.size))
    if np.unique(p).size == p.size:  # no ties: exactly the positive rate of the k highest scores
        assert p20 == pytest.approx(y[np.argsort(-p)[:k]].mean())
    assert p_all == pytest.approx(y.mean())
    if y.sum() > 0:
        assert lift_all == pytest.approx(1.0) and lift10 == pytest.approx(p10 / y.mean())
    else:
        assert np.isnan(lift10)


def test_curves_match_their_metrics() -> None:
    # Arrange
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, 800).round(2)  # ties on purpose
    y = (rng.random(p.size) < p).astype(float)

    # Act
    fpr, tpr = metrics.roc_curve(y, p)
    recall, precision = metrics.pr_curve(y, p)
    calibration = metrics.calibration_curve(y, p)
    lift = metrics.lift_by_decile(y, p)

    # Assert
    assert metrics.auc_from_curve(fpr, tpr) == pytest.approx(metrics.auc(y, p))
    assert float(np.sum(np.diff(np.r_[0.0, recall]) * precision)) == pytest.approx(metrics.pr_auc(y, p))
    assert sum(calibration["rows"]) == p.size
    assert np.average(
        np.abs(np.subtract(calibration["predicted"], calibration["observed"])), weights=calibration["rows"]
    ) == pytest.approx(metrics.ece(y, p))
    assert lift[-1] > 1.5 > 0.5 > lift[0]
    assert np.mean(lift) == pytest.approx(1.0, abs=0.02)


def test_permutation_importance_finds_the_column_the_model_uses() -> None:
    # Arrange: the "model" is the column "used"; "ignored" is noise
    rng = np.random.default_rng(2)
    used = rng.normal(size=1000)
    table = pa.table({"used": used, "ignored": rng.normal(size=1000)})
    y = (rng.random(1000) < 1 / (1 + np.exp(-2 * used))).astype(float)

    # Act
    importance = metrics.permutation_importance(lambda t: np.asarray(t.column("used")), table, ["used", "ignored"], y)

    # Assert
    assert list(importance) == ["used", "ignored"]
    assert importance["used"] > 0.2
    assert importance["ignored"] == pytest.approx(0.0)


# ---- drift ---------------------------------------------------------------------------------------------------------
def test_psi_is_zero_for_identical_and_large_for_shifted_distributions() -> None:
    # Arrange
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 5000)
    base[:100] = np.nan

    # Act / Assert
    assert drift.psi(base, base.copy()) == pytest.approx(0.0, abs=1e-12)
    same = np.r_[np.full(100, np.nan), rng.normal(0, 1, 4900)]
    assert drift.psi(base, same) < 0.05
    assert drift.psi(base, same + 1.5) > 1.0
    assert drift.psi(base, np.r_[np.full(1000, np.nan), same[1000:]]) > 0.1  # missing values are drift too
    assert drift.psi_categorical(["a", "b"] * 50, ["a", "b"] * 50) == pytest.approx(0.0)
    assert drift.psi_categorical(["a", "b"] * 50, ["a"] * 90 + [None] * 10) > 1.0


@hypothesis_settings(max_examples=60, deadline=None)
@given(
    expected=st.lists(st.sampled_from(["a", "b", "None", "é", "zz", None]), max_size=40),
    actual=st.lists(st.sampled_from(["a", "q", None]), max_size=40),
    dictionary=st.booleans(),
)
def test_psi_of_arrow_columns_is_exactly_psi_categorical_of_their_values(
    expected: list[str | None], actual: list[str | None], dictionary: bool
) -> None:
    # Arrange: string columns (dictionary-encoded or not, one or more chunks), None and "None" among the values
    first = pa.array(expected, pa.string())
    second = pa.chunked_array([pa.array(actual[:5], pa.string()), pa.array(actual[5:], pa.string())])
    if dictionary:
        first = first.dictionary_encode()

    # Act
    fast = drift.psi_categorical_columns(first, second)

    # Assert: the same float, not an approximation (the run report's drift must not move)
    assert fast == drift.psi_categorical(first.to_pylist(), second.to_pylist())


def test_hourly_drift_reads_the_scores_one_bucket_at_a_time_with_the_whole_hours_psi(tmp_path: Path) -> None:
    # Arrange: two committed snapshots and their scores over 3 buckets (NaN and null propensities among them)
    settings = make_settings(tmp_path)
    first, second = synthetic_lake(settings, T0, hours=2, users=40)
    lake = Lake(settings.lake)
    rng = np.random.default_rng(3)
    written: dict[object, pa.Table] = {}
    for hour, versions in ((first, ["v1", "v1", "v2"]), (second, ["v2", "v2", "v2"])):
        parts = []
        for bucket, version in enumerate(versions):
            values = rng.random(30)
            values[bucket] = np.nan
            part = pa.table(
                {
                    USER_ID: [f"u{bucket}-{i}" for i in range(30)],
                    PROPENSITY: pa.array(values, mask=np.arange(30) == 7),
                    DECILE: pa.array([1] * 30, pa.int8()),
                    MODEL_VERSION: [version] * 30,
                },
                schema=SCORES_SCHEMA,
            )
            lake.write_partition(SCORES, hour, part, bucket=bucket)
            parts.append(part)
        written[hour] = pa.concat_tables(parts)
    expected = [np.asarray(written[h].column(PROPENSITY).fill_null(np.nan), dtype=np.float64) for h in (first, second)]
    reads, held, recording = record_reads()

    # Act
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pq, "read_table", recording)
        found = drift.hourly_drift(settings, second)

    # Assert: the PSI of the whole hours' non-null propensities, every read at most one bucket
    before, now = (e[~np.isnan(e)] for e in expected)
    assert found["score"] == {"psi": drift.psi(before, now), "versions": {"previous": ["v1", "v2"], "current": ["v2"]}}
    assert found["previous_hour"] == format_hour(first)
    assert max(reads) <= 30 and len(reads) == 2 * 2 + 2 * 3  # per hour: the snapshot's 2 buckets, the scores' 3
    assert max(held) <= 1  # when a bucket was read, at most the bucket before was still held


# ---- the gate ------------------------------------------------------------------------------------------------------
def scores(auc: float, log_loss: float = 0.4, lift: float = 2.0, ece: float = 0.01) -> dict[str, float]:
    return {"auc": auc, "log_loss": log_loss, "lift_at_10": lift, "ece": ece}


def test_gate_promotes_a_challenger_within_the_margins() -> None:
    decision = gate.gate(scores(0.745, lift=1.95), scores(0.75, lift=2.0))

    assert decision.promote
    assert decision.reasons == ["all checks passed"]
    assert decision.config["primary_metric"] == "lift_at_10"


def test_gate_rejects_a_challenger_worse_on_the_primary_metric_beyond_the_margin() -> None:
    decision = gate.gate(scores(0.75, lift=1.8), scores(0.75, lift=2.0))

    assert not decision.promote
    assert decision.reasons == ["lift_at_10 1.8000 worse than reference 2.0000 beyond margin 0.1"]


def test_gate_floors_and_the_calibration_ceiling() -> None:
    low_auc = gate.gate(scores(0.55), None)
    miscalibrated = gate.gate(scores(0.8, ece=0.08), None)

    assert not low_auc.promote and low_auc.reasons == ["auc 0.5500 fails floor 0.6"]
    assert not miscalibrated.promote and miscalibrated.reasons == ["ece 0.0800 exceeds ceiling 0.05"]
    assert gate.gate(scores(float("nan")), None).promote is False  # NaN never passes


def test_gate_knows_lower_is_better_metrics_as_primary() -> None:
    config = gate.GateConfig(floors={"auc": 0.6}, primary_metric="log_loss", margin=0.02, margins={})

    worse_loss = gate.gate(scores(0.8, log_loss=0.45), scores(0.8, log_loss=0.40), config)
    better_loss = gate.gate(scores(0.8, log_loss=0.30), scores(0.8, log_loss=0.40), config)

    assert not worse_loss.promote and worse_loss.reasons[0].startswith("log_loss 0.4500 worse than reference")
    assert better_loss.promote


def test_gate_never_promotes_a_challenger_worse_than_its_baseline_even_inside_the_margin() -> None:
    # Arrange: AUC 0.686 against the baseline's 0.696 and lift 2.00 against 2.05: both inside the margins
    challenger, baseline = scores(0.686, lift=2.0), scores(0.696, lift=2.05)
    intervals = {"challenger - baseline": {"lift_at_10": [-0.41, 0.33], "auc": [-0.03, 0.01]}}

    # Act
    old_style = gate.gate(challenger, baseline)  # the baseline as a reference with margins: promoted
    decision = gate.gate(challenger, None, baselines={"baseline": baseline}, intervals=intervals)

    # Assert: rejected, naming the deciding metric, the comparison and the paired interval
    assert old_style.promote
    assert not decision.promote
    assert decision.reasons == [
        "lift_at_10 2.0000 worse than baseline 2.0500 (difference -0.0500, 95% paired interval [-0.4100, 0.3300])"
    ]
    assert decision.deciding == {
        "check": "not worse than baseline",
        "metric": "lift_at_10",
        "against": "baseline",
        "value": 2.0,
        "reference": 2.05,
        "interval": [-0.41, 0.33],
        "passed": False,
    }


def test_gate_compares_heuristics_only_on_ranking_metrics() -> None:
    # Arrange: a heuristic is a rank, not a probability: its log loss means nothing
    config = gate.GateConfig(floors={"auc": 0.6}, primary_metric="log_loss", margin=0.02, margins={"auc": 0.01})
    challenger = scores(0.75, log_loss=0.40)
    heuristic = scores(0.70, log_loss=0.10)

    # Act
    decision = gate.gate(challenger, None, config, baselines={"heuristic_recency": heuristic})

    # Assert
    assert decision.promote, decision.reasons
    assert [c["metric"] for c in decision.checks if c.get("against") == "heuristic_recency"] == []


def test_gate_tests_the_ece_ceiling_on_its_interval() -> None:
    # Arrange: the best model of a run had ECE 0.0550 against a ceiling of 0.05
    challenger = scores(0.733, ece=0.055)
    plausible = {"challenger": {"ece": [0.031, 0.081]}}
    clearly_above = {"challenger": {"ece": [0.052, 0.081]}}

    # Act
    point_only = gate.gate(challenger, None)
    within = gate.gate(challenger, None, intervals=plausible)
    above = gate.gate(challenger, None, intervals=clearly_above)

    # Assert: rejected only when the whole interval is above the ceiling, and the reason says so
    assert not point_only.promote  # without an interval the point estimate is all there is
    assert within.promote, within.reasons
    assert not above.promote
    assert above.reasons == ["ece 0.0550 exceeds ceiling 0.05 (95% interval [0.0520, 0.0810] entirely above)"]
    assert above.deciding["metric"] == "ece" and above.deciding["interval"] == [0.052, 0.081]


def test_gate_refuses_a_calibration_its_interval_cannot_establish() -> None:
    # Arrange: a small shop's baseline (90 evaluation rows) with ECE 0.092 [0.000, 0.203] against a ceiling of 0.05:
    # not "entirely above", but the interval allows four times the ceiling (it then scored 0.3 for a 0.1-0.2 base rate)
    challenger = scores(0.70, ece=0.092)
    too_wide = {"challenger": {"ece": [0.0, 0.203]}}
    narrow_enough = {"challenger": {"ece": [0.031, 0.081]}}  # reaches past the ceiling, within twice it

    # Act
    wide = gate.gate(challenger, None, intervals=too_wide)
    fine = gate.gate(scores(0.70, ece=0.055), None, intervals=narrow_enough)

    # Assert: rejected, and the reason names the interval and the evidence bound
    assert not wide.promote
    assert wide.reasons == [
        "ece 0.0920 not established under ceiling 0.05 (95% interval [0.0000, 0.2030] reaches above 0.1, "
        "2x the ceiling: too few evaluation rows to tell)"
    ]
    assert fine.promote, fine.reasons


def test_gate_config_from_the_environment() -> None:
    config = gate.GateConfig.from_env(
        {
            "PROFILE_ENGINE_GATE_MIN_AUC": "0.65",
            "PROFILE_ENGINE_GATE_PRIMARY_METRIC": "lift_at_20",
            "PROFILE_ENGINE_GATE_MARGIN": "0.2",
        }
    )

    assert config.floors == {"auc": 0.65, "ece": 0.05}
    assert (config.primary_metric, config.margin) == ("lift_at_20", 0.2)
    assert gate.GateConfig.from_env({}) == gate.GateConfig()
    with pytest.raises(ValueError, match="unknown metric"):
        gate.GateConfig.from_env({"PROFILE_ENGINE_GATE_PRIMARY_METRIC": "lift@10"})
    with pytest.raises(ValueError, match="PROFILE_ENGINE_GATE_MARGIN"):
        gate.GateConfig.from_env({"PROFILE_ENGINE_GATE_MARGIN": "a lot"})


# ---- the gate over a version's candidates ----------------------------------------------------------------------------
def candidate_intervals(*pairs: tuple[str, str, list[float]]) -> dict[str, dict[str, list[float]]]:
    return {f"{a} - {b}": {"lift_at_10": interval} for a, b, interval in pairs}


def test_choose_promotes_lightgbm_when_it_wins_clearly_on_the_same_rows() -> None:
    # Arrange: the trees beat the network by 0.6 lift (beyond the 0.1 margin), both beat the baseline
    candidates = {
        "network": scores(0.74, lift=2.0),
        "lightgbm": scores(0.78, lift=2.6),
        "baseline": scores(0.70, lift=1.7),
    }
    intervals = candidate_intervals(("lightgbm", "network", [0.2, 1.0]), ("lightgbm", "baseline", [0.4, 1.4]))

    # Act
    decision = gate.choose(candidates, None, baselines={"baseline": candidates["baseline"]}, intervals=intervals)

    # Assert: the trees win; the choice names the metric, both values and the paired interval
    assert decision.promote and decision.candidate == "lightgbm"
    assert decision.choice["winner"] == "lightgbm" and decision.choice["best"] == "lightgbm"
    assert (
        "better than network 2.0000 by 0.6000, beyond margin 0.1 (95% paired interval [0.2000, 1.0000])"
        in (decision.choice["reason"])
    )
    assert decision.deciding["candidate"] == "lightgbm" and decision.deciding["metric"] == "lift_at_10"
    assert decision.deciding["interval"] == [0.4, 1.4]  # lightgbm - baseline on the primary metric
    assert set(decision.candidates) == {"network", "lightgbm", "baseline"}
    assert all(v["promote"] for v in decision.candidates.values())


def test_choose_keeps_the_network_when_the_candidates_tie_within_the_margin() -> None:
    # Arrange: the trees are 0.05 lift better, inside the 0.1 margin
    candidates = {
        "network": scores(0.75, lift=2.0),
        "lightgbm": scores(0.76, lift=2.05),
        "baseline": scores(0.7, lift=1.8),
    }
    intervals = candidate_intervals(("lightgbm", "network", [-0.3, 0.4]))

    # Act
    decision = gate.choose(candidates, None, baselines={"baseline": candidates["baseline"]}, intervals=intervals)

    # Assert
    assert decision.promote and decision.candidate == "network"
    assert decision.choice["best"] == "lightgbm"
    assert decision.choice["reason"] == (
        "network kept: lift_at_10 2.0000 within margin 0.1 of lightgbm 2.0500 "
        "(difference 0.0500, 95% paired interval [-0.3000, 0.4000]); also passed: baseline"
    )


def test_choose_prefers_the_ensemble_within_the_margin_and_the_network_only_beyond_it() -> None:
    # Arrange: the candidates in the version's preference order; the trees are 0.05 lift better than the
    # ensemble (inside the margin), and the network 0.07 (inside the margin) or 0.4 (beyond it) better than the ensemble
    from profile_engine.model import candidates as cands

    order = [cands.CANDIDATE_NAMES[kind] for kind in registry.MODEL_KINDS if kind not in registry.SEQUENCE_KINDS]
    values = {
        "ensemble": scores(0.76, lift=2.4),
        "lightgbm": scores(0.76, lift=2.45),
        "baseline": scores(0.70, lift=1.8),
    }
    intervals = candidate_intervals(("lightgbm", "ensemble", [-0.2, 0.3]), ("network", "ensemble", [-0.1, 0.7]))

    def decide(network_lift: float) -> gate.GateDecision:
        candidates = {**values, "network": scores(0.76, lift=network_lift)}
        return gate.choose(
            {name: candidates[name] for name in order},
            None,
            baselines={"baseline": values["baseline"]},
            intervals=intervals,
        )

    # Act
    tied, beaten = decide(2.47), decide(2.8)

    # Assert: tie order ensemble, network, lightgbm, baseline; the ensemble is kept within the margin of the
    # best, and the network alone wins when it beats the ensemble by more than the margin
    assert order == ["ensemble", "network", "lightgbm", "baseline"]
    assert tied.promote and tied.candidate == "ensemble" and tied.choice["best"] == "network"
    assert tied.choice["reason"].startswith("ensemble kept: lift_at_10 2.4000 within margin 0.1 of network 2.4700")
    assert beaten.promote and beaten.candidate == "network" and beaten.choice["best"] == "network"
    assert "better than ensemble 2.4000 by 0.4000, beyond margin 0.1" in beaten.choice["reason"]


def test_choose_never_promotes_a_candidate_worse_than_the_baseline() -> None:
    # Arrange: network and trees are below the baseline's lift; the baseline itself fails the AUC floor
    candidates = {
        "network": scores(0.7, lift=1.9),
        "lightgbm": scores(0.72, lift=1.95),
        "baseline": scores(0.58, lift=2.0),
    }
    baselines = {"baseline": candidates["baseline"]}

    # Act
    rejected = gate.choose(candidates, None, baselines=baselines)
    passing_baseline = gate.choose(
        {**candidates, "baseline": scores(0.65, lift=2.0)}, None, baselines={"baseline": scores(0.65, lift=2.0)}
    )

    # Assert: nothing better than the baseline exists, so at most the baseline itself is promoted
    assert not rejected.promote and rejected.candidate is None
    assert rejected.reasons == [
        "network: lift_at_10 1.9000 worse than baseline 2.0000 (difference -0.1000)",
        "lightgbm: lift_at_10 1.9500 worse than baseline 2.0000 (difference -0.0500)",
        "baseline: auc 0.5800 fails floor 0.6",
    ]
    assert rejected.deciding["candidate"] == "network" and rejected.deciding["metric"] == "lift_at_10"
    assert passing_baseline.promote and passing_baseline.candidate == "baseline"
    assert (
        not passing_baseline.candidates["network"]["promote"] and not passing_baseline.candidates["lightgbm"]["promote"]
    )


def test_choose_holds_every_candidate_to_the_champion_margin() -> None:
    # Arrange: the trees beat the network but fall short of the champion by more than the margin
    candidates = {
        "network": scores(0.7, lift=1.5),
        "lightgbm": scores(0.72, lift=1.7),
        "baseline": scores(0.68, lift=1.4),
    }

    # Act
    decision = gate.choose(candidates, scores(0.75, lift=2.0), baselines={"baseline": candidates["baseline"]})

    # Assert
    assert not decision.promote
    assert "lightgbm: lift_at_10 1.7000 worse than champion 2.0000 beyond margin 0.1" in decision.reasons


# ---- the stage -----------------------------------------------------------------------------------------------------
def test_evaluate_and_promote_is_skipped_without_a_challenger(tmp_path: Path) -> None:
    result = promotion.evaluate_and_promote(make_settings(tmp_path), T0)

    assert result == {"status": "skipped", "reason": f"no challenger trained at {format_hour(T0)}"}


def test_lifecycle_promotes_against_baseline_then_gates_against_the_champion(tmp_path: Path) -> None:
    # Arrange: 22 hourly snapshots; retraining is due every 6 h (12:00 and 18:00)
    settings = make_settings(tmp_path)
    synthetic_lake(settings, T0, hours=22, users=300)
    first_hour, second_hour = T0 + 12 * HOUR, T0 + 18 * HOUR
    options = {"numeric": NUMERIC, "categorical": CATEGORICAL, "training_config": SMALL, "model_config": FAST}
    first = training.train_challenger(settings, first_hour, **options)  # type: ignore[arg-type]

    # Act 1: no champion yet, so the challenger is compared with its own baseline
    # 300 synthetic users calibrate loosely: a wider ECE ceiling keeps this test about the lifecycle
    loose = gate.GateConfig(floors={"auc": 0.6, "ece": 0.2})
    promoted = promotion.evaluate_and_promote(settings, first_hour, gate_config=loose, n_boot=50)

    # Assert 1
    assert promoted["status"] == "promoted", promoted["reasons"]
    # The summary goes to XCom as strict JSON: the heuristics' NaN probability metrics are nulls there
    assert promoted["metrics"]["heuristic_recency"]["log_loss"] is None
    json.dumps(promoted, allow_nan=False)
    assert promoted["reference"] == f"baseline {first['version']}-baseline and heuristics (recency, open_cart)"
    assert promoted["deciding"]["metric"] == "lift_at_10" and promoted["deciding"]["check"].startswith("not worse")
    assert registry.champion_as_of(settings, first_hour)["version"] == first["version"]  # type: ignore[index]
    model_dir = Lake(settings.lake).path(MODELS, first["version"])
    evaluation = read_json(model_dir / registry.EVALUATION_FILE)
    assert set(evaluation["metrics"]) == {
        "network",
        "ensemble",
        "lightgbm",
        "baseline",
        "heuristic_recency",
        "heuristic_open_cart",
    }
    assert [c["name"] for c in evaluation["candidates"]] == ["ensemble", "network", "lightgbm", "baseline"]
    assert evaluation["decision"]["calibrations"]["ensemble"]["method"] in ("platt", "platt_intercept")
    assert evaluation["chosen"] == promoted["candidate"] == evaluation["decision"]["candidate"]
    assert registry.champion_as_of(settings, first_hour)["kind"] == evaluation["kind"]  # type: ignore[index]
    assert np.isnan(evaluation["metrics"]["heuristic_recency"]["log_loss"])  # a rank is not a probability
    for name in ("network", "ensemble", "lightgbm", "baseline"):
        low, high = evaluation["intervals"][name]["auc"]
        assert low <= evaluation["metrics"][name]["auc"] <= high
    assert evaluation["drift"]["previous_hour"] == format_hour(first_hour - HOUR)
    assert set(evaluation["drift"]["features"]) == {*NUMERIC, *CATEGORICAL}
    card = (model_dir / registry.CARD_FILE).read_text()
    assert "decision: promoted" in card
    for name in ("network", "ensemble", "lightgbm", "baseline"):
        assert f"  - {name}: " in card  # every candidate's verdict
    assert f"- candidate: {promoted['candidate']} (" in card
    for png in cards.PLOT_FILES.values():
        assert (model_dir / png).read_bytes().startswith(b"\x89PNG"), png
        assert f"({png})" in card
    assert set(evaluation["importance"]["features"]) == {*NUMERIC, *CATEGORICAL}
    assert {"network - baseline", "lightgbm - network", "lightgbm - heuristic_open_cart"} <= set(
        evaluation["intervals"]
    )
    assert evaluation["decision"]["calibration"]["method"] in ("platt", "platt_intercept")
    decisions = registry.decision_log(settings)
    assert [d["version"] for d in decisions] == [first["version"]] and decisions[0]["promoted"] is True

    # Act 2: a second challenger meets an impossible floor, then is forced through
    second = training.train_challenger(settings, second_hour, **options)  # type: ignore[arg-type]
    strict = gate.GateConfig(floors={"auc": 0.99})
    rejected = promotion.evaluate_and_promote(settings, second_hour, gate_config=strict, n_boot=20)
    still = registry.champion_as_of(settings, second_hour)
    forced = promotion.evaluate_and_promote(settings, second_hour, gate_config=strict, force_promote=True, n_boot=20)

    # Assert 2
    assert rejected["status"] == "rejected"
    champion_label = registry.kind_label(first["version"], evaluation["kind"])
    assert rejected["reference"] == f"champion {champion_label}"
    assert set(
        read_json(Lake(settings.lake).path(MODELS, second["version"]) / registry.EVALUATION_FILE)["metrics"]
    ) == {
        "network",
        "ensemble",
        "lightgbm",
        "champion",
        "baseline",
    }
    assert any("floor 0.99" in r for r in rejected["reasons"])
    assert still is not None and still["version"] == first["version"]
    assert forced["status"] == "promoted" and forced["forced"] is True
    entry = registry.champion_as_of(settings, second_hour)
    assert entry is not None and entry["version"] == second["version"] and entry["forced"] is True
    assert registry.champion_as_of(settings, second_hour - HOUR)["version"] == first["version"]  # type: ignore[index]
    assert "(forced)" in (Lake(settings.lake).path(MODELS, second["version"]) / registry.CARD_FILE).read_text()
    assert entry["decision"]["reasons"] == rejected["reasons"]  # the overridden verdict is kept
    assert [d["promoted"] for d in registry.decision_log(settings)] == [True, True]  # the rerun replaced the rejection


# ---- ECE: debiased estimate and an interval that holds for a biased statistic ----------------------------------------
def _calibration_sets(count: int, rows: int, seed: int, scale: float) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """``count`` synthetic evaluation sets ``(y, p, true ECE)``: p = 0.7 * Beta(0.6, 7) (base rate ~5%, like the
    project's buyers), y ~ Bernoulli(scale * p). The true binned ECE is ``(scale - 1) * E[p]`` exactly (every bin is
    off in the same direction and ``scale * p < 1``), 0 for ``scale == 1``."""
    rng = np.random.default_rng(seed)
    true = (scale - 1) * 0.7 * 0.6 / 7.6
    out = []
    for _ in range(count):
        p = 0.7 * rng.beta(0.6, 7.0, rows)
        y = (rng.random(rows) < scale * p).astype(np.float64)
        out.append((y, p, true))
    return out


@pytest.mark.parametrize(("scale", "seed"), [(1.0, 11), (1.3, 12)])
def test_ece_interval_covers_the_true_calibration_error_at_the_nominal_rate(scale: float, seed: int) -> None:
    # Arrange: 200 calibrated (scale 1, true ECE 0) or miscalibrated (scale 1.3, true ECE 0.0166) sets of 2,000 rows
    sets = _calibration_sets(200, 2_000, seed, scale)
    rng = np.random.default_rng(seed)

    # Act
    results = [metrics.ece_interval(y, p, rng.integers(0, y.size, (200, y.size))) for y, p, _ in sets]

    # Assert: the interval always holds its estimate; it covers the truth in ~95% of sets (binomial sd over 200 sets
    # is 1.5 points: 0.90 is three sd below 0.95) and is not trivially wide (a miscalibration is told from 0)
    true = sets[0][2]
    assert all(low <= estimate <= high for estimate, low, high in results)
    coverage = np.mean([low <= true <= high for _, low, high in results])
    assert coverage >= 0.90, coverage
    if scale == 1.0:
        assert coverage <= 0.99, coverage
        assert np.mean([estimate for estimate, _, _ in results]) < np.mean([metrics.ece(y, p) for y, p, _ in sets])
    else:
        assert np.mean([low > 0 for _, low, _ in results]) >= 0.5
        assert np.mean([estimate for estimate, _, _ in results]) == pytest.approx(true, rel=0.1)


def test_bootstrap_ece_interval_contains_the_reported_ece_on_calibrated_sets() -> None:
    # Arrange: calibrated sets; the plain percentile interval of the plug-in ECE excluded its own estimate on some
    sets = _calibration_sets(20, 1_000, 3, 1.0)

    # Act
    reported = [
        (
            metrics.metrics(y, p)["ece"],
            metrics.bootstrap_intervals(y, {"model": p}, n_boot=100, seed=1)["model"]["ece"],
        )
        for y, p, _ in sets
    ]

    # Assert
    assert all(low <= estimate <= high for estimate, (low, high) in reported), reported
    assert sum(low == 0.0 for _, (low, _) in reported) >= 15  # a calibrated model's interval reaches 0


def test_debiased_ece_removes_the_binning_noise_of_the_plug_in_ece() -> None:
    # Arrange: the example of test_hand_computed_metrics (plug-in ECE 0.1). Bin 1: nine rows at p = 0.1, no buyer:
    # gap 0.1, noise sd sqrt(9 * 0.09) / 9 = 0.1. Bin 9: one row at p = 0.9 that bought: gap -0.1, sd 0.3.
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    p = np.array([0.1] * 9 + [0.9])

    def folded_normal_mean(mu: float, sd: float, cdf_at_minus_ratio: float) -> float:
        return sd * np.sqrt(2 / np.pi) * np.exp(-(mu**2) / (2 * sd**2)) + abs(mu) * (1 - 2 * cdf_at_minus_ratio)

    # Phi(-1) and Phi(-1/3)
    bin_one = 0.9 * (2 * 0.1 - folded_normal_mean(0.1, 0.1, 0.15865525393145707))
    bin_nine = 0.1 * (2 * 0.1 - folded_normal_mean(-0.1, 0.3, 0.36944134018176367))

    # Act
    value = metrics.ece_debiased(y, p)

    # Assert: per bin 2 |gap| - E|N(gap, sd^2)| (Kumar et al. 2019), weighted by rows, clipped at 0 only in total
    assert value == pytest.approx(bin_one + bin_nine, rel=1e-9)
    assert 0 < value < metrics.ece(y, p) == pytest.approx(0.1)
    assert metrics.metrics(y, p)["ece"] == value
    assert metrics.ece_debiased(np.array([0.0, 1.0]), np.array([0.5, 0.5])) == 0.0  # a negative total reads 0
