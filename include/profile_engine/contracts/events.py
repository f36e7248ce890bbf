"""The canonical event (schema v1), event types, the staged schema and the bucket expression: defined once,
imported by every stage. docs/sources.md.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

VIEW = "view"
CART = "cart"
REMOVE_CART = "remove_cart"
FAV = "fav"
PURCHASE = "purchase"
# A refund (a cancellation or a return) gives money back: its quantity is negative (staged
# as ``-abs(quantity)`` whatever sign the source wrote), its price the unit price, so its
# value ``price * quantity`` is negative and reduces the user's net spend.
REFUND = "refund"
EVENT_TYPES: tuple[str, ...] = (VIEW, CART, REMOVE_CART, FAV, PURCHASE, REFUND)

EVENT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("category_id", pa.string()),
        pa.field("price", pa.float64()),
        pa.field("quantity", pa.int32(), nullable=False),
        pa.field("order_id", pa.string()),
        pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("session_id", pa.string()),
    ]
)
EVENT_COLUMNS: tuple[str, ...] = tuple(EVENT_SCHEMA.names)

# Staged events carry their user bucket (computed once, at validation) and their hour of
# day in the time zone of the shop they come from (the mapping's ``timezone``; null when
# the source's timestamps carry only a date). Staged files written before ``local_hour``
# existed are read with it computed in ``Settings.business_tz`` (merge.with_local_hour).
BUCKET = "bucket"
LOCAL_HOUR = "local_hour"
STAGED_SCHEMA = EVENT_SCHEMA.append(pa.field(BUCKET, pa.int32(), nullable=False)).append(
    pa.field(LOCAL_HOUR, pa.int8())
)

# Quarantined rows keep the original values as text plus the reasons.
QUARANTINE_SCHEMA = pa.schema(
    [pa.field(name, pa.string()) for name in EVENT_COLUMNS]
    + [
        pa.field("reasons", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
    ]
)


def bucket_sql(column: str, buckets: int) -> str:
    """DuckDB expression for a user's bucket: stable across processes and versions.

    ``md5_number`` is a documented, stable 128-bit hash; DuckDB's ``hash()`` is not
    promised stable and Python's ``hash`` is salted per process.
    """
    return f"CAST({md5_modulo_sql(f'CAST({column} AS VARCHAR)', buckets)} AS INTEGER)"


def md5_modulo_sql(expression: str, modulus: int) -> str:
    """DuckDB expression equal to ``md5_number(expression) % modulus`` (a UBIGINT), fast.

    It works on the hash's two 64-bit halves, ``(high % m * (2**64 % m) + low % m) % m``:
    DuckDB 2.0 divides a 128-bit number bit by bit (2.6 s for 1M rows, against 0.15 s
    this way). The identity is exact; tests/test_ingest.py checks it against the plain form.
    """
    m = int(modulus)
    if not 1 <= m <= 1 << 32:  # products of two remainders stay below 2**64
        raise ValueError(f"modulus must be in [1, 2**32], got {modulus}")
    digest = f"md5_number({expression})"
    high = f"CAST({digest} >> 64 AS UBIGINT) % {m}"
    low = f"CAST({digest} & {(1 << 64) - 1} AS UBIGINT) % {m}"
    return f"(({high} * {(1 << 64) % m} + {low}) % {m})"
