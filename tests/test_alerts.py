"""Alerts (``profile_engine.ops.alerts``) against real receivers on loopback.

A webhook receiver (``http.server`` in a thread) and a minimal SMTP sink (a socket
server speaking just enough SMTP) listen on 127.0.0.1 on free ports; every test
stops them.
"""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from profile_engine.config import Settings
from profile_engine.hours import format_hour
from profile_engine.lake.storage import MANIFEST, PROFILES, Lake, write_json
from profile_engine.ops import alerts

NOW = datetime(2026, 11, 2, 15, 30, tzinfo=UTC)


class _Webhook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []
    status = 200

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append({"content_type": self.headers["Content-Type"], "json": json.loads(body)})
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return


class _SmtpSink(socketserver.StreamRequestHandler):
    """Just enough SMTP for ``smtplib``: EHLO/HELO, MAIL, RCPT, DATA, QUIT."""

    messages: list[dict[str, Any]] = []

    def handle(self) -> None:
        self.wfile.write(b"220 sink ready\r\n")
        envelope: dict[str, Any] = {"rcpt": []}
        while line := self.rfile.readline():
            command = line.decode().strip()
            verb = command.split(" ")[0].upper()
            if verb in ("EHLO", "HELO"):
                self.wfile.write(b"250 sink\r\n")
            elif verb == "MAIL":
                envelope["from"] = command
                self.wfile.write(b"250 ok\r\n")
            elif verb == "RCPT":
                envelope["rcpt"].append(command)
                self.wfile.write(b"250 ok\r\n")
            elif verb == "DATA":
                self.wfile.write(b"354 go on\r\n")
                data = b""
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    data += chunk
                type(self).messages.append({**envelope, "message": message_from_bytes(data)})
                self.wfile.write(b"250 queued\r\n")
            elif verb == "QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


def _serve(server: socketserver.BaseServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        address = server.server_address
        assert isinstance(address, tuple)  # an AF_INET (host, port) here
        yield int(address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def webhook() -> Iterator[str]:
    """URL of a webhook receiver on loopback; what it received is ``_Webhook.received``."""
    _Webhook.received = []
    _Webhook.status = 200
    for port in _serve(HTTPServer(("127.0.0.1", 0), _Webhook)):
        yield f"http://127.0.0.1:{port}/hooks/alerts"


@pytest.fixture
def smtp() -> Iterator[str]:
    """``host:port`` of the SMTP sink on loopback; what it received is ``_SmtpSink.messages``."""
    _SmtpSink.messages = []
    for port in _serve(socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SmtpSink)):
        yield f"127.0.0.1:{port}"


def _commit_snapshot(settings: Settings, hour: datetime, written_at: datetime) -> None:
    lake = Lake(settings.lake)
    write_json(
        lake.partition(PROFILES, hour) / MANIFEST,
        {"data_hour": format_hour(hour), "written_at": written_at.isoformat()},
    )
    write_json(lake.path(PROFILES, "current"), {"hour": format_hour(hour), "run_id": "t", "profiles": 3})


def _context(error: BaseException) -> dict[str, Any]:
    ti = SimpleNamespace(task_id="score_profiles", map_index=1, try_number=3, log_url="http://airflow/log")
    dag_run = SimpleNamespace(dag_id="profile_refresh", run_id="scheduled__2026-11-02T14:00:00+00:00")
    return {
        "ti": ti,
        "dag_run": dag_run,
        "run_id": dag_run.run_id,
        "params": {"hour": None},
        "data_interval_start": datetime(2026, 11, 2, 14, tzinfo=UTC),
        "exception": error,
    }


def test_fresh_snapshot_sends_nothing(settings: Settings, webhook: str) -> None:
    # Arrange
    settings = replace(settings, alert_webhook=webhook, freshness_hours=2)
    _commit_snapshot(settings, datetime(2026, 11, 2, 14, tzinfo=UTC), NOW - timedelta(hours=1))

    # Act
    result = alerts.run_freshness_check(settings, NOW)

    # Assert
    assert result["fresh"] is True and result["age_hours"] == 1.0 and result["alerted"] == []
    assert _Webhook.received == []


def test_stale_snapshot_alerts_webhook_and_email(settings: Settings, webhook: str, smtp: str) -> None:
    # Arrange
    settings = replace(
        settings, alert_webhook=webhook, alert_smtp=smtp, alert_email_to="ops@example.com", freshness_hours=2
    )
    _commit_snapshot(settings, datetime(2026, 11, 2, 11, tzinfo=UTC), NOW - timedelta(hours=3.5))

    # Act
    result = alerts.run_freshness_check(settings, NOW)

    # Assert
    assert result["fresh"] is False and result["alerted"] == ["webhook", "smtp"]
    [posted] = _Webhook.received
    assert posted["content_type"] == "application/json"
    assert posted["json"]["kind"] == "stale_profiles" and "3.5 h ago" in posted["json"]["text"]
    assert posted["json"]["fields"]["snapshot_hour"] == "2026-11-02T11:00:00+00:00"
    [mail] = _SmtpSink.messages
    assert "ops@example.com" in mail["rcpt"][0]
    assert mail["message"]["Subject"] == "[profile-engine] Profiles are stale"
    assert "limit is 2" in mail["message"].get_payload()


def test_no_snapshot_at_all_is_stale(settings: Settings, webhook: str) -> None:
    # Arrange
    settings = replace(settings, alert_webhook=webhook)

    # Act
    result = alerts.run_freshness_check(settings, NOW)

    # Assert
    assert result["fresh"] is False and result["snapshot_hour"] is None
    assert "ever been committed" in _Webhook.received[0]["json"]["body"]


def test_newer_commit_of_an_older_hour_does_not_hide_staleness(settings: Settings) -> None:
    # Arrange: the pointer names hour 11, committed 5 h ago; a rebuild of hour 9 is newer but not current
    settings = replace(settings, freshness_hours=2)
    _commit_snapshot(settings, datetime(2026, 11, 2, 11, tzinfo=UTC), NOW - timedelta(hours=5))
    write_json(
        Lake(settings.lake).partition(PROFILES, datetime(2026, 11, 2, 9, tzinfo=UTC)) / MANIFEST,
        {"written_at": NOW.isoformat()},
    )

    # Act
    result = alerts.check_freshness(settings, NOW)

    # Assert
    assert result.fresh is False and result.age_hours == 5.0


@hsettings(max_examples=40, deadline=None)
@given(age=st.floats(min_value=0, max_value=100), limit=st.floats(min_value=0.1, max_value=48))
def test_fresh_exactly_when_age_within_limit(
    tmp_path_factory: pytest.TempPathFactory, age: float, limit: float
) -> None:
    # Arrange
    settings = Settings(lake=tmp_path_factory.mktemp("lake"), freshness_hours=limit)
    _commit_snapshot(settings, datetime(2026, 11, 2, 10, tzinfo=UTC), NOW - timedelta(hours=age))

    # Act
    result = alerts.check_freshness(settings, NOW)

    # Assert
    assert result.fresh == ((NOW - (NOW - timedelta(hours=age))).total_seconds() / 3600 <= limit)


def test_notifier_sends_the_failed_task(settings: Settings, webhook: str, smtp: str) -> None:
    # Arrange
    settings = replace(settings, alert_webhook=webhook, alert_smtp=smtp, alert_email_to="a@x.org,b@x.org")
    notifier = alerts.ProfileEngineNotifier(settings)

    # Act
    notifier(_context(ValueError("bucket 1 has no staged events")))

    # Assert
    fields = _Webhook.received[0]["json"]["fields"]
    assert fields["dag_id"] == "profile_refresh" and fields["task_id"] == "score_profiles"
    assert fields["map_index"] == 1 and fields["hour"] == "2026-11-02T14:00:00+00:00"
    assert fields["error"] == "ValueError: bucket 1 has no staged events"
    assert _Webhook.received[0]["json"]["title"] == "profile_refresh: task score_profiles[1] failed"
    assert len(_SmtpSink.messages[0]["rcpt"]) == 2


def test_dag_failure_without_task(settings: Settings) -> None:
    # Arrange
    context = {"dag_run": SimpleNamespace(dag_id="profile_refresh", run_id="r1"), "reason": "task_failure"}

    # Act
    alert = alerts.failure_alert(context)

    # Assert
    assert alert.kind == "dag_failed" and alert.title == "profile_refresh: DAG run failed"
    assert "task_failure" in alert.body


def test_receiver_error_is_raised_after_trying_every_channel(settings: Settings, webhook: str, smtp: str) -> None:
    # Arrange
    _Webhook.status = 500
    settings = replace(settings, alert_webhook=webhook, alert_smtp=smtp, alert_email_to="ops@example.com")

    # Act
    with pytest.raises(RuntimeError, match="webhook: HTTPError"):
        alerts.send_alert(settings, alerts.Alert("stale_profiles", "t", "b"))

    # Assert: the e-mail still went out
    assert len(_SmtpSink.messages) == 1


def test_unreachable_smtp_is_an_error(settings: Settings) -> None:
    # Arrange: a port nobody listens on (bound then closed)
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = replace(settings, alert_smtp=f"127.0.0.1:{port}", alert_email_to="ops@example.com")

    # Act / Assert
    with pytest.raises(RuntimeError, match="smtp"):
        alerts.send_alert(settings, alerts.Alert("stale_profiles", "t", "b"))


def test_settings_read_alert_configuration() -> None:
    # Arrange
    env = {
        "PROFILE_ENGINE_FRESHNESS_HOURS": "6",
        "PROFILE_ENGINE_ALERT_WEBHOOK": "http://127.0.0.1:9/x",
        "PROFILE_ENGINE_ALERT_SMTP": "mail.local:2525",
        "PROFILE_ENGINE_ALERT_EMAIL_TO": "ops@example.com",
    }

    # Act
    settings = Settings.from_env(env)

    # Assert
    assert settings.freshness_hours == 6.0 and settings.alert_smtp == "mail.local:2525"
    with pytest.raises(ValueError, match="ALERT_EMAIL_TO"):
        Settings.from_env({"PROFILE_ENGINE_ALERT_SMTP": "mail.local"})
    with pytest.raises(ValueError, match="FRESHNESS_HOURS"):
        Settings.from_env({"PROFILE_ENGINE_FRESHNESS_HOURS": "0"})


def test_webhook_must_be_http() -> None:
    # Act / Assert
    with pytest.raises(ValueError, match="http"):
        alerts.post_webhook("file:///etc/passwd", {"text": "x"})


PROBE_DAG = """
from datetime import UTC, datetime
from airflow.sdk import DAG, task
from profile_engine.ops.alerts import ProfileEngineNotifier
with DAG("alerts_probe", schedule=None, catchup=False,
         default_args={"retries": 0, "on_failure_callback": [ProfileEngineNotifier()]}) as dag:
    @task
    def explode() -> None:
        raise RuntimeError("lake unreachable")
    explode()
if __name__ == "__main__":
    dag.test(logical_date=datetime(2026, 11, 2, 14, tzinfo=UTC))
"""


def test_failed_task_of_a_real_dag_run_alerts(settings: Settings, webhook: str, tmp_path: Path) -> None:
    # Arrange: a one-task DAG wired like profile_refresh (notifier in default_args), in its own
    # Airflow home (dag.test needs the DAG in the configured DAG folder), run in a subprocess
    import os
    import sqlite3
    import subprocess
    import sys

    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "alerts_probe.py").write_text(PROBE_DAG)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PROFILE_ENGINE_LAKE": str(settings.lake),
        "PROFILE_ENGINE_ALERT_WEBHOOK": webhook,
    }
    # A copy of the test session's migrated metadata database saves the migration (~10 s).
    database = tmp_path / "airflow.db"
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{database}"
    session_db = Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"
    if session_db.is_file():
        with sqlite3.connect(session_db) as source, sqlite3.connect(database) as copy:
            source.backup(copy)
    else:
        airflow = str(Path(sys.executable).with_name("airflow"))
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=120)

    # Act
    run = subprocess.run(
        [sys.executable, str(dags / "alerts_probe.py")], env=env, capture_output=True, text=True, timeout=120
    )

    # Assert
    assert "lake unreachable" in run.stdout + run.stderr
    [posted] = _Webhook.received
    assert posted["json"]["fields"]["dag_id"] == "alerts_probe"
    assert posted["json"]["fields"]["task_id"] == "explode"
    assert "RuntimeError: lake unreachable" in posted["json"]["fields"]["error"]


def test_dags_wire_alerts_and_document_tasks() -> None:
    # Arrange
    from airflow.dag_processing.dagbag import DagBag

    dags = Path(__file__).resolve().parents[1] / "dags"

    # Act
    bag = DagBag(dag_folder=str(dags))

    # Assert
    refresh = bag.dags["profile_refresh"]
    for task in refresh.tasks:
        assert task.doc_md and task.doc_md.strip(), f"{task.task_id} has no doc_md"
        callbacks = task.on_failure_callback
        assert isinstance(callbacks, list) and any(isinstance(c, alerts.ProfileEngineNotifier) for c in callbacks)
    for name, param in refresh.params.items():
        assert param.description, f"param {name} has no description"
        assert "type" in param.schema, f"param {name} is not typed"
    fresh = bag.dags["freshness_check"]
    assert fresh.catchup is False and fresh.task_ids == ["check_profile_freshness"]
    assert fresh.get_task("check_profile_freshness").doc_md


def test_cli_freshness_exit_code(settings: Settings, webhook: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange
    from profile_engine.cli import main

    monkeypatch.setenv("PROFILE_ENGINE_LAKE", str(settings.lake))
    monkeypatch.setenv("PROFILE_ENGINE_ALERT_WEBHOOK", webhook)
    now = datetime.now(UTC)

    # Act
    stale = main(["freshness"])
    _commit_snapshot(settings, datetime(2026, 11, 2, 10, tzinfo=UTC), now)
    fresh = main(["freshness"])

    # Assert
    assert (stale, fresh) == (1, 0)
    assert len(_Webhook.received) == 1
