"""What a real shop's data can and cannot carry: refunds, sources without prices, heavy
ties in RFM, the shop's own time zone and date-only timestamps (docs/sources.md, docs/features.md)."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from profile_engine.config import Settings
from profile_engine.contracts.events import REFUND, STAGED_SCHEMA
from profile_engine.contracts.profiles import PROFILE_SCHEMA, TIMESTAMP, USER_ID
from profile_engine.contracts.scores import SCORE_SCHEMA
from profile_engine.contracts.traits import load_traits
from profile_engine.ingest import events as ingest
from profile_engine.lake import storage as lk
from profile_engine.lake.db import cursor
from profile_engine.lake.storage import Lake
from profile_engine.profiles import replay
from profile_engine.profiles.build import build_profiles, read_state
from profile_engine.profiles.merge import advance, rebuild
from profile_engine.profiles.population import add_population_features
from profile_engine.profiles.replay import rebuild_bucket
from profile_engine.profiles.snapshot import snapshot as snapshot_of
from profile_engine.profiles.state import (
    BY_HOUR_TABLES,
    HOURS_OF_DAY,
    PENDING,
    USER_EVENTS,
    empty_state,
    hour_ms,
    register_by_hour,
)
from profile_engine.profiles.verify import compare_tables
from profile_engine.segments.assign import assign_segments
from profile_engine.segments.rules import load_rules
from profile_engine.sources import mappings as sources
from tests.conftest import HOUR0

T0 = datetime(2026, 11, 2, tzinfo=UTC)
SETTINGS = Settings(lateness_hours=6)


def events(*rows: dict[str, Any]) -> pa.Table:
    """Staged events from partial rows (``ts`` required)."""
    base = {"user_id": "u1", "event_type": "purchase", "item_id": "i1", "category_id": "c1", "price": 10.0}
    base |= {"quantity": 1, "order_id": None, "session_id": None, "bucket": 0, "local_hour": 0}
    return pa.Table.from_pylist([{**base, "event_id": f"e{i}", **r} for i, r in enumerate(rows)], schema=STAGED_SCHEMA)


def profiles_at(table: pa.Table, end: datetime) -> pa.Table:
    return add_population_features(snapshot_of(rebuild(table, end, SETTINGS), end, SETTINGS)[0])


def by_user(table: pa.Table) -> dict[str, dict[str, Any]]:
    return {r["user_id"]: r for r in table.to_pylist()}


# ---- refunds ----------------------------------------------------------------------------


def test_refunds_reduce_net_spend_exactly_and_are_no_orders() -> None:
    table = events(
        {"order_id": "o1", "price": 2.55, "quantity": 6, "ts": T0 + timedelta(hours=1)},
        {"order_id": "o1", "price": 3.39, "quantity": 4, "ts": T0 + timedelta(hours=1)},
        {"order_id": "o2", "price": 0.85, "quantity": 12, "ts": T0 + timedelta(hours=30)},
        {"event_type": REFUND, "order_id": "C1", "price": 2.55, "quantity": -6, "ts": T0 + timedelta(hours=40)},
        {"user_id": "u2", "event_type": REFUND, "price": 1.25, "quantity": -3, "ts": T0 + timedelta(hours=2)},
    )
    end = T0 + timedelta(days=3)

    rebuilt = by_user(profiles_at(table, end))
    state = empty_state()
    for hour in range(72):  # hour by hour equals the rebuild
        h = T0 + timedelta(hours=hour)
        batch = table.filter(pc.equal(pc.floor_temporal(table.column("ts"), unit="hour"), pa.scalar(h, TIMESTAMP)))
        state = advance(state, batch, h + timedelta(hours=1), SETTINGS)
    hourly = by_user(add_population_features(snapshot_of(state, end, SETTINGS)[0]))

    for p in (rebuilt, hourly):
        u1, u2 = p["u1"], p["u2"]
        assert u1["monetary_total"] == 23.76  # 15.30 + 13.56 + 10.20 bought, 15.30 refunded
        assert u1["frequency_orders"] == 2  # a refund is not an order
        assert u1["count_refund_lifetime"] == 1
        assert u1["avg_order_value"] == 11.88  # net spend per order
        assert u1["max_order_value"] == 28.86  # the largest order as bought
        assert (u2["monetary_total"], u2["frequency_orders"], u2["rfm_segment"]) == (-3.75, 0, "no_orders")
        assert u2["first_seen_at"] == T0 + timedelta(hours=2)  # a refund-only user is a valid profile


# ---- sources without prices ---------------------------------------------------------------


def test_without_prices_money_is_null_and_the_vip_rule_does_not_match(tmp_path: Path) -> None:
    end = T0 + timedelta(days=2)
    rows: list[dict[str, Any]] = []
    for n in range(20):  # 20 buyers of a source without prices, one with priced orders
        rows += [{"user_id": f"t{n:02}", "price": None, "ts": T0 + timedelta(hours=h)} for h in range(1 + n % 3)]
        rows.append({"user_id": f"t{n:02}", "event_type": "cart", "price": None, "ts": T0 + timedelta(hours=5)})
    rows.append({"user_id": "priced", "price": 12.5, "quantity": 2, "ts": T0 + timedelta(hours=3)})
    rows.append({"user_id": "viewer", "event_type": "view", "price": None, "ts": T0 + timedelta(hours=3)})

    p = by_user(profiles_at(events(*rows), end))

    money = ("monetary_total", "avg_order_value", "max_order_value", "open_cart_value", "rfm_m")
    for user in ("t00", "t07", "viewer"):
        assert {c: p[user][c] for c in money} == dict.fromkeys(money), user
    assert p["t00"]["rfm_f"] is not None and p["t00"]["rfm_r"] is not None  # R and F need no prices
    assert (p["priced"]["monetary_total"], p["priced"]["rfm_m"]) == (25.0, 3)  # the only priced buyer

    # the VIP rule's spend percentile is null for them, so only the priced buyer can match it
    rules = [r for r in load_rules() if r.name == "vip_service"]
    table = pa.Table.from_pylist(
        [{**r, "rfm_segment": "loyal"} for r in p.values()], schema=PROFILE_SCHEMA
    ).append_column("purchase_propensity", pa.array([0.5] * len(p), pa.float64()))
    for name in ("propensity_decile", "model_version"):
        field = SCORE_SCHEMA.field(name)
        table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    assigned, _ = assign_segments(table, rules)
    assert assigned.column("user_id").to_pylist() == ["priced"]


# ---- RFM under heavy ties ---------------------------------------------------------------------


def test_rfm_scores_under_heavy_ties_reach_every_value_deterministically() -> None:
    rng = random.Random(3)
    end = T0 + timedelta(days=30)
    rows = []
    for n in range(200):  # 55% of buyers with one order, spend and recency tied in few values
        orders = 1 if n < 110 else rng.choice([2, 2, 3, 5])
        for k in range(orders):
            rows.append(
                {
                    "user_id": f"u{n:03}",
                    "order_id": f"o{n}-{k}",
                    "price": rng.choice([5.0, 10.0]),
                    "ts": end - timedelta(days=rng.choice([1, 1, 1, 10]), hours=k),
                }  # fmt: skip
            )
    snapshot = snapshot_of(rebuild(events(*rows), end, SETTINGS), end, SETTINGS)[0]

    scored = add_population_features(snapshot)
    shuffled = add_population_features(snapshot.take(pa.array(rng.sample(range(200), 200))))

    assert scored.equals(shuffled)  # ties are broken by the user, not by the row order
    p = scored.to_pylist()
    for score, value in (("rfm_r", "recency_hours"), ("rfm_f", "frequency_orders"), ("rfm_m", "monetary_total")):
        assert sorted({r[score] for r in p}) == [1, 2, 3, 4, 5], score
        for a in p:  # never a lower score for a better value
            worse = [b[score] for b in p if (b[value] > a[value] if value != "recency_hours" else b[value] < a[value])]
            assert all(s >= a[score] for s in worse), (score, a["user_id"])
    assert "new_customer" in {r["rfm_segment"] for r in p}


# ---- the shop's time zone and date-only timestamps --------------------------------------------


def write_mapping(settings: Settings, document: dict[str, Any]) -> None:
    path = Lake(settings.lake).path(sources.LAKE_SOURCES_DIR, f"{document['name']}.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document))


def land(settings: Settings, source: str, text: str, arrival: datetime) -> None:
    target = Lake(settings.lake).partition(lk.LANDING, arrival) / f"source={source}" / "part.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def build(settings: Settings, hour: datetime) -> pa.Table:
    ingest.extract_events(settings, hour)
    ingest.validate_events(settings, hour)
    for bucket in range(settings.buckets):
        build_profiles(settings, hour, bucket)
    return pa.concat_tables([Lake(settings.lake).read(lk.PROFILES, hour, b) for b in range(settings.buckets)])


def test_shipped_mappings_declare_their_shop_time_zone() -> None:
    zones = {n: sources.load_mapping(n).timezone for n in ("taobao", "rees46", "order_lines")}
    assert zones == {"taobao": "Asia/Shanghai", "rees46": "UTC", "order_lines": "Europe/London"}
    with pytest.raises(sources.MappingError, match="timezone: unknown time zone"):
        sources.parse_mapping(
            {**yaml.safe_load(sources.resolve_mapping_path("taobao").read_text()), "timezone": "Mars"}
        )


def test_the_mapping_time_zone_drives_local_hours(settings: Settings) -> None:
    write_mapping(
        settings,
        {
            "name": "shop_cn",
            "header": False,
            "columns": ["u", "i", "c", "b", "t"],
            "fields": {"user_id": "u", "item_id": "i", "category_id": "c", "event_type": "b", "ts": "t"},
            "event_types": {"pv": "view", "buy": "purchase"},
            "timestamp": {"format": "epoch_s"},
            "timezone": "Asia/Shanghai",
        },  # fmt: skip
    )
    at = int((HOUR0 + timedelta(minutes=20)).timestamp())  # 10:20 UTC = 18:20 in China (11:20 in Berlin)
    land(settings, "shop_cn", f"1,7,3,pv,{at}\n1,7,3,pv,{at + 60}\n2,8,3,buy,{at}\n", HOUR0)

    profiles = build(settings, HOUR0)

    staged = Lake(settings.lake).read(lk.STAGING, HOUR0)
    assert set(staged.column("local_hour").to_pylist()) == {18}
    assert profiles.column("peak_hour_local").to_pylist() == [18, 18]
    assert settings.business_tz == "Europe/Berlin"  # the setting is for canonical landing files only


def test_date_only_timestamps_give_null_hour_of_day(settings: Settings) -> None:
    day = datetime(2026, 11, 2, tzinfo=UTC)
    settings = replace(settings, start=day)
    write_mapping(
        settings,
        {
            "name": "daily",
            "fields": {"user_id": "customer", "item_id": "sku", "ts": "day", "price": "amount"},
            "constants": {"event_type": "purchase"},
            "timestamp": {"format": "%Y-%m-%d", "timezone": "Europe/London", "date_only": True},
        },  # fmt: skip
    )
    land(settings, "daily", "customer,sku,day,amount\nc1,s1,2026-11-02,3.5\nc1,s2,2026-11-02,1.5\n", day)

    profiles = build(settings, day)

    staged = Lake(settings.lake).read(lk.STAGING, day)
    assert staged.num_rows == 2 and staged.column("local_hour").null_count == 2
    assert profiles.column("peak_hour_local").to_pylist() == [None]
    assert profiles.column("monetary_total").to_pylist() == [5.0]


def test_order_lines_cancellations_are_refund_events(settings: Settings) -> None:
    settings = replace(settings, lateness_hours=24)
    header = "Invoice,StockCode,Description,Quantity,InvoiceDate,Price,Customer ID,Country\n"
    lines = [
        "1001,85048,X,6,2026-11-02 10:05:00,2.55,13085,UK",
        "1001,22087,Y,4,2026-11-02 10:05:00,3.39,13085,UK",
        "C1002,85048,X,-6,2026-11-02 10:40:00,2.55,13085,UK",  # a cancellation
        "1003,85048,X,-2,2026-11-02 10:41:00,2.55,13085,UK",  # a return without a C invoice
        "1004,21733,Z,-96,2026-11-02 10:45:00,0.00,,UK",  # no customer: still quarantined
    ]
    land(settings, "order_lines", header + "\n".join(lines) + "\n", HOUR0)

    ingest.extract_events(settings, HOUR0)
    summary = ingest.validate_events(settings, HOUR0)

    assert (summary["staged"], summary["reasons"]) == (4, {"missing_user_id": 1})
    staged = Lake(settings.lake).read(lk.STAGING, HOUR0).sort_by("ts").to_pylist()
    assert [(r["event_type"], r["quantity"], r["price"]) for r in staged] == [
        ("purchase", 6, 2.55), ("purchase", 4, 3.39), ("refund", -6, 2.55), ("refund", -2, 2.55)
    ]  # fmt: skip
    for bucket in range(settings.buckets):
        build_profiles(settings, HOUR0, bucket)
    profiles = pa.concat_tables([Lake(settings.lake).read(lk.PROFILES, HOUR0, b) for b in range(settings.buckets)])
    assert profiles.column("monetary_total").to_pylist() == [8.46]  # 28.86 bought, 15.30 cancelled, 5.10 returned


def test_canonical_refunds_are_staged_with_negative_quantity(settings: Settings) -> None:
    header = "event_id,user_id,event_type,item_id,category_id,price,quantity,order_id,ts,session_id\n"
    rows = [
        "e1,u1,refund,i1,c1,4.5,2,o1,2026-11-02T10:05:00Z,",  # the sign the source wrote is irrelevant
        "e2,u1,refund,i1,c1,4.5,-1,o1,2026-11-02T10:06:00Z,",
        "e3,u1,purchase,i1,c1,4.5,-1,o1,2026-11-02T10:07:00Z,",  # a purchase still may not be negative
    ]
    target = Lake(settings.lake).partition(lk.LANDING, HOUR0) / "events.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(header + "\n".join(rows) + "\n")

    ingest.extract_events(settings, HOUR0)
    summary = ingest.validate_events(settings, HOUR0)

    assert summary["reasons"] == {"negative_quantity": 1}
    staged = Lake(settings.lake).read(lk.STAGING, HOUR0).sort_by("event_id")
    assert staged.column("quantity").to_pylist() == [-2, -1]


def test_negative_quantity_key_is_validated() -> None:
    document = yaml.safe_load(sources.resolve_mapping_path("order_lines").read_text())
    assert sources.parse_mapping(document).negative_quantity == "refund"
    with pytest.raises(sources.MappingError, match="negative_quantity: must be quarantine or refund"):
        sources.parse_mapping({**document, "negative_quantity": "return"})


def test_events_staged_before_local_hour_existed_keep_their_business_time_zone_hours(settings: Settings) -> None:
    lake = Lake(settings.lake)
    table = events(
        {"user_id": "u1", "ts": HOUR0 + timedelta(minutes=5), "bucket": 0},
        {"user_id": "u1", "ts": HOUR0 + timedelta(hours=2), "bucket": 0},  # held back in the state's pending
    ).drop_columns(["local_hour"])
    lake.write_partition(lk.STAGING, HOUR0, table, bucket=0)
    for later in (1, 2):
        lake.write_partition(lk.STAGING, HOUR0 + timedelta(hours=later), table.slice(0, 0), bucket=0)

    build_profiles(settings, HOUR0, 0)
    state = read_state(lake, HOUR0, 0)
    state.tables[PENDING] = state.tables[PENDING].drop_columns(["local_hour"])  # an older state's buffer
    # the checkpoint's other keys kept (its by-hour rows are in the sealed tiles it names), as an upgrade keeps them
    extra = lk.manifest_extra(lake.manifest(lk.STATE, HOUR0, 0))
    lake.write_partition(lk.STATE, HOUR0, state.tables, bucket=0, extra=extra)
    build_profiles(settings, HOUR0 + timedelta(hours=1), 0)
    build_profiles(settings, HOUR0 + timedelta(hours=2), 0)
    _, rebuilt = rebuild_bucket(settings, HOUR0 + timedelta(hours=2), 0)

    final = read_state(lake, HOUR0 + timedelta(hours=2), 0)
    hourly = final.tables
    # decayed sums are floats decayed in steps on the hourly path: equal to the verification's tolerance
    assert compare_tables(USER_EVENTS, rebuilt.tables[USER_EVENTS], hourly[USER_EVENTS], [USER_ID, "event_type"]).equal
    per_user = [name for name in hourly if name not in (USER_EVENTS, *BY_HOUR_TABLES)]
    assert {n: hourly[n] for n in per_user} == {n: rebuilt.tables[n] for n in per_user}
    # the by-hour tables as every reader sees them: the checkpoint's rows (none: each sealed by its hour) and the tiles
    con = cursor()
    register_by_hour(con, final, hour_ms(HOUR0 + timedelta(hours=3)), load_traits(settings.traits))
    for name in BY_HOUR_TABLES:
        seen = con.sql(f"SELECT * FROM s_{name}").to_arrow_table().to_pylist()
        assert sorted(seen, key=repr) == sorted(rebuilt.tables[name].to_pylist(), key=repr), name
    profile = snapshot_of(rebuilt, HOUR0 + timedelta(hours=3), settings)[0].to_pylist()[0]
    assert profile["peak_hour_local"] == 11  # 10:05 UTC in Berlin (UTC+1 in November)
    assert set(rebuilt.tables[HOURS_OF_DAY].column("hour_of_day").to_pylist()) == {11, 13}
    # the point-in-time rebuild of training examples starts from that older state as well
    at = HOUR0 + timedelta(hours=1)
    point = replay.profiles_at(settings, [at], 0, lambda hour, users: users)[at]
    hourly = snapshot_of(read_state(lake, at, 0), at + timedelta(hours=1), settings)[0]
    assert point.to_pylist() == hourly.to_pylist()
