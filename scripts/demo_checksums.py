"""Build a ``make demo`` lake from a checkout and checksum its content; compare two such checksum files.

The refactoring check of issue 18: a demo lake built before and after a change that must
not change behaviour, with the same seed, sizes and window, has identical profiles, scores,
segments and exports. Usage (from a checkout's root, with its venv)::

    .venv/bin/python scripts/demo_checksums.py build --checkout /path/to/checkout-A \
        --lake /tmp/democheck/a-lake --out /tmp/democheck/a.json
    .venv/bin/python scripts/demo_checksums.py build --checkout . --lake /tmp/democheck/b-lake --out /tmp/democheck/b.json
    .venv/bin/python scripts/demo_checksums.py compare /tmp/democheck/a.json /tmp/democheck/b.json

``build`` runs the checkout's own demo (``python -m profile_engine demo``) in a subprocess
with ``cwd`` = the checkout and ``PYTHONPATH`` = its ``include/``, a fresh lake at ``--lake``
and a fresh Airflow home in a temporary directory (nothing is written inside the checkout:
``PYTHONDONTWRITEBYTECODE`` is set), and with everything that would otherwise vary pinned:

- the window ends at ``--last`` (default 2026-11-30T13:00Z, not the wall clock's last hour),
  passed as ``demo --last`` where the checkout's CLI has it, else to ``run_demo(last=...)`` of the
  package's ``demo`` module, wherever it is;
- ``--seed`` is both the simulator's seed (``demo --seed``) and the model seed (``PROFILE_ENGINE_SEED``);
- ``PROFILE_ENGINE_EXPORT_KEY`` is a fixed key (without it every lake generates its own random
  ``_meta/export_key`` and every pseudonym in the exports differs);
- every other ``PROFILE_ENGINE_*`` and ``AIRFLOW__*`` variable of the caller is removed;
- the checkout's own entry points (``checkout_metadata``): a venv shared between checkouts
  registers the timetable plugin of whichever checkout was installed last.

Checksummed (``CHECKED_LAYERS``): every Parquet file of the profile snapshot (``profiles``,
``interests``, ``state``, ``state_tiles``, ``profile_changes``), of ``scores``, ``segments``,
``contacts``, ``exports`` and ``training``, and every CSV export, **per logical table and hour**, not
per file: the files of one table of one hour are hashed together (``table_key``: the lake-relative
path without its ``bucket=N`` folders, so an hour written whole by older code and the same rows
written per bucket are one table, ``segments/dt=D/hour=HH/part-0.parquet``); sealed state tiles per
state table and the hour whose build sealed them (``state_tiles/<table>/sealed=YYYY-MM-DDTHH``, from
their ``sealed_ms``, whatever bucket, hourly or compacted day file holds them). Content, not bytes:
each file's schema with canonical types (dictionary-encoded as plain, ``large_*`` as their small forms)
and its rows as canonical JSON (columns by name, floats by exact repr with -0.0 as 0.0, timestamps in
UTC ISO form); a table's rows are sorted over all its files, so the file split, row order and
Parquet metadata (``created_by``, row groups, compression, encodings) do not count. CSV files are
hashed as their header and sorted lines. Not a file split, so still reported: a lake from before
sealed tiles holds the sealed rows in the ``state`` checkpoints themselves (``state/.../hourly.parquet``
differs and ``state_tiles/...`` is on one side only).

Excluded, because they legitimately differ between two runs of the same code (printed by ``build``
and stored under ``excluded`` in the JSON):

- files: ``_manifest.json`` of every partition (run ids with the wall-clock time of the Airflow run,
  write times, byte checksums of the Parquet files, which include their metadata); run reports,
  quality results and Data Docs, ``_meta/`` (ledger, locks, commit journals, promotion log with
  timestamps) and ``models/`` (Keras files carry their save time; the scores they produce are checked);
  ``landing``, ``staging`` and ``quarantine`` are inputs and intermediates, ``simulator/truth`` is
  the simulator's (not the engine's) output, ``_tmp`` is scratch space;
- columns: ``EXCLUDED_COLUMNS`` (run ids and write times; none of the checked layers had one on
  the lake of f9d14d3, the list guards later ones).

``compare A.json B.json`` prints every table (with its hour) whose checksum differs or that exists
on one side only, and exits 1 if there is any (or if the two builds used different parameters or
checksum formats), else prints a one-line summary and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import decimal
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

FORMAT = "profile_engine.demo_checksums/2"  # 2: keyed by logical table and hour (1: by file path)
DEFAULT_LAST = "2026-11-30T13:00:00+00:00"


def fixed_export_key(seed: int) -> str:
    """The pseudonymisation key of a check build: fixed per seed (not a secret), so both builds export the same ids."""
    return f"demo-checksums-seed-{seed}-not-a-secret"


STATE_TILES = "state_tiles"
CHECKED_LAYERS = (
    "profiles",
    "interests",
    "state",
    STATE_TILES,
    "profile_changes",
    "scores",
    "segments",
    "contacts",
    "exports",
    "training",
)
EXCLUDED_FILES = {
    "_manifest.json": "run ids with the wall-clock time of the run, write times, byte checksums of Parquet metadata",
    "reports/, quality/": "run reports, Great Expectations results and Data Docs: run ids, durations, write times",
    "_meta/": "ledger, locks, commit journals and promotion log: run ids and wall-clock times",
    "models/": "Keras files carry their save time; the scores the models produce are checked",
    "landing/, staging/, quarantine/, simulator/": "inputs and intermediates, the simulator's ground truth",
    "_tmp/": "scratch space",
}
# Columns that hold run ids or wall-clock times, by name, in any checked Parquet file.
EXCLUDED_COLUMNS = {
    "run_id": "Airflow run ids contain the wall-clock time of the run",
    "written_at": "wall-clock write time",
    "computed_at": "wall-clock computation time",
    "duration_seconds": "wall-clock duration",
}
_PARAM_KEYS = ("users", "history_days", "hours", "seed", "last")


# ---- canonical content hashes ---------------------------------------------------------------------


def _canonical_type(arrow_type: Any) -> Any:
    """The type a column's values are compared as: dictionary -> values, ``large_*`` -> small forms."""
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        return _canonical_type(arrow_type.value_type)
    if pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type):
        return pa.string()
    if pa.types.is_large_binary(arrow_type) or pa.types.is_binary_view(arrow_type):
        return pa.binary()
    if pa.types.is_large_list(arrow_type) or pa.types.is_list_view(arrow_type):
        return pa.list_(_canonical_type(arrow_type.value_type))
    if pa.types.is_list(arrow_type):
        return pa.list_(_canonical_type(arrow_type.value_type))
    if pa.types.is_struct(arrow_type):
        return pa.struct([pa.field(f.name, _canonical_type(f.type)) for f in arrow_type])
    return arrow_type


def _canonical_value(value: Any) -> Any:
    """A JSON-able form of one value that is equal exactly when the values are equal."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value + 0.0)  # -0.0 + 0.0 == 0.0; repr round-trips exactly
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
        return value.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return f"timedelta:{value.total_seconds()!r}"
    if isinstance(value, decimal.Decimal):
        return f"decimal:{value}"
    if isinstance(value, bytes):
        return "bytes:" + value.hex()
    if isinstance(value, dict):
        return {str(k): _canonical_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical_value(v) for v in value]
    return value


class TableContent:
    """The rows of one logical table, gathered from every file that holds part of it.

    ``schemas``: the canonical schema (or CSV header) of each file, as a set, so a table split into
    files of one schema hashes as one file would; ``lines``: its rows as canonical JSON lines.
    (A plain class: the tests load this script as a module that is not in ``sys.modules``.)
    """

    def __init__(self) -> None:
        self.schemas: set[str] = set()
        self.lines: list[str] = []
        self.files = 0
        self.excluded: set[str] = set()

    def add(self, schema: str, lines: Iterable[str], excluded: Iterable[str] = ()) -> None:
        self.schemas.add(schema)
        self.lines.extend(lines)
        self.files += 1
        self.excluded.update(excluded)

    def checksum(self) -> dict[str, Any]:
        """SHA-256 of the schemas and the sorted rows: equal for the same rows in any file split and order."""
        digest = hashlib.sha256()
        for schema in sorted(self.schemas):
            digest.update(schema.encode() + b"\n")
        for line in sorted(self.lines):
            digest.update(b"\n" + line.encode())
        return {
            "sha256": digest.hexdigest(),
            "rows": len(self.lines),
            "files": self.files,
            "excluded_columns": sorted(self.excluded),
        }


def _canonical_table(table: Any, excluded: Iterable[str]) -> tuple[Any, str, list[str]]:
    """``table`` without the excluded columns, columns by name in canonical types; its schema line; the dropped."""
    import pyarrow as pa

    dropped = sorted(set(table.column_names) & set(excluded))
    table = table.drop_columns(dropped)
    columns = sorted(table.column_names)
    types = {name: _canonical_type(table.schema.field(name).type) for name in columns}
    table = table.select(columns).cast(pa.schema([(n, types[n]) for n in columns]))
    return table, json.dumps([[n, str(types[n])] for n in columns]), dropped


def _row_lines(table: Any) -> list[str]:
    """Each row of a canonical table as a JSON line (values in ``_canonical_value`` form)."""
    return [
        json.dumps([_canonical_value(v) for v in row], ensure_ascii=False, separators=(",", ":"))
        for row in zip(*(table.column(name).to_pylist() for name in table.column_names), strict=True)
    ]


def parquet_checksum(path: Path, excluded: Iterable[str] = EXCLUDED_COLUMNS) -> dict[str, Any]:
    """Content checksum of a Parquet file: canonical schema plus its rows sorted, metadata ignored."""
    import pyarrow.parquet as pq

    table, schema, dropped = _canonical_table(pq.read_table(path), excluded)
    content = TableContent()
    content.add(schema, _row_lines(table), dropped)
    return content.checksum()


def _csv_lines(path: Path) -> tuple[str, list[str]]:
    """A CSV file's header and its other lines, each as canonical JSON (any line ending)."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [json.dumps(row, ensure_ascii=False) for row in csv.reader(handle)]
    return (rows[0] if rows else "", rows[1:])


def csv_checksum(path: Path) -> dict[str, Any]:
    """Checksum of a CSV file as its header and sorted lines (rows in any order, any line ending)."""
    content = TableContent()
    content.add(*_csv_lines(path))
    return content.checksum()


def table_key(relative: PurePosixPath) -> str:
    """The logical table a checked file holds part of: its lake-relative path without ``bucket=N`` folders.

    So ``segments/dt=D/hour=HH/part-0.parquet`` (the whole hour, written by older code) and
    ``segments/dt=D/hour=HH/bucket=N/part-0.parquet`` (per bucket) are one table of that hour;
    a multi-table partition keeps one table per file name (``state/.../hourly.parquet``).
    """
    return "/".join(p for p in relative.parts if not p.startswith("bucket="))


SEALED_MS = "sealed_ms"  # state tile column: the end of the build that sealed the row (lake.tiles.SEALED_MS)
TILE_DAY_FILE = "day.parquet"  # a tile day compacted into one file (lake.tiles.DAY_FILE)


def _tile_files(layer: Path) -> list[Path]:
    """The state tile files that hold rows: per day the compacted ``day.parquet`` when there is one (hourly
    files beside it are leftovers of an interrupted compaction, already in it), else the hourly files."""
    files: list[Path] = []
    for day in sorted(layer.glob("bucket=*/*/dt=*")):
        day_file = day / TILE_DAY_FILE
        files += [day_file] if day_file.is_file() else sorted(day.glob("hour=*.parquet"))
    return files


def _add_tiles(layer: Path, tables: dict[str, TableContent]) -> None:
    """Sealed state tiles, one logical table per state table and sealing build: ``state_tiles/<table>/sealed=H``
    (H the hour whose build sealed the rows), whatever the buckets and the hourly or day files they sit in."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for path in _tile_files(layer):
        name = path.relative_to(layer).parts[1]
        table, schema, dropped = _canonical_table(pq.read_table(path), EXCLUDED_COLUMNS)
        for end in sorted(set(table.column(SEALED_MS).to_pylist())):
            hour = dt.datetime.fromtimestamp(end / 1000 - 3600, dt.UTC).strftime("%Y-%m-%dT%H")
            rows = table.filter(pc.equal(table.column(SEALED_MS), end))
            tables.setdefault(f"{layer.name}/{name}/sealed={hour}", TableContent()).add(
                schema, _row_lines(rows), dropped
            )


def lake_checksums(lake: Path) -> dict[str, dict[str, Any]]:
    """Checksums of every checked table of ``lake`` per logical table and hour (``table_key``; sealed state tiles
    per table and sealing hour), so the same rows split into other files (buckets, compacted days) compare equal."""
    import pyarrow.parquet as pq

    tables: dict[str, TableContent] = {}
    for layer in CHECKED_LAYERS:
        base = lake / layer
        if not base.is_dir():
            continue
        if layer == STATE_TILES:
            _add_tiles(base, tables)
            continue
        for path in sorted(base.rglob("*")):
            relative = PurePosixPath(path.relative_to(lake).as_posix())
            if not path.is_file() or any(part.startswith(("_", ".")) for part in relative.parts):
                continue
            if path.suffix == ".parquet":
                table, schema, dropped = _canonical_table(pq.read_table(path), EXCLUDED_COLUMNS)
                tables.setdefault(table_key(relative), TableContent()).add(schema, _row_lines(table), dropped)
            elif path.suffix == ".csv":
                tables.setdefault(table_key(relative), TableContent()).add(*_csv_lines(path))
    return {key: tables[key].checksum() for key in sorted(tables)}


# ---- build ----------------------------------------------------------------------------------------


def _python(checkout: Path) -> str:
    """The checkout's venv python, else the one running this script."""
    candidate = checkout / ".venv" / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def _git_commit(checkout: Path) -> str | None:
    result = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or None


def checkout_metadata(checkout: Path, directory: Path) -> Path:
    """A ``.dist-info`` in ``directory`` with the entry points of the checkout's ``pyproject.toml``.

    Airflow registers the project's timetable through the ``airflow.plugins`` entry point, which
    names a module path; a shared venv's editable install names the path of whatever checkout was
    installed last (``profile_engine.ops.timetable`` after the move, ``profile_engine.timetable``
    before), and the demo then fails with ``TimetableNotRegistered``. Put first on ``PYTHONPATH``,
    this copy makes the checkout's own entry points load (the venv's one fails to import, logged).
    """
    import tomllib

    project = tomllib.loads((checkout / "pyproject.toml").read_text())["project"]
    info = directory / f"{project['name'].replace('-', '_')}-{project.get('version', '0')}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project.get('version', '0')}\n"
    )
    groups = {**project.get("entry-points", {}), "console_scripts": project.get("scripts", {})}
    text = "".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in entries.items()) + "\n"
        for group, entries in groups.items()
        if entries
    )
    (info / "entry_points.txt").write_text(text)
    return directory


def _environment(checkout: Path, lake: Path, airflow_home: Path, seed: int) -> dict[str, str]:
    """The caller's environment without PROFILE_ENGINE_*/AIRFLOW__* settings, plus the pinned ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROFILE_ENGINE_", "AIRFLOW__", "AIRFLOW_HOME"))}
    metadata = checkout_metadata(checkout, airflow_home / "checkout-metadata")
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(checkout / "include"), str(metadata)]),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PROFILE_ENGINE_LAKE": str(lake),
            "PROFILE_ENGINE_SEED": str(seed),
            "PROFILE_ENGINE_EXPORT_KEY": fixed_export_key(seed),
            "AIRFLOW_HOME": str(airflow_home),
        }
    )
    return env


def demo_command(python: str, checkout: Path, env: dict[str, str], params: dict[str, Any]) -> list[str]:
    """``python -m profile_engine demo ... --last H``, or ``run_demo(last=H)`` for a CLI without ``--last``."""
    helptext = subprocess.run(
        [python, "-m", "profile_engine", "demo", "--help"], cwd=checkout, env=env, capture_output=True, text=True
    ).stdout
    args = ["--users", str(params["users"]), "--history-days", str(params["history_days"])]
    args += ["--hours", str(params["hours"]), "--seed", str(params["seed"])]
    if "--last" in helptext:
        return [python, "-m", "profile_engine", "demo", *args, "--last", params["last"]]
    # Checkouts older than ``demo --last``: call the demo module's run_demo, wherever the package keeps it.
    code = (
        "import datetime as d, importlib, pkgutil, profile_engine; "
        "names = [m.name for m in pkgutil.walk_packages(profile_engine.__path__, 'profile_engine.') "
        "if m.name.rsplit('.', 1)[-1] == 'demo']; "
        "run_demo = next(importlib.import_module(n).run_demo for n in names); "
        f"run_demo(users={params['users']}, history_days={params['history_days']}, hours={params['hours']}, "
        f"seed={params['seed']}, last=d.datetime.fromisoformat({params['last']!r}))"
    )
    return [python, "-c", code]


def build(args: argparse.Namespace) -> int:
    """Build the demo lake with the checkout's code and write the checksums of its content."""
    checkout = Path(args.checkout).resolve()
    lake = Path(args.lake).resolve()
    if checkout == lake or checkout in lake.parents:
        raise SystemExit(f"--lake {lake} is inside the checkout {checkout}: point it outside (e.g. /tmp)")
    if lake.exists():
        if any(lake.iterdir()) and not (lake / "_meta" / "demo.json").is_file():
            raise SystemExit(f"{lake} holds data that no demo wrote; choose an empty or new folder")
        shutil.rmtree(lake)
    last = dt.datetime.fromisoformat(args.last)
    if last.tzinfo is None:
        raise SystemExit(f"--last {args.last!r} needs a time zone, e.g. {DEFAULT_LAST}")
    params = {
        "users": args.users,
        "history_days": args.history_days,
        "hours": args.hours,
        "seed": args.seed,
        "last": last.astimezone(dt.UTC).isoformat(),
    }
    python = _python(checkout)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="demo-checksums-airflow-") as airflow_home:
        env = _environment(checkout, lake, Path(airflow_home), args.seed)
        command = demo_command(python, checkout, env, params)
        print("[demo_checksums] " + " ".join(command), flush=True)
        log = Path(str(args.out) + ".log")
        with log.open("w") as handle:
            result = subprocess.run(command, cwd=checkout, env=env, stdout=handle, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise SystemExit(f"the demo failed with exit code {result.returncode}: see {log}")
    seconds = round(time.monotonic() - started, 1)
    files = lake_checksums(lake)
    if not any(key.startswith("scores/") for key in files):
        print("[demo_checksums] warning: the lake has no scores", flush=True)
    trained = sorted(p.name for p in (lake / "training").glob("*") if p.is_dir())
    out = {
        "format": FORMAT,
        "checkout": str(checkout),
        "commit": args.commit or _git_commit(checkout),
        "params": params,
        "build_seconds": seconds,
        "trainings": trained,
        "excluded": {"files": EXCLUDED_FILES, "columns": EXCLUDED_COLUMNS},
        "files": files,
    }
    Path(args.out).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    dropped = sorted({c for entry in files.values() for c in entry["excluded_columns"]})
    print(
        f"[demo_checksums] {len(files)} tables checksummed in {lake} ({seconds}s to build; trainings: "
        f"{', '.join(trained) or 'none'}) -> {args.out}\n"
        f"[demo_checksums] excluded files: {'; '.join(f'{k} ({v})' for k, v in EXCLUDED_FILES.items())}\n"
        f"[demo_checksums] excluded columns found: {', '.join(dropped) or 'none'} "
        f"(always excluded by name: {', '.join(EXCLUDED_COLUMNS)})",
        flush=True,
    )
    return 0


# ---- compare --------------------------------------------------------------------------------------


def compare_sums(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Lines naming every difference between two checksum files (empty when they agree)."""
    problems: list[str] = []
    if a.get("format") != b.get("format"):
        problems.append(
            f"format differs: {a.get('format')!r} vs {b.get('format')!r} (rebuild both with the same script)"
        )
    for key in _PARAM_KEYS:
        if a["params"].get(key) != b["params"].get(key):
            problems.append(f"parameter {key} differs: {a['params'].get(key)!r} vs {b['params'].get(key)!r}")
    files_a, files_b = a["files"], b["files"]
    for path in sorted(set(files_a) | set(files_b)):
        if path not in files_b:
            problems.append(f"only in A: {path}")
        elif path not in files_a:
            problems.append(f"only in B: {path}")
        elif files_a[path]["sha256"] != files_b[path]["sha256"]:
            problems.append(f"differs: {path} (rows {files_a[path]['rows']} vs {files_b[path]['rows']})")
    return problems


def compare(args: argparse.Namespace) -> int:
    """Print the differences between two checksum files; exit 1 if there is any."""
    for path in (args.a, args.b):
        if not Path(path).is_file():
            raise SystemExit(f"{path}: no such checksum file (build it first)")
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    problems = compare_sums(a, b)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} difference(s) between {args.a} and {args.b}")
        return 1
    print(f"identical: {len(a['files'])} tables ({a.get('commit')} vs {b.get('commit')}, {a['params']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build a demo lake with a checkout's code and write its content checksums")
    p.add_argument("--checkout", required=True, help="the checkout whose code builds the lake (its root)")
    p.add_argument("--lake", required=True, help="where the lake goes (replaced if an earlier demo wrote it)")
    p.add_argument("--out", required=True, help="the checksum file (JSON) to write; the demo's log goes to OUT.log")
    p.add_argument("--users", type=int, default=800)
    p.add_argument("--history-days", type=int, default=5)
    p.add_argument("--hours", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--commit", help="the commit the checkout holds, when it is no git checkout (git archive)")
    p.add_argument("--last", default=DEFAULT_LAST, help=f"the window's last hour (default {DEFAULT_LAST})")
    p.set_defaults(func=build)
    p = sub.add_parser("compare", help="compare two checksum files: exit 1 on any difference")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=compare)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
