"""The lake lock (``profile_engine.lake.lock``) and the ``_tmp/`` cleanup that runs when it is taken."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from profile_engine.config import Settings
from profile_engine.hours import format_hour
from profile_engine.lake import lock
from profile_engine.lake import storage as lk
from profile_engine.lake.lock import LakeLocked, LockOwner
from profile_engine.lake.storage import Lake, clean_tmp_leftovers, tmp_name
from profile_engine.ops import runner
from profile_engine.profiles.state import MissingStateError


def _dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    return int(process.stdout)


def _plant(lake: Lake, owner: LockOwner) -> None:
    lock.lock_path(lake).parent.mkdir(parents=True, exist_ok=True)
    lock.lock_path(lake).write_text(json.dumps(asdict(owner)))


def test_second_run_is_refused_naming_the_owner(tmp_path: Path) -> None:
    # Arrange
    lake = Lake(tmp_path)
    with lock.hold_lake(lake, "run-a"):
        # Act / Assert: another run (a live process here: this one under another id) cannot take it.
        _plant(
            lake, replace(lock.read_owner(lake) or LockOwner.mine("x", "process", timedelta(hours=1)), run_id="run-a")
        )
        with pytest.raises(LakeLocked, match="run-a"):
            lock.acquire(lake, "run-b", scope="run")
    # Assert: released in finally.
    assert lock.read_owner(lake) is None


def test_hold_is_reentrant_and_released_after_an_error(tmp_path: Path) -> None:
    # Arrange
    lake = Lake(tmp_path)

    # Act
    with pytest.raises(RuntimeError, match="boom"), lock.hold_lake(lake, "run-a") as outer:
        with lock.hold_lake(lake, "run-a") as inner:
            assert inner.token == outer.token
        assert lock.read_owner(lake) == outer  # the inner block did not release it
        raise RuntimeError("boom")

    # Assert
    assert not lock.lock_path(lake).exists()


def test_expired_lock_is_taken_over_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Arrange: a run-scoped lock (no pid check) that expired a minute ago.
    lake = Lake(tmp_path)
    past = datetime.now(UTC) - timedelta(hours=3)
    _plant(lake, LockOwner.mine("crashed-run", "run", timedelta(hours=3) - timedelta(minutes=1), now=past))

    # Act
    with caplog.at_level(logging.WARNING, logger="profile_engine.lake.lock"):
        owner, new = lock.acquire(lake, "next-run")

    # Assert
    assert new and owner.run_id == "next-run" and lock.read_owner(lake) == owner
    assert "took over stale lock of crashed-run" in caplog.text and "expired" in caplog.text


def test_unexpired_run_lock_of_another_run_holds(tmp_path: Path) -> None:
    # Arrange: a DAG run holds the lake (its task processes come and go; only expiry frees it).
    lake = Lake(tmp_path)
    _plant(lake, replace(LockOwner.mine("dag-run", "run", timedelta(hours=1)), pid=_dead_pid()))

    # Act / Assert
    with pytest.raises(LakeLocked, match="dag-run"):
        lock.acquire(lake, "runner__x")


def test_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    # Arrange: a runner process crashed an hour into a two-hour lock.
    lake = Lake(tmp_path)
    _plant(lake, replace(LockOwner.mine("runner__crashed", "process", timedelta(hours=2)), pid=_dead_pid()))

    # Act
    owner, new = lock.acquire(lake, "runner__next")

    # Assert
    assert new and lock.read_owner(lake) == owner


def test_unreadable_lock_waits_for_its_grace_then_goes(tmp_path: Path) -> None:
    # Arrange: a crash between creating the lock file and writing its owner.
    lake = Lake(tmp_path)
    path = lock.lock_path(lake)
    path.parent.mkdir(parents=True)
    path.write_text("")

    # Act / Assert: fresh, it is respected; a minute later it is taken over.
    with pytest.raises(LakeLocked, match="unreadable"):
        lock.acquire(lake, "run-a")
    old = time.time() - 120
    os.utime(path, (old, old))
    owner, new = lock.acquire(lake, "run-a")
    assert new and lock.read_owner(lake) == owner


def test_tasks_of_one_dag_run_share_the_lock_until_the_last_releases_it(tmp_path: Path) -> None:
    # Arrange
    settings = Settings(lake=tmp_path)
    lake = Lake(tmp_path)

    # Act
    first = lock.join_run(settings, "scheduled__05")
    joined = lock.join_run(settings, "scheduled__05")  # a mapped bucket task, another process in Airflow
    with pytest.raises(LakeLocked, match="scheduled__05"):
        lock.join_run(settings, "scheduled__06")
    released_by_other = lock.release_run(settings, "scheduled__06")
    released = lock.release_run(settings, "scheduled__05")

    # Assert
    assert first["new"] and not joined["new"] and joined["expires_at"] >= first["expires_at"]
    assert not released_by_other and released and lock.read_owner(lake) is None


def _contend(
    root: str, run_id: str, barrier: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue[str]
) -> None:
    barrier.wait()
    try:
        lock.acquire(Lake(Path(root)), run_id)
        out.put(run_id)
    except LakeLocked:
        out.put("")
    time.sleep(0.5)  # stay alive, so the winner's lock is not stale while the others look


def test_only_one_of_racing_processes_gets_the_lock(tmp_path: Path) -> None:
    # Arrange
    context = multiprocessing.get_context("fork")
    barrier, out = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_contend, args=(str(tmp_path), f"run-{i}", barrier, out)) for i in range(4)]

    # Act
    for worker in workers:
        worker.start()
    results = [out.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)

    # Assert
    winners = [r for r in results if r]
    assert len(winners) == 1 and lock.read_owner(Lake(tmp_path)).run_id == winners[0]  # type: ignore[union-attr]


@hsettings(max_examples=25, deadline=None)
@given(ages=st.lists(st.integers(min_value=0, max_value=20 * 3600), min_size=1, max_size=6), dead=st.booleans())
def test_cleanup_removes_only_dead_or_old_entries(
    ages: list[int], dead: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Arrange: entries of a crashed (dead) or live (this) process, of various ages, plus untagged ones.
    lake = Lake(tmp_path_factory.mktemp("tmp"))
    pid = _dead_pid() if dead else os.getpid()
    now = time.time()
    expected_kept = set()
    for i, age in enumerate(ages):
        for name in (tmp_name().replace(f".{os.getpid()}.", f".{pid}."), f"untagged-{i}"):
            entry = lake.path(lk.TMP, name)
            entry.mkdir(parents=True)
            (entry / "part-0.parquet").write_bytes(b"x")
            os.utime(entry, (now - age, now - age))
            if age <= lk.TMP_MAX_AGE_SECONDS and not (dead and name != f"untagged-{i}"):
                expected_kept.add(name)

    # Act
    removed = clean_tmp_leftovers(lake)

    # Assert
    assert {p.name for p in lake.path(lk.TMP).iterdir()} == expected_kept
    assert len(removed) == 2 * len(ages) - len(expected_kept)


def test_runner_refuses_a_locked_lake_and_writes_nothing(settings: Settings) -> None:
    # Arrange
    lake = Lake(settings.lake)
    hour = settings.start
    assert hour is not None
    _plant(lake, LockOwner.mine("scheduled__other", "run", timedelta(hours=1)))

    # Act / Assert
    with pytest.raises(LakeLocked, match="scheduled__other"):
        runner.run_hour(settings, hour)
    assert not lake.path(lk.LEDGER).exists() and not lake.path(lk.REPORTS).exists()


def test_runner_names_the_missing_previous_hour_and_frees_the_lock(settings: Settings) -> None:
    # Arrange: hour start+2 runs but start+1 was never processed.
    assert settings.start is not None
    hour = settings.start + timedelta(hours=2)
    leftover = Lake(settings.lake).path(lk.TMP, tmp_name().replace(f".{os.getpid()}.", f".{_dead_pid()}."))
    leftover.mkdir(parents=True)

    # Act / Assert
    with pytest.raises(MissingStateError, match=re.escape(format_hour(hour - timedelta(hours=1)))):
        runner.run_hour(settings, hour, build_docs=False)
    assert lock.read_owner(Lake(settings.lake)) is None
    assert not leftover.exists(), "the run cleaned the crashed writer's _tmp/ leftover first"


def test_cli_shows_a_stale_lock_and_releases_it_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange: a DAG run died before its report; its lock has expired.
    from profile_engine.cli import main

    lake = Lake(tmp_path)
    past = datetime.now(UTC) - timedelta(hours=3)
    _plant(lake, LockOwner.mine("scheduled__dead", "run", timedelta(hours=1), now=past))
    monkeypatch.setenv("PROFILE_ENGINE_LAKE", str(tmp_path))

    # Act
    shown = main(["lock"])
    first = json.loads(capsys.readouterr().out)
    released = main(["lock", "--force-release"])
    second = json.loads(capsys.readouterr().out)

    # Assert
    assert shown == released == 0
    assert first["held"] and first["stale"] and first["owner"]["run_id"] == "scheduled__dead" and not first["released"]
    assert second["released"] and lock.read_owner(lake) is None and not lock.lock_path(lake).exists()
