"""The lake's storage contract (partition paths, atomic writes, manifests, recovery) and its size report."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from profile_engine.cli import main
from profile_engine.config import Settings
from profile_engine.hours import HOUR
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import MANIFEST, Lake, recover_commits, sha256_file, write_json
from profile_engine.lake.usage import lake_usage

H = datetime(2026, 11, 2, 10, tzinfo=UTC)


def table(*values: int) -> pa.Table:
    return pa.table({"n": pa.array(values, pa.int64())})


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(tmp_path / "lake")


# ---- partitions, writes, manifests ---------------------------------------------------------------


def test_partition_paths_are_hive_style_with_an_optional_bucket(lake: Lake) -> None:
    assert lake.partition(lk.STAGING, H) == lake.root / "staging/events/dt=2026-11-02/hour=10"
    assert lake.partition(lk.STAGING, H, 3) == lake.root / "staging/events/dt=2026-11-02/hour=10/bucket=3"
    assert lk.partition_hours(lake.path(lk.STAGING)) == {}


def test_write_partition_commits_data_and_manifest_atomically(lake: Lake) -> None:
    # Act
    manifest = lake.write_partition(lk.STAGING, H, table(1, 2, 3), bucket=1, run_id="run-1")

    # Assert: the manifest describes the file it sits beside; nothing is left in _tmp/.
    base = lake.partition(lk.STAGING, H, 1)
    assert lake.committed(lk.STAGING, H, 1) and not lake.committed(lk.STAGING, H, 0)
    assert lake.manifest(lk.STAGING, H, 1) == json.loads(json.dumps(manifest, default=str))
    assert (manifest["rows"], manifest["run_id"], manifest["dt"], manifest["hour"]) == (3, "run-1", "2026-11-02", "10")
    assert manifest["files"] == [{"name": lk.DATA_FILE, "rows": 3, "sha256": sha256_file(base / lk.DATA_FILE)}]
    assert lake.read(lk.STAGING, H).equals(table(1, 2, 3))  # every committed bucket of the hour
    assert list(lake.path(lk.TMP).iterdir()) == []
    assert lk.partition_hours(lake.path(lk.STAGING)) == {H: lake.partition(lk.STAGING, H)}


def test_a_partition_without_manifest_is_not_committed(lake: Lake) -> None:
    half = lake.partition(lk.QUARANTINE, H)
    half.mkdir(parents=True)
    (half / lk.DATA_FILE).write_bytes(b"half-written")

    assert not lake.committed(lk.QUARANTINE, H)
    with pytest.raises(FileNotFoundError, match="not committed: .*quarantine/events/dt=2026-11-02/hour=10"):
        lake.read(lk.QUARANTINE, H)


def test_rewriting_a_partition_replaces_it_whole_and_leaves_no_journal(lake: Lake) -> None:
    lake.write_partition(lk.PROFILES, H, table(1), bucket=0, run_id="first")

    lake.write_partition(lk.PROFILES, H, {"a": table(7, 8), "b": table(9)}, bucket=0, run_id="second")

    assert lake.manifest(lk.PROFILES, H, 0)["rows"] == {"a": 2, "b": 1}
    assert lake.read_named(lk.PROFILES, H, "a", 0).equals(table(7, 8))
    assert not (lake.partition(lk.PROFILES, H, 0) / lk.DATA_FILE).exists()
    assert list(lake.path(lk.COMMITS).iterdir()) == [] and list(lake.path(lk.TMP).iterdir()) == []


# ---- recovery of an interrupted commit -----------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (a killed writer)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("new_complete", [True, False], ids=["rolled-forward", "rolled-back"])
def test_recover_finishes_or_undoes_a_commit_killed_between_its_renames(lake: Lake, new_complete: bool) -> None:
    # Arrange: what a writer killed after moving the committed partition aside leaves behind.
    lake.write_partition(lk.STAGING, H, table(1), bucket=0)
    lake.write_partition(lk.STAGING, H + HOUR, table(2, 2), bucket=0)  # stands in for the new copy
    tag = f"{dead_pid()}.{socket.gethostname()}"
    target = lake.partition(lk.STAGING, H, 0)
    new, old = lake.path(lk.TMP, f"{uuid.uuid4().hex}.{tag}"), lake.path(lk.TMP, f"old-{uuid.uuid4().hex}.{tag}")
    os.replace(lake.partition(lk.STAGING, H + HOUR, 0), new)
    if not new_complete:
        (new / MANIFEST).unlink()
    os.replace(target, old)
    journal = lake.path(lk.COMMITS, f"{uuid.uuid4().hex}.{tag}.json")
    write_json(
        journal, {k: p.relative_to(lake.root).as_posix() for k, p in (("target", target), ("new", new), ("old", old))}
    )
    assert not lake.committed(lk.STAGING, H, 0)

    # Act
    done = recover_commits(lake)

    # Assert: the new partition or the old one is back, never neither, and nothing is left over.
    assert done == [
        f"staging/events/dt=2026-11-02/hour=10/bucket=0: {'new partition renamed in (rolled forward)' if new_complete else 'old partition put back (rolled back)'}"
    ]
    assert lake.read(lk.STAGING, H, 0).equals(table(2, 2) if new_complete else table(1))
    assert not journal.exists() and not new.exists() and not old.exists()


# ---- status: the lake's size by dataset -------------------------------------------------------------


def small_lake(root: Path) -> Lake:
    """Two hours of two buckets staged, one quarantined, a Data Docs site, a model, an outbox file, a leftover."""
    lake = Lake(root)
    landing = lake.partition(lk.LANDING, H + HOUR)
    landing.mkdir(parents=True)
    (landing / "a.csv").write_text("event_id,user_id\n1,u1\n")
    for hour in (H, H + HOUR):
        for bucket in (0, 1):
            lake.write_partition(lk.STAGING, hour, table(1, 2), bucket=bucket)
    lake.write_partition(lk.QUARANTINE, H, table(3))
    lake.write_dir(
        lake.partition(lk.QUALITY_DOCS, H), [("index.html", b"<html></html>"), ("validations/x.html", b"x" * 500)], {}
    )
    lake.write_dir(lake.path(lk.MODELS, "v1"), [("model.txt", b"m" * 1000)], {})
    write_json(lake.path(lk.LEDGER, "dt=2026-11-02", "hour=11", "ledger.json"), {"files": []})
    (lake.path("outbox")).mkdir()
    (lake.path("outbox", "x.csv")).write_text("id\n")
    (lake.path(lk.TMP, "leftover")).write_bytes(b"z" * 10)
    return lake


def test_lake_usage_counts_every_file_once_by_dataset_with_newest_hours(tmp_path: Path) -> None:
    lake = small_lake(tmp_path / "lake")
    files = [p for p in lake.root.rglob("*") if p.is_file()]

    usage = lake_usage(lake, buckets=2)

    datasets = usage["datasets"]
    assert usage["total"]["files"] == len(files) == sum(d["files"] for d in datasets.values())
    assert usage["total"]["bytes"] == sum(p.stat().st_size for p in files) == sum(d["bytes"] for d in datasets.values())
    assert datasets[lk.STAGING]["files"] == 8 and datasets[lk.STAGING]["newest_hour"] == (H + HOUR).isoformat()
    assert datasets[lk.QUARANTINE]["newest_hour"] == H.isoformat()
    assert datasets[lk.QUALITY_DOCS]["files"] == 3 and datasets[lk.QUALITY_DOCS]["bytes"] > 513
    assert datasets[lk.LANDING]["newest_hour"] == (H + HOUR).isoformat()
    assert datasets[lk.MODELS]["newest_hour"] is None and datasets[lk.MODELS]["bytes"] > 1000
    assert datasets["outbox"]["files"] == 1 and datasets[lk.TMP]["files"] == 1 and datasets[lk.LEDGER]["files"] == 1
    assert lk.PROFILES not in datasets  # empty datasets are not listed
    assert usage["newest_committed_hour"] == (H + HOUR).isoformat()


def test_status_command_prints_the_usage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lake = small_lake(tmp_path / "lake")
    monkeypatch.setenv("PROFILE_ENGINE_LAKE", str(lake.root))
    monkeypatch.setenv("PROFILE_ENGINE_BUCKETS", "2")

    assert main(["status"]) == 0

    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(lake_usage(lake, buckets=Settings.from_env().buckets)))
    assert printed["lake"] == str(lake.root)


def tile(path: Path, *sealed_ends: datetime) -> None:
    """A sealed state tile file whose rows were sealed by the builds ending at ``sealed_ends``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ends = [int(e.timestamp() * 1000) for e in sealed_ends]
    pq.write_table(pa.table({"user_id": ["u"] * len(ends), "hour_ms": ends, "sealed_ms": ends}), path)


@pytest.mark.parametrize("compacted", [False, True])
def test_status_lists_state_tiles_with_the_newest_sealed_hour(tmp_path: Path, compacted: bool) -> None:
    """``state_tiles/`` is a dataset beside ``state``: its newest hour is the newest build that sealed tiles, from an
    hourly tile's name or (the day compacted) the ``sealed_ms`` statistics of the day file's footer."""
    lake = small_lake(tmp_path / "lake")
    lake.write_partition(lk.STATE, H, table(1), bucket=0)
    tiles = lake.path(lk.STATE_TILES)
    tile(tiles / "bucket=0/hourly/dt=2026-11-01/day.parquet", H - 30 * HOUR, H - 20 * HOUR)
    if compacted:
        tile(tiles / "bucket=1/item_views/dt=2026-11-02/day.parquet", H - 2 * HOUR, H)
    else:
        tile(tiles / "bucket=1/item_views/dt=2026-11-02/hour=09.parquet", H)
        tile(tiles / "bucket=1/item_views/dt=2026-11-02/hour=08.parquet", H - HOUR)

    usage = lake_usage(lake, buckets=2)

    names = list(usage["datasets"])
    assert names.index(lk.STATE_TILES) == names.index(lk.STATE) + 1
    entry = usage["datasets"][lk.STATE_TILES]
    assert entry["files"] == (2 if compacted else 3)
    assert entry["newest_hour"] == (H - HOUR).isoformat()  # sealed by the build of 09:00 (its end is 10:00)
    assert usage["datasets"][lk.STATE]["newest_hour"] == H.isoformat()


def test_status_of_an_empty_lake(tmp_path: Path) -> None:
    usage = lake_usage(Lake(tmp_path / "none"), buckets=4)

    assert usage["datasets"] == {} and usage["total"] == {"bytes": 0, "files": 0, "size": "0 B"}
    assert usage["newest_committed_hour"] is None


def test_write_dir_streamed_lists_what_write_dir_lists_and_commits_nothing_when_it_fails(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    payloads = {"a.csv": b"x,y\n1,2\n", "sub/b.bin": bytes(range(256)) * 40}
    lake.write_dir(lake.path("whole"), payloads.items(), {"k": 1})

    def write(folder: Path) -> Iterator[str]:
        for name, payload in payloads.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            with (folder / name).open("wb") as handle:  # appended a piece at a time
                for start in range(0, len(payload), 1000):
                    handle.write(payload[start : start + 1000])
            yield name

    lake.write_dir_streamed(lake.path("streamed"), write, {"k": 1})
    whole, streamed = (json.loads(lake.path(d, MANIFEST).read_text()) for d in ("whole", "streamed"))
    assert streamed == whole
    assert [f["name"] for f in streamed["files"]] == list(payloads)
    assert all(f["sha256"] == sha256_file(lake.path("streamed", f["name"])) for f in streamed["files"])

    def fail_midway(folder: Path) -> Iterator[str]:
        (folder / "a.csv").write_bytes(b"half")
        yield "a.csv"
        raise OSError("disk full")

    before = set(lake.path(lk.TMP).iterdir())
    with pytest.raises(OSError, match="disk full"):
        lake.write_dir_streamed(lake.path("streamed"), fail_midway, {"k": 2})
    assert set(lake.path(lk.TMP).iterdir()) == before  # the half-written files went with the failure
    assert json.loads(lake.path("streamed", MANIFEST).read_text()) == whole  # the committed directory as it was
    assert lake.path("streamed", "a.csv").read_bytes() == payloads["a.csv"]
