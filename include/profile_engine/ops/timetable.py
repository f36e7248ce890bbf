"""The schedule of ``profile_refresh``: hourly intervals, and a manual run on hour H gets ``[H, H+1h)``.

Airflow's cron timetable gives it ``[H-1h, H)`` and the scheduler then stops scheduling later hours.
docs/architecture.md.
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
