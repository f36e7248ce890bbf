"""Tests for profile_engine.model.registry: the promotion log, champion as of an hour, promotions and rollbacks."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from profile_engine.config import Settings
from profile_engine.hours import HOUR, format_hour
from profile_engine.lake.storage import MODELS, PROMOTIONS, Lake, read_json
from profile_engine.model import registry

T0 = datetime(2026, 11, 1, 5, tzinfo=UTC)


def committed_versions(settings: Settings, *hours: datetime) -> list[str]:
    """Committed (manifest-bearing) model directories for the given training hours."""
    lake = Lake(settings.lake)
    versions = []
    for hour in hours:
        version = registry.model_version(hour)
        lake.write_dir(lake.path(MODELS, version), [(registry.MODEL_FILE, b"weights")], {"version": version})
        versions.append(version)
    return versions


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)))
def test_version_round_trips_to_its_training_hour(moment: datetime) -> None:
    hour = moment.replace(minute=0, second=0, microsecond=0, tzinfo=UTC)

    version = registry.model_version(hour)

    assert registry.version_hour(version) == hour
    assert version == hour.strftime("v%Y%m%dT%H")


def test_champion_as_of_an_old_hour_survives_a_later_promotion(tmp_path: Path) -> None:
    # Arrange
    settings = Settings(lake=tmp_path)
    first, second = committed_versions(settings, T0, T0 + 24 * HOUR)
    registry.promote(settings, first, T0, reason="gate passed")

    # Act
    registry.promote(settings, second, T0 + 24 * HOUR, reason="gate passed")

    # Assert
    assert registry.champion_as_of(settings, T0 - HOUR) is None
    assert registry.champion_as_of(settings, T0)["version"] == first  # type: ignore[index]
    assert registry.champion_as_of(settings, T0 + 23 * HOUR)["version"] == first  # type: ignore[index]
    assert registry.champion_as_of(settings, T0 + 24 * HOUR)["version"] == second  # type: ignore[index]
    assert (Lake(settings.lake).path(PROMOTIONS, "2026-11-02T05.json")).is_file()


def test_champion_json_mirrors_the_newest_entry_not_the_latest_write(tmp_path: Path) -> None:
    # Arrange
    settings = Settings(lake=tmp_path)
    first, second = committed_versions(settings, T0, T0 + 24 * HOUR)
    registry.promote(settings, second, T0 + 24 * HOUR)

    # Act: a rerun of the older hour promotes again
    registry.promote(settings, first, T0)

    # Assert
    mirror = read_json(Lake(settings.lake).path(MODELS, registry.CHAMPION_FILE))
    assert mirror["version"] == second
    assert mirror["from_hour"] == format_hour(T0 + 24 * HOUR)


def test_repromoting_an_hour_keeps_the_replaced_entry(tmp_path: Path) -> None:
    settings = Settings(lake=tmp_path)
    (version,) = committed_versions(settings, T0)
    registry.promote(settings, version, T0, reason="first run")

    entry = registry.promote(settings, version, T0, forced=True, reason="rerun")

    assert entry["forced"] is True
    assert entry["replaces"]["reason"] == "first run"
    assert len(registry.promotion_log(settings)) == 1


def test_promoting_an_uncommitted_version_fails(tmp_path: Path) -> None:
    settings = Settings(lake=tmp_path)

    with pytest.raises(FileNotFoundError, match="v20261101T05"):
        registry.promote(settings, "v20261101T05", T0)


def test_rollback_restores_the_previous_champion_from_an_hour_on(tmp_path: Path) -> None:
    # Arrange
    settings = Settings(lake=tmp_path)
    first, second = committed_versions(settings, T0, T0 + 24 * HOUR)
    registry.promote(settings, first, T0)
    registry.promote(settings, second, T0 + 24 * HOUR)

    # Act
    entry = registry.rollback(settings, T0 + 30 * HOUR, reason="bad scores")

    # Assert
    assert entry["version"] == first and entry["forced"] is True and entry["rollback_of"] == second
    assert "bad scores" in entry["reason"]
    assert registry.champion_as_of(settings, T0 + 29 * HOUR)["version"] == second  # type: ignore[index]
    assert registry.champion_as_of(settings, T0 + 30 * HOUR)["version"] == first  # type: ignore[index]
    assert read_json(Lake(settings.lake).path(MODELS, registry.CHAMPION_FILE))["version"] == first


def test_rollback_needs_something_to_go_back_to(tmp_path: Path) -> None:
    settings = Settings(lake=tmp_path)
    (version,) = committed_versions(settings, T0)

    with pytest.raises(ValueError, match="nothing to roll back"):
        registry.rollback(settings, T0)
    registry.promote(settings, version, T0)
    with pytest.raises(ValueError, match="no earlier champion"):
        registry.rollback(settings, T0 + HOUR)


def test_newest_model_at_or_before_ignores_later_and_uncommitted_versions(tmp_path: Path) -> None:
    # Arrange
    settings = Settings(lake=tmp_path)
    first, _ = committed_versions(settings, T0, T0 + 24 * HOUR)
    (Lake(settings.lake).path(MODELS, registry.model_version(T0 + 2 * HOUR))).mkdir(parents=True)  # no manifest

    # Act / Assert
    assert registry.newest_model_at_or_before(settings, T0 - HOUR) is None
    assert registry.newest_model_at_or_before(settings, T0 + 23 * HOUR) == first
    assert registry.model_versions(settings) == [first, registry.model_version(T0 + 24 * HOUR)]


def test_manual_promotion_and_rollback_apply_from_the_next_unprocessed_hour(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: two versions, the first is champion, the newest committed snapshot is T0 + 30 h
    from profile_engine.cli import main
    from profile_engine.lake.storage import PROFILES, write_json

    settings = Settings(lake=tmp_path)
    first, second = committed_versions(settings, T0, T0 + 24 * HOUR)
    registry.promote(settings, first, T0, reason="gate passed")
    write_json(Lake(settings.lake).path(PROFILES, "current"), {"hour": format_hour(T0 + 30 * HOUR)})
    monkeypatch.setenv("PROFILE_ENGINE_LAKE", str(tmp_path))

    # Act
    promoted = registry.promote_manually(settings, second, reason="campaign test")
    listed = registry.list_models(settings)
    code = main(["models", "rollback", "--reason", "scores look off"])

    # Assert
    assert registry.next_unprocessed_hour(settings) == T0 + 31 * HOUR
    assert promoted["from_hour"] == format_hour(T0 + 31 * HOUR) and promoted["forced"] is True
    assert "campaign test" in promoted["reason"] and promoted["run_id"] == registry.CLI_RUN_ID
    assert [row["champion"] for row in listed] == [False, True]
    assert code == 0 and '"rollback_of"' in capsys.readouterr().out
    assert registry.champion_as_of(settings, T0 + 30 * HOUR)["version"] == first  # type: ignore[index]
    assert registry.champion_as_of(settings, T0 + 31 * HOUR)["version"] == first  # type: ignore[index]
    rollback = registry.promotion_log(settings)[-1]
    assert rollback["rollback_of"] == second and rollback["replaces"]["version"] == second
    assert main(["models", "show", "v20990101T00"]) == 1
    shown = registry.show_model(settings, first)
    assert [e["run_id"] for e in shown["promotions"]] == ["manual", registry.CLI_RUN_ID]


def test_decisions_are_logged_whether_promoted_or_not(tmp_path: Path) -> None:
    settings = Settings(lake=tmp_path)
    (version,) = committed_versions(settings, T0)

    registry.record_decision(
        settings, version, T0, promoted=False, forced=False, reason="gate failed", reference="baseline", decision={}
    )

    assert [d["promoted"] for d in registry.decision_log(settings)] == [False]
    assert registry.promotion_log(settings) == []
