"""Kill an hour at every fault point, rerun it, and compare the lake with an uninterrupted run's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from profile_engine.lake import faults
from profile_engine.lake import storage as lk
from profile_engine.lake.lock import read_owner
from profile_engine.lake.storage import Lake
from profile_engine.ops import runner

from .conftest import LAST, copy_lake, settings_for, start_cli
from .lakecheck import differences, lake_content, partial_partitions

# (point, hits to let pass): the same point is also hit later in the hour where that matters.
CASES = [
    (faults.LEDGER_UPDATE, 0),
    (faults.JSON_BEFORE_RENAME, 0),  # the ledger's own JSON
    (faults.TMP_BEFORE_RENAME, 0),  # the first staging partition
    (faults.TMP_BEFORE_RENAME, 6),  # a later partition: state/profiles of a bucket
    (faults.BETWEEN_BUILD_BUCKETS, 0),
    (faults.BETWEEN_SCORE_BUCKETS, 0),
    (faults.EXPORTS_BEFORE_ASSET, 0),
]


@pytest.fixture(scope="module")
def killed_lakes(base_lake: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], tuple[Path, int]]:
    """For every case, a copy of the lake before the last hour in which that hour was killed at the point.

    The subprocesses run two at a time (the machine's cores); each returns its lake and exit code.
    """
    results: dict[tuple[str, int], tuple[Path, int]] = {}
    pending = list(CASES)
    while pending:
        batch, pending = pending[:2], pending[2:]
        started = []
        for point, skip in batch:
            root = copy_lake(base_lake, tmp_path_factory.mktemp(f"{point}-{skip}") / "lake")
            started.append(((point, skip), root, start_cli(root, LAST, LAST, fault=point, skip=skip)))
        for case, root, process in started:
            process.communicate(timeout=300)
            results[case] = (root, process.returncode)
    return results


def test_every_fault_point_is_covered() -> None:
    from .test_commit import COMMIT_POINTS, HOUR_CASES

    tested = (
        {point for point, _ in CASES}
        | {faults.MODEL_BEFORE_PROMOTION}
        | set(COMMIT_POINTS)
        | {point for point, _ in HOUR_CASES}
    )
    assert tested == set(faults.POINTS)


@pytest.mark.parametrize(("point", "skip"), CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_killed_hour_reruns_to_the_uninterrupted_result(
    point: str, skip: int, killed_lakes: dict[tuple[str, int], tuple[Path, int]], reference_content: dict[str, Any]
) -> None:
    # Arrange + act 1: the last hour died at the fault point (``killed_lakes``).
    root, code = killed_lakes[(point, skip)]

    # Assert 1: it died there, holding the lock, with every committed partition whole.
    assert code == faults.EXIT_CODE
    assert read_owner(Lake(root)) is not None, "the killed run held the lake lock"
    assert partial_partitions(root) == []

    # Act 2: rerun the hour without the fault.
    runner.run_hour(settings_for(root), LAST, build_docs=False)

    # Assert 2: same content as the uninterrupted run, nothing partial, no leftovers, lock free.
    assert differences(lake_content(root), reference_content) == []
    assert partial_partitions(root) == []
    tmp = root / lk.TMP
    assert not tmp.exists() or list(tmp.iterdir()) == []
    assert read_owner(Lake(root)) is None
