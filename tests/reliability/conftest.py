"""A small simulated shop processed hour by hour, shared by the reliability tests.

``base_lake``: 100 users, landing files for WARM..H0+24; a day of history WARM..H0-1
warmed up in bulk (``runner.warm_up``, as the demo does), then hours H0..H0+22 processed
in order by the in-process hour runner. ``reference_lake``: a copy with hour H0+23 run
uninterrupted too (24 hours in order). Tests copy these (``shutil.copytree`` keeps the
landing files' modification times, which carry their arrival) and never change them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from profile_engine.config import Settings
from profile_engine.hours import format_hour
from profile_engine.lake.storage import Lake
from profile_engine.ops import runner
from profile_engine.sources.simulate import simulate

from .lakecheck import lake_content

H0 = datetime(2026, 11, 3, 0, tzinfo=UTC)
WARM = H0 - timedelta(hours=24)
HOURS = 24  # processed in order by the reference; one more hour of landing files exists
LAST = H0 + timedelta(hours=HOURS - 1)
SETTINGS = Settings(buckets=2, lateness_hours=6, start=WARM)


def settings_for(root: Path) -> Settings:
    """The shared settings over lake ``root``."""
    return replace(SETTINGS, lake=root)


def copy_lake(source: Path, target: Path) -> Path:
    """A copy of a lake (modification times kept)."""
    shutil.copytree(source, target, symlinks=True)
    return target


def start_cli(
    root: Path, first: datetime, last: datetime, *, fault: str | None = None, skip: int = 0
) -> subprocess.Popen[bytes]:
    """Start ``python -m profile_engine run-hours FIRST LAST`` in a subprocess over lake ``root``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROFILE_ENGINE_")}
    env.update(
        PROFILE_ENGINE_LAKE=str(root),
        PROFILE_ENGINE_BUCKETS=str(SETTINGS.buckets),
        PROFILE_ENGINE_LATENESS_HOURS=str(SETTINGS.lateness_hours),
        PROFILE_ENGINE_START=format_hour(WARM),
    )
    if fault:
        env.update(PROFILE_ENGINE_FAULT=fault, PROFILE_ENGINE_FAULT_SKIP=str(skip))
    args = [sys.executable, "-m", "profile_engine", "run-hours", format_hour(first), format_hour(last)]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_cli(root: Path, first: datetime, last: datetime, *, fault: str | None = None, skip: int = 0) -> int:
    """Run ``start_cli`` to its end; its exit code."""
    process = start_cli(root, first, last, fault=fault, skip=skip)
    process.communicate(timeout=300)
    return process.returncode


@pytest.fixture(scope="session")
def base_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Landing for WARM..LAST+1, the warm-up day, and hours H0..LAST-1 processed in order."""
    root = tmp_path_factory.mktemp("base") / "lake"
    simulate(Lake(root), WARM, LAST + timedelta(hours=1), users=100, seed=3, intensity=4.0)
    runner.warm_up(settings_for(root), WARM, H0 - timedelta(hours=1))
    runner.run_hours(settings_for(root), H0, LAST - timedelta(hours=1), build_docs=False)
    return root


@pytest.fixture(scope="session")
def reference_lake(base_lake: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``base_lake`` plus hour LAST, uninterrupted: the 24 hours in order."""
    root = copy_lake(base_lake, tmp_path_factory.mktemp("reference") / "lake")
    runner.run_hour(settings_for(root), LAST)
    return root


@pytest.fixture(scope="session")
def reference_content(reference_lake: Path) -> dict[str, Any]:
    """``lakecheck.lake_content`` of the reference lake, computed once."""
    return lake_content(reference_lake)
