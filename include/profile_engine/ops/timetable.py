"""The schedule of ``profile_refresh``: hourly data intervals, and manual runs that name an hour.

Airflow's ``CronDataIntervalTimetable`` gives a manual run with logical date H the
interval ``[H-1h, H)`` (the last complete interval before H). A scheduled run for hour H
also has logical date H but the interval ``[H, H+1h)``. When the scheduler is about to
create its run for H and finds the manual one, it skips creation and computes the next
run from the manual run's interval, which gives H again: it stops scheduling later hours
for good (seen with Airflow 3.3.2 in the browser test; ``scheduler_job_runner`` logs "run
already exists; skipping dagrun creation" again and again).

``HourlyTimetable`` is the same cron schedule, except that a manual run whose logical date
is on an hour boundary gets that hour, ``[H, H+1h)``: the run the scheduler would have
created, so the schedule then goes on with H+1. A manual run at any other moment (the UI's
default logical date is "now") keeps Airflow's interval, the last complete hour.

It is registered with Airflow through the package's entry point (``airflow.plugins`` in
pyproject.toml), so every Airflow process that has the package installed can deserialize
the DAG, whatever its plugins folder.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin
from airflow.timetables.base import DataInterval

# A custom timetable must extend the core class (airflow.sdk's is a definition-only twin).
from airflow.timetables.interval import CronDataIntervalTimetable  # noqa: AIR311

HOURLY_CRON = "0 * * * *"


class HourlyTimetable(CronDataIntervalTimetable):
    """Hourly data intervals; a manual run on an hour boundary H processes ``[H, H+1h)``."""

    @property
    def summary(self) -> str:
        """What the UI shows as the schedule."""
        return f"{HOURLY_CRON} (hourly; manual runs on the hour take that hour)"

    def infer_manual_data_interval(self, *, run_after: Any) -> DataInterval:
        """``[H, H+1h)`` for a logical date H on the hour, else Airflow's last complete hour."""
        aligned = self._align_to_prev(run_after)
        if aligned == run_after:
            return DataInterval(start=run_after, end=self._get_next(run_after))
        return super().infer_manual_data_interval(run_after=run_after)


def hourly_timetable(timezone: str = "UTC") -> HourlyTimetable:
    """The timetable of ``profile_refresh`` (one place for its cron expression)."""
    return HourlyTimetable(HOURLY_CRON, timezone)


class ProfileEngineTimetablesPlugin(AirflowPlugin):
    """Registers ``HourlyTimetable`` so schedulers and API servers can deserialize the DAG."""

    name = "profile_engine_timetables"
    timetables = [HourlyTimetable]
