"""The standalone UI in a real browser: log in, trigger ``profile_refresh`` with Params, read the hour's report.

Headless Debian Chromium driven by Playwright (``make test-browser``). The test builds a
small demo lake (two hours processed by the in-process runner, the next hour landed by the
demo producer), starts ``airflow standalone`` the way ``make ui`` does (``demo.ui_environment``:
project DAGs and plugins, SQLite, simple auth manager) in a temporary Airflow home on a
free loopback port, and then, as a user would:

1. logs in on the login page with the generated credentials;
2. opens ``profile_refresh``, fills the trigger form (logical date H, Params ``hour`` = H and
   ``quarantine_threshold``), triggers, and switches the DAG on;
3. waits until the run succeeded (REST API) and checks the run page says so;
4. opens Browse -> Run reports (the plugin, inside the UI), the report of hour H, and its
   Data Docs link, saving screenshots under ``test-artifacts/``.

Everything started here (the standalone's process group, the browser) is stopped at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from profile_engine.config import Settings
from profile_engine.hours import HOUR, floor_hour, format_hour
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake, write_json
from profile_engine.ops import demo, runner
from profile_engine.ops.ui import URL_PREFIX

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
USERS = 300
SEED = 11
RUN_TIMEOUT = 300.0  # seconds for the triggered run (a dozen task processes on a shared 2-core machine)
PICK_TIMEOUT = 60.0  # seconds for a date-time field to show the picked value (as expect's timeout below)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _prepare_lake(settings: Settings, hour: datetime) -> None:
    """A demo lake whose hours ``hour-2`` and ``hour-1`` are processed and whose hour ``hour`` is landed."""
    first = hour - 2 * HOUR
    settings = replace(settings, start=first)  # the runner builds the first hour from an empty state
    write_json(
        Lake(settings.lake).path(demo.DEMO_MARKER),
        {
            "users": USERS,
            "seed": SEED,
            # The shop opened a month earlier, so most users already signed up.
            "start": format_hour(first - timedelta(days=30)),
            "window": [format_hour(first), format_hour(first - HOUR)],
            "business_tz": settings.business_tz,
            "intensity": demo.DEMO_INTENSITY,
        },
    )
    demo.land_demo_hours(settings, hour - HOUR)
    runner.run_hours(settings, first, hour - HOUR)
    assert demo.land_demo_hours(settings, hour)["status"] == "landed"


@contextmanager
def _standalone(settings: Settings, home: Path, log: Path) -> Generator[tuple[str, dict[str, str]], None, None]:
    """``airflow standalone`` as ``make ui`` starts it, on free loopback ports; yields its URL and environment."""
    env = demo.ui_environment(settings, port=_free_port(), airflow_home=home)
    # Log servers of the executor and triggerer: free ports too, so a `make ui` on the machine does not clash.
    env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(_free_port())
    env["AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"] = str(_free_port())
    url = env["AIRFLOW__API__BASE_URL"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["airflow", "standalone"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            demo.wait_for_ui(url, process, home, timeout=300)
            yield url, env
        finally:
            demo.stop_process_group(process, grace=90)


def _api(url: str, token: str, path: str) -> Any:
    request = urllib.request.Request(f"{url}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _token(url: str, user: str, password: str) -> str:
    body = json.dumps({"username": user, "password": password}).encode()
    request = urllib.request.Request(
        f"{url}/auth/token", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.loads(response.read())["access_token"])


def _wait_for_run(url: str, token: str, run_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = _api(url, token, f"/api/v2/dags/profile_refresh/dagRuns/{urllib.parse.quote(run_id, safe='')}")
        if run["state"] in ("success", "failed"):
            return run
        time.sleep(3)
    raise AssertionError(f"run {run_id} still {run.get('state')} after {timeout:.0f}s")


@pytest.mark.timeout(600)
def test_trigger_with_params_and_read_the_report_in_the_ui(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    from playwright.sync_api import expect, sync_playwright

    # Arrange: a small demo lake and the standalone UI over it.
    hour = floor_hour(datetime.now(UTC)) - HOUR  # the last complete hour, as a user would process
    monkeypatch.delenv("PROFILE_ENGINE_START", raising=False)  # make ui derives it from the lake
    monkeypatch.setenv("PROFILE_ENGINE_LAKE", str(tmp_path / "lake"))
    monkeypatch.setenv("PROFILE_ENGINE_BUCKETS", "2")
    monkeypatch.setenv("PROFILE_ENGINE_RETRAIN_EVERY_HOURS", str(10**6))  # no training in a two-hour lake
    settings = Settings.from_env()
    _prepare_lake(settings, hour)
    ARTIFACTS.mkdir(exist_ok=True)
    shots = ARTIFACTS / f"{request.node.name}"
    log = ARTIFACTS / "standalone.log"
    hh, dt = f"{hour:%H}", f"{hour:%Y-%m-%d}"

    with _standalone(settings, tmp_path / "airflow", log) as (url, env), sync_playwright() as playwright:
        assert env["PROFILE_ENGINE_START"] == format_hour(hour)  # continues after the lake's last snapshot
        user, password = demo.ui_login(tmp_path / "airflow")
        # Never under scripts/test-calendar.sh's libfaketime: Chromium's zygote does not start with it preloaded.
        browser_env: dict[str, str | float | bool] = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, env=browser_env
        )
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1400})
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)  # the UI loads its translations late on a busy machine

            # Act 1: log in with the generated credentials.
            page.goto(f"{url}/")
            page.get_by_label("Username").fill(user)
            page.get_by_label("Password").fill(password)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(f"{url}/")

            # Act 2: trigger profile_refresh from its form, with logical date H and Params.
            page.goto(f"{url}/dags/profile_refresh")
            page.get_by_test_id("trigger-dag-button").click()
            dialog = page.get_by_role("dialog")
            # Logical date H and data interval [H, H+1): the run the scheduler would make for H, so it moves on to H+1.
            _pick(page, 0, hour)
            dialog.get_by_text("Specify Manually").click()
            _pick(page, 1, hour)
            _pick(page, 2, hour + HOUR)
            # Switched on below, once the run exists: the scheduler would otherwise create its own run for H.
            dialog.get_by_text("Unpause profile_refresh on trigger").click()
            dialog.locator("input[name=element_hour]").fill(format_hour(hour))
            dialog.get_by_label("quarantine_threshold").fill("0.5")
            with page.expect_response(
                lambda r: r.url.endswith("/api/v2/dags/profile_refresh/dagRuns") and r.request.method == "POST"
            ) as posted:
                dialog.get_by_test_id("trigger-dag-submit").click()
            created = posted.value.json()
            run_id = created["dag_run_id"]
            page.get_by_test_id("toggle-pause").first.click()

            # Act 3: wait for the run (REST), then look at it in the UI.
            token = _token(url, user, password)
            run = _wait_for_run(url, token, run_id, RUN_TIMEOUT)
            scheduled_next = _wait_for_next_run(url, token, hour + HOUR)
            page.goto(f"{url}/dags/profile_refresh/runs/{urllib.parse.quote(run_id, safe='')}")
            expect(page.get_by_text("success").first).to_be_visible()

            # Act 4: Browse -> Run reports, the hour's report, its Data Docs.
            page.goto(f"{url}/")
            page.get_by_role("button", name="Browse").click()
            page.get_by_role("menuitem", name="Run reports").click()
            reports = page.frame_locator("iframe").first
            reports.get_by_role("link", name=f"{dt}T{hh}:00Z").click()
            heading = reports.get_by_role("heading", name=f"profile_refresh: hour {format_hour(hour)}")
            expect(heading).to_be_visible()
            page.screenshot(path=str(shots) + "-report.png", full_page=True)
            report_text = reports.locator("body").inner_text()
            reports.get_by_role("link", name="Data Docs").click()
            # Data Docs pull their styles from CDNs; offline they render unstyled, and slowly.
            expect(reports.get_by_role("tab", name="Validation Results")).to_be_visible(timeout=60_000)
            docs_title = reports.locator("title").first.text_content()
            docs_url = next(f.url for f in page.frames if "/quality/docs/" in f.url)
            page.screenshot(path=str(shots) + "-data-docs.png", full_page=True)
            # The index lists validations with JavaScript from a CDN; the validation page itself is static HTML.
            validations = Lake(settings.lake).partition(lk.QUALITY_DOCS, hour) / "validations"
            validation = next(p for p in sorted(validations.rglob("*.html")) if run_id in p.as_posix())
            relative = urllib.parse.quote(validation.relative_to(settings.lake).as_posix())
            page.goto(f"{url}{URL_PREFIX}/lake/{relative}")
            validation_text = page.locator("body").inner_text()
            anonymous = browser.new_context().request.get(f"{url}{URL_PREFIX}/")
        finally:
            browser.close()

    # Assert
    assert created["logical_date"].startswith(f"{dt}T{hh}:00") and created["run_type"] == "manual"
    assert created["data_interval_start"].startswith(f"{dt}T{hh}:00")
    assert datetime.fromisoformat(created["data_interval_end"].replace("Z", "+00:00")) == hour + HOUR
    assert created["conf"]["hour"] == format_hour(hour) and created["conf"]["quarantine_threshold"] == 0.5
    assert run["state"] == "success", f"run {run_id} failed: see {log}"
    assert "Status success" in report_text and run_id in report_text
    assert docs_title == "Data Docs created by Great Expectations"
    assert docs_url.endswith(f"/{lk.QUALITY_DOCS}/dt={dt}/hour={hh}/index.html")
    assert "Evaluated Expectations" in validation_text and "Success Percent" in validation_text
    assert anonymous.status in (401, 403)
    # The scheduler moved past H (it neither repeats H nor gets stuck on it): next is H+1, or H+2 when the
    # test crossed a full hour and the scheduler already created its run for H+1.
    assert scheduled_next is not None
    assert datetime.fromisoformat(scheduled_next.replace("Z", "+00:00")) in (hour + HOUR, hour + 2 * HOUR)
    assert Path(str(shots) + "-report.png").stat().st_size > 10_000


def _pick(page: Any, index: int, moment: datetime) -> None:
    """Set the ``index``-th date-time field of the trigger form (a popover with a date and a time input)."""
    from playwright.sync_api import expect

    field = page.get_by_test_id("datetime-input").nth(index)
    picker = page.locator("[data-scope=popover][data-part=content]:visible")
    expect(picker).to_have_count(0)  # the previous field's picker has finished closing
    field.click()
    expect(picker).to_have_count(1)
    picker.get_by_placeholder("YYYY/MM/DD").fill(f"{moment:%Y/%m/%d}")
    picker.get_by_placeholder("HH:mm").fill(f"{moment:%H:%M}")
    field.click()  # closes the picker
    expect(picker).to_have_count(0)
    # The field shows the value in Airflow's own display format ("Dec 04, 2026 12:00" today): compare the
    # moment it shows, not its spelling, so neither zero padding nor the format's next change breaks the test.
    deadline = time.monotonic() + PICK_TIMEOUT
    shown = _shown_moment(field.inner_text())
    while shown != moment.replace(tzinfo=None) and time.monotonic() < deadline:
        page.wait_for_timeout(200)
        shown = _shown_moment(field.inner_text())
    assert shown == moment.replace(tzinfo=None), f"date-time field {index} shows {field.inner_text()!r}, not {moment}"


def _shown_moment(text: str) -> datetime | None:
    """The date and time a date-time field shows (in the UI's time zone, UTC here), whatever its format."""
    from dateutil import parser

    try:
        return parser.parse(text.strip())
    except (ValueError, OverflowError):
        return None  # empty, or a placeholder while the form renders


def _wait_for_next_run(url: str, token: str, expected: datetime, timeout: float = 60.0) -> str | None:
    """The data interval start of the DAG's next scheduled run, once the scheduler moved it to ``expected`` or later.

    Later when the test crossed a full hour: the scheduler then already created its run for ``expected``.
    """
    deadline = time.monotonic() + timeout
    found: str | None = None
    while time.monotonic() < deadline:
        details = _api(url, token, "/api/v2/dags/profile_refresh")
        found = details.get("next_dagrun_data_interval_start")
        if found and datetime.fromisoformat(found.replace("Z", "+00:00")) >= expected:
            return found
        time.sleep(2)
    return found
