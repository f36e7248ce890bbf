"""The stages of one hour, in order: the DAG's task ids, the runner's steps, the run report's rows. docs/architecture.md."""

from __future__ import annotations

# Every stage of profile_refresh before its report, in the order one hour runs them.
STAGES: tuple[str, ...] = (
    "extract_events",
    "validate_events",
    "check_quality",
    "build_profiles",
    "publish_profiles",
    "train_challenger",
    "evaluate_and_promote",
    "score_profiles",
    "publish_segments",
)
# The last task of every run: writes the report whatever happened to the stages above.
REPORT_STAGE = "write_run_report"
# Stages run once per user bucket (mapped tasks in the DAG).
MAPPED_STAGES: tuple[str, ...] = ("build_profiles", "score_profiles")
# Stages that run only when retraining is due (or forced).
TRAINING_STAGES: tuple[str, ...] = ("train_challenger", "evaluate_and_promote")
