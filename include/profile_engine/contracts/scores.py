"""Column names and schema of the scores layer (docs/model.md): one row per profile and hour."""

from __future__ import annotations

import pyarrow as pa

from profile_engine.contracts.profiles import USER_ID

PROPENSITY = "purchase_propensity"
DECILE = "propensity_decile"
MODEL_VERSION = "model_version"
NO_MODEL = "none"
SCORES_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.string()),
        pa.field(PROPENSITY, pa.float64()),
        pa.field(DECILE, pa.int8()),
        pa.field(MODEL_VERSION, pa.string()),
    ]
)
# The score columns joined to a profile snapshot (segments, exports).
SCORE_SCHEMA = pa.schema([field for field in SCORES_SCHEMA if field.name != USER_ID])
SCORE_COLUMNS: tuple[str, ...] = tuple(SCORE_SCHEMA.names)
