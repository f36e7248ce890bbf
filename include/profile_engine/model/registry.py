"""The model registry: the promotion log and the champion it implies, the decision log, the model directory's
file names and kinds. docs/model.md (Registry).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from profile_engine.config import Settings
from profile_engine.hours import HOUR, floor_hour, format_hour, parse_hour
from profile_engine.lake import faults
from profile_engine.lake.storage import MANIFEST, MODELS, PROFILES, PROMOTIONS, Lake, read_json, write_json

CHAMPION_FILE = "champion.json"
MODEL_FILE = "model.keras"
BASELINE_FILE = "baseline.keras"
METRICS_FILE = "metrics.json"
EVALUATION_FILE = "evaluation.json"
CARD_FILE = "model_card.md"
DECISIONS = PROMOTIONS + "/decisions"
CLI_RUN_ID = "cli"
VERSION_FORMAT = "v%Y%m%dT%H"
_ENTRY_FORMAT = "%Y-%m-%dT%H"
_VERSION_PATTERN = re.compile(r"^v\d{8}T\d{2}$")
# The behaviour-sequence encoder over the users' last events, alone and with the aggregate inputs
# (``profile_engine.model.sequence``; trained when ``Settings.sequence_candidates`` is on).
SEQUENCE_KINDS: tuple[str, ...] = ("sequence", "combined")
# What a version can score with (``artifacts.load_model``'s kinds), in the gate's order of preference: the
# ensemble of the network and the trees (on real logs level with or ahead of both its members on every metric,
# docs/model.md), the network, gradient-boosted trees, the sequence kinds (they cost a TensorFlow import and a
# staging read at scoring), the baseline. The network alone wins when it beats the ensemble by more than the margin.
MODEL_KINDS: tuple[str, ...] = ("ensemble", "model", "lightgbm", *SEQUENCE_KINDS, "baseline")


def kind_label(version: str, kind: str) -> str:
    """``model_version`` of a version's ``kind``: the version for the network, else ``<version>-<kind>``."""
    return version if kind == "model" else f"{version}-{kind}"


def label_version(label: str) -> str:
    """The version a ``kind_label`` names (``<version>-ensemble`` -> ``<version>``); other text as it is."""
    for kind in MODEL_KINDS:
        if kind != "model" and label.endswith(f"-{kind}"):
            return label.removesuffix(f"-{kind}")
    return label


def model_version(hour: datetime) -> str:
    """The version trained at ``hour``: ``v20261101T05``. A rerun of that hour reuses it."""
    return floor_hour(hour).strftime(VERSION_FORMAT)


def sequence_file_names(kind: str) -> tuple[str, str]:
    """``(network, metadata)`` file names of a sequence kind in a model version directory."""
    return f"{kind}.keras", f"{kind}.json"


def update_model_dir(settings: Settings, version: str, updates: Mapping[str, bytes]) -> None:
    """Rewrite ``models/<version>/`` atomically with files added or replaced."""
    lake = Lake(settings.lake)
    directory = lake.path(MODELS, version)
    manifest = read_json(directory / MANIFEST)
    names = [f["name"] for f in manifest.pop("files")]
    files = [(n, (directory / n).read_bytes()) for n in names if n not in updates] + list(updates.items())
    lake.write_dir(directory, files, manifest)


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


def entry_kind(entry: dict[str, Any]) -> str:
    """Which of the version's scorers a promotion log entry promoted (``MODEL_KINDS``).

    Entries written before the gate chose among candidates promoted the network (``model``).
    """
    return str(entry.get("kind") or "model")


def evaluated_candidate(evaluation: dict[str, Any]) -> str:
    """The scorer an ``evaluation.json`` is about: the promoted candidate, else the one the card compares
    (``chosen``); evaluations written before candidates named the network ``challenger``."""
    return str(evaluation.get("chosen") or "challenger")


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
    decision: dict[str, Any] | None = None,
    kind: str = "model",
) -> dict[str, Any]:
    if not model_dir_committed(settings, version):
        raise FileNotFoundError(f"model {version} is not committed under {Lake(settings.lake).path(MODELS, version)}")
    return {
        "version": version,
        "kind": kind,
        "from_hour": format_hour(from_hour),
        "forced": forced,
        "reason": reason,
        "metrics": metrics or {},
        "decision": decision,
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
    decision: dict[str, Any] | None = None,
    run_id: str = "manual",
    kind: str = "model",
) -> dict[str, Any]:
    """Make ``version`` the champion from ``from_hour`` on; returns the log entry.

    ``kind`` is the version's scorer that becomes the champion (``model`` = the network,
    ``ensemble``, ``lightgbm``, ``baseline``, ...). ``forced`` records that the gate was overridden; ``decision``
    is the gate's verdict with its checks. Re-promoting at the same hour (a rerun) replaces
    that hour's entry and keeps the old one under ``replaces``.
    """
    entry = _entry(
        settings,
        version,
        from_hour,
        forced=forced,
        reason=reason,
        metrics=metrics,
        run_id=run_id,
        decision=decision,
        kind=kind,
    )
    faults.maybe_fail(faults.MODEL_BEFORE_PROMOTION)
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
    # The kind it was promoted as (its newest entry before from_hour), the network when it never was.
    before = [
        e
        for e in promotion_log(settings)
        if e["version"] == to_version and datetime.fromisoformat(e["from_hour"]) < from_hour
    ]
    entry = _entry(
        settings,
        to_version,
        from_hour,
        forced=True,
        reason=f"rollback from {current['version']}: {reason}",
        metrics=None,
        run_id=run_id,
        kind=entry_kind(before[-1]) if before else "model",
    )
    entry["rollback_of"] = current["version"]
    return _record(settings, entry)


def newest_model_at_or_before(settings: Settings, hour: datetime) -> str | None:
    """The newest committed version trained at or before ``hour`` (its baseline scores before any promotion)."""
    hour = floor_hour(hour)
    versions = [v for v in model_versions(settings) if version_hour(v) <= hour]
    return versions[-1] if versions else None


# ---- the decision log ----------------------------------------------------------------------------------------------
def record_decision(
    settings: Settings,
    version: str,
    hour: datetime,
    *,
    promoted: bool,
    forced: bool,
    reason: str,
    reference: str,
    decision: dict[str, Any],
    run_id: str = "manual",
) -> dict[str, Any]:
    """Keep the gate's verdict on ``version`` (promoted or not) in ``_meta/promotions/decisions/``.

    One entry per training hour: a rerun replaces it. ``champion_as_of`` never reads
    this log; it is the record of why a challenger was or was not promoted.
    """
    entry = {
        "version": version,
        "hour": format_hour(hour),
        "promoted": promoted,
        "forced": forced,
        "reason": reason,
        "reference": reference,
        "decision": decision,
        "decided_at": datetime.now(UTC).isoformat(),
        "run_id": run_id,
    }
    write_json(Lake(settings.lake).path(DECISIONS, floor_hour(hour).strftime(_ENTRY_FORMAT) + ".json"), entry)
    return entry


def decision_log(settings: Settings) -> list[dict[str, Any]]:
    """Every gate decision, oldest training hour first."""
    root = Lake(settings.lake).path(DECISIONS)
    if not root.is_dir():
        return []
    return sorted((read_json(p) for p in root.glob("*.json")), key=lambda e: datetime.fromisoformat(e["hour"]))


# ---- operating the registry by hand (python -m profile_engine models ...) ----------------------------------------
def next_unprocessed_hour(settings: Settings) -> datetime:
    """The hour after the newest committed profile snapshot (``profiles/current``): where manual changes apply.

    Before any snapshot, ``PROFILE_ENGINE_START``; raises ``ValueError`` when neither exists.
    """
    pointer = Lake(settings.lake).path(PROFILES, "current")
    if pointer.is_file():
        return parse_hour(read_json(pointer)["hour"]) + HOUR
    if settings.start is not None:
        return floor_hour(settings.start)
    raise ValueError(f"no committed profile snapshot under {pointer.parent} and no PROFILE_ENGINE_START")


def _model_file(settings: Settings, version: str, name: str) -> dict[str, Any] | None:
    path = Lake(settings.lake).path(MODELS, version, name)
    return read_json(path) if path.is_file() else None


def list_models(settings: Settings) -> list[dict[str, Any]]:
    """One row per committed version: training hour, evaluation metrics, gate decision and champion status.

    ``champion`` says whether the version scores the next unprocessed hour.
    """
    try:
        upcoming: datetime | None = next_unprocessed_hour(settings)
    except ValueError:
        upcoming = None
    current = champion_as_of(settings, upcoming) if upcoming is not None else None
    promoted_from: dict[str, list[str]] = {}
    for entry in promotion_log(settings):
        promoted_from.setdefault(entry["version"], []).append(entry["from_hour"])
    rows = []
    for version in model_versions(settings):
        evaluation = _model_file(settings, version, EVALUATION_FILE)
        metrics = _model_file(settings, version, METRICS_FILE) or {}
        challenger = (
            evaluation["metrics"][evaluated_candidate(evaluation)]
            if evaluation
            else metrics.get("eval", {}).get("model", {})
        )
        rows.append(
            {
                "version": version,
                "candidate": evaluated_candidate(evaluation) if evaluation else None,
                "trained_hour": format_hour(version_hour(version)),
                "auc": challenger.get("auc"),
                "lift_at_10": challenger.get("lift_at_10"),
                "ece": challenger.get("ece"),
                "decision": None
                if evaluation is None
                else ("promoted" if evaluation["promoted"] else "rejected")
                + (" (forced)" if evaluation["forced"] else ""),
                "promoted_from": promoted_from.get(version, []),
                "champion": current is not None and current["version"] == version,
            }
        )
    return rows


def show_model(settings: Settings, version: str) -> dict[str, Any]:
    """Everything the registry knows about ``version``: manifest, metrics, evaluation, promotions, card path."""
    if not model_dir_committed(settings, version):
        raise FileNotFoundError(f"model {version} is not committed under {Lake(settings.lake).path(MODELS, version)}")
    directory = Lake(settings.lake).path(MODELS, version)
    manifest = read_json(directory / MANIFEST)
    evaluation = _model_file(settings, version, EVALUATION_FILE)
    return {
        "version": version,
        "directory": str(directory),
        "training": manifest.get("training"),
        "files": [f["name"] for f in manifest.get("files", [])],
        "metrics": _model_file(settings, version, METRICS_FILE),
        "evaluation": None
        if evaluation is None
        else {
            k: evaluation.get(k)
            for k in ("reference", "candidates", "chosen", "metrics", "intervals", "decision", "promoted", "forced")
        },
        "promotions": [e for e in promotion_log(settings) if e["version"] == version],
        "decisions": [e for e in decision_log(settings) if e["version"] == version],
        "card": str(directory / CARD_FILE),
    }


def promote_manually(settings: Settings, version: str, *, reason: str = "manual promotion") -> dict[str, Any]:
    """Promote ``version`` from the next unprocessed hour on, recorded as forced (no gate ran at that hour).

    The entry keeps the gate decision the version got when it was evaluated, if any.
    """
    from_hour = next_unprocessed_hour(settings)
    current = champion_as_of(settings, from_hour)
    if current is not None and current["version"] == version:
        raise ValueError(f"{version} is already the champion at {format_hour(from_hour)}")
    evaluation = _model_file(settings, version, EVALUATION_FILE) if model_dir_committed(settings, version) else None
    # The candidate its gate chose (or would have compared), the network for versions never evaluated.
    kinds = {c["name"]: c["kind"] for c in (evaluation or {}).get("candidates") or []}
    return promote(
        settings,
        version,
        from_hour,
        forced=True,
        reason=f"manual promotion (CLI): {reason}",
        metrics=evaluation["metrics"][evaluated_candidate(evaluation)] if evaluation else None,
        decision=evaluation["decision"] if evaluation else None,
        run_id=CLI_RUN_ID,
        kind=kinds.get(evaluated_candidate(evaluation), "model") if evaluation else "model",
    )


def rollback_manually(
    settings: Settings, *, to_version: str | None = None, reason: str = "manual rollback"
) -> dict[str, Any]:
    """Roll back from the next unprocessed hour on (``rollback`` with the CLI's run id)."""
    return rollback(
        settings, next_unprocessed_hour(settings), to_version=to_version, reason=f"(CLI) {reason}", run_id=CLI_RUN_ID
    )
