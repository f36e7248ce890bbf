"""Tombstones: keyed hashes of erased users, dropped from every later read (docs/reliability.md)."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from profile_engine.config import Settings
from profile_engine.contracts.profiles import USER_ID
from profile_engine.lake.storage import Lake, read_json, write_json
from profile_engine.privacy.keys import MIN_KEY_CHARS, ExportKey, ExportKeyError, export_key

ERASURE_KEY_ENV = "PROFILE_ENGINE_ERASURE_KEY"
ERASURE_DIR = "_meta/erasure"
TOMBSTONES_FILE = "tombstones.json"
AUDIT_FILE = "audit.jsonl"
_DOMAIN = b"profile-engine erasure\x00"


class ErasureKeyError(RuntimeError):
    """The key differs from the one the tombstones were hashed with: erased users would come back."""


# ---- keys and tombstones -------------------------------------------------------------


def erasure_key(settings: Settings, environ: Mapping[str, str] | None = None) -> ExportKey:
    """The HMAC key of tombstones: ``PROFILE_ENGINE_ERASURE_KEY``, else the export key.

    Reuses :func:`profile_engine.privacy.keys.export_key` (environment variable, then the
    development key file; production without a key raises ``ExportKeyError``).
    """
    env = os.environ if environ is None else environ
    value = env.get(ERASURE_KEY_ENV)
    if value:
        if len(value) < MIN_KEY_CHARS:
            raise ExportKeyError(f"{ERASURE_KEY_ENV} is shorter than {MIN_KEY_CHARS} characters")
        return ExportKey(value.encode(), f"environment variable {ERASURE_KEY_ENV}")
    return export_key(settings, environ=env)


def user_hash(user_id: str, key: ExportKey) -> str:
    """HMAC-SHA256 (hex) of ``user_id`` under ``key``, domain-separated from export pseudonyms."""
    return hmac.new(key.secret, _DOMAIN + user_id.encode(), hashlib.sha256).hexdigest()


def tombstones_path(lake: Lake) -> Path:
    """``<lake>/_meta/erasure/tombstones.json``."""
    return lake.path(ERASURE_DIR, TOMBSTONES_FILE)


def audit_path(lake: Lake) -> Path:
    """``<lake>/_meta/erasure/audit.jsonl``."""
    return lake.path(ERASURE_DIR, AUDIT_FILE)


@dataclass(frozen=True)
class Tombstones:
    """The keyed hashes of erased users and the fingerprint of the key that made them."""

    key_id: str | None
    hashes: frozenset[str]


def read_tombstones(lake: Lake) -> Tombstones:
    """The tombstone list (empty when nobody was erased)."""
    path = tombstones_path(lake)
    if not path.is_file():
        return Tombstones(None, frozenset())
    data = read_json(path)
    return Tombstones(data.get("key_id"), frozenset(data.get("hashes", [])))


def write_tombstones(lake: Lake, key: ExportKey, hashes: Iterable[str]) -> None:
    write_json(tombstones_path(lake), {"key_id": key.key_id, "hashes": sorted(set(hashes))})


def matching_key(settings: Settings, tombstones: Tombstones) -> ExportKey:
    key = erasure_key(settings)
    if tombstones.key_id is not None and tombstones.key_id != key.key_id:
        raise ErasureKeyError(
            f"the erasure key ({key.source}, fingerprint {key.key_id}) is not the key the tombstones in "
            f"{tombstones_path(Lake(settings.lake))} were made with (fingerprint {tombstones.key_id}): erased users "
            f"would come back; restore that key ({ERASURE_KEY_ENV} or the export key)"
        )
    return key


def erased_ids(settings: Settings, user_ids: Iterable[str]) -> set[str]:
    """Which of ``user_ids`` are tombstoned (one HMAC per id)."""
    tombstones = read_tombstones(Lake(settings.lake))
    if not tombstones.hashes:
        return set()
    key = matching_key(settings, tombstones)
    return {u for u in user_ids if user_hash(u, key) in tombstones.hashes}


# ---- the validation hook ---------------------------------------------------------------


def drop_erased(con: Any, settings: Settings, relation: str, source_names: Sequence[str]) -> dict[str, int]:
    """Remove rows of tombstoned users from DuckDB relation ``relation``; erased rows per source name.

    ``relation`` must have ``user_id`` and ``source_index`` (the index into
    ``source_names``). It is replaced by a view over the remaining rows, so later
    statements read the same name. Without tombstones nothing is touched.
    """
    if not read_tombstones(Lake(settings.lake)).hashes:
        return {}
    users = [
        r[0] for r in con.execute(f"SELECT DISTINCT {USER_ID} FROM {relation} WHERE {USER_ID} IS NOT NULL").fetchall()
    ]
    erased = sorted(erased_ids(settings, users))
    if not erased:
        return {}
    con.register("erased_user_ids", pa.table({USER_ID: pa.array(erased, pa.string())}))
    counts = con.execute(
        f"SELECT source_index, count(*) FROM {relation} WHERE {USER_ID} IN (SELECT {USER_ID} FROM erased_user_ids) "
        "GROUP BY source_index ORDER BY source_index"
    ).fetchall()
    kind = con.execute(
        "SELECT table_type FROM information_schema.tables WHERE table_name = $name", {"name": relation}
    ).fetchall()[0][0]
    con.execute(f"ALTER {'VIEW' if kind == 'VIEW' else 'TABLE'} {relation} RENAME TO {relation}_with_erased")
    con.execute(
        f"CREATE TEMP VIEW {relation} AS SELECT * FROM {relation}_with_erased "
        f"WHERE {USER_ID} IS NULL OR {USER_ID} NOT IN (SELECT {USER_ID} FROM erased_user_ids)"
    )
    per_source: Counter[str] = Counter()
    for index, n in counts:
        per_source[source_names[int(index)]] += int(n)
    return dict(per_source)


def count_erased(per_source: dict[str, dict[str, Any]], erased: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Add the erased rows to each source's summary: ``read`` includes them, ``erased`` counts them."""
    for name, n in erased.items():
        summary = per_source.setdefault(name, {"read": 0, "staged": 0, "quarantined": 0})
        summary["read"] = summary.get("read", 0) + n
        summary["erased"] = n
    return per_source
