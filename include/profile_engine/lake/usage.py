"""The lake's size by dataset and its newest committed hours (``python -m profile_engine status``).

Every file is counted once, so the datasets add up to the lake; docs/operations.md ("Lake size").
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from profile_engine.hours import MS_HOUR, format_hour
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import MANIFEST, Lake, partition_hours
from profile_engine.lake.tiles import newest_sealed_ms

# The datasets reported, named once in storage; a file belongs to the longest that prefixes
# its path, anything else to its top-level folder (e.g. ``outbox``).
DATASETS: tuple[str, ...] = (
    *lk.HOURLY_LAYERS[: lk.HOURLY_LAYERS.index(lk.STATE) + 1],
    lk.STATE_TILES,  # the state's sealed tiles, listed beside it (not partitioned by hour: retention drops days)
    *lk.HOURLY_LAYERS[lk.HOURLY_LAYERS.index(lk.STATE) + 1 :],
    lk.MODELS,
    lk.TRAINING,
    lk.META,
    lk.TMP,
)
ROOT_FILES = "(lake root)"


def human_size(size: int) -> str:
    """``size`` bytes as ``858.2 MB`` (powers of 1000)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def newest_committed_hour(lake: Lake, layer: str) -> datetime | None:
    """The newest ``dt=/hour=`` partition of ``layer`` with a manifest (of the hour or of a bucket).

    Landing files carry no manifest: there, the newest arrival folder that holds a file. State tiles
    (``state_tiles/bucket=N/<table>/dt=/``) are not partitioned by hour: there, the newest hour whose
    build sealed tiles (``tiles.newest_sealed_ms``).
    """
    if layer == lk.STATE_TILES:
        end = newest_sealed_ms(lake.path(layer))
        return None if end is None else datetime.fromtimestamp((end - MS_HOUR) / 1000, UTC)
    for hour, path in sorted(partition_hours(lake.path(layer)).items(), reverse=True):
        if layer == lk.LANDING:
            if any(p.is_file() for p in path.rglob("*")):
                return hour
        elif (path / MANIFEST).is_file() or any(path.glob(f"bucket=*/{MANIFEST}")):
            return hour
    return None


def lake_usage(lake: Lake, *, buckets: int) -> dict[str, Any]:
    """Bytes, files and newest committed hour per dataset (non-empty ones), the total, and the lake's newest hour.

    ``newest_committed_hour`` is the newest hour whose staged events are committed in
    every one of the ``buckets`` (what ingest has finished); each dataset's ``newest_hour``
    says how far the later stages got. Sizes are apparent file sizes (``st_size``).
    """
    by_length = sorted(DATASETS, key=len, reverse=True)
    totals: dict[str, list[int]] = {}
    for folder, _dirs, names in os.walk(lake.root):
        relative = os.path.relpath(folder, lake.root).replace(os.sep, "/")
        relative = "" if relative == "." else relative + "/"
        for name in names:
            path = relative + name
            dataset = next((d for d in by_length if path.startswith(d + "/")), None)
            if dataset is None:
                dataset = path.split("/", 1)[0] if "/" in path else ROOT_FILES
            try:
                size = os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                continue  # removed while walking (a commit or a cleanup)
            entry = totals.setdefault(dataset, [0, 0])
            entry[0] += size
            entry[1] += 1
    order = [d for d in DATASETS if d in totals] + sorted(d for d in totals if d not in DATASETS)
    datasets: dict[str, dict[str, Any]] = {}
    for name in order:
        size, files = totals[name]
        newest = newest_committed_hour(lake, name) if name in DATASETS else None
        datasets[name] = {
            "bytes": size,
            "files": files,
            "size": human_size(size),
            "newest_hour": format_hour(newest) if newest is not None else None,
        }
    total = sum(t[0] for t in totals.values())
    staged = sorted(partition_hours(lake.path(lk.STAGING)), reverse=True)
    newest_all = next((h for h in staged if all(lake.committed(lk.STAGING, h, b) for b in range(buckets))), None)
    return {
        "lake": str(lake.root),
        "datasets": datasets,
        "total": {"bytes": total, "files": sum(t[1] for t in totals.values()), "size": human_size(total)},
        "newest_committed_hour": format_hour(newest_all) if newest_all is not None else None,
    }
