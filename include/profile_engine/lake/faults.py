"""Fault injection: named points where a test makes the process die without cleanup (``PROFILE_ENGINE_FAULT``).

docs/reliability.md (3).
"""

from __future__ import annotations

import os
import sys

FAULT_ENV = "PROFILE_ENGINE_FAULT"
SKIP_ENV = "PROFILE_ENGINE_FAULT_SKIP"
EXIT_CODE = 86  # what a killed process exits with, so tests can tell a fault from a failure

# The points, defined once: name -> where it sits.
TMP_BEFORE_RENAME = "tmp_before_rename"
JSON_BEFORE_RENAME = "json_before_rename"
LEDGER_UPDATE = "ledger_update"
BETWEEN_BUILD_BUCKETS = "between_build_buckets"
BETWEEN_SCORE_BUCKETS = "between_score_buckets"
MODEL_BEFORE_PROMOTION = "model_before_promotion"
EXPORTS_BEFORE_ASSET = "exports_before_asset"
COMMIT_JOURNALED = "commit_journaled"
COMMIT_MOVED_ASIDE = "commit_moved_aside"
COMMIT_RENAMED = "commit_renamed"
COMMIT_OLD_DELETED = "commit_old_deleted"

POINTS: dict[str, str] = {
    TMP_BEFORE_RENAME: "lake.replace_dir: a partition is written whole under _tmp/, before its rename into place",
    JSON_BEFORE_RENAME: "lake.write_json: the temporary sibling file is written, before its rename",
    LEDGER_UPDATE: "ingest.extract_events: the hour's files are listed and hashed, before its ledger is written",
    BETWEEN_BUILD_BUCKETS: "build.build_profiles: a bucket's state and profiles are committed, before the next",
    BETWEEN_SCORE_BUCKETS: "model.score_profiles: a bucket's scores are committed, before the next",
    MODEL_BEFORE_PROMOTION: "registry.promote: the model version is saved, before the promotion log moves",
    EXPORTS_BEFORE_ASSET: "segments.publish_segments: exports are committed, before the Asset event",
    COMMIT_JOURNALED: "lake.replace_dir: the commit journal is written, before the old partition is moved aside",
    COMMIT_MOVED_ASIDE: "lake.replace_dir: the old partition is moved aside, before the new one is renamed in",
    COMMIT_RENAMED: "lake.replace_dir: the new partition is in place, before the old copy is deleted",
    COMMIT_OLD_DELETED: "lake.replace_dir: the old copy is deleted, before the commit journal is removed",
}

_hits: dict[str, int] = {}


def maybe_fail(point: str) -> None:
    """Kill the process here when ``PROFILE_ENGINE_FAULT`` names ``point`` (after the skipped hits)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or wanted != point:
        return
    if point not in POINTS:  # pragma: no cover - a typo in a call site is a programming error
        raise ValueError(f"unknown fault point {point!r}; known: {', '.join(sorted(POINTS))}")
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] > int(os.environ.get(SKIP_ENV) or 0):
        sys.stderr.write(f"profile_engine: fault injected at {point}\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)


def check_env() -> None:
    """Raise ``ValueError`` when ``PROFILE_ENGINE_FAULT`` names no known point (a typo would test nothing)."""
    wanted = os.environ.get(FAULT_ENV)
    if wanted and wanted not in POINTS:
        raise ValueError(f"{FAULT_ENV}={wanted!r} is no fault point; known: {', '.join(sorted(POINTS))}")
