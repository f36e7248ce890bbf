"""The in-process hour runner: stages in the DAG's order, a report even when a stage fails, warm-up totals."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from profile_engine.config import Settings
from profile_engine.contracts.stages import REPORT_STAGE, STAGES
from profile_engine.hours import HOUR
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake, read_json
from profile_engine.ops import runner
from profile_engine.ops.progress import Progress
from profile_engine.profiles.state import MissingStateError
from profile_engine.sources.simulate import simulate
from tests.conftest import HOUR0

HOURS = 3


@pytest.fixture(scope="module")
def landed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Landing files of a small shop for HOUR0..HOUR0+2 (nothing processed)."""
    root = tmp_path_factory.mktemp("runner") / "lake"
    simulate(Lake(root), HOUR0, HOUR0 + (HOURS - 1) * HOUR, users=60, seed=4, intensity=4.0)
    return root


@pytest.fixture
def settings(landed: Path, tmp_path: Path) -> Settings:
    """Settings over a private copy of the landed shop."""
    import shutil

    root = tmp_path / "lake"
    shutil.copytree(landed, root, symlinks=True)
    return Settings(lake=root, buckets=2, lateness_hours=6, start=HOUR0, quarantine_min_rows=10_000)


def test_a_failed_stage_still_writes_the_report_and_stops_the_hour(settings: Settings) -> None:
    # Arrange: the second hour without the first: build_profiles has no previous state
    second = HOUR0 + HOUR
    told: list[str] = []

    # Act
    with pytest.raises(MissingStateError, match="first"):
        runner.run_hour(settings, second, build_docs=False, on_stage=told.append)

    # Assert: the stages ran in the DAG's order up to the failure, then the report was written
    report = read_json(Lake(settings.lake).partition(lk.REPORTS, second) / "report.json")
    assert report["status"] == "failed"
    assert report["incomplete_stages"][0] == "build_profiles"
    assert set(report["stages"]) == set(STAGES)
    names = [t.split(" (")[0] for t in told]
    assert names == [*STAGES[: STAGES.index("build_profiles") + 1], REPORT_STAGE]
    assert told[0] == f"extract_events (1/{len(STAGES)})"


def test_a_whole_hour_runs_every_stage_and_reports_success(settings: Settings) -> None:
    told: list[str] = []

    summaries = runner.run_hour(settings, HOUR0, build_docs=False, on_stage=told.append)

    headline = summaries[REPORT_STAGE]
    assert headline["status"] == "success", headline
    trained = summaries["train_challenger"].get("status") != "skipped"
    expected = [s for s in STAGES if s != "evaluate_and_promote" or trained]
    assert [t.split(" (")[0] for t in told] == [*expected, REPORT_STAGE]
    assert headline["rows_read"] == headline["staged"] + headline["quarantined"] + headline["erased"]


def test_warm_up_counts_add_up_and_reach_the_progress(settings: Settings) -> None:
    stream = io.StringIO()
    progress = Progress("warm-up", HOURS, stream=stream, tty=False, every=0.0)

    result = runner.warm_up(settings, HOUR0, HOUR0 + (HOURS - 1) * HOUR, snapshot_every=1, progress=progress)

    assert result["hours"] == HOURS
    assert result["read"] > 0
    assert result["read"] == result["staged"] + result["quarantined"] + result["erased"]
    assert sum(result["reasons"].values()) == result["quarantined"]
    assert result["files"] == sum(
        1 for p in Lake(settings.lake).path(lk.LANDING).rglob("*") if p.is_file() and not p.name.startswith(("_", "."))
    )
    assert result["snapshots"] and result["breaches"] == []
    lines = stream.getvalue().splitlines()
    assert f"[warm-up] {HOURS}/{HOURS} hours | {result['read']:,} events" in "\n".join(lines)
    assert any("build_profiles bucket 2/2" in line for line in lines)
    assert progress.done == HOURS and progress.events == result["read"]
