"""The run-report pages (``profile_engine.ops.ui``) and the Airflow plugin that mounts them.

A small lake with two hourly reports, a Data Docs page and a model card is written
in each test; the app is driven with FastAPI's TestClient, anonymously and with a
real JWT issued by Airflow's simple auth manager.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from profile_engine.config import Settings
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake
from profile_engine.ops import ui

HOURS = (datetime(2026, 11, 2, 10, tzinfo=UTC), datetime(2026, 11, 2, 11, tzinfo=UTC))
VERSION = "v20261102T10"


def _report(hour: datetime, size: int) -> dict[str, Any]:
    return {
        "hour": hour.isoformat(),
        "run_id": f"scheduled__{hour.isoformat()}",
        "status": "success",
        "incomplete_stages": [],
        "headline": {
            "rows_read": 100,
            "staged": 97,
            "quarantined": 3,
            "erased": 0,
            "quality_success": True,
            "profiles": 40 + size,
            "model": f"{VERSION}-baseline",
            "actions": {"welcome": 2, "none": 30},
        },
        "model": {
            "scoring": {"model": "baseline", "model_version": f"{VERSION}-baseline", "reason": "no champion yet"},
            "decision": {"promoted": False, "reason": "AUC gain 0.004 below 0.01"},
            "metrics": {"challenger": {"auc": 0.71}, "champion": {"auc": 0.706}},
            "intervals": {"challenger": {"auc": [0.69, 0.73]}},
            "drift": {"previous_hour": "2026-11-02T09:00:00+00:00", "score": {"psi": 0.0123}, "top_features": {}},
        },
        "segments": {
            "stability": {
                "high_intent": {"size": size, "entered": 2, "exited": 1, "stayed": size - 2, "overlap": 0.9},
                "welcome": {"size": 5, "entered": 5, "exited": 0, "stayed": 0, "overlap": None},
            },
            "uplift": {"window_hours": 24, "rules": []},
            "chart": None,
        },
        "stages": {
            "publish_profiles": {
                "status": "ok",
                "summary": {"profiles": 40 + size, "new_users": 4, "profile_changes": {"users": 9, "rfm_segment": 3}},
            }
        },
    }


@pytest.fixture
def lake_settings(settings: Settings) -> Settings:
    """Two reports (high_intent of sizes 11 and 17), a Data Docs page of the first hour and a model card."""
    lake = Lake(settings.lake)
    for hour, size in zip(HOURS, (11, 17), strict=True):
        payload = json.dumps(_report(hour, size)).encode()
        lake.write_dir(lake.partition(lk.REPORTS, hour), [("report.json", payload), ("report.html", b"<p>x</p>")], {})
    docs = lake.partition(lk.QUALITY_DOCS, HOURS[0])
    docs.mkdir(parents=True)
    (docs / "index.html").write_text("<html>expectation suite events_hourly</html>")
    lake.write_dir(
        lake.path(lk.MODELS, VERSION),
        [
            ("model_card.md", b"# Model card: v20261102T10\n\nAUC 0.71\n\n![ROC curve](roc.png)"),
            ("roc.png", b"\x89PNG"),
        ],
        {},
    )
    (settings.lake / lk.STAGING).mkdir(parents=True)
    (settings.lake / lk.STAGING / "secret.csv").write_text("user_id\nu1\n")
    (settings.lake.parent / "outside.txt").write_text("not for the UI")
    return settings


@pytest.fixture(scope="module")
def token(airflow_db: Path) -> str:
    """A real JWT of the simple auth manager's admin, as the UI's login would set it (checked against the database)."""
    from airflow.api_fastapi.app import init_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    manager = init_auth_manager()
    return str(manager.generate_jwt(SimpleAuthManagerUser(username="admin", role="admin")))


def _client(settings: Settings, token: str | None) -> TestClient:
    client = TestClient(ui.create_app(lambda: settings))
    if token:
        client.cookies.set("_token", token)
    return client


@pytest.mark.parametrize(
    "path", ["/", "/api/hours", "/hours/2026-11-02/10/", "/lake/reports/dt=2026-11-02/hour=10/report.json"]
)
def test_anonymous_request_is_refused(lake_settings: Settings, path: str) -> None:
    # Arrange
    client = _client(lake_settings, None)

    # Act
    response = client.get(path)

    # Assert
    assert response.status_code in (401, 403)
    assert "high_intent" not in response.text


def test_forged_token_is_refused(lake_settings: Settings, token: str) -> None:
    # Arrange
    assert token  # the auth manager is initialised: the forged token is checked, not just absent
    client = _client(lake_settings, "eyJhbGciOiJIUzUxMiJ9.eyJzdWIiOiJhZG1pbiJ9.forged")

    # Act
    response = client.get("/")

    # Assert
    assert response.status_code in (401, 403)


def test_logged_in_user_sees_hours_newest_first(lake_settings: Settings, token: str) -> None:
    # Arrange
    client = _client(lake_settings, token)

    # Act
    page = client.get("/")
    listed = client.get("/api/hours").json()

    # Assert
    assert page.status_code == 200
    assert "hours/2026-11-02/11/" in page.text and "hours/2026-11-02/10/" in page.text
    assert "<svg" in page.text and "high_intent (17)" in page.text
    assert [(h["dt"], h["hour"]) for h in listed] == [("2026-11-02", "11"), ("2026-11-02", "10")]
    assert listed[0]["headline"]["quarantined"] == 3


def test_hour_page_shows_report_and_links(lake_settings: Settings, token: str) -> None:
    # Arrange
    client = _client(lake_settings, token)

    # Act
    page = client.get("/hours/2026-11-02/10/")

    # Assert
    assert page.status_code == 200
    text = page.text
    for expected in ("quarantined", "97", "AUC gain 0.004 below 0.01", "0.0123", "high_intent", "rfm_segment"):
        assert expected in text
    assert "../../../lake/quality/docs/dt=2026-11-02/hour=10/index.html" in text
    assert f"../../../models/{VERSION}/" in text


def test_links_of_the_hour_page_resolve(lake_settings: Settings, token: str) -> None:
    # Arrange
    client = _client(lake_settings, token)

    # Act
    docs = client.get("/lake/quality/docs/dt=2026-11-02/hour=10/index.html")
    card = client.get(f"/models/{VERSION}/")
    raw = client.get("/lake/reports/dt=2026-11-02/hour=10/report.json")

    # Assert
    assert docs.status_code == 200 and "events_hourly" in docs.text
    assert card.status_code == 200 and "<h1>Model card: v20261102T10</h1>" in card.text
    assert 'src="roc.png"' in card.text and client.get(f"/models/{VERSION}/roc.png").content == b"\x89PNG"
    assert raw.json()["headline"]["staged"] == 97


@pytest.mark.parametrize(
    "path",
    [
        "/lake/..%2Foutside.txt",
        "/lake/reports/..%2F..%2Foutside.txt",
        "/lake/staging/events/secret.csv",
        "/lake/%2Fetc%2Fpasswd",
        f"/models/{VERSION}/..%2F..%2F..%2Foutside.txt",
    ],
)
def test_paths_outside_the_served_layers_are_refused(lake_settings: Settings, token: str, path: str) -> None:
    # Arrange
    client = _client(lake_settings, token)

    # Act
    response = client.get(path)

    # Assert
    assert response.status_code in (403, 404)
    assert "not for the UI" not in response.text and "u1" not in response.text


def test_symlink_out_of_the_lake_is_refused(lake_settings: Settings) -> None:
    # Arrange
    link = lake_settings.lake / lk.REPORTS / "escape.txt"
    link.symlink_to(lake_settings.lake.parent / "outside.txt")

    # Act / Assert
    with pytest.raises(PermissionError):
        ui.lake_file(lake_settings, "reports/escape.txt")
    with pytest.raises(PermissionError):
        ui.lake_file(lake_settings, "reports/../../outside.txt")


@pytest.mark.parametrize(("dt", "hh"), [("2026-11-02", "24"), ("..", "10"), ("2026-11-02", "1")])
def test_bad_hour_partitions_are_rejected(lake_settings: Settings, dt: str, hh: str) -> None:
    # Act / Assert
    with pytest.raises(ValueError):
        ui.read_report(lake_settings, dt, hh)


def test_unknown_hour_is_not_found(lake_settings: Settings, token: str) -> None:
    # Arrange
    client = _client(lake_settings, token)

    # Act
    response = client.get("/hours/2026-11-03/10/")

    # Assert
    assert response.status_code == 404


def test_empty_lake_says_so(settings: Settings, token: str) -> None:
    # Arrange
    client = _client(settings, token)

    # Act
    page = client.get("/")

    # Assert
    assert page.status_code == 200 and "No run report" in page.text


@hsettings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=30))
def test_series_keeps_every_size_in_time_order(sizes: list[int]) -> None:
    # Arrange
    reports = [
        {"hour": f"2026-11-02T{h:02d}:00:00+00:00", "segments": {"stability": {"vip": {"size": s}}}}
        for h, s in enumerate(sizes)
    ][::-1]

    # Act
    series = ui.segment_size_series(reports)
    svg = ui.sizes_svg(series)

    # Assert
    assert [s for _, s in series["vip"]] == sizes
    assert svg.count("<polyline") == 1 and f"vip ({sizes[-1]})" in svg


def test_plugin_registers_app_and_navigation_link() -> None:
    # Arrange
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "plugins" / "profile_engine_plugin.py"
    spec = importlib.util.spec_from_file_location("profile_engine_plugin", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)

    # Act
    spec.loader.exec_module(module)
    plugin = module.ProfileEnginePlugin

    # Assert
    assert plugin.fastapi_apps[0]["url_prefix"] == ui.URL_PREFIX
    assert not any(ui.URL_PREFIX.startswith(p) for p in ("/api/v2", "/ui", "/execution", "/auth", "/pluginsv2"))
    view = plugin.external_views[0]
    assert view["href"] == ui.URL_PREFIX + "/" and view["destination"] == "nav"
    assert TestClient(plugin.fastapi_apps[0]["app"]).get("/").status_code == 401


def test_airflow_api_server_mounts_the_pages_behind_its_login(
    lake_settings: Settings, monkeypatch: pytest.MonkeyPatch, airflow_db: Path
) -> None:
    # Arrange: Airflow's own API server app, loading plugins/ (conftest points the plugins folder there)
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    monkeypatch.setenv("PROFILE_ENGINE_LAKE", str(lake_settings.lake))
    client = TestClient(create_app())
    anonymous = client.get(ui.URL_PREFIX + "/")
    token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
    client.cookies.set("_token", token)

    # Act
    page = client.get(ui.URL_PREFIX + "/")
    plugins = client.get("/api/v2/plugins").json()["plugins"]

    # Assert
    assert anonymous.status_code == 401
    assert page.status_code == 200 and "hours/2026-11-02/11/" in page.text
    [ours] = [p for p in plugins if p["name"] == "profile_engine"]
    assert ours["external_views"][0]["href"] == ui.URL_PREFIX + "/"
    assert ours["fastapi_apps"][0]["url_prefix"] == ui.URL_PREFIX


def test_unreadable_report_does_not_hide_the_others(lake_settings: Settings, token: str) -> None:
    # Arrange
    broken = Lake(lake_settings.lake).partition(lk.REPORTS, HOURS[1]) / "report.json"
    broken.write_text("{not json")
    client = _client(lake_settings, token)

    # Act
    page = client.get("/")
    listed = client.get("/api/hours").json()

    # Assert
    assert page.status_code == 200 and "unreadable" in page.text
    assert [h["status"] for h in listed] == ["unreadable", "success"]


@pytest.mark.parametrize("kind", ["baseline", "lightgbm", "ensemble", "sequence", "combined"])
def test_a_report_naming_any_candidates_label_links_its_version(lake_settings: Settings, kind: str) -> None:
    # Arrange: the hour was scored by the version's <kind> candidate ("<version>-<kind>", as scores record it)
    report = _report(HOURS[0], 11)
    report["headline"]["model"] = f"{VERSION}-{kind}"
    report["model"]["scoring"]["model_version"] = f"{VERSION}-{kind}"

    # Act
    versions = ui.model_versions(report, lake_settings)

    # Assert: the model card of the version is linked, whatever candidate scored
    assert versions == [VERSION]


def test_a_label_of_an_unknown_kind_links_nothing(lake_settings: Settings) -> None:
    report = _report(HOURS[0], 11)
    report["headline"]["model"] = f"{VERSION}-forest"
    report["model"]["scoring"]["model_version"] = f"{VERSION}-forest"

    assert ui.model_versions(report, lake_settings) == []
