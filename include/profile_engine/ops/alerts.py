"""Alerts: failed task runs (``ProfileEngineNotifier``) and stale profiles (``check_freshness``) to a webhook and/or e-mail.

Standard library only, so DAG files import it at parse time. docs/operations.md, "Alerts".
"""

from __future__ import annotations

import json
import logging
import smtplib
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from airflow.sdk import BaseNotifier

from profile_engine.config import Settings
from profile_engine.hours import format_hour, parse_hour

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10.0
CURRENT_POINTER = "current"


@dataclass(frozen=True)
class Alert:
    """One alert: a short title, a readable body and the fields a receiver can filter on."""

    kind: str  # "task_failed", "dag_failed" or "stale_profiles"
    title: str
    body: str
    fields: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        """The webhook's JSON: ``text`` for chat webhooks, the rest for machines."""
        return {"text": f"{self.title}\n{self.body}", **asdict(self)}


def send_alert(settings: Settings, alert: Alert) -> list[str]:
    """Deliver ``alert`` to every configured channel; returns the channels it reached.

    Each channel is tried even when another fails; if any configured channel failed,
    raises ``RuntimeError`` naming them after trying all (an alert must not vanish
    silently). With no channel configured the alert is logged as a warning.
    """
    log.warning("profile engine alert: %s - %s", alert.title, alert.body)
    sent: list[str] = []
    errors: list[str] = []
    if settings.alert_webhook:
        try:
            post_webhook(settings.alert_webhook, alert.payload())
            sent.append("webhook")
        except Exception as error:
            errors.append(f"webhook: {type(error).__name__}: {error}")
    if settings.alert_smtp:
        try:
            send_email(settings, alert)
            sent.append("smtp")
        except Exception as error:
            errors.append(f"smtp: {type(error).__name__}: {error}")
    if errors:
        raise RuntimeError("alert not delivered to " + "; ".join(errors))
    return sent


def post_webhook(url: str, payload: Mapping[str, Any]) -> int:
    """POST ``payload`` as JSON; returns the HTTP status (``HTTPError`` on 4xx/5xx)."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"alert webhook must be an http(s) URL, got {url!r}")
    request = urllib.request.Request(
        url,
        data=json.dumps(payload, default=str).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "profile-engine-alerts"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310 (scheme checked above)
        return int(response.status)


def send_email(settings: Settings, alert: Alert) -> None:
    """Send ``alert`` as a plain-text e-mail through ``settings.alert_smtp`` (``host[:port]``, default port 25)."""
    if not settings.alert_smtp or not settings.alert_email_to:
        raise ValueError("PROFILE_ENGINE_ALERT_SMTP and PROFILE_ENGINE_ALERT_EMAIL_TO must both be set")
    host, _, port = (
        settings.alert_smtp.rpartition(":") if ":" in settings.alert_smtp else (settings.alert_smtp, "", "25")
    )
    message = EmailMessage()
    message["Subject"] = f"[profile-engine] {alert.title}"
    message["From"] = settings.alert_email_from
    message["To"] = settings.alert_email_to
    details = "\n".join(f"{k}: {v}" for k, v in alert.fields.items())
    message.set_content(f"{alert.body}\n\n{details}\n")
    with smtplib.SMTP(host, int(port), timeout=TIMEOUT_SECONDS) as smtp:
        smtp.send_message(message)


@dataclass(frozen=True)
class Freshness:
    """How old the newest committed profile snapshot is."""

    fresh: bool
    checked_at: str
    limit_hours: float
    snapshot_hour: str | None
    committed_at: str | None
    age_hours: float | None


def snapshot_commit_time(settings: Settings) -> tuple[datetime, datetime] | None:
    """The hour of the current profile snapshot and when it was committed (None before the first).

    The commit time is the ``written_at`` of that hour's ``profiles`` manifest, else the
    modification time of the ``profiles/current`` pointer.
    """
    # The lake module brings pyarrow; the DAG imports this module at parse time.
    from profile_engine.lake.storage import MANIFEST, PROFILES, Lake, read_json

    lake = Lake(settings.lake)
    pointer = lake.path(PROFILES, CURRENT_POINTER)
    if not pointer.is_file():
        return None
    hour = parse_hour(str(read_json(pointer)["hour"]))
    marker: Path = lake.partition(PROFILES, hour) / MANIFEST
    written = read_json(marker).get("written_at") if marker.is_file() else None
    committed = (
        datetime.fromisoformat(str(written)) if written else datetime.fromtimestamp(pointer.stat().st_mtime, tz=UTC)
    )
    return hour, committed.astimezone(UTC)


def check_freshness(settings: Settings, now: datetime | None = None) -> Freshness:
    """Whether a snapshot was committed within ``settings.freshness_hours`` of ``now``.

    No snapshot at all counts as stale: the pipeline has never published profiles.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    found = snapshot_commit_time(settings)
    if found is None:
        return Freshness(False, now.isoformat(), settings.freshness_hours, None, None, None)
    hour, committed = found
    age = (now - committed).total_seconds() / 3600
    return Freshness(
        age <= settings.freshness_hours,
        now.isoformat(),
        settings.freshness_hours,
        format_hour(hour),
        committed.isoformat(),
        round(age, 2),
    )


def freshness_alert(result: Freshness, lake: Path) -> Alert:
    """The alert of a stale lake."""
    if result.snapshot_hour is None:
        body = f"No profile snapshot has ever been committed in {lake}."
    else:
        body = (
            f"The newest profile snapshot (hour {result.snapshot_hour}) was committed at {result.committed_at}, "
            f"{result.age_hours} h ago; the limit is {result.limit_hours} h. Check profile_refresh's runs."
        )
    return Alert("stale_profiles", "Profiles are stale", body, {"lake": str(lake), **asdict(result)})


def run_freshness_check(settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    """Check freshness and alert when stale; returns the result and the channels alerted."""
    result = check_freshness(settings, now)
    channels = [] if result.fresh else send_alert(settings, freshness_alert(result, settings.lake))
    return {**asdict(result), "alerted": channels}


def failure_alert(context: Mapping[str, Any]) -> Alert:
    """The alert of a failed task or DAG run, from an Airflow callback context."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    dag_id = getattr(dag_run, "dag_id", None) or getattr(context.get("dag"), "dag_id", None)
    task_id = getattr(ti, "task_id", None)
    map_index = getattr(ti, "map_index", -1)
    run_id = context.get("run_id") or getattr(dag_run, "run_id", None)
    params = context.get("params") or {}
    interval = context.get("data_interval_start")
    hour = params.get("hour") or (format_hour(interval) if isinstance(interval, datetime) else None)
    error = context.get("exception") or context.get("reason")
    where = f"task {task_id}" + (f"[{map_index}]" if map_index not in (None, -1) else "") if task_id else "DAG run"
    return Alert(
        "task_failed" if task_id else "dag_failed",
        f"{dag_id}: {where} failed",
        f"{where} of {dag_id} failed in run {run_id} (hour {hour}): {error}",
        {
            "dag_id": dag_id,
            "task_id": task_id,
            "map_index": map_index,
            "run_id": run_id,
            "hour": hour,
            "try_number": getattr(ti, "try_number", None),
            "error": None
            if error is None
            else f"{type(error).__name__}: {error}"
            if isinstance(error, BaseException)
            else str(error),
            "log_url": getattr(ti, "log_url", None),
        },
    )


class ProfileEngineNotifier(BaseNotifier):  # type: ignore[misc]  # airflow.sdk is untyped for mypy here
    """Airflow notifier: sends the failure of a task or DAG run as a profile-engine alert.

    Settings are read when it fires (not at DAG parse time), so the channels follow
    the environment of the worker or DAG processor that runs the callback.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__()
        self.settings = settings

    def notify(self, context: Any) -> None:
        """Build the alert from the callback context and send it."""
        send_alert(self.settings or Settings.from_env(), failure_alert(context))
