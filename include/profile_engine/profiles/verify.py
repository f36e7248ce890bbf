"""``verify``: rebuild an hour's profile snapshot from staged events and compare it with the committed one,
column by column (floats to ``REL_TOLERANCE``), interests too. docs/features.md (Verification).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.config import Settings
from profile_engine.contracts.profiles import CATEGORY_ID, USER_ID
from profile_engine.contracts.traits import load_traits
from profile_engine.hours import HOUR, format_hour, hour_range
from profile_engine.lake.storage import INTERESTS, PROFILES, Lake
from profile_engine.profiles.build import snapshot_committed
from profile_engine.profiles.population import population_snapshot
from profile_engine.profiles.replay import rebuild_bucket_hours
from profile_engine.profiles.snapshot import snapshot

REL_TOLERANCE = 1e-9
EXAMPLES = 5  # differing values shown per column


@dataclass(frozen=True)
class ColumnDifference:
    """One column that differs: how many rows, and a few ``(key, expected, actual)`` examples."""

    column: str
    rows: int
    examples: list[tuple[Any, Any, Any]]


@dataclass
class TableComparison:
    """The differences between an expected (rebuilt) and an actual (committed) table."""

    name: str
    expected_rows: int
    actual_rows: int
    missing_keys: list[Any] = field(default_factory=list)  # in the rebuild only
    extra_keys: list[Any] = field(default_factory=list)  # in the committed table only
    schema_problems: list[str] = field(default_factory=list)
    columns: list[ColumnDifference] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        """No difference of any kind."""
        return not (self.missing_keys or self.extra_keys or self.schema_problems or self.columns)

    def lines(self) -> list[str]:
        """The differences, one line each (empty when equal)."""
        out = [f"{self.name}: {problem}" for problem in self.schema_problems]
        if self.missing_keys:
            out.append(
                f"{self.name}: {len(self.missing_keys)} rows missing in the committed table, e.g. {self.missing_keys[:EXAMPLES]}"
            )
        if self.extra_keys:
            out.append(
                f"{self.name}: {len(self.extra_keys)} rows not in the rebuild, e.g. {self.extra_keys[:EXAMPLES]}"
            )
        for diff in self.columns:
            shown = "; ".join(f"{k}: rebuilt {e!r} committed {a!r}" for k, e, a in diff.examples)
            out.append(f"{self.name}.{diff.column}: {diff.rows} rows differ, e.g. {shown}")
        return out


@dataclass
class VerifyResult:
    """What ``verify_hour`` found for one hour."""

    hour: datetime
    rebuilt_from: dict[int, str]  # bucket -> first staged hour the rebuild read
    comparisons: list[TableComparison]
    scratch: Path | None  # kept scratch lake, when asked for

    @property
    def equal(self) -> bool:
        """Whether the committed snapshot equals the rebuild."""
        return all(c.equal for c in self.comparisons)

    def render(self) -> str:
        """Human-readable outcome: the differences, or one line saying there are none."""
        firsts = sorted(set(self.rebuilt_from.values()))
        head = (
            f"verify {format_hour(self.hour)}: rebuilt {len(self.rebuilt_from)} buckets from staged hours "
            f"since {', '.join(firsts)}"
        )
        body = [line for c in self.comparisons for line in c.lines()]
        sizes = ", ".join(f"{c.name} {c.expected_rows} rows" for c in self.comparisons)
        verdict = "DIFFERENT" if body else f"EQUAL ({sizes}, floats to {REL_TOLERANCE:g} relative)"
        kept = [f"rebuild kept in {self.scratch}"] if self.scratch else []
        return "\n".join([head, *body, verdict, *kept])


def _same(expected: pa.ChunkedArray, actual: pa.ChunkedArray, rel: float) -> pa.ChunkedArray:
    """Row-wise equality with nulls equal to nulls; floats to ``rel`` relative (NaN equals NaN)."""
    both_null = pc.and_(pc.is_null(expected), pc.is_null(actual))
    if pa.types.is_floating(expected.type) and pa.types.is_floating(actual.type):
        scale = pc.max_element_wise(pc.abs(expected), pc.abs(actual))
        close = pc.less_equal(pc.abs(pc.subtract(expected, actual)), pc.multiply(scale, rel))
        same = pc.or_(close, pc.and_(pc.is_nan(expected), pc.is_nan(actual)))
        same = pc.or_(same, pc.equal(expected, actual))  # equal infinities
    else:
        same = pc.equal(expected, actual)
    return pc.or_kleene(both_null, pc.fill_null(same, False))


def compare_tables(
    name: str, expected: pa.Table, actual: pa.Table, keys: list[str], *, rel: float = REL_TOLERANCE
) -> TableComparison:
    """Compare two tables row by row on ``keys``, column by column on the rest.

    Floats are equal within ``rel`` relative difference, other values exactly, nulls
    only to nulls. Rows present on one side only are listed as missing or extra, and
    the common rows are compared. Columns must match in name and type.
    """
    result = TableComparison(name, expected.num_rows, actual.num_rows)
    for f in expected.schema:
        if f.name not in actual.column_names:
            result.schema_problems.append(f"column {f.name} missing in the committed table")
        elif actual.schema.field(f.name).type != f.type:
            result.schema_problems.append(f"column {f.name} is {actual.schema.field(f.name).type}, expected {f.type}")
    result.schema_problems += [
        f"unexpected column {c} in the committed table" for c in actual.column_names if c not in expected.column_names
    ]
    key_name = "__key__"

    def keyed(table: pa.Table) -> pa.Table:
        key = (
            table.column(keys[0])
            if len(keys) == 1
            else pc.binary_join_element_wise(*[table.column(k) for k in keys], "\x1f")
        )
        return table.append_column(key_name, key).sort_by(key_name)

    exp, act = keyed(expected), keyed(actual)
    in_act = pc.is_in(exp.column(key_name), value_set=act.column(key_name))
    in_exp = pc.is_in(act.column(key_name), value_set=exp.column(key_name))
    result.missing_keys = exp.filter(pc.invert(in_act)).column(key_name).to_pylist()
    result.extra_keys = act.filter(pc.invert(in_exp)).column(key_name).to_pylist()
    exp, act = exp.filter(in_act), act.filter(in_exp)
    duplicated = exp.num_rows != pc.count_distinct(exp.column(key_name)).as_py()
    if duplicated or act.num_rows != pc.count_distinct(act.column(key_name)).as_py():
        result.schema_problems.append(
            f"key {keys} is not unique in the {'rebuilt' if duplicated else 'committed'} table"
        )
        return result
    for column in expected.column_names:
        if (
            column in keys
            or column not in actual.column_names
            or act.schema.field(column).type != exp.schema.field(column).type
        ):
            continue  # a schema problem, listed above
        same = _same(exp.column(column), act.column(column), rel)
        differ = pc.invert(same)
        n = int(pc.sum(differ).as_py() or 0)
        if n:
            rows = pc.indices_nonzero(differ).slice(0, EXAMPLES)
            examples = list(
                zip(
                    exp.column(key_name).take(rows).to_pylist(),
                    exp.column(column).take(rows).to_pylist(),
                    act.column(column).take(rows).to_pylist(),
                    strict=True,
                )
            )
            result.columns.append(ColumnDifference(column, n, examples))
    return result


def verify_hours(
    settings: Settings,
    first: datetime,
    last: datetime,
    *,
    keep_scratch: bool = False,
    on_bucket: Callable[[int, int], None] | None = None,
) -> list[VerifyResult]:
    """Rebuild every hour ``first``..``last`` in a scratch lake and compare each with its committed snapshot.

    Every snapshot must be committed (``publish_profiles`` done), else ``FileNotFoundError`` naming the first
    that is not. Per bucket, one rebuild of ``first`` from staged events, then each later staged hour merged
    in memory (``replay.rebuild_bucket_hours``): a range costs one rebuild plus a snapshot an hour, not one
    rebuild an hour. One bucket's state is in memory at a time; the per-bucket profiles and interests go to
    the scratch lake, then per hour the population features are added (``population_snapshot``) and both
    tables compared. The scratch lake lives under the lake's ``_tmp/`` and is removed afterwards unless
    ``keep_scratch``. ``on_bucket(bucket, hours)``: called when a bucket's hours are rebuilt.
    """
    hours = list(hour_range(first, last))
    if not hours:
        raise ValueError(f"the last hour {format_hour(last)} is before the first {format_hour(first)}")
    lake = Lake(settings.lake)
    for hour in hours:
        if not snapshot_committed(settings, hour):
            raise FileNotFoundError(f"no committed profile snapshot for {format_hour(hour)} in {lake.root}")
    scratch = Lake(lake.tmp_dir() / "verify")
    firsts: dict[datetime, dict[int, str]] = {hour: {} for hour in hours}
    try:
        for bucket in range(settings.buckets):
            for hour, start, state in rebuild_bucket_hours(settings, hours[0], hours[-1], bucket):
                profiles, interests, *_ = snapshot(state, hour + HOUR, settings)
                scratch.write_partition(PROFILES, hour, profiles, bucket=bucket, run_id="verify")
                scratch.write_partition(INTERESTS, hour, interests, bucket=bucket, run_id="verify")
                firsts[hour][bucket] = format_hour(start)
            if on_bucket is not None:
                on_bucket(bucket, len(hours))
        traits = load_traits(settings.traits)
        results = []
        for hour in hours:
            parts = [scratch.read(PROFILES, hour, b) for b in range(settings.buckets)]
            comparisons = [
                compare_tables(
                    "profiles", population_snapshot(parts, hour, traits), lake.read(PROFILES, hour), [USER_ID]
                ),
                compare_tables(
                    "interests", scratch.read(INTERESTS, hour), lake.read(INTERESTS, hour), [USER_ID, CATEGORY_ID]
                ),
            ]
            results.append(VerifyResult(hour, firsts[hour], comparisons, scratch.root if keep_scratch else None))
    finally:
        if not keep_scratch:
            shutil.rmtree(scratch.root.parent, ignore_errors=True)
    return results


def verify_hour(settings: Settings, hour: datetime, *, keep_scratch: bool = False) -> VerifyResult:
    """Rebuild hour ``hour`` in a scratch lake and compare it with the committed snapshot (``verify_hours``)."""
    return verify_hours(settings, hour, hour, keep_scratch=keep_scratch)[0]
