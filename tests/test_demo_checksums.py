"""``scripts/demo_checksums.py``: content checksums ignore row order and Parquet metadata, not values."""

from __future__ import annotations

import importlib.util
import json
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_checksums", ROOT / "scripts" / "demo_checksums.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sums = load_script()
T = datetime(2026, 11, 30, 13, tzinfo=UTC)


def table(rows: list[tuple[str, float, datetime]]) -> pa.Table:
    return pa.table(
        {
            "user_id": [r[0] for r in rows],
            "score": [r[1] for r in rows],
            "last_seen_at": pa.array([r[2] for r in rows], pa.timestamp("us", tz="UTC")),
        }
    )


ROWS = [("u1", 0.25, T), ("u2", -0.0, T), ("u3", 0.5, T)]


def write_lake(root: Path, rows: list[tuple[str, float, datetime]], csv_lines: list[str], **options: object) -> Path:
    scores = root / "scores" / "dt=2026-11-30" / "hour=13" / "bucket=0"
    exports = root / "exports" / "dt=2026-11-30" / "hour=13"
    scores.mkdir(parents=True)
    exports.mkdir(parents=True)
    pq.write_table(table(rows), scores / "part-0.parquet", **options)  # type: ignore[arg-type]
    (scores / "_manifest.json").write_text(json.dumps({"written_at": str(datetime.now(UTC))}))
    (exports / "welcome.csv").write_text("\n".join(csv_lines) + "\n")
    return root


def checksum_file(root: Path) -> dict[str, object]:
    params = {"users": 10, "history_days": 1, "hours": 1, "seed": 7, "last": T.isoformat()}
    return {"params": params, "commit": None, "files": sums.lake_checksums(root)}


def test_same_content_in_another_order_and_with_other_metadata_is_equal(tmp_path: Path) -> None:
    # Arrange: the same rows, reordered, dictionary-encoded, other compression, row groups and created_by
    a = write_lake(tmp_path / "a", ROWS, ["user_id,action", "p1,welcome", "p2,welcome"])
    b = write_lake(
        tmp_path / "b",
        [ROWS[2], ROWS[0], (ROWS[1][0], 0.0, T)],
        ["user_id,action", "p2,welcome", "p1,welcome"],
        compression="gzip",
        use_dictionary=True,
        row_group_size=1,
        store_schema=False,
    )
    pq.write_table(
        table(ROWS).cast(
            pa.schema(
                [
                    ("user_id", pa.large_string()),
                    ("score", pa.float64()),
                    ("last_seen_at", pa.timestamp("us", tz="UTC")),
                ]
            )
        ),
        tmp_path / "large.parquet",
    )

    # Act
    result = sums.compare_sums(checksum_file(a), checksum_file(b))

    # Assert: nothing differs; manifests are not checksummed; large_string is a string
    assert result == []
    assert sorted(checksum_file(a)["files"]) == [  # type: ignore[call-overload]
        "exports/dt=2026-11-30/hour=13/welcome.csv",
        "scores/dt=2026-11-30/hour=13/bucket=0/part-0.parquet",
    ]
    assert (
        sums.parquet_checksum(tmp_path / "large.parquet")["sha256"]
        == sums.parquet_checksum(a / "scores/dt=2026-11-30/hour=13/bucket=0/part-0.parquet")["sha256"]
    )


def test_one_changed_value_differs_and_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Arrange: one score one ulp away, one export line changed, a file on one side only
    a = write_lake(tmp_path / "a", ROWS, ["user_id,action", "p1,welcome"])
    nudged = [ROWS[0], (ROWS[1][0], 5e-324, T), ROWS[2]]
    b = write_lake(tmp_path / "b", nudged, ["user_id,action", "p9,welcome"])
    (b / "segments").mkdir()
    pq.write_table(table(ROWS), b / "segments" / "part-0.parquet")
    (tmp_path / "a.json").write_text(json.dumps(checksum_file(a)))
    (tmp_path / "b.json").write_text(json.dumps(checksum_file(b)))

    # Act
    code = sums.main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])

    # Assert
    out = capsys.readouterr().out
    assert code == 1
    assert "differs: scores/dt=2026-11-30/hour=13/bucket=0/part-0.parquet (rows 3 vs 3)" in out
    assert "differs: exports/dt=2026-11-30/hour=13/welcome.csv" in out
    assert "only in B: segments/part-0.parquet" in out


def test_identical_files_compare_clean_and_excluded_columns_do_not_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange: the same rows with a different run_id (wall-clock run ids legitimately differ)
    path_a, path_b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(table(ROWS).append_column("run_id", pa.array(["manual__2026-12-06T09:51"] * 3)), path_a)
    pq.write_table(table(ROWS).append_column("run_id", pa.array(["manual__2026-12-07T10:00"] * 3)), path_b)
    a = write_lake(tmp_path / "lake", ROWS, ["h", "x"])
    (tmp_path / "a.json").write_text(json.dumps(checksum_file(a)))

    # Act
    code = sums.main(["compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")])

    # Assert
    assert code == 0
    assert capsys.readouterr().out.startswith("identical: 2 files")
    assert sums.parquet_checksum(path_a) == sums.parquet_checksum(path_b)
    assert sums.parquet_checksum(path_a)["excluded_columns"] == ["run_id"]
