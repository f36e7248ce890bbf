"""Labels and the out-of-time training and evaluation sets of the propensity model, with the leakage check.
docs/model.md (Labels).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profile_engine.config import Settings
from profile_engine.contracts.events import PURCHASE, bucket_sql
from profile_engine.contracts.profiles import SNAPSHOT_HOUR, SNAPSHOT_SCHEMA, USER_ID
from profile_engine.contracts.traits import load_traits
from profile_engine.hours import HOUR, floor_hour, format_hour, hour_range, parse_hour
from profile_engine.lake import db
from profile_engine.lake.storage import MANIFEST, PROFILES, STAGING, TRAINING, Lake, read_json

LABEL = "label"

TRAIN_FILE = "train.parquet"
EVAL_FILE = "eval.parquet"

STRIDE_ENV = "PROFILE_ENGINE_TRAINING_STRIDE_HOURS"
DEFAULT_STRIDE_HOURS = 1


class LeakageError(AssertionError):
    """A training example carries information from after its snapshot."""


class InsufficientData(Exception):
    """There are not enough final, labelled examples to train and evaluate a model."""


@dataclass(frozen=True)
class TrainingConfig:
    """How a training set is drawn; the defaults keep a demo retraining well under 30 s."""

    max_snapshots: int = 32
    max_rows: int = 200_000
    min_train_rows: int = 200
    min_positives: int = 5
    leakage_users: int = 100  # per snapshot, whose features check_no_leakage recomputes from staged events
    # Hours without a committed snapshot that the lake can rebuild become examples when their end is a
    # multiple of this many hours (0: committed snapshots only); None reads PROFILE_ENGINE_TRAINING_STRIDE_HOURS.
    stride_hours: int | None = None

    def stride(self, environ: dict[str, str] | None = None) -> int:
        """``stride_hours``, else ``PROFILE_ENGINE_TRAINING_STRIDE_HOURS``, else ``DEFAULT_STRIDE_HOURS``."""
        if self.stride_hours is not None:
            value = self.stride_hours
        else:
            text = (os.environ if environ is None else environ).get(STRIDE_ENV) or ""
            try:
                value = int(text) if text.strip() else DEFAULT_STRIDE_HOURS
            except ValueError as error:
                raise ValueError(f"{STRIDE_ENV} must be an integer >= 0, got {text!r}") from error
        if value < 0:
            raise ValueError(f"{STRIDE_ENV} (stride_hours) must be >= 0, got {value}")
        return value


@dataclass(frozen=True)
class TrainingSet:
    """A written training set: the tables plus where and from which snapshots they came."""

    version: str
    directory: str
    train: pa.Table
    eval: pa.Table
    train_snapshots: tuple[datetime, ...]
    eval_snapshot: datetime

    def summary(self) -> dict[str, Any]:
        """Small JSON-able description (rows, positives, snapshots) for manifests and XCom."""
        return {
            "version": self.version,
            "directory": self.directory,
            "train_rows": self.train.num_rows,
            "train_positives": positives(self.train),
            "eval_rows": self.eval.num_rows,
            "eval_positives": positives(self.eval),
            "train_snapshots": [format_hour(s) for s in self.train_snapshots],
            "eval_snapshot": format_hour(self.eval_snapshot),
        }


def positives(table: pa.Table) -> int:
    """Number of positive labels in a labelled table."""
    return int(pc.sum(table.column(LABEL)).as_py() or 0)


def label_window(snapshot: datetime, horizon_hours: int) -> tuple[datetime, datetime]:
    """``[E, E + horizon)`` for the snapshot of hour ``snapshot`` (E = snapshot end)."""
    end = floor_hour(snapshot) + HOUR
    return end, end + timedelta(hours=horizon_hours)


def labels_final(settings: Settings, snapshot: datetime, hour: datetime) -> bool:
    """Whether labels of ``snapshot`` are final when processing ``hour``: window end + lateness <= end of ``hour``."""
    _, window_end = label_window(snapshot, settings.label_horizon_hours)
    return window_end + timedelta(hours=settings.lateness_hours) <= floor_hour(hour) + HOUR


def newest_final_snapshot_hour(settings: Settings, hour: datetime) -> datetime:
    """The newest snapshot hour whose labels are final at ``hour`` (it need not be committed)."""
    return floor_hour(hour) - timedelta(hours=settings.label_horizon_hours + settings.lateness_hours)


def staged_hours_for_window(settings: Settings, start: datetime, end: datetime) -> list[datetime]:
    """Processing hours whose staged events can have ``ts`` in ``[start, end)``.

    Ingestion of hour H stages events with ``ts`` in ``[H - lateness, H + 1h + clock skew)``
    (older ones and ones further in the future are quarantined): so every hour H with
    ``H + 1h + skew > start`` (an event a little ahead of the clock is staged in the
    hour before its own, even the hour before the window) and ``H - lateness < end``.
    """
    skew = timedelta(minutes=settings.clock_skew_minutes)
    first = floor_hour(start - HOUR - skew) + HOUR  # the first H with H + 1h + skew > start
    last = floor_hour(end - timedelta(milliseconds=1) + timedelta(hours=settings.lateness_hours))
    return list(hour_range(first, last))


def profile_committed(lake: Lake, hour: datetime) -> bool:
    """Whether the profile snapshot of ``hour`` is committed (its hour-level manifest exists)."""
    return (lake.partition(PROFILES, hour) / MANIFEST).is_file()


def committed_profile_hours(lake: Lake) -> list[datetime]:
    """Every hour with a committed profile snapshot, oldest first (read from the partition paths)."""
    hours = []
    for marker in lake.path(PROFILES).glob(f"dt=*/hour=*/{MANIFEST}"):
        day = marker.parent.parent.name.removeprefix("dt=")
        hours.append(parse_hour(f"{day}T{marker.parent.name.removeprefix('hour=')}"))
    return sorted(hours)


def read_snapshot(lake: Lake, hour: datetime, columns: Sequence[str] | None = None) -> pa.Table:
    """The committed profile snapshot of ``hour`` (every bucket); ``FileNotFoundError`` when not committed.

    ``columns``: only those of them the snapshot has (an older snapshot may lack newer ones).
    """
    parts = list(snapshot_parts(lake, hour, columns))
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def snapshot_parts(lake: Lake, hour: datetime, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """The committed profile snapshot of ``hour`` one data file (one bucket) at a time, in ``read_snapshot``'s
    order (their concatenation is ``read_snapshot``); ``FileNotFoundError`` when not committed."""
    if not profile_committed(lake, hour):
        raise FileNotFoundError(f"profile snapshot not committed: {lake.partition(PROFILES, hour)}")
    files = lake.data_files(PROFILES, hour)
    wanted = None
    if columns is not None:
        present = set(pq.read_schema(files[0]).names)
        wanted = [c for c in columns if c in present]
    for file in files:
        yield pq.read_table(file, columns=wanted)


def _hash_order(table: pa.Table, limit: int, seed: int, salt: str) -> pa.Table:
    """The first ``limit`` rows of ``table`` by a stable hash of (seed, salt, user_id), then ``user_id``."""
    return table.take(pa.array(hash_positions(table.column(USER_ID), limit, seed, salt)))


def _by_user(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, [(USER_ID, "ascending")]))


def sample_users(table: pa.Table, limit: int, seed: int, salt: str = "") -> pa.Table:
    """Up to ``limit`` rows chosen by a stable hash of (seed, salt, user_id), in user order.

    The choice depends on the users only, never on row order or the process, so a
    rerun draws the same sample.
    """
    if table.num_rows <= limit:
        return _by_user(table)
    return _by_user(_hash_order(table, limit, seed, salt))


def sample_snapshot(
    lake: Lake, hour: datetime, limit: int, seed: int, salt: str = "", columns: Sequence[str] | None = None
) -> pa.Table:
    """``sample_users(read_snapshot(lake, hour, columns), limit, seed, salt)``, holding one bucket and the sample.

    The sample depends on the users only: the ``user_id`` column of each bucket in turn joins the users kept so
    far (with their file and position), cut to the first ``limit`` by the hash again (``_hash_order``'s order,
    total: ties go by ``user_id``, unique in a snapshot, so the users first over the whole snapshot are kept);
    then each bucket is read with ``columns`` and only its chosen rows are kept. Reading the whole snapshot held
    every profile of the hour at once; cutting the wide rows kept so far and the next bucket's to ``limit``,
    bucket after bucket, took 0.75-1.2 CPU s of the run report's drift over two snapshots of 654k users, against
    about 0.2 s for hashing the users (issue 19, BENCHMARKS.md). At most one bucket's ids and ``limit`` kept
    users are held, never an id column of the whole population.
    """
    if not profile_committed(lake, hour):
        raise FileNotFoundError(f"profile snapshot not committed: {lake.partition(PROFILES, hour)}")
    files = lake.data_files(PROFILES, hour)
    if not files:  # a committed snapshot has at least one data file: data_files raises otherwise
        raise FileNotFoundError(f"profile snapshot without data files: {lake.partition(PROFILES, hour)}")
    kept_users: pa.Table | None = None  # the users kept so far: user_id, their file and position in it
    for index, file in enumerate(files):
        ids = pq.ParquetFile(file).read(columns=[USER_ID]).column(USER_ID)
        part = pa.table(
            {
                USER_ID: ids,
                "file": pa.array(np.full(len(ids), index, dtype=np.int64)),
                "pos": pa.array(np.arange(len(ids), dtype=np.int64)),
            }
        )
        kept_users = part if kept_users is None else pa.concat_tables([kept_users, part])
        if kept_users.num_rows > limit:
            kept_users = kept_users.take(pa.array(hash_positions(kept_users.column(USER_ID), limit, seed, salt)))
    assert kept_users is not None  # files is not empty
    file_of = np.asarray(kept_users.column("file"))
    position = np.asarray(kept_users.column("pos"))
    del kept_users
    wanted = None
    if columns is not None:
        present = set(pq.read_schema(files[0]).names)
        wanted = [c for c in columns if c in present]
    kept: pa.Table | None = None
    for index, file in enumerate(files):
        part = pq.read_table(file, columns=wanted)
        chosen = np.sort(position[file_of == index])
        if len(chosen) < part.num_rows:
            part = part.take(pa.array(chosen))
        kept = part if kept is None else pa.concat_tables([kept, part])
        del part
    assert kept is not None  # files is not empty
    return _by_user(kept)


def hash_positions(users: pa.ChunkedArray | pa.Array, limit: int, seed: int, salt: str) -> np.ndarray:
    """Positions of the first ``limit`` of ``users`` by ``_hash_order``'s stable hash, then ``user_id``."""
    con = db.cursor()
    try:
        con.register("keys", pa.table({"idx": pa.array(np.arange(len(users))), "uid": users}))
        chosen = con.execute(
            "SELECT idx FROM keys ORDER BY md5_number(? || uid), uid LIMIT ?", [f"{seed}:{salt}:", int(limit)]
        ).fetchnumpy()["idx"]
    finally:
        con.close()
    return np.asarray(chosen, dtype=np.int64)


def _epoch_ms(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps as int64 epoch milliseconds (nulls as the minimum int64)."""
    as_ms = pc.cast(column, pa.timestamp("ms", tz="UTC"), safe=False)
    return np.asarray(pc.fill_null(pc.cast(as_ms, pa.int64()), np.iinfo(np.int64).min))


def staged_files(lake: Lake, hour: datetime, bucket: int | None, buckets: int) -> list[Path]:
    """The staged files of ``hour`` that can hold events of ``bucket``'s users (every file when None; none unstaged).

    An hour staged over ``buckets`` buckets (folders ``bucket=0`` .. ``buckets - 1``, as
    ``validate_events`` writes every hour) holds a user's events in the user's bucket
    (``bucket_sql``); an hour staged otherwise (fewer folders, another count) is read whole.
    """
    base = lake.partition(STAGING, hour)
    folders = {e.name for e in os.scandir(base) if e.name.startswith("bucket=")} if base.is_dir() else set()
    if bucket is not None and folders == {f"bucket={b}" for b in range(buckets)}:
        return lake.data_files(STAGING, hour, bucket) if lake.committed(STAGING, hour, bucket) else []
    try:
        return lake.data_files(STAGING, hour)
    except FileNotFoundError:
        return []  # nothing was staged in that hour


def label_examples(settings: Settings, examples: pa.Table, bucket: int | None = None) -> pa.Table:
    """Append ``LABEL`` (int8): did the user purchase in the label window of the row's snapshot?

    ``examples`` needs ``USER_ID`` and ``SNAPSHOT_HOUR``. Only staged events are read:
    every staged hour that can hold a ``ts`` in a window (``staged_hours_for_window``:
    the hours before it within the clock skew, its own hours and the lateness after),
    filtered on ``ts``, so a purchase counts wherever it was staged. ``bucket``: every
    example's user is of that bucket (``bucket_sql`` over ``settings.buckets``), so of an
    hour staged over those buckets only that bucket's files are read (``staged_files``).
    """
    snapshots = sorted({floor_hour(s) for s in pc.unique(examples.column(SNAPSHOT_HOUR)).to_pylist()})
    hours: set[datetime] = set()
    for snapshot in snapshots:
        hours.update(staged_hours_for_window(settings, *label_window(snapshot, settings.label_horizon_hours)))
    lake = Lake(settings.lake)
    files = [str(f) for hour in sorted(hours) for f in staged_files(lake, hour, bucket, settings.buckets)]
    start_ms = _epoch_ms(examples.column(SNAPSHOT_HOUR)) + HOUR // timedelta(milliseconds=1)
    keys = pa.table(
        {
            "idx": pa.array(np.arange(examples.num_rows)),
            "uid": examples.column(USER_ID),
            "start_ms": pa.array(start_ms),
            "end_ms": pa.array(start_ms + timedelta(hours=settings.label_horizon_hours) // timedelta(milliseconds=1)),
        }
    )
    label = np.zeros(examples.num_rows, dtype=np.int8)
    if files:
        con = db.connect(settings)
        con.register("keys", keys)
        positive = (
            con.execute(
                """
                SELECT DISTINCT k.idx
                FROM keys k
                JOIN (SELECT user_id, epoch_ms(ts) AS ts_ms FROM read_parquet(?) WHERE event_type = ?) p
                  ON p.user_id = k.uid AND p.ts_ms >= k.start_ms AND p.ts_ms < k.end_ms
                """,
                [files, PURCHASE],
            )
            .fetchnumpy()["idx"]
            .astype(np.int64)
        )
        con.close()
        label[positive] = 1
    return examples.append_column(LABEL, pa.array(label, pa.int8()))


def check_no_leakage(
    settings: Settings,
    examples: pa.Table,
    expected_snapshots: pa.Array | pa.ChunkedArray,
    *,
    sample: int = 100,
) -> dict[str, int]:
    """Raise ``LeakageError`` when an example's features depend on anything after its snapshot's cutoff.

    Three checks, cheapest first:

    1. every row carries the snapshot it is an example of (no row joined from a newer one);
    2. no timestamp feature is at or after the snapshot end E = snapshot + 1h;
    3. the features are unchanged when every event after the cutoff is deleted: for up to
       ``sample`` users per snapshot (a stable hash draw), the engine's per-user columns
       that the rows carry are recomputed from staged events alone, reading staging up to
       the snapshot's hour and deleting every event with ``ts >= E``
       (``replay.rebuild_before_cutoffs``), and compared with the rows (floats to
       ``verify.REL_TOLERANCE``). A user row the recompute does not have (the user only
       exists through later events) fails too. Population columns (RFM) are not
       recomputed: they are functions of the checked recency, frequency and money over
       the whole snapshot.

    Returns what was checked: ``rows`` recomputed and engine ``columns`` compared (0 for a
    table with no engine column, whose features cannot come from the staged events).
    """
    from profile_engine.profiles import replay
    from profile_engine.profiles.verify import compare_tables

    snapshot_ms = _epoch_ms(examples.column(SNAPSHOT_HOUR))
    expected_ms = _epoch_ms(expected_snapshots)
    wrong = np.flatnonzero(snapshot_ms != expected_ms)
    if wrong.size:
        raise LeakageError(f"{wrong.size} feature rows come from another snapshot than their example's")
    end_ms = snapshot_ms + HOUR // timedelta(milliseconds=1)
    for field in examples.schema:
        if field.name == SNAPSHOT_HOUR or not pa.types.is_timestamp(field.type):
            continue
        late = int(np.count_nonzero(_epoch_ms(examples.column(field.name)) >= end_ms))
        if late:
            raise LeakageError(f"{field.name}: {late} rows carry a time at or after their snapshot end")

    columns = [c for c in SNAPSHOT_SCHEMA.names if c in examples.column_names and c not in (USER_ID, SNAPSHOT_HOUR)]
    if not columns or examples.num_rows == 0:
        return {"rows": 0, "columns": 0}
    snapshots = sorted({floor_hour(h) for h in examples.column(SNAPSHOT_HOUR).to_pylist()})
    drawn = {
        hour: sample_users(
            examples.filter(
                pc.equal(examples.column(SNAPSHOT_HOUR), pa.scalar(hour, examples.schema.field(SNAPSHOT_HOUR).type))
            ),
            sample,
            settings.seed,
            f"leakage:{format_hour(hour)}",
        ).select([USER_ID, *columns])
        for hour in snapshots
    }
    users = sorted({u for rows in drawn.values() for u in rows.column(USER_ID).to_pylist()})
    rebuilt: dict[datetime, list[pa.Table]] = {hour: [] for hour in snapshots}
    for bucket, bucket_users in users_by_bucket(users, settings.buckets).items():
        wanted = pa.array(bucket_users, pa.string())
        hours = [h for h in snapshots if pc.any(pc.is_in(drawn[h].column(USER_ID), value_set=wanted)).as_py()]
        for hour, profiles in replay.rebuild_before_cutoffs(settings, hours, bucket, wanted).items():
            rebuilt[hour].append(profiles)
    rows = 0
    for hour, stored in drawn.items():
        if rebuilt[hour]:
            recomputed = pa.concat_tables(rebuilt[hour])
            recomputed = recomputed.filter(pc.is_in(recomputed.column(USER_ID), value_set=stored.column(USER_ID)))
            expected = recomputed.select([USER_ID, *columns])
        else:
            expected = stored.schema.empty_table()
        # Users only the stored rows have are "not in the rebuild": they exist through later events.
        comparison = compare_tables("features", expected, stored, [USER_ID])
        if not comparison.equal:
            raise LeakageError(
                f"snapshot {format_hour(hour)}: features differ from a recompute with every event after the "
                f"cutoff deleted (staged after {format_hour(hour)} or ts >= {format_hour(hour + HOUR)}): "
                + "; ".join(comparison.lines())
            )
        rows += stored.num_rows
    return {"rows": rows, "columns": len(columns)}


def users_by_bucket(users: Sequence[str], buckets: int) -> dict[int, list[str]]:
    """The users of each bucket, by the staging rule (``schema.bucket_sql``)."""
    con = db.connect()
    try:
        con.register("u", pa.table({USER_ID: pa.array(users, pa.string())}))
        table = con.sql(f"SELECT {USER_ID}, {bucket_sql(USER_ID, buckets)} AS b FROM u").to_arrow_table()
    finally:
        con.close()
    out: dict[int, list[str]] = {}
    for user, bucket in zip(table.column(USER_ID).to_pylist(), table.column("b").to_pylist(), strict=True):
        out.setdefault(int(bucket), []).append(user)
    return out


def choose_snapshots(
    settings: Settings, hour: datetime, available: Sequence[datetime], max_snapshots: int
) -> tuple[list[datetime], datetime]:
    """``(training snapshots oldest first, evaluation snapshot)`` for a training run at ``hour``.

    The evaluation snapshot is the newest available one whose labels are final;
    training snapshots end their label windows at or before the evaluation window
    starts, and up to ``max_snapshots`` are spread evenly over them, the newest
    always included (it is the time-based validation slice).
    """
    newest = newest_final_snapshot_hour(settings, hour)
    final = [s for s in sorted(available) if s <= newest]
    if not final:
        raise InsufficientData(f"no committed profile snapshot at or before {format_hour(newest)} has final labels")
    eval_snapshot = final[-1]
    eval_start, _ = label_window(eval_snapshot, settings.label_horizon_hours)
    candidates = [s for s in final if label_window(s, settings.label_horizon_hours)[1] <= eval_start]
    if len(candidates) < 2:
        raise InsufficientData(
            f"{len(candidates)} snapshots have label windows ending before the evaluation window "
            f"({format_hour(eval_snapshot)}); need 2 (training + validation slice)"
        )
    picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, min(max_snapshots, len(candidates)))).astype(int))
    return [candidates[i] for i in picks], eval_snapshot


def training_hours(settings: Settings, stride: int) -> tuple[list[datetime], list[datetime]]:
    """``(candidate snapshot hours, those of them to reconstruct)``, oldest first.

    Candidates are every committed snapshot plus, when ``stride`` > 0, every hour whose end is
    a multiple of ``stride`` hours (UTC epoch, the rule of warm-up checkpoints) that every
    bucket can rebuild (``replay.reproducible_hours``) although no snapshot was committed:
    a replay or warm-up commits one snapshot a day, while the state checkpoints and the
    staged events reproduce every hour since the oldest retained checkpoint.
    """
    from profile_engine.profiles import replay

    committed = committed_profile_hours(Lake(settings.lake))
    if stride == 0:
        return committed, []
    reproducible: set[datetime] | None = None
    for bucket in range(settings.buckets):
        hours = set(replay.reproducible_hours(settings, bucket))
        reproducible = hours if reproducible is None else reproducible & hours
    on_grid = {h for h in reproducible or set() if (int(h.timestamp()) // 3600 + 1) % stride == 0}
    reconstructed = sorted(on_grid - set(committed))
    return sorted(set(committed) | on_grid), reconstructed


def _reconstructed_rows(settings: Settings, hours: Sequence[datetime], limit: int) -> dict[datetime, pa.Table]:
    """The rows ``_examples`` would draw at ``hours`` from snapshots that were never committed.

    Users are sampled before the rebuild: per bucket the ``limit`` users first in the
    snapshot's hash order (a superset of the snapshot-wide draw), rebuilt with every buyer
    (``replay.profiles_at``), RFM over the buckets' buyers (``population_snapshot``), then
    the same ``sample_users`` draw as on a committed snapshot: the rows equal those the
    hourly path's snapshot would give.
    """
    from profile_engine.profiles import population, replay

    picked: dict[datetime, list[pa.Array]] = {h: [] for h in hours}
    parts: dict[datetime, list[pa.Table]] = {h: [] for h in hours}

    def pick(hour: datetime, users: pa.Array) -> pa.Array:
        chosen = sample_users(pa.table({USER_ID: users}), limit, settings.seed, format_hour(hour)).column(USER_ID)
        picked[hour].append(chosen.combine_chunks())
        return chosen.combine_chunks()

    for bucket in range(settings.buckets):
        for hour, profiles in replay.profiles_at(settings, list(hours), bucket, pick).items():
            parts[hour].append(profiles)
    out = {}
    for hour in hours:
        whole = population.population_snapshot(parts[hour], hour, load_traits(settings.traits))
        chosen = pa.concat_arrays(picked[hour]) if picked[hour] else pa.array([], pa.string())
        rows = whole.filter(pc.is_in(whole.column(USER_ID), value_set=chosen))
        out[hour] = sample_users(rows, limit, settings.seed, format_hour(hour))
    return out


def _examples(
    settings: Settings, snapshots: Sequence[datetime], reconstruct: Sequence[datetime], limit: int
) -> list[tuple[datetime, pa.Table]]:
    """Sampled, labelled rows of each snapshot (not yet leakage-checked): read, or rebuilt for ``reconstruct``."""
    rebuilt = _reconstructed_rows(settings, [s for s in snapshots if s in set(reconstruct)], limit)
    lake = Lake(settings.lake)
    out = []
    for snapshot in snapshots:
        rows = rebuilt.get(snapshot)
        if rows is None:
            rows = sample_snapshot(lake, snapshot, limit, settings.seed, format_hour(snapshot))
        out.append((snapshot, label_examples(settings, rows)))
    return out


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def build_training_set(
    settings: Settings,
    hour: datetime,
    version: str,
    *,
    config: TrainingConfig | None = None,
    run_id: str = "manual",
) -> TrainingSet:
    """Draw, label, check and write the training and evaluation sets for a training run at ``hour``.

    Raises ``InsufficientData`` (saying why) when there are too few snapshots,
    rows or positives. Writes ``training/<version>/`` atomically, overwriting a
    previous run of the same version, which gives the same rows.
    """
    config = config or TrainingConfig()
    lake = Lake(settings.lake)
    stride = config.stride()
    available, reproducible = training_hours(settings, stride)
    train_snapshots, eval_snapshot = choose_snapshots(settings, hour, available, config.max_snapshots)
    per_snapshot = max(1, config.max_rows // (len(train_snapshots) + 1))
    chosen = [*train_snapshots, eval_snapshot]
    reconstructed = [s for s in chosen if s in set(reproducible)]
    started = time.perf_counter()
    drawn = _examples(settings, chosen, reconstructed, per_snapshot)
    drawing_seconds = time.perf_counter() - started
    everything = pa.concat_tables([rows for _, rows in drawn], promote_options="permissive")
    leakage = check_no_leakage(
        settings,
        everything,
        pa.array([s for s, rows in drawn for _ in range(rows.num_rows)], pa.timestamp("ms", tz="UTC")),
        sample=config.leakage_users,
    )
    train = pa.concat_tables([rows for _, rows in drawn[:-1]], promote_options="permissive")
    evaluation = drawn[-1][1]
    if train.num_rows < config.min_train_rows:
        raise InsufficientData(f"{train.num_rows} training rows, need {config.min_train_rows}")
    for name, table in (("training", train), ("evaluation", evaluation)):
        if positives(table) < config.min_positives:
            raise InsufficientData(
                f"{positives(table)} positive labels in the {name} rows, need {config.min_positives}"
            )
    directory = lake.path(TRAINING, version)
    result = TrainingSet(version, str(directory), train, evaluation, tuple(train_snapshots), eval_snapshot)
    manifest = {
        **result.summary(),
        "training_hour": format_hour(hour),
        "label": LABEL,
        "label_horizon_hours": settings.label_horizon_hours,
        "lateness_hours": settings.lateness_hours,
        "seed": settings.seed,
        "max_rows": config.max_rows,
        "stride_hours": stride,
        "snapshots_read": [format_hour(s) for s in chosen if s not in set(reconstructed)],
        "snapshots_reconstructed": [format_hour(s) for s in reconstructed],
        "drawing_seconds": round(drawing_seconds, 3),
        "leakage_check": leakage,
        "run_id": run_id,
    }
    lake.write_dir(directory, [(TRAIN_FILE, _parquet_bytes(train)), (EVAL_FILE, _parquet_bytes(evaluation))], manifest)
    return result


def read_training_set(settings: Settings, version: str) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """``(train, eval, manifest)`` of a written training set."""
    directory = Lake(settings.lake).path(TRAINING, version)
    manifest = read_json(directory / MANIFEST)
    return pq.read_table(directory / TRAIN_FILE), pq.read_table(directory / EVAL_FILE), manifest
