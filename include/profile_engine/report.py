"""The run report of an hour: what every stage did, as JSON and as an HTML page.

Written by ``write_run_report`` even when a stage failed (the DAG task runs with
``all_done``), so every failure has its report. Stages that did not complete are
listed as such with the error when one is known.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from typing import Any

from profile_engine import lake as lk
from profile_engine.config import Settings
from profile_engine.hours import format_hour
from profile_engine.lake import Lake

STAGES: tuple[str, ...] = (
    "extract_events",
    "validate_events",
    "build_profiles",
    "publish_profiles",
    "train_challenger",
    "evaluate_and_promote",
    "score_profiles",
    "publish_segments",
)


def _status(summary: Any) -> str:
    if summary is None:
        return "not completed"
    if isinstance(summary, dict):
        return str(summary.get("status", "ok"))
    return "ok"


def build_report(hour: datetime, summaries: dict[str, Any], *, run_id: str) -> dict[str, Any]:
    """The report document: per-stage status and summary plus the headline numbers."""
    validate = summaries.get("validate_events") or {}
    publish = summaries.get("publish_profiles") or {}
    segments = summaries.get("publish_segments") or {}
    stages = {name: {"status": _status(summaries.get(name)), "summary": summaries.get(name)} for name in STAGES}
    failed = [n for n, s in stages.items() if s["status"] in ("not completed", "failed")]
    return {
        "hour": format_hour(hour),
        "run_id": run_id,
        "written_at": datetime.now(UTC).isoformat(),
        "status": "failed" if failed else "success",
        "incomplete_stages": failed,
        "headline": {
            "rows_read": validate.get("read"),
            "staged": validate.get("staged"),
            "quarantined": validate.get("quarantined"),
            "erased": validate.get("erased"),
            "quality_success": (validate.get("quality") or {}).get("success"),
            "profiles": publish.get("profiles"),
            "model": _model_line(summaries),
            "actions": segments.get("actions") or segments.get("per_action"),
        },
        "stages": stages,
    }


def _model_line(summaries: dict[str, Any]) -> str | None:
    scores = summaries.get("score_profiles")
    if isinstance(scores, list) and scores:
        first = scores[0] or {}
        return str(first.get("model_version") or first.get("model") or "") or None
    return None


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page of the report."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td class='{html.escape(s['status'].replace(' ', '-'))}'>"
        f"{html.escape(s['status'])}</td><td><pre>{html.escape(json.dumps(s['summary'], indent=1, default=str))}"
        "</pre></td></tr>"
        for name, s in report["stages"].items()
    )
    head = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(json.dumps(v, default=str))}</li>"
        for k, v in report["headline"].items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Run report {html.escape(report["hour"])}</title>
<style>body{{font-family:sans-serif;margin:2em}} td{{vertical-align:top;border-top:1px solid #ddd;padding:4px}}
pre{{margin:0;font-size:12px;max-height:20em;overflow:auto}} .ok,.success,.trained,.promoted{{color:#070}}
.not-completed,.failed{{color:#b00}} .skipped{{color:#777}}</style></head>
<body><h1>profile_refresh - hour {html.escape(report["hour"])}</h1>
<p>Status: <b>{html.escape(report["status"])}</b> - run {html.escape(report["run_id"])}</p>
<ul>{head}</ul><table><tr><th>stage</th><th>status</th><th>summary</th></tr>{rows}</table></body></html>
"""


def write_run_report(
    settings: Settings, hour: datetime, summaries: dict[str, Any], *, run_id: str = "manual"
) -> dict[str, Any]:
    """Write ``reports/dt=/hour=/`` (report.json, report.html) and return the headline."""
    lake = Lake(settings.lake)
    report = build_report(hour, summaries, run_id=run_id)
    payload = json.dumps(report, indent=2, sort_keys=True, default=str).encode()
    lake.write_dir(
        lake.partition(lk.REPORTS, hour),
        [("report.json", payload), ("report.html", render_html(report).encode())],
        {"hour": format_hour(hour), "run_id": run_id, "status": report["status"]},
    )
    return {"status": report["status"], "incomplete_stages": report["incomplete_stages"], **report["headline"]}
