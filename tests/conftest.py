"""Shared fixtures, and a project-local Airflow home for the test session.

Airflow reads its configuration once per process, so the environment is set here,
before any test imports it: a SQLite metadata database under ``.airflow/pytest`` (``pytest-gwN`` for
each pytest-xdist worker; git-ignored; ``TEST_AIRFLOW_HOME`` moves it, as ``scripts/test-calendar.sh`` does so that
a run under a fake clock starts from an empty database), the project's DAGs, no examples.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# one database per pytest-xdist worker (``make test`` runs two): SQLite takes one writer at a time
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
os.environ["AIRFLOW_HOME"] = os.environ.get("TEST_AIRFLOW_HOME") or str(
    ROOT / ".airflow" / (f"pytest-{_WORKER}" if _WORKER else "pytest")
)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
# Tests never talk to Great Expectations' analytics.
os.environ["GX_ANALYTICS_ENABLED"] = "false"

from profile_engine.config import Settings  # noqa: E402

HOUR0 = datetime(2026, 11, 2, 10, tzinfo=UTC)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings over an empty lake in ``tmp_path`` with two buckets."""
    return Settings(lake=tmp_path / "lake", buckets=2, lateness_hours=6, start=HOUR0)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """The test session's Airflow metadata database, migrated (``AIRFLOW_HOME`` above may be new and empty)."""
    airflow = Path(sys.executable).parent / "airflow"
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True, timeout=300)
    return Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"


# Files that each take minutes (``pytest --durations``) but hold few tests. pytest-xdist's ``--dist loadfile``
# hands files out by their number of tests, most first (``--no-loadscope-reorder`` in pyproject.toml turns that
# off), so these came last and one worker ran alone at the end of ``make test``. Under xdist they are collected
# (and so handed out) first, in this order; every other file keeps its place. Only the order changes.
SLOW_FIRST = (
    "tests/test_verify_lake_path.py",
    "tests/test_verify_lake_path_from_previous.py",
    "tests/reliability/test_faults.py",
    "tests/e2e/test_demo_through_airflow.py",
    "tests/test_erasure.py",
    "tests/test_real_slice.py",
    "tests/test_sealed_tiles.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _WORKER:
        return
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))  # stable: files stay whole
