"""Smoke test of ``benchmarks/pipeline.py`` (a tiny run, checked for its table's shape), and the fixes it led to.

The benchmark itself (1M events) runs from ``make bench``, never from the tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profile_engine.privacy.keys import ExportKey, pseudonymize, pseudonymize_array
from profile_engine.quality.suites import gx_frame

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "pipeline.py"
TASK_STEPS = {
    "extract_events",
    "validate_events",
    "check_quality",
    "build_profiles[0]",
    "build_profiles[1]",
    "publish_profiles",
    "score_profiles[0]",
    "score_profiles[1]",
    "publish_segments",
    "write_run_report",
}


@pytest.mark.timeout(600)
def test_quick_run_measures_every_task_in_its_own_process(tmp_path: Path) -> None:
    # Arrange
    raw = tmp_path / "raw.json"
    command = [sys.executable, str(SCRIPT), "--quick", "--sections", "tasks", "--work", str(tmp_path / "work")]
    recorded = (ROOT / "BENCHMARKS.md").read_text()

    # Act
    done = subprocess.run([*command, "--json", str(raw)], capture_output=True, text=True, timeout=540, check=False)

    # Assert
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    header, rule, *rows = lines
    assert header.count("|") - 1 == 10 and rule.count("---") == 10
    steps = {row.split("|")[1].strip() for row in rows}
    assert steps >= TASK_STEPS
    assert all(row.count("|") == header.count("|") for row in rows)
    results = json.loads(raw.read_text())
    tasks = {r["step"]: r for r in results["sections"]["tasks"]}
    for step in TASK_STEPS:
        assert len(tasks[step]["seconds"]) == 1 and tasks[step]["seconds"][0] > 0
        assert 50 < tasks[step]["peak_rss_mb"][0] < 4096  # VmHWM of the task's own process
    assert 0 < results["facts"]["staged"] <= results["facts"]["read"]
    assert results["facts"]["profiles"] > 0
    per_task = [tasks[t]["seconds"][0] for t in TASK_STEPS if "[" not in t]
    per_bucket = [tasks[t]["seconds"][0] for t in TASK_STEPS if "[" in t]
    assert tasks["whole hour: sum of the tasks"]["seconds"][0] == pytest.approx(sum(per_task) + sum(per_bucket))
    assert (ROOT / "BENCHMARKS.md").read_text() == recorded  # a smoke run appends nothing


@pytest.mark.timeout(60)
@settings(max_examples=60, deadline=None)
@given(
    user_ids=st.lists(st.text(max_size=40), max_size=30),
    secret=st.binary(min_size=1, max_size=100),
)
def test_pseudonymize_array_equals_the_python_hmac(user_ids: list[str], secret: bytes) -> None:
    # Arrange (the vectorised pseudonyms of the exports, a fix of issue 10, must not change a single key)
    key = ExportKey(secret=secret, source="test")

    # Act
    vectorised = pseudonymize_array(pa.array(user_ids, pa.string()), key).to_pylist()

    # Assert
    assert vectorised == pseudonymize(user_ids, key)


@pytest.mark.timeout(60)
def test_gx_frame_widens_narrow_numbers_and_keeps_every_value() -> None:
    # Arrange (GX's range checks run vectorised only on 64-bit numbers: a fix of issue 10)
    table = pa.table(
        {
            "quantity": pa.array([1, 2, None], pa.int32()),
            "bucket": pa.array([0, 3, 1], pa.int8()),
            "price": pa.array([1.5, None, 0.25], pa.float32()),
            "user_id": pa.array(["a", "b", None], pa.string()),
        }
    )

    # Act
    frame = gx_frame(table)

    # Assert
    assert str(frame["bucket"].dtype) == "int64"
    assert str(frame["quantity"].dtype) == "float64"  # nulls: pandas' float, still vectorised in GX
    assert str(frame["price"].dtype) == "float64"
    assert frame["bucket"].tolist() == [0, 3, 1]
    assert frame["quantity"].tolist()[:2] == [1.0, 2.0] and frame["quantity"].isna().tolist() == [False, False, True]
    assert frame["price"].tolist()[0] == 1.5 and frame["price"].tolist()[2] == 0.25
    assert frame["user_id"].tolist()[:2] == ["a", "b"]


@pytest.mark.timeout(60)
def test_gx_frame_of_a_table_in_chunks_equals_that_of_the_table_in_one() -> None:
    # Arrange: the staged hour read bucket after bucket arrives in chunks (strings are combined, numbers copied)
    first = pa.table({"event_id": ["e1", "e2"], "quantity": pa.array([1, -1], pa.int32()), "price": [1.5, None]})
    second = pa.table({"event_id": [None, "e4"], "quantity": pa.array([3, 2], pa.int32()), "price": [0.0, 2.5]})
    chunked = pa.concat_tables([first, second])

    # Act
    frame = gx_frame(chunked)

    # Assert: the same frame as from one chunk a column
    assert chunked.column("event_id").num_chunks == 2
    pd.testing.assert_frame_equal(frame, gx_frame(chunked.combine_chunks()))
    assert frame["event_id"].tolist()[1] == "e2" and frame["event_id"].isna().tolist() == [False, False, True, False]


@pytest.mark.timeout(120)
def test_a_rerun_of_the_hour_extracts_the_same_files_as_the_first(tmp_path: Path) -> None:
    # Arrange: a base lake with the hour's landing files and the hour before extracted (its landing index), a copy
    import importlib.util

    from profile_engine.hours import HOUR
    from profile_engine.ingest import events as ingest
    from profile_engine.lake.storage import Lake
    from profile_engine.sources.simulate import simulate

    spec = importlib.util.spec_from_file_location("pipeline_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    pipeline = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pipeline  # its dataclasses look their module up
    spec.loader.exec_module(pipeline)
    base, lake = tmp_path / "base", tmp_path / "copy"
    before = pipeline.END - HOUR
    simulate(Lake(base), before, pipeline.END, users=200, seed=1, origin=pipeline.ORIGIN)
    ingest.extract_events(pipeline.settings_for(base, 2, before), before)
    subprocess.run(["cp", "-a", str(base), str(lake)], check=True)
    settings = pipeline.settings_for(lake, 2, before)
    first = ingest.extract_events(settings, pipeline.END)

    # Act
    pipeline.reset_hour(base, lake)
    again = ingest.extract_events(settings, pipeline.END)

    # Assert: the rerun is a first run again and takes the same files (the landing index alone named them all)
    assert first["files"] > 0
    assert {k: again[k] for k in ("files", "rows")} == {k: first[k] for k in ("files", "rows")}
