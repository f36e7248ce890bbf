"""Exact population ranks from per-bucket summaries: the cut points of scores such as RFM quintiles and
propensity deciles, found one bucket at a time. docs/features.md (Population features per bucket).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.contracts.profiles import USER_ID
from profile_engine.lake import db

# Buckets are read again for every pass: a callable returning an iterable of tables (one per bucket).
Buckets = Callable[[], Iterable[pa.Table]]


@dataclass(frozen=True)
class RankSpec:
    """How a population is ordered: rows where ``where`` holds, by ``value`` (``descending`` or not), ties by
    ``tiebreak`` then ``user_id``; ``bin`` is a coarse prefix of ``tiebreak`` in the same order (it narrows a
    tie group to a few users); ``positions(n)`` are the 0-based ranks where the score steps up by one."""

    name: str
    value: str
    value_type: str
    tiebreak: str
    tiebreak_type: str
    bin: str
    where: str
    positions: Callable[[int], list[int]]
    descending: bool = False


@dataclass(frozen=True)
class Cut:
    """The sort key of the user at a step position; ``tiebreak``/``user_id`` None: the step is at a group's first user."""

    value: Any
    tiebreak: Any = None
    user_id: str | None = None


@dataclass(frozen=True)
class RankCuts:
    """The steps of ``spec`` over a population of ``n`` ranked users (in position order)."""

    spec: RankSpec
    n: int
    cuts: tuple[Cut, ...]


def quintile_positions(n: int) -> list[int]:
    """Where the RFM score ``least(5, 1 + floor(5 (k - 1/2) / n))`` of 1-based rank k steps to 2, 3, 4, 5."""
    # floor(5 (k - 1/2) / n) >= j  <=>  10 k - 5 >= 2 j n  <=>  k >= ceil((2 j n + 5) / 10)
    return [p for j in range(1, 5) if (p := -(-(2 * j * n + 5) // 10) - 1) < n]


def decile_positions(n: int) -> list[int]:
    """Where the decile ``10 - floor(10 t / n)`` (t users above, p = n - 1 - t from the bottom) steps to 2..10."""
    # floor(10 (n - 1 - p) / n) <= 9 - j  <=>  10 p >= j n - 9
    return [p for j in range(1, 10) if (p := max(0, -((9 - j * n) // 10))) < n]


def _literal(value: Any, kind: str) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    return "CAST('" + text.replace("'", "''") + f"' AS {kind})"


def _fetch(con: Any, sql: str) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = con.execute(sql).fetchall()
    return rows


def _per_bucket(buckets: Buckets, queries: Callable[[Any], None]) -> None:
    """Run ``queries(con)`` on every bucket in turn, registered as table ``t`` (one bucket in memory)."""
    for table in buckets():
        con = db.cursor()
        try:
            con.register("t", table)
            queries(con)
        finally:
            con.close()


def _numeric(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind))


class Histogram:
    """Counts per distinct value merged over buckets (pass 1 of ``rank_cuts``), one entry per distinct value.

    Integer and float values without null or NaN (what the specs give: BIGINT, DOUBLE) merge
    as sorted NumPy arrays: equal values (``-0.0`` and ``0.0`` too) are one group, shown as the
    first one met, as a dict keyed by the values would; ascending order is Python's ``sorted``
    of those keys and descending its reverse (the keys are distinct). Any other column (other
    types, nulls, NaN, types changing between buckets) merges in a dict sorted by Python, as
    it always was, so the order and errors stay Python's.
    """

    def __init__(self) -> None:
        self.values: np.ndarray | None = None  # ascending, distinct
        self.counts: np.ndarray = np.empty(0, dtype=np.int64)
        self.kind: pa.DataType | None = None
        self.zero: Any = None  # the first zero met (0.0 or -0.0), the key a dict would keep
        self.fallback: dict[Any, int] | None = None

    def add(self, table: pa.Table) -> None:
        column, counts = table.column(0).combine_chunks(), table.column(1).combine_chunks()
        whole = pa.types.is_decimal(column.type) and column.type.scale == 0  # DuckDB's HUGEINT, UHUGEINT
        if whole:
            with contextlib.suppress(pa.ArrowInvalid, pa.ArrowNotImplementedError):
                column = pc.cast(column, pa.int64())
        kind = column.type
        if self.fallback is None and (
            not _numeric(kind)
            or column.null_count
            or (self.kind is not None and kind != self.kind)
            or (pa.types.is_floating(kind) and bool(pc.any(pc.is_nan(column)).as_py()))
        ):
            self._to_dict()
        if self.fallback is not None:
            keys = column.to_pylist()
            if whole:  # fetchall gives these as int
                keys = [None if k is None else int(k) for k in keys]
            for value, count in zip(keys, counts.to_pylist(), strict=True):
                self.fallback[value] = self.fallback.get(value, 0) + int(count)
            return
        self.kind = kind
        values = column.to_numpy(zero_copy_only=False)
        if self.zero is None and pa.types.is_floating(kind):
            zeros = np.flatnonzero(values == 0)
            if len(zeros):
                self.zero = values[zeros[0]].item()
        number = counts.to_numpy(zero_copy_only=False).astype(np.int64)
        if self.values is not None:
            values = np.concatenate([self.values, values])
            number = np.concatenate([self.counts, number])
        order = np.argsort(values, kind="stable")
        values, number = values[order], number[order]
        first = np.ones(len(values), dtype=bool)
        first[1:] = values[1:] != values[:-1]
        starts = np.flatnonzero(first)
        self.values = values[starts]
        self.counts = np.add.reduceat(number, starts) if len(starts) else number[:0]

    def _to_dict(self) -> None:
        merged: dict[Any, int] = {}
        if self.values is not None:
            for value, count in zip(self._keys(self.values), self.counts.tolist(), strict=True):
                merged[value] = count
        self.fallback = merged

    def _keys(self, values: np.ndarray) -> list[Any]:
        keys: list[Any] = values.tolist()
        if self.zero is not None:
            keys = [self.zero if k == 0 else k for k in keys]
        return keys

    def find(self, offset: int) -> tuple[Any, int] | None:
        """The value holding 0-based ``offset`` in ascending order and the offset within it (None: past the end)."""
        if self.fallback is not None:
            start = 0
            for value in sorted(self.fallback):
                end = start + self.fallback[value]
                if offset < end:
                    return value, offset - start
                start = end
            return None
        if self.values is None:
            return None
        ends = np.cumsum(self.counts)
        k = int(np.searchsorted(ends, offset, side="right"))
        if k == len(ends):
            return None
        return self._keys(self.values[k : k + 1])[0], offset - int(ends[k] - self.counts[k])

    def locate(self, spec: RankSpec) -> tuple[int, list[tuple[Any, int]]]:
        """n, and per step of ``spec`` (value, offset in its group of equal values), in position order."""
        if self.fallback is not None:
            return locate_sorted(self.fallback, spec)
        if self.values is None or not len(self.values):
            return locate_sorted({}, spec)
        values, counts = self.values, self.counts
        if spec.descending:
            values, counts = values[::-1], counts[::-1]
        ends = np.cumsum(counts)
        n = int(ends[-1])
        positions = spec.positions(n)
        reached = next((k for k, p in enumerate(positions) if p >= n), len(positions))
        positions = positions[:reached]  # the first position past the last user ends the walk
        if any(p < 0 for p in positions) or any(b < a for a, b in zip(positions, positions[1:], strict=False)):
            return locate_sorted(dict(zip(self._keys(values), counts.tolist(), strict=True)), spec)
        if not positions:
            return n, []
        group = np.searchsorted(ends, np.asarray(positions, dtype=np.int64), side="right")
        keys = self._keys(values[group])
        starts = (ends[group] - counts[group]).tolist()
        return n, [(k, p - s) for k, p, s in zip(keys, positions, starts, strict=True)]


def locate_sorted(merged: dict[Any, int], spec: RankSpec) -> tuple[int, list[tuple[Any, int]]]:
    """``Histogram.locate`` over a dict in Python's sort order (the original pass 1, one value at a time)."""
    n = sum(merged.values())
    steps: list[tuple[Any, int]] = []
    positions = iter(spec.positions(n))
    target = next(positions, None)
    start = 0
    for value in sorted(merged, reverse=spec.descending):
        end = start + merged[value]
        while target is not None and target < end:
            steps.append((value, target - start))
            target = next(positions, None)
        start = end
    return n, steps


def rank_cuts(specs: Sequence[RankSpec], buckets: Buckets) -> list[RankCuts]:
    """The exact steps of every spec over the union of ``buckets``, holding one bucket plus summaries.

    Pass 1 merges per-bucket counts per distinct value (exact: a histogram, one entry per
    distinct value). A step at position p falls in the group of equal values that holds
    p; when it is not the group's first user, pass 2 merges per-bucket counts of that
    group by ``bin`` (a prefix of the tie-break) and pass 3 collects the group's users
    in the one bin holding p, ordered by (tiebreak, user_id): the step's user is exact.
    """
    histograms = [Histogram() for _ in specs]

    def count_values(con: Any) -> None:
        for spec, merged in zip(specs, histograms, strict=True):
            merged.add(con.sql(f"SELECT {spec.value}, count(*) FROM t WHERE {spec.where} GROUP BY 1").to_arrow_table())

    _per_bucket(buckets, count_values)
    # per spec: n, and per step (value, offset in the group) in position order
    located = [merged.locate(spec) for spec, merged in zip(specs, histograms, strict=True)]

    # tie groups cut inside: (spec index, value) -> offsets wanted
    inside = sorted({(i, v) for i, (_, steps) in enumerate(located) for v, o in steps if o > 0}, key=repr)
    bins: dict[tuple[int, Any], Histogram] = {key: Histogram() for key in inside}

    def group_sql(i: int, value: Any) -> str:
        spec = specs[i]
        return f"({spec.where}) AND {spec.value} = {_literal(value, spec.value_type)}"

    def count_bins(con: Any) -> None:
        for i, value in inside:
            bins[(i, value)].add(
                con.sql(
                    f"SELECT {specs[i].bin}, count(*) FROM t WHERE {group_sql(i, value)} GROUP BY 1"
                ).to_arrow_table()
            )

    if inside:
        _per_bucket(buckets, count_bins)
    # (spec index, value, offset) -> (bin, offset within the bin)
    wanted: dict[tuple[int, Any, int], tuple[Any, int]] = {}
    for i, (_, steps) in enumerate(located):
        for value, offset in steps:
            if offset == 0:
                continue
            found = bins[(i, value)].find(offset)
            if found is not None:
                wanted[(i, value, offset)] = found
    needed = sorted({(i, v, b) for (i, v, _), (b, _) in wanted.items()}, key=repr)
    members: dict[tuple[int, Any, Any], list[tuple[Any, str]]] = {key: [] for key in needed}

    def collect(con: Any) -> None:
        for i, value, b in needed:
            spec = specs[i]
            rows = _fetch(
                con,
                f"SELECT {spec.tiebreak}, {USER_ID} FROM t WHERE {group_sql(i, value)} AND {spec.bin} = "
                f"{_literal(b, 'VARCHAR') if isinstance(b, str) else b}",
            )
            members[(i, value, b)].extend((tb, str(user)) for tb, user in rows)

    if needed:
        _per_bucket(buckets, collect)
    result = []
    for i, (n, steps) in enumerate(located):
        cuts = []
        for value, offset in steps:
            if offset == 0:
                cuts.append(Cut(value))
                continue
            b, within = wanted[(i, value, offset)]
            # ints compare exactly; strings (hex digests, ids) in code point order, which is UTF-8 byte order: DuckDB's
            tiebreak, user = sorted(members[(i, value, b)])[within]
            cuts.append(Cut(value, tiebreak, user))
        result.append(RankCuts(specs[i], n, tuple(cuts)))
    return result


def _at_or_after(cut: Cut, spec: RankSpec) -> str:
    """SQL: the row's sort key is at or after the cut's."""
    later = "<" if spec.descending else ">"
    value = _literal(cut.value, spec.value_type)
    if cut.tiebreak is None:
        return f"({spec.value} {later}= {value})"
    tiebreak = _literal(cut.tiebreak, spec.tiebreak_type)
    user = _literal(cut.user_id, "VARCHAR")
    return (
        f"({spec.value} {later} {value} OR ({spec.value} = {value} AND ({spec.tiebreak} > {tiebreak} "
        f"OR ({spec.tiebreak} = {tiebreak} AND {USER_ID} >= {user}))))"
    )


def score_sql(ranked: RankCuts, kind: str = "TINYINT") -> str:
    """SQL giving each row its score (1 + the steps at or before it), NULL where the spec's ``where`` fails."""
    steps = " + ".join(f"CAST({_at_or_after(c, ranked.spec)} AS INTEGER)" for c in ranked.cuts) or "0"
    return f"CASE WHEN {ranked.spec.where} THEN CAST(1 + {steps} AS {kind}) END"


def apply_scores(table: pa.Table, ranked: Sequence[RankCuts], names: Sequence[str]) -> pa.Table:
    """``table`` (one bucket) with a score column per ``ranked`` spec, named ``names``, in row order."""
    con = db.cursor()
    try:
        con.register("t", table.append_column("__row", pa.array(range(table.num_rows), pa.int64())))
        columns = ", ".join(f"{score_sql(r)} AS {name}" for r, name in zip(ranked, names, strict=True))
        scored = con.sql(f"SELECT {columns} FROM t ORDER BY __row").to_arrow_table()
    finally:
        con.close()
    for name in names:
        table = table.append_column(name, scored.column(name))
    return table


def decile_spec(value: str = "s") -> RankSpec:
    """Deciles 1-10 of a score column ranked ascending, NaN and null unranked, ties by ``md5(user_id)``."""
    return RankSpec(
        name="decile",
        value=value,
        value_type="DOUBLE",
        tiebreak=f"md5({USER_ID})",
        tiebreak_type="VARCHAR",
        bin=f"substr(md5({USER_ID}), 1, 4)",
        where=f"{value} IS NOT NULL AND NOT isnan({value})",
        positions=decile_positions,
    )


def bucket_deciles(buckets: Buckets, value: str = "s") -> tuple[RankCuts, Callable[[pa.Table], pa.Array]]:
    """The decile steps of ``value`` over every bucket, and a function giving one bucket's deciles (``deciles_of``)."""
    (ranked,) = rank_cuts([decile_spec(value)], buckets)
    return ranked, partial(deciles_of, ranked)


def deciles_of(ranked: RankCuts, key: pa.Table) -> pa.Array:
    """The deciles of ``key`` (one bucket: ``user_id`` and the ranked value column of ``ranked.spec``) at the cut
    points ``ranked`` (of ``decile_spec``, over every bucket), int8, null: unranked. What ``score_sql`` gives for
    the spec, computed in Arrow and NumPy rather than by a DuckDB query comparing every row with every cut point.

    A row's decile is 1 plus the cut points at or before its sort key (the value, then ``md5(user_id)``, then
    ``user_id``, ascending). The md5 tie-break is computed only for the rows whose value equals the value of a
    cut point inside a tie group: the only rows it can decide.
    """
    if ranked.spec.descending or ranked.spec.value_type != "DOUBLE":
        raise ValueError(f"deciles_of ranks ascending doubles, not {ranked.spec}")
    values = np.asarray(pc.fill_null(key.column(ranked.spec.value), np.nan), dtype=np.float64)
    ranked_rows = ~np.isnan(values)
    steps = np.zeros(len(values), dtype=np.int64)
    tied = {cut.value for cut in ranked.cuts if cut.tiebreak is not None}
    ids: np.ndarray = np.empty(0, dtype=object)
    digests: np.ndarray = np.empty(0, dtype=object)
    in_tie = np.zeros(len(values), dtype=bool)
    if tied:
        in_tie = ranked_rows & np.isin(values, np.array(sorted(tied), dtype=np.float64))
        ids = np.asarray(key.column(USER_ID).filter(pa.array(in_tie)).to_pylist(), dtype=object)
        digests = np.asarray([hashlib.md5(str(u).encode()).hexdigest() for u in ids], dtype=object)
    positions = np.flatnonzero(in_tie)
    for cut in ranked.cuts:
        value = float(cut.value)
        if cut.tiebreak is None:
            steps += values >= value
            continue
        steps += values > value
        equal = values[positions] == value
        after = (digests > cut.tiebreak) | ((digests == cut.tiebreak) & (ids >= cut.user_id))
        steps[positions[equal & after.astype(bool)]] += 1
    return pa.array((1 + steps).astype(np.int8), pa.int8(), mask=~ranked_rows)


def value_counts(buckets: Buckets, value: str, where: str) -> pa.Table:
    """The exact histogram of ``value`` over the rows where ``where`` holds in every bucket: columns ``v`` (each
    distinct value once, ascending, in DuckDB's order: NaN last, peers as ``ORDER BY`` sees them) and ``n`` (rows);
    one bucket in memory plus the merged counts."""
    merged: list[pa.Table] = []

    def count(con: Any) -> None:
        part = f"SELECT {value} AS v, count(*) AS n FROM t WHERE {where} GROUP BY 1"
        if merged:
            con.register("m", merged.pop())
            part = f"SELECT v, CAST(sum(n) AS BIGINT) AS n FROM ({part} UNION ALL SELECT v, n FROM m) GROUP BY v"
        merged.append(con.sql(part).to_arrow_table())

    _per_bucket(buckets, count)
    con = db.cursor()
    try:
        if merged:
            con.register("m", merged[0])
            return con.sql("SELECT v, n FROM m ORDER BY v").to_arrow_table()
        return con.sql("SELECT CAST(NULL AS DOUBLE) AS v, CAST(0 AS BIGINT) AS n WHERE false").to_arrow_table()
    finally:
        con.close()


def bucket_cume_dist(buckets: Buckets, value: str, where: str) -> Callable[[pa.Table], pa.Array]:
    """``CASE WHEN where THEN cume_dist() OVER (PARTITION BY where ORDER BY value) END`` over the union of
    ``buckets``, as a function giving one bucket's values (DOUBLE, in row order).

    ``cume_dist`` of a row is the share of the ranked rows whose value is at most its own
    (its peers included): ``value_counts`` gives each distinct value's running count, and
    the row's value is that count over the total, the same division (two integers as
    doubles) DuckDB's window makes, so the values are the window's over the whole
    population, bit for bit.
    """
    counts = value_counts(buckets, value, where)
    con = db.cursor()
    try:
        con.register("c", counts)
        cumulative = con.sql(
            "SELECT v AS __v, sum(n) OVER (ORDER BY v ROWS UNBOUNDED PRECEDING) AS __le FROM c"
        ).to_arrow_table()
    finally:
        con.close()
    total = int(pc.sum(counts.column("n")).as_py() or 0)

    def apply(table: pa.Table) -> pa.Array:
        con = db.cursor()
        try:
            con.register("t", table.append_column("__row", pa.array(range(table.num_rows), pa.int64())))
            con.register("h", cumulative)
            column = con.sql(
                f"SELECT CASE WHEN {where} THEN CAST(h.__le AS DOUBLE) / CAST({total} AS DOUBLE) END AS d "
                f"FROM t LEFT JOIN h ON ({value}) = h.__v ORDER BY t.__row"
            ).to_arrow_table()
        finally:
            con.close()
        return pc.cast(column.column("d"), pa.float64()).combine_chunks()

    return apply
