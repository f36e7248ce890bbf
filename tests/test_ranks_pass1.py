"""Pass 1 of ``rank_cuts`` (``ranks.Histogram``: per-bucket histograms merged as NumPy arrays, steps found by a
cumulative sum and ``searchsorted``) places every step exactly where the original dict walk does."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from profile_engine.contracts.profiles import USER_ID
from profile_engine.profiles.ranks import (
    Histogram,
    RankSpec,
    decile_positions,
    decile_spec,
    locate_sorted,
    quintile_positions,
    rank_cuts,
)


def _reference(parts: list[list[tuple[Any, int]]], spec: RankSpec) -> tuple[int, list[tuple[Any, int]]]:
    """The original pass 1: a dict merged bucket by bucket, walked value by value in ``sorted`` order."""
    merged: dict[Any, int] = {}
    for part in parts:
        for value, count in part:
            merged[value] = merged.get(value, 0) + int(count)
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


def _spec(descending: bool, positions: Any) -> RankSpec:
    return dataclasses.replace(decile_spec(), descending=descending, positions=positions)


def _same(got: tuple[int, list[tuple[Any, int]]], expected: tuple[int, list[tuple[Any, int]]]) -> bool:
    """Equal, and each step's value of the same type and sign (``-0.0`` is not shown as ``0.0``)."""
    if got != expected:
        return False
    return all(
        type(a) is type(b) and (not isinstance(a, float) or math.copysign(1, a) == math.copysign(1, b))
        for (a, _), (b, _) in zip(got[1], expected[1], strict=True)
    )


def _parts(draw: Any, values: st.SearchStrategy[Any], kind: pa.DataType) -> list[pa.Table]:
    tables = []
    for _ in range(draw(st.integers(1, 5))):
        distinct = draw(st.lists(values, max_size=25, unique_by=lambda v: (v, math.copysign(1, v))))
        # one row per value as DuckDB's GROUP BY gives (-0.0 and 0.0 are one group there)
        seen: list[Any] = []
        for v in distinct:
            if all(v != s for s in seen):
                seen.append(v)
        counts = draw(st.lists(st.integers(1, 50), min_size=len(seen), max_size=len(seen)))
        tables.append(pa.table({"v": pa.array(seen, kind), "n": pa.array(counts, pa.int64())}))
    return tables


POSITIONS = st.sampled_from(
    [decile_positions, quintile_positions, lambda n: list(range(n + 3)), lambda n: [0, 0, n // 2, n // 2, n, 1]]
)
FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 0.5, 1.0, -1.0, 1e-300, -1e300, 5e-324]), st.floats(allow_nan=False, width=64)
)
INTS = st.one_of(st.sampled_from([0, 1, -1, 2**62, -(2**63)]), st.integers(-(2**63), 2**63 - 1))


@st.composite
def HISTOGRAMS(draw: Any) -> tuple[list[pa.Table], RankSpec]:
    kind = draw(st.sampled_from([pa.float64(), pa.int64()]))
    tables = _parts(draw, FLOATS if kind == pa.float64() else INTS, kind)
    return tables, _spec(draw(st.booleans()), draw(POSITIONS))


@settings(max_examples=400, deadline=None)
@given(HISTOGRAMS())
def test_pass1_equals_the_dict_walk(case: tuple[list[pa.Table], RankSpec]) -> None:
    tables, spec = case
    histogram = Histogram()
    for table in tables:
        histogram.add(table)
    rows = [list(zip(t.column(0).to_pylist(), t.column(1).to_pylist(), strict=True)) for t in tables]
    assert _same(histogram.locate(spec), _reference(rows, spec))
    assert histogram.fallback is None  # numbers without NaN or null: the NumPy path


ODD = st.one_of(st.none(), st.sampled_from([float("nan"), 0.0, -0.0, 1.5, 2.0]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(ODD, st.integers(1, 9)), max_size=6), min_size=1, max_size=4), st.booleans())
def test_nulls_and_nan_take_the_dict_walk(parts: list[list[tuple[Any, int]]], descending: bool) -> None:
    """NaN or null (no spec gives them: ``where`` drops them) fall back to the original dict walk, errors included."""
    spec = _spec(descending, quintile_positions)
    histogram = Histogram()
    for part in parts:
        histogram.add(
            pa.table(
                {"v": pa.array([v for v, _ in part], pa.float64()), "n": pa.array([c for _, c in part], pa.int64())}
            )
        )
    try:
        expected: Any = _reference(parts, spec)
    except TypeError as error:
        expected = type(error)
    try:
        got: Any = histogram.locate(spec)
    except TypeError as error:
        got = type(error)
    if isinstance(expected, tuple) and any(isinstance(v, float) and math.isnan(v) for v, _ in expected[1]):
        assert got[0] == expected[0] and len(got[1]) == len(expected[1])  # NaN != NaN
    else:
        assert got == expected


def test_types_changing_between_buckets_take_the_dict_walk() -> None:
    spec = _spec(False, lambda n: list(range(n)))
    histogram = Histogram()
    histogram.add(pa.table({"v": pa.array([1, 3], pa.int64()), "n": pa.array([2, 1], pa.int64())}))
    histogram.add(pa.table({"v": pa.array([1.0, 2.5], pa.float64()), "n": pa.array([1, 1], pa.int64())}))
    assert histogram.fallback is not None
    assert histogram.locate(spec) == locate_sorted({1: 3, 2.5: 1, 3: 1}, spec)
    assert histogram.locate(spec) == (5, [(1, 0), (1, 1), (1, 2), (2.5, 0), (3, 0)])


SCORES = st.lists(st.one_of(st.sampled_from([0.0, -0.0, 0.25, 0.25, 3.0]), st.floats(-1, 1)), max_size=30)


@settings(max_examples=60, deadline=None)
@given(st.lists(SCORES, min_size=1, max_size=4), st.booleans(), st.booleans())
def test_rank_cuts_equal_the_dict_walk(scores: list[list[float]], descending: bool, integers: bool) -> None:
    """Whole ``rank_cuts`` (three passes over DuckDB) with NumPy pass 1 equals it with the dict walk."""
    buckets = [
        pa.table(
            {
                USER_ID: pa.array([f"u{i}-{j}" for j in range(len(s))], pa.string()),
                "s": pa.array([int(v * 4) for v in s] if integers else s, pa.int64() if integers else pa.float64()),
            }
        )
        for i, s in enumerate(scores)
    ]
    spec = dataclasses.replace(decile_spec(), descending=descending, value_type="BIGINT" if integers else "DOUBLE")
    (got,) = rank_cuts([spec], lambda: iter(buckets))
    original = Histogram.locate

    def walk(self: Histogram, spec: RankSpec) -> tuple[int, list[tuple[Any, int]]]:
        self._to_dict()
        return original(self, spec)

    try:
        Histogram.locate = walk  # type: ignore[method-assign]
        (expected,) = rank_cuts([spec], lambda: iter(buckets))
    finally:
        Histogram.locate = original  # type: ignore[method-assign]
    assert got == expected
    assert [type(c.value) for c in got.cuts] == [type(c.value) for c in expected.cuts]


BINS = st.lists(st.lists(st.tuples(st.integers(0, 2**16 - 1), st.integers(1, 9)), max_size=20), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(BINS, st.integers(-2, 120), st.sampled_from([pa.decimal128(38, 0), pa.int64(), pa.string()]))
def test_pass2_bin_lookup_equals_the_dict_walk(parts: list[list[tuple[int, int]]], offset: int, kind: Any) -> None:
    """Pass 2's bins (``md5_number >> 112``: UHUGEINT, Decimal in Arrow, int from ``fetchall``; or strings) merged
    and searched for the bin holding an offset as the original dict walk did, keys of the same type."""
    histogram = Histogram()
    merged: dict[Any, int] = {}
    for part in parts:
        part = list(dict(part).items())  # one row per bin, as GROUP BY gives
        keys = [str(b) if kind == pa.string() else b for b, _ in part]
        histogram.add(pa.table({"b": pa.array(keys, kind), "n": pa.array([c for _, c in part], pa.int64())}))
        for b, (_, c) in zip(keys, part, strict=True):
            merged[b] = merged.get(b, 0) + c
    expected = None
    start = 0
    for b in sorted(merged):
        end = start + merged[b]
        if offset < end:
            expected = (b, offset - start)
            break
        start = end
    got = histogram.find(offset)
    assert got == expected
    assert got is None or type(got[0]) is type(expected[0])  # type: ignore[index]
    assert (histogram.fallback is None) == (kind != pa.string())
