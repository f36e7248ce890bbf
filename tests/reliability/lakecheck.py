"""Helpers of the reliability tests: a lake's committed content, and whether every committed partition is whole."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from profile_engine.lake import storage as lk

# Written per run with timings, paths and HTML (compared through the tables they summarise instead),
# and the simulator's truth (written by the simulator only).
NOT_COMPARED = (lk.REPORTS, lk.QUALITY_DOCS, lk.QUALITY_RESULTS, lk.TRUTH)
# Fields of JSON files that name the run or the wall-clock time, not the data.
VOLATILE = {"run_id", "written_at", "created_at", "promoted_at", "replaces"}


def committed_partitions(root: Path) -> list[Path]:
    """Every directory under ``root`` holding a ``_manifest.json``, outside ``_tmp/``."""
    return sorted(m.parent for m in root.rglob(lk.MANIFEST) if lk.TMP not in m.relative_to(root).parts)


def lake_content(root: Path) -> dict[str, Any]:
    """Sorted table content of every committed partition plus the ledger and promotion log (no run ids, no times)."""
    content: dict[str, Any] = {}
    for part in committed_partitions(root):
        relative = part.relative_to(root).as_posix()
        if relative.startswith(NOT_COMPARED):
            continue
        for file in sorted(part.glob("*.parquet")):
            rows = pq.read_table(file).to_pylist()
            content[f"{relative}/{file.name}"] = sorted(repr(sorted(row.items())) for row in rows)
        for file in sorted(part.glob("*.csv")):
            lines = file.read_text().splitlines()
            content[f"{relative}/{file.name}"] = lines[:1] + sorted(lines[1:])
    for folder in (lk.LEDGER, lk.PROMOTIONS):
        for file in sorted(root.joinpath(folder).rglob("*.json")):
            content[file.relative_to(root).as_posix()] = _stable(json.loads(file.read_text()))
    return content


def partial_partitions(root: Path) -> list[str]:
    """Committed partitions whose files do not match their manifest (missing, extra, wrong checksum or rows)."""
    bad = []
    for part in committed_partitions(root):
        manifest = json.loads((part / lk.MANIFEST).read_text())
        listed = {f["name"]: f for f in manifest.get("files", [])}
        present = {p.relative_to(part).as_posix() for p in part.rglob("*") if p.is_file() and _owner(p) == part}
        data = {n for n in present if n.endswith((".parquet", ".csv"))}
        if not listed.keys() >= data or not present >= listed.keys():
            bad.append(f"{part}: files {sorted(present)} != manifest {sorted(listed)}")
            continue
        for name, entry in listed.items():
            payload = (part / name).read_bytes()
            if hashlib.sha256(payload).hexdigest() != entry["sha256"]:
                bad.append(f"{part / name}: checksum differs from the manifest")
            elif (
                name.endswith(".parquet")
                and "rows" in entry
                and pq.read_metadata(part / name).num_rows != entry["rows"]
            ):
                bad.append(f"{part / name}: row count differs from the manifest")
    return bad


def differences(left: dict[str, Any], right: dict[str, Any]) -> list[str]:
    """Keys whose content differs (or exists on one side only), for readable assertion messages."""
    return sorted(k for k in left.keys() | right.keys() if left.get(k) != right.get(k))


def _owner(file: Path) -> Path | None:
    """The nearest directory above ``file`` with a manifest (the partition it belongs to)."""
    for parent in file.parents:
        if (parent / lk.MANIFEST).is_file() and parent / lk.MANIFEST != file:
            return parent
    return None


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value
