"""Hour arithmetic: every hour the engine handles is a UTC interval start; partition values are derived here only.

docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

HOUR = timedelta(hours=1)
MS_HOUR = 3_600_000  # an hour in epoch milliseconds, the unit of the profile state's timestamps


def floor_hour(moment: datetime) -> datetime:
    """The UTC hour containing ``moment`` (naive datetimes are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def parse_hour(text: str) -> datetime:
    """Parse an ISO hour such as ``2026-11-01T05`` or ``2026-11-01T05:00:00+00:00``.

    Raises ``ValueError`` when the value is not on an hour boundary.
    """
    cleaned = text.strip().replace(" ", "T")
    if len(cleaned) == 13:  # 2026-11-01T05
        cleaned += ":00"
    moment = datetime.fromisoformat(cleaned.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    if moment != floor_hour(moment):
        raise ValueError(f"not an hour boundary: {text!r}")
    return moment


def format_hour(hour: datetime) -> str:
    """ISO form used in logs, XCom, manifests and the CLI: ``2026-11-01T05:00:00+00:00``."""
    return floor_hour(hour).isoformat()


def partition_values(hour: datetime) -> tuple[str, str]:
    """``(dt, hour)`` strings for Hive-style partitions: ``("2026-11-01", "05")``."""
    h = floor_hour(hour)
    return h.strftime("%Y-%m-%d"), h.strftime("%H")


def hour_range(first: datetime, last: datetime) -> Iterator[datetime]:
    """Every hour from ``first`` to ``last`` inclusive, in order."""
    current = floor_hour(first)
    end = floor_hour(last)
    while current <= end:
        yield current
        current += HOUR


def hour_for_run(param: str | None, data_interval_start: datetime | None) -> datetime:
    """The hour a DAG run processes: the ``hour`` Param when given, else its data interval start.

    Never "latest", never the current, incomplete hour.
    """
    if param:
        return parse_hour(param)
    if data_interval_start is None:
        raise ValueError("a run without a data interval needs the 'hour' param")
    return floor_hour(data_interval_start)
