"""DAG integrity (Astronomer's template): every DAG imports, is documented and configured explicitly."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from profile_engine.config import task_timeout
from profile_engine.contracts.stages import REPORT_STAGE, STAGES

DAGS = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(p for p in DAGS.glob("*.py") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def dagbag():  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_every_dag_file_imports(dagbag) -> None:  # type: ignore[no-untyped-def]
    assert dagbag.import_errors == {}
    assert DAG_FILES and len(dagbag.dags) >= len(DAG_FILES)


def test_dags_have_tags_docs_retries_and_explicit_catchup(dagbag) -> None:  # type: ignore[no-untyped-def]
    for dag_id, dag in dagbag.dags.items():
        source = Path(dag.fileloc).read_text()
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md and dag.doc_md.strip(), f"{dag_id} has no doc_md"
        assert "catchup=" in source, f"{dag_id} does not set catchup explicitly"
        for task in dag.tasks:
            if task.retries < 2:
                # A task may run with fewer retries only where the file says why.
                line = next(i for i, text in enumerate(source.splitlines()) if f"def {task.task_id}(" in text)
                decorator = source.splitlines()[line - 1]
                assert "#" in decorator, f"{dag_id}.{task.task_id} has retries={task.retries} without a reason"


def test_every_task_has_the_configured_execution_timeout(dagbag) -> None:  # type: ignore[no-untyped-def]
    """A hung task (a runaway query, a stuck mount) fails after PROFILE_ENGINE_TASK_TIMEOUT_MINUTES."""
    expected = task_timeout()
    tasks = [(dag_id, task) for dag_id, dag in dagbag.dags.items() for task in dag.tasks]

    assert len(tasks) >= 15
    assert {f"{d}.{t.task_id}": t.execution_timeout for d, t in tasks} == {
        f"{d}.{t.task_id}": expected for d, t in tasks
    }


def test_the_timeout_follows_the_environment() -> None:
    source = "import runpy, sys; dag = runpy.run_path(sys.argv[1])['freshness_check']()\n"
    source += "print(dag.default_args['execution_timeout'].total_seconds())"
    env = {**os.environ, "PROFILE_ENGINE_TASK_TIMEOUT_MINUTES": "7"}
    result = subprocess.run(
        [sys.executable, "-c", source, str(DAGS / "freshness_check.py")], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "420.0"


def test_profile_refresh_shape(dagbag) -> None:  # type: ignore[no-untyped-def]
    dag = dagbag.dags["profile_refresh"]
    assert dag.max_active_runs == 1 and dag.catchup is True
    assert type(dag.timetable).__name__ == "HourlyTimetable"  # cron "0 * * * *", see profile_engine.ops.timetable
    # The run report covers exactly the DAG's stages.
    assert set(dag.task_ids) == {*STAGES, REPORT_STAGE}
    assert dag.get_task("build_profiles").depends_on_past
    assert dag.get_task("score_profiles").trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("write_run_report").trigger_rule == "all_done"
    # The quality suite runs beside the profiles (it gates nothing) and reaches the report.
    check = dag.get_task("check_quality")
    assert check.upstream_task_ids == {"validate_events"}
    assert check.downstream_task_ids == {"write_run_report"}
    assert check.trigger_rule == "all_done"  # also after a quarantine-threshold failure, which staged the hour
    assert "check_quality" not in dag.get_task("build_profiles").upstream_task_ids
    assert set(dag.params.keys()) >= {"hour", "force_retrain", "force_promote", "quarantine_threshold", "dry_run"}


PARSE_CHECK = """
import runpy, socket, sys
def refuse(*args, **kwargs):
    raise AssertionError("a DAG file opened a network connection at parse time")
socket.socket.connect = refuse
socket.create_connection = refuse
for path in sys.argv[1:]:
    runpy.run_path(path)
heavy = [m for m in ("tensorflow", "keras", "great_expectations", "duckdb", "pandas") if m in sys.modules]
assert not heavy, f"parsing imported {heavy}"
"""


def test_parsing_imports_nothing_heavy_and_opens_no_connection() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PARSE_CHECK, *map(str, DAG_FILES)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def _profile_refresh_in(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Parse profile_refresh.py in a fresh interpreter under ``env``; prints its start date and bucket count."""
    source = "import runpy, sys; dag = runpy.run_path(sys.argv[1])['profile_refresh']()\n"
    source += (
        "print(dag.start_date.isoformat(), len(dag.get_task('build_profiles').op_kwargs_expand_input.value['bucket']))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PROFILE_ENGINE_")}
    return subprocess.run(
        [sys.executable, "-c", source, str(DAGS / "profile_refresh.py")],
        capture_output=True,
        text=True,
        env={**clean, **env},
    )


@pytest.mark.parametrize(
    "env",
    [{}, {"PROFILE_ENGINE_START": "2026-12-01T06:00+01:00", "PROFILE_ENGINE_BUCKETS": "3"}],
    ids=["unset", "set"],
)
def test_profile_refresh_reads_start_and_buckets_from_settings(env: dict[str, str]) -> None:
    from profile_engine.config import Settings

    settings = Settings.from_env(env)

    result = _profile_refresh_in(env)

    assert result.returncode == 0, result.stderr[-2000:]
    start, buckets = result.stdout.split()[-2:]
    assert datetime.fromisoformat(start) == settings.schedule_start
    assert int(buckets) == settings.buckets


@pytest.mark.parametrize(
    ("name", "value"), [("PROFILE_ENGINE_BUCKETS", "0"), ("PROFILE_ENGINE_START", "2026-12-01T04:30")]
)
def test_profile_refresh_rejects_what_settings_rejects_naming_the_variable(name: str, value: str) -> None:
    result = _profile_refresh_in({name: value})

    assert result.returncode != 0
    assert name in result.stderr
