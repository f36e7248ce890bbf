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
        "scores/dt=2026-11-30/hour=13/part-0.parquet",  # the bucket's file is part of the hour's table
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
    assert "differs: scores/dt=2026-11-30/hour=13/part-0.parquet (rows 3 vs 3)" in out
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
    assert capsys.readouterr().out.startswith("identical: 2 tables")
    assert sums.parquet_checksum(path_a) == sums.parquet_checksum(path_b)
    assert sums.parquet_checksum(path_a)["excluded_columns"] == ["run_id"]


SEALED = [datetime(2026, 11, 30, h, tzinfo=UTC) for h in (9, 10)]  # the ends of two builds that sealed tiles


def segment_rows(n: int) -> pa.Table:
    return pa.table({"user_id": [f"u{i}" for i in range(n)], "segment": [f"s{i % 3}" for i in range(n)]})


def tile_rows(users: list[str], sealed: datetime) -> pa.Table:
    ms = int(sealed.timestamp() * 1000)
    return pa.table({"user_id": users, "hour_ms": [ms - 7 * 3_600_000] * len(users), "sealed_ms": [ms] * len(users)})


def whole_hour_lake(root: Path) -> Path:
    """The layout before per-bucket publishing and compaction: one segments file for the hour, one tile day file."""
    hour = root / "segments" / "dt=2026-11-30" / "hour=13"
    hour.mkdir(parents=True)
    pq.write_table(segment_rows(6), hour / "part-0.parquet")
    day = root / "state_tiles" / "bucket=0" / "hourly" / "dt=2026-11-30"
    day.mkdir(parents=True)
    pq.write_table(pa.concat_tables([tile_rows(["u0", "u1", "u2"], s) for s in SEALED]), day / "day.parquet")
    pq.write_table(tile_rows(["u0", "u1", "u2"], SEALED[0]), day / "hour=08.parquet")  # compaction leftover
    return root


def bucketed_lake(root: Path, nudge: str | None = None) -> Path:
    """The same rows split over two buckets (segments and tiles), tiles in hourly files; ``nudge``: one value changed."""
    rows = segment_rows(6)
    for bucket in (0, 1):
        folder = root / "segments" / "dt=2026-11-30" / "hour=13" / f"bucket={bucket}"
        folder.mkdir(parents=True)
        part = rows.filter(pa.array([i % 2 == bucket for i in range(6)]))
        if bucket == 1 and nudge == "segments":
            part = part.set_column(1, "segment", pa.array(["s9", *part.column("segment").to_pylist()[1:]]))
        pq.write_table(part, folder / "part-0.parquet")
        (folder / "_manifest.json").write_text(json.dumps({"bucket": bucket}))
    for bucket, users in ((0, ["u0", "u2"]), (1, ["u1"])):
        day = root / "state_tiles" / f"bucket={bucket}" / "hourly" / "dt=2026-11-30"
        day.mkdir(parents=True)
        for sealed in SEALED:
            tiles = tile_rows(users, sealed)
            if bucket == 1 and sealed == SEALED[1] and nudge == "tiles":
                tiles = tiles.set_column(1, "hour_ms", pa.array([0], pa.int64()))
            pq.write_table(tiles, day / f"hour={sealed.hour - 1:02d}.parquet")
    return root


def test_the_same_tables_split_into_other_files_are_equal(tmp_path: Path) -> None:
    """A table's rows in an hour compare as one table: a whole-hour file equals the same rows over bucket folders,
    and sealed state tiles compare per table and sealing build, whether in hourly or compacted day files."""
    a = checksum_file(whole_hour_lake(tmp_path / "a"))
    b = checksum_file(bucketed_lake(tmp_path / "b"))

    assert sums.compare_sums(a, b) == []
    assert sorted(a["files"]) == [  # type: ignore[call-overload]
        "segments/dt=2026-11-30/hour=13/part-0.parquet",
        "state_tiles/hourly/sealed=2026-11-30T08",
        "state_tiles/hourly/sealed=2026-11-30T09",
    ]
    assert b["files"]["segments/dt=2026-11-30/hour=13/part-0.parquet"]["rows"] == 6  # type: ignore[index]


@pytest.mark.parametrize(
    ("nudge", "named"),
    [
        ("segments", "differs: segments/dt=2026-11-30/hour=13/part-0.parquet (rows 6 vs 6)"),
        ("tiles", "differs: state_tiles/hourly/sealed=2026-11-30T09 (rows 3 vs 3)"),
    ],
)
def test_a_changed_value_in_a_split_table_is_named_with_its_hour(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nudge: str, named: str
) -> None:
    (tmp_path / "a.json").write_text(json.dumps(checksum_file(whole_hour_lake(tmp_path / "a"))))
    (tmp_path / "b.json").write_text(json.dumps(checksum_file(bucketed_lake(tmp_path / "b", nudge))))

    code = sums.main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])

    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert out[:-1] == [named]
