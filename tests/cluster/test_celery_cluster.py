"""``profile_refresh`` on a real multi-worker Airflow: CeleryExecutor, PostgreSQL, Redis, two workers.

The same topology as ``docker-compose.yaml``, without Docker: the test starts its own
PostgreSQL and Redis on free loopback ports, then the api-server, scheduler, dag-processor,
triggerer and two Celery workers (``worker-a``, ``worker-b``, one task slot each), all with an
``AIRFLOW_HOME`` and a lake in the test's temporary folder. On a small simulated shop (150
users, two days of history warmed up in-process, four buckets) it processes six hours, the
last complete hour included, the three ways hours reach production:

1. two hours triggered through the REST API (logical date H, ``conf={"hour": H}``);
2. two hours by one ``airflow backfill create ... --max-active-runs 1 --reprocess-behavior failed``
   (run by the scheduler; Airflow refuses a backfill of a DAG with ``depends_on_past`` tasks
   without a reprocess behaviour);
3. two hours missed while the scheduler was down: until then the scheduler ran with
   ``[scheduler] use_job_schedule = False`` (it runs triggered and backfill runs, creates no
   scheduled ones), so the hours since the backfill pile up as if it had been stopped; it is
   stopped, restarted with the schedule on, and catches them up in order.

Then it checks that every run succeeded in hour order, that the bucket-mapped tasks
(``build_profiles``, ``score_profiles``) ran on both workers, and that the lake equals a
single-process run of the same hours (``profile_engine.ops.runner``) on a copy of the starting lake.
Retraining is set to never fall due in the window, so the comparison does not depend on
TensorFlow training being bit-for-bit reproducible across processes (the reliability tests
cover training reruns); scoring (with the baseline) runs every hour. Everything started is
stopped at the end, also on failure, and the service logs' tails are printed when it fails.
"""

from __future__ import annotations

import secrets
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from profile_engine.config import Settings
from profile_engine.hours import HOUR, floor_hour, format_hour, hour_range
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake, read_json
from profile_engine.model.training import retrain_due
from profile_engine.ops import runner
from profile_engine.sources.simulate import simulate
from tests.reliability.lakecheck import differences, lake_content, partial_partitions

from .services import AIRFLOW, ApiClient, Cluster, api_up, wait_for

DAG_ID = "profile_refresh"
WORKERS = ("worker-a", "worker-b")
MAPPED = ("build_profiles", "score_profiles")
USERS = 150
HISTORY_DAYS = 2
PER_PHASE = 2  # hours triggered, backfilled and caught up (about 70 s an hour on 2 shared cores)
RUN_TIMEOUT = 300.0  # seconds one phase may take per hour


def _iso(hour: datetime) -> str:
    return format_hour(hour)


def _runs(api: ApiClient) -> list[dict[str, Any]]:
    """Every run of the DAG, oldest logical date first."""
    runs = list(api.paged(f"dags/{DAG_ID}/dagRuns", "dag_runs", order_by="logical_date"))
    return sorted(runs, key=lambda r: r["logical_date"] or "")


def _wait_runs(api: ApiClient, hours: list[datetime], run_type: str, timeout: float) -> dict[datetime, dict[str, Any]]:
    """Wait until runs of ``run_type`` for every hour in ``hours`` finished; fail fast on a failed run."""
    wanted = {_iso(h) for h in hours}
    found: dict[datetime, dict[str, Any]] = {}

    def finished() -> bool:
        found.clear()
        for run in _runs(api):
            if run["run_type"] == run_type and run["logical_date"] and _iso(_parse(run["logical_date"])) in wanted:
                found[_parse(run["logical_date"])] = run
        failed = [r["dag_run_id"] for r in found.values() if r["state"] == "failed"]
        if failed:
            raise AssertionError(f"{run_type} runs failed: {failed}")
        return len(found) == len(wanted) and all(r["state"] == "success" for r in found.values())

    wait_for(f"{run_type} runs of {sorted(wanted)}", finished, timeout=timeout, interval=3)
    return dict(found)


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


@pytest.mark.cluster
@pytest.mark.timeout(1500)
def test_profile_refresh_on_celery_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: 3 * PER_PHASE hours up to the last complete one; a lake warmed up to the hour before them.
    started = time.monotonic()
    timings: dict[str, float] = {}
    last = floor_hour(datetime.now(UTC)) - HOUR
    first = last - (3 * PER_PHASE - 1) * HOUR
    triggered = list(hour_range(first, first + (PER_PHASE - 1) * HOUR))
    backfilled = list(hour_range(triggered[-1] + HOUR, triggered[-1] + PER_PHASE * HOUR))
    caught_up = list(hour_range(backfilled[-1] + HOUR, last))
    warm_first = first - timedelta(days=HISTORY_DAYS)
    every = 1_000_000  # retraining due once in 114 years: never in this window (see the module docstring)
    assert not any(retrain_due(Settings(retrain_every_hours=every), h) for h in hour_range(first, last + HOUR))
    engine_env = {
        "PROFILE_ENGINE_LAKE": str(tmp_path / "lake"),
        "PROFILE_ENGINE_BUCKETS": "4",
        "PROFILE_ENGINE_START": _iso(first),
        "PROFILE_ENGINE_RETRAIN_EVERY_HOURS": str(every),
        # One pseudonymisation key for both lakes (without it each generates its own on first export).
        "PROFILE_ENGINE_EXPORT_KEY": secrets.token_hex(32),
    }
    settings = Settings.from_env(engine_env)
    # One hour more of landing files, in case the clock passes an hour while the test runs.
    simulate(Lake(settings.lake), warm_first, last + HOUR, users=USERS, seed=8, intensity=3.0)
    runner.warm_up(settings, warm_first, first - HOUR)
    reference = Path(shutil.copytree(settings.lake, tmp_path / "reference", symlinks=True))
    timings["lake prepared"] = time.monotonic() - started

    work = tmp_path / "cluster"
    with Cluster(work) as cluster:
        try:
            database = cluster.start_postgres()
            broker = cluster.start_redis()
            env = cluster.airflow_env(
                work / "airflow", database, broker, {**engine_env, "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"}
            )
            cluster.airflow(["db", "migrate"], env)
            for component in ("api-server", "scheduler", "dag-processor", "triggerer"):
                cluster.start(component, [AIRFLOW, component], env)
            for worker in WORKERS:
                cluster.start_worker(worker, env)
            wait_for("the api-server", lambda: api_up(f"http://127.0.0.1:{cluster.api_port}"), timeout=180)
            api = cluster.api()
            wait_for(f"{DAG_ID} to be parsed", lambda: api.get(f"dags/{DAG_ID}")["dag_id"] == DAG_ID, timeout=180)
            api.send("PATCH", f"dags/{DAG_ID}", {"is_paused": False})
            timings["cluster up"] = time.monotonic() - started

            # Act 1: hours triggered through the REST API, all at once (max_active_runs=1 runs them in turn).
            for hour in triggered:
                api.send(
                    "POST",
                    f"dags/{DAG_ID}/dagRuns",
                    {"dag_run_id": f"manual__{_iso(hour)}", "logical_date": _iso(hour), "conf": {"hour": _iso(hour)}},
                )
            manual = _wait_runs(api, triggered, "manual", RUN_TIMEOUT * PER_PHASE)
            timings["triggered hours"] = time.monotonic() - started

            # Act 2: one Airflow backfill, executed by the scheduler.
            cluster.airflow(
                [
                    "backfill",
                    "create",
                    "--dag-id",
                    DAG_ID,
                    "--from-date",
                    _iso(backfilled[0]),
                    "--to-date",
                    _iso(backfilled[-1]),
                    "--max-active-runs",
                    "1",
                    "--reprocess-behavior",
                    "failed",
                ],
                env,
            )
            backfill = _wait_runs(api, backfilled, "backfill", RUN_TIMEOUT * PER_PHASE)
            timings["backfilled hours"] = time.monotonic() - started

            # Act 3: the scheduler stops and comes back with its schedule on: the missed hours run in order.
            wait_for(
                "the dag-processor to plan the hour after the backfill",
                lambda: (
                    api.get(f"dags/{DAG_ID}")["next_dagrun_logical_date"] == _iso(caught_up[0]).replace("+00:00", "Z")
                ),
                timeout=180,
                interval=3,
            )
            cluster.stop_service("scheduler")
            cluster.start(
                "scheduler-restarted", [AIRFLOW, "scheduler"], {**env, "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "True"}
            )
            scheduled = _wait_runs(api, caught_up, "scheduled", RUN_TIMEOUT * PER_PHASE)
            # If the clock passed an hour meanwhile, that hour is due too: let it finish, then pause.
            due = floor_hour(datetime.now(UTC)) - HOUR
            if due > last:
                scheduled |= _wait_runs(api, list(hour_range(last + HOUR, due)), "scheduled", RUN_TIMEOUT)
            api.send("PATCH", f"dags/{DAG_ID}", {"is_paused": True})
            timings["caught-up hours"] = time.monotonic() - started
            runs = {**manual, **backfill, **scheduled}
            hostnames = {
                hour: [
                    (ti["task_id"], ti["map_index"], ti["hostname"], ti["state"])
                    for ti in api.paged(f"dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances", "task_instances")
                ]
                for hour, run in runs.items()
            }
            all_runs = _runs(api)
        except BaseException:
            print(f"\n===== cluster test failed; service logs in {work / 'logs'} =====\n{cluster.log_tails()}")
            raise
    leftovers = cluster.leftovers()
    timings["cluster stopped"] = time.monotonic() - started

    # The same hours in one process, on the copy of the starting lake.
    hours = sorted(runs)
    monkeypatch.setenv("PROFILE_ENGINE_EXPORT_KEY", engine_env["PROFILE_ENGINE_EXPORT_KEY"])  # read at export time
    runner.run_hours(
        Settings.from_env({**engine_env, "PROFILE_ENGINE_LAKE": str(reference)}), hours[0], hours[-1], build_docs=False
    )
    timings["single-process reference"] = time.monotonic() - started
    print("\n" + "\n".join(f"[cluster] {name}: {seconds:.0f}s" for name, seconds in timings.items()))

    # Assert: nothing left running; every run succeeded, one per hour, in hour order.
    assert leftovers == [], f"processes left behind: {leftovers}"
    assert hours == list(hour_range(first, hours[-1])) and hours[-1] >= last
    assert [r for r in all_runs if r["state"] != "success" and r["state"] != "queued"] == []
    ordered = [runs[h] for h in hours]
    for before, after in zip(ordered, ordered[1:], strict=False):
        assert _parse(after["start_date"]) >= _parse(before["end_date"]), (before["dag_run_id"], after["dag_run_id"])
    for hour in hours:
        report = read_json(Lake(settings.lake).partition(lk.REPORTS, hour) / "report.json")
        assert report["status"] == "success", (hour, report.get("incomplete_stages"))
        assert all(state in ("success", "skipped") for _, _, _, state in hostnames[hour]), hostnames[hour]
    # The bucket-mapped tasks ran on both workers.
    for task in MAPPED:
        used = {host for tis in hostnames.values() for task_id, index, host, _ in tis if task_id == task and index >= 0}
        assert used == set(WORKERS), f"{task} ran on {used}"
    # The lake equals the single-process run, and every committed partition is whole.
    assert partial_partitions(settings.lake) == []
    cluster_content, reference_content = lake_content(settings.lake), lake_content(reference)
    assert differences(cluster_content, reference_content) == []
    assert any(key.startswith(lk.SCORES) for key in cluster_content)
