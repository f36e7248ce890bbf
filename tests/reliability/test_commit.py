"""A partition commit killed at any rename or delete leaves the old or the new partition, never neither.

``lake.replace_dir`` moves the committed partition aside and the new one in. Each test
kills a writer process at one step of that commit, then takes the lake lock as the next
run does, and checks that the partition is whole and holds the old or the new rows.
The hour-level tests kill a rerun of a committed hour and let the next run finish.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from profile_engine.lake import faults, lock
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake

from .conftest import LAST, copy_lake, start_cli
from .lakecheck import committed_partitions, differences, lake_content, partial_partitions

HOUR = datetime(2026, 11, 3, 5, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]
HOUR_STEP = timedelta(hours=1)

# A writer that commits ``staging/events`` bucket 0 of HOUR with one row ``value``. With
# ``die-at-new-rename`` it dies (like a kill) just before the new partition is renamed in,
# whatever code is around that rename.
WRITER = textwrap.dedent(
    """
    import os, sys
    from datetime import datetime, UTC
    from pathlib import Path
    import pyarrow as pa
    from profile_engine.lake import storage as lk

    root, value, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    lake = lk.Lake(root)
    hour = datetime(2026, 11, 3, 5, tzinfo=UTC)
    target = lake.partition(lk.STAGING, hour, 0)
    if mode == "die-at-new-rename":
        real = os.replace
        def replace(src, dst):
            if Path(dst) == target:
                os._exit(86)
            real(src, dst)
        os.replace = replace
    lake.write_partition(lk.STAGING, hour, pa.table({"v": [value]}), bucket=0)
    """
)

# Every point of a commit: before it starts, the journal's own rename, and after each
# rename and delete of ``replace_dir``.
COMMIT_POINTS = [
    faults.TMP_BEFORE_RENAME,
    faults.JSON_BEFORE_RENAME,
    faults.COMMIT_JOURNALED,
    faults.COMMIT_MOVED_ASIDE,
    faults.COMMIT_RENAMED,
    faults.COMMIT_OLD_DELETED,
]


def _write(root: Path, value: str, mode: str = "-", fault: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROFILE_ENGINE_")}
    env["PYTHONPATH"] = str(ROOT / "include")
    if fault:
        env[faults.FAULT_ENV] = fault
    done = subprocess.run(
        [sys.executable, "-c", WRITER, str(root), value, mode], env=env, capture_output=True, timeout=120
    )
    return done.returncode


def _rows(lake: Lake) -> list[Any]:
    return lake.read(lk.STAGING, HOUR, 0).column("v").to_pylist()


def _journals(lake: Lake) -> list[str]:
    folder = lake.path(lk.COMMITS)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _tmp(lake: Lake) -> list[str]:
    folder = lake.path(lk.TMP)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _next_run(lake: Lake) -> None:
    """What the next run does first: take the lake lock (and release it)."""
    with lock.hold_lake(lake, "next"):
        pass


def test_a_writer_killed_between_the_two_renames_loses_nothing(tmp_path: Path) -> None:
    # Arrange: "old" is committed; the writer of "new" dies after moving "old" aside.
    lake = Lake(tmp_path)
    assert _write(tmp_path, "old") == 0

    # Act
    code = _write(tmp_path, "new", "die-at-new-rename")
    _next_run(lake)

    # Assert: the partition is back, whole, with the old or the new rows; nothing left behind.
    assert code == faults.EXIT_CODE
    assert lake.committed(lk.STAGING, HOUR, 0), "the next run left the partition missing"
    assert _rows(lake) in (["old"], ["new"])
    assert partial_partitions(tmp_path) == []
    assert _tmp(lake) == [] and _journals(lake) == []


@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_a_commit_killed_at_any_rename_or_delete_leaves_the_old_or_the_new_partition(
    point: str, tmp_path: Path
) -> None:
    # Arrange
    lake = Lake(tmp_path)
    assert _write(tmp_path, "old") == 0

    # Act: killed at the point, then the next run takes the lock, then it commits again.
    code = _write(tmp_path, "new", fault=point)
    _next_run(lake)
    after_recovery = _rows(lake) if lake.committed(lk.STAGING, HOUR, 0) else None
    leftovers = (_tmp(lake), _journals(lake), partial_partitions(tmp_path))
    assert _write(tmp_path, "newer") == 0

    # Assert
    assert code == faults.EXIT_CODE, f"the writer was not killed at {point}"
    assert after_recovery in (["old"], ["new"])
    assert leftovers == ([], [], [])
    assert _rows(lake) == ["newer"] and _tmp(lake) == [] and _journals(lake) == []


def test_cleanup_never_deletes_a_moved_aside_copy_and_an_unjournaled_one_is_restored(tmp_path: Path) -> None:
    # Arrange: a committed partition moved aside by a crashed writer of an older version
    # (no journal), tagged with a dead process, older than the cleanup's age limit.
    lake = Lake(tmp_path)
    assert _write(tmp_path, "old") == 0
    target = lake.partition(lk.STAGING, HOUR, 0)
    aside = lake.path(lk.TMP, lk.tmp_name("old-").replace(f".{os.getpid()}.", ".999999999."))
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(target, aside)
    past = (datetime.now(UTC) - timedelta(days=2)).timestamp()
    os.utime(aside, (past, past))

    # Act
    removed = lk.clean_tmp_leftovers(lake)
    still_there = aside.is_dir()
    _next_run(lake)

    # Assert
    assert removed == [] and still_there
    assert _rows(lake) == ["old"] and _tmp(lake) == []


def test_an_unjournaled_copy_of_a_replaced_partition_goes(tmp_path: Path) -> None:
    # Arrange: an older version crashed after its second rename: target committed, old copy aside.
    lake = Lake(tmp_path)
    assert _write(tmp_path, "old") == 0
    aside = lake.path(lk.TMP, lk.tmp_name("old-").replace(f".{os.getpid()}.", ".999999999."))
    shutil.copytree(lake.partition(lk.STAGING, HOUR, 0), aside)
    assert _write(tmp_path, "new") == 0

    # Act
    _next_run(lake)

    # Assert
    assert _rows(lake) == ["new"] and _tmp(lake) == []


# ---- a whole hour: a rerun of a committed hour killed at each commit point, then the next run


HOUR_CASES = [
    (faults.COMMIT_JOURNALED, 0),  # the first staging bucket of the rerun hour
    (faults.COMMIT_MOVED_ASIDE, 0),
    (faults.COMMIT_MOVED_ASIDE, 5),  # a later partition of the hour
    (faults.COMMIT_RENAMED, 0),
    (faults.COMMIT_OLD_DELETED, 0),
]


@pytest.fixture(scope="module")
def killed_reruns(base_lake: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Any]:
    """Per case: (lake, exit code, committed partitions before) after a rerun of LAST-1 died at the point."""
    results: dict[tuple[str, int], Any] = {}
    pending = list(HOUR_CASES)
    while pending:
        batch, pending = pending[:2], pending[2:]
        started = []
        for point, skip in batch:
            root = copy_lake(base_lake, tmp_path_factory.mktemp(f"commit-{point}-{skip}") / "lake")
            before = [p.relative_to(root) for p in committed_partitions(root)]
            started.append(
                (
                    (point, skip),
                    root,
                    before,
                    start_cli(root, LAST - HOUR_STEP, LAST - HOUR_STEP, fault=point, skip=skip),
                )
            )
        for case, root, before, process in started:
            process.communicate(timeout=300)
            results[case] = (root, process.returncode, before)
    return results


@pytest.mark.parametrize(("point", "skip"), HOUR_CASES, ids=[f"{p}-{s}" for p, s in HOUR_CASES])
def test_a_rerun_killed_in_a_commit_is_finished_by_the_next_run(
    point: str, skip: int, killed_reruns: dict[tuple[str, int], Any], reference_content: dict[str, Any]
) -> None:
    # Arrange: the rerun of LAST-1 died in a commit (``killed_reruns``).
    root, code, before = killed_reruns[(point, skip)]
    assert code == faults.EXIT_CODE

    # Act 1: the next run takes the lock.
    _next_run(Lake(root))

    # Assert 1: every partition committed before is committed and whole (old or new), nothing left over.
    now = {p.relative_to(root) for p in committed_partitions(root)}
    # A rebuilt bucket withdraws its hour's snapshot marker (profiles/dt=/hour=/_manifest.json,
    # build._write_hour) on purpose until publish_profiles runs again: not a lost commit.
    lost = {p for p in set(before) - now if not (p.parts[0] == lk.PROFILES and not p.name.startswith("bucket="))}
    assert lost == set(), f"partitions lost: {sorted(lost)}"
    assert partial_partitions(root) == []
    assert _tmp(Lake(root)) == [] and _journals(Lake(root)) == []

    # Act 2: the next run reruns LAST-1 and runs LAST, through the command line.
    process = start_cli(root, LAST - HOUR_STEP, LAST)
    _, stderr = process.communicate(timeout=300)

    # Assert 2: it exits 0 and the lake equals the uninterrupted 24 hours.
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert differences(lake_content(root), reference_content) == []
    assert partial_partitions(root) == []
    assert _tmp(Lake(root)) == [] and _journals(Lake(root)) == []
