"""Retention (issue 9): old hours go, the rebuild checkpoint and the models stay usable.

A small shop runs hours H0..H0+3 through the hour runner; each test applies retention to
its own copy with a 2-day retention and a clock set so that the cut falls inside the run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from profile_engine.cli import main
from profile_engine.config import Settings
from profile_engine.lake import lock
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import MODELS, PROFILES, STAGING, STATE, TRAINING, Lake
from profile_engine.model import registry
from profile_engine.ops import retention, runner
from profile_engine.profiles.verify import verify_hour
from profile_engine.sources.simulate import simulate

from .reliability.lakecheck import partial_partitions

H0 = datetime(2026, 11, 3, 12, tzinfo=UTC)
HOURS = 4  # H0..H0+3 processed; landing exists for H0+4
BASE = Settings(buckets=2, lateness_hours=6, start=H0, retention_days=2)


def at(hours: int) -> datetime:
    """H0 plus ``hours``."""
    return H0 + timedelta(hours=hours)


def clock_for_cut(cut: datetime) -> datetime:
    """The ``now_hour`` whose 2-day retention cuts at ``cut``."""
    return cut + timedelta(days=BASE.retention_days)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Landing for H0..H0+4 and hours H0..H0+3 processed."""
    root = tmp_path_factory.mktemp("retention") / "lake"
    simulate(Lake(root), H0, at(HOURS), users=100, seed=5, intensity=4.0)
    runner.run_hours(replace(BASE, lake=root), H0, at(HOURS - 1), build_docs=False)
    return root


@pytest.fixture
def lake_copy(shop: Path, tmp_path: Path) -> Settings:
    """Settings over a private copy of the shop."""
    root = tmp_path / "lake"
    shutil.copytree(shop, root, symlinks=True)
    return replace(BASE, lake=root)


def hours_of(lake: Lake, layer: str) -> list[datetime]:
    """The hour partitions of ``layer``, oldest first."""
    return sorted(lk.partition_hours(lake.path(layer)))


def test_old_hours_go_and_verify_starts_from_the_kept_checkpoint(lake_copy: Settings) -> None:
    lake = Lake(lake_copy.lake)

    result = retention.apply_retention(lake_copy, clock_for_cut(at(2)))

    assert result["rebuild_checkpoint"] == at(1).isoformat()
    assert hours_of(lake, STAGING) == [at(2), at(3)]  # from the checkpoint's next hour
    assert hours_of(lake, STATE) == [at(1), at(2), at(3)]  # the checkpoint is kept
    assert hours_of(lake, PROFILES) == [at(2), at(3)]
    for layer in lk.HOURLY_LAYERS:
        if layer not in (STAGING, STATE):
            assert all(h >= at(2) for h in hours_of(lake, layer)), layer
    assert result["deleted"]["landing/events"]["partitions"] == 2
    assert partial_partitions(lake.root) == [] and not any(lake.path("_tmp").iterdir())
    # A full rebuild starts from the checkpoint and still equals the committed snapshot; the next hour runs.
    verified = verify_hour(lake_copy, at(3))
    assert verified.equal, verified.render()
    assert set(verified.rebuilt_from.values()) == {at(2).isoformat()}
    assert runner.run_hour(lake_copy, at(4), build_docs=False)["publish_profiles"]["profiles"] > 0


def test_dry_run_lists_the_same_and_deletes_nothing(lake_copy: Settings) -> None:
    before = sorted(p for p in lake_copy.lake.rglob("*"))

    listed = retention.apply_retention(lake_copy, clock_for_cut(at(2)), dry_run=True)

    assert sorted(p for p in lake_copy.lake.rglob("*")) == before
    deleted = retention.apply_retention(lake_copy, clock_for_cut(at(2)))
    assert listed["deleted"] == deleted["deleted"] and listed["dry_run"] and not deleted["dry_run"]


def test_without_a_checkpoint_before_the_cut_staging_and_state_are_kept(lake_copy: Settings) -> None:
    lake = Lake(lake_copy.lake)
    shutil.rmtree(lake.partition(STATE, at(0)))  # e.g. a warm-up that committed state only at its end

    result = retention.apply_retention(lake_copy, clock_for_cut(at(1)))

    assert result["rebuild_checkpoint"] is None and "kept" in result["note"]
    assert hours_of(lake, STAGING)[0] == at(0) and hours_of(lake, PROFILES)[0] == at(1)
    assert verify_hour(lake_copy, at(3)).equal


def test_models_whose_training_set_is_deleted_are_marked_not_re_evaluable(lake_copy: Settings) -> None:
    lake = Lake(lake_copy.lake)
    old, new = registry.model_version(at(0)), registry.model_version(at(3))
    for version in (old, new):
        lake.write_dir(lake.path(TRAINING, version), [("train.parquet", b"rows")], {"version": version})
        card = f"# Model {version}\n".encode()
        lake.write_dir(lake.path(MODELS, version), [(registry.CARD_FILE, card)], {"version": version})

    result = retention.apply_retention(lake_copy, clock_for_cut(at(2)))

    assert result["training_sets"] == [old] and result["models_marked_not_re_evaluable"] == [old]
    assert not lake.path(TRAINING, old).exists() and lake.path(TRAINING, new).exists()
    assert retention.re_evaluable(lake_copy, old)["re_evaluable"] is False
    assert "deleted by retention" in retention.re_evaluable(lake_copy, old)["reason"]
    assert retention.re_evaluable(lake_copy, new)["re_evaluable"] is True
    # The registry and the card keep working, and say why.
    shown = registry.show_model(lake_copy, old)
    assert retention.RETENTION_FILE in shown["files"]
    assert "Not re-evaluable" in Path(shown["card"]).read_text()
    assert old in [m["version"] for m in registry.list_models(lake_copy)]
    assert partial_partitions(lake.root) == []


def test_a_retention_shorter_than_the_ingestion_window_is_refused(lake_copy: Settings) -> None:
    short = replace(lake_copy, retention_days=1, lateness_hours=6)

    with pytest.raises(ValueError, match="PROFILE_ENGINE_RETENTION_DAYS=1"):
        retention.apply_retention(short, clock_for_cut(at(2)))


def test_a_locked_lake_is_not_touched(lake_copy: Settings) -> None:
    lake = Lake(lake_copy.lake)
    owner, _ = lock.acquire(lake, "scheduled__hourly", scope="run")

    with pytest.raises(lock.LakeLocked):
        retention.apply_retention(lake_copy, clock_for_cut(at(2)))

    lock.release(lake, owner)
    assert hours_of(lake, STAGING)[0] == at(0)


def test_cli_dry_run_prints_the_plan(
    lake_copy: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PROFILE_ENGINE_LAKE", str(lake_copy.lake))
    monkeypatch.setenv("PROFILE_ENGINE_BUCKETS", "2")
    monkeypatch.setenv("PROFILE_ENGINE_LATENESS_HOURS", "6")
    monkeypatch.setenv("PROFILE_ENGINE_RETENTION_DAYS", "2")
    before = sorted(p for p in lake_copy.lake.rglob("*"))

    code = main(["retention", "--dry-run"])

    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["dry_run"] is True and printed["retention_days"] == 2
    assert sorted(p for p in lake_copy.lake.rglob("*")) == before


def test_retention_prunes_the_data_docs_of_old_passing_hours_and_keeps_failed_ones(lake_copy: Settings) -> None:
    # Arrange: Data Docs sites for two retained hours; at(3) failed its quality suite.
    from profile_engine.quality.datadocs import PRUNED_FILE

    lake_copy = replace(lake_copy, data_docs_keep_hours=24)
    lake = Lake(lake_copy.lake)
    for hour in (at(2), at(3)):
        lake.write_dir(lake.partition(lk.QUALITY_DOCS, hour), [("index.html", b"<html>site</html>")], {})
    failed = lake.manifest(lk.QUALITY_RESULTS, at(3))
    results = lake.partition(lk.QUALITY_RESULTS, at(3))
    lake.write_dir(
        results,
        [("results.json", (results / "results.json").read_bytes())],
        {**failed, "summary": {**failed["summary"], "success": False}},
    )

    # Act
    listed = retention.apply_retention(lake_copy, clock_for_cut(at(2)), dry_run=True)
    untouched = not (lake.partition(lk.QUALITY_DOCS, at(2)) / PRUNED_FILE).exists()
    result = retention.apply_retention(lake_copy, clock_for_cut(at(2)))

    # Assert
    assert untouched and listed["data_docs_pruned"] == result["data_docs_pruned"] == [at(2).isoformat()]
    assert (lake.partition(lk.QUALITY_DOCS, at(2)) / PRUNED_FILE).is_file()
    assert (lake.partition(lk.QUALITY_DOCS, at(3)) / "index.html").read_bytes() == b"<html>site</html>"
