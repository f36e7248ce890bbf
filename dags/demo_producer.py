"""
### demo_producer

The demo's event producer (the embedded default source): every hour, land the
simulated shop's events of that arrival hour in the lake's landing area
(`landing/events/dt=/hour=`), exactly as `make demo` simulated its history, so that
`make ui` shows hourly `profile_refresh` runs on fresh data.

* Runs at minute 55 of each hour and lands that hour's files (every hour not landed yet,
  through it), so they are in landing when `profile_refresh` processes the hour at the
  next full hour. The `hour` param lands through another arrival hour instead.
* Only feeds a lake that `make demo` created (its `_meta/demo.json` names the users,
  seed and start of the shop); any other lake is left alone and the task is skipped.
* Off in production: paused on creation when `PROFILE_ENGINE_ENV=production`, and it
  refuses to write there even when switched on. Active by default in development.
* Only the present matters (`catchup=False`): one run catches up every hour not landed yet.

All logic lives in `include/profile_engine/demo.py` (`land_demo_hours`); the task only wires it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import CronTriggerTimetable, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from profile_engine.config import Settings, task_timeout  # light: reads environment variables only

# Cheap, local setting only (no Variable or Connection at parse time): a production deployment
# never starts feeding simulated events into its lake by itself.
PRODUCTION = Settings.from_env().environment == "production"


@dag(
    schedule=CronTriggerTimetable("55 * * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,  # a run lands every hour not landed yet: past runs would add nothing
    max_active_runs=1,
    is_paused_upon_creation=PRODUCTION,
    tags=["profile-engine", "demo", "producer"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "execution_timeout": task_timeout()},
    params={
        "hour": Param(
            None,
            type=["null", "string"],
            description="Land every arrival hour not landed yet through this UTC hour (ISO); empty = the hour of the run.",
        ),
    },
)
def demo_producer() -> None:
    """Land the demo shop's events hour by hour (see the module docstring)."""

    @task(multiple_outputs=False)
    def land_events() -> dict[str, Any]:
        """Land the simulated files of every arrival hour not landed yet, through the run's hour."""
        from profile_engine.config import Settings
        from profile_engine.hours import floor_hour, parse_hour
        from profile_engine.ops.demo import land_demo_hours

        context = get_current_context()
        hour = context["params"].get("hour")
        moment = context.get("logical_date") or context["dag_run"].run_after
        result = land_demo_hours(Settings.from_env(), parse_hour(hour) if hour else floor_hour(moment))
        if result["status"] == "skipped":
            raise AirflowSkipException(result["reason"])
        return result

    land_events()


demo_producer()
