"""Erasure (issue 9): users leave every retained dataset, stay out for ever, and the audit holds no raw id.

A small shop (100 users) whose first two hours ran through the hour runner; each test
erases in its own copy of that lake.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from profile_engine import erasure, lock, runner
from profile_engine.cli import main
from profile_engine.config import Settings
from profile_engine.hours import format_hour
from profile_engine.lake import LANDING, STAGING, Lake, write_json
from profile_engine.segments import export_key, pseudonymize
from profile_engine.simulate import simulate
from profile_engine.verify import verify_hour

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
    digest = erasure.user_hash(user, erasure.erasure_key(settings_))
    audit = erasure.read_audit(settings_)
    assert [a["user_hash"] for a in audit] == [digest] and audit[0]["requested_by"] == "test"
    assert audit[0]["rows_removed"] == result["rows_removed"] and audit[0]["reason"] == "GDPR art. 17"
    assert user not in erasure.audit_path(Lake(root)).read_text()
    assert digest in erasure.read_tombstones(Lake(root)).hashes

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
    assert not erasure.read_tombstones(Lake(root)).hashes and erasure.read_audit(lake_copy) == []
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p in files} == files


def test_erasing_twice_reports_already_erased_and_changes_nothing(lake_copy: Settings) -> None:
    user = a_returning_user(lake_copy)
    erasure.erase_users(lake_copy, [user], requested_by="test", reason="first")

    again = erasure.erase_users(lake_copy, [user], requested_by="test", reason="second")

    assert again["erased"] == 0 and again["already_erased"] == 1 and again["rows_removed"] == {}
    assert len(erasure.read_tombstones(Lake(lake_copy.lake)).hashes) == 1
    assert [a["status"] for a in erasure.read_audit(lake_copy)] == ["erased", "already erased"]


def test_a_locked_lake_is_refused_and_left_untouched(lake_copy: Settings) -> None:
    lake = Lake(lake_copy.lake)
    user = a_returning_user(lake_copy)
    owner, _ = lock.acquire(lake, "scheduled__hourly", scope="run")

    with pytest.raises(lock.LakeLocked, match="scheduled__hourly"):
        erasure.erase_users(lake_copy, [user], requested_by="test", reason="x")

    lock.release(lake, owner)
    assert not erasure.tombstones_path(lake).exists() and user_rows(lake.root, user)["staging/events"] > 0


def test_tombstones_refuse_another_key(lake_copy: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    user = a_returning_user(lake_copy)
    erasure.erase_users(lake_copy, [user], requested_by="test", reason="x")
    monkeypatch.setenv(erasure.ERASURE_KEY_ENV, "another-key-of-32-characters-xxxx")

    with pytest.raises(erasure.ErasureKeyError, match="would come back"):
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


def test_data_docs_and_json_are_scrubbed_and_manifests_follow(settings: Settings) -> None:
    lake = Lake(settings.lake)
    target = lake.partition("quality/docs", H0)
    page = b"<td>u42</td><td>u420</td><td>42</td><p>user u42, again u42</p>"
    results = json.dumps({"unexpected": ["u42", "u7"], "count": 42, "u42": 1}).encode()
    lake.write_dir(target, [("validations/x/page.html", page), ("results.json", results)], {"layer": "quality/docs"})
    loose = lake.path("profiles", "current")
    write_json(loose, {"hour": format_hour(H0), "note": "last seen u42"})

    result = erasure.erase_users(settings, ["u42"], requested_by="test", reason="x")

    assert result["erased"] == 1 and result["partitions_rewritten"] == 1
    html = (target / "validations/x/page.html").read_text()
    assert "u42<" not in html and "u420" in html and "<td>42</td>" in html and html.count("[erased]") == 3
    data = json.loads((target / "results.json").read_text())
    assert data == {"unexpected": ["[erased]", "u7"], "count": 42, "[erased]": 1}
    assert json.loads(loose.read_text())["note"] == "last seen [erased]"
    assert partial_partitions(lake.root) == []


@hypothesis_settings(max_examples=40, deadline=None)
@given(
    ids=st.sets(st.from_regex(r"[a-z][a-z0-9]{1,6}", fullmatch=True), min_size=1, max_size=3),
    others=st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), max_size=8),
    separators=st.lists(st.sampled_from([" ", ",", '"', "<", ">", "\n", "; ", "/", "."]), min_size=1, max_size=8),
)
def test_id_pattern_removes_every_id_token_and_keeps_every_other(
    ids: set[str], others: list[str], separators: list[str]
) -> None:
    tokens = sorted(ids) + [o for o in others if o not in ids]
    text = "".join(t + separators[i % len(separators)] for i, t in enumerate(tokens))
    pattern = erasure.id_pattern(ids)

    scrubbed = pattern.sub(erasure.REDACTED, text)

    assert pattern.search(scrubbed) is None
    kept = [o for o in others if o not in ids]
    assert all(o in scrubbed for o in kept)
    assert scrubbed.count(erasure.REDACTED) == len(ids)


def test_a_tombstoned_id_never_arrives_through_a_replay(settings: Settings) -> None:
    fresh = replace(settings, start=None, lateness_hours=24)
    user = "535871217"  # four rows of the rees46 fixture, one of them a duplicate
    requested = erasure.erase_users(fresh, [user], requested_by="test", reason="x", tombstone_unknown=True)
    assert requested["unknown"] == 1 and requested["tombstones"] == 1  # asked before the data arrived

    summary = runner.replay(fresh, FIXTURES / "rees46_2019-Oct.csv", "rees46", quality_suite=False)

    assert summary["erased"] == 4
    assert summary["read"] == summary["staged"] + summary["quarantined"] + summary["erased"]
    assert raw_id_locations(fresh.lake, user) == []
