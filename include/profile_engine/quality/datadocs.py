"""Pruning of hourly Data Docs: a passing hour's site goes once it is older than the hours kept.

A site is about 150 KB per hour, results JSON a few KB; docs/quality.md ("Data Docs").
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from profile_engine.config import Settings
from profile_engine.hours import format_hour, partition_values
from profile_engine.lake.storage import MANIFEST, QUALITY_DOCS, QUALITY_RESULTS, Lake, partition_hours, read_json

DOCS_INDEX = "index.html"
# Written in place of a pruned site (with an index.html saying so): when, why, where the results are.
PRUNED_FILE = "pruned.json"


def keeps_docs(summary: dict[str, Any]) -> bool:
    """Whether an hour's Data Docs stay until retention: a critical expectation failed or the hour breached the threshold."""
    return not summary.get("success", False) or bool(summary.get("threshold_exceeded"))


def pruned_record(settings: Settings, hour: datetime) -> dict[str, Any] | None:
    """What ``pruned.json`` says of ``hour``'s Data Docs, or None when they were not pruned."""
    path = Lake(settings.lake).partition(QUALITY_DOCS, hour) / PRUNED_FILE
    record: dict[str, Any] | None = read_json(path) if path.is_file() else None
    return record


def prune_data_docs(settings: Settings, newest: datetime, *, dry_run: bool = False) -> list[str]:
    """Replace the Data Docs of passing hours before ``newest - settings.data_docs_keep_hours``; returns their hours.

    An hour is pruned when its site is committed and not pruned yet, and its committed
    results say it passed (``keeps_docs``); an hour without committed results keeps its
    site. The site is replaced atomically (``Lake.write_dir``) by a page saying when and
    why it was pruned plus ``pruned.json``, so links to it keep working. ``dry_run``
    lists without changing anything.
    """
    lake = Lake(settings.lake)
    before = newest - timedelta(hours=settings.data_docs_keep_hours)
    pruned: list[str] = []
    for hour, path in sorted(partition_hours(lake.path(QUALITY_DOCS)).items()):
        if hour >= before or (path / PRUNED_FILE).is_file() or not (path / MANIFEST).is_file():
            continue
        results = lake.partition(QUALITY_RESULTS, hour) / MANIFEST
        if not results.is_file() or keeps_docs(read_json(results).get("summary") or {}):
            continue
        if not dry_run:
            _replace_with_notice(settings, lake, hour)
        pruned.append(format_hour(hour))
    return pruned


def _replace_with_notice(settings: Settings, lake: Lake, hour: datetime) -> None:
    dt, hh = partition_values(hour)
    record: dict[str, Any] = {
        "hour": format_hour(hour),
        "pruned_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "keep_hours": settings.data_docs_keep_hours,
        "why": "every critical expectation passed and the quarantine threshold held; Data Docs of passing hours "
        f"are kept for {settings.data_docs_keep_hours} hours (PROFILE_ENGINE_DATA_DOCS_KEEP_HOURS)",
        "results": f"{QUALITY_RESULTS}/dt={dt}/hour={hh}/results.json",
    }
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Data Docs of {html.escape(str(record['hour']))} pruned</title></head><body>"
        f"<h1>Data Docs of hour {html.escape(str(record['hour']))} were pruned</h1>"
        f"<p>Pruned at {html.escape(str(record['pruned_at']))}: {html.escape(str(record['why']))}.</p>"
        f"<p>The validation result is kept in the lake at <code>{html.escape(str(record['results']))}</code>.</p>"
        "</body></html>"
    )
    lake.write_dir(
        lake.partition(QUALITY_DOCS, hour),
        [(DOCS_INDEX, page.encode()), (PRUNED_FILE, json.dumps(record, indent=2, sort_keys=True).encode())],
        {"layer": QUALITY_DOCS, "dt": dt, "hour": hh, "data_hour": record["hour"], "pruned": True},
    )
