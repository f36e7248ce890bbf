"""``make demo`` and ``make ui``: a simulated shop run through Airflow, and the local UI.

The demo simulates ``history_days`` of warm-up history plus a window of ``hours``
hours ending at the last complete hour, builds the warm-up in bulk with the
in-process runner, then runs ``profile_refresh`` through Airflow (``dag.test`` with
logical date H and ``hour``=H) for every hour of the window and prints a summary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from profile_engine import lake as lk
from profile_engine.config import PROJECT_ROOT, Settings
from profile_engine.hours import HOUR, floor_hour, format_hour, hour_range
from profile_engine.lake import Lake, read_json, write_json

DEMO_MARKER = "_meta/demo.json"
# Labels of a snapshot are final after horizon + lateness (24 h + the 24 h lateness window). The warm-up
# commits a snapshot every day, so the first retraining in the window already has a
# final evaluation snapshot and 30 older training snapshots; retraining every 12 h
# gives four trainings in the default 48 h window. A 6 h horizon was tried first: with
# 2,000 users it leaves about 10 buyers per evaluation snapshot, too few to gate on.
DEMO_ENV = {"PROFILE_ENGINE_LABEL_HORIZON_HOURS": "24", "PROFILE_ENGINE_RETRAIN_EVERY_HOURS": "12"}
# Sessions per user relative to the simulator's default: about 600 events an hour for
# 2,000 users, enough purchases (~8% of users buy within 24 h) for the model to learn.
DEMO_INTENSITY = 3.0
DAG_FILE = PROJECT_ROOT / "dags" / "profile_refresh.py"


def airflow_env() -> dict[str, str]:
    """Environment for a project-local Airflow: ``.airflow/`` home, the project's DAGs and plugins."""
    venv_bin = str(Path(sys.executable).parent)
    return {
        "AIRFLOW_HOME": os.environ.get("AIRFLOW_HOME") or str(PROJECT_ROOT / ".airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
    }


def _prepare_lake(settings: Settings) -> Lake:
    """A clean lake for the demo: an earlier demo's lake is replaced, anything else is refused."""
    lake = Lake(settings.lake)
    if lake.root.exists() and any(lake.root.iterdir()):
        if not lake.path(DEMO_MARKER).is_file():
            raise SystemExit(
                f"{lake.root} holds data that no demo wrote; set PROFILE_ENGINE_LAKE to an empty folder "
                "or remove it yourself"
            )
        shutil.rmtree(lake.root)
    lake.root.mkdir(parents=True, exist_ok=True)
    return lake


def _load_dag() -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAG_FILE))
    if bag.import_errors:
        raise SystemExit(f"{DAG_FILE} does not import: {bag.import_errors}")
    return bag.dags["profile_refresh"]


def run_demo(*, users: int, history_days: int, hours: int, seed: int, last: datetime | None = None) -> dict[str, Any]:
    """Run the whole demo and print its summary; returns the summary.

    The window ends at ``last`` (default: the last complete hour, so that ``make ui``
    continues in real time after it).
    """
    started = time.monotonic()
    for key, value in {**DEMO_ENV, **airflow_env()}.items():
        os.environ.setdefault(key, value) if key.startswith("PROFILE_ENGINE_") else os.environ.__setitem__(key, value)
    last = floor_hour(last or datetime.now(UTC) - HOUR)
    first_window = last - (hours - 1) * HOUR
    warm_first = first_window - timedelta(days=history_days)
    os.environ["PROFILE_ENGINE_START"] = format_hour(warm_first)
    # Task logs of 48 runs would bury the summary; the run reports keep what matters.
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    settings = Settings.from_env()
    lake = _prepare_lake(settings)
    write_json(
        lake.path(DEMO_MARKER),
        {
            "users": users,
            "seed": seed,
            "start": format_hour(warm_first),
            "window": [format_hour(first_window), format_hour(last)],
        },
    )

    from profile_engine import runner
    from profile_engine.simulate import simulate

    print(
        f"[demo] simulating {users} users, {format_hour(warm_first)} .. {format_hour(last)} -> {lake.root}", flush=True
    )
    simulated = simulate(
        lake,
        warm_first,
        last,
        users=users,
        seed=seed,
        business_tz=settings.business_tz,
        origin=warm_first,
        intensity=DEMO_INTENSITY,
    )
    print(
        f"[demo] {simulated.events} events in {simulated.files} landing files ({time.monotonic() - started:.0f}s)",
        flush=True,
    )
    warm = runner.warm_up(settings, warm_first, first_window - HOUR)
    print(
        f"[demo] warm-up: {warm['hours']} hours, {warm['staged']} staged, {warm['quarantined']} quarantined, "
        f"{len(warm['snapshots'])} snapshots ({time.monotonic() - started:.0f}s)",
        flush=True,
    )

    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True, capture_output=True)
    dag = _load_dag()
    failed: list[str] = []
    for hour in hour_range(first_window, last):
        run = dag.test(logical_date=hour, run_conf={"hour": format_hour(hour)})
        state = str(getattr(run, "state", "unknown"))
        print(f"[demo] profile_refresh {format_hour(hour)}: {state} ({time.monotonic() - started:.0f}s)", flush=True)
        if "success" not in state:
            failed.append(format_hour(hour))
            break
    summary = summarize(settings, first_window, last, warm)
    summary["failed_hours"] = failed
    summary["seconds"] = round(time.monotonic() - started, 1)
    print(render_summary(summary), flush=True)
    if failed:
        raise SystemExit(f"profile_refresh failed for hour {failed[0]}: see {summary['reports']}")
    return summary


def summarize(settings: Settings, first: datetime, last: datetime, warm: dict[str, Any]) -> dict[str, Any]:
    """Totals of the window from the run reports, plus the final snapshot, model and segments."""
    lake = Lake(settings.lake)
    staged = quarantined = processed = 0
    for hour in hour_range(first, last):
        path = lake.partition(lk.REPORTS, hour) / "report.json"
        if path.is_file():
            headline = read_json(path)["headline"]
            processed += 1
            staged += headline.get("staged") or 0
            quarantined += headline.get("quarantined") or 0
    champion_path = lake.path(lk.MODELS, "champion.json")
    champion = read_json(champion_path) if champion_path.is_file() else None
    segments_manifest = lake.partition(lk.EXPORTS, last) / lk.MANIFEST
    profiles = lake.read(lk.PROFILES, last, columns=["user_id"]).num_rows if lake.committed(lk.PROFILES, last) else 0
    return {
        "lake": str(lake.root),
        "window": [format_hour(first), format_hour(last)],
        "hours_processed": processed,
        "warm_up": {k: warm[k] for k in ("hours", "staged", "quarantined")},
        "staged": staged,
        "quarantined": quarantined,
        "profiles": profiles,
        "champion": champion,
        "exports": read_json(segments_manifest) if segments_manifest.is_file() else None,
        "quality_docs": str(lake.partition(lk.QUALITY_DOCS, last) / "index.html"),
        "reports": str(lake.path(lk.REPORTS)),
    }


def render_summary(summary: dict[str, Any]) -> str:
    """Human-readable summary for the terminal."""
    champion = summary["champion"]
    model = (
        f"champion {champion.get('version')} (from {champion.get('from_hour')})"
        if champion
        else "no model promoted yet (scoring uses the baseline)"
    )
    exports = summary["exports"] or {}
    files = ", ".join(f"{f['name']}" for f in exports.get("files", [])) or "none"
    return "\n".join(
        [
            "",
            "=== demo finished in {seconds}s ===".format(**summary),
            f"lake:              {summary['lake']}",
            f"window:            {summary['window'][0]} .. {summary['window'][1]} ({summary['hours_processed']} hours through Airflow)",
            f"warm-up:           {summary['warm_up']['hours']} hours, {summary['warm_up']['staged']} events staged, {summary['warm_up']['quarantined']} quarantined",
            f"window events:     {summary['staged']} staged, {summary['quarantined']} quarantined",
            f"profiles:          {summary['profiles']} users in the last snapshot",
            f"model:             {model}",
            f"segment exports:   {json.dumps(exports.get('rows', exports.get('actions', {})))} ({files})",
            f"data quality docs: {summary['quality_docs']}",
            f"run reports:       {summary['reports']}/dt=*/hour=*/report.html",
            "open the Airflow UI: make ui",
        ]
    )


def ui_start_hour(settings: Settings) -> datetime:
    """The hour the scheduler should start at: after the lake's last committed snapshot, else the last complete hour."""
    pointer = Lake(settings.lake).path(lk.PROFILES, "current")
    if pointer.is_file():
        current = read_json(pointer)
        hour = current.get("hour") or current.get("data_hour")
        if hour:
            return floor_hour(datetime.fromisoformat(hour)) + HOUR
    return floor_hour(datetime.now(UTC)) - HOUR


def run_ui(*, port: int = 8080) -> int:
    """Run ``airflow standalone`` on 127.0.0.1 with the project's DAGs; returns its exit code."""
    settings = Settings.from_env()
    env = {**os.environ, **airflow_env()}
    env.setdefault("PROFILE_ENGINE_START", format_hour(ui_start_hour(settings)))
    env["AIRFLOW__API__HOST"] = "127.0.0.1"
    env["AIRFLOW__API__PORT"] = str(port)
    passwords = Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    print(
        f"Airflow UI: http://127.0.0.1:{port}  (user admin; password printed below by airflow standalone and kept in "
        f"{passwords})\nprofile_refresh starts at {env['PROFILE_ENGINE_START']}; lake {settings.lake}",
        flush=True,
    )
    return subprocess.call(["airflow", "standalone"], env=env)
