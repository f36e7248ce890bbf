"""Retention: delete hour partitions older than ``PROFILE_ENGINE_RETENTION_DAYS``, keeping the rebuild checkpoint;
prune Data Docs of passed hours older than ``PROFILE_ENGINE_DATA_DOCS_KEEP_HOURS``.

docs/reliability.md, "Retention"; docs/quality.md.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from profile_engine.config import Settings
from profile_engine.hours import HOUR, floor_hour, format_hour, parse_hour
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import MANIFEST, Lake, partition_hours

OUTBOX = "outbox"
RETENTION_FILE = "retention.json"


def rebuild_checkpoint(settings: Settings, before: datetime) -> datetime | None:
    """The newest hour before ``before`` whose state is committed in every bucket (None: no such hour)."""
    lake = Lake(settings.lake)
    hours = sorted((h for h in partition_hours(lake.path(lk.STATE)) if h < before), reverse=True)
    return next((h for h in hours if all(lake.committed(lk.STATE, h, b) for b in range(settings.buckets))), None)


def _check_window(settings: Settings) -> None:
    from profile_engine.ingest.events import LISTING_MARGIN_HOURS

    needed = settings.lateness_hours + LISTING_MARGIN_HOURS + 1
    if settings.retention_days * 24 <= needed:
        raise ValueError(
            f"PROFILE_ENGINE_RETENTION_DAYS={settings.retention_days} keeps less than the {needed} hours the hourly "
            f"run still reads (PROFILE_ENGINE_LATENESS_HOURS={settings.lateness_hours} + {LISTING_MARGIN_HOURS} "
            "listing margin): landing files would be taken twice"
        )


def _remove(lake: Lake, path: Path) -> None:
    """Remove a partition whole: rename it into ``_tmp/`` (atomic), then delete it; drop an emptied ``dt=``."""
    aside = lake.root / lk.TMP / lk.tmp_name("del-")  # not "old-": this copy is meant to go
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)
    day = path.parent
    if day.name.startswith("dt=") and not any(day.iterdir()):
        day.rmdir()


def _summary(hours: list[datetime]) -> dict[str, Any]:
    return {"partitions": len(hours), "oldest": format_hour(min(hours)), "newest": format_hour(max(hours))}


def apply_retention(settings: Settings, now_hour: datetime, *, dry_run: bool = False) -> dict[str, Any]:
    """Delete hour partitions older than ``settings.retention_days`` before ``now_hour`` (see the module docstring).

    Returns what was deleted (``dry_run``: what would be) per dataset, the kept rebuild
    checkpoint and the training sets removed with the models marked not re-evaluable.
    Runs under the lake lock (``lock.LakeLocked`` while an hourly run holds it).
    """
    from profile_engine.lake import lock
    from profile_engine.model.registry import model_dir_committed, version_hour
    from profile_engine.quality.datadocs import prune_data_docs
    from profile_engine.segments.delivery import outbox_root

    _check_window(settings)
    lake = Lake(settings.lake)
    now_hour = floor_hour(now_hour)
    cut = now_hour - timedelta(days=settings.retention_days)
    # A dry run only lists: it need not wait for the running hour.
    guard = nullcontext() if dry_run else lock.hold_lake(lake, f"retention__{format_hour(now_hour)}")
    with guard:
        checkpoint = rebuild_checkpoint(settings, cut)
        plan: dict[str, list[tuple[datetime, Path]]] = {}
        for layer in lk.HOURLY_LAYERS:
            hours = partition_hours(lake.path(layer))
            if layer == lk.STAGING:
                limit = checkpoint + HOUR if checkpoint is not None else None
            elif layer == lk.STATE:
                limit = checkpoint
            else:
                limit = cut
            plan[layer] = sorted((h, p) for h, p in hours.items() if limit is not None and h < min(limit, cut))
        if checkpoint is not None:  # sealed tiles only the states before the checkpoint read
            from profile_engine.profiles.build import expired_tile_days

            plan[lk.STATE_TILES] = sorted(
                (parse_hour(f"{day.name.removeprefix('dt=')}T00"), day)
                for bucket in range(settings.buckets)
                for day in expired_tile_days(lake, bucket, checkpoint + HOUR, settings)
            )
        outbox = outbox_root(settings)
        plan[OUTBOX] = sorted((h, p) for h, p in partition_hours(outbox).items() if h < cut)
        training: list[str] = []
        training_root = lake.path(lk.TRAINING)
        if training_root.is_dir():
            for directory in sorted(training_root.iterdir()):
                try:
                    trained = version_hour(directory.name)
                except ValueError:
                    continue
                if trained < cut:
                    training.append(directory.name)
        marked: list[str] = []
        if not dry_run:
            outbox_lake = Lake(outbox)
            for layer, partitions in plan.items():
                for _hour, path in partitions:
                    _remove(outbox_lake if layer == OUTBOX else lake, path)
            for version in training:
                _remove(lake, training_root / version)
                if model_dir_committed(settings, version):
                    _mark_not_re_evaluable(settings, version, cut)
                    marked.append(version)
        # Data Docs of passing hours older than the kept window (those before the cut are gone above).
        docs_pruned = [h for h in prune_data_docs(settings, now_hour, dry_run=dry_run) if h >= format_hour(cut)]
    return {
        "now_hour": format_hour(now_hour),
        "retention_days": settings.retention_days,
        "cut": format_hour(cut),
        "dry_run": dry_run,
        "rebuild_checkpoint": format_hour(checkpoint) if checkpoint is not None else None,
        "deleted": {layer: _summary([h for h, _ in parts]) for layer, parts in plan.items() if parts},
        "training_sets": training,
        "models_marked_not_re_evaluable": marked,
        "data_docs_pruned": docs_pruned,
        "note": None
        if checkpoint is not None
        else "no state checkpoint before the cut: staging and state kept so a full rebuild still works",
    }


def _mark_not_re_evaluable(settings: Settings, version: str, cut: datetime) -> None:
    """Record in ``models/<version>/`` that its training set is gone (``retention.json`` and the card)."""
    from profile_engine.model.registry import CARD_FILE, update_model_dir

    directory = Lake(settings.lake).path(lk.MODELS, version)
    if (directory / RETENTION_FILE).is_file():
        return
    reason = (
        f"training set training/{version}/ deleted by retention on {datetime.now(UTC).date().isoformat()} "
        f"(older than {settings.retention_days} days, before {format_hour(cut)}); the model still scores, "
        "its recorded metrics and card stay valid, but it cannot be re-evaluated or retrained on the same rows"
    )
    record = {"re_evaluable": False, "reason": reason, "cut": format_hour(cut)}
    updates = {RETENTION_FILE: json.dumps(record, indent=2, sort_keys=True).encode()}
    card = directory / CARD_FILE
    if card.is_file():
        updates[CARD_FILE] = card.read_bytes() + f"\n\n## Retention\n\nNot re-evaluable: {reason}.\n".encode()
    update_model_dir(settings, version, updates)


def re_evaluable(settings: Settings, version: str) -> dict[str, Any]:
    """Whether ``version`` can still be re-evaluated (its training set exists), and why not."""
    directory = Lake(settings.lake).path(lk.MODELS, version)
    record = directory / RETENTION_FILE
    if record.is_file():
        data: dict[str, Any] = json.loads(record.read_text())
        return data
    present = (Lake(settings.lake).path(lk.TRAINING, version) / MANIFEST).is_file()
    return {"re_evaluable": present, "reason": None if present else f"no training set training/{version}/"}


def run_retention(settings: Settings, *, dry_run: bool = False) -> dict[str, Any]:
    """``apply_retention`` for the current hour (the command line and the DAG)."""
    return apply_retention(settings, floor_hour(datetime.now(UTC)), dry_run=dry_run)
