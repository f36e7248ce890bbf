"""Hour arithmetic: parsing, formatting, flooring, ranges and partition values, in UTC at the calendar's edges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from profile_engine.hours import HOUR, floor_hour, format_hour, hour_for_run, hour_range, parse_hour, partition_values


@pytest.mark.parametrize(
    "text",
    [
        "2026-12-01T05",
        "2026-12-01 05",
        " 2026-12-01T05 ",
        "2026-12-01T05:00",
        "2026-12-01T05:00:00",
        "2026-12-01T05:00:00+00:00",
        "2026-12-01T05:00Z",
        "2026-12-01T06:00+01:00",
        "2026-11-30T21:00-08:00",
    ],
)
def test_parse_hour_accepts_the_documented_forms(text: str) -> None:
    assert parse_hour(text) == datetime(2026, 12, 1, 5, tzinfo=UTC)


def test_a_date_alone_is_its_midnight() -> None:
    assert parse_hour("2026-12-01") == datetime(2026, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize("text", ["2026-12-01T05:30", "2026-12-01T05:00:01", "2026-12-01T05:30+05:00"])
def test_parse_hour_rejects_what_is_not_on_an_hour(text: str) -> None:
    with pytest.raises(ValueError, match="not an hour boundary"):
        parse_hour(text)


def test_an_offset_on_the_half_hour_can_still_be_an_hour() -> None:
    assert parse_hour("2026-12-01T10:30+05:30") == datetime(2026, 12, 1, 5, tzinfo=UTC)


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01T00", "2026-02-29T00", "2026-12-01T24"])
def test_parse_hour_rejects_what_is_not_a_time(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hour(text)


def test_format_and_parse_round_trip() -> None:
    hour = datetime(2026, 12, 31, 23, tzinfo=UTC)

    assert format_hour(hour) == "2026-12-31T23:00:00+00:00"
    assert parse_hour(format_hour(hour)) == hour


def test_floor_hour_takes_naive_as_utc_and_converts_offsets() -> None:
    assert floor_hour(datetime(2026, 12, 1, 5, 59, 59, 999999)) == datetime(2026, 12, 1, 5, tzinfo=UTC)
    berlin_winter = timezone(timedelta(hours=1))
    assert floor_hour(datetime(2027, 1, 1, 0, 30, tzinfo=berlin_winter)) == datetime(2026, 12, 31, 23, tzinfo=UTC)


@pytest.mark.parametrize(
    ("hour", "expected"),
    [
        (datetime(2026, 12, 31, 23, tzinfo=UTC), ("2026-12-31", "23")),
        (datetime(2027, 1, 1, 0, tzinfo=UTC), ("2027-01-01", "00")),
        (datetime(2028, 2, 29, 7, tzinfo=UTC), ("2028-02-29", "07")),
        (datetime(2026, 12, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))), ("2026-11-30", "23")),
    ],
)
def test_partition_values_are_utc_and_zero_padded(hour: datetime, expected: tuple[str, str]) -> None:
    assert partition_values(hour) == expected


def test_range_crosses_month_and_year_ends() -> None:
    hours = list(hour_range(datetime(2026, 12, 31, 22, tzinfo=UTC), datetime(2027, 1, 1, 1, tzinfo=UTC)))

    assert [format_hour(h)[:13] for h in hours] == ["2026-12-31T22", "2026-12-31T23", "2027-01-01T00", "2027-01-01T01"]


def test_range_over_a_leap_day_and_a_dst_change_has_every_utc_hour_once() -> None:
    # Europe's clocks went back on 2026-10-25 and US clocks on 2026-11-01: UTC has 24 hours on both days.
    for first in (
        datetime(2026, 10, 25, tzinfo=UTC),
        datetime(2026, 11, 1, tzinfo=UTC),
        datetime(2028, 2, 29, tzinfo=UTC),
    ):
        hours = list(hour_range(first, first + 23 * HOUR))
        assert len(hours) == len(set(hours)) == 24
        assert all(b - a == HOUR for a, b in zip(hours, hours[1:], strict=False))


def test_range_is_inclusive_floors_and_empty_when_reversed() -> None:
    first = datetime(2026, 12, 1, 5, 40, tzinfo=UTC)

    assert list(hour_range(first, first)) == [datetime(2026, 12, 1, 5, tzinfo=UTC)]
    assert list(hour_range(first, first - HOUR)) == []


def test_the_hour_of_a_run_is_its_param_else_its_interval_start() -> None:
    start = datetime(2026, 12, 1, 5, tzinfo=UTC)

    assert hour_for_run("2026-11-30T01", start) == datetime(2026, 11, 30, 1, tzinfo=UTC)
    assert hour_for_run(None, start + timedelta(minutes=5)) == start
    with pytest.raises(ValueError, match="hour"):
        hour_for_run(None, None)
