"""User profiles as incremental, mergeable state (DESIGN.md §4).

The snapshot of hour H (end E = H+1h) is ``merge(state of H-1, aggregate(staged
events of H))``. The state is a set of small Arrow tables that every feature can be
merged from:

* ``users``: lifetime sums, min/max timestamps, decayed counters (decayed exactly to
  the state's end), and the folded totals of *final* sessions, orders and latencies;
* ``hourly``: sparse per-user hourly buckets (user, hour, event type, category) for
  exact 24h/7d/30d windows and category affinity, pruned after 30 days;
* ``hours_of_day``: per-user event counts by local hour of day (peak hour);
* ``sessions``, ``orders``, ``anchors``, ``targets``: raw buffers of the groups and
  latencies that a late event (at most ``lateness_hours`` old) could still change;
* ``carts``: last cart and last close (remove or purchase) per user and item;
* ``favs``: last favourite and last purchase per user and item (open favourites, 72 h);
* ``item_views``: views per user, item and hour (repeat views, 7 days);
* ``pending``: staged events with ``ts >= end``, held back until their hour;
* ``meta``: the state's end.

The state after ``advance`` is a function of the set of merged events and the end
only (never of how events were batched), provided every event arrives while it is at
most ``lateness_hours`` older than the end of the state it is merged into (ingestion
quarantines older ones). That is why one big batch, hourly batches and ``rebuild``
give the same snapshot, which the tests check. Timestamps inside the state are epoch
milliseconds (int64) so the SQL stays plain integer arithmetic.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as pc

from profile_engine import db, faults
from profile_engine.config import Settings
from profile_engine.hours import HOUR, floor_hour, format_hour, hour_range, parse_hour
from profile_engine.lake import (
    INTERESTS,
    MANIFEST,
    PROFILE_CHANGES,
    PROFILES,
    STAGING,
    STATE,
    Lake,
    read_json,
    write_json,
)
from profile_engine.schema import CART, EVENT_TYPES, FAV, LOCAL_HOUR, PURCHASE, REFUND, REMOVE_CART, STAGED_SCHEMA, VIEW

if TYPE_CHECKING:
    import duckdb

# ---- names of the profile contract (defined once, imported elsewhere) ---------------
USER_ID = "user_id"
SNAPSHOT_HOUR = "snapshot_hour"
CATEGORY_ID = "category_id"
AFFINITY = "affinity"

WINDOWS: tuple[tuple[str, int], ...] = (("24h", 24), ("7d", 7 * 24), ("30d", 30 * 24))  # (suffix, hours)
HALF_LIVES: tuple[tuple[str, int], ...] = (("1d", 24), ("7d", 7 * 24))  # (suffix, half-life hours)


def count_column(event_type: str, window: str) -> str:
    """Name of an event count column: ``count_view_24h``, ``count_cart_lifetime``, ..."""
    return f"count_{event_type}_{window}"


def decayed_column(event_type: str, half_life: str) -> str:
    """Name of a decayed counter: ``decayed_view_1d``."""
    return f"decayed_{event_type}_{half_life}"


def first_at_column(event_type: str) -> str:
    """Name of the first-event timestamp of a type: ``first_view_at``."""
    return f"first_{event_type}_at"


def last_at_column(event_type: str) -> str:
    """Name of the last-event timestamp of a type: ``last_view_at``."""
    return f"last_{event_type}_at"


FIRST_SEEN_AT = "first_seen_at"
LAST_SEEN_AT = "last_seen_at"
HOURS_SINCE_LAST_EVENT = "hours_since_last_event"
HOURS_SINCE_LAST_CART = "hours_since_last_cart"
HOURS_SINCE_LAST_PURCHASE = "hours_since_last_purchase"
FREQUENCY_ORDERS = "frequency_orders"
MONETARY_TOTAL = "monetary_total"
AVG_ORDER_VALUE = "avg_order_value"
MAX_ORDER_VALUE = "max_order_value"
RECENCY_HOURS = "recency_hours"
RFM_R = "rfm_r"
RFM_F = "rfm_f"
RFM_M = "rfm_m"
RFM_SEGMENT = "rfm_segment"
MEAN_HOURS_BETWEEN_ORDERS = "mean_hours_between_orders"
MEAN_VIEW_TO_CART_HOURS = "mean_view_to_cart_hours"
MEAN_CART_TO_PURCHASE_HOURS = "mean_cart_to_purchase_hours"
SESSION_COUNT = "session_count"
MEAN_SESSION_MINUTES = "mean_session_minutes"
EVENTS_PER_SESSION = "events_per_session"
CART_VIEW_RATE = "cart_view_rate"
PURCHASE_VIEW_RATE = "purchase_view_rate"
OPEN_CART_ITEMS = "open_cart_items"
OPEN_CART_VALUE = "open_cart_value"
# Funnel features (docs/features.md "Funnel"): short windows of carts and favourites, open
# carts and favourites by age, windowed rates, repeat views, time since each event type.
SHORT_WINDOWS: tuple[tuple[str, int], ...] = (("1h", 1), ("72h", 72))  # extra count windows of SHORT_WINDOW_TYPES
SHORT_WINDOW_TYPES: tuple[str, ...] = (CART, FAV)
OPEN_WINDOWS: tuple[tuple[str, int], ...] = (("1h", 1), ("24h", 24), ("72h", 72))  # age of the open cart/favourite
RATE_WINDOWS: tuple[tuple[str, int], ...] = (("7d", 7 * 24), ("30d", 30 * 24))
REPEAT_WINDOWS: tuple[tuple[str, int], ...] = (("24h", 24), ("7d", 7 * 24))
HOURS_SINCE_LAST_VIEW = "hours_since_last_view"
HOURS_SINCE_LAST_FAV = "hours_since_last_fav"
PURCHASE_CART_RATE = "purchase_cart_rate"


def open_items_column(kind: str, window: str) -> str:
    """Items carted (``cart``) or favourited (``fav``) within ``window`` and not closed since: ``open_cart_items_24h``."""
    return f"open_{kind}_items_{window}"


def rate_column(rate: str, window: str) -> str:
    """A funnel rate over a window: ``cart_view_rate_7d``."""
    return f"{rate}_{window}"


def repeat_columns(window: str) -> tuple[str, str, str, str]:
    """Repeat-view columns of a window: max views of one item, items viewed 2+ times, same for categories."""
    return (
        f"max_item_views_{window}",
        f"repeat_view_items_{window}",
        f"max_category_views_{window}",
        f"repeat_view_categories_{window}",
    )


TOP_CATEGORIES: tuple[str, ...] = ("top_category_1", "top_category_2", "top_category_3")
TOP_CATEGORY_SCORES: tuple[str, ...] = tuple(f"{c}_score" for c in TOP_CATEGORIES)
DISTINCT_CATEGORIES = "distinct_categories"
MEAN_PRICE_VIEWED = "mean_price_viewed"
MEAN_PRICE_PURCHASED = "mean_price_purchased"
PEAK_HOUR_LOCAL = "peak_hour_local"
LIFECYCLE_STAGE = "lifecycle_stage"

LIFECYCLE_NEW, LIFECYCLE_ACTIVE, LIFECYCLE_DORMANT, LIFECYCLE_CHURNED = "new", "active", "dormant", "churned"
LIFECYCLE_STAGES: tuple[str, ...] = (LIFECYCLE_NEW, LIFECYCLE_ACTIVE, LIFECYCLE_DORMANT, LIFECYCLE_CHURNED)
RFM_SEGMENTS: tuple[str, ...] = (
    "champions",
    "loyal",
    "potential_loyalist",
    "new_customer",
    "at_risk",
    "hibernating",
    "lost",
    "no_orders",
)
POPULATION_COLUMNS: tuple[str, ...] = (RFM_R, RFM_F, RFM_M, RFM_SEGMENT)

_TS = pa.timestamp("ms", tz="UTC")
_FUNNEL_FIELDS: list[tuple[str, pa.DataType]] = [
    *[(count_column(t, w), pa.int64()) for t in SHORT_WINDOW_TYPES for w, _ in SHORT_WINDOWS],
    *[(open_items_column(k, w), pa.int64()) for k in (CART, FAV) for w, _ in OPEN_WINDOWS],
    (PURCHASE_CART_RATE, pa.float64()),
    *[(rate_column(r, w), pa.float64()) for r in (CART_VIEW_RATE, PURCHASE_CART_RATE) for w, _ in RATE_WINDOWS],
    *[(c, pa.int64()) for w, _ in REPEAT_WINDOWS for c in repeat_columns(w)],
    (HOURS_SINCE_LAST_VIEW, pa.float64()),
    (HOURS_SINCE_LAST_FAV, pa.float64()),
]
FUNNEL_COLUMNS: tuple[str, ...] = tuple(n for n, _ in _FUNNEL_FIELDS)
_PROFILE_FIELDS: list[tuple[str, pa.DataType]] = [(USER_ID, pa.string()), (SNAPSHOT_HOUR, _TS)]
for _t in EVENT_TYPES:
    _PROFILE_FIELDS += [(count_column(_t, "lifetime"), pa.int64())]
    _PROFILE_FIELDS += [(count_column(_t, w), pa.int64()) for w, _ in WINDOWS]
    _PROFILE_FIELDS += [(decayed_column(_t, h), pa.float64()) for h, _ in HALF_LIVES]
    _PROFILE_FIELDS += [(first_at_column(_t), _TS), (last_at_column(_t), _TS)]
_PROFILE_FIELDS += [
    (FIRST_SEEN_AT, _TS),
    (LAST_SEEN_AT, _TS),
    (HOURS_SINCE_LAST_EVENT, pa.float64()),
    (HOURS_SINCE_LAST_CART, pa.float64()),
    (HOURS_SINCE_LAST_PURCHASE, pa.float64()),
    (FREQUENCY_ORDERS, pa.int64()),
    (MONETARY_TOTAL, pa.float64()),
    (AVG_ORDER_VALUE, pa.float64()),
    (MAX_ORDER_VALUE, pa.float64()),
    (RECENCY_HOURS, pa.float64()),
    (RFM_R, pa.int8()),
    (RFM_F, pa.int8()),
    (RFM_M, pa.int8()),
    (RFM_SEGMENT, pa.string()),
    (MEAN_HOURS_BETWEEN_ORDERS, pa.float64()),
    (MEAN_VIEW_TO_CART_HOURS, pa.float64()),
    (MEAN_CART_TO_PURCHASE_HOURS, pa.float64()),
    (SESSION_COUNT, pa.int64()),
    (MEAN_SESSION_MINUTES, pa.float64()),
    (EVENTS_PER_SESSION, pa.float64()),
    (CART_VIEW_RATE, pa.float64()),
    (PURCHASE_VIEW_RATE, pa.float64()),
    (OPEN_CART_ITEMS, pa.int64()),
    (OPEN_CART_VALUE, pa.float64()),
    *_FUNNEL_FIELDS,
    *[(c, pa.string()) for c in TOP_CATEGORIES],
    *[(c, pa.float64()) for c in TOP_CATEGORY_SCORES],
    (DISTINCT_CATEGORIES, pa.int64()),
    (MEAN_PRICE_VIEWED, pa.float64()),
    (MEAN_PRICE_PURCHASED, pa.float64()),
    (PEAK_HOUR_LOCAL, pa.int8()),
    (LIFECYCLE_STAGE, pa.string()),
]
_NON_NULL = {USER_ID, SNAPSHOT_HOUR, FIRST_SEEN_AT, LAST_SEEN_AT, LIFECYCLE_STAGE, RFM_SEGMENT}
PROFILE_SCHEMA = pa.schema([pa.field(n, t, nullable=n not in _NON_NULL) for n, t in _PROFILE_FIELDS])
PROFILE_COLUMNS: tuple[str, ...] = tuple(PROFILE_SCHEMA.names)
# What ``snapshot`` (per bucket) produces; ``add_population_features`` adds the rest.
SNAPSHOT_SCHEMA = pa.schema([f for f in PROFILE_SCHEMA if f.name not in POPULATION_COLUMNS])

CATEGORICAL_FEATURES: tuple[str, ...] = (TOP_CATEGORIES[0], RFM_SEGMENT, LIFECYCLE_STAGE)
NUMERIC_FEATURES: tuple[str, ...] = tuple(
    f.name
    for f in PROFILE_SCHEMA
    if f.name not in (USER_ID, SNAPSHOT_HOUR) and not pa.types.is_timestamp(f.type) and not pa.types.is_string(f.type)
)

INTERESTS_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(CATEGORY_ID, pa.string(), nullable=False),
        pa.field(AFFINITY, pa.float64(), nullable=False),
    ]
)
INTEREST_COLUMNS: tuple[str, ...] = tuple(INTERESTS_SCHEMA.names)

CHANGE_NEW, CHANGE_UPDATED, CHANGE_REMOVED = "new", "updated", "removed"
# What the change log tracks (the "lifecycle stage, RFM segment or top interest").
CHANGE_TRACKED: tuple[str, ...] = (LIFECYCLE_STAGE, RFM_SEGMENT, TOP_CATEGORIES[0])
CHANGED = "changed"


def before_column(column: str) -> str:
    """Change-log column with a tracked value in the previous snapshot: ``lifecycle_stage_before``."""
    return f"{column}_before"


def after_column(column: str) -> str:
    """Change-log column with a tracked value in the current snapshot: ``lifecycle_stage_after``."""
    return f"{column}_after"


CHANGES_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field("change", pa.string(), nullable=False),
        pa.field(CHANGED, pa.list_(pa.string()), nullable=False),
        *[pa.field(f(c), pa.string()) for c in CHANGE_TRACKED for f in (before_column, after_column)],
    ]
)

# ---- feature definitions ----------------------------------------------------------
SESSION_GAP = timedelta(minutes=30)  # inactivity that splits sessions
ORDER_GAP = timedelta(hours=1)  # lines of one order_id further apart than this are separate orders
LATENCY_LOOKBACK = timedelta(days=30)  # a view (cart) counts for a cart (purchase) this long
OPEN_CART_TTL = timedelta(days=30)  # a cart line older than this is abandoned, no longer open
HOURLY_RETENTION = timedelta(days=30)  # longest window; hourly buckets older than this are pruned
AFFINITY_HALF_LIFE = timedelta(days=7)
AFFINITY_WEIGHTS: dict[str, float] = {VIEW: 1.0, FAV: 2.0, CART: 3.0, REMOVE_CART: 0.0, PURCHASE: 5.0, REFUND: 0.0}
MIN_AFFINITY = 0.01  # interest rows below this are dropped (same rule for every path)
AFFINITY_DECIMALS = 6  # rounding keeps equal-looking scores equal, so top-k ties break on category_id
NEW_USER_AGE = timedelta(days=7)
DORMANT_AFTER = timedelta(days=7)
CHURNED_AFTER = timedelta(days=30)

_MS_HOUR = 3_600_000

# ---- state tables -------------------------------------------------------------------
META, USER_EVENTS, USERS, HOURLY, HOURS_OF_DAY, SESSIONS, ORDERS, CARTS, ANCHORS, TARGETS, PENDING = (
    "meta",
    "user_events",
    "users",
    "hourly",
    "hours_of_day",
    "sessions",
    "orders",
    "carts",
    "anchors",
    "targets",
    "pending",
)

# user_events, one row per user and event type, and users: (column, Arrow type, how two rows merge).
# Long rather than wide: DuckDB plans a query over few columns much faster, and advance runs hourly.
_USER_EVENT_FIELDS: list[tuple[str, pa.DataType, str]] = [
    ("n", pa.int64(), "sum"),
    ("first_ms", pa.int64(), "min"),
    ("last_ms", pa.int64(), "max"),
    *[(f"decayed_{h}", pa.float64(), "sum") for h, _ in HALF_LIVES],
    ("price_n", pa.int64(), "sum"),
    ("price_cents", pa.int64(), "sum"),
]
_USER_FIELDS: list[tuple[str, pa.DataType, str]] = [
    ("orders_n", pa.int64(), "sum"),
    ("orders_cents", pa.int64(), "sum"),
    ("orders_max_cents", pa.int64(), "max"),
    ("first_order_ms", pa.int64(), "min"),
    ("last_order_ms", pa.int64(), "max"),
    ("sessions_n", pa.int64(), "sum"),
    ("sessions_ms", pa.int64(), "sum"),
    ("sessions_events", pa.int64(), "sum"),
    ("v2c_n", pa.int64(), "sum"),
    ("v2c_ms", pa.int64(), "sum"),
    ("c2p_n", pa.int64(), "sum"),
    ("c2p_ms", pa.int64(), "sum"),
    # value of the user's refunds (negative cents): final at once, nothing groups them
    ("refund_cents", pa.int64(), "sum"),
]
# Columns added to a state table after lakes were written, with the value an older state
# means by their absence (read by ``_read_state``).
_ADDED_STATE_COLUMNS: dict[str, dict[str, int]] = {"users": {"refund_cents": 0}}


def _schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t in fields])


_S, _I64 = pa.string(), pa.int64()
STATE_SCHEMAS: dict[str, pa.Schema] = {
    META: _schema(("end_ms", _I64)),
    USER_EVENTS: _schema((USER_ID, _S), ("event_type", _S), *[(n, t) for n, t, _ in _USER_EVENT_FIELDS]),
    USERS: _schema((USER_ID, _S), *[(n, t) for n, t, _ in _USER_FIELDS]),
    HOURLY: _schema(
        (USER_ID, _S),
        ("hour_ms", _I64),
        ("event_type", _S),
        (CATEGORY_ID, _S),
        ("n", _I64),
        ("decay_sum", pa.float64()),
    ),
    HOURS_OF_DAY: _schema((USER_ID, _S), ("hour_of_day", pa.int8()), ("n", _I64)),
    SESSIONS: _schema((USER_ID, _S), ("first_ms", _I64), ("last_ms", _I64), ("n", _I64)),
    ORDERS: _schema((USER_ID, _S), ("order_key", _S), ("ts_ms", _I64), ("cents", _I64)),
    CARTS: _schema((USER_ID, _S), ("item_id", _S), ("cart_ms", _I64), ("cart_cents", _I64), ("closed_ms", _I64)),
    ANCHORS: _schema((USER_ID, _S), ("item_id", _S), ("event_type", _S), ("ts_ms", _I64)),
    TARGETS: _schema((USER_ID, _S), ("item_id", _S), ("event_type", _S), ("ts_ms", _I64)),
    PENDING: STAGED_SCHEMA,
}
FAVS, ITEM_VIEWS = "favs", "item_views"  # added with the funnel features: older states lack them
STATE_SCHEMAS |= {
    FAVS: _schema((USER_ID, _S), ("item_id", _S), ("fav_ms", _I64), ("bought_ms", _I64)),
    ITEM_VIEWS: _schema((USER_ID, _S), ("item_id", _S), ("hour_ms", _I64), ("n", _I64)),
}
ADDED_STATE_TABLES: tuple[str, ...] = (FAVS, ITEM_VIEWS)  # read as empty from a state written before them
STATE_TABLES: tuple[str, ...] = tuple(STATE_SCHEMAS)
_BUFFERED_SESSIONS = ("sessions_n", "sessions_ms", "sessions_events")
_BUFFERED_ORDERS = ("orders_n", "orders_cents", "orders_max_cents", "first_order_ms", "last_order_ms")
_BUFFERED_LATENCIES = ("v2c_n", "v2c_ms", "c2p_n", "c2p_ms")
BUFFERED_SCHEMA = _schema(
    (USER_ID, _S), *((f"b_{n}", _I64) for n in (*_BUFFERED_SESSIONS, *_BUFFERED_ORDERS, *_BUFFERED_LATENCIES))
)


class MissingStateError(FileNotFoundError):
    """The state of the hour before is not in the lake: the hour cannot be built on it."""


@dataclass
class ProfileState:
    """Mergeable per-user state of one bucket as of ``end`` (named Arrow tables, see module doc)."""

    tables: dict[str, pa.Table]
    # Per-user totals of the sessions, orders and latencies the buffers hold (``BUFFERED_SCHEMA``):
    # derived from the buffers, never written. ``advance`` keeps them from its own grouping of
    # the buffers (regrouping about 4M buffered session rows took 1 s of a 10 s bucket at 1M
    # users); a state read from the lake has None and ``snapshot`` computes them.
    buffered: pa.Table | None = field(default=None, compare=False, repr=False)

    @property
    def end(self) -> datetime | None:
        """The exclusive end of the events merged so far (None for an empty state)."""
        meta = self.tables[META]
        if meta.num_rows == 0:
            return None
        return datetime.fromtimestamp(meta.column("end_ms")[0].as_py() / 1000, tz=UTC)


def empty_state() -> ProfileState:
    """A state with no users and no end: the start of the first hour."""
    return ProfileState({name: schema.empty_table() for name, schema in STATE_SCHEMAS.items()})


# ---- SQL helpers --------------------------------------------------------------------
_DATABASE: tuple[int, duckdb.DuckDBPyConnection] | None = None
_DATABASE_LOCK = threading.Lock()


def _connect() -> duckdb.DuckDBPyConnection:
    """An isolated DuckDB connection (own temp tables and registrations) on a per-process database.

    Opening an in-memory database costs ~20 ms, a cursor on an open one microseconds: that
    matters for the hourly chains of the tests and the runner.
    """
    global _DATABASE
    with _DATABASE_LOCK:
        if _DATABASE is None or _DATABASE[0] != os.getpid():  # a forked worker opens its own
            _DATABASE = (os.getpid(), db.connect())
        return _DATABASE[1].cursor()


def _hour_ms(moment: datetime) -> int:
    if moment.tzinfo is None or moment != floor_hour(moment):
        raise ValueError(f"end must be a UTC hour boundary with tzinfo, got {moment!r}")
    return int(moment.timestamp()) * 1000


def _decay(age_ms_sql: str, half_life_hours: float) -> str:
    """SQL factor 2^(-age / half-life): exact exponential decay of a count."""
    return f"pow(2.0, -CAST({age_ms_sql} AS DOUBLE) / {half_life_hours * _MS_HOUR})"


def _cents(amount_sql: str) -> str:
    return f"CAST(round(({amount_sql}) * 100) AS BIGINT)"


def _duck_type(arrow_type: pa.DataType) -> str:
    return "DOUBLE" if pa.types.is_floating(arrow_type) else "BIGINT"


def _gap_groups(rows_sql: str, keys: str, gap_ms: int) -> str:
    """SQL marking gap-separated groups of ``rows_sql`` (a new group after a gap >= ``gap_ms``).

    Adds ``grp_first`` and ``grp_last`` (the group's first and last ``ts_ms``, which also
    identify the group within its keys) to each row. Rows with equal ``ts_ms`` always
    share a group, so the result does not depend on their order: only one of several
    tied rows sees the gap before (after) them, and RANGE frames include every tied row.
    Two sorted window passes: neighbours (lag, lead), then the running start and the
    trailing end.
    """
    order = f"PARTITION BY {keys} ORDER BY ts_ms"
    return f"""
        SELECT * EXCLUDE (starts, ends),
               max(CASE WHEN starts THEN ts_ms END) OVER ({order} RANGE UNBOUNDED PRECEDING) AS grp_first,
               min(CASE WHEN ends THEN ts_ms END)
                   OVER ({order} RANGE BETWEEN CURRENT ROW AND UNBOUNDED FOLLOWING) AS grp_last
        FROM (
            SELECT *, coalesce(ts_ms - lag(ts_ms) OVER ({order}) >= {gap_ms}, true) AS starts,
                      coalesce(lead(ts_ms) OVER ({order}) - ts_ms >= {gap_ms}, true) AS ends
            FROM ({rows_sql})
        )
    """


def _interval_groups(intervals_sql: str, gap_ms: int) -> str:
    """SQL merging per-user intervals (``first_ms``, ``last_ms``, ``n`` events) into gap-separated groups.

    Sorted by start, an interval opens a new group when it starts ``gap_ms`` or more after
    the latest end of every earlier interval of its user. For points (first = last) this is
    ``_gap_groups``; for intervals that are such groups it gives the groups of all their
    points, because within a group consecutive points are less than the gap apart, so only
    a group's ends can be near another point. Tied points always share a group. Returns one
    row per group: ``user_id, grp_first, grp_last, n``.
    """
    order = "PARTITION BY user_id ORDER BY first_ms, last_ms"
    return f"""
        SELECT user_id, min(first_ms) AS grp_first, max(last_ms) AS grp_last, sum(n) AS n FROM (
            SELECT *, sum(starts::INTEGER) OVER ({order} ROWS UNBOUNDED PRECEDING) AS grp FROM (
                SELECT *, coalesce(
                    first_ms - max(last_ms) OVER ({order} ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) >= {gap_ms},
                    true) AS starts
                FROM ({intervals_sql})
            )
        ) GROUP BY user_id, grp
    """


def _session_totals(groups: str) -> str:
    """Per-user session count, summed duration and events of the session groups in ``groups``
    (one row per session: ``user_id, grp_first, grp_last, n``)."""
    return f"""
        SELECT user_id, count(*) AS sessions_n, sum(grp_last - grp_first) AS sessions_ms, sum(n) AS sessions_events
        FROM {groups} GROUP BY user_id
    """


def _order_totals(grouped: str) -> str:
    """Per-user order count, value, largest value and first/last order time of the orders in ``grouped``."""
    return f"""
        SELECT user_id, count(*) AS orders_n, sum(cents) AS orders_cents, max(cents) AS orders_max_cents,
               min(grp_first) AS first_order_ms, max(grp_first) AS last_order_ms
        FROM (SELECT user_id, order_key, grp_first, sum(cents) AS cents
              FROM {grouped} GROUP BY user_id, order_key, grp_first)
        GROUP BY user_id
    """


def _latencies(targets: str, anchors: str) -> str:
    """Each target (cart, purchase) with the time since the latest earlier anchor (view, cart) of its item."""
    lookback = int(LATENCY_LOOKBACK.total_seconds() * 1000)
    return f"""
        SELECT t.user_id, t.event_type, t.ts_ms,
               CASE WHEN t.ts_ms - a.ts_ms <= {lookback} THEN t.ts_ms - a.ts_ms END AS lag_ms
        FROM (SELECT *, CASE event_type WHEN '{CART}' THEN '{VIEW}' ELSE '{CART}' END AS anchor_type FROM {targets}) t
        ASOF LEFT JOIN (
            -- only anchors of items with a target: a hash probe, so the ASOF join sorts far fewer rows
            SELECT * FROM {anchors} a0 WHERE EXISTS (
                SELECT 1 FROM {targets} t0 WHERE t0.user_id = a0.user_id AND t0.item_id = a0.item_id)
        ) a
          ON t.user_id = a.user_id AND t.item_id = a.item_id AND t.anchor_type = a.event_type AND t.ts_ms >= a.ts_ms
    """


def _latency_totals(latencies: str) -> str:
    return f"""
        SELECT user_id,
               count(lag_ms) FILTER (WHERE event_type = '{CART}') AS v2c_n,
               sum(lag_ms) FILTER (WHERE event_type = '{CART}') AS v2c_ms,
               count(lag_ms) FILTER (WHERE event_type = '{PURCHASE}') AS c2p_n,
               sum(lag_ms) FILTER (WHERE event_type = '{PURCHASE}') AS c2p_ms
        FROM {latencies} GROUP BY user_id
    """


def _buffered_sql(sessions: str, orders: str, targets: str, anchors: str) -> str:
    """Per-user totals (``BUFFERED_SCHEMA``) of gap-grouped buffered sessions and orders and the
    latencies of buffered targets: what the snapshot adds to the users' final totals."""

    def prefixed(sql: str, names: tuple[str, ...]) -> str:
        return f"SELECT user_id, {', '.join(f'CAST({n} AS BIGINT) AS b_{n}' for n in names)} FROM ({sql})"

    columns = ", ".join(f"max(b_{n}) AS b_{n}" for n in (*_BUFFERED_SESSIONS, *_BUFFERED_ORDERS, *_BUFFERED_LATENCIES))
    return f"""
        SELECT user_id, {columns} FROM (
            {prefixed(_session_totals(sessions), _BUFFERED_SESSIONS)}
            UNION ALL BY NAME {prefixed(_order_totals(orders), _BUFFERED_ORDERS)}
            UNION ALL BY NAME {prefixed(_latency_totals(f"({_latencies(targets, anchors)})"), _BUFFERED_LATENCIES)}
        ) GROUP BY user_id
    """


def _fetch(con: duckdb.DuckDBPyConnection, sql: str, schema: pa.Schema) -> pa.Table:
    return con.sql(sql).to_arrow_table().select(schema.names).cast(schema)


def _staged(events: pa.Table, business_tz: str) -> pa.Table:
    """The events as ``STAGED_SCHEMA`` (column order and types), or a clear error."""
    events = with_local_hour(events, business_tz)
    missing = [n for n in STAGED_SCHEMA.names if n not in events.column_names]
    if missing:
        raise ValueError(f"events lack staged columns {missing}")
    return events.select(STAGED_SCHEMA.names).cast(STAGED_SCHEMA)


def with_local_hour(events: pa.Table, business_tz: str) -> pa.Table:
    """Staged events with ``local_hour``; events staged before it existed get their hour in ``business_tz``.

    That is what the profiles of those events used (the business time zone was the only
    one), so an older lake keeps its peak hours.
    """
    if LOCAL_HOUR in events.column_names:
        return events
    ZoneInfo(business_tz)  # raises for an unknown zone
    hours = pc.hour(events.column("ts").cast(pa.timestamp("ms", tz=business_tz)))  # hour of the zone's local time
    return events.append_column(pa.field(LOCAL_HOUR, pa.int8()), hours.cast(pa.int8()))


# ---- advance / snapshot / rebuild ---------------------------------------------------
def advance(state: ProfileState, events: pa.Table, end: datetime, settings: Settings) -> ProfileState:
    """Merge staged events into ``state`` and move its end to ``end``.

    ``events`` (``STAGED_SCHEMA``) may have any ``ts``: those at or after ``end`` are held
    back in the state and merged by a later call. ``end`` may be many hours after the
    state's end; the result equals advancing hour by hour, which is what lets the
    warm-up process a day at once.
    """
    e = _hour_ms(end)
    previous = state.end
    e0 = _hour_ms(previous) if previous is not None else e  # an empty state has nothing to decay
    if e < e0:
        raise ValueError(f"cannot move the state back from {format_hour(previous or end)} to {format_hour(end)}")
    horizon = e - settings.lateness_hours * _MS_HOUR  # no future event is older than this
    session_gap = int(SESSION_GAP.total_seconds() * 1000)
    order_gap = int(ORDER_GAP.total_seconds() * 1000)
    con = _connect()
    try:
        for name, table in state.tables.items():
            con.register(f"s_{name}", table)
        con.register("s_pending", _staged(state.tables[PENDING], settings.business_tz))
        con.register("new_events", _staged(events, settings.business_tz))
        con.execute(  # a view: scanned twice (due, pending), never worth a copy
            "CREATE TEMP VIEW incoming AS SELECT *, epoch_ms(ts) AS t FROM "
            "(SELECT * FROM s_pending UNION ALL SELECT * FROM new_events)"
        )
        con.execute(f"CREATE TEMP TABLE due AS SELECT * FROM incoming WHERE t < {e}")
        pending = _fetch(con, f"SELECT * FROM incoming WHERE t >= {e} ORDER BY user_id, ts, event_id", STAGED_SCHEMA)

        # sessions: merge the buffered sessions with the new events (points), fold sessions no
        # future event can touch; the buffer keeps one row per open session, not per event
        con.execute(
            "CREATE TEMP TABLE sess AS "
            + _interval_groups(
                "SELECT user_id, first_ms, last_ms, n FROM s_sessions UNION ALL "
                "SELECT user_id, t, t, count(*) FROM due GROUP BY user_id, t",
                session_gap,
            )
        )
        sessions = _fetch(
            con,
            f"SELECT user_id, grp_first AS first_ms, grp_last AS last_ms, n FROM sess "
            f"WHERE grp_last + {session_gap} > {horizon} ORDER BY user_id, first_ms",
            STATE_SCHEMAS[SESSIONS],
        )
        # orders: lines of one (user, order key) grouped the same way; no order_id = one order per event
        order_lines = (
            "SELECT user_id, order_key, ts_ms, cents FROM s_orders UNION ALL "
            f"SELECT user_id, coalesce(order_id, 'event:' || event_id), t, {_cents('coalesce(price, 0) * quantity')} "
            f"FROM due WHERE event_type = '{PURCHASE}'"
        )
        con.execute("CREATE TEMP TABLE ord AS " + _gap_groups(order_lines, "user_id, order_key", order_gap))
        orders = _fetch(
            con,
            f"SELECT user_id, order_key, ts_ms, cents FROM ord WHERE grp_last + {order_gap} > {horizon} "
            "ORDER BY user_id, order_key, ts_ms, cents",
            STATE_SCHEMAS[ORDERS],
        )
        # latencies: targets become final once no earlier anchor can still arrive
        con.execute(
            "CREATE TEMP VIEW anc AS SELECT user_id, item_id, event_type, ts_ms FROM s_anchors UNION ALL "
            f"SELECT user_id, item_id, event_type, t FROM due WHERE event_type IN ('{VIEW}', '{CART}')"
        )
        con.execute(
            "CREATE TEMP TABLE tgt AS SELECT user_id, item_id, event_type, ts_ms FROM s_targets UNION ALL "
            f"SELECT user_id, item_id, event_type, t FROM due WHERE event_type IN ('{CART}', '{PURCHASE}')"
        )
        con.execute(f"CREATE TEMP TABLE tgt_final AS SELECT * FROM tgt WHERE ts_ms < {horizon}")
        targets = _fetch(
            con,
            f"SELECT * FROM tgt WHERE ts_ms >= {horizon} ORDER BY user_id, item_id, event_type, ts_ms",
            STATE_SCHEMAS[TARGETS],
        )
        lookback = int(LATENCY_LOOKBACK.total_seconds() * 1000)
        # Keep every anchor a future target may see: the recent ones and the latest older one per item.
        # The buffer holds each anchor once, so its recent rows pass through in their order (sorting
        # millions of them again cost more than the rest of the buffer work); the new recent anchors
        # not in it yet and the latest older ones per item are sorted and appended. The parts are
        # disjoint: in ts_ms (recent or older) and, among the recent ones, by the anti join.
        old_anchors = state.tables[ANCHORS]
        kept = old_anchors.filter(pc.greater_equal(old_anchors.column("ts_ms"), pa.scalar(horizon, _I64)))
        added = _fetch(
            con,
            f"""
            SELECT * FROM (
                SELECT * FROM (
                    SELECT DISTINCT user_id, item_id, event_type, t AS ts_ms FROM due
                    WHERE event_type IN ('{VIEW}', '{CART}') AND t >= {horizon}
                ) d ANTI JOIN s_anchors s USING (user_id, item_id, event_type, ts_ms)
                UNION ALL
                SELECT user_id, item_id, event_type, max(ts_ms) FROM anc WHERE ts_ms < {horizon}
                GROUP BY user_id, item_id, event_type HAVING max(ts_ms) >= {horizon - lookback}
            ) ORDER BY user_id, item_id, event_type, ts_ms
            """,
            STATE_SCHEMAS[ANCHORS],
        )
        anchors = pa.concat_tables([kept.select(added.schema.names).cast(added.schema), added]).combine_chunks()
        con.register("kept_targets", targets)
        con.register("kept_anchors", anchors)
        # The kept sessions and orders are whole groups, separated from the folded ones by a
        # gap: grouping the new buffers again would give these same groups.
        buffered = _fetch(
            con,
            _buffered_sql(
                f"(SELECT * FROM sess WHERE grp_last + {session_gap} > {horizon})",
                f"(SELECT * FROM ord WHERE grp_last + {order_gap} > {horizon})",
                "kept_targets",
                "kept_anchors",
            ),
            BUFFERED_SCHEMA,
        )

        user_events = _fetch(con, _merge_user_events_sql(e, e0), STATE_SCHEMAS[USER_EVENTS])
        users = _fetch(con, _merge_users_sql(horizon, session_gap, order_gap), STATE_SCHEMAS[USERS])
        hourly = _merge_hourly(con, state.tables[HOURLY], e)
        hours_of_day = _fetch(
            con,
            f"""
            SELECT user_id, hour_of_day, sum(n) AS n FROM (
                SELECT user_id, hour_of_day, n FROM s_hours_of_day
                UNION ALL
                SELECT user_id, {LOCAL_HOUR} AS hour_of_day, count(*) AS n FROM due
                WHERE {LOCAL_HOUR} IS NOT NULL GROUP BY ALL
            ) GROUP BY ALL ORDER BY user_id, hour_of_day
            """,
            STATE_SCHEMAS[HOURS_OF_DAY],
        )
        carts = _fetch(con, _merge_carts_sql(e, horizon), STATE_SCHEMAS[CARTS])
        favs = _fetch(con, _merge_favs_sql(e, horizon), STATE_SCHEMAS[FAVS])
        item_views = _merge_item_views(con, state.tables[ITEM_VIEWS], e)
    finally:
        con.close()

    return ProfileState(
        {
            META: pa.table({"end_ms": pa.array([e], pa.int64())}),
            USER_EVENTS: user_events,
            USERS: users,
            HOURLY: hourly,
            HOURS_OF_DAY: hours_of_day,
            SESSIONS: sessions,
            ORDERS: orders,
            CARTS: carts,
            FAVS: favs,
            ITEM_VIEWS: item_views,
            ANCHORS: anchors,
            TARGETS: targets,
            PENDING: pending,
        },
        buffered=buffered,
    )


def _merged(fields: list[tuple[str, pa.DataType, str]]) -> str:
    """Select list merging rows of one key: sums (0 when absent), minima and maxima."""
    merged = []
    for name, arrow_type, how in fields:
        agg = f"coalesce(sum({name}), 0)" if how == "sum" else f"{how}({name})"
        merged.append(f"CAST({agg} AS {_duck_type(arrow_type)}) AS {name}")
    return ", ".join(merged)


def _merge_user_events_sql(e: int, e0: int) -> str:
    """SQL merging old per-type rows (decayed from ``e0`` to ``e``) with the new events."""
    half_life = {f"decayed_{h}": hours for h, hours in HALF_LIVES}
    old = ", ".join(
        f"{n} * {_decay(str(e - e0), half_life[n])} AS {n}" if n in half_life else n for n, _, _ in _USER_EVENT_FIELDS
    )
    decayed = ", ".join(f"sum({_decay(f'{e} - t', hours)}) AS decayed_{h}" for h, hours in HALF_LIVES)
    return f"""
        SELECT user_id, event_type, {_merged(_USER_EVENT_FIELDS)} FROM (
            SELECT user_id, event_type, {old} FROM s_user_events
            UNION ALL BY NAME
            SELECT user_id, event_type, count(*) AS n, min(t) AS first_ms, max(t) AS last_ms, {decayed},
                   count(price) AS price_n, sum({_cents("price")}) AS price_cents
            FROM due GROUP BY user_id, event_type
        ) GROUP BY user_id, event_type ORDER BY user_id, event_type
    """


def _merge_users_sql(horizon: int, session_gap: int, order_gap: int) -> str:
    """SQL adding the sessions, orders and latencies that became final to the users' totals."""
    final_sessions = f"(SELECT * FROM sess WHERE grp_last + {session_gap} <= {horizon})"
    final_orders = f"(SELECT * FROM ord WHERE grp_last + {order_gap} <= {horizon})"
    return f"""
        SELECT user_id, {_merged(_USER_FIELDS)} FROM (
            SELECT * FROM s_users
            UNION ALL BY NAME {_session_totals(final_sessions)}
            UNION ALL BY NAME {_order_totals(final_orders)}
            UNION ALL BY NAME {_latency_totals(f"({_latencies('tgt_final', 'anc')})")}
            UNION ALL BY NAME SELECT user_id, sum({_cents("coalesce(price, 0) * quantity")}) AS refund_cents
                FROM due WHERE event_type = '{REFUND}' GROUP BY user_id
        ) GROUP BY user_id ORDER BY user_id
    """


def _affinity_decay_sql(age_ms_sql: str) -> str:
    return _decay(age_ms_sql, AFFINITY_HALF_LIFE.total_seconds() / 3600)


def _merge_hourly(con: duckdb.DuckDBPyConnection, old: pa.Table, e: int) -> pa.Table:
    """The hourly buckets with the due events added and buckets older than 30 days dropped.

    ``decay_sum`` is the bucket's events decayed to the bucket's end, so the affinity as of
    any later end is ``decay_sum`` times one more exact factor.
    """
    bucket = f"(t - t % {_MS_HOUR})"
    return _merge_by_hour(
        con,
        old,
        HOURLY,
        f"""SELECT user_id, {bucket} AS hour_ms, event_type, category_id, count(*) AS n,
                   sum({_affinity_decay_sql(f"{bucket} + {_MS_HOUR} - t")}) AS decay_sum
            FROM due GROUP BY ALL""",
        (USER_ID, "hour_ms", "event_type", CATEGORY_ID),
        ("n", "decay_sum"),
        e - int(HOURLY_RETENTION.total_seconds() * 1000),
    )


def _merge_item_views(con: duckdb.DuckDBPyConnection, old: pa.Table, e: int) -> pa.Table:
    """Views per user, item and hour with the due views added, kept for the longest repeat-view window."""
    return _merge_by_hour(
        con,
        old,
        ITEM_VIEWS,
        f"SELECT user_id, item_id, t - t % {_MS_HOUR} AS hour_ms, count(*) AS n FROM due "
        f"WHERE event_type = '{VIEW}' GROUP BY ALL",
        (USER_ID, "item_id", "hour_ms"),
        ("n",),
        e - max(h for _, h in REPEAT_WINDOWS) * _MS_HOUR,
    )


def _merge_by_hour(
    con: duckdb.DuckDBPyConnection,
    old: pa.Table,
    name: str,
    new_rows: str,
    keys: tuple[str, ...],
    sums: tuple[str, ...],
    retention: int,
) -> pa.Table:
    """State table ``name`` (one row per ``keys``, sorted by ``hour_ms`` first) with ``new_rows`` summed in.

    Rows of hours before ``retention`` are dropped. Only the hours the due events fall in
    can change: older rows pass through untouched (in Arrow, no regrouping), the rest is
    merged in SQL, so the untouched head stays in order.
    """
    first_due = con.sql(f"SELECT min(t - t % {_MS_HOUR}) FROM due").fetchall()[0][0]
    hour_ms = old.column("hour_ms")
    if first_due is None:  # nothing due: every row within the retention passes through
        schema = STATE_SCHEMAS[name]
        return old.filter(pc.greater_equal(hour_ms, retention)).select(schema.names).cast(schema).combine_chunks()
    cut = int(first_due)
    untouched = old.filter(pc.and_(pc.greater_equal(hour_ms, retention), pc.less(hour_ms, cut)))
    columns = ", ".join((*keys, *sums))
    order = ", ".join(["hour_ms", *(k for k in keys if k != "hour_ms")])
    merged = _fetch(
        con,
        f"""
        SELECT {", ".join(keys)}, {", ".join(f"sum({v}) AS {v}" for v in sums)} FROM (
            SELECT {columns} FROM s_{name} WHERE hour_ms >= {cut}
            UNION ALL BY NAME
            {new_rows}
        ) WHERE hour_ms >= {retention}
        GROUP BY ALL ORDER BY {order} NULLS FIRST
        """,
        STATE_SCHEMAS[name],
    )
    return pa.concat_tables([untouched.select(merged.schema.names).cast(merged.schema), merged]).combine_chunks()


def _merge_carts_sql(e: int, horizon: int) -> str:
    """SQL keeping, per user and item, the latest cart line and the latest close (remove or purchase).

    A row is dropped once no future event can make it matter: closed before the lateness
    horizon, or untouched for longer than the open-cart time to live.
    """
    ttl = int(OPEN_CART_TTL.total_seconds() * 1000)
    return f"""
        SELECT * FROM (
            SELECT user_id, item_id, max(cart_ms) AS cart_ms,
                   arg_max(cart_cents, [cart_ms, cart_cents]) FILTER (WHERE cart_ms IS NOT NULL) AS cart_cents,
                   max(closed_ms) AS closed_ms
            FROM (
                SELECT user_id, item_id, cart_ms, cart_cents, closed_ms FROM s_carts
                UNION ALL
                SELECT user_id, item_id,
                       CASE WHEN event_type = '{CART}' THEN t END,
                       CASE WHEN event_type = '{CART}' THEN {_cents("coalesce(price, 0) * quantity")} END,
                       CASE WHEN event_type <> '{CART}' THEN t END
                FROM due WHERE event_type IN ('{CART}', '{REMOVE_CART}', '{PURCHASE}')
            ) GROUP BY user_id, item_id
        )
        WHERE {_open_items_kept("cart_ms", "closed_ms", e - ttl, horizon)}
        ORDER BY user_id, item_id
    """


def _open_items_kept(opened: str, closed: str, oldest: int, horizon: int) -> str:
    """SQL condition keeping a per-item row of last open/last close times while a future event can make it matter.

    Dropped once closed (the close at or after the open) before the lateness horizon (any
    later event is newer than the close), or untouched since before ``oldest``.
    """
    return (
        f"NOT ({closed} IS NOT NULL AND {closed} >= coalesce({opened}, {closed}) AND {closed} < {horizon}) "
        f"AND greatest({opened}, {closed}) >= {oldest}"
    )


def _merge_favs_sql(e: int, horizon: int) -> str:
    """SQL keeping, per user and item, the latest favourite and the latest purchase while they can matter.

    A favourite is open while no purchase of its item is at or after it; only favourites
    within the longest ``OPEN_WINDOWS`` count, so rows untouched for longer are dropped
    (a late favourite that old is outside every window too).
    """
    oldest = e - max(h for _, h in OPEN_WINDOWS) * _MS_HOUR
    return f"""
        SELECT * FROM (
            SELECT user_id, item_id, max(fav_ms) AS fav_ms, max(bought_ms) AS bought_ms FROM (
                SELECT user_id, item_id, fav_ms, bought_ms FROM s_favs
                UNION ALL
                SELECT user_id, item_id, CASE WHEN event_type = '{FAV}' THEN t END,
                       CASE WHEN event_type = '{PURCHASE}' THEN t END
                FROM due WHERE event_type IN ('{FAV}', '{PURCHASE}')
            ) GROUP BY user_id, item_id
        )
        WHERE {_open_items_kept("fav_ms", "bought_ms", oldest, horizon)}
        ORDER BY user_id, item_id
    """


def snapshot(state: ProfileState, end: datetime, settings: Settings) -> tuple[pa.Table, pa.Table]:
    """The profile snapshot as of ``end`` (the state's end) and the interests long table.

    Profiles carry every contract column except the population ones (RFM), which need
    all buckets and are added by ``add_population_features``. Rows are sorted by
    ``user_id`` (interests by ``user_id, category_id``). Contains no event at or after ``end``.
    """
    e = _hour_ms(end)
    if state.end is not None and state.end != end:
        raise ValueError(f"state ends at {format_hour(state.end)}, not {format_hour(end)}: advance it first")
    con = _connect()
    try:
        for name, table in state.tables.items():
            con.register(f"s_{name}", table)
        if state.buffered is not None:
            con.register("s_buffered", state.buffered)
        else:  # a state read from the lake: its sessions are groups already, its orders lines
            order_gap = int(ORDER_GAP.total_seconds() * 1000)
            sessions = "(SELECT user_id, first_ms AS grp_first, last_ms AS grp_last, n FROM s_sessions)"
            orders = f"({_gap_groups('SELECT * FROM s_orders', 'user_id, order_key', order_gap)})"
            con.execute(f"CREATE TEMP TABLE s_buffered AS {_buffered_sql(sessions, orders, 's_targets', 's_anchors')}")
        con.execute(f"CREATE TEMP TABLE affinities AS {_affinities_sql(e)}")
        con.execute(f"CREATE TEMP VIEW interests AS SELECT * FROM affinities WHERE affinity >= {MIN_AFFINITY}")
        interests = _fetch(con, "SELECT * FROM interests ORDER BY user_id, category_id", INTERESTS_SCHEMA)
        profiles = _fetch(con, _profiles_sql(e), SNAPSHOT_SCHEMA)
    finally:
        con.close()
    return profiles, interests


def _affinities_sql(e: int) -> str:
    """Affinity of every (user, category) seen within the retention, before the pruning rule.

    The interests are the rows at or above ``MIN_AFFINITY``; the number of distinct
    categories counts every row, so both come from this one grouping of the hourly buckets.
    """
    weight = "CASE event_type " + " ".join(f"WHEN '{t}' THEN {w}" for t, w in AFFINITY_WEIGHTS.items()) + " END"
    retention = int(HOURLY_RETENTION.total_seconds() * 1000)
    views = ", ".join(
        f"sum(n) FILTER (WHERE event_type = '{VIEW}' AND hour_ms >= {e - h * _MS_HOUR}) AS views_{w}"
        for w, h in REPEAT_WINDOWS
    )
    return f"""
        SELECT user_id, category_id, {views},
               round(sum({weight} * decay_sum * {_affinity_decay_sql(f"{e} - hour_ms - {_MS_HOUR}")}),
                     {AFFINITY_DECIMALS}) AS affinity
        FROM s_hourly WHERE category_id IS NOT NULL AND hour_ms >= {e - retention}
        GROUP BY user_id, category_id
    """


def _funnel_sql(e: int) -> tuple[dict[str, str], dict[str, str]]:
    """The funnel columns of the snapshot: (name -> SQL of a per-user CTE, column -> expression).

    The expressions may use the columns of ``_profiles_sql`` (``n_{t}`` lifetime counts,
    ``c_{t}_{w}`` window counts, ``last_{t}_ms``). Open carts and favourites come from the
    ``carts`` and ``favs`` state, repeat views of an item from ``item_views`` and of a
    category from the hourly buckets (the ``views_{w}`` of the ``affinities`` table).
    """
    hours = f"/ {float(_MS_HOUR)}"
    oldest = e - max(h for _, h in OPEN_WINDOWS) * _MS_HOUR

    def open_counts(table: str, kind: str, opened: str, closed: str) -> str:
        counts = ", ".join(
            f"count(*) FILTER (WHERE {opened} >= {e - h * _MS_HOUR}) AS {open_items_column(kind, w)}"
            for w, h in OPEN_WINDOWS
        )
        return (
            f"SELECT user_id, {counts} FROM {table} "
            f"WHERE {opened} >= {oldest} AND ({closed} IS NULL OR {closed} < {opened}) GROUP BY user_id"
        )

    def repeats(table: str, prefix: str) -> str:
        return (
            ", ".join(
                f"max(views_{w}) AS {prefix}_max_{w}, count(*) FILTER (WHERE views_{w} >= 2) AS {prefix}_repeat_{w}"
                for w, _ in REPEAT_WINDOWS
            )
            + f" FROM {table} GROUP BY user_id"
        )

    item_views = ", ".join(
        f"sum(n) FILTER (WHERE hour_ms >= {e - h * _MS_HOUR}) AS views_{w}" for w, h in REPEAT_WINDOWS
    )
    ctes = {
        "fo_cart": open_counts("s_carts", CART, "cart_ms", "closed_ms"),
        "fo_fav": open_counts("s_favs", FAV, "fav_ms", "bought_ms"),
        "fr_item": "SELECT user_id, "
        + repeats(f"(SELECT user_id, item_id, {item_views} FROM s_item_views GROUP BY user_id, item_id)", "item"),
        "fr_cat": "SELECT user_id, " + repeats("affinities", "category"),
    }

    def ratio(numerator: str, denominator: str) -> str:
        return f"CASE WHEN {denominator} > 0 THEN {numerator} / {denominator} END"

    cols = {count_column(t, w): f"coalesce(c_{t}_{w}, 0)" for t in SHORT_WINDOW_TYPES for w, _ in SHORT_WINDOWS}
    cols |= {
        open_items_column(k, w): f"coalesce({open_items_column(k, w)}, 0)" for k in (CART, FAV) for w, _ in OPEN_WINDOWS
    }
    cols[PURCHASE_CART_RATE] = ratio(f"n_{PURCHASE}", f"n_{CART}")
    for w, _ in RATE_WINDOWS:
        cols[rate_column(CART_VIEW_RATE, w)] = ratio(f"c_{CART}_{w}", f"coalesce(c_{VIEW}_{w}, 0)")
        cols[rate_column(PURCHASE_CART_RATE, w)] = ratio(f"c_{PURCHASE}_{w}", f"coalesce(c_{CART}_{w}, 0)")
    for w, _ in REPEAT_WINDOWS:
        max_item, repeat_items, max_category, repeat_categories = repeat_columns(w)
        cols[max_item], cols[repeat_items] = f"coalesce(item_max_{w}, 0)", f"coalesce(item_repeat_{w}, 0)"
        cols[max_category] = f"coalesce(category_max_{w}, 0)"
        cols[repeat_categories] = f"coalesce(category_repeat_{w}, 0)"
    cols[HOURS_SINCE_LAST_VIEW] = f"({e} - last_{VIEW}_ms) {hours}"
    cols[HOURS_SINCE_LAST_FAV] = f"({e} - last_{FAV}_ms) {hours}"
    return ctes, cols


def _profiles_sql(e: int) -> str:
    """SQL of the per-bucket snapshot: the users rows plus what the buffers hold (``s_buffered``) as of ``e``."""
    hours = f"/ {float(_MS_HOUR)}"
    ttl = int(OPEN_CART_TTL.total_seconds() * 1000)
    windows = [
        f"coalesce(sum(n) FILTER (WHERE event_type = '{t}' AND hour_ms >= {e - h * _MS_HOUR}), 0) AS c_{t}_{w}"
        for t in EVENT_TYPES
        for w, h in WINDOWS
    ] + [
        f"coalesce(sum(n) FILTER (WHERE event_type = '{t}' AND hour_ms >= {e - h * _MS_HOUR}), 0) AS c_{t}_{w}"
        for t in SHORT_WINDOW_TYPES
        for w, h in SHORT_WINDOWS
    ]
    per_type = []
    for t in EVENT_TYPES:
        where = f"FILTER (WHERE event_type = '{t}')"
        per_type += [f"coalesce(sum({n}) {where}, 0) AS {n}_{t}" for n in ("n", "price_n", "price_cents")]
        per_type += [f"min(first_ms) {where} AS first_{t}_ms", f"max(last_ms) {where} AS last_{t}_ms"]
        per_type += [f"coalesce(sum(decayed_{h}) {where}, 0) AS decayed_{h}_{t}" for h, _ in HALF_LIVES]
    cols: dict[str, str] = {USER_ID: "ue.user_id", SNAPSHOT_HOUR: str(e - _MS_HOUR)}
    for t in EVENT_TYPES:
        cols[count_column(t, "lifetime")] = f"n_{t}"
        cols |= {count_column(t, w): f"coalesce(c_{t}_{w}, 0)" for w, _ in WINDOWS}
        cols |= {decayed_column(t, h): f"decayed_{h}_{t}" for h, _ in HALF_LIVES}
        cols |= {first_at_column(t): f"first_{t}_ms", last_at_column(t): f"last_{t}_ms"}
    first_seen = "least(" + ", ".join(f"first_{t}_ms" for t in EVENT_TYPES) + ")"
    last_seen = "greatest(" + ", ".join(f"last_{t}_ms" for t in EVENT_TYPES) + ")"
    n_orders = "(coalesce(orders_n, 0) + coalesce(b_orders_n, 0))"
    # net spend: purchase lines plus refunds (negative); money is null for a user none of
    # whose events carries a price (a source without prices), never a made-up 0
    cents = "(coalesce(orders_cents, 0) + coalesce(b_orders_cents, 0) + coalesce(refund_cents, 0))"
    priced = "(" + " + ".join(f"price_n_{t}" for t in EVENT_TYPES) + " > 0)"
    first_order = "least(first_order_ms, b_first_order_ms)"
    last_order = "greatest(last_order_ms, b_last_order_ms)"
    n_sessions = "(coalesce(sessions_n, 0) + coalesce(b_sessions_n, 0))"
    v2c_n, c2p_n = "(coalesce(v2c_n, 0) + coalesce(b_v2c_n, 0))", "(coalesce(c2p_n, 0) + coalesce(b_c2p_n, 0))"
    cols |= {
        FIRST_SEEN_AT: first_seen,
        LAST_SEEN_AT: last_seen,
        HOURS_SINCE_LAST_EVENT: f"({e} - {last_seen}) {hours}",
        HOURS_SINCE_LAST_CART: f"({e} - last_{CART}_ms) {hours}",
        HOURS_SINCE_LAST_PURCHASE: f"({e} - last_{PURCHASE}_ms) {hours}",
        FREQUENCY_ORDERS: n_orders,
        MONETARY_TOTAL: f"CASE WHEN {priced} THEN {cents} / 100.0 END",
        AVG_ORDER_VALUE: f"CASE WHEN {priced} AND {n_orders} > 0 THEN round({cents} / {n_orders}) / 100.0 END",
        MAX_ORDER_VALUE: f"CASE WHEN {priced} THEN greatest(orders_max_cents, b_orders_max_cents) / 100.0 END",
        RECENCY_HOURS: f"({e} - last_{PURCHASE}_ms) {hours}",
        MEAN_HOURS_BETWEEN_ORDERS: f"CASE WHEN {n_orders} > 1 THEN ({last_order} - {first_order}) {hours} / ({n_orders} - 1) END",
        MEAN_VIEW_TO_CART_HOURS: f"CASE WHEN {v2c_n} > 0 THEN (coalesce(v2c_ms, 0) + coalesce(b_v2c_ms, 0)) {hours} / {v2c_n} END",
        MEAN_CART_TO_PURCHASE_HOURS: f"CASE WHEN {c2p_n} > 0 THEN (coalesce(c2p_ms, 0) + coalesce(b_c2p_ms, 0)) {hours} / {c2p_n} END",
        SESSION_COUNT: n_sessions,
        MEAN_SESSION_MINUTES: f"CASE WHEN {n_sessions} > 0 THEN (coalesce(sessions_ms, 0) + coalesce(b_sessions_ms, 0)) / 60000.0 / {n_sessions} END",
        EVENTS_PER_SESSION: f"CASE WHEN {n_sessions} > 0 THEN (coalesce(sessions_events, 0) + coalesce(b_sessions_events, 0)) / {n_sessions} END",
        CART_VIEW_RATE: f"CASE WHEN n_{VIEW} > 0 THEN n_{CART} / n_{VIEW} END",
        PURCHASE_VIEW_RATE: f"CASE WHEN n_{VIEW} > 0 THEN n_{PURCHASE} / n_{VIEW} END",
        OPEN_CART_ITEMS: "coalesce(open_items, 0)",
        OPEN_CART_VALUE: f"CASE WHEN {priced} THEN coalesce(open_cents, 0) / 100.0 END",
        **{c: f"top_{i}" for i, c in enumerate(TOP_CATEGORIES, 1)},
        **{c: f"top_{i}_score" for i, c in enumerate(TOP_CATEGORY_SCORES, 1)},
        DISTINCT_CATEGORIES: "coalesce(n_categories, 0)",
        MEAN_PRICE_VIEWED: f"CASE WHEN price_n_{VIEW} > 0 THEN round(price_cents_{VIEW} / price_n_{VIEW}) / 100.0 END",
        MEAN_PRICE_PURCHASED: f"CASE WHEN price_n_{PURCHASE} > 0 THEN round(price_cents_{PURCHASE} / price_n_{PURCHASE}) / 100.0 END",
        PEAK_HOUR_LOCAL: "peak_hour",
        LIFECYCLE_STAGE: f"""CASE
            WHEN {last_seen} < {e - int(CHURNED_AFTER.total_seconds() * 1000)} THEN '{LIFECYCLE_CHURNED}'
            WHEN {last_seen} < {e - int(DORMANT_AFTER.total_seconds() * 1000)} THEN '{LIFECYCLE_DORMANT}'
            WHEN {first_seen} >= {e - int(NEW_USER_AGE.total_seconds() * 1000)} THEN '{LIFECYCLE_NEW}'
            ELSE '{LIFECYCLE_ACTIVE}' END""",
    }
    funnel_ctes, funnel_cols = _funnel_sql(e)
    cols |= funnel_cols
    select = ",\n".join(f"{expr} AS {name}" for name, expr in cols.items())
    top = ", ".join(
        f"max(category_id) FILTER (WHERE rank = {i}) AS top_{i}, max(affinity) FILTER (WHERE rank = {i}) AS top_{i}_score"
        for i in range(1, len(TOP_CATEGORIES) + 1)
    )
    return f"""
        WITH ue AS (SELECT user_id, {", ".join(per_type)} FROM s_user_events GROUP BY user_id),
        win AS (SELECT user_id, {", ".join(windows)} FROM s_hourly GROUP BY user_id),
        oc AS (SELECT user_id, count(*) AS open_items, sum(cart_cents) AS open_cents FROM s_carts
               WHERE cart_ms >= {e - ttl} AND (closed_ms IS NULL OR closed_ms < cart_ms) GROUP BY user_id),
        tc AS (SELECT user_id, {top} FROM (
                 SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY affinity DESC, category_id) AS rank
                 FROM interests) WHERE rank <= {len(TOP_CATEGORIES)} GROUP BY user_id),
        dc AS (SELECT user_id, count(*) AS n_categories FROM affinities GROUP BY user_id),
        pk AS (SELECT user_id, arg_max(hour_of_day, n * 24 + (23 - hour_of_day)) AS peak_hour
               FROM s_hours_of_day GROUP BY user_id),
        {", ".join(f"{name} AS ({sql})" for name, sql in funnel_ctes.items())}
        SELECT {select}
        FROM ue LEFT JOIN s_users USING (user_id)
        LEFT JOIN win USING (user_id) LEFT JOIN s_buffered USING (user_id)
        LEFT JOIN oc USING (user_id) LEFT JOIN tc USING (user_id)
        LEFT JOIN dc USING (user_id) LEFT JOIN pk USING (user_id)
        {" ".join(f"LEFT JOIN {name} USING (user_id)" for name in funnel_ctes)}
        ORDER BY ue.user_id
    """


def rebuild(events: pa.Table, end: datetime, settings: Settings) -> ProfileState:
    """The state as of ``end`` from all staged events at once (replay, verification, retention restarts).

    Uses exactly the merge and pruning rules of the incremental path, in one pass over
    all events: the result equals any chain of ``advance`` calls over the same events.
    """
    return advance(empty_state(), events, end, settings)


# ---- population features and change log -----------------------------------------------
def add_population_features(profiles: pa.Table) -> pa.Table:
    """Add RFM scores and segment over the whole population; return ``PROFILE_COLUMNS`` in order.

    Scores are 1-5 quintiles among the n users with at least one order (the monetary
    score among those whose spend is known): users are ranked by the value, ties broken
    by a stable hash of ``user_id`` salted with the score's column (``md5_number``), and the user at rank k (1..n)
    scores ``1 + floor(5 (k - 1/2) / n)``. Every score is reached once there are 5 buyers,
    even when most of them tie (55% of a shop's customers with one order); a better
    value never scores lower; a lone buyer scores 3. Nothing depends on row order or
    float noise (money is in cents, recency in exact hours). Users without orders get
    null scores and the segment ``no_orders``.
    """
    base = profiles.select([c for c in SNAPSHOT_SCHEMA.names])
    champions, loyal, potential, new_customer, at_risk, hibernating, lost, no_orders = RFM_SEGMENTS

    def score(value: str, order: str = "") -> str:
        # centred rank over the buyers, ties broken by a stable hash of the user salted per
        # score (one hash for all three would tie low F to low R: correlated scores)
        rank = f"row_number() OVER (ORDER BY {value} {order}, md5_number('{value}:' || user_id), user_id)"
        return f"CAST(least(5, 1 + floor(5 * ({rank} - 0.5) / count(*) OVER ())) AS TINYINT)"

    con = _connect()
    try:
        con.register("p", base)
        table = con.sql(
            f"""
            WITH s AS (
                SELECT user_id, {score(RECENCY_HOURS, "DESC")} AS r, {score(FREQUENCY_ORDERS)} AS f
                FROM p WHERE {FREQUENCY_ORDERS} >= 1
            ), sm AS (
                SELECT user_id, {score(MONETARY_TOTAL)} AS m
                FROM p WHERE {FREQUENCY_ORDERS} >= 1 AND {MONETARY_TOTAL} IS NOT NULL
            )
            SELECT p.*, r AS {RFM_R}, f AS {RFM_F}, m AS {RFM_M},
                   CASE WHEN r IS NULL THEN '{no_orders}'
                        WHEN r >= 4 AND f >= 4 THEN '{champions}'
                        WHEN r >= 3 AND f >= 3 THEN '{loyal}'
                        WHEN r >= 4 AND f <= 1 THEN '{new_customer}'
                        WHEN r >= 3 THEN '{potential}'
                        WHEN f >= 3 THEN '{at_risk}'
                        WHEN r = 2 THEN '{hibernating}'
                        ELSE '{lost}' END AS {RFM_SEGMENT}
            FROM p LEFT JOIN s USING (user_id) LEFT JOIN sm USING (user_id) ORDER BY user_id
            """
        ).to_arrow_table()
    finally:
        con.close()
    return table.select(PROFILE_SCHEMA.names).cast(PROFILE_SCHEMA)


def profile_changes(previous: pa.Table | None, current: pa.Table) -> pa.Table:
    """Every user whose lifecycle stage, RFM segment or top interest changed since ``previous``.

    One row per such user with the value before and after of each tracked column
    (``CHANGE_TRACKED``) and ``changed``, the tracked columns that differ. ``change`` is
    ``new`` (not in ``previous``: before is null), ``removed`` (not in ``current``, e.g.
    erased: after is null) or ``updated``. Nulls compare as values (a first top interest
    is a change). With no previous snapshot every user is new. Sorted by ``user_id``.
    """
    prev = current.select([USER_ID, *CHANGE_TRACKED]).schema.empty_table() if previous is None else previous
    con = _connect()
    try:
        con.register("p", prev.select([USER_ID, *CHANGE_TRACKED]))
        con.register("c", current.select([USER_ID, *CHANGE_TRACKED]))
        diffs = ", ".join(f"CASE WHEN p.{c} IS DISTINCT FROM c.{c} THEN '{c}' END" for c in CHANGE_TRACKED)
        values = ", ".join(f"p.{c} AS {before_column(c)}, c.{c} AS {after_column(c)}" for c in CHANGE_TRACKED)
        table = con.sql(
            f"""
            SELECT * FROM (
                SELECT coalesce(c.user_id, p.user_id) AS user_id,
                       CASE WHEN p.user_id IS NULL THEN '{CHANGE_NEW}' WHEN c.user_id IS NULL THEN '{CHANGE_REMOVED}'
                            ELSE '{CHANGE_UPDATED}' END AS change,
                       list_filter([{diffs}], lambda x: x IS NOT NULL) AS {CHANGED},
                       {values}
                FROM p FULL OUTER JOIN c ON p.user_id = c.user_id
            ) WHERE change <> '{CHANGE_UPDATED}' OR len({CHANGED}) > 0
            ORDER BY user_id
            """
        ).to_arrow_table()
    finally:
        con.close()
    return table.select(CHANGES_SCHEMA.names).cast(CHANGES_SCHEMA)


def change_counts(changes: pa.Table) -> dict[str, int]:
    """What the run report counts: users in the change log, by kind and by tracked column."""
    counts = {"users": changes.num_rows, CHANGE_NEW: 0, CHANGE_REMOVED: 0} | dict.fromkeys(CHANGE_TRACKED, 0)
    counts |= _value_counts(changes.column("change"))
    counts.pop(CHANGE_UPDATED, None)
    return counts | _value_counts(pc.list_flatten(changes.column(CHANGED)))


# ---- lake stages ----------------------------------------------------------------------------
def _read_state(lake: Lake, hour: datetime, bucket: int) -> ProfileState:
    """The committed state checkpoint of ``hour`` and ``bucket``, in the current layout.

    States written before the session buffer held one row per session (it held one
    ``ts_ms`` row per event) are converted on reading: grouping the points gives the
    sessions the current layout stores.
    """
    base = lake.partition(STATE, hour, bucket)
    tables = {
        name: lake.read_named(STATE, hour, name, bucket)
        if name not in ADDED_STATE_TABLES or (base / f"{name}.parquet").is_file()
        else STATE_SCHEMAS[name].empty_table()
        for name in STATE_TABLES
    }
    for name, defaults in _ADDED_STATE_COLUMNS.items():
        for column, value in defaults.items():
            if column not in tables[name].column_names:
                kind = STATE_SCHEMAS[name].field(column).type
                tables[name] = (
                    tables[name]
                    .append_column(column, pa.array([value] * tables[name].num_rows, kind))
                    .select(STATE_SCHEMAS[name].names)
                )
    points = tables[SESSIONS]
    if "ts_ms" in points.column_names:
        con = _connect()
        try:
            con.register("points", points)
            gap = int(SESSION_GAP.total_seconds() * 1000)
            as_points = "SELECT user_id, ts_ms AS first_ms, ts_ms AS last_ms, 1 AS n FROM points"
            tables[SESSIONS] = _fetch(
                con,
                f"SELECT user_id, grp_first AS first_ms, grp_last AS last_ms, n "
                f"FROM ({_interval_groups(as_points, gap)}) ORDER BY user_id, first_ms",
                STATE_SCHEMAS[SESSIONS],
            )
        finally:
            con.close()
    return ProfileState(tables)


def upgrade_state(lake: Lake, hour: datetime, bucket: int) -> bool:
    """Rewrite the committed state of ``hour`` and ``bucket`` in the current layout; whether it was older.

    Reading converts older layouts anyway (``_read_state``); rewriting once saves that
    conversion on every later read of the same checkpoint (benchmarks reuse one).
    """
    if "ts_ms" not in lake.read_named(STATE, hour, SESSIONS, bucket).column_names:
        return False
    state = _read_state(lake, hour, bucket)
    lake.write_partition(STATE, hour, state.tables, bucket=bucket, run_id="upgrade", dictionary=_STATE_DICTIONARY)
    return True


def _load_state(lake: Lake, hour: datetime, bucket: int, first_hour: datetime | None) -> ProfileState:
    """The state of the hour before ``hour``, or an empty one when ``hour`` is the first hour."""
    previous = hour - HOUR
    if lake.committed(STATE, previous, bucket):
        return _read_state(lake, previous, bucket)
    if first_hour is not None and floor_hour(first_hour) == hour:
        return empty_state()
    raise MissingStateError(
        f"state of hour {format_hour(previous)} bucket {bucket} is missing in {lake.partition(STATE, previous, bucket)}; "
        f"process {format_hour(previous)} first (or start at the first hour {format_hour(first_hour) if first_hour else 'unset'})"
    )


# Parquet dictionary encoding only where values repeat (user and item ids do not).
_STATE_DICTIONARY = ["event_type"]
_PROFILE_DICTIONARY = [*TOP_CATEGORIES, RFM_SEGMENT, LIFECYCLE_STAGE]


def _write_hour(
    lake: Lake, state: ProfileState, hour: datetime, bucket: int, settings: Settings, run_id: str
) -> dict[str, int]:
    """Write profiles, interests and (last, since the next hour builds on it) the state of ``hour``."""
    profiles, interests = snapshot(state, hour + HOUR, settings)
    # A rebuilt bucket invalidates a published snapshot of this hour until publish_profiles runs again.
    (lake.partition(PROFILES, hour) / MANIFEST).unlink(missing_ok=True)
    lake.write_partition(PROFILES, hour, profiles, bucket=bucket, run_id=run_id, dictionary=_PROFILE_DICTIONARY)
    lake.write_partition(INTERESTS, hour, interests, bucket=bucket, run_id=run_id, dictionary=[CATEGORY_ID])
    lake.write_partition(STATE, hour, state.tables, bucket=bucket, run_id=run_id, dictionary=_STATE_DICTIONARY)
    return {"users": profiles.num_rows, "interests": interests.num_rows}


def _merge_counts(
    events: pa.Table, before: ProfileState, after: ProfileState, horizon: datetime | None
) -> dict[str, int]:
    """How many events were merged, are held back, and arrived later than the lateness window allows."""
    late = 0
    if horizon is not None and events.num_rows:
        late = int(pc.sum(pc.less(events.column("ts"), pa.scalar(horizon, _TS))).as_py() or 0)
    held_back = after.tables[PENDING].num_rows
    return {
        "events_read": events.num_rows,
        "events_merged": events.num_rows + before.tables[PENDING].num_rows - held_back,
        "held_back": held_back,
        "late_beyond_window": late,
    }


def _horizon(state: ProfileState, settings: Settings) -> datetime | None:
    return None if state.end is None else state.end - timedelta(hours=settings.lateness_hours)


def build_profiles(
    settings: Settings, hour: datetime, bucket: int, *, run_id: str = "manual", first_hour: datetime | None = None
) -> dict[str, Any]:
    """Build hour H of one bucket: merge its staged events into the state of H-1 and write state/profiles/interests.

    The state of H-1 must exist unless H is the first hour (``first_hour``, default
    ``settings.start``); otherwise this raises ``MissingStateError`` naming the hour
    and bucket, so no hour is ever built on an older state.
    """
    hour = floor_hour(hour)
    lake = Lake(settings.lake)
    state = _load_state(lake, hour, bucket, first_hour or settings.start)
    events = lake.read(STAGING, hour, bucket)
    new_state = advance(state, events, hour + HOUR, settings)
    written = _write_hour(lake, new_state, hour, bucket, settings, run_id)
    faults.maybe_fail(faults.BETWEEN_BUILD_BUCKETS)
    counts = _merge_counts(events, state, new_state, _horizon(state, settings))
    return {"hour": format_hour(hour), "bucket": bucket, "run_id": run_id, **written, **counts}


def build_profiles_range(
    settings: Settings,
    first: datetime,
    last: datetime,
    bucket: int,
    *,
    run_id: str = "manual",
    first_hour: datetime | None = None,
    snapshot_every: int = 24,
) -> dict[str, Any]:
    """Build hours ``first..last`` of one bucket in a few big merges (the warm-up path).

    Reads every staged hour in one DuckDB pass, advances the state from checkpoint to
    checkpoint and writes state/profiles/interests only at checkpoints: hours whose end
    is a multiple of ``snapshot_every`` hours (UTC epoch) and ``last``. Each checkpoint
    equals what hourly ``build_profiles`` would have written.
    """
    if snapshot_every < 1:
        raise ValueError(f"snapshot_every must be >= 1, got {snapshot_every}")
    first, last = floor_hour(first), floor_hour(last)
    if last < first:
        raise ValueError(f"last hour {format_hour(last)} is before first hour {format_hour(first)}")
    lake = Lake(settings.lake)
    state = _load_state(lake, first, bucket, first_hour or settings.start)
    hours = list(hour_range(first, last))
    staged = _read_staged(lake, hours, bucket, settings.business_tz)
    staged_hour = staged.column("staged_hour")

    checkpoints = [h for h in hours if (_epoch_hour(h) + 1) % snapshot_every == 0 or h == last]
    totals = {"events_read": 0, "events_merged": 0, "held_back": 0, "late_beyond_window": 0}
    written: dict[str, int] = {}
    batch_start = _epoch_hour(first)
    for checkpoint in checkpoints:
        mask = pc.and_(pc.greater_equal(staged_hour, batch_start), pc.less_equal(staged_hour, _epoch_hour(checkpoint)))
        batch = staged.filter(mask).select(STAGED_SCHEMA.names).cast(STAGED_SCHEMA)
        batch_start = _epoch_hour(checkpoint) + 1
        new_state = advance(state, batch, checkpoint + HOUR, settings)
        counts = _merge_counts(batch, state, new_state, _horizon(state, settings))
        for key in ("events_read", "events_merged", "late_beyond_window"):
            totals[key] += counts[key]
        totals["held_back"] = counts["held_back"]
        written = _write_hour(lake, new_state, checkpoint, bucket, settings, run_id)
        state = new_state
    return {
        "first": format_hour(first),
        "last": format_hour(last),
        "bucket": bucket,
        "run_id": run_id,
        "hours": len(hours),
        "checkpoints": [format_hour(c) for c in checkpoints],
        **written,
        **totals,
    }


def _epoch_hour(hour: datetime) -> int:
    return int(hour.timestamp()) // 3600


def _read_staged(
    lake: Lake, hours: list[datetime], bucket: int, business_tz: str, users: pa.Array | None = None
) -> pa.Table:
    """The staged events of ``hours`` of one bucket in one DuckDB pass, with ``staged_hour`` (epoch hours).

    Files staged before ``local_hour`` existed get it in ``business_tz`` (``with_local_hour``).
    ``users``: only the events of these users (the filter runs in the scan).
    """
    import pyarrow.parquet as pq

    files = [str(f) for h in hours for f in lake.data_files(STAGING, h, bucket)]
    if not files:
        return STAGED_SCHEMA.append(pa.field("staged_hour", pa.int64())).empty_table()
    current = [f for f in files if LOCAL_HOUR in pq.read_schema(f).names]
    older = [f for f in files if f not in set(current)]
    ZoneInfo(business_tz)  # an unknown zone fails before it reaches SQL
    con = _connect()
    try:
        where = ""
        if users is not None:
            con.register("wanted_users", pa.table({USER_ID: pa.array(users, pa.string())}))
            where = f" WHERE s.user_id IN (SELECT {USER_ID} FROM wanted_users)"
        selects = []
        for group, local_hour in ((current, f"s.{LOCAL_HOUR}"), (older, f"hour(timezone('{business_tz}', s.ts))")):
            if not group:
                continue
            file_list = ", ".join("'" + f.replace("'", "''") + "'" for f in group)
            # The staged hour comes from the Hive keys of each file's path (dt=/hour=): a per-file
            # constant, several times cheaper than joining a filename column on every row.
            columns = ", ".join(f"s.{n}" for n in STAGED_SCHEMA.names if n != LOCAL_HOUR)
            selects.append(
                f"SELECT {columns}, CAST({local_hour} AS TINYINT) AS {LOCAL_HOUR}, "
                "CAST(epoch(s.dt) // 3600 + s.hour AS BIGINT) AS staged_hour "
                f"FROM read_parquet([{file_list}], hive_partitioning = true, "
                "hive_types = {'dt': DATE, 'hour': INTEGER}) s" + where
            )
        return con.sql(" UNION ALL ".join(selects)).to_arrow_table()
    finally:
        con.close()


def staged_hours(lake: Lake, bucket: int, layer: str = STAGING) -> list[datetime]:
    """Every hour with a committed partition of ``bucket`` in ``layer`` (staging by default), in order."""
    found = []
    for manifest in lake.path(layer).glob(f"dt=*/hour=*/bucket={bucket}/{MANIFEST}"):
        hour_dir = manifest.parent.parent
        found.append(parse_hour(f"{hour_dir.parent.name.removeprefix('dt=')}T{hour_dir.name.removeprefix('hour=')}"))
    return sorted(found)


def _rebuild_start(lake: Lake, hour: datetime, bucket: int) -> tuple[list[datetime], ProfileState]:
    """The staged hours a rebuild of ``hour`` reads (oldest first) and the state it starts from.

    The oldest staged hour S the lake still holds starts it: from the state checkpoint of
    S-1 when retention kept one, else from an empty state. ``FileNotFoundError`` when
    nothing is staged at or before ``hour`` or staging has a gap (naming the first
    missing hour).
    """
    staged = [h for h in staged_hours(lake, bucket) if h <= hour]
    if not staged:
        raise FileNotFoundError(f"no staged hour at or before {format_hour(hour)} in bucket {bucket}")
    first = staged[0]
    hours = list(hour_range(first, hour))
    missing = sorted(set(hours) - set(staged))
    if missing:
        raise FileNotFoundError(
            f"staged hour {format_hour(missing[0])} bucket {bucket} is missing: cannot rebuild "
            f"{format_hour(hour)} from {format_hour(first)}"
        )
    start = _read_state(lake, first - HOUR, bucket) if lake.committed(STATE, first - HOUR, bucket) else empty_state()
    return hours, start


def rebuild_bucket(settings: Settings, hour: datetime, bucket: int) -> tuple[datetime, ProfileState]:
    """The state of one bucket as of the end of ``hour`` rebuilt from staged events (the rebuild path).

    Starts from the oldest staged hour S the lake still holds: from the state checkpoint
    of S-1 when retention kept one (older hours were deleted), else from an empty state
    (S is the lake's first hour); then merges every staged hour S..``hour`` in one
    ``advance``. Returns S and the state. Nothing is read from the states after S-1, so
    the result is independent of how the committed hours were built. Raises
    ``FileNotFoundError`` naming the first missing staged hour when staging has a gap.
    """
    hour = floor_hour(hour)
    lake = Lake(settings.lake)
    hours, start = _rebuild_start(lake, hour, bucket)
    events = _read_staged(lake, hours, bucket, settings.business_tz).select(STAGED_SCHEMA.names).cast(STAGED_SCHEMA)
    return hours[0], advance(start, events, hour + HOUR, settings)


def _users_only(state: ProfileState, users: pa.Array) -> ProfileState:
    """``state`` restricted to ``users`` (every state table but ``meta`` is per user)."""
    return ProfileState(
        {
            name: table if name == META else table.filter(pc.is_in(table.column(USER_ID), value_set=users))
            for name, table in state.tables.items()
        }
    )


def rebuild_before_cutoffs(
    settings: Settings, hours: list[datetime], bucket: int, users: pa.Array
) -> dict[datetime, pa.Table]:
    """Per-bucket profiles of ``users`` in the snapshots of ``hours``, rebuilt with every later event deleted.

    The cutoff of the snapshot of hour S is its end E = S + 1h in event time and S itself in
    arrival time (the hourly path has read staging up to S): the rebuild reads the staged
    hours up to S only, deletes every event with ``ts >= E`` (the held-back ones too) and
    merges the rest in one ``advance`` from the start ``rebuild_bucket`` uses. A snapshot
    whose features differ from this one depends on something after its cutoff. Per-user
    features depend on the user's own events only, so a sample of users is rebuilt alone;
    staging is scanned once for every hour. Returns ``{hour: profiles}`` (``SNAPSHOT_SCHEMA``).
    """
    lake = Lake(settings.lake)
    wanted = sorted({floor_hour(h) for h in hours})
    if not wanted:
        return {}
    users = pa.array(users, pa.string())
    staged_range, start = _rebuild_start(lake, wanted[-1], bucket)
    first = staged_range[0]
    if wanted[0] < first:
        raise FileNotFoundError(
            f"snapshot {format_hour(wanted[0])} is older than the oldest staged hour {format_hour(first)} "
            f"of bucket {bucket}: its events are no longer staged"
        )
    start = _users_only(start, users)
    staged = _read_staged(lake, staged_range, bucket, settings.business_tz, users)
    staged = staged.select([*STAGED_SCHEMA.names, "staged_hour"]).cast(
        STAGED_SCHEMA.append(staged.schema.field("staged_hour"))
    )
    out: dict[datetime, pa.Table] = {}
    for hour in wanted:
        end = hour + HOUR
        before = pc.and_(
            pc.less_equal(staged.column("staged_hour"), _epoch_hour(hour)),
            pc.less(staged.column("ts"), pa.scalar(end, _TS)),
        )
        events = staged.filter(before).select(STAGED_SCHEMA.names)
        pending = start.tables[PENDING]
        begin = ProfileState(
            {**start.tables, PENDING: pending.filter(pc.less(pending.column("ts"), pa.scalar(end, _TS)))}
        )
        out[hour] = snapshot(advance(begin, events, end, settings), end, settings)[0]
    return out


def reproducible_hours(settings: Settings, bucket: int) -> dict[datetime, datetime]:
    """Every hour whose snapshot of ``bucket`` the lake can rebuild, with the hour P it starts after.

    The rebuild of hour H merges the staged hours P+1..H into the state of P: the newest
    committed state checkpoint P < H after which every hour up to H is staged, or, with no
    such checkpoint, the hour before the oldest staged one (an empty state when it has no
    checkpoint: the lake's first hours, the rule of ``rebuild_bucket``). A gap in staging
    (retention, a lost partition) makes the hours after it unreproducible until the next
    checkpoint.
    """
    lake = Lake(settings.lake)
    staged = staged_hours(lake, bucket)
    if not staged:
        return {}
    checkpoints = set(staged_hours(lake, bucket, STATE))
    present = set(staged)
    out: dict[datetime, datetime] = {}
    start: datetime | None = staged[0] - HOUR
    for hour in hour_range(staged[0], staged[-1]):
        if hour - HOUR in checkpoints:
            start = hour - HOUR
        if hour not in present:
            start = None
        elif start is not None:
            out[hour] = start
    return out


def profiles_at(
    settings: Settings,
    hours: list[datetime],
    bucket: int,
    pick: Callable[[datetime, pa.Array], pa.Array],
) -> dict[datetime, pa.Table]:
    """Per-bucket profiles at ``hours`` as the hourly path builds them, whether or not they were committed.

    Hour H starts from the state of P (``reproducible_hours``: a checkpoint or an empty
    state) and merges the staged hours P+1..H in one ``advance`` to H+1, which is what
    ``build_profiles_range`` does between checkpoints: the state depends on the merged events
    and the end only, so the snapshot equals the hourly one. ``pick(H, users)`` gets the
    users the snapshot of H has (those of the state of P and of the events due by H+1) and
    returns the ones to rebuild. Every user with an order is rebuilt as well: RFM ranks all
    buyers, so ``population_snapshot`` over every bucket's result gives the picked users the
    RFM of the whole snapshot; per-user features depend on the user's own events only.
    Staging is read once per starting hour. ``FileNotFoundError`` names an hour that cannot
    be rebuilt. Returns ``{hour: profiles}`` (``SNAPSHOT_SCHEMA``; picked users and buyers).
    """
    lake = Lake(settings.lake)
    starts = reproducible_hours(settings, bucket)
    wanted = sorted({floor_hour(h) for h in hours})
    missing = [h for h in wanted if h not in starts]
    if missing:
        raise FileNotFoundError(
            f"snapshot {format_hour(missing[0])} of bucket {bucket} cannot be rebuilt: no state checkpoint "
            "before it is followed by every staged hour up to it"
        )
    groups: dict[datetime, list[datetime]] = {}
    for hour in wanted:
        groups.setdefault(starts[hour], []).append(hour)
    out: dict[datetime, pa.Table] = {}
    for start_hour, group in groups.items():
        state = _read_state(lake, start_hour, bucket) if lake.committed(STATE, start_hour, bucket) else empty_state()
        staged = _read_staged(lake, list(hour_range(start_hour + HOUR, group[-1])), bucket, settings.business_tz)
        staged_hour = staged.column("staged_hour")
        staged = staged.select(STAGED_SCHEMA.names).cast(STAGED_SCHEMA)
        pending = _staged(state.tables[PENDING], settings.business_tz)  # an older state's buffer too
        users = state.tables[USERS]
        buyers_before = pa.concat_arrays(
            [
                users.filter(pc.greater(users.column("orders_n"), 0)).column(USER_ID).combine_chunks(),
                state.tables[ORDERS].column(USER_ID).combine_chunks(),
            ]
        )
        for hour in group:
            end = pa.scalar(hour + HOUR, _TS)
            events = staged.filter(pc.less_equal(staged_hour, _epoch_hour(hour)))
            due = pa.concat_tables([pending, events]).filter(pc.less(pc.field("ts"), end))
            present = pc.unique(
                pa.concat_arrays(
                    [state.tables[USER_EVENTS].column(USER_ID).combine_chunks(), due.column(USER_ID).combine_chunks()]
                )
            )
            bought = due.filter(pc.equal(pc.field("event_type"), PURCHASE)).column(USER_ID).combine_chunks()
            chosen = pc.unique(pa.concat_arrays([pa.array(pick(hour, present), pa.string()), buyers_before, bought]))
            begin = _users_only(state, chosen)
            merged = advance(
                begin, events.filter(pc.is_in(events.column(USER_ID), value_set=chosen)), hour + HOUR, settings
            )
            out[hour] = snapshot(merged, hour + HOUR, settings)[0]
    return out


def snapshot_committed(settings: Settings, hour: datetime) -> bool:
    """Whether the published snapshot of ``hour`` exists (its hour-level manifest is written)."""
    return (Lake(settings.lake).partition(PROFILES, hour) / MANIFEST).is_file()


def _previous_snapshot(lake: Lake, settings: Settings, hour: datetime) -> datetime | None:
    """The snapshot the change log compares against: H-1, else the one H was first compared with, else ``current``."""
    if snapshot_committed(settings, hour - HOUR):
        return hour - HOUR
    candidates = []
    marker = lake.partition(PROFILES, hour) / MANIFEST
    if marker.is_file():
        candidates.append(read_json(marker).get("previous_hour"))
    pointer = lake.path(PROFILES, "current")
    if pointer.is_file():
        candidates.append(read_json(pointer).get("hour"))
    for text in candidates:
        if text and parse_hour(text) < hour and snapshot_committed(settings, parse_hour(text)):
            return parse_hour(text)
    return None


def population_snapshot(bucket_profiles: list[pa.Table], hour: datetime) -> pa.Table:
    """The whole snapshot of ``hour`` from its per-bucket profiles: uniqueness check, then RFM.

    Raises ``ValueError`` counting duplicated users (a user in two buckets); it does not
    name them, since the message reaches task logs, which must hold no raw user id.
    """
    combined = pa.concat_tables([t.select(SNAPSHOT_SCHEMA.names).cast(SNAPSHOT_SCHEMA) for t in bucket_profiles])
    if pc.count_distinct(combined.column(USER_ID)).as_py() != combined.num_rows:
        counts = combined.group_by(USER_ID).aggregate([(USER_ID, "count")])
        dupes = counts.filter(pc.greater(counts.column(f"{USER_ID}_count"), 1)).num_rows
        raise ValueError(
            f"user_id not unique in snapshot {format_hour(hour)}: {dupes} user(s) in more than one bucket "
            "(ids not logged; find them in the hour's profiles/ partitions)"
        )
    return add_population_features(combined)


def publish_profiles(settings: Settings, hour: datetime, *, run_id: str = "manual") -> dict[str, Any]:
    """Commit the snapshot of ``hour``: population features, uniqueness check, change log, markers.

    Reads every bucket's profiles, adds RFM, rewrites each bucket partition, then writes
    the hour-level ``_manifest.json`` (the snapshot's commit point), the change log and
    the ``profiles/current`` pointer (moved forward only).
    """
    hour = floor_hour(hour)
    lake = Lake(settings.lake)
    marker = lake.partition(PROFILES, hour) / MANIFEST
    previous_hour = _previous_snapshot(lake, settings, hour)
    parts = []
    for bucket in range(settings.buckets):
        if not lake.committed(PROFILES, hour, bucket):
            raise FileNotFoundError(f"profiles of hour {format_hour(hour)} bucket {bucket} are not built")
        parts.append(lake.read(PROFILES, hour, bucket))
    full = population_snapshot(parts, hour)
    from profile_engine.quality import validate_profiles  # imports Great Expectations when called

    validate_profiles(full, hour)  # raises ProfileValidationError naming the failed expectation

    marker.unlink(missing_ok=True)  # uncommitted while buckets are rewritten
    bucket_of_part = pa.array([b for b, part in enumerate(parts) for _ in range(part.num_rows)], pa.int32())
    users_of_part = pa.chunked_array([part.column(USER_ID) for part in parts], pa.string())
    buckets_of_rows = pc.take(bucket_of_part, pc.index_in(full.column(USER_ID), value_set=users_of_part))
    for bucket in range(settings.buckets):
        lake.write_partition(
            PROFILES,
            hour,
            full.filter(pc.equal(buckets_of_rows, bucket)),
            bucket=bucket,
            run_id=run_id,
            dictionary=_PROFILE_DICTIONARY,
        )

    # The change log compares the tracked columns only: reading the whole previous snapshot cost seconds.
    tracked = [USER_ID, *CHANGE_TRACKED]
    previous = lake.read(PROFILES, previous_hour, columns=tracked) if previous_hour is not None else None
    changes = profile_changes(previous, full)
    lake.write_partition(
        PROFILE_CHANGES,
        hour,
        changes,
        run_id=run_id,
        extra={"previous_hour": format_hour(previous_hour) if previous_hour else None},
    )
    counted = change_counts(changes)
    summary: dict[str, Any] = {
        "hour": format_hour(hour),
        "run_id": run_id,
        "buckets": settings.buckets,
        "profiles": full.num_rows,
        "new_users": counted[CHANGE_NEW],
        "profile_changes": counted,
        "previous_hour": format_hour(previous_hour) if previous_hour else None,
        "lifecycle": _value_counts(full.column(LIFECYCLE_STAGE)),
        "rfm_segments": _value_counts(full.column(RFM_SEGMENT)),
    }
    write_json(
        marker,
        {**summary, "layer": PROFILES, "data_hour": format_hour(hour), "written_at": datetime.now(UTC).isoformat()},
    )
    pointer = lake.path(PROFILES, "current")
    current = read_json(pointer).get("hour") if pointer.is_file() else None
    if current is None or parse_hour(current) <= hour:
        write_json(pointer, {"hour": format_hour(hour), "run_id": run_id, "profiles": full.num_rows})
    return summary


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(column)
    return {str(v.as_py()): int(n.as_py()) for v, n in zip(counts.field("values"), counts.field("counts"), strict=True)}
