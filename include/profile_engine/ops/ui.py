"""Pages of the run reports inside the Airflow UI, read from the lake only, behind the Airflow login.

docs/operations.md, "Run reports in the Airflow UI".
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from profile_engine.config import Settings
from profile_engine.lake import storage as lk
from profile_engine.model.registry import label_version

if TYPE_CHECKING:
    from fastapi import FastAPI

URL_PREFIX = "/profile-engine"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
DATA_DOCS_INDEX = "index.html"
CARD_FILE = "model_card.md"
# Lake layers whose files the pages may serve (never staging, quarantine or exports: raw and personal data).
SERVED_LAYERS: tuple[str, ...] = (lk.REPORTS, lk.QUALITY_DOCS, lk.MODELS)
# How many hours the index lists and charts (newest first).
MAX_HOURS = 24 * 14

_DT = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_HH = re.compile(r"^\d{2}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class HourEntry:
    """One processed hour: where its report is, its headline and the whole report."""

    dt: str
    hh: str
    status: str
    headline: dict[str, Any]
    report: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def hour(self) -> str:
        """``YYYY-MM-DDTHH:00Z``, for display."""
        return f"{self.dt}T{self.hh}:00Z"


def _check_partition(dt: str, hh: str) -> None:
    if not (_DT.match(dt) and _HH.match(hh) and 0 <= int(hh) <= 23):
        raise ValueError(f"not an hour partition: dt={dt!r} hour={hh!r}")


def report_dir(settings: Settings, dt: str, hh: str) -> Path:
    """``reports/dt=/hour=/`` of an hour (``ValueError`` for anything but a date and a two-digit hour)."""
    _check_partition(dt, hh)
    return Path(settings.lake) / lk.REPORTS / f"dt={dt}" / f"hour={hh}"


def list_hours(settings: Settings, limit: int = MAX_HOURS) -> list[HourEntry]:
    """Hours with a committed run report, newest first (at most ``limit``)."""
    root = Path(settings.lake) / lk.REPORTS
    entries: list[HourEntry] = []
    pattern = re.compile(r"^dt=(\d{4}-\d{2}-\d{2})/hour=(\d{2})$")
    found = sorted(
        (
            m
            for p in root.glob(f"dt=*/hour=*/{lk.MANIFEST}")
            if (m := pattern.match(p.parent.relative_to(root).as_posix()))
        ),
        key=lambda m: (m.group(1), m.group(2)),
        reverse=True,
    )
    for match in found[:limit]:
        dt, hh = match.group(1), match.group(2)
        try:
            report = read_report(settings, dt, hh)
        except (OSError, ValueError) as error:  # one unreadable report must not hide the others
            entries.append(HourEntry(dt, hh, "unreadable", {"error": f"{type(error).__name__}: {error}"}))
            continue
        entries.append(HourEntry(dt, hh, str(report.get("status")), dict(report.get("headline") or {}), report))
    return entries


def read_report(settings: Settings, dt: str, hh: str) -> dict[str, Any]:
    """The committed ``report.json`` of an hour (``FileNotFoundError`` when there is none)."""
    directory = report_dir(settings, dt, hh)
    if not (directory / lk.MANIFEST).is_file():
        raise FileNotFoundError(f"no committed run report for dt={dt} hour={hh}")
    report: dict[str, Any] = json.loads((directory / REPORT_JSON).read_text())
    return report


def lake_file(settings: Settings, relative: str) -> Path:
    """A file under one of ``SERVED_LAYERS`` (``PermissionError`` if the path leaves them).

    Resolved before the check, so ``..`` segments and symlinks pointing elsewhere are refused.
    A directory resolves to its ``index.html``.
    """
    root = Path(settings.lake).resolve()
    target = (root / relative).resolve()
    if not any(target.is_relative_to(root / layer) for layer in SERVED_LAYERS):
        raise PermissionError(f"not served: {relative!r}")
    if target.is_dir():
        target = target / DATA_DOCS_INDEX
    if not target.is_file():
        raise FileNotFoundError(f"no such file in the lake: {relative!r}")
    return target


def model_versions(report: dict[str, Any], settings: Settings) -> list[str]:
    """Committed model versions the report names (scoring model, champion, trained challenger)."""
    model = report.get("model") or {}
    names: list[str] = []
    for key in ("scoring", "champion", "training", "decision"):
        section = model.get(key)
        if isinstance(section, dict):
            names += [str(section[k]) for k in ("model_version", "version", "challenger") if section.get(k)]
        elif isinstance(section, str):
            names.append(section)
    if report.get("headline", {}).get("model"):
        names.append(str(report["headline"]["model"]))
    models = Path(settings.lake) / lk.MODELS
    versions: list[str] = []
    for name in names:
        # A candidate other than the network scores as "<version>-<kind>" from the version's directory.
        candidate = label_version(name)
        if _VERSION.match(candidate) and (models / candidate / lk.MANIFEST).is_file() and candidate not in versions:
            versions.append(candidate)
    return versions


def segment_size_series(reports: list[dict[str, Any]]) -> dict[str, list[tuple[str, int]]]:
    """Per segment, ``(hour, size)`` in time order, from the reports' segment stability."""
    series: dict[str, list[tuple[str, int]]] = {}
    for report in sorted(reports, key=lambda r: str(r.get("hour"))):
        stability = (report.get("segments") or {}).get("stability") or {}
        for name, row in stability.items():
            if isinstance(row, dict) and row.get("size") is not None:
                series.setdefault(str(name), []).append((str(report.get("hour")), int(row["size"])))
    return series


_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def sizes_svg(series: dict[str, list[tuple[str, int]]], width: int = 720, height: int = 260) -> str:
    """An inline SVG line chart of segment sizes over hours (empty string without data)."""
    hours = sorted({h for points in series.values() for h, _ in points})
    if not hours:
        return ""
    top = max(1, max(size for points in series.values() for _, size in points))
    left, right, upper, lower = 50, 160, 10, 30
    plot_w, plot_h = width - left - right, height - upper - lower
    index = {h: i for i, h in enumerate(hours)}

    def x(hour: str) -> float:
        return left + (plot_w * index[hour] / (len(hours) - 1) if len(hours) > 1 else plot_w / 2)

    def y(size: int) -> float:
        return upper + plot_h * (1 - size / top)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="segment sizes over time" class="sizes">',
        f'<line x1="{left}" y1="{upper + plot_h}" x2="{left + plot_w}" y2="{upper + plot_h}" stroke="#999"/>',
        f'<line x1="{left}" y1="{upper}" x2="{left}" y2="{upper + plot_h}" stroke="#999"/>',
        f'<text x="{left - 5}" y="{upper + 10}" text-anchor="end" font-size="11">{top}</text>',
        f'<text x="{left - 5}" y="{upper + plot_h}" text-anchor="end" font-size="11">0</text>',
        f'<text x="{left}" y="{height - 8}" font-size="11">{html.escape(hours[0])}</text>',
        f'<text x="{left + plot_w}" y="{height - 8}" text-anchor="end" font-size="11">{html.escape(hours[-1])}</text>',
    ]
    for i, (name, points) in enumerate(sorted(series.items())):
        colour = _COLOURS[i % len(_COLOURS)]
        coords = " ".join(f"{x(h):.1f},{y(s):.1f}" for h, s in points)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}">'
            f"<title>{html.escape(name)}</title></polyline>"
        )
        parts.append(
            f'<text x="{left + plot_w + 8}" y="{upper + 14 * (i + 1)}" font-size="11" fill="{colour}">'
            f"{html.escape(name)} ({points[-1][1]})</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222} table{border-collapse:collapse;margin:.5em 0}
td,th{border-top:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
.success,.ok,.promoted,.trained{color:#070} .failed,.not-completed,.upstream_failed{color:#b00} .skipped{color:#777}
pre{font-size:12px;max-height:20em;overflow:auto;margin:0}"""


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"<td>{value:.4g}</td>"
    if isinstance(value, dict | list):
        return f"<td>{html.escape(json.dumps(value, default=str))}</td>"
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


def render_index(settings: Settings) -> str:
    """The start page: every processed hour with its headline, and segment sizes over time."""
    entries = list_hours(settings)
    if not entries:
        return _page(
            "Profile engine",
            f"<h1>Profile engine</h1><p>No run report in the lake {html.escape(str(settings.lake))} yet.</p>",
        )
    reports = [e.report for e in entries if e.report]
    keys = ("rows_read", "staged", "quarantined", "erased", "quality_success", "profiles", "model")
    rows = "".join(
        f"<tr><td><a href='hours/{e.dt}/{e.hh}/'>{html.escape(e.hour)}</a></td>"
        f"<td class='{html.escape(e.status)}'>{html.escape(e.status)}</td>"
        + "".join(_cell(e.headline.get(k)) for k in keys)
        + f"<td><a href='lake/{lk.QUALITY_DOCS}/dt={e.dt}/hour={e.hh}/{DATA_DOCS_INDEX}'>Data Docs</a></td></tr>"
        for e in entries
    )
    chart = sizes_svg(segment_size_series(reports))
    body = (
        "<h1>Profile engine: run reports</h1>"
        f"<p>Lake <code>{html.escape(str(settings.lake))}</code>, {len(entries)} processed hours (newest first).</p>"
        + (f"<h2>Segment sizes over time</h2>{chart}" if chart else "")
        + "<h2>Hours</h2><table><tr><th>hour</th><th>status</th>"
        + "".join(f"<th>{k.replace('_', ' ')}</th>" for k in keys)
        + f"<th>quality</th></tr>{rows}</table>"
    )
    return _page("Profile engine: run reports", body)


def _model_section(model: dict[str, Any]) -> str:
    if not model:
        return "<h2>Model</h2><p>No model section in this report.</p>"
    parts = ["<h2>Model</h2><table>"]
    for key in ("scoring", "champion", "training", "decision", "error"):
        if model.get(key):
            parts.append(f"<tr><th>{key}</th>{_cell(model[key])}</tr>")
    parts.append("</table>")
    metrics = model.get("metrics") or {}
    if metrics:
        from profile_engine.ops.report import metrics_table_html

        parts.append("<h3>Metrics</h3>" + metrics_table_html(metrics, model.get("intervals") or {}))
    drift = model.get("drift") or {}
    if drift.get("previous_hour"):
        score = drift.get("score") or {}
        top = drift.get("top_features") or {}
        parts.append(
            f"<h3>Drift against {html.escape(str(drift['previous_hour']))}</h3><p>score PSI {_fmt(score.get('psi'))}; "
            f"major shifts (PSI &gt; 0.25): {html.escape(', '.join(drift.get('major_shifts') or []) or 'none')}</p>"
            "<table><tr><th>feature</th><th>PSI</th></tr>"
            + "".join(f"<tr><td>{html.escape(str(f))}</td>{_cell(v)}</tr>" for f, v in top.items())
            + "</table>"
        )
    return "".join(parts)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value if value is not None else "n/a"))


def render_hour(settings: Settings, dt: str, hh: str) -> str:
    """The page of one hour (served at ``hours/<dt>/<hh>/``): its run report and links."""
    from profile_engine.segments.uplift import render_section_html

    report = read_report(settings, dt, hh)
    head = report.get("headline") or {}
    back = "../../../"
    links = [
        f"<a href='{back}lake/{lk.QUALITY_DOCS}/dt={dt}/hour={hh}/{DATA_DOCS_INDEX}'>Data Docs</a>",
        f"<a href='{back}lake/{lk.REPORTS}/dt={dt}/hour={hh}/{REPORT_HTML}'>report.html</a>",
        f"<a href='{back}lake/{lk.REPORTS}/dt={dt}/hour={hh}/{REPORT_JSON}'>report.json</a>",
    ] + [f"<a href='{back}models/{v}/'>model card {html.escape(v)}</a>" for v in model_versions(report, settings)]
    published = ((report.get("stages") or {}).get("publish_profiles") or {}).get("summary") or {}
    changes = published.get("profile_changes") or {}
    stages = "".join(
        f"<tr><td>{html.escape(name)}</td><td class='{html.escape(str(s.get('status')).replace(' ', '-'))}'>"
        f"{html.escape(str(s.get('status')))}</td><td><pre>{html.escape(json.dumps(s.get('summary'), indent=1, default=str))}"
        "</pre></td></tr>"
        for name, s in (report.get("stages") or {}).items()
    )
    segments = report.get("segments") or {}
    # The segments section links its chart by file name; here it lives in the lake's report folder.
    if segments.get("chart"):
        segments = {**segments, "chart": f"{back}lake/{lk.REPORTS}/dt={dt}/hour={hh}/{segments['chart']}"}
    status = str(report.get("status"))
    body = (
        f"<p><a href='{back}'>&larr; all hours</a></p><h1>profile_refresh: hour {html.escape(str(report.get('hour')))}</h1>"
        f"<p>Status <b class='{html.escape(status)}'>{html.escape(status)}</b>, run {html.escape(str(report.get('run_id')))}"
        f"{', incomplete: ' + html.escape(', '.join(report.get('incomplete_stages') or [])) if report.get('incomplete_stages') else ''}</p>"
        f"<p>{' | '.join(links)}</p>"
        "<h2>Events</h2><table>"
        + "".join(
            f"<tr><th>{k.replace('_', ' ')}</th>{_cell(head.get(k))}</tr>"
            for k in ("rows_read", "staged", "quarantined", "erased", "quality_success")
        )
        + "</table><h2>Profiles</h2><table>"
        + f"<tr><th>profiles</th>{_cell(head.get('profiles'))}</tr><tr><th>new users</th>{_cell(published.get('new_users'))}</tr>"
        + "".join(f"<tr><th>changed: {html.escape(str(k))}</th>{_cell(v)}</tr>" for k, v in changes.items())
        + "</table>"
        + _model_section(report.get("model") or {})
        + f"<h2>Actions this hour</h2><table>{''.join(f'<tr><th>{html.escape(str(k))}</th>{_cell(v)}</tr>' for k, v in (head.get('actions') or {}).items())}</table>"
        + (render_section_html(segments) if segments else "<h2>Segments</h2><p>No segments section.</p>")
        + f"<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>summary</th></tr>{stages}</table>"
    )
    return _page(f"Run report {report.get('hour')}", body)


def render_model_card(settings: Settings, version: str) -> str:
    """The model card of a committed version as HTML (its plots resolve next to it)."""
    from markdown_it import MarkdownIt

    if not _VERSION.match(version):
        raise ValueError(f"not a model version: {version!r}")
    card = lake_file(settings, f"{lk.MODELS}/{version}/{CARD_FILE}")
    return _page(
        f"Model card {version}", "<p><a href='../../'>&larr; all hours</a></p>" + MarkdownIt().render(card.read_text())
    )


def create_app(settings_factory: Callable[[], Settings] = Settings.from_env) -> FastAPI:
    """The FastAPI app of the pages; every route requires an authenticated Airflow user.

    ``settings_factory`` is called per request, so the pages follow ``PROFILE_ENGINE_LAKE``.
    """
    from airflow.api_fastapi.core_api.security import requires_authenticated
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import FileResponse, HTMLResponse

    app = FastAPI(
        title="Profile engine run reports",
        description="Run reports, Data Docs and model cards of the profile engine, read from the lake.",
        dependencies=[Depends(requires_authenticated())],
    )

    def _errors(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except PermissionError as error:
            raise HTTPException(status_code=403, detail=str(error)) from error
        except (FileNotFoundError, ValueError) as error:
            raise HTTPException(status_code=404, detail=str(error)) from error

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return str(_errors(lambda: render_index(settings_factory())))

    @app.get("/api/hours")
    def hours() -> list[dict[str, Any]]:
        return [
            {"dt": e.dt, "hour": e.hh, "status": e.status, "headline": e.headline}
            for e in _errors(lambda: list_hours(settings_factory()))
        ]

    @app.get("/api/hours/{dt}/{hh}")
    def report(dt: str, hh: str) -> dict[str, Any]:
        return dict(_errors(lambda: read_report(settings_factory(), dt, hh)))

    @app.get("/hours/{dt}/{hh}/", response_class=HTMLResponse)
    def hour_page(dt: str, hh: str) -> str:
        return str(_errors(lambda: render_hour(settings_factory(), dt, hh)))

    @app.get("/models/{version}/", response_class=HTMLResponse)
    def card(version: str) -> str:
        return str(_errors(lambda: render_model_card(settings_factory(), version)))

    @app.get("/models/{version}/{name}")
    def model_file(version: str, name: str) -> FileResponse:
        return FileResponse(_errors(lambda: lake_file(settings_factory(), f"{lk.MODELS}/{version}/{name}")))

    @app.get("/lake/{relative:path}")
    def served(relative: str) -> FileResponse:
        return FileResponse(_errors(lambda: lake_file(settings_factory(), relative)))

    return app
