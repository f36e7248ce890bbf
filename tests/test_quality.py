"""Tests for profile_engine.quality.suites: the hourly Great Expectations suite, results and Data Docs."""

from __future__ import annotations

import gc
import hashlib
import json
import weakref
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from profile_engine.config import Settings
from profile_engine.contracts.events import EVENT_TYPES, STAGED_SCHEMA
from profile_engine.contracts.profiles import (
    CART_VIEW_RATE,
    FIRST_SEEN_AT,
    LAST_SEEN_AT,
    LIFECYCLE_STAGE,
    LIFECYCLE_STAGES,
    MAX_ORDER_VALUE,
    MONETARY_TOTAL,
    PEAK_HOUR_LOCAL,
    PROFILE_COLUMNS,
    PROFILE_SCHEMA,
    PURCHASE_VIEW_RATE,
    RFM_R,
    RFM_SEGMENT,
    RFM_SEGMENTS,
    SNAPSHOT_HOUR,
    USER_ID,
    profile_schema,
    snapshot_schema,
)
from profile_engine.contracts.traits import load_traits
from profile_engine.hours import format_hour
from profile_engine.lake.storage import (
    MANIFEST,
    PROFILES,
    QUALITY_DOCS,
    QUALITY_RESULTS,
    REPORTS,
    STAGING,
    TMP,
    Lake,
    read_json,
)
from profile_engine.quality import suites
from profile_engine.quality.datadocs import DOCS_INDEX
from profile_engine.quality.suites import (
    BUCKET_IN_RANGE,
    EVENT_ID_UNIQUE,
    EVENT_TYPE_KNOWN,
    ITEM_ID_NOT_EMPTY,
    PRICE_NON_NEGATIVE,
    PROFILE_LIFECYCLE_KNOWN,
    PROFILE_PEAK_HOUR_IN_DAY,
    PROFILE_RFM_SEGMENT_KNOWN,
    PROFILE_SUITE_NAME,
    PROFILE_USER_ID_UNIQUE,
    QUANTITY_POSITIVE,
    RESULTS_FILE,
    ROW_COUNT_POSITIVE,
    TS_IN_WINDOW,
    ProfileValidationError,
    build_profile_suite,
    build_suite,
    check_staged_hour,
    column_exists_name,
    not_null_name,
    profile_range_name,
    profile_ranges,
    read_results,
    run_quality,
    validate_profiles,
)

HOUR = datetime(2026, 11, 1, 5, tzinfo=UTC)
FUTURE_SKEW = timedelta(minutes=Settings().clock_skew_minutes)
# Lets tests build rows the staging schema would refuse (nulls in required columns).
RELAXED_SCHEMA = pa.schema([field.with_nullable(True) for field in STAGED_SCHEMA])


def make_rows(n: int) -> list[dict[str, Any]]:
    """``n`` valid staged events inside HOUR."""
    return [
        {
            "event_id": f"e{i}",
            "user_id": f"u{i % 3}",
            "event_type": EVENT_TYPES[i % len(EVENT_TYPES)],
            "item_id": f"i{i}",
            "category_id": "c1",
            "price": None if i % 2 else 10.0,
            "quantity": -1 if EVENT_TYPES[i % len(EVENT_TYPES)] == "refund" else 1,  # a refund gives units back
            "order_id": None,
            "ts": HOUR + timedelta(minutes=i),
            "session_id": "s1",
            "bucket": i % 4,
        }
        for i in range(n)
    ]


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RELAXED_SCHEMA)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        lake=tmp_path / "lake", buckets=4, lateness_hours=6, quarantine_threshold=0.2, quarantine_min_rows=0
    )


def tmp_entries(settings: Settings) -> list[Path]:
    tmp = settings.lake / TMP
    return list(tmp.iterdir()) if tmp.exists() else []


def test_clean_batch_passes_and_publishes_one_docs_site(settings: Settings) -> None:
    # Arrange
    staged = to_table(make_rows(5))
    lake = Lake(settings.lake)

    # Act
    summary = run_quality(settings, HOUR, staged, quarantined_rows=1, read_rows=6, run_id="run-1")

    # Assert
    assert summary["success"] is True
    assert summary["failed_expectations"] == []
    assert summary["warnings"] == []
    assert summary["evaluated_expectations"] == summary["successful_expectations"] > 0
    assert (summary["staged_rows"], summary["quarantined_rows"], summary["read_rows"]) == (5, 1, 6)
    docs = lake.partition(QUALITY_DOCS, HOUR)
    assert docs.as_posix().endswith("quality/docs/dt=2026-11-01/hour=05")
    assert summary["docs_index"] == str(docs / DOCS_INDEX)
    assert (docs / DOCS_INDEX).is_file()
    manifest = lake.manifest(QUALITY_DOCS, HOUR)
    assert manifest["run_id"] == "run-1"
    for entry in manifest["files"]:
        assert hashlib.sha256((docs / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
    # One validation page: the site shows this hour only.
    assert len(list((docs / "validations").rglob("*.html"))) == 1
    assert tmp_entries(settings) == []


def test_bad_rows_fail_the_named_expectations_without_leaking_ids(settings: Settings) -> None:
    # Arrange
    rows = make_rows(4)
    rows[1]["price"] = -5.0
    rows[2]["event_id"] = "secret-dup-id"
    rows[3]["event_id"] = "secret-dup-id"
    rows[3]["event_type"] = "teleport"
    staged = to_table(rows)

    # Act
    summary = run_quality(settings, HOUR, staged, quarantined_rows=0, read_rows=4)

    # Assert
    assert summary["success"] is False
    assert sorted(summary["failed_expectations"]) == sorted([PRICE_NON_NEGATIVE, EVENT_ID_UNIQUE, EVENT_TYPE_KNOWN])
    published = [*Path(summary["docs_index"]).parent.rglob("*.html"), Path(summary["results_path"])]
    for path in published:
        text = path.read_text()
        assert "secret-dup-id" not in text, path
        assert "teleport" not in text, path


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("user_id", None, not_null_name("user_id")),
        ("ts", None, not_null_name("ts")),
        ("item_id", "", ITEM_ID_NOT_EMPTY),
        ("quantity", 0, QUANTITY_POSITIVE),
        ("bucket", 4, BUCKET_IN_RANGE),
        ("ts", HOUR - timedelta(hours=6, seconds=1), TS_IN_WINDOW),
        ("ts", HOUR + timedelta(hours=1) + FUTURE_SKEW, TS_IN_WINDOW),
    ],
)
def test_single_defect_fails_exactly_its_expectation(
    settings: Settings, column: str, value: object, expected: str
) -> None:
    # Arrange
    rows = make_rows(3)
    rows[1][column] = value

    # Act
    summary = run_quality(settings, HOUR, to_table(rows), quarantined_rows=0, read_rows=3, build_docs=False)

    # Assert
    assert summary["failed_expectations"] == [expected]
    assert summary["success"] is False


def test_missing_column_fails_its_existence_expectation(settings: Settings) -> None:
    staged = to_table(make_rows(3)).drop_columns(["session_id"])

    summary = run_quality(settings, HOUR, staged, quarantined_rows=0, read_rows=3, build_docs=False)

    assert summary["failed_expectations"] == [column_exists_name("session_id")]


def test_empty_hour_only_warns(settings: Settings) -> None:
    staged = STAGED_SCHEMA.empty_table()

    summary = run_quality(settings, HOUR, staged, quarantined_rows=0, read_rows=0)

    assert summary["success"] is True
    assert summary["gx_success"] is False
    assert summary["warnings"] == [ROW_COUNT_POSITIVE]
    assert summary["failed_expectations"] == []
    assert Path(summary["docs_index"]).is_file()


@pytest.mark.parametrize(
    ("quarantined", "read", "breaches"),
    [(3, 10, ["canonical"]), (2, 10, []), (0, 0, [])],
    ids=["breach", "ok", "empty"],
)
def test_run_quality_reports_the_threshold_verdict_of_ingest(
    settings: Settings, quarantined: int, read: int, breaches: list[str]
) -> None:
    staged = to_table(make_rows(read - quarantined))

    summary = run_quality(
        settings,
        HOUR,
        staged,
        quarantined_rows=quarantined,
        read_rows=read,
        build_docs=False,
        threshold_breaches=breaches,
    )

    assert summary["threshold_exceeded"] is bool(breaches)
    assert summary["threshold_breaches"] == breaches
    assert summary["quarantine_share"] == pytest.approx(quarantined / read if read else 0.0)
    assert summary["quarantine_threshold"] == 0.2
    # A threshold breach is the caller's decision to fail; the data itself is fine.
    assert summary["success"] is True


def test_threshold_counts_defective_rows_when_given(settings: Settings) -> None:
    # Arrange: 3 of 10 rows quarantined, 2 of them producer re-sends (not defective).
    staged = to_table(make_rows(7))

    # Act
    summary = run_quality(settings, HOUR, staged, quarantined_rows=3, read_rows=10, defective_rows=1, build_docs=False)

    # Assert
    assert summary["quarantine_share"] == pytest.approx(0.3)
    assert (summary["defective_rows"], summary["defective_share"]) == (1, pytest.approx(0.1))
    assert summary["threshold_exceeded"] is False
    with pytest.raises(ValueError, match="defective rows"):
        run_quality(settings, HOUR, staged, quarantined_rows=3, read_rows=10, defective_rows=4, build_docs=False)


@pytest.mark.parametrize(
    "ts",
    [HOUR - timedelta(hours=6), HOUR + timedelta(hours=1) + FUTURE_SKEW - timedelta(milliseconds=1)],
    ids=["oldest-staged", "newest-staged"],
)
def test_ts_window_accepts_both_ends_of_what_ingest_stages(settings: Settings, ts: datetime) -> None:
    rows = make_rows(2)
    rows[0]["ts"] = ts

    summary = run_quality(settings, HOUR, to_table(rows), quarantined_rows=0, read_rows=2, build_docs=False)

    assert summary["failed_expectations"] == []


def test_results_json_is_committed_with_manifest(settings: Settings) -> None:
    # Arrange
    lake = Lake(settings.lake)
    rows = make_rows(4)
    rows[0]["quantity"] = 0

    # Act
    summary = run_quality(
        settings, HOUR, to_table(rows), quarantined_rows=2, read_rows=7, run_id="r9", build_docs=False
    )

    # Assert
    base = lake.partition(QUALITY_RESULTS, HOUR)
    assert base.as_posix().endswith("quality/results/dt=2026-11-01/hour=05")
    manifest = read_json(base / MANIFEST)
    payload = (base / RESULTS_FILE).read_bytes()
    assert manifest["files"] == [
        {"name": RESULTS_FILE, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    ]
    assert manifest["run_id"] == "r9"
    assert manifest["summary"] == summary
    result = json.loads(payload)
    assert result == read_results(settings, HOUR)
    assert result["success"] is False
    assert len(result["results"]) == summary["evaluated_expectations"]
    assert summary["docs_index"] is None
    assert not lake.partition(QUALITY_DOCS, HOUR).exists()


def test_rerun_replaces_partitions_and_leaves_no_stray_files(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: GX looks for and may write a gx/ project in the working directory.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    lake = Lake(settings.lake)
    run_quality(settings, HOUR, to_table(make_rows(2)), quarantined_rows=0, read_rows=2, run_id="first")

    # Act
    run_quality(settings, HOUR, to_table(make_rows(3)), quarantined_rows=0, read_rows=3, run_id="second")

    # Assert
    assert lake.manifest(QUALITY_RESULTS, HOUR)["summary"]["staged_rows"] == 3
    assert lake.manifest(QUALITY_DOCS, HOUR)["run_id"] == "second"
    assert len(list((lake.partition(QUALITY_DOCS, HOUR) / "validations").rglob("*.html"))) == 1
    assert list(cwd.iterdir()) == []
    # _meta holds the commit journal while a partition is replaced (lake.replace_dir): no journal is left
    assert sorted(p.name for p in settings.lake.iterdir() if p.name != "_meta") == sorted(["quality", TMP])
    assert [p for p in (settings.lake / "_meta").rglob("*") if p.is_file()] == []
    assert tmp_entries(settings) == []


def test_run_quality_rejects_inconsistent_counts_and_hours(settings: Settings) -> None:
    staged = to_table(make_rows(3))

    with pytest.raises(ValueError, match="rows read"):
        run_quality(settings, HOUR, staged, quarantined_rows=1, read_rows=3)
    with pytest.raises(ValueError, match="not an hour start"):
        run_quality(settings, HOUR + timedelta(minutes=30), staged, quarantined_rows=0, read_rows=3)
    assert not settings.lake.exists() or tmp_entries(settings) == []


def test_build_suite_names_every_expectation_once_and_checks_bounds() -> None:
    suite = build_suite(ts_min=HOUR - timedelta(hours=6), ts_max=HOUR + timedelta(hours=1), buckets=4)

    names = [e.meta["name"] for e in suite.expectations if e.meta]
    assert len(names) == len(suite.expectations) == len(set(names))
    assert {column_exists_name(c) for c in STAGED_SCHEMA.names} <= set(names)
    severities = {e.meta["name"]: e.severity for e in suite.expectations if e.meta}
    assert severities.pop(ROW_COUNT_POSITIVE) == "warning"
    assert set(severities.values()) == {"critical"}
    with pytest.raises(ValueError, match="timezone"):
        build_suite(ts_min=datetime(2026, 11, 1), ts_max=HOUR, buckets=4)
    with pytest.raises(ValueError, match="not before"):
        build_suite(ts_min=HOUR, ts_max=HOUR, buckets=4)


valid_rows = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=5),  # user
        st.sampled_from(EVENT_TYPES),
        st.one_of(st.none(), st.floats(min_value=0, max_value=1e6)),  # price
        st.integers(min_value=1, max_value=50),  # quantity
        # seconds from the hour start, up to both ends of the window [start - 6h, end + skew)
        st.integers(min_value=-6 * 3600, max_value=3600 + int(FUTURE_SKEW.total_seconds()) - 1),
        st.integers(min_value=0, max_value=3),  # bucket
    ),
    min_size=1,
    max_size=30,
)


@hyp_settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=valid_rows, data=st.data())
def test_contract_valid_batches_pass_and_one_negative_price_fails_only_that(
    settings: Settings, rows: list[tuple[int, str, float | None, int, int, int]], data: st.DataObject
) -> None:
    # Arrange
    records = [
        {
            "event_id": f"e{i}",
            "user_id": f"u{user}",
            "event_type": event_type,
            "item_id": "i1",
            "category_id": None,
            "price": price,
            "quantity": -quantity if event_type == "refund" else quantity,  # a refund gives units back
            "order_id": None,
            "ts": HOUR + timedelta(seconds=offset),
            "session_id": None,
            "bucket": bucket,
        }
        for i, (user, event_type, price, quantity, offset, bucket) in enumerate(rows)
    ]
    bad = [dict(r) for r in records]
    bad[data.draw(st.integers(min_value=0, max_value=len(bad) - 1))]["price"] = -0.01
    n = len(records)

    # Act
    clean = run_quality(settings, HOUR, to_table(records), quarantined_rows=0, read_rows=n, build_docs=False)
    dirty = run_quality(settings, HOUR, to_table(bad), quarantined_rows=0, read_rows=n, build_docs=False)

    # Assert
    assert clean["success"] is True and clean["failed_expectations"] == []
    assert dirty["failed_expectations"] == [PRICE_NON_NEGATIVE]


# ---- the published profile snapshot ---------------------------------------------------


def profile_rows(n: int = 3) -> list[dict[str, Any]]:
    """``n`` valid profiles: buyers without carts (purchase/cart > 1), users without orders (null RFM)."""

    rows = []
    for i in range(n):
        row: dict[str, Any] = dict.fromkeys(PROFILE_COLUMNS)
        row.update({c: i for c in PROFILE_COLUMNS if c.startswith("count_")})
        row.update(
            {
                USER_ID: f"user-{i}",
                SNAPSHOT_HOUR: HOUR,
                FIRST_SEEN_AT: HOUR,
                LAST_SEEN_AT: HOUR,
                LIFECYCLE_STAGE: LIFECYCLE_STAGES[i % len(LIFECYCLE_STAGES)],
                RFM_SEGMENT: RFM_SEGMENTS[i % len(RFM_SEGMENTS)],
                PURCHASE_VIEW_RATE: 2.5,  # bought twice per view: real, not capped at 1
                CART_VIEW_RATE: 0.0,
                MONETARY_TOTAL: 12.5 * i,
                RFM_R: None if i == 0 else 1 + i % 5,
                PEAK_HOUR_LOCAL: 23,
            }
        )
        rows.append(row)
    return rows


def profile_table(rows: list[dict[str, Any]]) -> pa.Table:

    return pa.Table.from_pylist(rows, schema=PROFILE_SCHEMA)


def test_valid_profile_snapshot_passes() -> None:
    # Arrange
    table = profile_table(profile_rows(5))

    # Act
    summary = validate_profiles(table, HOUR)

    # Assert
    assert summary["suite"] == PROFILE_SUITE_NAME and summary["rows"] == 5
    assert summary["evaluated_expectations"] > len(build_profile_suite(frozenset(profile_ranges())).expectations)


@pytest.mark.parametrize(
    ("column", "value", "expectation"),
    [
        ("user_id", "user-0", PROFILE_USER_ID_UNIQUE),
        ("lifecycle_stage", "zombie", PROFILE_LIFECYCLE_KNOWN),
        ("rfm_segment", "whales", PROFILE_RFM_SEGMENT_KNOWN),
        ("rfm_r", 6, profile_range_name("rfm_r")),
        ("rfm_m", 0, profile_range_name("rfm_m")),
        ("max_order_value", -0.01, profile_range_name("max_order_value")),  # net spend may be negative
        ("count_purchase_24h", -1, profile_range_name("count_purchase_24h")),
        ("cart_view_rate", -0.5, profile_range_name("cart_view_rate")),
        ("open_cart_items_24h", -1, profile_range_name("open_cart_items_24h")),
        ("purchase_cart_rate_7d", -0.5, profile_range_name("purchase_cart_rate_7d")),
        ("peak_hour_local", 24, PROFILE_PEAK_HOUR_IN_DAY),
    ],
)
def test_profile_snapshot_violation_names_the_expectation(column: str, value: Any, expectation: str) -> None:
    # Arrange
    rows = profile_rows(3)
    rows[2][column] = value
    table = profile_table(rows)

    # Act
    with pytest.raises(ProfileValidationError) as raised:
        validate_profiles(table, HOUR)

    # Assert
    message = str(raised.value)
    assert expectation in message and f"column {column}" in message
    assert "failed 1 expectation(s)" in message
    assert "user-1" not in message and "user-2" not in message  # no raw ids in the message


def test_validate_profiles_leaves_no_frame_behind_for_the_next_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: publish_profiles validates one bucket after another; every frame GX validated is recorded
    frames: list[weakref.ref[Any]] = []
    to_frame = suites.gx_frame

    def recording(table: pa.Table) -> Any:
        frame = to_frame(table)
        frames.append(weakref.ref(frame))
        return frame

    monkeypatch.setattr(suites, "gx_frame", recording)
    frozen = gc.get_freeze_count()

    # Act: three buckets in a row, Python's cyclic collector off (it runs rarely on a long-lived process anyway)
    gc.disable()
    try:
        for n in (3, 4, 5):
            validate_profiles(profile_table(profile_rows(n)), HOUR)
            alive = [ref() is not None for ref in frames]
            # Assert: no frame outlives its call (GX's context, source and batch refer to each other)
            assert alive == [False] * len(frames)
    finally:
        gc.enable()
    assert gc.get_freeze_count() == frozen


def test_profile_snapshot_missing_column_is_named() -> None:
    # Arrange
    table = profile_table(profile_rows(2)).drop_columns(["rfm_segment"])

    # Act / Assert
    with pytest.raises(ProfileValidationError, match="missing column.*rfm_segment"):
        validate_profiles(table, HOUR)


@hyp_settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    counts=st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=20),
    rfm=st.lists(st.one_of(st.none(), st.integers(min_value=1, max_value=5)), min_size=20, max_size=20),
    money=st.lists(st.floats(min_value=0, max_value=1e9, allow_nan=False), min_size=20, max_size=20),
)
def test_any_snapshot_within_the_ranges_passes(counts: list[int], rfm: list[int | None], money: list[float]) -> None:
    # Arrange: ratios follow from arbitrary counts, so purchase/cart may be anything >= 0
    rows = profile_rows(len(counts))
    for i, row in enumerate(rows):
        row["count_purchase_lifetime"] = counts[i]
        row["count_cart_lifetime"] = counts[-1 - i]
        row["purchase_view_rate"] = counts[i] / (counts[-1 - i] or 1)
        row["rfm_f"] = rfm[i]
        row["avg_order_value"] = money[i]

    # Act
    summary = validate_profiles(profile_table(rows), HOUR)

    # Assert
    assert summary["rows"] == len(counts)


def test_publish_profiles_refuses_an_invalid_snapshot_and_commits_nothing(settings: Settings) -> None:
    # Arrange: built bucket profiles, one with a negative order value (a broken aggregation)
    from profile_engine.profiles import build

    lake = Lake(settings.lake)
    rows = profile_rows(4)
    for row in rows:
        row[RFM_SEGMENT] = None  # population features are added by publish
    rows[3][MAX_ORDER_VALUE] = -5.0
    built = snapshot_schema(load_traits(settings.traits))  # what build_profiles writes: declared traits too
    snapshot = pa.Table.from_pylist(rows, schema=profile_schema(load_traits(settings.traits))).select(built.names)
    for bucket in range(settings.buckets):
        part = snapshot.slice(bucket * 2, 2).cast(built)
        lake.write_partition(PROFILES, HOUR, part, bucket=bucket, run_id="t")

    # Act
    with pytest.raises(ProfileValidationError, match=profile_range_name(MAX_ORDER_VALUE)):
        build.publish_profiles(settings, HOUR, run_id="t")

    # Assert
    assert not (lake.partition(PROFILES, HOUR) / MANIFEST).is_file()
    assert not lake.path(PROFILES, "current").exists()


# ---- the check_quality step: the suite over what validate_events staged ------------------


def stage_buckets(settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Commit ``rows`` to staging of HOUR, one partition per bucket, as validate_events does."""
    lake = Lake(settings.lake)
    for b in range(settings.buckets):
        part = [r for r in rows if r["bucket"] == b]
        lake.write_partition(STAGING, HOUR, pa.Table.from_pylist(part, schema=STAGED_SCHEMA), bucket=b)


def validated_summary(staged: int, quarantined: int = 1, defective: int = 1) -> dict[str, Any]:
    return {
        "hour": format_hour(HOUR),
        "read": staged + quarantined,
        "staged": staged,
        "quarantined": quarantined,
        "defective": defective,
    }


def test_check_staged_hour_validates_every_bucket_read_back_from_staging(settings: Settings) -> None:
    # Arrange: the only bad row sits in the last bucket.
    rows = make_rows(8)
    rows[7]["price"] = -1.0
    assert rows[7]["bucket"] == settings.buckets - 1
    stage_buckets(settings, rows)

    # Act
    summary = check_staged_hour(settings, HOUR, validated_summary(8), run_id="check-1")

    # Assert
    assert summary["failed_expectations"] == [PRICE_NON_NEGATIVE]
    assert (summary["staged_rows"], summary["quarantined_rows"], summary["read_rows"]) == (8, 1, 9)
    assert summary["defective_rows"] == 1
    lake = Lake(settings.lake)
    assert lake.manifest(QUALITY_RESULTS, HOUR)["run_id"] == "check-1"
    assert Path(summary["docs_index"]).is_file()
    results = read_results(settings, HOUR)
    assert results["statistics"]["evaluated_expectations"] == summary["evaluated_expectations"]
    assert "pandas_data_fingerprint" not in json.dumps(results)  # GX's per-value batch hash is skipped


def test_check_staged_hour_gives_the_verdict_of_the_table_validation_wrote(settings: Settings) -> None:
    # Arrange
    rows = make_rows(6)
    stage_buckets(settings, rows)
    in_memory = pa.Table.from_pylist(sorted(rows, key=lambda r: r["bucket"]), schema=STAGED_SCHEMA)

    # Act
    read_back = check_staged_hour(settings, HOUR, validated_summary(6), build_docs=False)
    given_table = check_staged_hour(settings, HOUR, validated_summary(6), build_docs=False, staged=in_memory)

    # Assert
    volatile = ("results_path", "docs_index")
    assert {k: v for k, v in read_back.items() if k not in volatile} == {
        k: v for k, v in given_table.items() if k not in volatile
    }
    assert read_back["success"] is True and read_back["docs_index"] is None


def test_check_staged_hour_refuses_another_hour_or_changed_staging(settings: Settings) -> None:
    stage_buckets(settings, make_rows(4))

    with pytest.raises(ValueError, match="summary of hour"):
        check_staged_hour(settings, HOUR, {**validated_summary(4), "hour": format_hour(HOUR + timedelta(hours=1))})
    with pytest.raises(RuntimeError, match="holds 4 rows, validate_events staged 5"):
        check_staged_hour(settings, HOUR, validated_summary(5))
    with pytest.raises(FileNotFoundError, match="partition not committed"):
        check_staged_hour(
            settings,
            HOUR + timedelta(hours=1),
            {**validated_summary(4), "hour": format_hour(HOUR + timedelta(hours=1))},
        )
    assert not Lake(settings.lake).committed(QUALITY_RESULTS, HOUR)


def test_run_report_takes_the_quality_verdict_from_check_quality() -> None:
    from profile_engine.ops import report

    validated = {"read": 3, "staged": 3, "quarantined": 0, "erased": 0}

    split = report.build_report(HOUR, {"validate_events": validated, "check_quality": {"success": False}}, run_id="r")
    together = report.build_report(HOUR, {"validate_events": {**validated, "quality": {"success": True}}}, run_id="r")
    missing = report.build_report(HOUR, {"validate_events": validated}, run_id="r")

    assert split["headline"]["quality_success"] is False
    assert split["stages"]["check_quality"]["status"] == "ok"
    assert together["headline"]["quality_success"] is True
    assert missing["headline"]["quality_success"] is None
    assert missing["stages"]["check_quality"]["status"] == "not completed"


@pytest.mark.timeout(300)
def test_runner_checks_quality_of_an_hour_that_failed_the_quarantine_threshold(tmp_path: Path) -> None:
    # Arrange: half of the hour's rows are defective, above the 10% threshold.
    from profile_engine.contracts.events import EVENT_SCHEMA
    from profile_engine.ingest import events as ingest
    from profile_engine.lake.storage import LANDING
    from profile_engine.ops import runner

    settings = Settings(lake=tmp_path / "lake", buckets=2, quarantine_threshold=0.1, quarantine_min_rows=0, start=HOUR)
    lake = Lake(settings.lake)
    rows = [{k: v for k, v in r.items() if k != "bucket"} for r in make_rows(6)]
    for r in rows[:3]:
        r["quantity"] = 0
    landing = lake.partition(LANDING, HOUR)
    landing.mkdir(parents=True)
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=EVENT_SCHEMA), landing / "a.parquet")

    # Act
    with pytest.raises(ingest.QuarantineThresholdExceeded):
        runner.run_hour(settings, HOUR)

    # Assert: the staged half was checked, and the report carries both summaries.
    report = read_json(lake.partition(REPORTS, HOUR) / "report.json")
    assert report["stages"]["validate_events"]["status"] == "failed"
    assert report["stages"]["check_quality"]["summary"]["staged_rows"] == 3
    assert report["headline"]["quality_success"] is True
    assert lake.committed(QUALITY_RESULTS, HOUR) and lake.committed(QUALITY_DOCS, HOUR)
    assert report["stages"]["build_profiles"]["status"] == "not completed"


def test_quality_reads_the_threshold_verdict_of_ingest_where_whole_hour_shares_disagreed(tmp_path: Path) -> None:
    # Arrange: two sources of 6 rows each, one with 3 defective rows (a missing user id).
    # Each source is below the 10-row minimum, so ingest finds no breach; the hour as a
    # whole read 12 rows with a 25% defective share, which a whole-hour check called a breach.
    from profile_engine.ingest import events as ingest
    from profile_engine.lake.storage import LANDING

    hour = datetime(2026, 11, 2, 10, tzinfo=UTC)
    settings = Settings(lake=tmp_path / "lake", buckets=2, quarantine_threshold=0.05, quarantine_min_rows=10)
    landing = Lake(settings.lake).partition(LANDING, hour)
    (landing / "source=order_lines").mkdir(parents=True)
    canonical = ["event_id,user_id,event_type,item_id,ts"]
    canonical += [f"ok{i},u{i},view,i1,2026-11-02 10:05:00+00" for i in range(3)]
    canonical += [f"bad{i},,view,i1,2026-11-02 10:05:00+00" for i in range(3)]
    (landing / "a.csv").write_text("\n".join(canonical) + "\n")
    orders = ["Invoice,StockCode,Description,Quantity,InvoiceDate,Price,Customer ID,Country"]
    orders += [f"{i},85048,X,2,2026-11-02 10:05:00,1.0,13085,UK" for i in range(6)]
    (landing / "source=order_lines" / "orders.csv").write_text("\n".join(orders) + "\n")
    ingest.extract_events(settings, hour)
    validated = ingest.validate_events(settings, hour)

    # Act
    summary = check_staged_hour(settings, hour, validated, build_docs=False)

    # Assert: one verdict, defined by ingest and carried by its summary.
    assert validated["read"] == 12 and validated["defective"] == 3
    assert validated["threshold_breaches"] == [] and validated["threshold_exceeded"] is False
    assert summary["threshold_exceeded"] is False
    assert summary["threshold_breaches"] == []
    assert summary["defective_share"] == pytest.approx(0.25)


def rows_at(hour: datetime, n: int) -> list[dict[str, Any]]:
    """``make_rows(n)`` moved into ``hour``."""
    return [{**row, "ts": row["ts"] + (hour - HOUR)} for row in make_rows(n)]


def test_data_docs_of_old_passing_hours_are_pruned_and_failed_or_recent_ones_kept(settings: Settings) -> None:
    # Arrange: keep 2 hours; an old passing hour, an old failed one (critical expectation),
    # an old one that breached the quarantine threshold, a recent passing one.
    from dataclasses import replace

    from profile_engine.quality.datadocs import PRUNED_FILE

    settings = replace(settings, data_docs_keep_hours=2)
    lake = Lake(settings.lake)
    passing, failing, breached = HOUR, HOUR + timedelta(hours=1), HOUR + timedelta(hours=2)
    newest = HOUR + timedelta(hours=6)
    recent = newest - timedelta(hours=2)
    bad = rows_at(failing, 3)
    bad[0]["bucket"] = 99
    run_quality(settings, passing, to_table(rows_at(passing, 3)), quarantined_rows=0, read_rows=3)
    failed = run_quality(settings, failing, to_table(bad), quarantined_rows=0, read_rows=3)
    run_quality(
        settings,
        breached,
        to_table(rows_at(breached, 3)),
        quarantined_rows=3,
        read_rows=6,
        threshold_breaches=["canonical"],
    )
    full_size = sum(p.stat().st_size for p in lake.partition(QUALITY_DOCS, passing).rglob("*") if p.is_file())

    # Act: writing a new hour's docs prunes what fell out of the window (once).
    later = run_quality(settings, recent, to_table(rows_at(recent, 3)), quarantined_rows=0, read_rows=3)
    summary = run_quality(settings, newest, to_table(rows_at(newest, 3)), quarantined_rows=0, read_rows=3)

    # Assert: the old passing hour's site is replaced by a page saying when and why.
    assert failed["success"] is False
    assert later["docs_pruned"] == [format_hour(passing)]
    assert summary["docs_pruned"] == []
    stub = lake.partition(QUALITY_DOCS, passing)
    assert lake.committed(QUALITY_DOCS, passing) and not (stub / "validations").exists()
    record = read_json(stub / PRUNED_FILE)
    assert record["hour"] == format_hour(passing) and record["keep_hours"] == 2
    page = (stub / DOCS_INDEX).read_text()
    assert "pruned" in page and format_hour(passing) in page and record["pruned_at"] in page
    stub_size = sum(p.stat().st_size for p in stub.rglob("*") if p.is_file())
    assert stub_size < 4096 < full_size
    assert read_results(settings, passing)["success"] is True  # the results JSON stays
    for kept in (failing, breached, recent, newest):
        assert (lake.partition(QUALITY_DOCS, kept) / "validations").is_dir(), format_hour(kept)
        assert not (lake.partition(QUALITY_DOCS, kept) / PRUNED_FILE).exists()
