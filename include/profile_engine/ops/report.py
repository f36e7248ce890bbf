"""The run report of an hour (JSON and HTML): what every stage did, written even when a stage failed.

docs/operations.md, "Run reports in the Airflow UI".
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from typing import Any

from profile_engine.config import Settings
from profile_engine.contracts.stages import STAGES
from profile_engine.hours import format_hour
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake

INCOMPLETE = ("not completed", "failed", "upstream_failed")


def stage_states(task_states: dict[str, Any]) -> dict[str, str]:
    """Per stage, the Airflow state of its task; a mapped task takes the worst of its instances.

    ``task_states`` is what Airflow reports for one run: ``{task_id or task_id_<map index>: state}``.
    """
    order = ("failed", "upstream_failed", "skipped", "success")
    states: dict[str, str] = {}
    for key, state in task_states.items():
        name = next((s for s in STAGES if key == s or key.startswith(s + "_") and key[len(s) + 1 :].isdigit()), None)
        if name is None or state is None:
            continue
        current = states.get(name)
        ranked = order.index(state) if state in order else 0
        if current is None or ranked < (order.index(current) if current in order else 0):
            states[name] = str(state)
    return states


def _status(summary: Any, state: str | None = None) -> str:
    if summary is None:
        # No summary: the task state says whether it was skipped or failed.
        return state if state in ("skipped", "failed", "upstream_failed") else "not completed"
    if isinstance(summary, dict):
        return str(summary.get("status", "ok"))
    return "ok"


def build_report(
    hour: datetime, summaries: dict[str, Any], *, run_id: str, states: dict[str, str] | None = None
) -> dict[str, Any]:
    """The report document: per-stage status and summary plus the headline numbers.

    ``states`` (from ``stage_states``) tells a skipped stage from a failed one when a
    stage left no summary, as in a DAG run where training was not due.
    """
    extract = summaries.get("extract_events") or {}
    validate = summaries.get("validate_events") or {}
    publish = summaries.get("publish_profiles") or {}
    segments = summaries.get("publish_segments") or {}
    states = states or {}
    stages = {
        name: {"status": _status(summaries.get(name), states.get(name)), "summary": summaries.get(name)}
        for name in STAGES
    }
    failed = [n for n, s in stages.items() if s["status"] in INCOMPLETE]
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
            # check_quality's summary (or validate_events' own, when it ran the suite itself)
            "quality_success": (summaries.get("check_quality") or validate.get("quality") or {}).get("success"),
            "profiles": publish.get("profiles"),
            # users whose lifecycle stage, RFM segment or top interest changed (profile_changes/)
            "profile_changes": publish.get("profile_changes"),
            "model": _model_line(summaries),
            "actions": segments.get("actions") or segments.get("per_action"),
            # landing files the hour named but did not read, with their reasons (ingest.SKIP_REASONS)
            "skipped_files": [{"path": s.get("path"), "reason": s.get("reason")} for s in extract.get("skipped") or []],
            # segment rules that matched more than their declared max_share this hour (ties at a percentile)
            "over_share": [
                {k: check.get(k) for k in ("rule", "share", "max_share", "matched", "judged")}
                for check in segments.get("share_checks") or []
                if check.get("over")
            ],
        },
        "stages": stages,
    }


def _model_line(summaries: dict[str, Any]) -> str | None:
    scores = summaries.get("score_profiles")
    if isinstance(scores, list) and scores:
        first = scores[0] or {}
        return str(first.get("model_version") or first.get("model") or "") or None
    return None


def metrics_table_html(metrics: dict[str, dict[str, Any]], intervals: dict[str, dict[str, Any]]) -> str:
    """Metrics per model (columns) with their 95% intervals, as an HTML table; empty without metrics.

    Shared by the run report page and the UI plugin's hour page.
    """
    if not metrics:
        return ""
    names = list(metrics)
    keys = list(next(iter(metrics.values())))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(
        f"<tr><td>{html.escape(k)}</td>"
        + "".join(
            f"<td>{html.escape(str(metrics[n].get(k)))} {html.escape(str(intervals.get(n, {}).get(k, '')))}</td>"
            for n in names
        )
        + "</tr>"
        for k in keys
    )
    return f"<table><tr><th>metric (95% interval)</th>{head}</tr>{body}</table>"


def _candidates_html(model: dict[str, Any]) -> str:
    """Every candidate of the evaluated version with its verdict, and why the winner was chosen."""
    candidates = model.get("candidates") or {}
    if not candidates:
        return ""
    decision = model.get("decision") or {}
    choice = decision.get("choice") or {}
    items = "".join(
        f"<li><b>{html.escape(name)}</b>: {'passes' if verdict.get('promote') else 'fails'}; "
        f"{html.escape('; '.join(verdict.get('reasons') or []))}</li>"
        for name, verdict in candidates.items()
    )
    chosen = html.escape(str(decision.get("candidate") or "none"))
    why = html.escape(str(choice.get("reason") or choice.get("rule") or ""))
    return f"<p>Candidates (promoted: <b>{chosen}</b>; {why})</p><ul>{items}</ul>"


def _model_html(model: dict[str, Any] | None) -> str:
    """The model section: scoring model, gate decision with metrics, drift against the previous snapshot."""
    if not model:
        return ""
    parts = ["<h2>Model</h2><ul>"]
    for key in ("scoring", "champion", "training", "decision", "error"):
        if model.get(key):
            parts.append(f"<li><b>{key}</b>: {html.escape(json.dumps(model[key], default=str))}</li>")
    parts.append("</ul>")
    parts.append(_candidates_html(model))
    parts.append(metrics_table_html(model.get("metrics") or {}, model.get("intervals") or {}))
    drift = model.get("drift") or {}
    if drift.get("previous_hour"):
        score = drift.get("score") or {}
        parts.append(
            f"<p>Drift against {html.escape(drift['previous_hour'])}: score PSI {score.get('psi', 'n/a')}; "
            f"top features {html.escape(json.dumps(drift.get('top_features')))}; "
            f"major shifts (PSI &gt; 0.25): {html.escape(', '.join(drift.get('major_shifts') or []) or 'none')}</p>"
        )
    return "".join(parts)


def _skipped_html(report: dict[str, Any]) -> str:
    """The landing files not read, with their reasons; empty when every file was read."""
    skipped = report["headline"].get("skipped_files") or []
    if not skipped:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(str(s['path']))}</td><td>{html.escape(str(s['reason']))}</td></tr>" for s in skipped
    )
    return f"<h2>Landing files not read ({len(skipped)})</h2><table><tr><th>file</th><th>reason</th></tr>{rows}</table>"


def _segments_html(section: dict[str, Any] | None) -> str:
    """The segments section (stability, uplift, chart), rendered by ``segments``."""
    from profile_engine.segments.uplift import render_section_html

    return render_section_html(section) if section else ""


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
<ul>{head}</ul>{_skipped_html(report)}{_model_html(report.get("model"))}{_segments_html(report.get("segments"))}
<table><tr><th>stage</th><th>status</th><th>summary</th></tr>{rows}</table></body></html>
"""


def write_run_report(
    settings: Settings,
    hour: datetime,
    summaries: dict[str, Any],
    *,
    run_id: str = "manual",
    states: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``reports/dt=/hour=/`` (report.json, report.html) and return the headline."""
    lake = Lake(settings.lake)
    report = build_report(hour, summaries, run_id=run_id, states=states)
    # Model decision, metrics and drift against the previous snapshot (never raises).
    from profile_engine.model.promotion import model_report

    report["model"] = model_report(settings, hour, summaries)
    # Segment stability, uplift of actions old enough, chart of segment sizes (never raises).
    from profile_engine.segments.uplift import report_section

    report["segments"], chart = report_section(settings, hour)
    payload = json.dumps(report, indent=2, sort_keys=True, default=str).encode()
    lake.write_dir(
        lake.partition(lk.REPORTS, hour),
        [("report.json", payload), ("report.html", render_html(report).encode())]
        + ([(report["segments"]["chart"], chart)] if chart else []),
        {"hour": format_hour(hour), "run_id": run_id, "status": report["status"]},
    )
    return {"status": report["status"], "incomplete_stages": report["incomplete_stages"], **report["headline"]}
