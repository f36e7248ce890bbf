"""Tests for profile_engine.segments.delivery and the asset-triggered DAG deliver_campaigns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from profile_engine.config import Settings
from profile_engine.hours import HOUR, format_hour, parse_hour
from profile_engine.lake import storage as lk
from profile_engine.privacy.keys import export_key, pseudonymize
from profile_engine.segments import delivery
from profile_engine.segments.publish import publish_segments

sys.path.insert(0, str(Path(__file__).parent))
from test_segments import DEFAULT_PROPENSITY, DEFAULT_USERS, H0, commit_hour  # noqa: E402

KEY = "k" * 32


@pytest.fixture
def published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, list[dict[str, Any]]]:
    """Two committed hours of exports (the same users both hours) and their summaries."""
    monkeypatch.setenv("PROFILE_ENGINE_EXPORT_KEY", KEY)
    settings = Settings(lake=tmp_path / "lake")
    summaries = []
    for hour in (H0, H0 + HOUR):
        commit_hour(settings.lake, hour, DEFAULT_USERS, DEFAULT_PROPENSITY)
        summaries.append(publish_segments(settings, hour, run_id=f"run-{hour.hour}"))
    return settings, summaries


def outbox_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_outbox_delivery_is_whole_and_idempotent(published: tuple[Settings, list[dict[str, Any]]]) -> None:
    settings, summaries = published
    extras = [delivery.asset_extra(s) for s in summaries]

    first = delivery.deliver_events(settings, extras)
    files = outbox_files(delivery.outbox_root(settings))
    again = delivery.deliver_events(settings, [*extras, *extras])  # coalesced and repeated events

    assert [h["outbox"]["status"] for h in first["hours"]] == ["delivered", "delivered"]
    assert [h["outbox"]["status"] for h in again["hours"]] == ["already delivered", "already delivered"]
    assert outbox_files(delivery.outbox_root(settings)) == files
    hour_dir = lk.Lake(delivery.outbox_root(settings)).partition("", H0)
    receipt = json.loads((hour_dir / delivery.RECEIPT).read_text())
    assert receipt["hour"] == format_hour(H0) and receipt["rows"]["coupon_10pct"] == 1
    assert (hour_dir / "cart_reminder.csv").read_bytes() == (
        Path(summaries[0]["exports_path"]) / "cart_reminder.csv"
    ).read_bytes()
    assert not any(u in b.decode(errors="ignore") for u in DEFAULT_USERS for b in files.values())


def test_sql_delivery_adds_nothing_the_second_time_and_replaces_a_changed_hour(
    published: tuple[Settings, list[dict[str, Any]]], tmp_path: Path
) -> None:
    settings, summaries = published
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'campaigns.db'}")
    manifest = Path(summaries[0]["manifest_path"])

    first = delivery.deliver_to_sql(manifest, engine)
    second = delivery.deliver_to_sql(manifest, engine)
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT hour, action, user_key, reason FROM campaign_deliveries")).fetchall()
    commit_hour(
        settings.lake, H0, {"only_one": {"open_cart_items": 1, "hours_since_last_cart": 2.0}}, {"only_one": 0.2}
    )
    publish_segments(settings, H0, run_id="rerun")  # the rerun changes the export of H0
    third = delivery.deliver_to_sql(manifest, engine)
    with engine.connect() as connection:
        after = connection.execute(sa.text("SELECT count(*) FROM campaign_deliveries")).scalar()
        batches = connection.execute(sa.text("SELECT hour, run_id, row_count FROM campaign_delivery_batches")).all()

    assert (first["status"], second["status"], third["status"]) == ("delivered", "already delivered", "delivered")
    assert len(rows) == sum(summaries[0]["exports"].values()) == first["rows"]
    assert {r.hour for r in rows} == {format_hour(H0)}
    assert all(len(r.user_key) == 64 and r.user_key not in DEFAULT_USERS for r in rows)
    assert after == 1
    assert [tuple(b) for b in batches] == [(format_hour(H0), "rerun", 1)]


def test_only_committed_and_intact_exports_are_delivered(published: tuple[Settings, list[dict[str, Any]]]) -> None:
    settings, summaries = published
    export_dir = Path(summaries[0]["exports_path"])
    (export_dir / "welcome.csv").write_text("user_key,segment\nforged,welcome\n")

    with pytest.raises(delivery.ExportChecksumError, match="welcome.csv"):
        delivery.deliver_events(settings, [delivery.asset_extra(summaries[0])])
    with pytest.raises(delivery.ExportNotCommittedError, match="export not committed"):
        delivery.deliver_events(settings, [{"hour": format_hour(H0 - 5 * HOUR)}])
    skipped = delivery.deliver_events(settings, [{"hour": format_hour(H0), "manifest": None}])
    assert skipped["hours"] == [] and skipped["skipped"][0]["reason"] == "no export written (dry run)"


def test_connection_engine_reads_a_uri_form_sqlite_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    database = tmp_path / "crm.db"
    monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", f"sqlite:///{database}")

    engine = delivery.connection_engine("crm_db")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")

    assert engine.url.database == str(database) and database.is_file()


def test_deliver_campaigns_dag_delivers_every_triggering_event(
    published: tuple[Settings, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DAG on its own: a run carrying two coalesced Asset events delivers both hours to outbox and SQLite."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models import dagrun as dagrun_module
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    settings, summaries = published
    # The test session's metadata database (tests/conftest.py sets AIRFLOW_HOME), as the e2e test does.
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True, capture_output=True)
    database = tmp_path / "delivery.db"
    monkeypatch.setenv("PROFILE_ENGINE_LAKE", str(settings.lake))
    monkeypatch.setenv("PROFILE_ENGINE_DELIVERY_CONN_ID", "campaign_db")
    monkeypatch.setenv("AIRFLOW_CONN_CAMPAIGN_DB", json.dumps({"conn_type": "sqlite", "host": str(database)}))
    dag = DagBag(dag_folder=str(Path(__file__).parents[1] / "dags" / "deliver_campaigns.py")).dags["deliver_campaigns"]
    original = dagrun_module.get_or_create_dagrun

    def with_asset_events(**kwargs: Any) -> Any:
        # dag.test() starts manual runs; attach the events a scheduler would have given this run.
        run = original(**kwargs)
        session = kwargs["session"]
        asset = session.scalar(sa.select(AssetModel).where(AssetModel.name == delivery.EXPORTS_ASSET_NAME))
        for summary in summaries:
            event = AssetEvent(asset_id=asset.id, extra=delivery.asset_extra(summary))
            session.add(event)
            run.consumed_asset_events.append(event)
        session.commit()
        return run

    monkeypatch.setattr(dagrun_module, "get_or_create_dagrun", with_asset_events)

    run = dag.test(logical_date=None)

    assert "success" in str(run.state)
    with create_session() as session:
        result = session.scalar(
            sa.text("SELECT value FROM xcom WHERE dag_id = 'deliver_campaigns' AND run_id = :run"),
            {"run": run.run_id},
        )
    summary = json.loads(result) if isinstance(result, str | bytes) else result
    assert [h["hour"] for h in summary["hours"]] == [s["hour"] for s in summaries]
    assert all(h["sql"]["status"] == "delivered" for h in summary["hours"])
    engine = sa.create_engine(f"sqlite:///{database}")
    with engine.connect() as connection:
        hours = connection.execute(sa.text("SELECT DISTINCT hour FROM campaign_deliveries ORDER BY hour")).scalars()
        assert list(hours) == [s["hour"] for s in summaries]
    for summary_ in summaries:
        hour_dir = lk.Lake(delivery.outbox_root(settings)).partition("", parse_hour(summary_["hour"]))
        assert (hour_dir / delivery.RECEIPT).is_file()


def test_sql_delivery_keeps_the_suppression_list_from_entered_and_left_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    monkeypatch.setenv("PROFILE_ENGINE_EXPORT_KEY", KEY)
    settings = Settings(lake=tmp_path / "lake")
    dormant = {"lifecycle_stage": "dormant", "hours_since_last_event": 900.0}
    low = {"d1": 0.01, "d2": 0.01, "d3": 0.01}
    populations = [
        {"d1": dormant, "d2": dormant, "d3": {}},
        {"d1": dormant, "d2": dormant, "d3": {}},  # unchanged: no suppress row
        {"d1": dormant, "d2": {}, "d3": dormant},  # d2 left, d3 entered
    ]
    manifests = []
    for i, users in enumerate(populations):
        commit_hour(settings.lake, H0 + i * HOUR, users, low)
        manifests.append(Path(publish_segments(settings, H0 + i * HOUR)["manifest_path"]))
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'campaigns.db'}")
    d1, d2, d3 = pseudonymize(["d1", "d2", "d3"], export_key(settings))

    results = [delivery.deliver_to_sql(m, engine) for m in (manifests[2], manifests[0], manifests[1])]  # out of order
    with engine.connect() as connection:
        listed: dict[str, str] = dict(
            connection.execute(sa.text("SELECT user_key, since_hour FROM campaign_suppressions")).all()
        )
        changes = connection.execute(
            sa.text("SELECT hour, user_key, change FROM campaign_deliveries WHERE action = 'suppress'")
        ).all()

    assert listed == {d1: format_hour(H0), d3: format_hour(H0 + 2 * HOUR)}
    assert sorted(tuple(r) for r in changes) == sorted(
        [
            (format_hour(H0), d1, "entered"),
            (format_hour(H0), d2, "entered"),
            (format_hour(H0 + 2 * HOUR), d2, "left"),
            (format_hour(H0 + 2 * HOUR), d3, "entered"),
        ]
    )
    assert results[-1]["suppression_list"] == 2 and results[-1]["suppression_gaps"] == []


def test_fold_suppressions_restarts_at_a_full_list_and_names_gaps() -> None:
    hours = [
        ("h1", "full", None, [("a", "entered"), ("b", "entered")]),
        ("h2", "changes", "h1", [("a", "left"), ("c", "entered")]),
        ("h4", "changes", "h3", [("d", "entered")]),  # h3 was never delivered
    ]

    folded = delivery.fold_suppressions(hours)

    assert folded["members"] == {"b": "h1", "c": "h2", "d": "h4"}
    assert folded["gaps"] == ["h4"]
    restarted = delivery.fold_suppressions([*hours, ("h5", "full", None, [("z", "entered")])])
    assert restarted["members"] == {"z": "h5"} and restarted["from_hour"] == "h5"
    legacy = delivery.fold_suppressions([("h0", None, None, [("x", None)])])  # an export from before: a whole list
    assert legacy["members"] == {"x": "h0"}
