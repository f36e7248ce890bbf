"""Column names and schemas of segments, exports and contact history (docs/segments.md)."""

from __future__ import annotations

import pyarrow as pa

from profile_engine.contracts.profiles import USER_ID
from profile_engine.contracts.scores import PROPENSITY

# Output columns of the segments layer.
SEGMENTS_COL = "segments"
ACTION = "action"
OFFER = "offer"
CHANNEL = "channel"
RULE = "rule"
REASON = "reason"
CONTROL_FLAG = "control"
HELD_BY_STAY = "held_by_stay"
SEGMENT_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(SEGMENTS_COL, pa.list_(pa.string()), nullable=False),
        pa.field(ACTION, pa.string(), nullable=False),
        pa.field(OFFER, pa.string()),
        pa.field(CHANNEL, pa.string()),
        pa.field(RULE, pa.string()),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(CONTROL_FLAG, pa.bool_(), nullable=False),
        pa.field(PROPENSITY, pa.float64()),
        # Segments the user is in only because ``stay`` held (``enter`` did not): flips hysteresis prevented.
        pa.field(HELD_BY_STAY, pa.list_(pa.string()), nullable=False),
    ]
)
# Exports identify users by a keyed pseudonym (HMAC-SHA256), never by the raw id.
USER_KEY = "user_key"
SEGMENT = "segment"
# The suppress export is a change to the suppression list: who entered it and who left it since the
# previous committed hour (every member "entered" when there is none: a full list). NULL in other exports.
CHANGE = "change"
ENTERED = "entered"
LEFT = "left"
SUPPRESS_FULL = "full"
SUPPRESS_CHANGES = "changes"
EXPORT_SCHEMA = pa.schema(
    [
        pa.field(USER_KEY, pa.string(), nullable=False),
        pa.field(SEGMENT, pa.string(), nullable=False),
        pa.field(OFFER, pa.string(), nullable=False),
        pa.field(CHANNEL, pa.string(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(PROPENSITY, pa.float64()),
        pa.field(CHANGE, pa.string()),
    ]
)
EXPORT_COLUMNS: tuple[str, ...] = tuple(EXPORT_SCHEMA.names)
OPTOUT_REASON = "opted out of marketing"

CONTACT_HOUR = "hour"
CONTACT_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(ACTION, pa.string(), nullable=False),
        pa.field(RULE, pa.string(), nullable=False),
        pa.field(CONTACT_HOUR, pa.timestamp("ms", tz="UTC"), nullable=False),
    ]
)
