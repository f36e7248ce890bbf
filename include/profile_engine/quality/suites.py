"""Great Expectations suites over an hour's staged events and over the profile snapshot, results and Data Docs.

Catches what row rules cannot see (schema drift, a bug in the rules) as a failed expectation. docs/quality.md.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pyarrow as pa

from profile_engine import __version__
from profile_engine.config import Settings
from profile_engine.contracts.events import BUCKET, EVENT_TYPES, REFUND, SCHEMA_VERSION, STAGED_SCHEMA
from profile_engine.contracts.profiles import (
    CART_VIEW_RATE,
    DISTINCT_CATEGORIES,
    FREQUENCY_ORDERS,
    FUNNEL_COLUMNS,
    LIFECYCLE_STAGE,
    LIFECYCLE_STAGES,
    MAX_ORDER_VALUE,
    MEAN_PRICE_PURCHASED,
    MEAN_PRICE_VIEWED,
    OPEN_CART_ITEMS,
    OPEN_CART_VALUE,
    PEAK_HOUR_LOCAL,
    PROFILE_COLUMNS,
    PURCHASE_VIEW_RATE,
    RFM_F,
    RFM_M,
    RFM_R,
    RFM_SEGMENT,
    RFM_SEGMENTS,
    SESSION_COUNT,
    USER_ID,
)
from profile_engine.contracts.traits import Trait, non_negative_columns
from profile_engine.hours import HOUR, floor_hour, format_hour, partition_values
from profile_engine.ingest import events as ingest
from profile_engine.lake.storage import MANIFEST, QUALITY_DOCS, QUALITY_RESULTS, STAGING, Lake
from profile_engine.quality.datadocs import DOCS_INDEX, prune_data_docs

if TYPE_CHECKING:
    import great_expectations as gx
    from great_expectations.data_context.store.store import DataDocsSiteConfigTypedDict

SUITE_NAME = "staged_events"
RESULTS_FILE = "results.json"
DOCS_SITE = "local_site"


# Expectation names (in each expectation's meta): what failed-expectation lists report.
EVENT_ID_UNIQUE = "event_id_unique"
EVENT_TYPE_KNOWN = "event_type_known"
USER_ID_NOT_EMPTY = "user_id_not_empty"
ITEM_ID_NOT_EMPTY = "item_id_not_empty"
PRICE_NON_NEGATIVE = "price_non_negative"
QUANTITY_POSITIVE = "quantity_positive"
REFUND_QUANTITY_NEGATIVE = "refund_quantity_negative"
TS_IN_WINDOW = "ts_in_window"
BUCKET_IN_RANGE = "bucket_in_range"
ROW_COUNT_POSITIVE = "row_count_positive"
NOT_NULL_COLUMNS: tuple[str, ...] = ("event_id", "user_id", "item_id", "event_type", "ts")

# Counts and percentages only: no sample of unexpected values (raw event, user and item
# ids) reaches the results JSON or the Data Docs.
RESULT_FORMAT: dict[str, Any] = {
    "result_format": "SUMMARY",
    "partial_unexpected_count": 0,
    "exclude_unexpected_values": True,
}

_CRITICAL = "critical"  # FailureSeverity.CRITICAL as it appears in result JSON


def column_exists_name(column: str) -> str:
    """Name of the expectation that ``column`` exists."""
    return f"{column}_exists"


def not_null_name(column: str) -> str:
    """Name of the expectation that ``column`` has no nulls."""
    return f"{column}_not_null"


def gx_frame(table: pa.Table) -> Any:
    """``table`` as the pandas DataFrame GX validates, with narrow numbers widened to 64 bits.

    GX 1.24 checks value ranges vectorised only on ``int``/``float`` (64-bit) columns; on
    int8/int16/int32 or float32 columns it calls a Python function per value (measured:
    5 s of a 1M-row hour for ``quantity`` and ``bucket``). Widening changes no value.

    Strings in one chunk: they stay Arrow-backed in pandas, and every ``row_condition`` filter takes each
    column of the frame (14 filters of the staged hour's 12 columns); a take over a column of several chunks
    (the hour is read bucket after bucket) cost about 3x one over a single chunk (issue 19, BENCHMARKS.md).
    Numbers and times become numpy arrays, copied whatever their chunks: combining them first copied twice.
    """
    fields = []
    for field in table.schema:
        kind = field.type
        if pa.types.is_integer(kind) and kind != pa.int64():
            kind = pa.int64()
        elif pa.types.is_floating(kind) and kind != pa.float64():
            kind = pa.float64()
        fields.append(field.with_type(kind))
    cast = table.cast(pa.schema(fields, metadata=table.schema.metadata))
    numpy_kinds = (pa.types.is_integer, pa.types.is_floating, pa.types.is_temporal, pa.types.is_boolean)
    for index, field in enumerate(cast.schema):
        column = cast.column(index)
        if column.num_chunks > 1 and not any(kind(field.type) for kind in numpy_kinds):
            cast = cast.set_column(index, field, pa.chunked_array([column.combine_chunks()], type=field.type))
    return cast.to_pandas()


@contextmanager
def _no_batch_fingerprint() -> Generator[None]:
    """Let Great Expectations skip its fingerprint of an in-memory batch while inside.

    GX 1.24 hashes every value of a DataFrame batch under 1 GB (``hash_pandas_object``:
    1.2 s of a 1M-row hour) for ``batch_markers.pandas_data_fingerprint``, a marker of
    the result that nothing here reads and no expectation uses. Its size threshold is a
    module constant with no setting, so it is lowered for the call (tasks run one
    validation per process; the previous value is restored).
    """
    from great_expectations.execution_engine import pandas_execution_engine

    saved = pandas_execution_engine.HASH_THRESHOLD
    pandas_execution_engine.HASH_THRESHOLD = 0
    try:
        yield
    finally:
        pandas_execution_engine.HASH_THRESHOLD = saved


@contextmanager
def _cycles_collected() -> Generator[None]:
    """Free, on leaving, the reference cycles made inside: Great Expectations' context, data source, execution
    engine and batch refer to each other, so the DataFrame a validation holds outlives the call until Python's
    cyclic collector runs, which it rarely does for objects that survived a few collections. ``publish_profiles``
    validates one bucket after another: the buckets' frames stayed, 0.9 KB of peak RSS per profile of the hour
    (issue 19, BENCHMARKS.md). A full ``gc.collect()`` walks every object of the process (0.15 s after the GX
    import), so the objects that exist on entering are set aside (``gc.freeze``) and the collection walks only those
    made inside (about 1 ms). In a process that has frozen objects already (Airflow's executors freeze before they
    fork workers), that frozen set is left as it is and the collection walks every other object (up to the 0.15 s).
    The call's own locals must be dropped inside (they would keep the frame alive)."""
    import gc

    own = gc.get_freeze_count() == 0
    if own:
        gc.freeze()
    try:
        yield
    finally:
        gc.collect()
        if own:
            gc.unfreeze()


def build_suite(*, ts_min: datetime, ts_max: datetime, buckets: int) -> gx.ExpectationSuite:
    """The expectation suite for one hour's staged events (canonical schema + bucket).

    Event time must lie in ``[ts_min, ts_max)``: the window ingest stages, from the
    hour start minus the lateness window (earlier is too_late) to the hour end plus
    the allowed clock skew (later is future_ts). ``buckets`` is the
    number of user buckets. Every expectation is critical except the row count, a
    warning: an empty hour is legitimate at night, but worth a look in the report.
    """
    import great_expectations as gx

    # Imported from their defining modules: the package re-exports them implicitly,
    # which mypy --strict does not accept.
    from great_expectations.expectations.core.expect_column_to_exist import ExpectColumnToExist
    from great_expectations.expectations.core.expect_column_value_lengths_to_be_between import (
        ExpectColumnValueLengthsToBeBetween,
    )
    from great_expectations.expectations.core.expect_column_values_to_be_between import ExpectColumnValuesToBeBetween
    from great_expectations.expectations.core.expect_column_values_to_be_in_set import ExpectColumnValuesToBeInSet
    from great_expectations.expectations.core.expect_column_values_to_be_unique import ExpectColumnValuesToBeUnique
    from great_expectations.expectations.core.expect_column_values_to_not_be_null import ExpectColumnValuesToNotBeNull
    from great_expectations.expectations.core.expect_table_row_count_to_be_between import (
        ExpectTableRowCountToBeBetween,
    )
    from great_expectations.expectations.expectation import Expectation
    from great_expectations.expectations.metadata_types import FailureSeverity

    if ts_min.tzinfo is None or ts_max.tzinfo is None:
        raise ValueError("ts bounds must be timezone-aware (UTC)")
    if ts_min >= ts_max:
        raise ValueError(f"ts_min {ts_min.isoformat()} is not before ts_max {ts_max.isoformat()}")
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")

    def meta(name: str) -> dict[str, Any]:
        return {"name": name}

    expectations: list[Expectation] = [
        ExpectColumnToExist(column=column, meta=meta(column_exists_name(column))) for column in STAGED_SCHEMA.names
    ]
    expectations += [
        ExpectColumnValuesToNotBeNull(column=column, meta=meta(not_null_name(column))) for column in NOT_NULL_COLUMNS
    ]
    expectations += [
        ExpectColumnValuesToBeUnique(column="event_id", meta=meta(EVENT_ID_UNIQUE)),
        ExpectColumnValueLengthsToBeBetween(column="user_id", min_value=1, meta=meta(USER_ID_NOT_EMPTY)),
        ExpectColumnValueLengthsToBeBetween(column="item_id", min_value=1, meta=meta(ITEM_ID_NOT_EMPTY)),
        ExpectColumnValuesToBeInSet(column="event_type", value_set=list(EVENT_TYPES), meta=meta(EVENT_TYPE_KNOWN)),
        # Null prices are allowed (sources without prices): GX skips nulls here.
        ExpectColumnValuesToBeBetween(column="price", min_value=0, meta=meta(PRICE_NON_NEGATIVE)),
        # A refund gives units back: its quantity is negative (schema.REFUND), every other one positive.
        ExpectColumnValuesToBeBetween(
            column="quantity",
            min_value=1,
            row_condition=f'event_type!="{REFUND}"',
            condition_parser="pandas",
            meta=meta(QUANTITY_POSITIVE),
        ),
        ExpectColumnValuesToBeBetween(
            column="quantity",
            max_value=-1,
            row_condition=f'event_type=="{REFUND}"',
            condition_parser="pandas",
            meta=meta(REFUND_QUANTITY_NEGATIVE),
        ),
        ExpectColumnValuesToBeBetween(
            column="ts", min_value=ts_min, max_value=ts_max, strict_max=True, meta=meta(TS_IN_WINDOW)
        ),
        ExpectColumnValuesToBeBetween(column=BUCKET, min_value=0, max_value=buckets - 1, meta=meta(BUCKET_IN_RANGE)),
        ExpectTableRowCountToBeBetween(min_value=1, severity=FailureSeverity.WARNING, meta=meta(ROW_COUNT_POSITIVE)),
    ]
    return gx.ExpectationSuite(
        name=SUITE_NAME,
        expectations=expectations,
        meta={"schema_version": SCHEMA_VERSION, "profile_engine_version": __version__},
    )


def run_quality(
    settings: Settings,
    hour: datetime,
    staged: pa.Table,
    *,
    quarantined_rows: int,
    read_rows: int,
    run_id: str = "manual",
    build_docs: bool = True,
    defective_rows: int | None = None,
    threshold_breaches: Sequence[str] = (),
) -> dict[str, Any]:
    """Validate the staged batch of ``hour``, publish results (and Data Docs), return a summary.

    The validation result is committed to ``quality/results/dt=/hour=/results.json``
    and, with ``build_docs``, a Data Docs site of this hour alone to
    ``quality/docs/dt=/hour=/`` (``index.html``), each with a ``_manifest.json``.
    ``success`` is False when a critical expectation failed; failed warnings (an
    empty hour) are listed under ``warnings``. ``threshold_exceeded`` is the verdict
    ingest reached (``threshold_breaches``: the sources that breached, from the
    ``validate_events`` summary), not judged again here; the caller decides to fail
    the run (this module does not import Airflow). The shares are the hour's, for the
    report: defective rows are the quarantined ones unless ``defective_rows`` says fewer
    count (ingest does not count producer re-sends, quarantined as duplicates).
    """
    import great_expectations as gx
    from great_expectations.checkpoint.actions import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    start = _check_hour(hour)
    staged_rows = staged.num_rows
    if read_rows < staged_rows + quarantined_rows:
        raise ValueError(
            f"rows read ({read_rows}) < staged ({staged_rows}) + quarantined ({quarantined_rows}): "
            "read = staged + quarantined + erased"
        )
    defective = quarantined_rows if defective_rows is None else defective_rows
    if not 0 <= defective <= quarantined_rows:
        raise ValueError(f"defective rows ({defective}) must be within [0, quarantined rows ({quarantined_rows})]")
    share = ingest.defective_share(quarantined_rows, read_rows)
    hour_defective_share = ingest.defective_share(defective, read_rows)
    lake = Lake(settings.lake)
    suite = build_suite(
        ts_min=start - timedelta(hours=settings.lateness_hours),
        ts_max=start + HOUR + timedelta(minutes=settings.clock_skew_minutes),
        buckets=settings.buckets,
    )
    frame = gx_frame(staged)  # the pandas edge: GX validates a DataFrame
    dt, hh = partition_values(start)

    work = lake.tmp_dir()
    try:
        # A file context inside _tmp/: everything GX writes (config, stores, docs) stays
        # there and goes with it. The ephemeral context would build docs in the system tmp.
        context = gx.get_context(mode="file", project_root_dir=str(work))
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        context.enable_analytics(False)
        # Data Docs append the context id to a logo fetched from GX's servers when a
        # page is viewed; without an id the page carries no identifier of ours.
        context.variables.data_context_id = None  # type: ignore[assignment]  # typed UUID, None is valid
        site_dir = work / "site"
        context.update_data_docs_site(
            DOCS_SITE,
            cast(
                "DataDocsSiteConfigTypedDict",  # GX's TypedDict lacks show_how_to_buttons
                {
                    "class_name": "SiteBuilder",
                    "show_how_to_buttons": False,
                    "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site_dir)},
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            ),
        )
        suite = context.suites.add(suite)
        batch = (
            context.data_sources.add_pandas("staging")
            .add_dataframe_asset("events")
            .add_batch_definition_whole_dataframe(f"hour_{format_hour(start)}")
        )
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=SUITE_NAME, data=batch, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{SUITE_NAME}_hourly",
                validation_definitions=[definition],
                actions=[UpdateDataDocsAction(name="update_data_docs", site_names=[DOCS_SITE])] if build_docs else [],
                result_format=RESULT_FORMAT,
            )
        )
        with _no_batch_fingerprint():
            outcome = checkpoint.run(
                batch_parameters={"dataframe": frame},
                run_id=gx.RunIdentifier(run_name=run_id, run_time=datetime.now(UTC)),
            )
        result: dict[str, Any] = next(iter(outcome.run_results.values())).to_json_dict()  # type: ignore[no-untyped-call]

        docs_index: str | None = None
        if build_docs:
            docs_target = lake.partition(QUALITY_DOCS, start)
            lake.write_dir(
                docs_target,
                _site_files(site_dir),
                {"layer": QUALITY_DOCS, "dt": dt, "hour": hh, "data_hour": format_hour(start), "run_id": run_id},
            )
            docs_index = str(docs_target / DOCS_INDEX)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # A new site prunes those of passing hours that fell out of the kept window (docs/quality.md).
    docs_pruned = prune_data_docs(settings, start) if build_docs else []

    failed = [r for r in result["results"] if not r["success"]]
    summary: dict[str, Any] = {
        "hour": format_hour(start),
        "run_id": run_id,
        "suite": SUITE_NAME,
        "success": not any(_severity(r) == _CRITICAL for r in failed),
        "gx_success": bool(result["success"]),
        "evaluated_expectations": result["statistics"]["evaluated_expectations"],
        "successful_expectations": result["statistics"]["successful_expectations"],
        "failed_expectations": [_name(r) for r in failed if _severity(r) == _CRITICAL],
        "warnings": [_name(r) for r in failed if _severity(r) != _CRITICAL],
        "staged_rows": staged_rows,
        "quarantined_rows": quarantined_rows,
        "read_rows": read_rows,
        "quarantine_share": share,
        "defective_rows": defective,
        "defective_share": hour_defective_share,
        "quarantine_threshold": settings.quarantine_threshold,
        "threshold_breaches": list(threshold_breaches),
        "threshold_exceeded": bool(threshold_breaches),
        "results_path": str(lake.partition(QUALITY_RESULTS, start) / RESULTS_FILE),
        "docs_index": docs_index,
        "docs_pruned": docs_pruned,
    }
    payload = json.dumps(result, indent=2, sort_keys=True, default=str).encode()
    # Results last: their manifest is the hour's commit point and names the docs site.
    lake.write_dir(
        lake.partition(QUALITY_RESULTS, start),
        [(RESULTS_FILE, payload)],
        {
            "layer": QUALITY_RESULTS,
            "dt": dt,
            "hour": hh,
            "data_hour": format_hour(start),
            "run_id": run_id,
            "summary": summary,
        },
    )
    return summary


def check_staged_hour(
    settings: Settings,
    hour: datetime,
    validated: dict[str, Any],
    *,
    run_id: str = "manual",
    build_docs: bool = True,
    staged: pa.Table | None = None,
) -> dict[str, Any]:
    """Run the quality suite (``run_quality``) on the events ``validate_events`` staged for ``hour``.

    The ``check_quality`` task of the hourly DAG (beside ``build_profiles``) and the
    in-process runner call this after ``ingest.validate_events``; ``validated`` is that
    call's summary (its row counts feed the quarantine share). The batch is read back
    from ``staging/events`` of the hour, every bucket in order, unless ``staged`` (the
    table validation just wrote) is given. ``RuntimeError`` when staging does not hold
    the rows the summary counted (a later run rewrote the hour): the result would
    describe other data.
    """
    start = _check_hour(hour)
    if validated.get("hour") != format_hour(start):
        raise ValueError(f"summary of hour {validated.get('hour')} given to check hour {format_hour(start)}")
    if staged is None:
        lake = Lake(settings.lake)
        tables = [lake.read(STAGING, start, bucket) for bucket in range(settings.buckets)]
        # one chunk a column now, the buckets' chunks freed: ``gx_frame`` would copy them beside these
        staged = (pa.concat_tables(tables) if len(tables) > 1 else tables[0]).combine_chunks()
        del tables
    if staged.num_rows != validated["staged"]:
        raise RuntimeError(
            f"staging of hour {format_hour(start)} holds {staged.num_rows} rows, validate_events staged "
            f"{validated['staged']}: rerun validate_events for the hour"
        )
    return run_quality(
        settings,
        start,
        staged,
        quarantined_rows=int(validated["quarantined"]),
        read_rows=int(validated["read"]),
        run_id=run_id,
        build_docs=build_docs,
        defective_rows=int(validated["defective"]),
        threshold_breaches=validated.get("threshold_breaches") or (),
    )


def read_results(settings: Settings, hour: datetime) -> dict[str, Any]:
    """The committed validation result of ``hour`` (``FileNotFoundError`` if none is committed)."""
    base = Lake(settings.lake).partition(QUALITY_RESULTS, _check_hour(hour))
    if not (base / MANIFEST).is_file():
        raise FileNotFoundError(f"partition not committed: {base}")
    result: dict[str, Any] = json.loads((base / RESULTS_FILE).read_text())
    return result


def _check_hour(hour: datetime) -> datetime:
    start = floor_hour(hour)
    if start != (hour if hour.tzinfo else hour.replace(tzinfo=UTC)):
        raise ValueError(f"not an hour start: {hour.isoformat()}")
    return start


def _severity(result: dict[str, Any]) -> str:
    return str(result["expectation_config"].get("severity", _CRITICAL))


def _name(result: dict[str, Any]) -> str:
    config = result["expectation_config"]
    return str((config.get("meta") or {}).get("name") or config["type"])


# Site assets GX copies into every site whether a page uses them or not (an animated
# glossary GIF alone is 2.5 MB): kept only when a page or stylesheet refers to them.
_OPTIONAL_ASSET_DIR = "static/images/"


def _site_files(site_dir: Path) -> list[tuple[str, bytes]]:
    """The files of a built Data Docs site, relative names, minus unreferenced images."""
    files = {p.relative_to(site_dir).as_posix(): p for p in sorted(site_dir.rglob("*")) if p.is_file()}
    if DOCS_INDEX not in files:
        raise RuntimeError(f"Great Expectations built no {DOCS_INDEX} under {site_dir}")
    text = "\n".join(p.read_text(errors="ignore") for n, p in files.items() if n.endswith((".html", ".css")))
    referenced = set(re.findall(r"[\w.-]+\.(?:png|gif|svg|ico|jpg)", text))
    return [
        (name, path.read_bytes())
        for name, path in files.items()
        if not name.startswith(_OPTIONAL_ASSET_DIR) or path.name in referenced
    ]


# ---- the published profile snapshot ---------------------------------------------------

PROFILE_SUITE_NAME = "profile_snapshot"
PROFILE_USER_ID_UNIQUE = "profile_user_id_unique"
PROFILE_USER_ID_NOT_NULL = "profile_user_id_not_null"
PROFILE_LIFECYCLE_KNOWN = "profile_lifecycle_stage_known"
PROFILE_RFM_SEGMENT_KNOWN = "profile_rfm_segment_known"
PROFILE_PEAK_HOUR_IN_DAY = "profile_peak_hour_local_in_day"


class ProfileValidationError(ValueError):
    """The profile snapshot of an hour failed a critical expectation: it is not published."""


def profile_range_name(column: str) -> str:
    """Name of the range expectation of profile column ``column``: ``profile_count_view_24h_range``."""
    return f"profile_{column}_range"


def profile_ranges(traits: tuple[Trait, ...] = ()) -> dict[str, tuple[float, float | None]]:
    """Profile column -> (min, max or None): ranges that real data satisfies.

    ``traits``: the declared traits of the snapshot; their counts are >= 0 too (sums may be negative: refunds).

    Counts, decayed counters, rates and money other than net spend are >= 0 with no upper bound: users buy
    without a cart event (a purchase/cart ratio above 1 is real), so rates are not
    capped at 1. RFM scores are quintiles 1-5 (null for users without orders).
    """

    counts = (FREQUENCY_ORDERS, SESSION_COUNT, OPEN_CART_ITEMS, DISTINCT_CATEGORIES)
    money = (  # net spend and its mean per order may be negative (refunds of earlier orders)
        MAX_ORDER_VALUE,
        OPEN_CART_VALUE,
        MEAN_PRICE_VIEWED,
        MEAN_PRICE_PURCHASED,
    )
    non_negative = [n for n in PROFILE_COLUMNS if n.startswith(("count_", "decayed_"))]
    non_negative += [
        *counts,
        CART_VIEW_RATE,
        PURCHASE_VIEW_RATE,
        *money,
        *FUNNEL_COLUMNS,
        *non_negative_columns(traits),
    ]
    ranges: dict[str, tuple[float, float | None]] = dict.fromkeys(non_negative, (0, None))
    for name in (RFM_R, RFM_F, RFM_M):
        ranges[name] = (1, 5)
    return ranges


def build_profile_suite(all_null: frozenset[str] = frozenset(), traits: tuple[Trait, ...] = ()) -> gx.ExpectationSuite:
    """The expectation suite of a published profile snapshot (features only, one row per user).

    Every expectation is critical: a snapshot that fails one is not committed. Columns
    in ``all_null`` (no user has a value yet, e.g. order values before the first
    purchase) get no range expectation: a column without values has no minimum.
    """
    import great_expectations as gx
    from great_expectations.expectations.core.expect_column_max_to_be_between import ExpectColumnMaxToBeBetween
    from great_expectations.expectations.core.expect_column_min_to_be_between import ExpectColumnMinToBeBetween
    from great_expectations.expectations.core.expect_column_values_to_be_between import ExpectColumnValuesToBeBetween
    from great_expectations.expectations.core.expect_column_values_to_be_in_set import ExpectColumnValuesToBeInSet
    from great_expectations.expectations.core.expect_column_values_to_be_unique import ExpectColumnValuesToBeUnique
    from great_expectations.expectations.core.expect_column_values_to_not_be_null import ExpectColumnValuesToNotBeNull
    from great_expectations.expectations.expectation import Expectation

    expectations: list[Expectation] = [
        ExpectColumnValuesToNotBeNull(column=USER_ID, meta={"name": PROFILE_USER_ID_NOT_NULL}),
        ExpectColumnValuesToBeUnique(column=USER_ID, meta={"name": PROFILE_USER_ID_UNIQUE}),
        ExpectColumnValuesToBeInSet(
            column=LIFECYCLE_STAGE,
            value_set=list(LIFECYCLE_STAGES),
            meta={"name": PROFILE_LIFECYCLE_KNOWN},
        ),
        ExpectColumnValuesToNotBeNull(column=LIFECYCLE_STAGE, meta={"name": not_null_name(LIFECYCLE_STAGE)}),
        ExpectColumnValuesToBeInSet(
            column=RFM_SEGMENT, value_set=list(RFM_SEGMENTS), meta={"name": PROFILE_RFM_SEGMENT_KNOWN}
        ),
        ExpectColumnValuesToBeBetween(
            column=PEAK_HOUR_LOCAL, min_value=0, max_value=23, meta={"name": PROFILE_PEAK_HOUR_IN_DAY}
        ),
    ]
    # Range checks on the column minimum and maximum: the same verdict as a per-value
    # check (nulls are skipped: a user without orders has no RFM score), at a fraction of
    # the metrics on a million-row snapshot.
    for column, (low, high) in sorted(profile_ranges(traits).items()):
        if column in all_null:
            continue
        expectations.append(
            ExpectColumnMinToBeBetween(column=column, min_value=low, meta={"name": profile_range_name(column)})
        )
        if high is not None:
            expectations.append(
                ExpectColumnMaxToBeBetween(column=column, max_value=high, meta={"name": profile_range_name(column)})
            )
    return gx.ExpectationSuite(
        name=PROFILE_SUITE_NAME,
        expectations=expectations,
        meta={"schema_version": SCHEMA_VERSION, "profile_engine_version": __version__},
    )


def validate_profiles(profiles: pa.Table, hour: datetime, traits: tuple[Trait, ...] = ()) -> dict[str, Any]:
    """Validate the profile snapshot of ``hour`` before it is committed; raise on failure.

    ``traits``: the declared traits the snapshot carries (``load_traits``), whose counts get range checks.
    Runs ``build_profile_suite`` on the columns it checks (converted to pandas once) in
    an ephemeral Great Expectations context: nothing is written. Raises
    ``ProfileValidationError`` naming every failed expectation, its column and its
    unexpected count (no values: they would be raw user ids); otherwise returns a
    summary (``evaluated_expectations``, ``rows``, ``seconds``).
    """
    import time

    import great_expectations as gx

    began = time.perf_counter()
    start = _check_hour(hour)

    expected = [USER_ID, LIFECYCLE_STAGE, RFM_SEGMENT, PEAK_HOUR_LOCAL, *profile_ranges(traits)]
    missing = [c for c in expected if c not in profiles.column_names]
    if missing:
        raise ProfileValidationError(f"profile snapshot {format_hour(start)}: missing column(s) {', '.join(missing)}")
    all_null = frozenset(c for c in expected if profiles.column(c).null_count == profiles.num_rows)
    suite = build_profile_suite(all_null, traits)
    columns = sorted({str(e.column) for e in suite.expectations if hasattr(e, "column")})
    frame = gx_frame(profiles.select(columns))  # the pandas edge: GX validates a DataFrame
    from great_expectations.data_context.types.base import ProgressBarsConfig

    with _cycles_collected():
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        context.enable_analytics(False)
        with _no_batch_fingerprint():
            batch = (
                context.data_sources.add_pandas("profiles")
                .add_dataframe_asset("snapshot")
                .add_batch_definition_whole_dataframe(f"snapshot_{format_hour(start)}")
                .get_batch(batch_parameters={"dataframe": frame})
            )
            result: dict[str, Any] = batch.validate(suite, result_format=RESULT_FORMAT).to_json_dict()  # type: ignore[no-untyped-call]
        # the context stays Great Expectations' current one until the next: without its data source it holds no frame
        context.data_sources.delete("profiles")
        del context, batch, frame
    failed = [r for r in result["results"] if not r["success"]]
    if failed:
        details = "; ".join(
            f"{_name(r)} (column {r['expectation_config']['kwargs'].get('column')}: {_violation(r, profiles.num_rows)})"
            + (f" error: {r['exception_info'].get('exception_message')}" if _raised(r) else "")
            for r in failed
        )
        raise ProfileValidationError(
            f"profile snapshot {format_hour(start)} failed {len(failed)} expectation(s): {details}"
        )
    return {
        "suite": PROFILE_SUITE_NAME,
        "rows": profiles.num_rows,
        "evaluated_expectations": result["statistics"]["evaluated_expectations"],
        "seconds": round(time.perf_counter() - began, 3),
    }


def _raised(result: dict[str, Any]) -> bool:
    info = result.get("exception_info") or {}
    return bool(info.get("raised_exception"))


def _violation(result: dict[str, Any], rows: int) -> str:
    """What a failed profile expectation saw: an unexpected count, or the offending min/max."""
    outcome = result.get("result") or {}
    if "unexpected_count" in outcome:
        return f"{outcome['unexpected_count']} unexpected of {rows}"
    kwargs = result["expectation_config"]["kwargs"]
    bounds = f"[{kwargs.get('min_value', '-inf')}, {kwargs.get('max_value', 'inf')}]"
    return f"{result['expectation_config']['type'].removeprefix('expect_column_')} is {outcome.get('observed_value')}, allowed {bounds}"
