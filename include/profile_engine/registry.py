"""The model registry: the promotion log and the champion it implies (DESIGN.md §5).

The log under ``_meta/promotions/`` is the commit point: one JSON entry per data
hour from which a version applies (``2026-11-01T05.json``). The champion for hour
H is the newest entry whose hour is at or before H, so a rerun of an old hour
scores with the model it used then, whatever was promoted later.
``models/champion.json`` mirrors the newest entry for people and dashboards; the
pipeline never reads it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from profile_engine.config import Settings
from profile_engine.hours import floor_hour, format_hour
from profile_engine.lake import MANIFEST, MODELS, PROMOTIONS, Lake, read_json, write_json

CHAMPION_FILE = "champion.json"
MODEL_FILE = "model.keras"
BASELINE_FILE = "baseline.keras"
VERSION_FORMAT = "v%Y%m%dT%H"
_ENTRY_FORMAT = "%Y-%m-%dT%H"
_VERSION_PATTERN = re.compile(r"^v\d{8}T\d{2}$")


def model_version(hour: datetime) -> str:
    """The version trained at ``hour``: ``v20261101T05``. A rerun of that hour reuses it."""
    return floor_hour(hour).strftime(VERSION_FORMAT)


def version_hour(version: str) -> datetime:
    """The training hour a version was derived from."""
    return datetime.strptime(version, VERSION_FORMAT).replace(tzinfo=UTC)


def model_dir_committed(settings: Settings, version: str) -> bool:
    """Whether ``models/<version>/`` was written completely."""
    return (Lake(settings.lake).path(MODELS, version) / MANIFEST).is_file()


def model_versions(settings: Settings) -> list[str]:
    """Every committed model version, oldest first."""
    root = Lake(settings.lake).path(MODELS)
    if not root.is_dir():
        return []
    names = (p.name for p in root.iterdir() if p.is_dir() and _VERSION_PATTERN.match(p.name))
    return sorted(v for v in names if model_dir_committed(settings, v))


def promotion_log(settings: Settings) -> list[dict[str, Any]]:
    """Every entry of the promotion log, oldest ``from_hour`` first."""
    root = Lake(settings.lake).path(PROMOTIONS)
    if not root.is_dir():
        return []
    entries = [read_json(p) for p in root.glob("*.json")]
    return sorted(entries, key=lambda e: datetime.fromisoformat(e["from_hour"]))


def champion_as_of(settings: Settings, hour: datetime) -> dict[str, Any] | None:
    """The log entry in force for ``hour`` (newest ``from_hour`` <= ``hour``), or None before any promotion."""
    hour = floor_hour(hour)
    valid = [e for e in promotion_log(settings) if datetime.fromisoformat(e["from_hour"]) <= hour]
    return valid[-1] if valid else None


def _record(settings: Settings, entry: dict[str, Any]) -> dict[str, Any]:
    """Write an entry (keeping any entry it replaces for the same hour) and refresh ``champion.json``."""
    lake = Lake(settings.lake)
    path = lake.path(PROMOTIONS, datetime.fromisoformat(entry["from_hour"]).strftime(_ENTRY_FORMAT) + ".json")
    if path.is_file():
        entry["replaces"] = read_json(path)
    write_json(path, entry)
    write_json(lake.path(MODELS, CHAMPION_FILE), promotion_log(settings)[-1])
    return entry


def _entry(
    settings: Settings,
    version: str,
    from_hour: datetime,
    *,
    forced: bool,
    reason: str,
    metrics: dict[str, Any] | None,
    run_id: str,
) -> dict[str, Any]:
    if not model_dir_committed(settings, version):
        raise FileNotFoundError(f"model {version} is not committed under {Lake(settings.lake).path(MODELS, version)}")
    return {
        "version": version,
        "from_hour": format_hour(from_hour),
        "forced": forced,
        "reason": reason,
        "metrics": metrics or {},
        "promoted_at": datetime.now(UTC).isoformat(),
        "run_id": run_id,
    }


def promote(
    settings: Settings,
    version: str,
    from_hour: datetime,
    *,
    forced: bool = False,
    reason: str = "",
    metrics: dict[str, Any] | None = None,
    run_id: str = "manual",
) -> dict[str, Any]:
    """Make ``version`` the champion from ``from_hour`` on; returns the log entry.

    ``forced`` records that the gate was overridden. Re-promoting at the same hour
    (a rerun) replaces that hour's entry and keeps the old one under ``replaces``.
    """
    entry = _entry(settings, version, from_hour, forced=forced, reason=reason, metrics=metrics, run_id=run_id)
    return _record(settings, entry)


def rollback(
    settings: Settings,
    from_hour: datetime,
    *,
    to_version: str | None = None,
    reason: str = "manual rollback",
    run_id: str = "manual",
) -> dict[str, Any]:
    """Return to an earlier champion from ``from_hour`` on, recorded as forced with ``rollback_of``.

    Without ``to_version``, the newest version promoted before ``from_hour`` other
    than the one in force comes back. Raises ``ValueError`` when there is nothing
    to go back to.
    """
    from_hour = floor_hour(from_hour)
    current = champion_as_of(settings, from_hour)
    if current is None:
        raise ValueError(f"no champion in force at {format_hour(from_hour)}: nothing to roll back")
    if to_version is None:
        earlier = [
            e
            for e in promotion_log(settings)
            if datetime.fromisoformat(e["from_hour"]) < from_hour and e["version"] != current["version"]
        ]
        if not earlier:
            raise ValueError(f"no earlier champion than {current['version']} to roll back to")
        to_version = str(earlier[-1]["version"])
    if to_version == current["version"]:
        raise ValueError(f"{to_version} is already the champion at {format_hour(from_hour)}")
    entry = _entry(
        settings,
        to_version,
        from_hour,
        forced=True,
        reason=f"rollback from {current['version']}: {reason}",
        metrics=None,
        run_id=run_id,
    )
    entry["rollback_of"] = current["version"]
    return _record(settings, entry)


def newest_model_at_or_before(settings: Settings, hour: datetime) -> str | None:
    """The newest committed version trained at or before ``hour`` (its baseline scores before any promotion)."""
    hour = floor_hour(hour)
    versions = [v for v in model_versions(settings) if version_hour(v) <= hour]
    return versions[-1] if versions else None
