"""Replay: one large event log landed as landing files by event hour, as a producer would.

docs/sources.md ("Replay").
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from profile_engine.config import Settings
from profile_engine.hours import format_hour
from profile_engine.lake import db
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake
from profile_engine.sources.mappings import LAKE_SOURCES_DIR, SOURCE_KEY, SOURCES_DIR, Mapping
from profile_engine.sources.readers import LINE_COLUMN, ROW_COLUMN, quote_ident, quote_literal, source_select


@dataclass(frozen=True)
class ReplayPlan:
    """What ``land_for_replay`` wrote: the hours to process and where the rows went."""

    source: str
    file: str
    first: datetime
    last: datetime
    rows: int
    files: int
    rows_per_hour: dict[str, int]
    outliers_before: int  # ts far before the main range: landed in the first hour
    outliers_after: int  # ts far after it: landed in the last hour
    without_ts: int  # unreadable ts or malformed line: landed in the first hour

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "source": self.source,
            "file": self.file,
            "first_hour": format_hour(self.first),
            "last_hour": format_hour(self.last),
            "hours": len(self.rows_per_hour),
            "rows": self.rows,
            "files": self.files,
            "outliers_before": self.outliers_before,
            "outliers_after": self.outliers_after,
            "without_ts": self.without_ts,
        }


# A replay's main range (``main_range``): a group of hours beyond a gap of more than a month,
# further away than the span of the rest and with fewer rows than the rest, is a stray
# (epoch 0, a year typo), not history; every other gap is processed hour by hour.
OUTLIER_GAP_HOURS = 31 * 24


def main_range(
    hour_counts: dict[datetime, int], outlier_gap_hours: int = OUTLIER_GAP_HOURS
) -> tuple[datetime, datetime]:
    """The span of a file's event hours, without stray timestamps far from the rest.

    Hours are grouped where they are at most ``outlier_gap_hours`` apart, so nights,
    closing days and holidays of a few weeks never split the file. From the group
    holding the median row, neighbouring groups are joined (the nearer first) unless a
    group is further away than both the gap limit and the span joined so far and holds
    fewer rows than the groups joined so far. A stray year neither stretches the replay
    over thousands of empty hours nor disappears: its rows go to the nearest end of the
    range and are counted as outliers.
    """
    if not hour_counts:
        raise ValueError("no event has a readable timestamp")
    limit = timedelta(hours=outlier_gap_hours)
    groups: list[list[Any]] = []  # [first hour, last hour, rows]
    for hour in sorted(hour_counts):
        if groups and hour - groups[-1][1] <= limit:
            groups[-1][1] = hour
            groups[-1][2] += hour_counts[hour]
        else:
            groups.append([hour, hour, hour_counts[hour]])
    total = sum(hour_counts.values())
    seen = 0
    low = high = len(groups) - 1
    for index, group in enumerate(groups):
        seen += group[2]
        if 2 * seen >= total:
            low = high = index
            break

    def joins(group: list[Any], gap: timedelta) -> bool:
        joined = sum(g[2] for g in groups[low : high + 1])
        return bool(group[2] >= joined or gap <= max(limit, groups[high][1] - groups[low][0]))

    while True:
        joinable: list[tuple[timedelta, int]] = []
        if low > 0 and joins(groups[low - 1], gap := groups[low][0] - groups[low - 1][1]):
            joinable.append((gap, -1))
        if high < len(groups) - 1 and joins(groups[high + 1], gap := groups[high + 1][0] - groups[high][1]):
            joinable.append((gap, 1))
        if not joinable:
            return groups[low][0], groups[high][1]
        if min(joinable)[1] < 0:  # the nearer joinable neighbour first
            low -= 1
        else:
            high += 1


def land_for_replay(settings: Settings, file: Path, mapping: Mapping) -> ReplayPlan:
    """Split ``file`` of source ``mapping`` into landing files, one per event hour.

    Each hour H of the main range gets ``landing/events/dt=/hour=H/source=<name>/<file>-<digest>.parquet``
    holding the source's own columns as text (plus the original row number and, for
    unparseable lines, the raw line), so validation applies the same mapping and
    quarantines the original values. Rows outside the main range or without a
    readable time land in the first or last hour and are validated there (quarantined
    as too_late / future_ts / bad_ts, and counted). The same file replayed again
    lands the same files under the same names.
    """
    lake = Lake(settings.lake)
    if mapping.origin is not None and mapping.origin.parent != SOURCES_DIR:
        target = lake.path(LAKE_SOURCES_DIR, f"{mapping.name}.yaml")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mapping.origin, target)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", file.name.split(".")[0])
    con = db.connect(settings)
    try:
        con.execute("SET TimeZone = 'UTC'")
        select = source_select(con, mapping, file, 0)
        con.execute(
            f"CREATE TEMP TABLE mapped AS SELECT source_row, source_line, date_trunc('hour', ts_v) AS h FROM ({select})"
        )
        counts = {
            row[0].astimezone(UTC): int(row[1])
            for row in con.execute("SELECT h, count(*) FROM mapped WHERE h IS NOT NULL GROUP BY h").fetchall()
        }
        first, last = main_range(counts)
        con.execute(
            "CREATE TEMP TABLE placed AS SELECT source_row, source_line, "
            "CASE WHEN h IS NULL OR h < $first THEN $first WHEN h > $last THEN $last ELSE h END AS landing_hour, "
            "h IS NULL AS no_ts, h < $first AS before, h > $last AS after FROM mapped",
            {"first": first, "last": last},
        )
        stats = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE before), count(*) FILTER (WHERE after), count(*) FILTER (WHERE no_ts) FROM placed"
        ).fetchall()[0]
        columns = [c for c in (list(mapping.columns) or mapping.source_columns())]
        described = {str(r[0]) for r in con.execute("DESCRIBE src_0").fetchall()}
        keep = ", ".join(f"CAST(s.{quote_ident(c)} AS VARCHAR) AS {quote_ident(c)}" for c in columns if c in described)
        per_hour: dict[str, int] = {}
        hours = [
            r[0].astimezone(UTC) for r in con.execute("SELECT DISTINCT landing_hour FROM placed ORDER BY 1").fetchall()
        ]
        for hour in hours:
            directory = lake.partition(lk.LANDING, hour) / f"{SOURCE_KEY}={mapping.name}"
            directory.mkdir(parents=True, exist_ok=True)
            target = directory / f"{stem}-{digest}.parquet"
            tmp = lake.tmp_dir() / target.name
            con.execute(
                f"""COPY (
                    SELECT {keep + ", " if keep else ""}p.source_row AS {ROW_COLUMN}, p.source_line AS {LINE_COLUMN}
                    FROM placed p LEFT JOIN src_0 s ON s.{ROW_COLUMN} = p.source_row AND p.source_line IS NULL
                    WHERE p.landing_hour = $hour ORDER BY p.source_row
                ) TO {quote_literal(str(tmp))} (FORMAT parquet, COMPRESSION zstd)""",
                {"hour": hour},
            )
            tmp.replace(target)
            shutil.rmtree(tmp.parent, ignore_errors=True)
            per_hour[format_hour(hour)] = int(
                con.execute("SELECT count(*) FROM placed WHERE landing_hour = $hour", {"hour": hour}).fetchall()[0][0]
            )
    finally:
        con.close()
    return ReplayPlan(
        source=mapping.name,
        file=str(file),
        first=first,
        last=last,
        rows=int(stats[0]),
        files=len(per_hour),
        rows_per_hour=per_hour,
        outliers_before=int(stats[1]),
        outliers_after=int(stats[2]),
        without_ts=int(stats[3]),
    )


def describe_landing(plan: ReplayPlan, lake_root: Path) -> str:
    """What ``land_for_replay`` landed, for people: hours, rows, the ends and the command that processes them."""
    first, last = format_hour(plan.first), format_hour(plan.last)
    span = int((plan.last - plan.first) / timedelta(hours=1)) + 1
    lines = [
        f"landed {plan.rows} rows of {plan.file} through mapping {plan.source} "
        f"into {Lake(lake_root).path(lk.LANDING)}/dt=.../hour=.../{SOURCE_KEY}={plan.source}/",
        f"  {len(plan.rows_per_hour)} hours with rows, first hour {first}, last hour {last} ({span} hours in all)",
    ]
    if plan.outliers_before or plan.outliers_after or plan.without_ts:
        lines.append(
            f"  {plan.outliers_before} rows dated long before the first hour and {plan.without_ts} without a readable "
            f"time landed in the first hour, {plan.outliers_after} dated long after the last hour in the last "
            "(validation quarantines them there)"
        )
    lines += [
        "next: process the landed hours (nothing was processed yet), then the hours after them as they arrive:",
        f"  python -m profile_engine run-hours {first} {last}",
        f"  or the hourly DAG with PROFILE_ENGINE_START={first}; the next hour after these is "
        f"{format_hour(plan.last + timedelta(hours=1))}",
    ]
    return "\n".join(lines)
