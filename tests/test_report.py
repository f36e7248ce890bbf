"""The run report: stage statuses from summaries and Airflow task states."""

from __future__ import annotations

from pathlib import Path

from profile_engine.config import Settings
from profile_engine.contracts.stages import STAGES
from profile_engine.model import promotion
from profile_engine.ops import report
from tests.conftest import HOUR0

DONE = {name: {"status": "ok"} for name in STAGES}


def test_mapped_task_states_reduce_to_the_worst_instance() -> None:
    states = report.stage_states(
        {
            "build_profiles_0": "success",
            "build_profiles_1": "failed",
            "score_profiles_0": "upstream_failed",
            "train_challenger": "skipped",
            "extract_events": "success",
            "write_run_report": "running",
        }
    )

    assert states == {
        "build_profiles": "failed",
        "score_profiles": "upstream_failed",
        "train_challenger": "skipped",
        "extract_events": "success",
    }


def test_skipped_training_is_not_a_failure() -> None:
    summaries = {**DONE, "train_challenger": None, "evaluate_and_promote": None}

    doc = report.build_report(
        HOUR0, summaries, run_id="r", states={"train_challenger": "skipped", "evaluate_and_promote": "skipped"}
    )

    assert doc["status"] == "success"
    assert doc["stages"]["train_challenger"]["status"] == "skipped"


def test_a_stage_without_summary_or_state_is_incomplete() -> None:
    summaries = {**DONE, "publish_segments": None}

    doc = report.build_report(HOUR0, summaries, run_id="r", states={"publish_segments": "failed"})
    unknown = report.build_report(HOUR0, summaries, run_id="r")

    assert (doc["status"], doc["incomplete_stages"]) == ("failed", ["publish_segments"])
    assert unknown["stages"]["publish_segments"]["status"] == "not completed"


def test_html_escapes_values() -> None:
    doc = report.build_report(HOUR0, {**DONE, "publish_segments": {"status": "<b>x</b>"}}, run_id="<r>")

    page = report.render_html(doc)

    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page and "&lt;r&gt;" in page


def test_rules_over_their_declared_share_reach_the_headline() -> None:
    over = {"rule": "vip_service", "max_share": 0.05, "matched": 40, "judged": 40, "share": 1.0, "over": True}
    within = {"rule": "high_intent", "max_share": 0.1, "matched": 10, "judged": 100, "share": 0.1, "over": False}
    summaries = {**DONE, "publish_segments": {"actions": {}, "share_checks": [over, within]}}

    doc = report.build_report(HOUR0, summaries, run_id="r")

    assert doc["headline"]["over_share"] == [
        {"rule": "vip_service", "share": 1.0, "max_share": 0.05, "matched": 40, "judged": 40}
    ]
    assert "vip_service" in report.render_html(doc)


def test_the_report_lists_every_candidate_with_its_intervals_and_why_one_won(tmp_path: Path) -> None:
    # Arrange: what evaluate_and_promote returns when the trees win clearly
    metrics = {
        name: {"auc": auc, "lift_at_10": lift}
        for name, auc, lift in (
            ("network", 0.74, 2.0),
            ("lightgbm", 0.78, 2.6),
            ("baseline", 0.70, 1.7),
            ("heuristic_recency", 0.6, 1.2),
        )
    }
    intervals = {name: {"auc": [round(m["auc"] - 0.05, 2), round(m["auc"] + 0.05, 2)]} for name, m in metrics.items()}
    evaluated = {
        "status": "promoted",
        "version": "v20261101T05",
        "candidate": "lightgbm",
        "kind": "lightgbm",
        "reasons": ["all checks passed"],
        "deciding": {"check": "not worse than baseline", "metric": "lift_at_10", "interval": [0.4, 1.4]},
        "choice": {"winner": "lightgbm", "reason": "lightgbm is the best passing candidate on lift_at_10 (2.6000)"},
        "candidates": {
            "network": {"promote": True, "reasons": ["all checks passed"]},
            "lightgbm": {"promote": True, "reasons": ["all checks passed"]},
            "baseline": {"promote": False, "reasons": ["auc 0.5800 fails floor 0.6"]},
        },
        "metrics": metrics,
        "intervals": intervals,
    }
    summaries = {**DONE, "evaluate_and_promote": evaluated}

    # Act
    section = promotion.model_report(Settings(lake=tmp_path / "lake"), HOUR0, summaries)
    doc = report.build_report(HOUR0, summaries, run_id="r")
    page = report.render_html({**doc, "model": section})

    # Assert
    assert set(section["candidates"]) == {"network", "lightgbm", "baseline"}
    assert section["decision"]["candidate"] == "lightgbm" and section["decision"]["deciding"]["interval"] == [0.4, 1.4]
    assert set(section["metrics"]) == set(metrics) and set(section["intervals"]) == set(metrics)
    for name in ("network", "lightgbm", "baseline", "heuristic_recency"):
        assert f"<th>{name}</th>" in page
    assert "<b>baseline</b>: fails; auc 0.5800 fails floor 0.6" in page
    assert "promoted: <b>lightgbm</b>; lightgbm is the best passing candidate" in page
    assert "[0.73, 0.83]" in page  # lightgbm's AUC interval
