"""Campaign delivery: each hour's committed segment exports, delivered once to the outbox and a SQL table.

Destinations, idempotence, the suppression list and why importing this module stays cheap: docs/segments.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from profile_engine.config import Settings
from profile_engine.hours import floor_hour, format_hour, parse_hour

if TYPE_CHECKING:
    import pyarrow as pa
    import sqlalchemy

# The Asset publish_segments updates (named once; both DAG files build it from these).
EXPORTS_ASSET_NAME = "profile_engine_segment_exports"
EXPORTS_ASSET_URI = "profile-engine://lake/exports"
# Keys of the Asset event's extra.
EXTRA_HOUR = "hour"
EXTRA_MANIFEST = "manifest"
EXTRA_RUN_ID = "run_id"

OUTBOX_DIR = "outbox"
RECEIPT = "_delivered.json"
DELIVERY_TABLE = "campaign_deliveries"
BATCH_TABLE = "campaign_delivery_batches"
SUPPRESSION_TABLE = "campaign_suppressions"
# Names the exports use (contracts.segments, segments.rules.SUPPRESS; repeated so importing this stays cheap).
SUPPRESS = "suppress"
CHANGE = "change"
ENTERED, LEFT = "entered", "left"
SUPPRESS_FULL, SUPPRESS_CHANGES = "full", "changes"
_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ExportNotCommittedError(FileNotFoundError):
    """The export of an hour has no manifest (not written, a dry run, or removed by retention)."""


class ExportChecksumError(ValueError):
    """A file of a committed export does not match the checksum in its manifest."""


def asset_extra(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The Asset event ``extra`` for a ``publish_segments`` summary: hour, manifest path, run id."""
    return {
        EXTRA_HOUR: summary["hour"],
        EXTRA_MANIFEST: summary.get("manifest_path"),
        EXTRA_RUN_ID: summary.get("run_id"),
    }


def outbox_root(settings: Settings) -> Path:
    """The local outbox folder: ``settings.outbox`` or ``<lake>/outbox``."""
    return settings.outbox if settings.outbox is not None else settings.lake / OUTBOX_DIR


def _manifest_path(settings: Settings, extra: Mapping[str, Any]) -> tuple[datetime, Path]:
    """The hour and export manifest an event names (the lake's path for the hour when it names none)."""
    from profile_engine.lake import storage as lk

    hour = parse_hour(str(extra[EXTRA_HOUR]))
    manifest = extra.get(EXTRA_MANIFEST)
    path = Path(manifest) if manifest else lk.Lake(settings.lake).partition(lk.EXPORTS, hour) / lk.MANIFEST
    return hour, path


def read_export(manifest_path: Path) -> tuple[dict[str, Any], dict[str, pa.Table]]:
    """A committed export: its manifest and one table per action, after checking every checksum.

    Raises :class:`ExportNotCommittedError` without a manifest and
    :class:`ExportChecksumError` when a file differs from its manifest entry.
    """
    import pyarrow.parquet as pq

    if not manifest_path.is_file():
        raise ExportNotCommittedError(f"export not committed: no {manifest_path}")
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    tables: dict[str, pa.Table] = {}
    for entry in manifest["files"]:
        path = manifest_path.parent / entry["name"]
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        if digest != entry["sha256"]:
            raise ExportChecksumError(f"{path}: checksum {digest} does not match the manifest's {entry['sha256']}")
        if path.suffix == ".parquet":
            tables[path.stem] = pq.read_table(path)
    return manifest, tables


def export_digest(manifest: Mapping[str, Any]) -> str:
    """A digest of an export's content (its files' checksums): equal digests, same delivery."""
    files = sorted((f["name"], f["sha256"]) for f in manifest["files"])
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def deliver_to_outbox(manifest_path: Path, outbox: Path) -> dict[str, Any]:
    """Copy one hour's export into ``outbox/dt=/hour=/`` with ``_delivered.json`` written last.

    The folder is built under ``outbox/_tmp/`` and renamed into place, so a campaign tool
    watching the outbox sees a whole hour or none. Returns ``{"status": "delivered" |
    "already delivered", ...}``; an unchanged export is not copied again.
    """
    from profile_engine.lake import storage as lk

    manifest, _ = read_export(manifest_path)
    hour = parse_hour(manifest["data_hour"])
    box = lk.Lake(outbox)
    target = box.partition("", hour)
    digest = export_digest(manifest)
    receipt = target / RECEIPT
    if receipt.is_file() and json.loads(receipt.read_text()).get("digest") == digest:
        return {"hour": format_hour(hour), "status": "already delivered", "path": str(target)}
    tmp = box.tmp_dir()
    for entry in manifest["files"]:
        (tmp / entry["name"]).write_bytes((manifest_path.parent / entry["name"]).read_bytes())
    (tmp / lk.MANIFEST).write_bytes(manifest_path.read_bytes())
    lk.write_json(
        tmp / RECEIPT,
        {
            "hour": format_hour(hour),
            "digest": digest,
            "run_id": manifest.get("run_id"),
            "rows": manifest.get("rows"),
            "delivered_at": datetime.now(UTC).isoformat(),
        },
    )
    lk.replace_dir(tmp, target, box)
    return {"hour": format_hour(hour), "status": "delivered", "path": str(target), "rows": manifest.get("rows")}


def fold_suppressions(
    hours: Iterable[tuple[str, str | None, str | None, Iterable[tuple[str, str | None]]]],
) -> dict[str, Any]:
    """The current suppression list from delivered hours of the suppress export.

    ``hours`` are ``(hour, mode, base_hour, rows)`` with ``rows`` as ``(user_key, change)``.
    Hours are applied in order from the latest ``full`` one (an export written before
    suppression became a change, mode None and change None, is a full list too): a full
    hour replaces the list, a ``changes`` hour adds ``entered`` and removes ``left`` users.
    Returns ``{"members": {user_key: since_hour}, "from_hour", "gaps"}``; ``gaps`` names
    every changes hour whose ``base_hour`` is not the hour applied before it (a missing
    delivery: the list may be stale until the next full list).
    """
    ordered = sorted(hours, key=lambda h: h[0])
    start = max((i for i, h in enumerate(ordered) if h[1] in (None, SUPPRESS_FULL)), default=0)
    members: dict[str, str] = {}
    gaps: list[str] = []
    previous: str | None = None
    for hour, mode, base, rows in ordered[start:]:
        if mode in (None, SUPPRESS_FULL):
            members = {}
        elif base != previous:
            gaps.append(hour)
        for user_key, change in rows:
            if change == LEFT:
                members.pop(user_key, None)
            else:
                members.setdefault(user_key, hour)
        previous = hour
    return {"members": members, "from_hour": ordered[start][0] if ordered else None, "gaps": gaps}


def _check_identifier(name: str) -> str:
    if not _IDENTIFIER_RE.match(name):
        raise ValueError(f"table name {name!r} is not a plain SQL identifier")
    return name


def _add_missing_columns(connection: sqlalchemy.Connection, table: str, columns: Mapping[str, str]) -> None:
    """Add ``columns`` (name -> SQL type) a table created by an older version lacks (older databases stay usable)."""
    import sqlalchemy as sa

    present = {c["name"] for c in sa.inspect(connection).get_columns(table)}
    quote = connection.dialect.identifier_preparer.quote
    for name, sql_type in columns.items():
        if name not in present:
            connection.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {quote(name)} {sql_type}"))


def deliver_to_sql(
    manifest_path: Path,
    engine: sqlalchemy.Engine,
    *,
    table: str = DELIVERY_TABLE,
    batches: str = BATCH_TABLE,
    suppressions: str = SUPPRESSION_TABLE,
) -> dict[str, Any]:
    """Write one hour's export into SQL table ``table`` (created if missing), idempotently.

    One transaction: when ``batches`` already records this hour with the same digest,
    nothing is written; otherwise the hour's rows are replaced and its batch row upserted.
    So the same hour delivered twice adds nothing, and a changed rerun replaces the hour.
    ``suppressions`` is then rebuilt as the current suppression list (``user_key``,
    ``since_hour``) by :func:`fold_suppressions` over the delivered suppress rows, so
    hours delivered out of order or again give the same list.
    """
    import sqlalchemy as sa

    manifest, tables = read_export(manifest_path)
    hour = format_hour(parse_hour(manifest["data_hour"]))
    digest = export_digest(manifest)
    suppress = manifest.get("suppress") or {}
    rows_table, batch_table = _check_identifier(table), _check_identifier(batches)
    list_table = _check_identifier(suppressions)
    with engine.begin() as connection:
        change = connection.dialect.identifier_preparer.quote(CHANGE)
        connection.execute(
            sa.text(
                f"CREATE TABLE IF NOT EXISTS {rows_table} (hour VARCHAR(32) NOT NULL, action VARCHAR(64) NOT NULL, "
                "user_key VARCHAR(64) NOT NULL, segment VARCHAR(64) NOT NULL, offer VARCHAR(64) NOT NULL, "
                "channel VARCHAR(32) NOT NULL, reason TEXT NOT NULL, purchase_propensity DOUBLE PRECISION, "
                f"{change} VARCHAR(16), PRIMARY KEY (hour, action, user_key))"
            )
        )
        connection.execute(
            sa.text(
                f"CREATE TABLE IF NOT EXISTS {batch_table} (hour VARCHAR(32) PRIMARY KEY, digest VARCHAR(64) NOT NULL, "
                "run_id VARCHAR(250), row_count INTEGER NOT NULL, delivered_at VARCHAR(40) NOT NULL, "
                "suppress_mode VARCHAR(16), suppress_base_hour VARCHAR(32))"
            )
        )
        connection.execute(
            sa.text(
                f"CREATE TABLE IF NOT EXISTS {list_table} (user_key VARCHAR(64) PRIMARY KEY, "
                "since_hour VARCHAR(32) NOT NULL)"
            )
        )
        _add_missing_columns(connection, rows_table, {CHANGE: "VARCHAR(16)"})
        _add_missing_columns(
            connection, batch_table, {"suppress_mode": "VARCHAR(16)", "suppress_base_hour": "VARCHAR(32)"}
        )
        known = connection.execute(sa.text(f"SELECT digest FROM {batch_table} WHERE hour = :hour"), {"hour": hour})
        if known.scalar() == digest:
            return {"hour": hour, "status": "already delivered", "table": rows_table}
        rows = [
            {"hour": hour, "action": action, **{CHANGE: None}, **record}
            for action, data in sorted(tables.items())
            for record in data.to_pylist()
        ]
        connection.execute(sa.text(f"DELETE FROM {rows_table} WHERE hour = :hour"), {"hour": hour})
        connection.execute(sa.text(f"DELETE FROM {batch_table} WHERE hour = :hour"), {"hour": hour})
        if rows:
            connection.execute(
                sa.text(
                    f"INSERT INTO {rows_table} (hour, action, user_key, segment, offer, channel, reason, "
                    f"purchase_propensity, {change}) VALUES (:hour, :action, :user_key, :segment, :offer, :channel, "
                    f":reason, :purchase_propensity, :{CHANGE})"
                ),
                rows,
            )
        connection.execute(
            sa.text(
                f"INSERT INTO {batch_table} (hour, digest, run_id, row_count, delivered_at, suppress_mode, "
                "suppress_base_hour) VALUES (:hour, :digest, :run_id, :row_count, :delivered_at, :mode, :base)"
            ),
            {
                "hour": hour,
                "digest": digest,
                "run_id": manifest.get("run_id"),
                "row_count": len(rows),
                "delivered_at": datetime.now(UTC).isoformat(),
                "mode": suppress.get("mode"),
                "base": suppress.get("base_hour"),
            },
        )
        folded = _rebuild_suppressions(connection, rows_table, batch_table, list_table)
    return {
        "hour": hour,
        "status": "delivered",
        "table": rows_table,
        "rows": len(rows),
        "suppression_list": len(folded["members"]),
        "suppression_gaps": folded["gaps"],
    }


def _rebuild_suppressions(
    connection: sqlalchemy.Connection, rows_table: str, batch_table: str, list_table: str
) -> dict[str, Any]:
    """Replace ``list_table`` with the suppression list folded from every delivered hour (latest full list on)."""
    import sqlalchemy as sa

    change = connection.dialect.identifier_preparer.quote(CHANGE)
    delivered = connection.execute(
        sa.text(f"SELECT hour, suppress_mode, suppress_base_hour FROM {batch_table} ORDER BY hour")
    ).fetchall()
    start = max((str(h) for h, mode, _ in delivered if mode in (None, SUPPRESS_FULL)), default="")
    rows: dict[str, list[tuple[str, str | None]]] = {}
    for hour, user_key, value in connection.execute(
        sa.text(f"SELECT hour, user_key, {change} FROM {rows_table} WHERE action = :action AND hour >= :start"),
        {"action": SUPPRESS, "start": start},
    ):
        rows.setdefault(str(hour), []).append((str(user_key), value))
    folded = fold_suppressions(
        (str(h), mode, base, rows.get(str(h), [])) for h, mode, base in delivered if str(h) >= start
    )
    connection.execute(sa.text(f"DELETE FROM {list_table}"))
    if folded["members"]:
        connection.execute(
            sa.text(f"INSERT INTO {list_table} (user_key, since_hour) VALUES (:user_key, :since)"),
            [{"user_key": k, "since": v} for k, v in sorted(folded["members"].items())],
        )
    return folded


def deliver_events(
    settings: Settings, extras: Iterable[Mapping[str, Any]], *, engine: sqlalchemy.Engine | None = None
) -> dict[str, Any]:
    """Deliver every hour named by the triggering Asset events, oldest first, once each.

    ``extras`` are the events' ``extra`` dicts (``hour``, ``manifest``); several events for
    the same hour (a rerun) deliver that hour's committed export once. An event without a
    manifest (a dry run) is reported and skipped. Every hour goes to the outbox, and to
    SQL when ``engine`` is given. Returns a JSON-able summary per hour.
    """
    hours: dict[datetime, Path] = {}
    skipped: list[dict[str, Any]] = []
    for extra in extras:
        if EXTRA_HOUR not in extra:
            skipped.append({"extra": dict(extra), "reason": "event without an hour"})
            continue
        if EXTRA_MANIFEST in extra and not extra[EXTRA_MANIFEST]:
            skipped.append({"hour": extra[EXTRA_HOUR], "reason": "no export written (dry run)"})
            continue
        hour, path = _manifest_path(settings, extra)
        hours[floor_hour(hour)] = path
    delivered = []
    for hour in sorted(hours):
        entry: dict[str, Any] = {
            "hour": format_hour(hour),
            "outbox": deliver_to_outbox(hours[hour], outbox_root(settings)),
        }
        if engine is not None:
            entry["sql"] = deliver_to_sql(hours[hour], engine)
        delivered.append(entry)
    return {"hours": delivered, "skipped": skipped}


def connection_engine(conn_id: str) -> sqlalchemy.Engine:
    """A SQLAlchemy engine for Airflow Connection ``conn_id`` (call inside a task, never at parse time)."""
    import sqlalchemy as sa

    from profile_engine.sources.sql import connection_url

    return sa.create_engine(connection_url(conn_id))


def connection_secret(conn_id: str) -> str | None:
    """The password of Airflow Connection ``conn_id``, or None when no such Connection exists."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id).password or None
    except AirflowNotFoundException:
        return None
