"""The schedule of profile_refresh: manual runs on an hour take that hour, so the schedule goes on."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profile_engine.ops.timetable import HourlyTimetable, ProfileEngineTimetablesPlugin, hourly_timetable

H = pendulum.datetime(2026, 11, 28, 5, tz="UTC")


def test_a_manual_run_on_the_hour_takes_that_hour() -> None:
    interval = hourly_timetable().infer_manual_data_interval(run_after=H)

    assert (interval.start, interval.end) == (H, H + timedelta(hours=1))


def test_a_manual_run_between_hours_takes_the_last_complete_hour() -> None:
    interval = hourly_timetable().infer_manual_data_interval(run_after=H.add(minutes=23, seconds=4))

    assert (interval.start, interval.end) == (H - timedelta(hours=1), H)


def test_after_a_manual_run_for_h_the_scheduler_goes_on_with_the_next_hour() -> None:
    # What the scheduler does when it finds a run for its next hour: it computes the next
    # run from that run's interval (scheduler_job_runner: calculate_dagrun_date_fields).
    from airflow.timetables.base import TimeRestriction

    timetable = hourly_timetable()
    manual = timetable.infer_manual_data_interval(run_after=H)

    info = timetable.next_dagrun_info(
        last_automated_data_interval=manual,
        restriction=TimeRestriction(earliest=H - timedelta(days=1), latest=None, catchup=True),
    )

    assert info is not None
    assert info.logical_date == H + timedelta(hours=1)


@settings(max_examples=50, deadline=None)
@given(minutes=st.integers(min_value=0, max_value=60 * 24 * 14))
def test_scheduled_intervals_are_whole_hours_like_airflows_cron_timetable(minutes: int) -> None:
    from airflow.timetables.base import TimeRestriction
    from airflow.timetables.interval import CronDataIntervalTimetable  # noqa: AIR311

    earliest = H + timedelta(minutes=minutes)
    restriction = TimeRestriction(earliest=earliest, latest=None, catchup=True)
    ours = hourly_timetable().next_dagrun_info(last_automated_data_interval=None, restriction=restriction)
    airflows = CronDataIntervalTimetable("0 * * * *", "UTC").next_dagrun_info(
        last_automated_data_interval=None, restriction=restriction
    )

    assert ours is not None and airflows is not None
    assert ours.data_interval == airflows.data_interval
    assert ours.data_interval is not None
    assert ours.data_interval.end - ours.data_interval.start == timedelta(hours=1)


def test_the_timetable_is_registered_and_the_dag_survives_serialization() -> None:
    from airflow import plugins_manager
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    registered = plugins_manager.get_timetables_plugins()
    dag_file = Path(__file__).resolve().parents[1] / "dags" / "profile_refresh.py"
    dag = DagBag(dag_folder=str(dag_file)).dags["profile_refresh"]

    restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))

    assert "profile_engine.ops.timetable.HourlyTimetable" in registered
    assert ProfileEngineTimetablesPlugin.timetables == [HourlyTimetable]
    assert isinstance(restored.timetable, HourlyTimetable)
    interval = restored.timetable.infer_manual_data_interval(run_after=H)
    assert interval.start == H


@pytest.mark.parametrize("timezone", ["UTC", "Europe/Berlin"])
def test_the_timetable_keeps_its_time_zone(timezone: str) -> None:
    timetable = hourly_timetable(timezone)

    assert str(timetable._timezone.name) == timezone
