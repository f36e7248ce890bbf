"""Publishing one hour's segments: snapshot and scores in, segments, contact history and exports out.

Outputs, the suppression list as a change and stability: docs/segments.md.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from profile_engine.config import Settings
from profile_engine.contracts.events import SCHEMA_VERSION
from profile_engine.contracts.profiles import USER_ID
from profile_engine.contracts.scores import MODEL_VERSION, PROPENSITY, SCORE_COLUMNS, SCORE_SCHEMA
from profile_engine.contracts.segments import (
    ACTION,
    CHANGE,
    CHANNEL,
    CONTACT_HOUR,
    CONTACT_SCHEMA,
    CONTROL_FLAG,
    ENTERED,
    EXPORT_COLUMNS,
    EXPORT_SCHEMA,
    HELD_BY_STAY,
    LEFT,
    OFFER,
    REASON,
    RULE,
    SEGMENT,
    SEGMENT_SCHEMA,
    SEGMENTS_COL,
    SUPPRESS_CHANGES,
    SUPPRESS_FULL,
    USER_KEY,
)
from profile_engine.hours import HOUR, floor_hour, format_hour
from profile_engine.lake import db, faults
from profile_engine.lake import storage as lk
from profile_engine.privacy.keys import ExportKey, export_key, pseudonymize_array
from profile_engine.profiles.population import add_counts, value_counts
from profile_engine.segments.assign import (
    add_population_columns,
    assign_segments,
    population_stats,
    share_counts,
    share_report,
    share_warning,
)
from profile_engine.segments.optouts import read_optouts
from profile_engine.segments.partitions import bucket_rows
from profile_engine.segments.rules import (
    NO_ACTION,
    OPTED_OUT,
    POPULATION_COLUMNS,
    SUPPRESS,
    SegmentRule,
    load_rules,
    rule_connection,
    rule_inputs,
    rules_file,
    sql_literal,
)

_LOG = logging.getLogger(__name__)


def _profile_buckets(lake: lk.Lake, hour: datetime) -> list[int]:
    """The buckets of the committed profile snapshot of ``hour``; fails naming the hour when uncommitted."""
    marker = lake.partition(lk.PROFILES, hour) / lk.MANIFEST
    if not marker.is_file():
        raise FileNotFoundError(
            f"profile snapshot of hour {format_hour(hour)} is not committed (no {marker}); "
            "publish_profiles must finish that hour first"
        )
    found = sorted(_bucket_of(m.parent) for m in marker.parent.glob(f"bucket=*/{lk.MANIFEST}"))
    if not found:
        raise FileNotFoundError(
            f"profile snapshot of hour {format_hour(hour)} has no committed bucket under {marker.parent}"
        )
    return found


def _bucket_of(folder: Path) -> int:
    """The number of a ``bucket=N`` folder."""
    return int(folder.name.split("=", 1)[1])


def _score_reader(lake: lk.Lake, hour: datetime) -> tuple[Callable[[int], pa.Table | None], bool]:
    """A function giving one bucket's scores (None: no scores for it), and whether the hour has scores at all.

    Scores are written per bucket (``score_profiles``): a bucket's scores are read with their
    deciles over every bucket (``score_reader``, cut points found once). Scores of one
    partition per hour (older lakes) are read once, and each bucket's profiles join the users they have.
    """
    from profile_engine.model.scoring import score_reader

    try:
        read = score_reader(lake, hour)
    except FileNotFoundError:
        return (lambda bucket: None), False
    found = {_bucket_of(m.parent) for m in lake.partition(lk.SCORES, hour).glob(f"bucket=*/{lk.MANIFEST}")}
    if found:
        return (lambda bucket: read(bucket).select([USER_ID, *SCORE_COLUMNS]) if bucket in found else None), True
    whole = read(None).select([USER_ID, *SCORE_COLUMNS])
    return (lambda bucket: whole), True


def _rules_for(lake: lk.Lake, hour: datetime, layout: _Layout, path: Path) -> list[SegmentRule]:
    """The rules of ``path``, validated against the columns of ``hour``'s profiles and scores."""
    first = lake.data_files(lk.PROFILES, hour, layout.buckets[0])[0]
    return load_rules(path, columns=_evaluated_schema(pq.read_schema(first)))


def _evaluated_reader(
    lake: lk.Lake, hour: datetime, layout: _Layout, rules: Sequence[SegmentRule]
) -> tuple[Callable[[int], pa.Table], bool]:
    """A function giving one bucket's profiles as ``rules`` see them (the columns they read: ``rule_inputs``; scores
    joined, population columns over every bucket: ``population_stats``), and whether the hour has scores at all."""
    scores_of, scores_available = _score_reader(lake, hour)
    inputs = sorted({USER_ID, *(c for column in POPULATION_COLUMNS.values() for c in column.inputs)})
    stats = population_stats(lambda: (lake.read(lk.PROFILES, hour, b, columns=inputs) for b in layout.buckets))
    read = rule_inputs(rules)
    columns = [c for c in pq.read_schema(lake.data_files(lk.PROFILES, hour, layout.buckets[0])[0]).names if c in read]

    def evaluated_of(bucket: int) -> pa.Table:
        profiles = lake.read(lk.PROFILES, hour, bucket, columns=columns)
        return add_population_columns(_join_scores(profiles, scores_of(bucket)), stats)

    return evaluated_of, scores_available


def _evaluated_schema(profiles: pa.Schema) -> pa.Schema:
    """The schema rules are evaluated against: the profile columns, then the score columns (``_join_scores``)."""
    return pa.schema([*(f for f in profiles if f.name not in SCORE_COLUMNS), *SCORE_SCHEMA])


def _join_scores(profiles: pa.Table, scores: pa.Table | None) -> pa.Table:
    """Profiles with the score columns (NULL where a user has no score)."""
    base = profiles.drop_columns([c for c in SCORE_COLUMNS if c in profiles.column_names])
    if scores is None:
        for field in SCORE_SCHEMA:
            base = base.append_column(field, pa.nulls(base.num_rows, field.type))
        return base

    ids, scored_ids = base.column(USER_ID), scores.column(USER_ID)
    if _ascending_unique(ids) and ids.type == scored_ids.type and ids.equals(scored_ids):
        # The scores hold the bucket's users in the profiles' order (``score_profiles`` writes them so): the join
        # below would give these rows in this order, so the score columns are appended as they are.
        for field in SCORE_SCHEMA:
            base = base.append_column(field, scores.column(field.name).cast(field.type))
        return base.cast(_evaluated_schema(base.schema))

    con = db.cursor()
    try:
        con.register("base_input", base)
        con.register(
            "scores_input",
            scores.select([USER_ID, *SCORE_COLUMNS]).cast(pa.schema([pa.field(USER_ID, pa.string()), *SCORE_SCHEMA])),
        )
        score_cols = ", ".join(f"s.{c}" for c in SCORE_COLUMNS)
        joined = con.sql(
            f"SELECT b.*, {score_cols} FROM base_input b LEFT JOIN scores_input s USING ({USER_ID}) ORDER BY b.{USER_ID}"
        ).to_arrow_table()
    finally:
        con.close()
    return joined.cast(_evaluated_schema(base.schema))


def _ascending_unique(ids: pa.ChunkedArray) -> bool:
    """Whether ``ids`` are strictly ascending (byte order, as DuckDB sorts VARCHAR): sorted, no id twice, no null."""
    if ids.null_count:
        return False
    if len(ids) < 2:
        return True
    flat = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    return bool(pc.all(pc.less(flat.slice(0, len(flat) - 1), flat.slice(1))).as_py())


@dataclass(frozen=True)
class _Layout:
    """How this hour's outputs are bucketed: the snapshot's ``buckets`` (folders), users placed by ``bucket_sql``
    over ``count`` (``Settings.buckets``)."""

    buckets: tuple[int, ...]
    count: int


def _bucket_part(
    lake: lk.Lake,
    layer: str,
    hour: datetime,
    bucket: int,
    layout: _Layout,
    columns: list[str],
    manifest: Mapping[str, Any] | None = None,
) -> pa.Table | None:
    """``columns`` of the rows of ``bucket``'s users in the committed ``layer`` partition of ``hour``, or None when
    it is not committed (``partitions.bucket_rows``: from the bucket's folder, or filtered while read from an hour
    written whole). ``manifest``: the partition's hour-level manifest when the caller read it already (once per
    hour, not per bucket)."""
    if manifest is None:
        if not lake.committed(layer, hour):
            return None
        manifest = lake.manifest(layer, hour)
    return bucket_rows(lake, layer, {hour: manifest}, bucket, layout.count, columns)


def _recent_contact_hours(lake: lk.Lake, hour: datetime, window_hours: int) -> list[tuple[int, dict[str, Any]]]:
    """The ages (hours before ``hour``) of the committed contact partitions of the ``window_hours - 1`` hours before
    ``hour``, each with its manifest: looked up once per run, then read per bucket (``_read_recent_contacts``)."""
    found = []
    for age in range(1, window_hours):
        if lake.committed(lk.CONTACTS, hour - age * HOUR):
            found.append((age, lake.manifest(lk.CONTACTS, hour - age * HOUR)))
    return found


def _read_recent_contacts(
    lake: lk.Lake, hour: datetime, ages: Sequence[tuple[int, Mapping[str, Any]]], bucket: int, layout: _Layout
) -> pa.Table:
    """Contacts of ``bucket``'s users in the committed contact partitions ``ages`` hours before ``hour``
    (``_recent_contact_hours``: the window's, found once per run) with their age in hours.

    A contact ``k`` hours ago blocks an action whose cooldown is more than ``k`` hours; the
    hour itself is excluded, so a rerun of ``hour`` does not block itself.
    """
    tables = []
    for age, manifest in ages:
        table = _bucket_part(lake, lk.CONTACTS, hour - age * HOUR, bucket, layout, [USER_ID, ACTION], manifest)
        if table is not None:
            tables.append(table.append_column("hours_ago", pa.array([age] * table.num_rows, pa.int64())))
    if not tables:
        return pa.table(
            {
                USER_ID: pa.array([], pa.string()),
                ACTION: pa.array([], pa.string()),
                "hours_ago": pa.array([], pa.int64()),
            }
        )
    return pa.concat_tables(tables)


def _contacts_of(assigned: pa.Table, hour: datetime) -> pa.Table:
    """This hour's contact rows: every delivered action and every control hold-out."""
    con = db.cursor()
    try:
        con.register("assigned_input", assigned)
        table = con.sql(
            f"SELECT {USER_ID}, {ACTION}, {RULE} FROM assigned_input "
            f"WHERE {ACTION} NOT IN ('{NO_ACTION}', '{SUPPRESS}', '{OPTED_OUT}') ORDER BY {USER_ID}"
        ).to_arrow_table()
    finally:
        con.close()
    # One scalar repeated (a list of one datetime per row converted by pyarrow cost 0.1-0.4 CPU s an hour: issue 19).
    hours = pa.repeat(pa.scalar(floor_hour(hour), pa.timestamp("ms", tz="UTC")), table.num_rows)
    return table.append_column(CONTACT_HOUR, hours).cast(CONTACT_SCHEMA)


def _export_tables(assigned: pa.Table, actions: Sequence[str], previous: pa.Table | None) -> dict[str, pa.Table]:
    """The rows each exported action's file holds (raw ids still; pseudonymised when written).

    Contact actions list this hour's recipients. ``suppress`` lists the change of the
    suppression list (users with action ``suppress``) against ``previous``, the committed
    segments of the previous hour: ``entered`` (suppressed now, not then) and ``left``
    (suppressed then, not now), so an unchanged list exports no row; without ``previous``
    every member is ``entered`` (a full list). A user who opted out since gets no ``left``
    row: opted-out users are never exported, and they stay suppressed downstream.
    """
    con = db.cursor()
    tables: dict[str, pa.Table] = {}
    prev = (
        previous.select([USER_ID, ACTION, RULE, OFFER, CHANNEL])
        if previous is not None
        else pa.table({c: pa.array([], pa.string()) for c in (USER_ID, ACTION, RULE, OFFER, CHANNEL)})
    )
    try:
        con.register("assigned_input", assigned)
        con.register("previous_input", prev)
        for action in actions:
            if action != SUPPRESS:
                tables[action] = con.sql(
                    f"SELECT {USER_ID}, {RULE} AS {SEGMENT}, {OFFER}, {CHANNEL}, {REASON}, {PROPENSITY}, "
                    f"CAST(NULL AS VARCHAR) AS {CHANGE} "
                    f"FROM assigned_input WHERE {ACTION} = {sql_literal(action)} ORDER BY {USER_ID}"
                ).to_arrow_table()
                continue
            tables[action] = con.sql(
                f"""
                WITH now AS (SELECT * FROM assigned_input WHERE {ACTION} = '{SUPPRESS}'),
                was AS (SELECT * FROM previous_input WHERE {ACTION} = '{SUPPRESS}')
                SELECT {USER_ID}, {RULE} AS {SEGMENT}, {OFFER}, {CHANNEL}, {REASON}, {PROPENSITY},
                       '{ENTERED}' AS {CHANGE}
                FROM now ANTI JOIN was USING ({USER_ID})
                UNION ALL
                SELECT w.{USER_ID}, w.{RULE}, w.{OFFER}, w.{CHANNEL}, w.{RULE} || ': left the suppression list',
                       CAST(NULL AS DOUBLE), '{LEFT}'
                FROM was w
                ANTI JOIN (SELECT {USER_ID} FROM assigned_input WHERE {ACTION} IN ('{SUPPRESS}', '{OPTED_OUT}')) a
                    USING ({USER_ID})
                ORDER BY {USER_ID}
                """
            ).to_arrow_table()
    finally:
        con.close()
    return tables


def _suppress_summary(
    counts: Mapping[str, int], list_size: int, previous_hour: datetime, has_previous: bool
) -> dict[str, Any]:
    """What the suppress export holds: ``full`` list or ``changes`` to ``base_hour``'s, list size, entered, left.

    ``counts``: rows of the suppress export per ``change``, summed over the buckets; ``list_size``: users suppressed now.
    """
    return {
        "mode": SUPPRESS_CHANGES if has_previous else SUPPRESS_FULL,
        "base_hour": format_hour(previous_hour) if has_previous else None,
        "list_size": list_size,
        "entered": counts.get(ENTERED, 0),
        "left": counts.get(LEFT, 0),
    }


def _keyed(table: pa.Table, keys: pa.Array) -> pa.Table:
    """An export table as users get it: pseudonyms ``keys`` instead of ids, sorted by pseudonym, ``EXPORT_SCHEMA``."""
    keyed = table.drop_columns([USER_ID]).add_column(0, USER_KEY, keys)
    return keyed.sort_by([(USER_KEY, "ascending")]).select(list(EXPORT_COLUMNS)).cast(EXPORT_SCHEMA)


def _write_runs(tables: Mapping[str, pa.Table], key: ExportKey, runs: Path, bucket: int) -> None:
    """One bucket's export rows per action, keyed and sorted, as ``<runs>/<action>/<bucket>.parquet`` (a sorted run).

    The ids of every action's rows are pseudonymised in one pass (a DuckDB connection costs tens of ms).
    Row groups of ``_RUN_BATCH_ROWS``: the merge (``merge_sorted_runs``) reads a run a row group at a time.
    """
    ids = pa.chunked_array([t.column(USER_ID) for t in tables.values()], pa.string())
    keys = pseudonymize_array(ids, key)
    start = 0
    for action, table in tables.items():
        (runs / action).mkdir(exist_ok=True)
        keyed = _keyed(table, keys.slice(start, table.num_rows))
        pq.write_table(keyed, runs / action / f"{bucket}.parquet", row_group_size=_RUN_BATCH_ROWS)
        start += table.num_rows


# pq.write_table's row groups (1024 * 1024 rows): the merged files are the ones it writes of the whole table.
_ROW_GROUP_ROWS = 1024 * 1024
# The rows of a row group are held in blocks of about this many rows, each one chunk: the merge's small parts (a few
# thousand rows, cut out of its batches) held as they come took twice the rows' size at 1M rows (the allocator's).
_BLOCK_ROWS = 64 * 1024
# Rows of a sorted run read at a time by the merge, and its row groups (a reader holds a row group's column chunks):
# the merge holds this many rows of each run. 1024 held 17-35 MB over the export phase of 800k profiles, 8192 46-64 MB.
_RUN_BATCH_ROWS = 1024


def merge_sorted_runs(
    files: Sequence[Path], key: str, schema: pa.Schema, batch_rows: int = _RUN_BATCH_ROWS
) -> Iterator[pa.Table]:
    """The rows of the Parquet files ``files``, each sorted by ``key`` (a key value in at most one row of them all),
    in ``key`` order as ``schema``, a slice at a time: one sort of all their rows, holding ``batch_rows`` of each.

    A k-way merge by slices: every row up to the smallest of the files' last keys in hand
    (no file has a smaller key still to come) is taken from each file and sorted; the file
    holding that smallest key is then used up and reads its next batch.
    """
    readers = [
        pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=batch_rows, columns=schema.names, use_threads=False)
        for f in files
    ]

    def next_rows(i: int) -> pa.Table | None:
        """File ``i``'s next non-empty batch; None when it is used up."""
        for batch in readers[i]:
            if batch.num_rows:
                return pa.Table.from_batches([batch]).cast(schema)
        return None

    held = {i: rows for i in range(len(readers)) if (rows := next_rows(i)) is not None}
    while held:
        bound = min(rows.column(key)[-1].as_py() for rows in held.values())
        parts = []
        for i, rows in list(held.items()):
            taken = int(pc.sum(pc.less_equal(rows.column(key), bound)).as_py() or 0)
            parts.append(rows.slice(0, taken))
            rest = rows.slice(taken) if taken < rows.num_rows else next_rows(i)
            if rest is None:
                del held[i]
            else:
                held[i] = rest
        yield pa.concat_tables(parts).sort_by([(key, "ascending")])


def _write_row_group(writer: pq.ParquetWriter, parts: list[pa.Table]) -> None:
    """``parts`` (emptied) as one row group of ``writer``, each column one contiguous chunk as in the whole table (the
    writer's pages and dictionary fallback follow its chunks), each column copied as the parts' copy of it goes."""
    if not parts:
        writer.write_table(EXPORT_SCHEMA.empty_table())
        return
    columns = {field.name: [part.column(field.name) for part in parts] for field in EXPORT_SCHEMA}
    parts.clear()
    arrays = []
    for field in EXPORT_SCHEMA:
        chunks = [chunk for column in columns.pop(field.name) for chunk in column.chunks]
        arrays.append(pa.chunked_array(chunks, field.type).combine_chunks())
        del chunks
    writer.write_table(pa.Table.from_arrays(arrays, schema=EXPORT_SCHEMA))


def _export_files(runs: Path, actions: Sequence[str], folder: Path) -> Iterator[str]:
    """``<action>.csv`` and ``<action>.parquet`` per action written into ``folder`` (``Lake.write_dir_streamed``), one
    action at a time: every bucket's sorted run merged by pseudonym (``merge_sorted_runs``) and appended to both files
    as it comes. What is held: a batch of each run, and the rows of one Parquet row group (``_ROW_GROUP_ROWS``, the
    whole-table writer's, so the same bytes) while it fills, copied a column at a time when written."""
    for action in actions:
        files = sorted((runs / action).glob("*.parquet"))
        with (
            pacsv.CSVWriter(folder / f"{action}.csv", EXPORT_SCHEMA) as csv_writer,
            pq.ParquetWriter(folder / f"{action}.parquet", EXPORT_SCHEMA, compression="zstd") as parquet_writer,
        ):
            blocks: list[pa.Table] = []  # the row group so far, in blocks of about _BLOCK_ROWS rows (one chunk each)
            loose: list[pa.Table] = []  # and the merge's parts since the last block
            held = loose_rows = 0
            written = False
            for part in merge_sorted_runs(files, USER_KEY, EXPORT_SCHEMA):
                csv_writer.write_table(part)
                while part.num_rows:
                    take = min(part.num_rows, _ROW_GROUP_ROWS - held)
                    loose.append(part.slice(0, take))
                    part, held, loose_rows = part.slice(take), held + take, loose_rows + take
                    if loose_rows >= _BLOCK_ROWS or held == _ROW_GROUP_ROWS:
                        blocks.append(pa.concat_tables(loose).combine_chunks())
                        loose, loose_rows = [], 0
                    if held == _ROW_GROUP_ROWS:
                        _write_row_group(parquet_writer, blocks)
                        held, written = 0, True
            if held or not written:
                _write_row_group(parquet_writer, [*blocks, *loose])
        yield f"{action}.csv"
        yield f"{action}.parquet"


# Per segment, the counts stability is made of; counts of buckets add up (a user is in one bucket).
_STABILITY_COUNTS = ("size", "held_by_stay", "control", "previous_size", "entered", "exited", "stayed")


def stability_counts(assigned: pa.Table, previous: pa.Table | None, rule_names: Sequence[str]) -> dict[str, list[int]]:
    """Per segment of ``assigned`` and ``previous`` (the same users' segments an hour before): ``_STABILITY_COUNTS``."""
    con = rule_connection()
    try:
        con.register("current_input", assigned.select([USER_ID, SEGMENTS_COL, HELD_BY_STAY, RULE, CONTROL_FLAG]))
        prev = (
            previous.select([USER_ID, SEGMENTS_COL])
            if previous is not None
            else pa.table({USER_ID: pa.array([], pa.string()), SEGMENTS_COL: pa.array([], pa.list_(pa.string()))})
        )
        con.register("previous_input", prev)
        con.register("rule_names", pa.table({"name": pa.array(list(rule_names), pa.string())}))
        # Set operations per segment in DuckDB (a Python set per segment took 2.2 s at 654k users).
        rows = con.execute(
            f"""
            WITH cur AS (SELECT DISTINCT {USER_ID}, unnest({SEGMENTS_COL}) AS name FROM current_input),
            names AS (SELECT name FROM rule_names UNION SELECT name FROM cur),
            old AS (
                SELECT DISTINCT {USER_ID}, name FROM (
                    SELECT {USER_ID}, unnest({SEGMENTS_COL}) AS name FROM previous_input
                ) WHERE name IN (SELECT name FROM names)
            ),
            pairs AS (
                SELECT coalesce(c.name, o.name) AS name, c.{USER_ID} IS NOT NULL AS now, o.{USER_ID} IS NOT NULL AS was
                FROM cur c FULL OUTER JOIN old o ON c.{USER_ID} = o.{USER_ID} AND c.name = o.name
            ),
            counts AS (
                SELECT name, count(*) FILTER (WHERE now) AS size, count(*) FILTER (WHERE was) AS previous_size,
                       count(*) FILTER (WHERE now AND NOT was) AS entered,
                       count(*) FILTER (WHERE was AND NOT now) AS exited,
                       count(*) FILTER (WHERE now AND was) AS stayed
                FROM pairs GROUP BY name
            ),
            held AS (
                SELECT name, count(*) AS held_by_stay
                FROM (SELECT unnest({HELD_BY_STAY}) AS name FROM current_input) GROUP BY name
            ),
            control AS (
                SELECT {RULE} AS name, count(*) AS control FROM current_input
                WHERE {CONTROL_FLAG} AND {RULE} IS NOT NULL GROUP BY {RULE}
            )
            SELECT n.name, coalesce(k.size, 0), coalesce(h.held_by_stay, 0), coalesce(c.control, 0),
                   coalesce(k.previous_size, 0), coalesce(k.entered, 0), coalesce(k.exited, 0), coalesce(k.stayed, 0)
            FROM names n LEFT JOIN counts k USING (name) LEFT JOIN held h USING (name) LEFT JOIN control c USING (name)
            """
        ).fetchall()
    finally:
        con.close()
    return {str(row[0]): [int(v) for v in row[1:]] for row in rows}


def stability_report(
    counts: Mapping[str, Sequence[int]], has_previous: bool, rule_names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """The stability of ``counts`` (``stability_counts``, summed over the buckets), segments in rule order."""
    order = {name: i for i, name in enumerate(rule_names)}
    result: dict[str, dict[str, Any]] = {}
    for name in sorted(counts, key=lambda n: (order.get(n, len(order)), n)):
        size, held, control, previous_size, entered, exited, stayed = counts[name]
        union = size + exited
        result[name] = {
            "size": size,
            "held_by_stay": held,
            "control": control,
            "previous_size": previous_size if has_previous else None,
            "entered": entered if has_previous else None,
            "exited": exited if has_previous else None,
            "stayed": stayed if has_previous else None,
            "overlap": (round(stayed / union, 4) if union else None) if has_previous else None,
        }
    return result


def _add_stability(total: dict[str, list[int]], counts: Mapping[str, Sequence[int]]) -> None:
    for name, values in counts.items():
        total[name] = [a + b for a, b in zip(total.get(name, [0] * len(_STABILITY_COUNTS)), values, strict=True)]


def _add_shares(total: dict[str, tuple[int, int]], counts: Mapping[str, tuple[int, int]]) -> None:
    for name, (matched, judged) in counts.items():
        before = total.get(name, (0, 0))
        total[name] = (before[0] + matched, before[1] + judged)


def segment_stability(
    assigned: pa.Table, previous: pa.Table | None, rule_names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per segment: size, entered, exited, stayed, overlap with the previous hour, flips prevented, control size.

    ``overlap`` is the Jaccard index of this hour's and the previous hour's members;
    ``held_by_stay`` counts members kept only by the ``stay`` condition (flips that
    hysteresis prevented); ``control`` the members held out as control group of that
    segment. Without a previous hour, entered/exited/stayed/overlap are None.
    ``publish_segments`` adds the ``stability_counts`` of every bucket (``stability_report``).
    """
    return stability_report(stability_counts(assigned, previous, rule_names), previous is not None, rule_names)


def _model_version(versions: set[str]) -> str | list[str] | None:
    """The model version(s) behind this hour's scores (one string when one model scored everyone)."""
    ordered = sorted(versions)
    return ordered[0] if len(ordered) == 1 else (ordered or None)


def _uncommit(lake: lk.Lake, layer: str, hour: datetime, buckets: Sequence[int]) -> None:
    """Take ``layer``'s hour out of the committed ones before its buckets are rewritten.

    The hour-level manifest goes first (readers then see no partition), then what a
    rewrite would not replace: the one file of the hour written whole by older code and
    the folders of buckets this snapshot does not have.
    """
    base = lake.partition(layer, hour)
    (base / lk.MANIFEST).unlink(missing_ok=True)
    (base / lk.DATA_FILE).unlink(missing_ok=True)
    for folder in base.glob("bucket=*"):
        if _bucket_of(folder) not in buckets:
            shutil.rmtree(folder)


def _commit(
    lake: lk.Lake,
    layer: str,
    hour: datetime,
    layout: _Layout,
    rows: int,
    columns: Sequence[str],
    run_id: str,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """The hour-level ``_manifest.json`` of a layer written per bucket: its commit point, written last."""
    lk.write_json(
        lake.partition(layer, hour) / lk.MANIFEST,
        {
            "layer": layer,
            "data_hour": format_hour(hour),
            "buckets": list(layout.buckets),
            "bucket_count": layout.count,
            "rows": rows,
            "columns": list(columns),
            "schema_version": SCHEMA_VERSION,
            "run_id": run_id,
            "written_at": datetime.now(UTC).isoformat(),
            **(extra or {}),
        },
    )


def publish_segments(
    settings: Settings,
    hour: datetime,
    *,
    run_id: str = "manual",
    rules_path: Path | None = None,
    dry_run: bool = False,
    export_key_secret: str | None = None,
    optout_engine: Any | None = None,
) -> dict[str, Any]:
    """Assign segments and actions for ``hour``, write the segments partition and the exports; one bucket at a time.

    Reads the committed profile snapshot of the hour and its scores (NULL propensity,
    said in the summary, when none are committed), validates the rules against those
    columns and resolves the export key before writing anything. The population columns
    rules read (``monetary_percentile``) come from per-bucket summaries
    (:func:`population_stats`). Then per bucket of the snapshot: its profiles and scores,
    the previous hour's segments and the recent contacts of its users, assignment, share
    counts and stability counts, ``segments/`` and ``contacts/`` of the bucket (one row per
    member with score and control flag; the contact history rewritten whole, so reruns do
    not double count) and the bucket's export rows as sorted runs. Last the hour-level
    manifests of ``segments/`` (run id, rules-file hash, model version, sizes, stability,
    share checks: the commit point) and ``contacts/``, and ``exports/``: per action a CSV
    and a Parquet file of pseudonymised users merged from the runs, then
    ``_manifest.json`` with checksums. Opted-out users (:func:`read_optouts`;
    ``optout_engine`` adds the SQL table) are never exported. ``export_key_secret`` is the
    Airflow Connection's key (see :func:`export_key`). ``dry_run`` computes and returns the
    summary but writes nothing. Returns a small JSON-able summary, including
    ``manifest_path`` for the Asset event.
    """
    hour = floor_hour(hour)
    lake = lk.Lake(settings.lake)
    layout = _Layout(tuple(_profile_buckets(lake, hour)), settings.buckets)
    path = rules_file(rules_path)
    rules = _rules_for(lake, hour, layout, path)
    key = None if dry_run else export_key(settings, connection_key=export_key_secret)
    evaluated_of, scores_available = _evaluated_reader(lake, hour, layout, rules)

    previous_hour = hour - HOUR
    has_previous = lake.committed(lk.SEGMENTS, previous_hour)
    contact_hours = _recent_contact_hours(lake, hour, max(r.cooldown_hours for r in rules))
    optouts = read_optouts(lake, optout_engine)
    rule_names = [r.name for r in rules]
    exported_actions = sorted({r.action for r in rules})
    previous_columns = [USER_ID, SEGMENTS_COL, ACTION, RULE, OFFER, CHANNEL]

    profiles = members = scored = contacts = 0
    sizes = {name: 0 for name in rule_names}
    action_counts: dict[str, int] = {}
    export_rows = {action: 0 for action in exported_actions}
    suppress_changes: dict[str, int] = {}
    shares: dict[str, tuple[int, int]] = {}
    stability_total: dict[str, list[int]] = {}
    versions: set[str] = set()
    runs = None if key is None else lake.tmp_dir()
    try:
        if key is not None:
            for layer in (lk.SEGMENTS, lk.CONTACTS):
                _uncommit(lake, layer, hour, layout.buckets)
        for bucket in layout.buckets:
            evaluated = evaluated_of(bucket)
            previous = _bucket_part(lake, lk.SEGMENTS, previous_hour, bucket, layout, previous_columns)
            recent = _read_recent_contacts(lake, hour, contact_hours, bucket, layout)
            assigned, bucket_sizes = assign_segments(evaluated, rules, previous, recent, optouts)
            for name, n in bucket_sizes.items():
                sizes[name] += n
            _add_stability(stability_total, stability_counts(assigned, previous, rule_names))
            _add_shares(shares, share_counts(evaluated, rules))
            add_counts(action_counts, value_counts(assigned.column(ACTION)))
            tables = _export_tables(assigned, exported_actions, previous)
            for action, table in tables.items():
                export_rows[action] += table.num_rows
            if SUPPRESS in tables:
                add_counts(suppress_changes, value_counts(tables[SUPPRESS].column(CHANGE)))
            contact_rows = _contacts_of(assigned, hour)
            profiles += evaluated.num_rows
            members += assigned.num_rows
            scored += evaluated.num_rows - evaluated.column(PROPENSITY).null_count
            contacts += contact_rows.num_rows
            if MODEL_VERSION in evaluated.column_names:
                versions |= {v for v in pc.unique(evaluated.column(MODEL_VERSION)).to_pylist() if v}
            if key is not None and runs is not None:
                lake.write_partition(lk.SEGMENTS, hour, assigned, bucket=bucket, run_id=run_id)
                lake.write_partition(lk.CONTACTS, hour, contact_rows, bucket=bucket, run_id=run_id)
                _write_runs(tables, key, runs, bucket)
            del evaluated, assigned, previous, recent, tables, contact_rows
        list_size = action_counts.get(SUPPRESS, 0)
        stability = stability_report(stability_total, has_previous, rule_names)
        checks = share_report(shares, rules)
        changes = {
            name: (row["size"] - row["previous_size"] if has_previous else None)
            for name, row in stability.items()
            if name in sizes
        }
        notes = []
        if not scores_available:
            scored = 0
            notes.append(f"no scores committed for {format_hour(hour)}: {PROPENSITY} is NULL, rules on it do not fire")
        elif scored < profiles:
            notes.append(f"{profiles - scored} of {profiles} profiles have no score")
        if not has_previous:
            notes.append(f"no segments committed for {format_hour(previous_hour)}: no hysteresis, no size change")
        if key is not None and key.generated:
            notes.append(f"pseudonyms use a new {key.source}")
        for check in checks:
            if check["over"]:
                notes.append(share_warning(check))
                _LOG.warning("%s: %s", format_hour(hour), share_warning(check))

        suppress = (
            _suppress_summary(suppress_changes, list_size, previous_hour, has_previous)
            if SUPPRESS in export_rows
            else None
        )
        rules_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        model_version = _model_version(versions)
        exports_dir = lake.partition(lk.EXPORTS, hour)
        summary: dict[str, Any] = {
            "hour": format_hour(hour),
            "run_id": run_id,
            "dry_run": dry_run,
            "rules_file": str(path),
            "rules": rule_names,
            "profiles": profiles,
            "members": members,
            "scores_available": scores_available,
            "scored_profiles": scored,
            "model_version": model_version,
            "previous_hour_committed": has_previous,
            "segments": sizes,
            "segment_change": changes,
            "stability": stability,
            "share_checks": checks,
            "actions": dict(sorted(action_counts.items())),
            "exports": export_rows,
            "suppress": suppress,
            "opted_out": action_counts.get(OPTED_OUT, 0),
            "contacts": contacts,
            "export_key": None if key is None else {"source": key.source, "key_id": key.key_id},
            "notes": notes,
            "segments_path": None,
            "exports_path": None,
            "manifest_path": None,
        }
        if dry_run or key is None or runs is None:
            return summary

        extra = {
            "rules_sha256": rules_sha256,
            "scores_available": scores_available,
            "model_version": model_version,
            "segments": sizes,
            "stability": stability,
            "share_checks": checks,
        }
        _commit(lake, lk.SEGMENTS, hour, layout, members, SEGMENT_SCHEMA.names, run_id, extra)
        _commit(lake, lk.CONTACTS, hour, layout, contacts, CONTACT_SCHEMA.names, run_id)
        lake.write_dir_streamed(
            exports_dir,
            partial(_export_files, runs, exported_actions),
            {
                "layer": lk.EXPORTS,
                "data_hour": format_hour(hour),
                "run_id": run_id,
                "rules_file": path.name,
                "rules_sha256": rules_sha256,
                "model_version": model_version,
                "key_id": key.key_id,
                "columns": list(EXPORT_COLUMNS),
                "rows": export_rows,
                "suppress": suppress,
                "segments": sizes,
                "changes": {
                    name: {k: row[k] for k in ("entered", "exited", "stayed")} for name, row in stability.items()
                },
                "previous_hour_committed": has_previous,
            },
        )
    finally:
        if runs is not None:
            shutil.rmtree(runs, ignore_errors=True)
    summary["segments_path"] = str(lake.partition(lk.SEGMENTS, hour))
    summary["exports_path"] = str(exports_dir)
    summary["manifest_path"] = str(exports_dir / lk.MANIFEST)
    faults.maybe_fail(faults.EXPORTS_BEFORE_ASSET)
    return summary


def restated_manifests(lake: lk.Lake, hour: datetime) -> tuple[dict[str, Any], dict[str, Any] | None, list[str]]:
    """The hour-level manifests of ``segments/`` and ``exports/`` of ``hour`` with their counts restated over the
    rows the lake holds now (after an erasure), and notes on what could not be restated.

    From the rows left, as ``publish_segments`` counts them: the segment sizes and stability
    (``stability_counts`` of each bucket's segments against the previous hour's, when the hour
    had one: ``previous_size`` is not None), in the exports manifest the same sizes, the
    changes per segment and the suppression list's size, entered and left (the ``change``
    column of ``suppress.parquet``). The share checks are evaluated again with the hour's rules
    over its snapshot and scores as they are now (``share_counts``), when the rules file still
    has the hash the hour was published with; else they stay, with a note. The rest of both
    manifests (run id, rules hash, model version, the exports' ``rows`` and files) is unchanged.
    """
    segments = lake.manifest(lk.SEGMENTS, hour)
    names = list(segments.get("segments") or {})
    old_stability: dict[str, dict[str, Any]] = segments.get("stability") or {}
    has_previous = any(row.get("previous_size") is not None for row in old_stability.values())
    layout = _Layout(tuple(segments["buckets"]), int(segments["bucket_count"]))
    notes: list[str] = []
    previous_hour = hour - HOUR
    columns = [USER_ID, SEGMENTS_COL, HELD_BY_STAY, RULE, CONTROL_FLAG, ACTION]
    total: dict[str, list[int]] = {}
    suppressed = 0
    for bucket in layout.buckets:
        assigned = lake.read(lk.SEGMENTS, hour, bucket, columns=columns)
        previous = _bucket_part(lake, lk.SEGMENTS, previous_hour, bucket, layout, [USER_ID, SEGMENTS_COL])
        _add_stability(total, stability_counts(assigned, previous, names))
        suppressed += assigned.filter(pc.equal(assigned.column(ACTION), SUPPRESS)).num_rows
    stability = stability_report(total, has_previous, names)
    new = dict(segments, segments={name: stability[name]["size"] for name in names})
    if has_previous and not lake.committed(lk.SEGMENTS, previous_hour):
        notes.append(
            f"segments of {format_hour(hour)}: stability not restated, {format_hour(previous_hour)} is no longer committed"
        )
    elif "stability" in new:
        new["stability"] = stability
    path = rules_file()
    if segments.get("share_checks") and hashlib.sha256(path.read_bytes()).hexdigest() != segments.get("rules_sha256"):
        notes.append(f"segments of {format_hour(hour)}: share checks not restated, {path} changed since the hour")
    elif segments.get("share_checks"):
        rules = _rules_for(lake, hour, layout, path)
        evaluated_of, _ = _evaluated_reader(lake, hour, layout, rules)
        shares: dict[str, tuple[int, int]] = {}
        for bucket in layout.buckets:
            _add_shares(shares, share_counts(evaluated_of(bucket), rules))
        new["share_checks"] = share_report(shares, rules)
    if not lake.committed(lk.EXPORTS, hour):
        return new, None, notes
    exports = lake.manifest(lk.EXPORTS, hour)
    restated = dict(exports)
    if "segments" in exports:
        restated["segments"] = new["segments"]
    if "changes" in exports and "stability" in new:
        restated["changes"] = {
            name: {k: row[k] for k in ("entered", "exited", "stayed")} for name, row in new["stability"].items()
        }
    suppress_file = lake.partition(lk.EXPORTS, hour) / f"{SUPPRESS}.parquet"
    if isinstance(exports.get("suppress"), dict) and suppress_file.is_file():
        changes: dict[str, int] = {}
        # counted a batch at a time: the suppression list may hold most of the population
        for batch in pq.ParquetFile(suppress_file).iter_batches(columns=[CHANGE]):
            add_counts(changes, value_counts(batch.column(0)))
        restated["suppress"] = {
            **exports["suppress"],
            "list_size": suppressed,
            "entered": changes.get(ENTERED, 0),
            "left": changes.get(LEFT, 0),
        }
    return new, restated, notes
