"""The in-process hour runner: the DAG's stages, in the DAG's order, without Airflow's per-run overhead.

Used by run-hours, replay, the demo's warm-up, rebuilds, reliability tests and benchmarks. docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from profile_engine.config import Settings
from profile_engine.contracts.stages import REPORT_STAGE, STAGES
from profile_engine.hours import format_hour, hour_range
from profile_engine.ingest import events as ingest
from profile_engine.lake import lock
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake
from profile_engine.model import promotion, scoring, training
from profile_engine.ops import report
from profile_engine.ops.progress import Progress
from profile_engine.profiles import build
from profile_engine.quality import suites as quality
from profile_engine.segments import publish as segments


def run_hour(
    settings: Settings,
    hour: datetime,
    *,
    first_hour: datetime | None = None,
    run_id: str | None = None,
    force_retrain: bool = False,
    force_promote: bool = False,
    dry_run: bool = False,
    build_docs: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Process one hour end to end; the run report is written even when a stage fails.

    ``on_stage`` is told each stage as it starts, e.g. ``check_quality (3/9)`` (progress output).
    """
    run_id = run_id or f"runner__{format_hour(hour)}"
    first_hour = first_hour or settings.start
    summaries: dict[str, Any] = {}

    def started(name: str) -> None:
        if on_stage is not None:
            on_stage(f"{name} ({STAGES.index(name) + 1}/{len(STAGES)})")

    def stage(name: str, call: Callable[[], Any]) -> Any:
        started(name)
        summaries[name] = call()
        return summaries[name]

    with lock.hold_lake(Lake(settings.lake), run_id):  # one writer at a time; stale _tmp/ cleaned on entry
        try:
            stage("extract_events", lambda: ingest.extract_events(settings, hour, run_id=run_id))
            try:
                validated = stage("validate_events", lambda: ingest.validate_events(settings, hour, run_id=run_id))
            except ingest.QuarantineThresholdExceeded as error:
                # As in the DAG: the hour's counts reach the report, and its staged batch is still checked.
                summaries["validate_events"] = {**error.summary, "status": "failed"}
                started("check_quality")
                summaries["check_quality"] = quality.check_staged_hour(
                    settings, hour, error.summary, run_id=run_id, build_docs=build_docs
                )
                raise
            stage(
                "check_quality",
                lambda: quality.check_staged_hour(settings, hour, validated, run_id=run_id, build_docs=build_docs),
            )
            stage(
                "build_profiles",
                lambda: [
                    build.build_profiles(settings, hour, b, run_id=run_id, first_hour=first_hour)
                    for b in range(settings.buckets)
                ],
            )
            stage("publish_profiles", lambda: build.publish_profiles(settings, hour, run_id=run_id))
            trained = stage(
                "train_challenger",
                lambda: training.train_challenger(settings, hour, run_id=run_id, force=force_retrain),
            )
            if trained.get("status") == "skipped":
                summaries["evaluate_and_promote"] = {"status": "skipped", "reason": "no challenger trained this hour"}
            else:
                stage(
                    "evaluate_and_promote",
                    lambda: promotion.evaluate_and_promote(settings, hour, run_id=run_id, force_promote=force_promote),
                )
            stage(
                "score_profiles",
                lambda: [scoring.score_profiles(settings, hour, b, run_id=run_id) for b in range(settings.buckets)],
            )
            stage("publish_segments", lambda: segments.publish_segments(settings, hour, run_id=run_id, dry_run=dry_run))
        finally:
            if on_stage is not None:
                on_stage(REPORT_STAGE)
            summaries[REPORT_STAGE] = report.write_run_report(settings, hour, summaries, run_id=run_id)
    return summaries


def run_hours(settings: Settings, first: datetime, last: datetime, **options: Any) -> list[dict[str, Any]]:
    """Process every hour from ``first`` to ``last`` in order."""
    return [run_hour(settings, hour, **options) for hour in hour_range(first, last)]


def _quality_check(settings: Settings, hour: datetime, run_id: str) -> Callable[[dict[str, Any], Any], dict[str, Any]]:
    """The quality suite and Data Docs over the batch ``validate_events`` has just staged (no re-read)."""

    def check(summary: dict[str, Any], staged: Any) -> dict[str, Any]:
        return quality.check_staged_hour(settings, hour, summary, run_id=run_id, staged=staged)

    return check


def warm_up(
    settings: Settings,
    first: datetime,
    last: datetime,
    *,
    run_id: str = "warm-up",
    snapshot_every: int = 24,
    quality_suite: bool = False,
    enforce_threshold: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Bulk path for history: extract and validate every hour, then build the state in large batches.

    Each hour is extracted and validated on its own (the ledger and staging are per
    processing hour) with the row rules only (``quality_suite`` adds the Great
    Expectations suite and Data Docs per hour); profiles are then built per bucket over
    the whole range at once and committed every ``snapshot_every`` hours and at
    ``last``, which gives the model past snapshots to learn from. With
    ``enforce_threshold=False`` (replays) quarantine-threshold breaches are listed
    under ``breaches`` (hour, source, counts and the hour's reasons) instead of
    stopping the run; the caller decides how to fail (``cli`` exits non-zero). ``progress``
    is told each hour, its stage and events read, then the bulk phases.
    """
    lake = Lake(settings.lake)
    totals = {"hours": 0, "files": 0, "read": 0, "staged": 0, "quarantined": 0, "erased": 0}
    reasons: dict[str, int] = {}
    breaches: list[dict[str, Any]] = []
    with lock.hold_lake(lake, run_id):
        for hour in hour_range(first, last):
            if progress is not None:
                progress.start_hour(hour)
                progress.stage("extract_events")
            extracted = ingest.extract_events(settings, hour, run_id=run_id)
            if progress is not None:
                progress.stage("validate_events")
            validated = ingest.validate_events(
                settings,
                hour,
                run_id=run_id,
                check_staged=_quality_check(settings, hour, run_id) if quality_suite else None,
                enforce_threshold=enforce_threshold,
            )
            totals["hours"] += 1
            totals["files"] += extracted["files"]
            for key in ("read", "staged", "quarantined", "erased"):
                totals[key] += validated[key]
            for reason, count in validated["reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + count
            breaches += [
                {
                    "hour": format_hour(hour),
                    "source": name,
                    **validated["sources"][name],
                    "reasons": validated["reasons"],
                }
                for name in validated["threshold_breaches"]
            ]
            if progress is not None:
                progress.hour_done(validated["read"])
        for bucket in range(settings.buckets):
            if progress is not None:
                progress.stage(f"build_profiles bucket {bucket + 1}/{settings.buckets}")
            build.build_profiles_range(
                settings, first, last, bucket, run_id=run_id, first_hour=first, snapshot_every=snapshot_every
            )
        snapshots = [h for h in hour_range(first, last) if lake.committed(lk.PROFILES, h, 0)]
        for number, hour in enumerate(snapshots, 1):
            if progress is not None:
                progress.stage(f"publish_profiles snapshot {number}/{len(snapshots)}")
            build.publish_profiles(settings, hour, run_id=run_id)
    return {**totals, "reasons": reasons, "breaches": breaches, "snapshots": [format_hour(h) for h in snapshots]}


def replay(
    settings: Settings,
    file: Path,
    mapping: str,
    *,
    quality_suite: bool = True,
    progress: Callable[[int], Progress] | None = None,
) -> dict[str, Any]:
    """Replay one event log: land it by event hour through its mapping, then process all its hours.

    ``mapping`` is a shipped mapping's name or a YAML path. The hours run through the
    same stage functions as the hourly DAG (``warm_up``: validation per hour, with the
    quality suite and Data Docs unless ``quality_suite`` is False, then profiles),
    and threshold breaches are listed under ``breaches``, not raised (every hour is
    processed; ``python -m profile_engine replay`` then exits non-zero). The lake is left so that the
    hourly DAG continues at ``next_hour`` (with ``PROFILE_ENGINE_START`` = ``first_hour``).
    ``progress``, given the number of hours once the file is landed, returns the progress to report to.
    """
    from profile_engine.sources import mappings as sources
    from profile_engine.sources import replay as source_replay

    plan = source_replay.land_for_replay(settings, file, sources.load_mapping(mapping, settings.lake))
    run_id = f"replay__{plan.source}__{format_hour(plan.first)}"
    processed = warm_up(
        settings,
        plan.first,
        plan.last,
        run_id=run_id,
        snapshot_every=24,
        quality_suite=quality_suite,
        enforce_threshold=False,
        progress=progress(len(list(hour_range(plan.first, plan.last)))) if progress is not None else None,
    )
    return {**plan.as_dict(), **processed, "next_hour": format_hour(plan.last + timedelta(hours=1))}
