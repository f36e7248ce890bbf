"""
### freshness_check

Every hour, check that `profile_refresh` still commits new profile snapshots, and
alert when it does not.

* Stale means: the current snapshot (`profiles/current` in the lake) was committed more
  than `PROFILE_ENGINE_FRESHNESS_HOURS` ago (default 3), or no snapshot exists at all.
* A stale lake sends an alert to `PROFILE_ENGINE_ALERT_WEBHOOK` (JSON POST) and/or by
  e-mail through `PROFILE_ENGINE_ALERT_SMTP` to `PROFILE_ENGINE_ALERT_EMAIL_TO`, then
  fails the task so the run shows red in the UI. A fresh lake sends nothing.
* Only the latest hour matters (`catchup=False`): checking past hours tells nothing new.

All logic lives in `include/profile_engine/alerts.py`; the task only wires it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowFailException

from profile_engine.config import task_timeout  # light: reads one environment variable


@dag(
    schedule="@hourly",
    start_date=datetime(2026, 1, 1),
    catchup=False,  # only the present state of the lake is checked
    max_active_runs=1,
    tags=["profile-engine", "operations", "alerts"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "execution_timeout": task_timeout()},
)
def freshness_check() -> None:
    """Alert when no profile snapshot was committed recently (see the module docstring)."""

    @task(multiple_outputs=False)
    def check_profile_freshness() -> dict[str, Any]:
        """Compare when `profiles/current` was committed with `PROFILE_ENGINE_FRESHNESS_HOURS`; alert and fail if stale."""
        from profile_engine.config import Settings
        from profile_engine.ops.alerts import run_freshness_check

        result = run_freshness_check(Settings.from_env())
        if not result["fresh"]:
            # Alert already sent: fail without retries (a retry would only alert again).
            raise AirflowFailException(f"profiles are stale: {result}")
        return result

    check_profile_freshness()


freshness_check()
