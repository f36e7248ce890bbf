"""
### lake_retention

Once a day, delete the lake's hour partitions older than `PROFILE_ENGINE_RETENTION_DAYS`
(default 90) in every hourly dataset: landing, ledger, staging, quarantine, quality
results and Data Docs, state, profiles, scores, interests, profile changes, segments,
exports, contact history, run reports and the outbox.

* The state checkpoint a full rebuild starts from is kept (the newest committed state
  before the cut), and staging is deleted only up to it, so `verify` and full rebuilds
  keep working.
* Training sets of models trained before the cut are deleted; the models stay (they
  keep scoring and their cards keep working) and are marked `re_evaluable: false` with
  the reason (`models/<version>/retention.json`, a note in the model card).
* It runs under the lake lock, so it never deletes while an hour is processed; a locked
  lake makes the task retry later. `python -m profile_engine retention --dry-run` lists
  what would go.
* Only today matters (`catchup=False`): one run deletes everything older than the cut.

All logic lives in `include/profile_engine/retention.py`; the task only wires it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import dag, task

from profile_engine.config import task_timeout  # light: reads one environment variable


@dag(
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,  # one run deletes everything older than the cut: missed days need no run of their own
    max_active_runs=1,
    tags=["profile-engine", "operations", "retention"],
    doc_md=__doc__,
    # Retries wait for the running hour to free the lake lock (LakeLocked); deleting is idempotent.
    default_args={"retries": 3, "retry_delay": timedelta(minutes=15), "execution_timeout": task_timeout()},
)
def lake_retention() -> None:
    """Delete hour partitions older than the retention (see the module docstring)."""

    @task(multiple_outputs=False)
    def apply_retention() -> dict[str, Any]:
        """Delete old hour partitions under the lake lock; returns what was deleted per dataset."""
        from profile_engine.config import Settings
        from profile_engine.ops.retention import run_retention

        return run_retention(Settings.from_env())

    apply_retention()


lake_retention()
