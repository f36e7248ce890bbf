"""Mappings, the bad-input corpus, and replays of each shipped mapping's public layout."""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from profile_engine.config import Settings
from profile_engine.hours import HOUR
from profile_engine.ingest import events as ingest
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake
from profile_engine.ops import runner
from profile_engine.sources import mappings as sources
from profile_engine.sources import replay as source_replay
from tests.conftest import HOUR0

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = FIXTURES / "corpus"
CASES: dict[str, dict[str, Any]] = yaml.safe_load((CORPUS / "cases.yaml").read_text())


def land_copy(settings: Settings, file: Path, relative: str, arrival: datetime = HOUR0) -> Path:
    """Copy ``file`` into the arrival partition under ``relative`` (which may start with source=NAME/)."""
    target = Lake(settings.lake).partition(lk.LANDING, arrival) / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(file, target)
    return target


def ingest_hour(settings: Settings, hour: datetime = HOUR0) -> dict[str, Any]:
    ingest.extract_events(settings, hour)
    return ingest.validate_events(settings, hour)


@pytest.fixture
def lenient(settings: Settings) -> Settings:
    """The policy never fails the hour: the corpus checks reasons, not the threshold."""
    return replace(settings, quarantine_threshold=1.0, lateness_hours=24)


# ---- the corpus -----------------------------------------------------------------------


def test_corpus_has_at_least_25_kinds() -> None:
    assert len(CASES) >= 25
    on_disk = {p.relative_to(CORPUS / "files").as_posix() for p in (CORPUS / "files").rglob("*") if p.is_file()}
    assert set(CASES) == on_disk


@pytest.mark.parametrize("name", sorted(CASES))
def test_corpus_file_ends_as_listed(lenient: Settings, name: str) -> None:
    # Arrange
    expected = CASES[name]
    land_copy(lenient, CORPUS / "files" / name, name)
    ingest.extract_events(lenient, HOUR0)
    lake = Lake(lenient.lake)

    # Act / Assert
    if "error" in expected:
        with pytest.raises(sources.SourceError, match=expected["error"]) as raised:
            ingest.validate_events(lenient, HOUR0)
        assert Path(name).name in str(raised.value)
        assert not lake.committed(lk.QUARANTINE, HOUR0)  # nothing of the hour is written half
        assert not lake.committed(lk.STAGING, HOUR0, 0)
        return
    summary = ingest.validate_events(lenient, HOUR0)
    assert summary["staged"] == expected["staged"]
    assert summary["reasons"] == expected["reasons"]
    assert summary["read"] == summary["staged"] + summary["quarantined"] + summary["erased"]
    quarantined = lake.read(lk.QUARANTINE, HOUR0)
    assert quarantined.num_rows == summary["quarantined"]
    assert lake.read(lk.STAGING, HOUR0).num_rows == summary["staged"]


def test_quarantine_keeps_original_values_and_raw_lines(lenient: Settings) -> None:
    land_copy(lenient, CORPUS / "files" / "nan_price.csv", "a.csv")
    land_copy(lenient, CORPUS / "files" / "malformed_line.csv", "b.csv")

    ingest_hour(lenient)

    rows = Lake(lenient.lake).read(lk.QUARANTINE, HOUR0).to_pylist()
    by_file = {r["source_file"].rsplit("/", 1)[1]: r for r in rows}
    assert by_file["a.csv"]["price"] == "NaN" and by_file["a.csv"]["reasons"] == "bad_price"
    assert by_file["b.csv"]["source_line"] == "bad1,u1,view"
    assert by_file["b.csv"]["reasons"] == "malformed_row"


def test_nineteen_digit_ids_survive_exactly(lenient: Settings) -> None:
    land_copy(lenient, CORPUS / "files" / "id_19_digits.csv", "a.csv")
    land_copy(lenient, CORPUS / "files" / "json_19_digit_number.jsonl", "b.jsonl")

    ingest_hour(lenient)

    lake = Lake(lenient.lake)
    staged = lake.read(lk.STAGING, HOUR0).column("user_id").to_pylist()
    quarantined = lake.read(lk.QUARANTINE, HOUR0).column("user_id").to_pylist()  # same event id "ok1": a duplicate
    assert staged == quarantined == ["1234567890123456789"]


def test_declared_latin1_encoding_reads_the_bytes(lenient: Settings) -> None:
    mapping_dir = Lake(lenient.lake).path(sources.LAKE_SOURCES_DIR)
    mapping_dir.mkdir(parents=True)
    shutil.copyfile(CORPUS / "latin1_source.yaml", mapping_dir / "corpus_latin1.yaml")
    land_copy(lenient, CORPUS / "files" / "latin1_bytes.csv", "source=corpus_latin1/a.csv")

    summary = ingest_hour(lenient)

    assert (summary["staged"], summary["quarantined"]) == (2, 0)
    assert "Jos\u00e9" in Lake(lenient.lake).read(lk.STAGING, HOUR0).column("user_id").to_pylist()


def test_duplicate_across_hours_is_quarantined_and_a_rerun_keeps_its_rows(lenient: Settings) -> None:
    land_copy(lenient, CORPUS / "files" / "gzip.csv.gz", "a.csv.gz")
    land_copy(lenient, CORPUS / "files" / "gzip.csv.gz", "a-again.csv.gz", arrival=HOUR0 + HOUR)
    first = ingest_hour(lenient)

    second = ingest_hour(lenient, HOUR0 + HOUR)
    rerun = ingest_hour(lenient)

    assert first["staged"] == rerun["staged"] == 2
    assert (second["staged"], second["reasons"]) == (0, {"duplicate": 2})


def test_resent_file_without_event_ids_yields_the_same_ids(lenient: Settings) -> None:
    file = CORPUS / "files" / "source=taobao" / "exact_duplicate_rows.csv"
    land_copy(lenient, file, "source=taobao/a.csv")
    land_copy(lenient, file, "source=taobao/a-resent.csv")

    summary = ingest_hour(lenient)

    # Identical rows inside one file are two events; the re-sent copy repeats both ids.
    assert (summary["staged"], summary["reasons"]) == (2, {"duplicate": 2})


def test_file_changed_after_ingestion_is_reported_and_a_rerun_fails(lenient: Settings) -> None:
    path = land_copy(lenient, CORPUS / "files" / "utf8_bom.csv", "a.csv")
    ingest_hour(lenient)
    path.write_text(path.read_text(encoding="utf-8-sig") + "extra,u9,view,i1,c1,1,1,,2026-11-02 10:06:00+00,s\n")

    later = ingest.extract_events(lenient, HOUR0 + HOUR)

    assert later["changed_after_ingestion"] == [str(path.relative_to(lenient.lake))]
    assert later["files"] == 0
    with pytest.raises(ingest.LedgerError, match="changed since"):
        ingest.extract_events(lenient, HOUR0)


# ---- policy ---------------------------------------------------------------------------


def _canonical_rows(n_ok: int, n_bad: int) -> str:
    header = "event_id,user_id,event_type,item_id,ts"
    ok = [f"ok{i},u{i},view,i1,2026-11-02 10:05:00+00" for i in range(n_ok)]
    bad = [f"bad{i},,view,i1,2026-11-02 10:05:00+00" for i in range(n_bad)]
    return "\n".join([header, *ok, *bad]) + "\n"


def test_threshold_fails_after_writing_only_above_the_minimum_rows(settings: Settings, tmp_path: Path) -> None:
    settings = replace(settings, quarantine_threshold=0.05, quarantine_min_rows=100)
    file = tmp_path / "f.csv"
    file.write_text(_canonical_rows(90, 10))
    land_copy(settings, file, "a.csv")
    ingest.extract_events(settings, HOUR0)

    with pytest.raises(ingest.QuarantineThresholdExceeded, match="10 of 100 rows") as raised:
        ingest.validate_events(settings, HOUR0)

    assert raised.value.summary["threshold_breaches"] == ["canonical"]
    assert Lake(settings.lake).committed(lk.QUARANTINE, HOUR0)


def test_quiet_hour_below_minimum_rows_does_not_fail(settings: Settings, tmp_path: Path) -> None:
    settings = replace(settings, quarantine_threshold=0.05, quarantine_min_rows=1000)
    file = tmp_path / "f.csv"
    file.write_text(_canonical_rows(5, 5))
    land_copy(settings, file, "a.csv")

    summary = ingest_hour(settings)

    assert summary["threshold_breaches"] == []
    assert summary["sources"]["canonical"]["threshold_applies"] is False


def test_reasons_a_mapping_expects_do_not_count(settings: Settings, tmp_path: Path) -> None:
    settings = replace(settings, quarantine_threshold=0.05, quarantine_min_rows=1, lateness_hours=24)
    lines = ["Invoice,StockCode,Description,Quantity,InvoiceDate,Price,Customer ID,Country"]
    lines += [f"C{i},85048,X,-1,2026-11-02 10:05:00,1.0,,UK" for i in range(5)]  # refunds without customer
    lines += [f"{i},85048,X,2,2026-11-02 10:05:00,1.0,13085,UK" for i in range(5)]
    file = tmp_path / "orders.csv"
    file.write_text("\n".join(lines) + "\n")
    land_copy(settings, file, "source=order_lines/orders.csv")

    summary = ingest_hour(settings)

    assert summary["sources"]["order_lines"]["quarantined"] == 5
    assert summary["sources"]["order_lines"]["defective"] == 0
    assert summary["threshold_breaches"] == []


def test_empty_hour_is_valid(settings: Settings) -> None:
    summary = ingest_hour(settings)

    assert (summary["read"], summary["staged"], summary["quarantined"]) == (0, 0, 0)


# ---- mappings -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["taobao", "retailrocket", "rees46", "order_lines"])
def test_shipped_mappings_load(name: str) -> None:
    mapping = sources.load_mapping(name)

    assert mapping.name == name
    assert set(sources.REQUIRED) - {"event_id"} <= set(mapping.fields) | set(mapping.constants)


RR_FIELDS = {"ts": "timestamp", "user_id": "visitorid", "event_type": "event", "item_id": "itemid"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Bad Name"}, "name: must be a lower-case identifier"),
        ({"fields": {"user_id": "u", "item_id": "i", "event_type": "e"}}, "required canonical column 'ts'"),
        ({"fields": {"colour": "c"}}, "fields.colour: not a canonical column"),
        ({"event_types": {"pv": "pageview"}}, "event_types.pv: 'pageview' is not one of"),
        ({"timestamp": {"format": "julian"}}, "timestamp.format"),
        ({"timestamp": {"format": "iso", "timezone": "Mars/Olympus"}}, "unknown time zone"),
        ({"header": False}, "columns: a file without header"),
        ({"policy": {"expected_reasons": ["sunspots"]}}, "policy.expected_reasons: unknown reason"),
        ({"policy": {"quarantine_threshold": 5}}, r"policy.quarantine_threshold: must be a share"),
        ({"colour": "red"}, "colour: unknown key"),
        ({"fields": {**RR_FIELDS, "user_id": []}}, "fields.user_id: must name a source column"),
        ({"fields": {**RR_FIELDS, "user_id": ["visitorid", 7]}}, "fields.user_id: must name a source column"),
        ({"clean": {"user_id": ["float"]}}, "clean.user_id: unknown step 'float'"),
        ({"clean": {"user_id": ["lower", "upper"]}}, "clean.user_id: lower and upper"),
        ({"clean": {"colour": "trim"}}, "clean.colour: not a canonical column"),
        ({"clean": {"price": "trim"}}, "clean.price: not mapped in fields"),
        ({"clean": ["trim"]}, "clean: must map canonical columns to steps"),
    ],
)
def test_invalid_mapping_names_file_key_and_problem(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    document = yaml.safe_load((sources.SOURCES_DIR / "retailrocket.yaml").read_text())
    document.update(change)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(document))

    with pytest.raises(sources.MappingError, match=message) as raised:
        sources.load_mapping(str(path))

    assert str(path) in str(raised.value)


def test_unknown_mapping_name_lists_the_shipped_ones() -> None:
    with pytest.raises(sources.MappingError, match="retailrocket"):
        sources.load_mapping("nosuchsource")


@given(
    core=st.lists(st.integers(min_value=0, max_value=source_replay.OUTLIER_GAP_HOURS), min_size=1, max_size=40),
    outliers=st.lists(st.integers(min_value=10_000, max_value=500_000), max_size=3),
)
@hyp_settings(max_examples=60, deadline=None)
def test_main_range_spans_the_core_whatever_its_gaps_and_never_far_outliers(
    core: list[int], outliers: list[int]
) -> None:
    base = datetime(2020, 1, 1, tzinfo=UTC)
    counts: dict[datetime, int] = {}
    for offset in core:  # the core holds almost every row; its gaps may be up to a month long
        counts[base + timedelta(hours=offset)] = counts.get(base + timedelta(hours=offset), 0) + 1000
    for offset in outliers:
        counts[base + timedelta(hours=offset)] = counts.get(base + timedelta(hours=offset), 0) + 1

    first, last = source_replay.main_range(counts)

    assert (first, last) == (base + timedelta(hours=min(core)), base + timedelta(hours=max(core)))


# ---- replay of each public layout -----------------------------------------------------

REPLAYS = {
    # mapping: (fixture, first hour, last hour, read, staged, reasons)
    "taobao": ("taobao_UserBehavior.csv", "2017-11-25T10", "2017-11-25T11", 8, 7, {"too_late": 1}),
    "retailrocket": ("retailrocket_events.csv", "2015-06-02T05", "2015-06-02T06", 4, 4, {}),
    "rees46": ("rees46_2019-Oct.csv", "2019-10-01T00", "2019-10-01T01", 6, 6, {}),
    "order_lines": (
        "order_lines_online_retail_II.csv",
        "2009-12-01T07",
        "2009-12-01T08",
        5,
        4,
        {"missing_user_id": 1},  # the cancellation C489449 is a refund event
    ),
}


@pytest.mark.parametrize("name", sorted(REPLAYS))
def test_each_mapping_replays_its_fixture(settings: Settings, name: str) -> None:
    fixture, first, last, read, staged, reasons = REPLAYS[name]
    settings = replace(settings, start=None, lateness_hours=24)

    summary = runner.replay(settings, FIXTURES / "sources" / fixture, name, quality_suite=False)

    assert (summary["first_hour"][:13], summary["last_hour"][:13]) == (first, last)
    assert (summary["read"], summary["staged"], summary["reasons"]) == (read, staged, reasons)
    assert summary["read"] == summary["rows"] == summary["staged"] + summary["quarantined"] + summary["erased"]
    assert summary["snapshots"] == [summary["last_hour"]]
    assert Lake(settings.lake).committed(lk.PROFILES, datetime.fromisoformat(summary["last_hour"]))


def test_replay_puts_outliers_at_the_ends_and_counts_them(settings: Settings) -> None:
    settings = replace(settings, start=None, lateness_hours=24)

    summary = runner.replay(settings, FIXTURES / "sources" / "taobao_UserBehavior.csv", "taobao", quality_suite=False)

    assert (summary["hours"], summary["outliers_before"], summary["outliers_after"]) == (2, 1, 0)


def test_replay_maps_types_ids_and_zones(settings: Settings) -> None:
    settings = replace(settings, start=None, lateness_hours=24)

    runner.replay(settings, FIXTURES / "sources" / "order_lines_online_retail_II.csv", "order_lines")
    runner.replay(settings, FIXTURES / "sources" / "rees46_2019-Oct.csv", "rees46", quality_suite=False)

    lake = Lake(settings.lake)
    orders = lake.read(lk.STAGING, datetime(2009, 12, 1, 7, tzinfo=UTC)).sort_by("item_id").to_pylist()
    assert [(r["order_id"], r["quantity"], r["price"], r["event_type"]) for r in orders] == [
        ("C489449", -12, 2.95, "refund"),
        ("489434", 12, 6.75, "purchase"),
        ("489434", 12, 6.95, "purchase"),
    ]
    assert orders[1]["ts"] == datetime(2009, 12, 1, 7, 45, tzinfo=UTC)  # London is UTC in December
    assert [r["local_hour"] for r in orders] == [7, 7, 7]
    assert lake.path("quality/docs/dt=2009-12-01/hour=07/index.html").is_file()
    rees = lake.read(lk.STAGING, datetime(2019, 10, 1, 0, tzinfo=UTC))
    assert set(rees.column("event_type").to_pylist()) == {"view", "cart", "remove_cart"}
    assert "2103807459595387724" in rees.column("category_id").to_pylist()
    assert len(set(rees.column("event_id").to_pylist())) == rees.num_rows == 5


# ---- replay over the whole span of a file, whatever the gaps ------------------------

ORDER_HEADER = "Invoice,StockCode,Description,Quantity,InvoiceDate,Price,Customer ID,Country\n"


def order_lines_file(path: Path, days: list[datetime], hours: range, bad_price_hour: datetime | None = None) -> Path:
    """Two order lines in each opening hour of ``days`` (January: London time is UTC).

    A line of ``bad_price_hour`` has price ``n/a`` (a defect, not an expected reason).
    """
    lines = [ORDER_HEADER]
    for day in days:
        for h in hours:
            moment = day.replace(hour=h)
            for n in range(2):
                price = "n/a" if moment == bad_price_hour else "2.50"
                lines.append(f"{moment:%d%H}{n},SKU{n},Thing,{1 + n},{moment:%Y-%m-%d %H:%M:%S},{price},{100 + n},UK\n")
    path.write_text("".join(lines))
    return path


# Sunday 2 .. Friday 7 January 2011 open, Saturday closed, Sunday 9 open, closed Monday to
# Thursday (a four-day gap), Friday 14 open.
CLOSED_DAYS = [datetime(2011, 1, d, tzinfo=UTC) for d in (2, 3, 4, 5, 6, 7, 9, 14)]


def test_replay_lands_every_row_in_its_hour_across_closed_days_and_gaps(settings: Settings, tmp_path: Path) -> None:
    # Arrange
    settings = replace(settings, start=None, lateness_hours=24)
    file = order_lines_file(tmp_path / "orders.csv", CLOSED_DAYS, range(9, 12))

    # Act
    plan = source_replay.land_for_replay(settings, file, sources.load_mapping("order_lines"))

    # Assert: the plan spans the first row's hour to the last one's, every row in its own hour
    assert (plan.first, plan.last) == (datetime(2011, 1, 2, 9, tzinfo=UTC), datetime(2011, 1, 14, 11, tzinfo=UTC))
    assert (plan.rows, plan.outliers_before, plan.outliers_after, plan.without_ts) == (48, 0, 0, 0)
    assert plan.rows_per_hour == {day.replace(hour=h).isoformat(): 2 for day in CLOSED_DAYS for h in range(9, 12)}


def test_replay_processes_every_hour_over_a_closed_day(settings: Settings, tmp_path: Path) -> None:
    # Arrange: Friday and Sunday open, Saturday closed: a 46-hour gap, longer than the lateness window
    settings = replace(settings, start=None, lateness_hours=6)
    days = [datetime(2011, 1, 7, tzinfo=UTC), datetime(2011, 1, 9, tzinfo=UTC)]
    file = order_lines_file(tmp_path / "orders.csv", days, range(9, 11))

    # Act
    summary = runner.replay(settings, file, "order_lines", quality_suite=False)

    # Assert: every hour from the first row to the last, every row staged in its own hour
    first, last = datetime(2011, 1, 7, 9, tzinfo=UTC), datetime(2011, 1, 9, 10, tzinfo=UTC)
    assert (summary["first_hour"], summary["last_hour"]) == (first.isoformat(), last.isoformat())
    assert summary["hours"] == int((last - first) / HOUR) + 1
    assert (summary["read"], summary["staged"], summary["quarantined"], summary["breaches"]) == (8, 8, 0, [])
    lake = Lake(settings.lake)
    for day in days:
        for h in range(9, 11):
            staged = lake.read(lk.STAGING, day.replace(hour=h)).column("ts").to_pylist()
            assert len(staged) == 2 and all(ts.replace(minute=0) == day.replace(hour=h) for ts in staged)


def test_main_range_keeps_weekly_and_multi_day_gaps_but_not_stray_years() -> None:
    # Arrange: six trading days a week for eight weeks, a two-week holiday, and two stray rows
    base = datetime(2011, 9, 25, tzinfo=UTC)
    counts = {
        base + timedelta(days=d, hours=h): 20
        for d in list(range(0, 56)) + list(range(70, 80))
        if d % 7 != 6
        for h in range(8, 18)
    }
    core = (min(counts), max(counts))
    counts[datetime(1970, 1, 1, tzinfo=UTC)] = 1
    counts[datetime(2099, 1, 1, tzinfo=UTC)] = 1

    # Act / Assert
    assert source_replay.main_range(counts, 24) == core


# ---- a quarantine-threshold breach fails the command, naming hours and reasons -------


def cli_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    monkeypatch.setenv("PROFILE_ENGINE_LAKE", str(settings.lake))
    monkeypatch.setenv("PROFILE_ENGINE_BUCKETS", str(settings.buckets))
    monkeypatch.setenv("PROFILE_ENGINE_LATENESS_HOURS", str(settings.lateness_hours))
    monkeypatch.setenv("PROFILE_ENGINE_QUARANTINE_MIN_ROWS", "1")
    monkeypatch.delenv("PROFILE_ENGINE_START", raising=False)


def test_replay_breach_exits_non_zero_naming_hours_and_reasons(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange: both lines of Friday 09:00 have a price that is not a number
    from profile_engine import cli

    cli_env(monkeypatch, settings)
    friday = datetime(2011, 1, 7, tzinfo=UTC)
    file = order_lines_file(tmp_path / "orders.csv", [friday], range(9, 11), bad_price_hour=friday.replace(hour=9))

    # Act
    status = cli.main(["replay", "--file", str(file), "--mapping", "order_lines", "--no-quality"])

    # Assert: every hour was still processed; the command fails naming the breaching hour
    out = capsys.readouterr()
    assert status != 0
    assert "2011-01-07T09:00:00+00:00" in out.err and "bad_price" in out.err
    assert "2011-01-07T10:00:00+00:00" not in out.err
    assert Lake(settings.lake).committed(lk.STAGING, friday.replace(hour=10), 0)


def test_run_hours_breach_exits_non_zero_naming_the_hour_and_reasons(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange
    from profile_engine import cli

    cli_env(monkeypatch, settings)
    file = tmp_path / "f.csv"
    file.write_text(_canonical_rows(5, 5))
    land_copy(settings, file, "a.csv")

    # Act
    status = cli.main(["run-hours", HOUR0.isoformat(), HOUR0.isoformat()])

    # Assert
    err = capsys.readouterr().err
    assert status != 0
    assert HOUR0.isoformat() in err and "missing_user_id" in err


# ---- mappings a newcomer can write: spellings, cleaning, one-line errors -------------

# The two public spellings of the UCI order lines: "Online Retail" and "Online Retail II".
RETAIL_I = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
RETAIL_II = "Invoice,StockCode,Description,Quantity,InvoiceDate,Price,Customer ID,Country\n"


def staged_rows(settings: Settings, file: Path, mapping: str) -> list[dict[str, Any]]:
    """Land ``file`` by event hour through ``mapping``, validate its first hour, return the staged rows."""
    plan = source_replay.land_for_replay(settings, file, sources.load_mapping(mapping, settings.lake))
    ingest_hour(settings, plan.first)
    return Lake(settings.lake).read(lk.STAGING, plan.first).sort_by("item_id").to_pylist()


@pytest.mark.parametrize("header", [RETAIL_I, RETAIL_II])
def test_order_lines_reads_both_uci_spellings_and_casts_customer_ids(
    lenient: Settings, tmp_path: Path, header: str
) -> None:
    # Arrange: CustomerID written as a float, as the UCI files do
    file = tmp_path / "retail.csv"
    file.write_text(
        header
        + "536365,85123A,WHITE HANGING HEART,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n"
        + "536365,71053,WHITE METAL LANTERN,6,2010-12-01 08:26:00,3.39, 17850.0 ,United Kingdom\n"
    )

    # Act
    rows = staged_rows(lenient, file, "order_lines")

    # Assert: the id the CRM knows, the invoice, the unit price
    assert [(r["user_id"], r["order_id"], r["item_id"], r["price"]) for r in rows] == [
        ("17850", "536365", "71053", 3.39),
        ("17850", "536365", "85123A", 2.55),
    ]


def test_mapping_cleans_values_per_column(lenient: Settings, tmp_path: Path) -> None:
    # Arrange: a newcomer's mapping trimming, casing and casting ids; 19 digits survive the cast
    mapping = tmp_path / "shop.yaml"
    mapping.write_text(
        yaml.safe_dump(
            {
                "name": "shop",
                "fields": {"user_id": ["customer", "Customer"], "item_id": "sku", "event_type": "action", "ts": "at"},
                "event_types": {"view": "view"},
                "constants": {"session_id": "web"},
                "timestamp": {"format": "iso", "timezone": "UTC"},
                "clean": {"user_id": ["trim", "integer"], "item_id": ["trim", "upper"], "event_type": "lower"},
            }
        )
    )
    file = tmp_path / "shop.csv"
    file.write_text(
        "Customer,sku,action,at\n"
        " 17850.0 , ab-1 ,VIEW,2026-11-02 10:05:00\n"
        "1234567890123456789.000,ab-2,View,2026-11-02 10:06:00\n"
        "17850.5,ab-3,view,2026-11-02 10:07:00\n"
        "u-7,ab-4,view,2026-11-02 10:08:00\n"
    )

    # Act
    rows = staged_rows(lenient, file, str(mapping))

    # Assert: only whole numbers lose their decimals; other ids stay as written
    assert [(r["user_id"], r["item_id"], r["event_type"], r["session_id"]) for r in rows] == [
        ("17850", "AB-1", "view", "web"),
        ("1234567890123456789", "AB-2", "view", "web"),
        ("17850.5", "AB-3", "view", "web"),
        ("u-7", "AB-4", "view", "web"),
    ]


def test_file_not_matching_its_mapping_names_missing_and_present_columns(lenient: Settings, tmp_path: Path) -> None:
    file = tmp_path / "wrong.csv"
    file.write_text("Order,Product,When\n1,a,2010-12-01 08:26:00\n")

    with pytest.raises(sources.SourceError) as raised:
        source_replay.land_for_replay(lenient, file, sources.load_mapping("order_lines"))

    message = str(raised.value)
    assert "\n" not in message and str(file) in message
    assert "Invoice or InvoiceNo (order_id)" in message and "Quantity (quantity)" in message
    assert "the file has columns: Order, Product, When" in message


@pytest.mark.parametrize("command", ["land", "replay", "run-hours"])
def test_commands_print_one_line_when_a_file_does_not_match_its_mapping(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    # Arrange
    from profile_engine import cli

    cli_env(monkeypatch, settings)
    file = tmp_path / "wrong.csv"
    file.write_text("Order,Product,When\n1,a,2026-11-02 10:05:00\n")
    if command == "run-hours":  # a producer dropped it into the hour's landing folder
        land_copy(settings, file, "source=order_lines/wrong.csv")
        argv = ["run-hours", HOUR0.isoformat(), HOUR0.isoformat()]
    else:
        argv = [command, "--file", str(file), "--mapping", "order_lines"]

    # Act
    status = cli.main(argv)

    # Assert: one line naming the file, what is missing and what the file has
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "wrong.csv" in err and "Quantity (quantity)" in err and "the file has columns: Order, Product, When" in err


def test_land_lands_by_event_hour_and_prints_the_next_command(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange: Friday and Sunday open, Saturday closed
    from profile_engine import cli

    cli_env(monkeypatch, settings)
    days = [datetime(2011, 1, 7, tzinfo=UTC), datetime(2011, 1, 9, tzinfo=UTC)]
    file = order_lines_file(tmp_path / "orders.csv", days, range(9, 11))

    # Act
    status = cli.main(["land", "--file", str(file), "--mapping", "order_lines"])

    # Assert: every row in the landing folder of its event hour, nothing processed
    out = capsys.readouterr().out
    lake = Lake(settings.lake)
    for day in days:
        for h in range(9, 11):
            landed = list((lake.partition(lk.LANDING, day.replace(hour=h)) / "source=order_lines").glob("*.parquet"))
            assert len(landed) == 1
    assert not lake.path(lk.STAGING).exists()
    assert status == 0
    assert "landed 8 rows" in out and "4 hours with rows" in out
    assert "first hour 2011-01-07T09:00:00+00:00, last hour 2011-01-09T10:00:00+00:00" in out
    assert "python -m profile_engine run-hours 2011-01-07T09:00:00+00:00 2011-01-09T10:00:00+00:00" in out
