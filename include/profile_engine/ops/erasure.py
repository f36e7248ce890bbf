"""Erasure: remove users from every retained dataset and keep them out for ever (tombstones, audit log).

Runs under the lake lock; validation drops tombstoned users' rows (``privacy.tombstones``). docs/reliability.md, "Erasure".
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profile_engine.config import Settings
from profile_engine.contracts.profiles import CHANGE_NEW, LIFECYCLE_STAGE, RFM_SEGMENT, USER_ID
from profile_engine.contracts.segments import USER_KEY
from profile_engine.hours import HOUR, format_hour
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import MANIFEST, Lake, manifest_extra, read_json, replace_dir, write_json
from profile_engine.privacy.keys import ExportKeyError, export_key, pseudonymize
from profile_engine.privacy.tombstones import (
    ERASURE_DIR,
    audit_path,
    matching_key,
    read_tombstones,
    tombstones_path,
    user_hash,
    write_tombstones,
)
from profile_engine.segments.delivery import RECEIPT

if TYPE_CHECKING:
    pass

# Never rewritten: producers' input, work in progress, the lock, the erasure records themselves.
SKIPPED = (lk.LANDING.split("/")[0], lk.TMP, lk.LOCK, ERASURE_DIR)


def read_ids_file(path: Path) -> list[str]:
    """User ids from a text file: one per line; blank lines and ``#`` comments ignored."""
    ids = []
    for line in path.read_text().splitlines():
        text = line.strip()
        if text and not text.startswith("#"):
            ids.append(text)
    return ids


@dataclass
class _Eraser:
    """Rewrites one lake (or outbox) root without a set of users, counting what it removed.

    Only structured data is matched, and only in user-id fields: Parquet and CSV columns
    ``user_id`` (and ``user_key``, the export pseudonyms under the manifest's key), and
    records of JSON files with a ``user_id`` field. A value equal to an id is the only
    match; free text (Data Docs pages, run reports, ledgers, paths) is never searched,
    so an id such as ``12`` cannot touch an hour ``12`` or a count of 12.
    """

    lake: Lake
    ids: frozenset[str]
    pseudonyms: dict[str, dict[str, str]]  # export key fingerprint -> pseudonym -> user id
    removed: dict[str, Counter[str]] = field(default_factory=dict)  # user -> dataset -> rows
    files: int = 0
    partitions: int = 0
    notes: list[str] = field(default_factory=list)
    profile_hours: set[Path] = field(default_factory=set)
    bucket_hours: set[Path] = field(default_factory=set)  # hours of a layer written per bucket with a bucket rewritten
    segment_hours: set[datetime] = field(default_factory=set)  # hours whose segment or export counts may have changed
    label: str = ""  # dataset prefix of a root other than the lake (the outbox)

    def count(self, users: Iterable[str], dataset: str) -> None:
        for user in users:
            self.removed.setdefault(user, Counter())[dataset] += 1

    def dataset(self, path: Path) -> str:
        """The dataset a file belongs to: its path up to the first ``key=value`` part (``training``: the first part)."""
        parts = path.relative_to(self.lake.root).parts[:-1]
        cut = next((i for i, p in enumerate(parts) if "=" in p), len(parts))
        layer = "/".join(parts[:cut] if cut < len(parts) else parts[:1])
        return "/".join(p for p in (self.label, layer) if p) or path.name

    def id_column(self, names: Sequence[str], key_id: str | None, path: Path) -> tuple[str, dict[str, str]] | None:
        """The user-id column among ``names`` and its erased values (value -> user id), or None.

        ``user_id`` holds raw ids; ``user_key`` holds export pseudonyms, matched under the
        key ``key_id`` that made them (a note when that is not the current export key).
        """
        if USER_ID in names:
            return USER_ID, {i: i for i in self.ids}
        if USER_KEY in names:
            if key_id not in self.pseudonyms:
                self.notes.append(f"{path}: pseudonyms under key {key_id}, not the current export key: not matched")
                return None
            return USER_KEY, self.pseudonyms[key_id]
        return None

    # -- one file -------------------------------------------------------------------------
    def parquet(self, path: Path, key_id: str | None) -> pa.Table | None:
        """The table without the users' rows, or None when it has none of them."""
        found = self.id_column(pq.read_schema(path).names, key_id, path)
        if found is None:
            return None
        column, lookup = found
        probe = pq.read_table(path, columns=[column]).column(column)
        hit = pc.fill_null(pc.is_in(probe, value_set=pa.array(sorted(lookup), pa.string())), False)
        if not pc.any(hit).as_py():
            return None
        table = pq.read_table(path)
        self.count((lookup[v] for v in table.filter(hit).column(column).to_pylist()), self.dataset(path))
        return table.filter(pc.invert(hit))

    def csv_rows(self, path: Path, key_id: str | None) -> bytes | None:
        """A CSV with a user-id column (by its header), without the users' lines; None: no such column or no hit."""
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
        if not lines:
            return None
        found = self.id_column(next(csv.reader([lines[0]])), key_id, path)
        if found is None:
            return None
        column, lookup = found
        index = next(csv.reader([lines[0]])).index(column)
        kept, gone = [lines[0]], []
        for line in lines[1:]:
            row = next(csv.reader([line]), [])
            if len(row) > index and row[index] in lookup:
                gone.append(lookup[row[index]])
            else:
                kept.append(line)
        if not gone:
            return None
        self.count(gone, self.dataset(path))
        return "".join(kept).encode()

    def json_records(self, path: Path) -> bytes | None:
        """JSON (or JSON lines) without the users' records; None when no record names them.

        A record is an object with a ``user_id`` field equal to an erased id (a number
        counts as its decimal string); it goes whole, from whatever list holds it, or as its
        whole line in JSON lines. Nothing else is changed. A document that is itself such
        a record is left with a note (it is a file of the user's, not a list of records).
        """
        try:
            text = path.read_text()
            lines = path.suffix == ".jsonl"
            docs = [json.loads(x) for x in text.splitlines() if x.strip()] if lines else [json.loads(text)]
        except (UnicodeDecodeError, ValueError):
            return None
        gone: list[str] = []

        def owner(value: Any) -> str | None:
            if not isinstance(value, dict):
                return None
            user = value.get(USER_ID)
            if isinstance(user, int) and not isinstance(user, bool):
                user = str(user)
            return user if isinstance(user, str) and user in self.ids else None

        def keep(value: Any) -> Any:
            if isinstance(value, list):
                kept = []
                for item in value:
                    user = owner(item)
                    if user is None:
                        kept.append(keep(item))
                    else:
                        gone.append(user)
                return kept
            if isinstance(value, dict):
                return {k: keep(v) for k, v in value.items()}
            return value

        if lines:
            cleaned = keep(docs)
        else:
            if owner(docs[0]) is not None:
                self.notes.append(f"{path}: the whole document is a record of an erased user: not rewritten")
                return None
            cleaned = [keep(docs[0])]
        if not gone:
            return None
        self.count(gone, self.dataset(path))
        if lines:
            return "".join(json.dumps(line, sort_keys=True) + "\n" for line in cleaned).encode()
        return json.dumps(cleaned[0], indent=2, sort_keys=True, default=str).encode()

    def structured(self, path: Path, key_id: str | None) -> bytes | None:
        """The new content of a CSV or JSON file without the users, or None (no user-id field, no hit, other format)."""
        suffix = path.suffix.lower()
        if suffix == ".csv":
            return self.csv_rows(path, key_id)
        if suffix in (".json", ".jsonl"):
            return self.json_records(path)
        return None

    # -- one committed partition ----------------------------------------------------------
    def partition(self, directory: Path, manifest: dict[str, Any]) -> None:
        """Rewrite a committed partition without the users, whole, its manifest updated."""
        key_id = manifest.get("key_id")
        new: dict[str, bytes] = {}
        tables: dict[str, pa.Table] = {}
        for entry in manifest["files"]:
            path = directory / entry["name"]
            if not path.is_file():
                continue
            if path.suffix == ".parquet":
                table = self.parquet(path, key_id)
                if table is not None:
                    tables[entry["name"]] = table
                    new[entry["name"]] = _parquet_bytes(table, path)
            else:
                sibling = entry["name"].removesuffix(".csv") + ".parquet"
                if path.suffix == ".csv" and any(f["name"] == sibling for f in manifest["files"]):
                    continue  # regenerated from its Parquet twin below
                payload = self.structured(path, key_id)
                if payload is not None:
                    new[entry["name"]] = payload
        for name, table in tables.items():
            twin = name.removesuffix(".parquet") + ".csv"
            if (directory / twin).is_file():
                import pyarrow.csv as pacsv

                sink = io.BytesIO()
                pacsv.write_csv(table, sink)
                new[twin] = sink.getvalue()
        if not new:
            return
        rows = manifest.get("rows")
        for entry in manifest["files"]:
            if entry["name"] not in new:
                continue
            payload = new[entry["name"]]
            entry["sha256"] = hashlib.sha256(payload).hexdigest()
            if "bytes" in entry:
                entry["bytes"] = len(payload)
            if entry["name"] in tables:
                n = tables[entry["name"]].num_rows
                if "rows" in entry:
                    entry["rows"] = n
                stem = entry["name"].removesuffix(".parquet")
                if isinstance(rows, dict) and stem in rows:
                    rows[stem] = n
                elif isinstance(rows, int) and len(manifest["files"]) == 1:
                    manifest["rows"] = n
        manifest["erased_at"] = datetime.now(UTC).isoformat()
        tmp = self.lake.tmp_dir()
        shutil.copytree(directory, tmp, dirs_exist_ok=True)
        for name, payload in new.items():
            (tmp / name).write_bytes(payload)
        write_json(tmp / MANIFEST, manifest)
        receipt = tmp / RECEIPT
        if receipt.is_file():  # an outbox delivery: its receipt names the content it holds
            from profile_engine.segments.delivery import export_digest

            write_json(receipt, {**read_json(receipt), "digest": export_digest(manifest), "rows": manifest.get("rows")})
        replace_dir(tmp, directory, self.lake)
        self.partitions += 1
        self.files += len(new)
        layer = directory.relative_to(self.lake.root).parts[0]
        if layer in (lk.SEGMENTS, lk.EXPORTS) and isinstance(manifest.get("data_hour"), str):
            hour = datetime.fromisoformat(manifest["data_hour"])
            # the next hour's stability counts this hour's members (exited, stayed)
            self.segment_hours |= {hour, hour + HOUR} if layer == lk.SEGMENTS else {hour}
        if directory.name.startswith("bucket="):
            self.bucket_hours.add(directory.parent)
            if directory.relative_to(self.lake.root).parts[:1] == (lk.PROFILES,):
                self.profile_hours.add(directory.parent)

    # -- a loose file (no manifest) -------------------------------------------------------
    def loose(self, path: Path) -> None:
        if path.suffix == ".parquet":
            table = self.parquet(path, None)
            payload = None if table is None else _parquet_bytes(table, path)
        else:
            payload = self.structured(path, None)
        if payload is None:
            return
        tmp = self.lake.tmp_dir()
        (tmp / path.name).write_bytes(payload)
        (tmp / path.name).chmod(path.stat().st_mode & 0o777)
        os.replace(tmp / path.name, path)
        tmp.rmdir()
        self.files += 1

    # -- the whole root -------------------------------------------------------------------
    def run(self) -> None:
        root = self.lake.root
        if not root.is_dir():
            return
        covered: set[Path] = set()
        for path in sorted(root.rglob(MANIFEST)):
            if self.skipped(path):
                continue
            manifest = read_json(path)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
                continue
            covered.add(path.parent)
            self.partition(path.parent, manifest)
        for path in sorted(root.rglob("*")):
            inside = any(p in covered for p in path.parents)
            if path.is_file() and path.name != MANIFEST and not self.skipped(path) and not inside:
                self.loose(path)
        for hour_dir in sorted(self.bucket_hours):
            self.recount(hour_dir)
        for hour_dir in sorted(self.profile_hours):
            self.republish(hour_dir)
        for hour in sorted(self.segment_hours):  # after republish: share checks read the snapshot
            self.restate_segments(hour)

    def skipped(self, path: Path) -> bool:
        relative = path.relative_to(self.lake.root).as_posix()
        return any(relative == s or relative.startswith(s + "/") for s in SKIPPED)

    def recount(self, hour_dir: Path) -> None:
        """Restate the ``rows`` of an hour-level manifest (``segments/``, ``contacts/``, ``profile_changes/``) as the
        rows its buckets hold now (``bucket_rows``); the rest of it stays as its writer wrote it."""
        marker = hour_dir / MANIFEST
        if not marker.is_file():
            return
        manifest = read_json(marker)
        if not isinstance(manifest, dict) or "files" in manifest or not isinstance(manifest.get("rows"), int):
            return
        rows = lk.bucket_rows(hour_dir)
        if rows is not None and rows != manifest["rows"]:
            write_json(marker, {**manifest, "rows": rows, "erased_at": datetime.now(UTC).isoformat()})

    def restate_segments(self, hour: datetime) -> None:
        """Restate the counts of the hour-level ``segments/`` and ``exports/`` manifests of ``hour`` over the rows
        left (``publish.restated_manifests``); an hour without a committed segments manifest written per bucket
        (none, or one written whole by older code) is skipped."""
        from profile_engine.segments.publish import restated_manifests

        marker = self.lake.partition(lk.SEGMENTS, hour) / MANIFEST
        if not marker.is_file():
            return
        manifest = read_json(marker)
        if not isinstance(manifest.get("buckets"), list) or not isinstance(manifest.get("bucket_count"), int):
            return
        segments, exports, notes = restated_manifests(self.lake, hour)
        self.notes += notes
        stamp = {"erased_at": datetime.now(UTC).isoformat()}
        if segments != manifest:
            write_json(marker, {**segments, **stamp})
        exported = self.lake.partition(lk.EXPORTS, hour) / MANIFEST
        if exports is not None and exports != read_json(exported):
            write_json(exported, {**exports, **stamp})

    def republish(self, hour_dir: Path) -> None:
        """Recompute a snapshot's population features (RFM) over the remaining users, as ``publish_profiles`` does."""
        from profile_engine.profiles import population

        buckets = sorted(hour_dir.glob("bucket=*/" + MANIFEST), key=lambda p: int(p.parent.name.split("=")[1]))
        marker = hour_dir / MANIFEST
        if not buckets or not marker.is_file():
            return
        old = [read_json(m) for m in buckets]
        hour = datetime.fromisoformat(old[0]["data_hour"])
        parts = [pq.read_table(m.parent / lk.DATA_FILE) for m in buckets]
        full = population.population_snapshot(parts, hour, None)
        for manifest, part in zip(old, parts, strict=True):
            bucket_rows = full.filter(pc.is_in(full.column(USER_ID), value_set=part.column(USER_ID)))
            extra = manifest_extra(manifest)
            self.lake.write_partition(
                lk.PROFILES,
                hour,
                bucket_rows,
                bucket=manifest["bucket"],
                run_id=manifest["run_id"],
                extra={**extra, "erased_at": datetime.now(UTC).isoformat()},
            )
        summary = read_json(marker)
        summary["profiles"] = full.num_rows
        changes = self.lake.partition(lk.PROFILE_CHANGES, hour)
        if "profile_changes" in summary and any(changes.glob(f"bucket=*/{MANIFEST}")):
            counted = population.change_counts(self.lake.read(lk.PROFILE_CHANGES, hour))
            summary["profile_changes"] = counted
            summary["new_users"] = counted[CHANGE_NEW]
        for key, column in (("lifecycle", LIFECYCLE_STAGE), ("rfm_segments", RFM_SEGMENT)):
            if key in summary:
                summary[key] = dict(sorted(population.value_counts(full.column(column)).items()))
        write_json(marker, summary)
        pointer = self.lake.path(lk.PROFILES, "current")
        if pointer.is_file() and read_json(pointer).get("hour") == format_hour(hour):
            write_json(pointer, {**read_json(pointer), "profiles": full.num_rows})


def _parquet_bytes(table: pa.Table, original: Path) -> bytes:
    """The table as Parquet, compressed like the file it replaces and in row groups of its size (a sealed tile's
    small row groups let scans skip them: docs/architecture.md, "Sealed state tiles"; the rows keep their order)."""
    meta = pq.ParquetFile(original).metadata
    codec = meta.row_group(0).column(0).compression.lower() if meta.num_row_groups and meta.num_columns else "zstd"
    size = meta.row_group(0).num_rows if meta.num_row_groups > 1 else None
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=codec if codec != "uncompressed" else "none", row_group_size=size)
    return sink.getvalue()


def _append_audit(lake: Lake, lines: Sequence[dict[str, Any]]) -> None:
    """Append audit lines (one ``write`` each, ``O_APPEND``: an entry is whole or absent); none: no file."""
    if not lines:
        return
    path = audit_path(lake)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        for line in lines:
            os.write(fd, (json.dumps(line, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_audit(settings: Settings) -> list[dict[str, Any]]:
    """Every audit entry, oldest first."""
    path = audit_path(Lake(settings.lake))
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def erase_users(
    settings: Settings,
    user_ids: Iterable[str],
    *,
    requested_by: str,
    reason: str,
    tombstone_unknown: bool = False,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Remove ``user_ids`` from every retained dataset, tombstone them and audit it (see the module docstring).

    Returns counts only (no raw id): the users erased, rows removed per dataset, files
    and partitions rewritten, and ``unknown``, the number of ids found nowhere (a no-op for
    them, unless ``tombstone_unknown`` keeps them out of future data anyway). Raises
    ``lock.LakeLocked`` while an hourly run holds the lake.
    """
    from profile_engine.lake import lock
    from profile_engine.segments.delivery import outbox_root

    ids = sorted({u.strip() for u in user_ids if u and u.strip()})
    if not ids:
        raise ValueError("no user id given")
    lake = Lake(settings.lake)
    now = now or datetime.now(UTC)
    started = datetime.now(UTC)
    with lock.hold_lake(lake, f"erasure__{now.strftime('%Y%m%dT%H%M%S')}"):
        tombstones = read_tombstones(lake)
        key = matching_key(settings, tombstones)
        hashes = {u: user_hash(u, key) for u in ids}
        already = {u for u in ids if hashes[u] in tombstones.hashes}
        # Tombstone first: a crash half way still keeps every requested user out of later runs.
        write_tombstones(lake, key, tombstones.hashes | set(hashes.values()))
        try:
            export = export_key(settings)
            pseudonyms = {export.key_id: dict(zip(pseudonymize(ids, export), ids, strict=True))}
        except ExportKeyError:  # no export key: no export can exist either
            pseudonyms = {}
        erasers = [_Eraser(lake, frozenset(ids), pseudonyms)]
        outbox = outbox_root(settings)
        if not outbox.resolve().is_relative_to(lake.root.resolve()):
            erasers.append(_Eraser(Lake(outbox), frozenset(ids), pseudonyms, label="outbox"))
        for eraser in erasers:
            eraser.run()
        removed: dict[str, Counter[str]] = {u: Counter() for u in ids}
        for eraser in erasers:
            for user, counts in eraser.removed.items():
                if user in removed:
                    removed[user].update(counts)
        found = {u for u in ids if removed[u]}
        unknown = [u for u in ids if u not in found and u not in already]
        if unknown and not tombstone_unknown:
            kept = (tombstones.hashes | set(hashes.values())) - {hashes[u] for u in unknown}
            if kept:
                write_tombstones(lake, key, kept)
            else:  # nobody was ever erased: leave no trace of a no-op
                tombstones_path(lake).unlink()
        audited = [u for u in ids if u in found or u in already or tombstone_unknown]
        _append_audit(
            lake,
            [
                {
                    "time": now.isoformat(),
                    "user_hash": hashes[u],
                    "key_id": key.key_id,
                    "rows_removed": dict(sorted(removed[u].items())),
                    "status": "erased"
                    if u in found
                    else ("already erased" if u in already else "tombstoned, not found"),
                    "requested_by": requested_by,
                    "reason": reason,
                }
                for u in audited
            ],
        )
    totals: Counter[str] = Counter()
    for counts in removed.values():
        totals.update(counts)
    messages = []
    if unknown:
        messages.append(
            f"{len(unknown)} of {len(ids)} user ids were found nowhere in the lake: "
            + ("tombstoned anyway" if tombstone_unknown else "nothing to erase for them (no tombstone, no audit entry)")
        )
    if already - found:
        messages.append(f"{len(already - found)} user ids were already erased")
    return {
        "requested": len(ids),
        "erased": len(found),
        "already_erased": len(already - found),
        "unknown": len(unknown),
        "tombstones": len(read_tombstones(lake).hashes),
        "rows_removed": dict(sorted(totals.items())),
        "partitions_rewritten": sum(e.partitions for e in erasers),
        "files_rewritten": sum(e.files for e in erasers),
        "notes": [n for e in erasers for n in e.notes],
        "messages": messages,
        "key": key.source,
        "seconds": round((datetime.now(UTC) - started).total_seconds(), 3),
    }


def erase_request(
    settings: Settings,
    *,
    user_ids: Sequence[str] = (),
    ids_file: Path | str | None = None,
    requested_by: str,
    reason: str,
    tombstone_unknown: bool = False,
) -> dict[str, Any]:
    """One erasure request from the command line or the ``erase_user`` DAG: ids given, or a file of ids.

    Raises ``ValueError`` when neither names a user (an empty file, a blank id).
    """
    ids = list(user_ids)
    if ids_file:
        ids += read_ids_file(Path(ids_file))
    if not any(i.strip() for i in ids):
        raise ValueError("no user id given: pass user ids or a file of ids (one per line)")
    return erase_users(settings, ids, requested_by=requested_by, reason=reason, tombstone_unknown=tombstone_unknown)
