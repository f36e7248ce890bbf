"""Column names and schemas of profile snapshots, interests and profile changes (docs/features.md)."""

from __future__ import annotations

import pyarrow as pa

from profile_engine.contracts.events import CART, EVENT_TYPES, FAV
from profile_engine.contracts.traits import Trait, trait_fields

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

TIMESTAMP = pa.timestamp("ms", tz="UTC")  # every moment in a profile (UTC, milliseconds)
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
_PROFILE_FIELDS: list[tuple[str, pa.DataType]] = [(USER_ID, pa.string()), (SNAPSHOT_HOUR, TIMESTAMP)]
for _t in EVENT_TYPES:
    _PROFILE_FIELDS += [(count_column(_t, "lifetime"), pa.int64())]
    _PROFILE_FIELDS += [(count_column(_t, w), pa.int64()) for w, _ in WINDOWS]
    _PROFILE_FIELDS += [(decayed_column(_t, h), pa.float64()) for h, _ in HALF_LIVES]
    _PROFILE_FIELDS += [(first_at_column(_t), TIMESTAMP), (last_at_column(_t), TIMESTAMP)]
_PROFILE_FIELDS += [
    (FIRST_SEEN_AT, TIMESTAMP),
    (LAST_SEEN_AT, TIMESTAMP),
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


def profile_schema(traits: tuple[Trait, ...]) -> pa.Schema:
    """``PROFILE_SCHEMA`` with the columns of the loaded declared traits appended (``contracts.traits``)."""
    return pa.schema([*PROFILE_SCHEMA, *(pa.field(n, t) for n, t in trait_fields(traits))])


def snapshot_schema(traits: tuple[Trait, ...]) -> pa.Schema:
    """``SNAPSHOT_SCHEMA`` with the columns of the loaded declared traits appended: what ``snapshot`` produces."""
    return pa.schema([*SNAPSHOT_SCHEMA, *(pa.field(n, t) for n, t in trait_fields(traits))])


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
