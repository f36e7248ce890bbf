"""``make demo`` and ``make ui``: a simulated shop run through Airflow with progress output, and the local UI.

docs/operations.md, "The local UI and the demo producer".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from profile_engine.config import PROJECT_ROOT, Settings
from profile_engine.hours import HOUR, floor_hour, format_hour, hour_range, parse_hour
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake, read_json, write_json
from profile_engine.ops import progress

if TYPE_CHECKING:
    from profile_engine.sources.simulate import SimulationSummary

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


def _simulate_demo(lake: Lake, marker: dict[str, Any], first: datetime, last: datetime) -> SimulationSummary:
    """Land arrival hours ``first..last`` of the shop that ``marker`` (the demo's ``_meta/demo.json``) describes."""
    from profile_engine.sources.simulate import simulate

    return simulate(
        lake,
        first,
        last,
        users=int(marker["users"]),
        seed=int(marker["seed"]),
        business_tz=str(marker.get("business_tz") or Settings().business_tz),
        origin=parse_hour(marker["start"]),
        intensity=float(marker.get("intensity") or DEMO_INTENSITY),
    )


def land_demo_hours(settings: Settings, until: datetime) -> dict[str, Any]:
    """The demo producer: land the simulated shop's files of every arrival hour not yet landed, through ``until``.

    Continues the shop of the demo lake (the users, seed, origin and intensity in its
    ``_meta/demo.json``) exactly as ``make demo`` simulated it, so the hours that
    ``profile_refresh`` processes after the demo are the same as if the demo had gone on.
    Hours already landed are not rewritten (their files may be in the ingestion ledger).
    A lake that no demo made (a production lake) is left alone: ``status`` is ``skipped``.
    """
    lake = Lake(settings.lake)
    marker_path = lake.path(DEMO_MARKER)
    if settings.environment == "production" or not marker_path.is_file():
        reason = "production environment" if settings.environment == "production" else f"{marker_path} missing"
        return {"status": "skipped", "reason": f"not a demo lake ({reason}): the producer only feeds make demo's shop"}
    marker = read_json(marker_path)
    landed = parse_hour(marker.get("landed_through") or marker["window"][1])
    until = floor_hour(until)
    if until <= landed:
        return {"status": "up to date", "landed_through": format_hour(landed), "hours": 0, "files": 0, "events": 0}
    summary = _simulate_demo(lake, marker, landed + HOUR, until)
    write_json(marker_path, {**marker, "landed_through": format_hour(until)})
    return {
        "status": "landed",
        "first_hour": format_hour(summary.first_hour),
        "landed_through": format_hour(until),
        "hours": summary.hours,
        "files": summary.files,
        "events": summary.events,
    }


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
    for key, value in progress.TF_QUIET_ENV.items():  # before TensorFlow loads (in this process or a task's)
        os.environ.setdefault(key, value)
    settings = Settings.from_env()
    lake = _prepare_lake(settings)
    write_json(
        lake.path(DEMO_MARKER),
        {
            "users": users,
            "seed": seed,
            "start": format_hour(warm_first),
            "window": [format_hour(first_window), format_hour(last)],
            # What the demo producer needs to continue the same shop hour by hour (land_demo_hours).
            "business_tz": settings.business_tz,
            "intensity": DEMO_INTENSITY,
        },
    )

    from profile_engine.ops import runner

    print(
        f"[demo] simulating {users} users, {format_hour(warm_first)} .. {format_hour(last)} -> {lake.root}", flush=True
    )
    simulated = _simulate_demo(lake, read_json(lake.path(DEMO_MARKER)), warm_first, last)
    print(
        f"[demo] {simulated.events} events in {simulated.files} landing files ({time.monotonic() - started:.0f}s)",
        flush=True,
    )
    console = _console()
    warm_progress = progress.Progress("warm-up", len(list(hour_range(warm_first, first_window - HOUR))), stream=console)
    warm = runner.warm_up(settings, warm_first, first_window - HOUR, progress=warm_progress)
    warm_progress.close()
    print(
        f"[demo] warm-up: {warm['hours']} hours, {warm['staged']} staged, {warm['quarantined']} quarantined, "
        f"{len(warm['snapshots'])} snapshots ({time.monotonic() - started:.0f}s)",
        flush=True,
    )

    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True, capture_output=True)
    dag = _load_dag()
    progress.install_log_filters()
    failed: list[str] = []
    window = progress.Progress("profile_refresh", hours, stream=console)
    with progress.filtered_stderr(before_line=window.clear):
        for hour in hour_range(first_window, last):
            window.start_hour(hour)
            window.stage("through Airflow (dag.test)")
            run = dag.test(logical_date=hour, run_conf={"hour": format_hour(hour)})
            state = str(getattr(run, "state", "unknown"))
            if "success" not in state:
                window.close()
                print(f"[demo] profile_refresh {format_hour(hour)}: {state}", flush=True)
                failed.append(format_hour(hour))
                break
            window.hour_done(_events_read(lake, hour))
    window.close()
    summary = summarize(settings, first_window, last, warm)
    summary["failed_hours"] = failed
    summary["seconds"] = round(time.monotonic() - started, 1)
    print(render_summary(summary), flush=True)
    if failed:
        raise SystemExit(f"profile_refresh failed for hour {failed[0]}: see {summary['reports']}")
    return summary


def _console() -> TextIO:
    """A stream on the terminal's stderr that bypasses ``filtered_stderr`` (the bar is not line-buffered)."""
    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    except (AttributeError, OSError, ValueError):
        return sys.stderr


def _events_read(lake: Lake, hour: datetime) -> int:
    """Rows the hour's run report says were read (0 without a report)."""
    path = lake.partition(lk.REPORTS, hour) / "report.json"
    return int(read_json(path)["headline"].get("rows_read") or 0) if path.is_file() else 0


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


PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"


def ui_environment(settings: Settings, *, port: int, airflow_home: Path | None = None) -> dict[str, str]:
    """The environment of ``make ui``'s ``airflow standalone``: project-local Airflow on 127.0.0.1:``port``.

    ``PROFILE_ENGINE_START`` continues after the lake's last snapshot (unless set), a demo
    lake keeps the demo's label horizon and retraining cadence, and the API base URL names
    the port, so tasks reach this server's execution API and not whatever runs on 8080.
    """
    env = {**os.environ, **airflow_env()}
    if airflow_home is not None:
        env["AIRFLOW_HOME"] = str(airflow_home)
    env["PROFILE_ENGINE_LAKE"] = str(settings.lake)
    env.setdefault("PROFILE_ENGINE_START", format_hour(ui_start_hour(settings)))
    if Lake(settings.lake).path(DEMO_MARKER).is_file():
        for key, value in DEMO_ENV.items():
            env.setdefault(key, value)
    env["AIRFLOW__API__HOST"] = "127.0.0.1"
    env["AIRFLOW__API__PORT"] = str(port)
    env["AIRFLOW__API__BASE_URL"] = f"http://127.0.0.1:{port}"
    return env


def ui_login(airflow_home: Path) -> tuple[str, str]:
    """The admin user and password that ``airflow standalone`` generated (simple auth manager)."""
    passwords: dict[str, str] = json.loads((airflow_home / PASSWORDS_FILE).read_text())
    user = "admin" if "admin" in passwords else sorted(passwords)[0]
    return user, passwords[user]


def wait_for_ui(base_url: str, process: subprocess.Popen[Any], airflow_home: Path, timeout: float = 300.0) -> None:
    """Wait until the API server answers its health check and the login exists (``RuntimeError`` otherwise)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"airflow standalone exited with code {process.returncode} before the UI came up")
        try:
            with urllib.request.urlopen(f"{base_url}/api/v2/monitor/health", timeout=5) as response:
                if response.status == 200 and (airflow_home / PASSWORDS_FILE).is_file():
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise RuntimeError(f"the Airflow UI at {base_url} did not answer within {timeout:.0f}s")


def run_ui(*, port: int = 8080) -> int:
    """Land the demo shop's missing hours, run ``airflow standalone`` on 127.0.0.1, print address and login.

    Returns the exit code of ``airflow standalone`` (Ctrl-C stops it).
    """
    settings = Settings.from_env()
    landed = land_demo_hours(settings, floor_hour(datetime.now(UTC)) - HOUR)
    if landed["status"] == "landed":
        print(f"[ui] demo producer caught up: {landed['events']} events landed through {landed['landed_through']}")
    env = ui_environment(settings, port=port)
    home, url = Path(env["AIRFLOW_HOME"]), env["AIRFLOW__API__BASE_URL"]
    # Its own session: Ctrl-C reaches only this process, which then stops the whole group (a SIGINT to
    # every component at once left the scheduler and LocalExecutor workers hanging in Airflow 3.3.2).
    process = subprocess.Popen(["airflow", "standalone"], env=env, start_new_session=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops Airflow too, like Ctrl-C
    try:
        try:
            wait_for_ui(url, process, home)
            user, password = ui_login(home)
            print(
                f"\n=== Airflow UI: {url}  login: {user} / {password}  (kept in {home / PASSWORDS_FILE})\n"
                f"=== run reports: {url}/profile-engine/ (Browse -> Run reports); lake {settings.lake}\n"
                f"=== profile_refresh continues at {env['PROFILE_ENGINE_START']} once you switch it on; "
                "demo_producer lands each new hour at :55\n",
                flush=True,
            )
        except RuntimeError as error:
            print(f"[ui] {error}; see the output of airflow standalone above", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        print("[ui] stopping Airflow ...", flush=True)
        return 0
    finally:
        stop_process_group(process)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def stop_process_group(process: subprocess.Popen[Any], grace: float = 60.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its group.

    SIGTERM first; whatever is left after ``grace`` seconds (Airflow's LocalExecutor
    workers can outlive their scheduler) gets SIGKILL.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            process.poll()  # reap the leader, or the group never empties
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
    process.wait(timeout=30)
