"""No raw user id leaves the lake's private layers, whatever the segment rules say (issue "trust", item 1).

A lake is built through the runner with the default rules plus an A/B split over
``user_id`` (``md5_number(user_id) % 100 < 50``), delivered to the outbox and to a
SQLite delivery database; then every cell of every export file, manifest, contact
row (besides its ``user_id`` key), segment reason, outbox file, delivery row and run
report is searched for every raw user id of the lake.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
import yaml

from profile_engine.config import Settings
from profile_engine.lake import storage as lk
from profile_engine.lake.storage import Lake
from profile_engine.ops import runner
from profile_engine.segments import delivery
from profile_engine.segments import rules as segments
from profile_engine.sources.simulate import simulate

HOUR = datetime(2026, 11, 3, 12, tzinfo=UTC)
AB_RULE = {
    "name": "ab_split",
    "description": "Half of the users, by a stable hash of their id (an A/B split).",
    "enter": "md5_number(user_id) % 100 < 50 AND session_count >= 0",
    "action": {"channel": "onsite", "offer": "welcome"},
    "priority": 5,
}


def cells_of(path: Path) -> list[str]:
    """Every cell of a CSV, Parquet or JSON file as text (a JSON file's scalars and keys); other files whole."""
    if path.suffix == ".parquet":
        return [str(v) for column in pq.read_table(path).columns for v in column.to_pylist()]
    if path.suffix == ".csv":
        return [cell for row in csv.reader(io.StringIO(path.read_text())) for cell in row]
    if path.suffix == ".json":
        found: list[str] = []
        stack: list[Any] = [json.loads(path.read_text())]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                found += [str(k) for k in item]
                stack += list(item.values())
            elif isinstance(item, list):
                stack += item
            else:
                found.append(str(item))
        return found
    return [path.read_bytes().decode(errors="replace")]


def raw_ids(root: Path) -> set[str]:
    """Every user id in any Parquet file of the lake (landing, staging, state, profiles...)."""
    ids: set[str] = set()
    for path in root.rglob("*.parquet"):
        if "user_id" in pq.read_schema(path).names:
            ids.update(v for v in pq.read_table(path, columns=["user_id"]).column(0).to_pylist() if v)
    return ids


def leaks(cells: list[str], ids: set[str]) -> list[str]:
    """Cells holding a raw id (exact or inside a longer text)."""
    return [cell for cell in cells if any(uid in cell for uid in ids)]


@pytest.fixture
def delivered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, dict[str, Any], sa.Engine]:
    """One hour run end to end with the A/B rule, delivered to the outbox and to SQLite."""
    monkeypatch.setenv("PROFILE_ENGINE_EXPORT_KEY", "r" * 32)
    rules = yaml.safe_load(segments.DEFAULT_RULES_PATH.read_text())
    rules["segments"].append(AB_RULE)
    path = tmp_path / "segments.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    monkeypatch.setattr(segments, "DEFAULT_RULES_PATH", path)
    settings = Settings(lake=tmp_path / "lake", buckets=2, lateness_hours=6, start=HOUR)
    simulate(Lake(settings.lake), HOUR - timedelta(hours=1), HOUR, users=200, seed=11, intensity=4.0)

    summaries = runner.run_hour(settings, HOUR, build_docs=False)

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'campaigns.db'}")
    delivery.deliver_events(settings, [delivery.asset_extra(summaries["publish_segments"])], engine=engine)
    return settings, summaries, engine


def test_no_raw_id_reaches_exports_contacts_outbox_deliveries_or_reports(
    delivered: tuple[Settings, dict[str, Any], sa.Engine],
) -> None:
    settings, summaries, engine = delivered
    lake = Lake(settings.lake)
    ids = raw_ids(settings.lake)
    exported = summaries["publish_segments"]["exports"]
    assert len(ids) > 50 and exported["welcome"] > 5  # the A/B rule exported users

    checked: dict[str, int] = {}
    found: dict[str, list[str]] = {}
    areas = {
        "exports": settings.lake / lk.EXPORTS,
        "outbox": delivery.outbox_root(settings),
        "reports": settings.lake / lk.REPORTS,
    }
    for area, root in areas.items():
        files = [
            p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".csv", ".parquet", ".json", ".html")
        ]
        cells = [cell for p in files for cell in cells_of(p)]
        checked[area] = len(cells)
        found[area] = leaks(cells, ids)
    # Contacts and segments are keyed by the raw id (private layers); no other cell may hold one.
    for layer in (lk.CONTACTS, lk.SEGMENTS):
        table = lake.read(layer, HOUR)
        cells = [str(v) for name in table.column_names if name != "user_id" for v in table.column(name).to_pylist()]
        checked[layer] = len(cells)
        found[layer] = leaks(cells, ids)
    with engine.connect() as connection:
        for table in (delivery.DELIVERY_TABLE, delivery.BATCH_TABLE):
            rows = connection.execute(sa.text(f"SELECT * FROM {table}")).fetchall()
            cells = [str(v) for row in rows for v in row]
            checked[table] = len(cells)
            found[table] = leaks(cells, ids)

    assert all(n > 0 for n in checked.values()), checked
    assert found == {area: [] for area in found}, {area: cells[:3] for area, cells in found.items() if cells}
    reasons = [r for r in lake.read(lk.SEGMENTS, HOUR).column("reason").to_pylist() if r.startswith("ab_split")]
    assert reasons and all("md5_number(user_id) % 100 < 50" in r for r in reasons)  # the condition, named
