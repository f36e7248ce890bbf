"""The lake: layer names, Hive partition paths, atomic partition writes with manifests, commit recovery.

A partition is written whole under ``_tmp/`` and renamed into place; readers read only
partitions with a ``_manifest.json``. docs/architecture.md ("The lake"), docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from profile_engine.contracts.events import SCHEMA_VERSION
from profile_engine.hours import format_hour, parse_hour, partition_values
from profile_engine.lake import faults

# Layers, named once (docs/architecture.md, "The lake").
LANDING = "landing/events"
STAGING = "staging/events"
QUARANTINE = "quarantine/events"
QUALITY_RESULTS = "quality/results"
QUALITY_DOCS = "quality/docs"
STATE = "state"
STATE_TILES = "state_tiles"  # sealed by-hour state tiles per bucket, loose immutable files (docs/architecture.md)
PROFILES = "profiles"
SCORES = "scores"
INTERESTS = "interests"
PROFILE_CHANGES = "profile_changes"
SEGMENTS = "segments"
EXPORTS = "exports"
REPORTS = "reports"
TRAINING = "training"
MODELS = "models"
CONTACTS = "contacts"
META = "_meta"
LEDGER = "_meta/ledger"
PROMOTIONS = "_meta/promotions"
LOCK = "_meta/lock"
COMMITS = "_meta/commits"  # journals of partition replacements in progress (``replace_dir``)
OPTOUT = "_meta/optout"  # users who withdrew marketing consent (CSV/Parquet with user_id); never exported
TMP = "_tmp"
TRUTH = "simulator/truth"
# Every dataset partitioned by hour (``<layer>/dt=/hour=``), the layers named above.
HOURLY_LAYERS = (
    LANDING,
    LEDGER,
    STAGING,
    QUARANTINE,
    QUALITY_RESULTS,
    QUALITY_DOCS,
    STATE,
    PROFILES,
    SCORES,
    INTERESTS,
    PROFILE_CHANGES,
    SEGMENTS,
    EXPORTS,
    CONTACTS,
    REPORTS,
    TRUTH,
)


MANIFEST = "_manifest.json"
DATA_FILE = "part-0.parquet"
# _tmp/ entries are named <uuid>.<pid>.<host> (``tmp_name``) so a cleanup can tell a crashed
# writer's leftovers from live work; untagged or foreign ones go only after TMP_MAX_AGE_SECONDS.
TMP_MAX_AGE_SECONDS = 6 * 3600
_TMP_NAME = re.compile(r"^(?:old-|del-)?[0-9a-f]{32}\.(\d+)\.(.+)$")
# Layers whose files hold raw user ids (or samples of them): readable by the service user only.
PRIVATE_LAYERS = (
    STAGING,
    QUARANTINE,
    STATE,
    STATE_TILES,
    PROFILES,
    INTERESTS,
    PROFILE_CHANGES,
    SCORES,
    SEGMENTS,
    CONTACTS,
    TRAINING,
    TRUTH,
    QUALITY_RESULTS,
    QUALITY_DOCS,
)
PRIVATE_FILE_MODE, PRIVATE_DIR_MODE = 0o600, 0o700


@dataclass(frozen=True)
class Lake:
    """A lake rooted at a local directory."""

    root: Path

    # ---- paths -------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        """A path under the lake root."""
        return self.root.joinpath(*parts)

    def partition(self, layer: str, hour: datetime, bucket: int | None = None) -> Path:
        """``<layer>/dt=YYYY-MM-DD/hour=HH[/bucket=N]``."""
        dt, hh = partition_values(hour)
        path = self.root / layer / f"dt={dt}" / f"hour={hh}"
        return path / f"bucket={bucket}" if bucket is not None else path

    def committed(self, layer: str, hour: datetime, bucket: int | None = None) -> bool:
        """Whether the partition exists with its manifest."""
        return (self.partition(layer, hour, bucket) / MANIFEST).is_file()

    def manifest(self, layer: str, hour: datetime, bucket: int | None = None) -> dict[str, Any]:
        """The manifest of a committed partition (``FileNotFoundError`` otherwise)."""
        manifest: dict[str, Any] = read_json(self.partition(layer, hour, bucket) / MANIFEST)
        return manifest

    def data_files(self, layer: str, hour: datetime, bucket: int | None = None) -> list[Path]:
        """Parquet files of a committed partition.

        With ``bucket=None`` on a bucketed layer, the files of every committed
        ``bucket=N`` partition under the hour. Raises ``FileNotFoundError`` naming the
        partition when nothing is committed there.
        """
        base = self.partition(layer, hour, bucket)
        if bucket is None and base.is_dir():
            buckets = sorted(base.glob("bucket=*/" + MANIFEST), key=lambda p: int(p.parent.name.split("=")[1]))
            if buckets:
                return [f for m in buckets for f in sorted(m.parent.glob("*.parquet"))]
        if not (base / MANIFEST).is_file():
            raise FileNotFoundError(f"partition not committed: {base}")
        return sorted(base.glob("*.parquet"))

    def read(self, layer: str, hour: datetime, bucket: int | None = None, columns: list[str] | None = None) -> pa.Table:
        """Read a committed partition (all its buckets when ``bucket`` is None)."""
        files = self.data_files(layer, hour, bucket)
        tables = [pq.read_table(f, columns=columns) for f in files]
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    # ---- writes ------------------------------------------------------------
    def tmp_dir(self) -> Path:
        """A fresh directory under ``_tmp/`` (outside every partition tree)."""
        path = self.root / TMP / tmp_name()
        path.mkdir(parents=True)
        return path

    def write_partition(
        self,
        layer: str,
        hour: datetime,
        table: pa.Table | dict[str, pa.Table],
        *,
        bucket: int | None = None,
        run_id: str = "manual",
        extra: dict[str, Any] | None = None,
        dictionary: bool | list[str] = True,
        statistics: bool = True,
    ) -> dict[str, Any]:
        """Write the whole partition atomically and return its manifest.

        ``table`` is one table (written as ``part-0.parquet``) or a mapping of names
        to tables (written as ``<name>.parquet``, read back with ``read_named``).
        ``dictionary``: Parquet dictionary encoding for all columns, none, or the named
        ones (encoding high-cardinality ids costs more time than it saves space).
        ``statistics``: the min/max statistics of every column chunk in the footer (False: none, for files
        only ever read whole, where computing them is wasted: a state checkpoint's).
        """
        tables = {DATA_FILE: table} if isinstance(table, pa.Table) else {f"{k}.parquet": v for k, v in table.items()}
        tmp = self.tmp_dir()
        files = []
        for name, data in tables.items():
            pq.write_table(
                data, tmp / name, compression="zstd", use_dictionary=dictionary, write_statistics=statistics
            )
            files.append({"name": name, "rows": data.num_rows, "sha256": sha256_file(tmp / name)})
        dt, hh = partition_values(hour)
        first = next(iter(tables.values()))
        manifest: dict[str, Any] = {
            "layer": layer,
            "dt": dt,
            "hour": hh,
            "bucket": bucket,
            "data_hour": format_hour(hour),
            "rows": first.num_rows
            if len(tables) == 1
            else {n.removesuffix(".parquet"): f["rows"] for n, f in zip(tables, files, strict=True)},
            "columns": first.schema.names,
            "schema_version": SCHEMA_VERSION,
            "run_id": run_id,
            "written_at": datetime.now(UTC).isoformat(),
            "files": files,
        }
        if extra:
            manifest.update(extra)
        write_json(tmp / MANIFEST, manifest)
        replace_dir(tmp, self.partition(layer, hour, bucket), self)
        return manifest

    def read_named(
        self, layer: str, hour: datetime, name: str, bucket: int | None = None, columns: list[str] | None = None
    ) -> pa.Table:
        """Read table ``name`` of a committed multi-table partition."""
        base = self.partition(layer, hour, bucket)
        if not (base / MANIFEST).is_file():
            raise FileNotFoundError(f"partition not committed: {base}")
        return pq.read_table(base / f"{name}.parquet", columns=columns)

    def write_dir(self, target: Path, build: Iterable[tuple[str, bytes]], manifest: dict[str, Any]) -> None:
        """Write a directory of named files plus ``_manifest.json`` atomically to ``target``."""

        def write(folder: Path) -> Iterator[str]:
            for name, payload in build:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(payload)
                yield name

        self.write_dir_streamed(target, write, manifest)

    def write_dir_streamed(
        self, target: Path, write: Callable[[Path], Iterable[str]], manifest: dict[str, Any]
    ) -> None:
        """``write_dir`` of files that ``write`` writes itself, so that none has to be held in memory whole.

        ``write`` gets the new directory (under ``_tmp/``), writes its files there, appending
        as it goes, and yields each file's name once that file is complete; the manifest lists
        them in that order with their size and SHA-256 (read back from the file). The commit
        is ``write_dir``'s: the manifest, then ``replace_dir``, so a failure or a kill before
        the end commits nothing and leaves the committed directory as it was; files of a
        failed ``write`` are removed at once (a kill leaves them to ``clean_tmp_leftovers``).
        """
        tmp = self.tmp_dir()
        files = []
        try:
            for name in write(tmp):
                path = tmp / name
                files.append({"name": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # files half written: nothing to recover, and they can be large
            raise
        write_json(tmp / MANIFEST, {**manifest, "files": files, "schema_version": SCHEMA_VERSION})
        replace_dir(tmp, target, self)


# The keys of a manifest that ``write_partition`` writes itself; every other key came in as its ``extra``.
PARTITION_KEYS = frozenset(
    {"layer", "dt", "hour", "bucket", "data_hour", "rows", "columns", "schema_version", "run_id", "written_at", "files"}
)


def manifest_extra(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a partition's manifest says beyond its files (the ``extra`` it was written with): a rewrite of the
    same content (erasure, a layout upgrade) passes it on."""
    return {k: v for k, v in manifest.items() if k not in PARTITION_KEYS}


def partition_hours(root: Path) -> dict[datetime, Path]:
    """The ``dt=/hour=`` partitions under ``root`` by hour."""
    found: dict[datetime, Path] = {}
    if not root.is_dir():
        return found
    for day in root.glob("dt=*"):
        for hour_dir in day.glob("hour=*"):
            try:
                hour = parse_hour(f"{day.name[3:]}T{int(hour_dir.name[5:]):02d}")
            except ValueError:
                continue
            found[hour] = hour_dir
    return found


def bucket_rows(hour_dir: Path) -> int | None:
    """The rows of the committed ``bucket=N`` partitions under ``hour_dir``: the sum of their manifests' ``rows``.

    What the hour-level manifest of a layer written per bucket states as its ``rows``. None
    when the hour has no committed bucket, or one counts several tables (a mapping).
    """
    counts = [read_json(m).get("rows") for m in hour_dir.glob(f"bucket=*/{MANIFEST}")]
    ints = [n for n in counts if isinstance(n, int)]
    return sum(ints) if counts and len(ints) == len(counts) else None


def replace_dir(new: Path, target: Path, lake: Lake) -> None:
    """Move the complete directory ``new`` (under ``_tmp/``) to ``target``, replacing an existing one.

    Replacing takes two renames (the committed partition aside, the new one in) and a
    delete (the old copy). A journal in ``_meta/commits/`` names all three paths from
    before the first rename until after the delete, so a process killed at any step
    leaves enough for ``recover_commits`` (run when the lake lock is taken) to put the
    new partition in place or the old one back: never neither. An error between the
    renames puts the old partition back at once.
    """
    faults.maybe_fail(faults.TMP_BEFORE_RENAME)
    target.parent.mkdir(parents=True, exist_ok=True)
    restrict_private(new, target, lake)
    if not target.exists():
        os.replace(new, target)  # nothing to lose: a crash leaves no partition or the new one
        return
    old = lake.root / TMP / tmp_name("old-")
    journal = lake.root / COMMITS / f"{tmp_name()}.json"
    write_json(journal, {"target": _relative(target, lake), "new": _relative(new, lake), "old": _relative(old, lake)})
    faults.maybe_fail(faults.COMMIT_JOURNALED)
    os.replace(target, old)
    faults.maybe_fail(faults.COMMIT_MOVED_ASIDE)
    try:
        os.replace(new, target)
    except BaseException:
        if not target.exists():
            os.replace(old, target)
        journal.unlink(missing_ok=True)
        raise
    faults.maybe_fail(faults.COMMIT_RENAMED)
    shutil.rmtree(old, ignore_errors=True)
    faults.maybe_fail(faults.COMMIT_OLD_DELETED)
    journal.unlink(missing_ok=True)


def _relative(path: Path, lake: Lake) -> str:
    """``path`` relative to the lake root (journals stay valid when a lake is copied or moved)."""
    return path.relative_to(lake.root).as_posix()


def _writer_gone(name: str, now: float, mtime: float, max_age_seconds: float) -> bool:
    """Whether the process that named a ``_tmp/`` or journal entry is gone (or the entry is too old to be live)."""
    tag = _TMP_NAME.match(name.split(".json", 1)[0])
    dead = tag is not None and tag.group(2) == socket.gethostname() and not pid_alive(int(tag.group(1)))
    return dead or now - mtime > max_age_seconds


def recover_commits(lake: Lake, max_age_seconds: float = TMP_MAX_AGE_SECONDS) -> list[str]:
    """Finish or roll back partition replacements whose writer died; returns what was done, one line each.

    For each journal of a dead writer (``replace_dir``): when the target is there, it is
    the truth (the old partition if the writer died before moving it aside, else the new
    one) and the leftover copies go; when it is missing (killed between the renames), the
    new partition is renamed in if it is complete (has its manifest), else the old one is
    put back. Then ``old-`` copies without a journal (moved aside by an older version of
    this code) are put back when their manifest names a partition that is not committed.
    Called by whoever takes the lake lock, before ``clean_tmp_leftovers``.
    """
    done: list[str] = []
    now = time.time()
    folder = lake.root / COMMITS
    for journal in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            mtime = journal.lstat().st_mtime
        except FileNotFoundError:
            continue
        if not _writer_gone(journal.name.lstrip("."), now, mtime, max_age_seconds):
            continue
        if journal.name.startswith("."):  # a journal never written: nothing was moved
            journal.unlink(missing_ok=True)
            continue
        entry = read_json(journal)
        target, new, old = (lake.root / entry[k] for k in ("target", "new", "old"))
        if target.exists():
            action = f"{entry['target']}: kept (the commit had {'finished' if not new.exists() else 'not started'})"
        elif new.is_dir() and (new / MANIFEST).is_file():
            os.replace(new, target)
            action = f"{entry['target']}: new partition renamed in (rolled forward)"
        elif old.is_dir():
            os.replace(old, target)
            action = f"{entry['target']}: old partition put back (rolled back)"
        else:
            action = f"{entry['target']}: missing, and neither copy is left"
        for leftover in (new, old):
            shutil.rmtree(leftover, ignore_errors=True)
        journal.unlink(missing_ok=True)
        done.append(action)
    done += _restore_unjournaled(lake, now, max_age_seconds)
    return done


def _restore_unjournaled(lake: Lake, now: float, max_age_seconds: float) -> list[str]:
    """Put back ``old-`` copies of dead writers without a journal whose partition is not committed."""
    done: list[str] = []
    tmp = lake.root / TMP
    for entry in sorted(tmp.glob("old-*")) if tmp.is_dir() else []:
        try:
            mtime = entry.lstat().st_mtime
            manifest = read_json(entry / MANIFEST)
        except (FileNotFoundError, NotADirectoryError, ValueError):
            continue
        if not _writer_gone(entry.name, now, mtime, max_age_seconds) or not isinstance(manifest, dict):
            continue
        target = _manifest_target(lake, manifest)
        if target is None:
            continue  # cannot tell where it belongs: kept for the operator (clean_tmp_leftovers keeps it too)
        if (target / MANIFEST).is_file():
            shutil.rmtree(entry, ignore_errors=True)  # the partition was replaced: the copy is superseded
            done.append(f"{_relative(target, lake)}: superseded copy {entry.name} removed")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(entry, target)
            done.append(f"{_relative(target, lake)}: old partition put back from {entry.name}")
    return done


def _manifest_target(lake: Lake, manifest: dict[str, Any]) -> Path | None:
    """The partition a ``write_partition`` manifest belongs to (layer, dt, hour, bucket), or None."""
    layer, dt, hh = manifest.get("layer"), manifest.get("dt"), manifest.get("hour")
    if not (isinstance(layer, str) and isinstance(dt, str) and isinstance(hh, str)) or ".." in layer:
        return None
    path = lake.root / layer / f"dt={dt}" / f"hour={hh}"
    bucket = manifest.get("bucket")
    return path / f"bucket={bucket}" if bucket is not None else path


def restrict_private(new: Path, target: Path, lake: Lake) -> None:
    """Before ``new`` becomes ``target``: in a ``PRIVATE_LAYERS`` layer, files 0o600, directories 0o700."""
    relative = target.relative_to(lake.root).as_posix() if target.is_relative_to(lake.root) else ""
    if not any(relative.startswith(layer + "/") for layer in PRIVATE_LAYERS):
        return
    for path in [new, *new.rglob("*")]:
        path.chmod(PRIVATE_DIR_MODE if path.is_dir() else PRIVATE_FILE_MODE)
    (lake.root / relative.split("/")[0]).chmod(PRIVATE_DIR_MODE)  # nobody else can list the layer


def write_table_file(
    lake: Lake,
    target: Path,
    table: pa.Table,
    dictionary: bool | list[str] = True,
    row_group_size: int | None = None,
    order: pa.Array | None = None,
) -> None:
    """Write one Parquet file atomically outside any partition (under ``_tmp/``, then renamed into place).

    For files that are whole on their own and never change once written, such as the sealed
    state tiles; in a ``PRIVATE_LAYERS`` layer the file gets ``PRIVATE_FILE_MODE``. ``order``: the
    rows' positions in the order to write them (with ``row_group_size``): taken one row group at a
    time, so no reordered copy of the whole table is held (a day of tiles is millions of rows).
    """
    if order is not None and row_group_size and len(order):
        table = table.combine_chunks()  # a take from a chunked table concatenates its chunks every time
        groups = (table.take(order[start : start + row_group_size]) for start in range(0, len(order), row_group_size))
        write_tables_file(lake, target, table.schema, groups, row_group_size, dictionary)
        return
    tmp = lake.tmp_dir()
    pq.write_table(
        table if order is None else table.take(order),
        tmp / target.name,
        compression="zstd",
        use_dictionary=dictionary,
        row_group_size=row_group_size,
    )
    _place_file(lake, tmp / target.name, target)
    tmp.rmdir()


def write_tables_file(
    lake: Lake,
    target: Path,
    schema: pa.Schema,
    tables: Iterable[pa.Table],
    row_group_size: int,
    dictionary: bool | list[str] = True,
) -> int:
    """Write the rows of ``tables`` (each of ``schema``), in that order, as one file the way ``write_table_file``
    writes their concatenation with ``row_group_size`` (row groups of exactly that many rows, the last one
    fewer; atomically, private where it is), holding about a row group at a time besides the table being
    taken. Returns the rows written; none: no file is written (``target`` is left as it was). When ``tables``
    raises, nothing is written either."""
    tmp = lake.tmp_dir()
    written = 0
    try:
        with pq.ParquetWriter(tmp / target.name, schema, compression="zstd", use_dictionary=dictionary) as out:
            pending: list[pa.Table] = []
            held = 0
            for table in tables:
                pending.append(table)
                held += table.num_rows
                if held < row_group_size:
                    continue
                rows = pa.concat_tables(pending).combine_chunks()  # the groups are slices of one chunk
                full = held - held % row_group_size
                for start in range(0, full, row_group_size):
                    out.write_table(rows.slice(start, row_group_size), row_group_size=row_group_size)
                pending, held, written = [rows.slice(full)], held - full, written + full
            if held:
                out.write_table(pa.concat_tables(pending), row_group_size=row_group_size)
                written += held
        if written:
            _place_file(lake, tmp / target.name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def _place_file(lake: Lake, written: Path, target: Path) -> None:
    """Rename ``written`` (under ``_tmp/``) to ``target``, private in a ``PRIVATE_LAYERS`` layer."""
    relative = target.relative_to(lake.root).as_posix() if target.is_relative_to(lake.root) else ""
    layer = relative.split("/")[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    if any(relative.startswith(p + "/") for p in PRIVATE_LAYERS):
        written.chmod(PRIVATE_FILE_MODE)
        for directory in [target.parent, *target.parent.parents]:
            if directory == lake.root or not directory.is_relative_to(lake.root / layer):
                break
            directory.chmod(PRIVATE_DIR_MODE)
    os.replace(written, target)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temporary sibling file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    faults.maybe_fail(faults.JSON_BEFORE_RENAME)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(path.read_text())


def tmp_name(prefix: str = "") -> str:
    """A fresh ``_tmp/`` entry name tagged with this process: ``<prefix><uuid>.<pid>.<host>``."""
    return f"{prefix}{uuid.uuid4().hex}.{os.getpid()}.{socket.gethostname()}"


def clean_tmp_leftovers(lake: Lake, max_age_seconds: float = TMP_MAX_AGE_SECONDS) -> list[str]:
    """Remove ``_tmp/`` leftovers of crashed writers; returns the names removed.

    An entry goes when its name tags a process of this host that is no longer alive,
    or when it is older than ``max_age_seconds`` (untagged entries, other hosts).
    Fresh work of a live writer (this process included) is never touched, nor is a
    moved-aside committed partition (``old-*``) or an entry a commit journal names:
    only ``recover_commits`` (run first) puts those back or removes them. Called by
    whoever takes the lake lock (``profile_engine.lake.lock``) at the start of a run.
    """
    tmp = lake.root / TMP
    if not tmp.is_dir():
        return []
    now, removed = time.time(), []
    for entry in sorted(tmp.iterdir()):
        if entry.name.startswith("old-") or entry.name in _journaled(lake):
            continue  # a moved-aside committed partition, or part of a commit: only recover_commits decides
        try:
            mtime = entry.lstat().st_mtime
        except FileNotFoundError:
            continue
        if _writer_gone(entry.name, now, mtime, max_age_seconds):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def _journaled(lake: Lake) -> set[str]:
    """Names of ``_tmp/`` entries that a commit journal refers to."""
    folder = lake.root / COMMITS
    names: set[str] = set()
    for journal in folder.glob("*.json") if folder.is_dir() else []:
        try:
            entry = read_json(journal)
        except (FileNotFoundError, ValueError):
            continue
        names |= {Path(entry[k]).name for k in ("new", "old") if entry.get(k)}
    return names


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
