"""Erasure (issue 9): users leave every retained dataset, stay out for ever, and the audit holds no raw id.

A small shop (100 users) whose first two hours ran through the hour runner; each test
erases in its own copy of that lake.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from profile_engine.cli import main
from profile_engine.config import Settings
from profile_engine.contracts.profiles import POPULATION_COLUMNS
from profile_engine.hours import format_hour
from profile_engine.lake import lock
from profile_engine.lake.storage import LANDING, MANIFEST, STAGING, Lake, write_json
from profile_engine.ops import erasure, runner
from profile_engine.privacy.keys import export_key, pseudonymize
from profile_engine.privacy.tombstones import (
    ERASURE_KEY_ENV,
    ErasureKeyError,
    audit_path,
    erasure_key,
    read_tombstones,
    tombstones_path,
    user_hash,
)
from profile_engine.profiles.verify import verify_hour
from profile_engine.sources.simulate import simulate

from .reliability.lakecheck import partial_partitions

H0 = datetime(2026, 11, 3, 12, tzinfo=UTC)  # midday: the shop is busy
NEXT = H0 + timedelta(hours=2)  # the first hour not processed yet
BASE = Settings(buckets=2, lateness_hours=6, start=H0)
KEY_VARS = ("PROFILE_ENGINE_EXPORT_KEY", "PROFILE_ENGINE_ERASURE_KEY")
FIXTURES = Path(__file__).parent / "fixtures" / "sources"


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Landing for H0..H0+3, hours H0 and H0+1 processed."""
    root = tmp_path_factory.mktemp("erasure") / "lake"
    with pytest.MonkeyPatch.context() as patch:
        for name in KEY_VARS:
            patch.delenv(name, raising=False)  # the development key in _meta/ (as the demo uses)
        simulate(Lake(root), H0, H0 + timedelta(hours=3), users=100, seed=3, intensity=4.0)
        runner.run_hours(replace(BASE, lake=root), H0, H0 + timedelta(hours=1), build_docs=False)
    return root


@pytest.fixture
def lake_copy(shop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings over a private copy of the shop (modification times kept)."""
    for name in KEY_VARS:
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "lake"
    shutil.copytree(shop, root, symlinks=True)
    return replace(BASE, lake=root)


def landing_rows(lake: Lake, hour: datetime) -> Counter[str]:
    """Rows per user in the landing files that arrived in ``hour``."""
    counts: Counter[str] = Counter()
    for file in sorted(lake.partition(LANDING, hour).rglob("*.parquet")):
        counts.update(pq.read_table(file, columns=["user_id"]).column("user_id").to_pylist())
    return counts


def a_returning_user(settings: Settings) -> str:
    """A user staged in H0+1 whose events also land in the next, unprocessed hour."""
    lake = Lake(settings.lake)
    staged = set(lake.read(STAGING, H0 + timedelta(hours=1)).column("user_id").to_pylist())
    later = landing_rows(lake, NEXT)
    return sorted(u for u in later if u in staged)[0]


def raw_id_locations(root: Path, user: str) -> list[str]:
    """Every file outside landing/ holding ``user``: in any string column of Parquet, or anywhere in other files."""
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if not path.is_file() or relative.startswith("landing/"):
            continue
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            for column in table.column_names:
                if (
                    pa.types.is_string(table.schema.field(column).type)
                    and pc.any(pc.equal(table.column(column), user)).as_py()
                ):
                    found.append(f"{relative}:{column}")
        elif user.encode() in path.read_bytes():
            found.append(relative)
    return found


def user_rows(root: Path, user: str) -> Counter[str]:
    """Rows of ``user`` per dataset (``user_id`` columns of committed Parquet files, outside landing/)."""
    counts: Counter[str] = Counter()
    for path in root.rglob("*.parquet"):
        relative = path.relative_to(root)
        if relative.parts[0] in ("landing", "_tmp") or "user_id" not in pq.read_schema(path).names:
            continue
        cut = next((i for i, p in enumerate(relative.parts) if "=" in p), 1)
        hits = pc.sum(pc.equal(pq.read_table(path, columns=["user_id"]).column("user_id"), user)).as_py() or 0
        if hits:
            counts["/".join(relative.parts[:cut])] += hits
    return counts


def test_erased_user_leaves_every_dataset_and_never_comes_back(lake_copy: Settings) -> None:
    settings_ = lake_copy
    root = settings_.lake
    user = a_returning_user(settings_)
    before = user_rows(root, user)
    staged_in_h1 = pc.sum(pc.equal(Lake(root).read(STAGING, H0 + timedelta(hours=1)).column("user_id"), user)).as_py()
    key = export_key(settings_)
    exported = sum(
        pc.sum(pc.is_in(pq.read_table(p).column("user_key"), pa.array(pseudonymize([user], key)))).as_py() or 0
        for p in root.glob("exports/**/*.parquet")
    )
    assert before["staging/events"] and before["state"] and before["profiles"]
    # the state checkpoints keep the unrounded affinities for the next hour's snapshot: rewritten like the rest
    assert any(
        user in pq.read_table(p).column("user_id").to_pylist() for p in root.glob("state/**/affinity_sums.parquet")
    )

    result = erasure.erase_users(settings_, [user], requested_by="test", reason="GDPR art. 17")

    # Every row removed and counted, per dataset; no raw id left outside landing/.
    assert result["erased"] == 1 and result["unknown"] == 0
    assert {k: v for k, v in result["rows_removed"].items() if "(text)" not in k and k != "exports"} == dict(before)
    assert result["rows_removed"].get("exports", 0) == exported
    assert raw_id_locations(root, user) == []
    assert user not in json.dumps(result)
    # Partitions stay whole (files equal their manifests) and the snapshot still equals a rebuild.
    assert partial_partitions(root) == []
    assert verify_hour(settings_, H0 + timedelta(hours=1)).equal
    # The audit names a keyed hash, never the id; the tombstone holds the same hash.
    digest = user_hash(user, erasure_key(settings_))
    audit = erasure.read_audit(settings_)
    assert [a["user_hash"] for a in audit] == [digest] and audit[0]["requested_by"] == "test"
    assert audit[0]["rows_removed"] == result["rows_removed"] and audit[0]["reason"] == "GDPR art. 17"
    assert user not in audit_path(Lake(root)).read_text()
    assert digest in read_tombstones(Lake(root)).hashes

    # Late data: the next hour's files hold the user's events; they are counted as erased, not stored.
    summary = runner.run_hour(settings_, NEXT, build_docs=False)
    validated = summary["validate_events"]
    expected = landing_rows(Lake(root), NEXT)[user]
    assert validated["erased"] >= expected > 0
    assert validated["read"] == validated["staged"] + validated["quarantined"] + validated["erased"]
    assert sum(s["erased"] for s in validated["sources"].values()) == validated["erased"]
    assert summary["write_run_report"] is not None
    report = json.loads(next(Lake(root).partition("reports", NEXT).glob("*.json")).read_text())
    assert report["headline"]["erased"] == validated["erased"]
    # A rerun of an erased hour (the ledger re-reads its landing files) does not bring the user back either.
    rerun = runner.run_hour(settings_, H0 + timedelta(hours=1), build_docs=False)
    assert rerun["validate_events"]["erased"] >= staged_in_h1 > 0
    assert raw_id_locations(root, user) == []
    assert verify_hour(settings_, NEXT).equal


def test_unknown_id_is_a_no_op_with_a_message(lake_copy: Settings) -> None:
    root = lake_copy.lake
    files = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

    result = erasure.erase_users(lake_copy, ["no-such-user"], requested_by="test", reason="typo")

    assert result["erased"] == 0 and result["unknown"] == 1 and result["rows_removed"] == {}
    assert "found nowhere" in result["messages"][0]
    assert not read_tombstones(Lake(root)).hashes and erasure.read_audit(lake_copy) == []
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p in files} == files


def test_erasing_twice_reports_already_erased_and_changes_nothing(lake_copy: Settings) -> None:
    user = a_returning_user(lake_copy)
    erasure.erase_users(lake_copy, [user], requested_by="test", reason="first")

    again = erasure.erase_users(lake_copy, [user], requested_by="test", reason="second")

    assert again["erased"] == 0 and again["already_erased"] == 1 and again["rows_removed"] == {}
    assert len(read_tombstones(Lake(lake_copy.lake)).hashes) == 1
    assert [a["status"] for a in erasure.read_audit(lake_copy)] == ["erased", "already erased"]


def test_a_locked_lake_is_refused_and_left_untouched(lake_copy: Settings) -> None:
    lake = Lake(lake_copy.lake)
    user = a_returning_user(lake_copy)
    owner, _ = lock.acquire(lake, "scheduled__hourly", scope="run")

    with pytest.raises(lock.LakeLocked, match="scheduled__hourly"):
        erasure.erase_users(lake_copy, [user], requested_by="test", reason="x")

    lock.release(lake, owner)
    assert not tombstones_path(lake).exists() and user_rows(lake.root, user)["staging/events"] > 0


def test_tombstones_refuse_another_key(lake_copy: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    user = a_returning_user(lake_copy)
    erasure.erase_users(lake_copy, [user], requested_by="test", reason="x")
    monkeypatch.setenv(ERASURE_KEY_ENV, "another-key-of-32-characters-xxxx")

    with pytest.raises(ErasureKeyError, match="would come back"):
        runner.run_hour(lake_copy, NEXT, build_docs=False)


def test_cli_erases_ids_from_a_file(
    lake_copy: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user = a_returning_user(lake_copy)
    ids = tmp_path / "ids.txt"
    ids.write_text(f"# erasure requests\n{user}\n\nnobody-here\n")
    monkeypatch.setenv("PROFILE_ENGINE_LAKE", str(lake_copy.lake))
    monkeypatch.setenv("PROFILE_ENGINE_BUCKETS", "2")

    code = main(["erase", "--file", str(ids), "--reason", "support ticket 42"])

    out = capsys.readouterr().out
    result = json.loads(out)
    assert code == 0 and result["requested"] == 2 and result["erased"] == 1 and result["unknown"] == 1
    assert user not in out
    assert erasure.read_audit(lake_copy)[0]["requested_by"].startswith("cli:")


def test_free_text_is_never_edited_and_json_records_go_whole(settings: Settings) -> None:
    lake = Lake(settings.lake)
    target = lake.partition("quality/docs", H0)
    page = b"<td>u42</td><td>u420</td><td>42</td><p>user u42, again u42</p>"
    records = {"records": [{"user_id": "u42", "n": 42}, {"user_id": "u7", "note": "u42"}], "count": 42, "u42": 1}
    lines = b'{"user_id": "u42", "hour": 12}\n{"user_id": "u7", "hour": 12}\n'
    lake.write_dir(
        target,
        [("validations/x/page.html", page), ("results.json", json.dumps(records).encode()), ("seen.jsonl", lines)],
        {"layer": "quality/docs"},
    )
    loose = lake.path("profiles", "current")
    write_json(loose, {"hour": format_hour(H0), "note": "last seen u42"})
    pointer = loose.read_bytes()

    result = erasure.erase_users(settings, ["u42"], requested_by="test", reason="x")

    assert result["erased"] == 1 and result["partitions_rewritten"] == 1
    assert result["rows_removed"] == {"quality/docs": 2}
    assert (target / "validations/x/page.html").read_bytes() == page  # text is never searched
    assert loose.read_bytes() == pointer
    data = json.loads((target / "results.json").read_text())
    assert data == {"records": [{"user_id": "u7", "note": "u42"}], "count": 42, "u42": 1}
    assert (target / "seen.jsonl").read_text() == '{"hour": 12, "user_id": "u7"}\n'
    assert partial_partitions(lake.root) == []


def test_a_tombstoned_id_never_arrives_through_a_replay(settings: Settings) -> None:
    fresh = replace(settings, start=None, lateness_hours=24)
    user = "535871217"  # four rows of the rees46 fixture, one of them a duplicate
    requested = erasure.erase_users(fresh, [user], requested_by="test", reason="x", tombstone_unknown=True)
    assert requested["unknown"] == 1 and requested["tombstones"] == 1  # asked before the data arrived

    summary = runner.replay(fresh, FIXTURES / "rees46_2019-Oct.csv", "rees46", quality_suite=False)

    assert summary["erased"] == 4
    assert summary["read"] == summary["staged"] + summary["quarantined"] + summary["erased"]
    assert raw_id_locations(fresh.lake, user) == []


# ---- ids that look like hours, buckets and counts (trust issue, item 2) -------------------------
#
# A shop whose users with an even index are called by bare numbers ("0" .. "98": the same strings
# as hours, buckets and row counts) and the others by ordinary ids ("u0000013"). Two hours run
# through the runner with Data Docs, so ledgers, manifests, reports and Data Docs all hold "12".

NUMERIC_HOURS = (H0, H0 + timedelta(hours=1))  # hours 12 and 13


def numeric_id(user: str) -> str:
    """The simulator's ``u0000042`` as ``42`` for even indexes; odd ones and empty ids unchanged."""
    if not user.startswith("u"):
        return user
    index = int(user[1:])
    return str(index) if index % 2 == 0 else user


def renumber_landing(lake: Lake) -> None:
    """Rename the users of every landing file to ``numeric_id``, keeping each file's modification time."""
    for path in sorted(lake.path(LANDING).rglob("*.parquet")):
        table = pq.read_table(path)
        index = table.schema.get_field_index("user_id")
        renamed = pa.array([numeric_id(u) for u in table.column(index).to_pylist()], table.schema.field(index).type)
        stat = path.stat()
        pq.write_table(table.set_column(index, table.schema.field(index), renamed), path, compression="zstd")
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.fixture(scope="module")
def numeric_shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Landing for hours 12..15 with numeric and ordinary user ids; hours 12 and 13 processed with Data Docs."""
    root = tmp_path_factory.mktemp("numeric") / "lake"
    with pytest.MonkeyPatch.context() as patch:
        for name in KEY_VARS:
            patch.delenv(name, raising=False)
        simulate(Lake(root), H0, H0 + timedelta(hours=3), users=100, seed=3, intensity=4.0)
        renumber_landing(Lake(root))
        runner.run_hours(replace(BASE, lake=root), *NUMERIC_HOURS)
    return root


def lake_files(root: Path) -> dict[str, bytes]:
    """Every file of the lake (relative path -> content)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def parquet_of(payload: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(payload))


def without(table: pa.Table, column: str, values: list[str]) -> pa.Table:
    """``table`` without the rows whose ``column`` is one of ``values``."""
    return table.filter(pc.invert(pc.fill_null(pc.is_in(table.column(column), pa.array(values, pa.string())), False)))


def manifest_changes(old: dict[str, object], new: dict[str, object]) -> set[str]:
    """Top-level keys that differ, with ``files`` entries compared apart from their checksums, sizes and rows."""

    def files(m: dict[str, object]) -> list[dict[str, object]]:
        entries = m.get("files") or []
        assert isinstance(entries, list)
        return [{k: v for k, v in e.items() if k not in ("sha256", "bytes", "rows")} for e in entries]

    changed = {k for k in old.keys() | new.keys() if k != "files" and old.get(k) != new.get(k)}
    return changed | ({"files"} if files(old) != files(new) else set())


def assert_only_erased_entries_changed(before: dict[str, bytes], root: Path, ids: list[str], key_id: str) -> None:
    """After erasing ``ids``: every file byte-identical except the erased users' rows and the manifests that list them.

    A changed Parquet file equals the old one without the users' rows (``user_id``, or
    ``user_key`` for export pseudonyms; profiles may differ in their population columns,
    recomputed over the remaining users); a changed CSV export holds the remaining
    pseudonyms of its Parquet twin; a changed manifest differs only in rows, checksums,
    sizes and ``erased_at`` (a profile snapshot's also in its population and change-log counts
    and ``written_at``; the segments and exports manifests also in their segment counts; the
    ``profiles/current`` pointer in its ``profiles`` only). Ledgers, reports, Data Docs and
    quality results never change.
    Nothing is deleted, only the tombstones and the audit are added, every manifest's
    checksums and sizes hold, and no erased id is left in a user-id column.
    """

    keyed = pseudonymize(ids, export_key(Settings(lake=root)))
    assert export_key(Settings(lake=root)).key_id == key_id
    after = lake_files(root)
    assert set(before) <= set(after), f"files deleted: {sorted(set(before) - set(after))}"
    assert set(after) - set(before) <= {"_meta/erasure/tombstones.json", "_meta/erasure/audit.jsonl"}
    changed = sorted(p for p in before if before[p] != after[p])
    for path in changed:
        where = f"{path} changed"
        if path.endswith(".parquet"):
            old, new = parquet_of(before[path]), parquet_of(after[path])
            if "user_id" in old.column_names:
                expected = without(old, "user_id", ids)
                if path.startswith("profiles/"):
                    drop = [c for c in POPULATION_COLUMNS if c in old.column_names]
                    expected, new = expected.drop_columns(drop), new.drop_columns(drop)
            else:
                assert "user_key" in old.column_names, f"{where}: it has no user-id column"
                expected = without(old, "user_key", keyed)
            if not path.startswith("profiles/"):  # a snapshot's other buckets get their RFM recomputed
                assert new.num_rows < old.num_rows, f"{where} but lost no row"
            assert new.equals(expected), f"{where} beyond the erased users' rows"
        elif path.endswith(".csv"):
            twin = path.removesuffix(".csv") + ".parquet"
            assert twin in changed, f"{where} without its Parquet twin"
            old_keys = pacsv.read_csv(pa.BufferReader(before[path])).column("user_key").to_pylist()
            new_keys = pacsv.read_csv(pa.BufferReader(after[path])).column("user_key").to_pylist()
            assert new_keys == [k for k in old_keys if k not in keyed], where
        elif path == "profiles/current":  # the pointer's count of the snapshot it names
            assert manifest_changes(json.loads(before[path]), json.loads(after[path])) <= {"profiles"}, where
        elif path.endswith(MANIFEST):
            folder = path.removesuffix(MANIFEST)
            allowed = {"rows", "files", "erased_at"}
            if path.startswith("profiles/"):
                allowed |= {"written_at", "profiles", "lifecycle", "rfm_segments", "profile_changes", "new_users"}
            if path.startswith(("segments/", "exports/")):  # counts over the members left, this hour's or the last
                allowed |= {"segments", "stability", "share_checks", "changes", "suppress"}
                folder = "segments/"
            assert any(p.startswith(folder) and p != path for p in changed), f"{where} but none of its files did"
            extra = manifest_changes(json.loads(before[path]), json.loads(after[path])) - allowed
            assert not extra, f"{where} in {sorted(extra)}"
        else:
            raise AssertionError(f"{where}: only Parquet, CSV exports and manifests may change")
    assert not any(p.startswith(("_meta/ledger/", "reports/", "quality/")) for p in changed)
    assert partial_partitions(root) == []
    for manifest in root.rglob(MANIFEST):
        for entry in json.loads(manifest.read_text()).get("files") or []:
            if "bytes" in entry:
                assert (manifest.parent / entry["name"]).stat().st_size == entry["bytes"], manifest
    for data in root.rglob("*.parquet"):
        if data.relative_to(root).parts[0] != LANDING.split("/")[0]:
            names = pq.read_schema(data).names
            for column, values in (("user_id", ids), ("user_key", keyed)):
                if column in names:
                    hit = pc.is_in(pq.read_table(data, columns=[column]).column(column), pa.array(values, pa.string()))
                    assert not pc.any(hit).as_py(), f"{data}: erased {column} left"


def assert_every_hour_reruns(settings_: Settings, ids: list[str]) -> None:
    """Each processed hour reruns from its ledger; the erased users' landing rows are counted as erased."""
    for hour in NUMERIC_HOURS:
        summary = runner.run_hour(settings_, hour, build_docs=False)
        validated = summary["validate_events"]
        assert summary["write_run_report"]["status"] == "success", format_hour(hour)
        assert validated["read"] == validated["staged"] + validated["quarantined"] + validated["erased"]
        landed = landing_rows(Lake(settings_.lake), hour)
        assert validated["erased"] >= sum(landed[u] for u in ids)


def test_erasing_user_12_changes_only_that_users_data_and_hour_12_reruns(
    numeric_shop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in KEY_VARS:
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "lake"
    shutil.copytree(numeric_shop, root, symlinks=True)
    settings_ = replace(BASE, lake=root)
    assert user_rows(root, "12")["staging/events"] > 0  # user 12 is active in hour 12
    before = lake_files(root)
    assert any("hour=12" in p and b"hour=12" in before[p] for p in before if p.startswith("_meta/ledger/"))
    monkeypatch.setenv("PROFILE_ENGINE_LAKE", str(root))
    monkeypatch.setenv("PROFILE_ENGINE_BUCKETS", "2")

    code = main(["erase", "--user-id", "12", "--reason", "ticket 12"])

    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["erased"] == 1
    assert not any("(text)" in k for k in result["rows_removed"])
    assert_only_erased_entries_changed(before, root, ["12"], export_key(settings_).key_id)
    assert verify_hour(settings_, NUMERIC_HOURS[-1]).equal
    assert_every_hour_reruns(settings_, ["12"])


def test_a_short_number_nobody_has_changes_nothing(numeric_shop: Path, tmp_path: Path) -> None:
    root = tmp_path / "lake"
    shutil.copytree(numeric_shop, root, symlinks=True)
    settings_ = replace(BASE, lake=root)
    before = lake_files(root)

    with pytest.MonkeyPatch.context() as patch:
        for name in KEY_VARS:
            patch.delenv(name, raising=False)
        result = erasure.erase_users(settings_, ["13", "0", "2"], requested_by="test", reason="hours and buckets")

    assert result["unknown"] == 3 and result["erased"] == 0 and result["files_rewritten"] == 0
    assert lake_files(root) == before


@hypothesis_settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ids=st.sets(
        st.one_of(st.integers(0, 99).map(str), st.integers(0, 99).map(lambda i: f"u{i:07d}")), min_size=1, max_size=3
    )
)
@example(ids={"0", "13", "u0000067"})  # a bucket, the other hour (nobody's id), an ordinary id
def test_erasing_any_ids_changes_only_their_entries_and_every_hour_reruns(numeric_shop: Path, ids: set[str]) -> None:
    """Ids are short numbers (the strings of hours, buckets and counts; even ones are users, odd ones nobody)
    and ordinary ids (odd ones are users): erasure touches the erased users' rows and nothing else."""
    erased = sorted(ids)
    with tempfile.TemporaryDirectory() as scratch, pytest.MonkeyPatch.context() as patch:
        for name in KEY_VARS:
            patch.delenv(name, raising=False)
        root = Path(scratch) / "lake"
        shutil.copytree(numeric_shop, root, symlinks=True)
        settings_ = replace(BASE, lake=root)
        present = {u for u in erased if user_rows(root, u)}
        before = lake_files(root)

        result = erasure.erase_users(settings_, erased, requested_by="test", reason="property")

        assert result["erased"] == len(present) and result["unknown"] == len(ids) - len(present)
        assert_only_erased_entries_changed(before, root, erased, export_key(settings_).key_id)
        if present:
            assert verify_hour(settings_, NUMERIC_HOURS[-1]).equal
        assert_every_hour_reruns(settings_, erased)


def test_no_file_but_parquet_holds_a_raw_user_id(numeric_shop: Path) -> None:
    """Ledgers, manifests, run reports, quality results and Data Docs are written without raw ids, so erasure
    never has to edit free text: no ordinary id of a staged user occurs in any file outside Parquet and landing/."""
    users = {u for u in staged_users(numeric_shop) if u.startswith("u")}
    assert len(users) >= 3
    texts = {
        p.relative_to(numeric_shop).as_posix(): p.read_bytes()
        for p in numeric_shop.rglob("*")
        if p.is_file() and p.suffix != ".parquet" and not p.relative_to(numeric_shop).as_posix().startswith("landing/")
    }
    assert any(p.startswith("quality/docs/") for p in texts) and any(p.startswith("reports/") for p in texts)
    assert [(p, u) for p, payload in texts.items() for u in sorted(users) if u.encode() in payload] == []


def staged_users(root: Path) -> set[str]:
    """Every user id staged in the lake."""
    return {
        u
        for path in root.glob("staging/**/*.parquet")
        for u in pq.read_table(path, columns=["user_id"]).column("user_id").to_pylist()
    }


def hour_manifest_counts(root: Path) -> dict[str, tuple[object, int]]:
    """Per hour-level manifest of a layer written per bucket (segments, contacts, change log, the snapshot marker):
    the row count it states and the rows its committed buckets' files hold."""
    found = {}
    for layer, key in (
        ("segments", "rows"),
        ("contacts", "rows"),
        ("profile_changes", "rows"),
        ("profiles", "profiles"),
    ):
        for manifest in sorted(root.glob(f"{layer}/dt=*/hour=*/{MANIFEST}")):
            held = sum(
                pq.ParquetFile(f).metadata.num_rows
                for bucket in manifest.parent.glob(f"bucket=*/{MANIFEST}")
                for f in bucket.parent.glob("*.parquet")
            )
            found[manifest.relative_to(root).as_posix()] = (json.loads(manifest.read_text())[key], held)
    return found


def test_hour_manifests_count_the_rows_left_after_an_erasure(lake_copy: Settings) -> None:
    """The hour-level manifests (segments, contacts, change log, snapshot marker) state the rows their buckets hold
    after an erasure, as they did before it; the marker's change-log counts follow too."""
    root = lake_copy.lake
    hour = H0 + timedelta(hours=1)
    contacts = Lake(root).read("contacts", hour, columns=["user_id"]).column("user_id").to_pylist()
    user = sorted(contacts)[0]
    before = hour_manifest_counts(root)
    assert {k for k in before if "hour=13" in k} >= {
        f"{layer}/dt=2026-11-03/hour=13/{MANIFEST}" for layer in ("segments", "contacts", "profile_changes", "profiles")
    }
    assert all(stated == held for stated, held in before.values()), before

    erasure.erase_users(lake_copy, [user], requested_by="test", reason="counts")

    after = hour_manifest_counts(root)
    assert {k: v for k, v in after.items() if v[0] != v[1]} == {}
    changed = {k for k in after if after[k] != before[k]}
    assert {f"{layer}/dt=2026-11-03/hour=13/{MANIFEST}" for layer in ("segments", "contacts", "profiles")} <= changed
    marker = json.loads((root / f"profiles/dt=2026-11-03/hour=13/{MANIFEST}").read_text())
    assert marker["profile_changes"]["users"] == after[f"profile_changes/dt=2026-11-03/hour=13/{MANIFEST}"][1]


def segment_rows(root: Path, layer: str, hour: datetime) -> list[dict[str, Any]]:
    """The rows of a committed hour of ``layer`` (every bucket), as dicts."""
    return Lake(root).read(layer, hour).to_pylist()


def counts_in_the_lake(root: Path, hour: datetime) -> dict[str, Any]:
    """The counts the segments and exports manifests and the ``current`` pointer of ``hour`` state, counted from the
    rows the lake holds (an oracle apart from the code that writes them): per segment its members, members kept by
    ``stay``, control members and (against the previous hour's members) entered, exited, stayed; the rows of each
    export file, the suppression list and its changes; the snapshot's profiles."""
    now = segment_rows(root, "segments", hour)
    has_previous = Lake(root).committed("segments", hour - timedelta(hours=1))
    before = segment_rows(root, "segments", hour - timedelta(hours=1)) if has_previous else []
    names = json.loads((Lake(root).partition("segments", hour) / MANIFEST).read_text())["segments"]
    stability = {}
    for name in names:
        members = {r["user_id"] for r in now if name in r["segments"]}
        previous = {r["user_id"] for r in before if name in r["segments"]}
        against = {
            "previous_size": len(previous),
            "entered": len(members - previous),
            "exited": len(previous - members),
            "stayed": len(members & previous),
        }
        stability[name] = {
            "size": len(members),
            "held_by_stay": sum(name in r["held_by_stay"] for r in now),
            "control": sum(bool(r["control"]) and r["rule"] == name for r in now),
            **{k: v if has_previous else None for k, v in against.items()},
        }
    exports = Lake(root).partition("exports", hour)
    suppress = pq.read_table(exports / "suppress.parquet").column("change").to_pylist()
    return {
        "segments": {name: row["size"] for name, row in stability.items()},
        "stability": stability,
        "export_rows": {p.stem: pq.ParquetFile(p).metadata.num_rows for p in exports.glob("*.parquet")},
        "suppress": {
            "list_size": sum(r["action"] == "suppress" for r in now),
            "entered": suppress.count("entered"),
            "left": suppress.count("left"),
        },
        "profiles": Lake(root).read("profiles", hour, columns=["user_id"]).num_rows,
    }


def counts_stated(root: Path, hour: datetime) -> dict[str, Any]:
    """The same counts as the manifests and the pointer state them."""
    lake = Lake(root)
    segments = json.loads((lake.partition("segments", hour) / MANIFEST).read_text())
    exports = json.loads((lake.partition("exports", hour) / MANIFEST).read_text())
    pointer = json.loads(lake.path("profiles", "current").read_text())
    marker = json.loads((lake.partition("profiles", hour) / MANIFEST).read_text())
    assert exports["segments"] == segments["segments"]
    assert exports["changes"] == {
        name: {k: row[k] for k in ("entered", "exited", "stayed")} for name, row in segments["stability"].items()
    }
    return {
        "segments": segments["segments"],
        "stability": {
            name: {k: v for k, v in row.items() if k != "overlap"} for name, row in segments["stability"].items()
        },
        "export_rows": exports["rows"],
        "suppress": {k: exports["suppress"][k] for k in ("list_size", "entered", "left")},
        "profiles": pointer["profiles"] if pointer["hour"] == format_hour(hour) else marker["profiles"],
    }


def test_segment_and_export_manifests_and_the_current_pointer_count_the_rows_left_after_an_erasure(
    lake_copy: Settings,
) -> None:
    """Segment sizes, stability and share checks of the segments manifest, the exports manifest's counts and the
    ``profiles/current`` pointer's profiles equal what the lake holds after an erasure, as they did before it."""
    from profile_engine.segments.publish import publish_segments

    root = lake_copy.lake
    hour = H0 + timedelta(hours=1)
    assert json.loads(Lake(root).path("profiles", "current").read_text())["hour"] == format_hour(hour)
    entered = [
        r["user_id"]
        for r in segment_rows(root, "segments", hour)
        if "high_intent" in r["segments"] and "high_intent" not in r["held_by_stay"]
    ]
    user = sorted(entered)[0]  # matched a rule with a share check: every kind of count changes
    manifest = Lake(root).partition("segments", hour) / MANIFEST
    recomputed = publish_segments(lake_copy, hour, dry_run=True)["share_checks"]
    for published in (H0, hour):
        assert counts_stated(root, published) == counts_in_the_lake(root, published), format_hour(published)
    assert json.loads(manifest.read_text())["share_checks"] == recomputed
    before = counts_in_the_lake(root, hour)

    erasure.erase_users(lake_copy, [user], requested_by="test", reason="counts")

    after = counts_in_the_lake(root, hour)
    assert after != before and after["profiles"] == before["profiles"] - 1
    for published in (H0, hour):
        assert counts_stated(root, published) == counts_in_the_lake(root, published), format_hour(published)
    share_checks = json.loads(manifest.read_text())["share_checks"]
    assert share_checks == publish_segments(lake_copy, hour, dry_run=True)["share_checks"] != recomputed


def test_the_hour_after_an_erased_member_restates_its_stability_and_keeps_its_files(
    lake_copy: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user who was a segment member in an hour and has no row in the next hour's segments: after an erasure
    the next hour's files are left as they were, and its stability (previous size, exited, stayed, entered) counts
    the previous hour's members left, as the lake holds them."""
    from profile_engine.segments import rules as segment_rules
    from profile_engine.segments.publish import publish_segments

    root = lake_copy.lake
    later = H0 + timedelta(hours=1)
    # A first hour of welcome instead of a day: H0's newcomers leave the segment in the next hour.
    text = segment_rules.DEFAULT_RULES_PATH.read_text()
    assert text.count("enter: hours_since_first_seen <= 24") == 1
    rules_path = tmp_path / "segments.yaml"
    rules_path.write_text(text.replace("enter: hours_since_first_seen <= 24", "enter: hours_since_first_seen <= 1"))
    monkeypatch.setattr(segment_rules, "DEFAULT_RULES_PATH", rules_path)
    for hour in (H0, later):
        publish_segments(lake_copy, hour)
    left = {r["user_id"] for r in segment_rows(root, "segments", H0) if r["segments"]} - {
        r["user_id"] for r in segment_rows(root, "segments", later)
    }
    assert left, "no member of the first hour left every segment in the next"
    user = sorted(left)[0]
    was_in = {name for r in segment_rows(root, "segments", H0) if r["user_id"] == user for name in r["segments"]}
    for published in (H0, later):
        assert counts_stated(root, published) == counts_in_the_lake(root, published), format_hour(published)
    before = counts_in_the_lake(root, later)["stability"]
    hour_dir = Lake(root).partition("segments", later)
    files = {k: v for k, v in lake_files(hour_dir).items() if k != MANIFEST}
    assert any(k.endswith(".parquet") for k in files)

    erasure.erase_users(lake_copy, [user], requested_by="test", reason="counts")

    assert {k: v for k, v in lake_files(hour_dir).items() if k != MANIFEST} == files
    after = counts_in_the_lake(root, later)["stability"]
    stated = json.loads((hour_dir / MANIFEST).read_text())["stability"]
    assert {name: {k: v for k, v in row.items() if k != "overlap"} for name, row in stated.items()} == after
    gone = {"previous_size": 1, "exited": 1}  # the user was a member before and is none now: nothing else moves
    assert after == {
        name: {k: v - gone.get(k, 0) if name in was_in else v for k, v in row.items()} for name, row in before.items()
    }
    for published in (H0, later):
        assert counts_stated(root, published) == counts_in_the_lake(root, published), format_hour(published)
