"""Tests for profile_engine.segments: rule validation, assignment, hysteresis, cooldowns, control, exports."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import itertools
import json
import random
import re
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from profile_engine.config import Settings
from profile_engine.contracts.profiles import PROFILE_SCHEMA
from profile_engine.contracts.scores import SCORE_SCHEMA
from profile_engine.contracts.segments import SEGMENT_SCHEMA
from profile_engine.hours import HOUR, format_hour
from profile_engine.lake import storage as lk
from profile_engine.privacy.keys import ExportKeyError, export_key, pseudonymize
from profile_engine.segments.assign import assign_segments, share_checks
from profile_engine.segments.publish import merge_sorted_runs, publish_segments
from profile_engine.segments.rules import (
    CONTROL,
    DEFAULT_RULES_PATH,
    NO_ACTION,
    SegmentConfigError,
    SegmentRule,
    load_rules,
    rule_connection,
)
from profile_engine.segments.uplift import (
    chunked_exposure_starts,
    design_effect,
    exposure_starts,
    rate_difference,
    render_section_html,
    report_section,
    uplift,
    uplift_rows,
)

H0 = datetime(2026, 11, 1, 5, tzinfo=UTC)


# ---- fixtures: a contract-shaped profile snapshot ------------------------------------------


def plain_user(hour: datetime) -> dict[str, Any]:
    """An active visitor who qualifies for no default rule."""
    row: dict[str, Any] = {}
    for field in PROFILE_SCHEMA:
        if pa.types.is_integer(field.type):
            row[field.name] = 0
        elif pa.types.is_floating(field.type):
            row[field.name] = 0.0
        else:
            row[field.name] = None
    row.update(
        snapshot_hour=hour,
        first_seen_at=hour - timedelta(days=30),
        last_seen_at=hour,
        hours_since_last_event=1.0,
        hours_since_last_cart=None,
        hours_since_last_purchase=None,
        recency_hours=None,
        rfm_segment="no_orders",
        lifecycle_stage="active",
        session_count=3,
    )
    return row


def profiles_table(hour: datetime, users: dict[str, dict[str, Any]]) -> pa.Table:
    """A snapshot with one row per user: ``plain_user`` overridden by the given values."""
    rows = [{**plain_user(hour), **values, "user_id": user} for user, values in users.items()]
    return pa.Table.from_pylist(rows, schema=PROFILE_SCHEMA)


def scores_table(propensity: dict[str, float]) -> pa.Table:
    """A scores table for the given users."""
    users = sorted(propensity)
    return pa.table(
        {
            "user_id": users,
            "purchase_propensity": pa.array([propensity[u] for u in users], pa.float64()),
            "propensity_decile": pa.array([min(10, int(propensity[u] * 10) + 1) for u in users], pa.int8()),
            "model_version": ["v1"] * len(users),
        }
    )


def commit_hour(
    root: Path, hour: datetime, users: dict[str, dict[str, Any]], propensity: dict[str, float] | None
) -> None:
    """Commit a profile snapshot (bucket + hour marker) and, if given, scores for ``hour``."""
    lake = lk.Lake(root)
    table = profiles_table(hour, users)
    lake.write_partition(lk.PROFILES, hour, table, bucket=0)
    lk.write_json(
        lake.partition(lk.PROFILES, hour) / lk.MANIFEST, {"data_hour": format_hour(hour), "rows": table.num_rows}
    )
    if propensity is not None:
        lake.write_partition(lk.SCORES, hour, scores_table(propensity), bucket=0)


def rules_file(tmp_path: Path, rules: list[dict[str, Any]], name: str = "rules.yaml") -> Path:
    """Write a rules YAML file."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"version": 1, "segments": rules}, sort_keys=False))
    return path


def default_rules_without_control(tmp_path: Path) -> Path:
    """The shipped default rules with control groups switched off (so outcomes are exact)."""
    document = yaml.safe_load(DEFAULT_RULES_PATH.read_text())
    for rule in document["segments"]:
        rule.pop("control_share", None)
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def by_user(table: pa.Table) -> dict[str, dict[str, Any]]:
    """Segments rows keyed by user id."""
    return {row["user_id"]: row for row in table.to_pylist()}


EVAL_SCHEMA = pa.schema([*PROFILE_SCHEMA, *SCORE_SCHEMA])

COUPON = {"channel": "email", "offer": "coupon 10%"}
REMINDER = {"channel": "push", "offer": "cart reminder"}
SUPPRESS = {"channel": "all", "offer": "suppress"}

DEFAULT_USERS: dict[str, dict[str, Any]] = {
    "u1_intent": {},
    "u2_cart": {"open_cart_items": 2, "hours_since_last_cart": 3.0},
    "u3_top_spender": {"frequency_orders": 4, "monetary_total": 900.0, "rfm_segment": "loyal"},
    "u4_winback": {  # dormant and unlikely to buy, but loyal before: win-back, not suppression
        "lifecycle_stage": "dormant",
        "frequency_orders": 2,
        "monetary_total": 100.0,
        "hours_since_last_event": 400.0,
        "rfm_segment": "at_risk",
    },
    "u5_welcome": {"first_seen_at": H0 - timedelta(hours=2)},
    "u6_dormant": {"lifecycle_stage": "dormant", "hours_since_last_event": 900.0},
    "u7_plain": {},
    "u8_champion": {"frequency_orders": 3, "monetary_total": 50.0, "rfm_segment": "champions"},
    "u9_cart_and_intent": {"open_cart_items": 1, "hours_since_last_cart": 2.0},
}
DEFAULT_PROPENSITY = {u: 0.3 for u in DEFAULT_USERS} | {
    "u1_intent": 0.95,
    "u4_winback": 0.01,
    "u6_dormant": 0.01,
    "u9_cart_and_intent": 0.97,
}


# ---- rules: loading and validation -----------------------------------------------------------


def test_default_rules_load_sorted_by_priority_against_the_contract() -> None:
    rules = load_rules(DEFAULT_RULES_PATH, columns=EVAL_SCHEMA)

    assert [r.name for r in rules] == [
        "suppress_dormant",
        "vip_service",
        "cart_abandon",
        "high_intent",
        "win_back",
        "welcome",
    ]
    assert all(isinstance(r, SegmentRule) for r in rules)
    high_intent = next(r for r in rules if r.name == "high_intent")
    assert high_intent.stay == "propensity_decile >= 9"
    assert high_intent.action == "coupon_10pct"
    assert high_intent.enter_columns == ("propensity_decile",)


def test_default_rules_validate_against_the_production_column_list() -> None:
    rules = load_rules()

    assert {r.name for r in rules} >= {"suppress_dormant", "high_intent", "welcome"}


def test_rules_validate_against_bare_column_names(tmp_path: Path) -> None:
    path = rules_file(tmp_path, [{"name": "a", "enter": "score_x > 1 AND seg = 'x'", "action": COUPON, "priority": 1}])

    rules = load_rules(path, columns=["score_x", "seg"])

    assert rules[0].enter_columns == ("score_x", "seg")


GOOD = {"name": "good", "enter": "purchase_propensity > 0.5", "action": COUPON, "priority": 1}


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({"name": "bad", "enter": "no_such_column > 1", "action": COUPON, "priority": 2}, "no_such_column"),
        ({"name": "bad", "enter": "purchase_propensity >", "action": COUPON, "priority": 2}, "not valid SQL"),
        ({"name": "bad", "enter": "purchase_propensity + 1", "action": COUPON, "priority": 2}, "boolean"),
        ({"name": "bad", "enter": "true; DROP TABLE profiles", "action": COUPON, "priority": 2}, "';'"),
        ({"name": "bad", "enter": "true) AS v, (1", "action": COUPON, "priority": 2}, "not valid SQL"),
        ({"name": "bad", "enter": "true FROM profiles", "action": COUPON, "priority": 2}, "single expression"),
        ({"name": "bad", "enter": "now() > snapshot_end", "action": COUPON, "priority": 2}, "now"),
        (
            {
                "name": "bad",
                "enter": "(SELECT count(*) FROM read_csv('/etc/passwd')) > 0",
                "action": COUPON,
                "priority": 2,
            },
            "a subquery",
        ),
        (
            {
                "name": "bad",
                "enter": "EXISTS (SELECT 1 FROM read_parquet('/tmp/*.parquet'))",
                "action": COUPON,
                "priority": 2,
            },
            "a subquery",
        ),
        ({"name": "good", "enter": "true", "action": COUPON, "priority": 2}, "duplicate name"),
        ({"name": "bad", "enter": "true", "action": COUPON, "priority": 1}, "duplicate priority"),
        ({"name": "bad", "enter": "true", "action": COUPON}, "missing field(s) priority"),
        ({"name": "bad", "action": COUPON, "priority": 2}, "missing field(s) enter"),
        ({"name": "bad", "enter": "true", "action": {"channel": "email"}, "priority": 2}, "action.offer"),
        (
            {"name": "bad", "enter": "true", "action": {"channel": "email", "offer": "free pony"}, "priority": 2},
            "unknown offer",
        ),
        (
            {"name": "bad", "enter": "true", "action": {"channel": "fax", "offer": "welcome"}, "priority": 2},
            "unknown channel",
        ),
        ({"name": "bad", "enter": "true", "action": COUPON, "priority": 2, "control_share": 0.7}, "control_share"),
        ({"name": "bad", "enter": "true", "action": COUPON, "priority": 2, "cooldown": 5}, "unknown field(s) cooldown"),
        ({"name": "bad", "enter": "true", "stay": "oops(", "action": COUPON, "priority": 2}, "stay is not valid SQL"),
    ],
)
def test_invalid_rule_names_file_rule_and_problem(tmp_path: Path, bad: dict[str, Any], problem: str) -> None:
    path = rules_file(tmp_path, [GOOD, bad])

    with pytest.raises(SegmentConfigError) as caught:
        load_rules(path, columns=EVAL_SCHEMA)

    message = str(caught.value)
    assert str(path) in message
    assert f"'{bad['name']}' (#2)" in message
    assert problem in message


def test_file_reading_functions_are_refused_by_the_engine(tmp_path: Path) -> None:
    """Behind the grammar, the connection rules run on cannot read files either."""
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    con = rule_connection()
    try:
        with pytest.raises(Exception, match="disabled by configuration"):
            con.execute(f"SELECT count(*) FROM read_csv('{secret}')").fetchall()
    finally:
        con.close()


RUNAWAY = "(SELECT count(*) FROM range(1000000000000000)) > 0"


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        (RUNAWAY, "a subquery"),
        ("EXISTS (SELECT 1)", "a subquery"),
        ("purchase_propensity > (SELECT avg(purchase_propensity) FROM profiles)", "a subquery"),
        ("cume_dist() OVER (ORDER BY monetary_total) > 0.5", "a window function"),
        ("list_contains(range(1000000000000000), 3)", "the function range()"),
        ("length(repeat('x', 1000000000)) > 1", "the function repeat()"),
        ("getenv('HOME') IS NOT NULL", "the function getenv()"),
        ("current_setting('threads') = 1", "the function current_setting()"),
        ("len(list_filter([1, 2], x -> x > 1)) > 0", "the function list_filter()"),
        ("sum(frequency_orders) > 0", "the function sum()"),
        ("frequency_orders[1] > 0", "the operator array_extract"),
        ("main.abs(frequency_orders) > 0", "qualified"),
        ("user_id = 'u0000001'", "user_id outside md5_number() or md5()"),
        ("length(user_id) > 3", "user_id outside"),
        ("CAST(user_id AS INTEGER) % 2 = 0", "user_id outside"),
        ("md5_number(CAST(user_id AS INTEGER)) % 2 = 0", "user_id outside"),  # the cast could fail naming the id
        ("md5_number(user_id) % 2 = 0 OR user_id LIKE 'cust%'", "user_id outside"),
    ],
)
def test_rules_outside_the_grammar_are_refused_at_load(tmp_path: Path, expression: str, problem: str) -> None:
    """A rule is an expression over one profile's columns: no queries, no table functions, no raw ids."""
    path = rules_file(tmp_path, [GOOD, {"name": "runaway", "enter": expression, "action": COUPON, "priority": 2}])

    with pytest.raises(SegmentConfigError) as caught:
        load_rules(path, columns=EVAL_SCHEMA)

    message = str(caught.value)
    assert str(path) in message and "'runaway' (#2)" in message and "enter uses" in message
    assert problem in message


def test_stay_is_held_to_the_same_grammar(tmp_path: Path) -> None:
    path = rules_file(tmp_path, [{**GOOD, "stay": RUNAWAY}])

    with pytest.raises(SegmentConfigError, match=r"'good' \(#1\): stay uses a subquery"):
        load_rules(path)


@pytest.mark.parametrize(
    "expression",
    [
        "md5_number(user_id) % 100 < 50",
        "md5_number(user_id || 'exp7') % 100 >= 50 AND purchase_propensity > 0.1",
        "CASE WHEN rfm_segment = 'champions' THEN monetary_total > 10 ELSE false END",
        "coalesce(purchase_propensity, 0) >= 0.5 OR open_cart_items IS NOT NULL",
        "NOT (lifecycle_stage IN ('dormant', 'churned'))",
        "rfm_segment LIKE 'champ%' AND abs(monetary_total - 10) < least(5, greatest(1, frequency_orders))",
        "CAST(propensity_decile AS DOUBLE) / 10 BETWEEN 0.2 AND 0.9",
        "round(hours_since_first_seen) <= 24 AND lower(lifecycle_stage) <> 'x'",
        "snapshot_end - first_seen_at < INTERVAL 2 DAY",
    ],
)
def test_rules_inside_the_grammar_load(tmp_path: Path, expression: str) -> None:
    path = rules_file(tmp_path, [{**GOOD, "enter": expression}])

    assert load_rules(path, columns=EVAL_SCHEMA)[0].enter == expression


def test_reasons_name_conditions_on_user_id_without_the_id() -> None:
    users = {f"cust{i:04d}z": {"frequency_orders": i % 3} for i in range(40)}
    table = profiles_table(H0, users).append_column("purchase_propensity", pa.array([0.5] * 40, pa.float64()))
    rule = SegmentRule(
        name="ab",
        enter="md5_number(user_id) % 100 < 50 AND frequency_orders >= 1 AND md5(user_id) <> 'cust0001z'",
        offer="coupon 10%",
        channel="email",
        priority=1,
        enter_columns=("user_id", "frequency_orders"),
    )

    assigned, sizes = assign_segments(table, [rule])

    reasons = assigned.column("reason").to_pylist()
    assert 0 < sizes["ab"] < 40
    assert not [r for r in reasons if any(user in r for user in users)]
    # Comparisons with the user's values first, then the conditions on user_id (string literals masked).
    shown = "md5_number(user_id) % 100 < 50; md5(user_id) <> '\u2026'"
    assert set(reasons) == {f"ab: orders 1 \u2265 1; {shown}", f"ab: orders 2 \u2265 1; {shown}"}


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(SegmentConfigError, match="missing.yaml"):
        load_rules(tmp_path / "missing.yaml", columns=EVAL_SCHEMA)


# ---- publish: each rule, priority, suppression ---------------------------------------------


def test_each_default_rule_fires_for_the_user_built_for_it(tmp_path: Path) -> None:
    commit_hour(tmp_path, H0, DEFAULT_USERS, DEFAULT_PROPENSITY)

    summary = publish_segments(Settings(lake=tmp_path), H0, rules_path=default_rules_without_control(tmp_path))

    rows = by_user(lk.Lake(tmp_path).read(lk.SEGMENTS, H0))
    expected = {
        "u1_intent": ("high_intent", "coupon_10pct"),
        "u2_cart": ("cart_abandon", "cart_reminder"),
        "u3_top_spender": ("vip_service", "vip_service"),
        "u4_winback": ("win_back", "win_back_15pct"),
        "u5_welcome": ("welcome", "welcome"),
        "u6_dormant": ("suppress_dormant", "suppress"),
        "u9_cart_and_intent": ("cart_abandon", "cart_reminder"),
    }
    assert {u: (r["rule"], r["action"]) for u, r in rows.items()} == expected
    assert "u7_plain" not in rows
    assert rows["u9_cart_and_intent"]["segments"] == ["cart_abandon", "high_intent"]
    assert rows["u1_intent"]["reason"] == "high_intent: propensity decile 10"
    assert rows["u3_top_spender"]["reason"] == "vip_service: spend percentile 1 \u2265 0.95"  # the branch that held
    assert "u8_champion" not in rows  # champions are not VIPs unless they are the top 5% by spend
    assert rows["u2_cart"]["reason"] == "cart_abandon: open cart items 2 > 0; last cart 3h ago in 1h..24h"
    assert rows["u4_winback"]["reason"] == "win_back: orders 2 \u2265 2; last event 400h ago \u2265 336h"
    assert rows["u1_intent"]["purchase_propensity"] == 0.95
    assert summary["segments"] == {
        "suppress_dormant": 1,
        "vip_service": 1,
        "cart_abandon": 2,
        "high_intent": 2,
        "win_back": 1,
        "welcome": 1,
    }
    assert summary["actions"] == {
        "cart_reminder": 2,
        "coupon_10pct": 1,
        "suppress": 1,
        "vip_service": 1,
        "welcome": 1,
        "win_back_15pct": 1,
    }
    assert summary["segment_change"] == dict.fromkeys(summary["segments"])
    assert summary["scores_available"] is True
    assert json.loads(json.dumps(summary)) == summary  # small and JSON-able, for XCom


def test_suppression_beats_paid_actions_whatever_its_priority(tmp_path: Path) -> None:
    path = rules_file(
        tmp_path,
        [
            {"name": "coupon", "enter": "purchase_propensity >= 0.6", "action": COUPON, "priority": 1},
            {"name": "quiet", "enter": "lifecycle_stage = 'dormant'", "action": SUPPRESS, "priority": 99},
        ],
    )
    commit_hour(tmp_path, H0, {"a": {"lifecycle_stage": "dormant"}, "b": {}}, {"a": 0.9, "b": 0.9})

    summary = publish_segments(Settings(lake=tmp_path), H0, rules_path=path)

    rows = by_user(lk.Lake(tmp_path).read(lk.SEGMENTS, H0))
    assert (rows["a"]["action"], rows["a"]["rule"], rows["a"]["segments"]) == ("suppress", "quiet", ["coupon", "quiet"])
    assert rows["b"]["action"] == "coupon_10pct"
    assert summary["contacts"] == 1  # suppression is not a contact


def test_missing_scores_leave_propensity_null_and_say_so(tmp_path: Path) -> None:
    commit_hour(tmp_path, H0, DEFAULT_USERS, propensity=None)

    summary = publish_segments(Settings(lake=tmp_path), H0, rules_path=default_rules_without_control(tmp_path))

    assert summary["scores_available"] is False
    assert any("no scores committed" in note for note in summary["notes"])
    assert summary["segments"]["high_intent"] == 0
    assert summary["segments"]["suppress_dormant"] == 0


def test_uncommitted_snapshot_fails_naming_the_hour(tmp_path: Path) -> None:
    lake = lk.Lake(tmp_path)
    lake.write_partition(lk.PROFILES, H0, profiles_table(H0, {"a": {}}), bucket=0)  # no hour-level marker

    with pytest.raises(FileNotFoundError, match=re.escape(format_hour(H0))):
        publish_segments(Settings(lake=tmp_path), H0)


def test_bad_rules_fail_before_anything_is_written(tmp_path: Path) -> None:
    commit_hour(tmp_path, H0, DEFAULT_USERS, DEFAULT_PROPENSITY)
    path = rules_file(tmp_path, [{"name": "oops", "enter": "propensity > 0.5", "action": COUPON, "priority": 1}])

    with pytest.raises(SegmentConfigError, match="oops"):
        publish_segments(Settings(lake=tmp_path), H0, rules_path=path)

    assert not (tmp_path / lk.SEGMENTS).exists()
    assert not (tmp_path / lk.EXPORTS).exists()
    assert not (tmp_path / lk.CONTACTS).exists()


# ---- hysteresis and cooldown across hours ------------------------------------------------------


def test_hysteresis_keeps_members_while_stay_holds(tmp_path: Path) -> None:
    path = rules_file(
        tmp_path,
        [
            {
                "name": "intent",
                "enter": "purchase_propensity >= 0.6",
                "stay": "purchase_propensity >= 0.5",
                "action": COUPON,
                "priority": 1,
            }
        ],
    )
    hours = [H0, H0 + HOUR, H0 + 2 * HOUR]
    member_scores = [0.65, 0.55, 0.45]
    newcomer_scores = [0.3, 0.55, 0.55]
    users: dict[str, dict[str, object]] = {"member": {}, "newcomer": {}}

    results = []
    for hour, m, n in zip(hours, member_scores, newcomer_scores, strict=True):
        commit_hour(tmp_path, hour, users, {"member": m, "newcomer": n})
        results.append(publish_segments(Settings(lake=tmp_path), hour, rules_path=path))

    segments = [by_user(lk.Lake(tmp_path).read(lk.SEGMENTS, h)) for h in hours]
    assert set(segments[0]) == {"member"}
    assert set(segments[1]) == {"member"}  # stays at 0.55; the newcomer needs 0.6 to enter
    assert segments[1]["member"]["reason"] == "intent (stay): propensity 0.55 \u2265 0.5"
    assert segments[1]["member"]["held_by_stay"] == ["intent"]
    assert set(segments[2]) == set()
    assert [r["segment_change"]["intent"] for r in results] == [None, 0, -1]
    stability = [r["stability"]["intent"] for r in results]
    assert [s["held_by_stay"] for s in stability] == [0, 1, 0]  # one flip prevented, in the second hour
    assert [(s["entered"], s["exited"], s["stayed"]) for s in stability] == [(None, None, None), (0, 0, 1), (0, 1, 0)]
    assert [s["overlap"] for s in stability] == [None, 1.0, 0.0]


def test_cooldown_blocks_repeat_and_falls_back_to_next_rule(tmp_path: Path) -> None:
    path = rules_file(
        tmp_path,
        [
            {
                "name": "coupon",
                "enter": "purchase_propensity >= 0.6",
                "action": COUPON,
                "priority": 1,
                "cooldown_hours": 3,
            },
            {"name": "nudge", "enter": "open_cart_items > 0", "action": REMINDER, "priority": 2},
        ],
    )
    users = {"both": {"open_cart_items": 1}, "coupon_only": {}}
    hours = [H0 + i * HOUR for i in range(4)]

    actions = []
    for hour in hours:
        commit_hour(tmp_path, hour, users, {"both": 0.9, "coupon_only": 0.9})
        publish_segments(Settings(lake=tmp_path), hour, rules_path=path)
        rows = by_user(lk.Lake(tmp_path).read(lk.SEGMENTS, hour))
        actions.append((rows["both"]["action"], rows["coupon_only"]["action"]))

    assert actions == [
        ("coupon_10pct", "coupon_10pct"),
        ("cart_reminder", NO_ACTION),
        ("cart_reminder", NO_ACTION),
        ("coupon_10pct", "coupon_10pct"),
    ]
    second = by_user(lk.Lake(tmp_path).read(lk.SEGMENTS, hours[1]))
    assert second["coupon_only"]["reason"] == "cooldown: coupon"
    assert second["both"]["reason"].endswith("| cooldown: coupon")


def test_cooldown_boundary_is_exclusive() -> None:
    population = synthetic_population(3)
    rule = SegmentRule(
        name="coupon",
        enter="purchase_propensity >= 0.6",
        offer="coupon 10%",
        channel="email",
        priority=1,
        cooldown_hours=3,
    )
    contacts = pa.table(
        {
            "user_id": ["user-00000", "user-00001", "user-00002"],
            "action": ["coupon_10pct", "coupon_10pct", "cart_reminder"],
            "hours_ago": pa.array([2, 3, 1], pa.int64()),
        }
    )

    assigned, _ = assign_segments(population, [rule], contacts=contacts)

    assert assigned.column("action").to_pylist() == [NO_ACTION, "coupon_10pct", "coupon_10pct"]


# ---- control group -----------------------------------------------------------------------


def synthetic_population(n: int) -> pa.Table:
    """``n`` users who all qualify for a propensity rule."""
    users = [f"user-{i:05d}" for i in range(n)]
    table = profiles_table(H0, dict.fromkeys(users, {}))
    return table.append_column("purchase_propensity", pa.array([0.9] * n, pa.float64()))


def control_rule(name: str, share: float) -> SegmentRule:
    return SegmentRule(
        name=name,
        enter="purchase_propensity >= 0.6",
        offer="coupon 10%",
        channel="email",
        priority=1,
        control_share=share,
        enter_columns=("purchase_propensity",),
    )


def test_control_group_is_deterministic_and_about_the_configured_share() -> None:
    population = synthetic_population(1000)
    shuffled = population.take(random.Random(3).sample(range(1000), 1000))

    first, _ = assign_segments(population, [control_rule("intent", 0.2)])
    again, _ = assign_segments(shuffled, [control_rule("intent", 0.2)])
    other, _ = assign_segments(population, [control_rule("intent_b", 0.2)])

    held = {r["user_id"] for r in first.to_pylist() if r["control"]}
    assert held == {r["user_id"] for r in again.to_pylist() if r["control"]}
    assert 170 <= len(held) <= 230
    assert all(r["action"] == CONTROL for r in first.to_pylist() if r["control"])
    assert held != {r["user_id"] for r in other.to_pylist() if r["control"]}  # hashed with the rule name


def test_zero_control_share_holds_nobody_out() -> None:
    assigned, _ = assign_segments(synthetic_population(200), [control_rule("intent", 0.0)])

    assert not any(assigned.column("control").to_pylist())


# ---- rerun, dry run, exports ------------------------------------------------------------


def test_rerun_gives_same_output_and_does_not_double_count_contacts(tmp_path: Path) -> None:
    commit_hour(tmp_path, H0, DEFAULT_USERS, DEFAULT_PROPENSITY)
    settings_ = Settings(lake=tmp_path)
    lake = lk.Lake(tmp_path)

    first = publish_segments(settings_, H0, run_id="r1")
    segments_first = lake.read(lk.SEGMENTS, H0)
    exports_first = {p.name: p.read_bytes() for p in lake.partition(lk.EXPORTS, H0).glob("*.csv")}
    second = publish_segments(settings_, H0, run_id="r2")

    assert lake.read(lk.SEGMENTS, H0).equals(segments_first)
    assert {p.name: p.read_bytes() for p in lake.partition(lk.EXPORTS, H0).glob("*.csv")} == exports_first
    contact_files = list((tmp_path / lk.CONTACTS).rglob("*.parquet"))
    assert len(contact_files) == 1
    assert pq.read_table(contact_files[0]).num_rows == first["contacts"] == second["contacts"] > 0
    volatile = ("run_id", "export_key", "notes")  # the first run generated the development key and said so
    assert {k: v for k, v in first.items() if k not in volatile} == {
        k: v for k, v in second.items() if k not in volatile
    }
    assert first["export_key"]["key_id"] == second["export_key"]["key_id"]


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    commit_hour(tmp_path, H0, DEFAULT_USERS, DEFAULT_PROPENSITY)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    summary = publish_segments(Settings(lake=tmp_path), H0, dry_run=True)

    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert summary["dry_run"] is True
    assert summary["members"] == 7  # the 9 built users but u7_plain and u8_champion (not top 5% by spend)
    assert summary["segments_path"] is None


def test_export_manifest_checksums_and_rows_match_files(tmp_path: Path) -> None:
    commit_hour(tmp_path, H0, DEFAULT_USERS, DEFAULT_PROPENSITY)

    summary = publish_segments(Settings(lake=tmp_path), H0, run_id="r1")

    export_dir = Path(summary["exports_path"])
    manifest = lk.read_json(export_dir / lk.MANIFEST)
    assert manifest["run_id"] == "r1"
    assert manifest["data_hour"] == format_hour(H0)
    assert manifest["rules_sha256"] == hashlib.sha256(DEFAULT_RULES_PATH.read_bytes()).hexdigest()
    assert manifest["model_version"] == "v1"
    assert manifest["segments"] == summary["segments"]
    assert set(manifest["changes"]) == set(summary["segments"])
    assert {f["name"] for f in manifest["files"]} == {p.name for p in export_dir.iterdir()} - {lk.MANIFEST}
    segments = lk.Lake(tmp_path).read(lk.SEGMENTS, H0).to_pylist()
    key = export_key(Settings(lake=tmp_path))
    for entry in manifest["files"]:
        payload = (export_dir / entry["name"]).read_bytes()
        assert hashlib.sha256(payload).hexdigest() == entry["sha256"]
        action, suffix = entry["name"].rsplit(".", 1)
        if suffix == "csv":
            rows = list(csv.DictReader(io.StringIO(payload.decode())))
        else:
            rows = pq.read_table(export_dir / entry["name"]).to_pylist()
        assert len(rows) == manifest["rows"][action]
        members = [s for s in segments if s["action"] == action]
        assert {r["user_key"] for r in rows} == set(pseudonymize([s["user_id"] for s in members], key))
        assert {r["reason"] for r in rows} == {s["reason"] for s in members}
    assert "control.csv" not in {f["name"] for f in manifest["files"]}


# ---- property: one coherent action per user ---------------------------------------------------

PROPERTY_RULES = [
    SegmentRule(name="hush", enter="lifecycle_stage = 'dormant'", offer="suppress", channel="all", priority=5),
    SegmentRule(
        name="cart", enter="open_cart_items > 0", offer="cart reminder", channel="push", priority=1, control_share=0.3
    ),
    SegmentRule(
        name="intent",
        enter="purchase_propensity >= 0.6",
        stay="purchase_propensity >= 0.4",
        offer="coupon 10%",
        channel="email",
        priority=2,
    ),
    SegmentRule(name="loyal", enter="frequency_orders >= 2", offer="win-back 15%", channel="sms", priority=3),
]


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 1), st.integers(0, 3), st.integers(0, 4), st.sampled_from(["active", "dormant"]), st.booleans()
        ),
        min_size=1,
        max_size=30,
    )
)
def test_every_member_gets_one_coherent_action(users: list[tuple[float, int, int, str, bool]]) -> None:
    ids = [f"u{i:03d}" for i in range(len(users))]
    table = profiles_table(
        H0,
        {
            u: {"open_cart_items": c, "frequency_orders": f, "lifecycle_stage": s}
            for u, (_, c, f, s, _) in zip(ids, users, strict=True)
        },
    ).append_column("purchase_propensity", pa.array([p for p, *_ in users], pa.float64()))
    previous = pa.table(
        {
            "user_id": [u for u, (*_, was) in zip(ids, users, strict=True) if was],
            "segments": pa.array([["intent"] for *_, was in users if was], pa.list_(pa.string())),
        }
    )

    assigned, sizes = assign_segments(table, PROPERTY_RULES, previous)

    rows = assigned.to_pylist()
    assert assigned.schema.equals(SEGMENT_SCHEMA)
    assert [r["user_id"] for r in rows] == sorted({r["user_id"] for r in rows})
    priority = {r.name: r.priority for r in PROPERTY_RULES}
    for row in rows:
        (p, c, f, s, was) = users[ids.index(row["user_id"])]
        expected = [
            name
            for name, member in (
                ("cart", c > 0),
                ("intent", p >= 0.6 or (was and p >= 0.4)),
                ("loyal", f >= 2),
                ("hush", s == "dormant"),
            )
            if member
        ]
        assert row["segments"] == sorted(expected, key=priority.__getitem__)
        wanted = "hush" if "hush" in expected else min(expected, key=priority.__getitem__)
        assert row["rule"] == wanted
        assert row["control"] == (row["action"] == CONTROL)
        assert not (row["control"] and wanted == "hush")
    assert sum(sizes.values()) == sum(len(r["segments"]) for r in rows)


COOLING_RULES = [
    SegmentRule(name="hush", enter="lifecycle_stage = 'dormant'", offer="suppress", channel="all", priority=5),
    SegmentRule(
        name="cart",
        enter="open_cart_items > 0",
        offer="cart reminder",
        channel="push",
        priority=1,
        cooldown_hours=2,
        stay="open_cart_items >= 0",
    ),
    SegmentRule(
        name="intent",
        enter="purchase_propensity >= 0.6",
        stay="purchase_propensity >= 0.4",
        offer="coupon 10%",
        channel="email",
        priority=2,
        cooldown_hours=3,
    ),
    SegmentRule(
        name="loyal", enter="frequency_orders >= 2", offer="win-back 15%", channel="sms", priority=3, cooldown_hours=1
    ),
]


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 1),
            st.integers(0, 2),
            st.integers(0, 3),
            st.sampled_from(["active", "dormant"]),
            st.lists(st.sampled_from([r.name for r in COOLING_RULES]), max_size=3, unique=True),
            st.lists(
                st.tuples(st.sampled_from(["cart_reminder", "coupon_10pct", "win_back_15pct"]), st.integers(0, 4))
            ),
            st.booleans(),
        ),
        min_size=1,
        max_size=30,
    ),
    st.permutations(range(len(COOLING_RULES))),
)
def test_memberships_held_by_stay_and_the_acting_rule_are_those_of_each_users_flags(
    users: list[tuple[float, int, int, str, list[str], list[tuple[str, int]], bool]], order: list[int]
) -> None:
    """Per user (issue 19: the assignment builds these from each user's row, not by aggregating memberships): the
    segments and those held by a stay condition in priority order, and the acting rule the first in (suppress,
    priority) order that is not cooling down, whatever the order the rules come in."""
    ids = [f"u{i:03d}" for i in range(len(users))]
    table = profiles_table(
        H0,
        {
            u: {"open_cart_items": c, "frequency_orders": f, "lifecycle_stage": s}
            for u, (_, c, f, s, *_) in zip(ids, users, strict=True)
        },
    ).append_column("purchase_propensity", pa.array([user[0] for user in users], pa.float64()))
    previous = pa.table(
        {
            "user_id": [u for u, user in zip(ids, users, strict=True) if user[4]],
            "segments": pa.array([user[4] for user in users if user[4]], pa.list_(pa.string())),
        }
    )
    contacts = pa.table(
        {
            "user_id": [u for u, user in zip(ids, users, strict=True) for _ in user[5]],
            "action": [a for user in users for a, _ in user[5]],
            "hours_ago": pa.array([h for user in users for _, h in user[5]], pa.int64()),
        }
    )
    optouts = pa.table({"user_id": [u for u, user in zip(ids, users, strict=True) if user[6]]})
    rules = [COOLING_RULES[i] for i in order]

    assigned, sizes = assign_segments(table, rules, previous, contacts, optouts)

    rows = {r["user_id"]: r for r in assigned.to_pylist()}
    by_priority = sorted(COOLING_RULES, key=lambda r: r.priority)
    for u, (p, c, f, s, was, contacted, opted) in zip(ids, users, strict=True):
        enter = {"hush": s == "dormant", "cart": c > 0, "intent": p >= 0.6, "loyal": f >= 2}
        stay = {"hush": False, "cart": c >= 0, "intent": p >= 0.4, "loyal": False}
        member = [r.name for r in by_priority if enter[r.name] or (r.name in was and stay[r.name])]
        if not member:
            assert u not in rows
            continue
        row = rows[u]
        assert row["segments"] == member
        assert row["held_by_stay"] == [name for name in member if not enter[name]]
        cooling = {r.name for r in rules if any(a == r.action and h < r.cooldown_hours for a, h in contacted)}
        acting = [r.name for r in sorted(rules, key=lambda r: (not r.suppress, r.priority)) if r.name in member]
        free = [name for name in acting if name not in cooling]
        assert row["rule"] == (free[0] if free else None)
        if opted:
            assert row["action"] == "opted_out"
        elif not free:
            assert row["action"] == NO_ACTION
            assert row["reason"] == "cooldown: " + ", ".join(name for name in member if name in cooling)
        else:
            stayed = row["reason"].startswith(free[0] + " (stay)")
            assert row["reason"].startswith(free[0]) and stayed == (not enter[free[0]])
    assert sum(sizes.values()) == sum(len(r["segments"]) for r in rows.values())


# ---- opt-outs, pseudonyms ------------------------------------------------------------------


def test_opted_out_users_are_recorded_but_never_exported_or_contacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy as sa

    monkeypatch.setenv("PROFILE_ENGINE_EXPORT_KEY", "x" * 32)
    commit_hour(tmp_path, H0, DEFAULT_USERS, DEFAULT_PROPENSITY)
    optout_dir = tmp_path / lk.OPTOUT
    optout_dir.mkdir(parents=True)
    (optout_dir / "crm.csv").write_text("user_id\nu2_cart\n")
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'consent.db'}")
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE marketing_optouts (user_id TEXT)"))
        connection.execute(sa.text("INSERT INTO marketing_optouts VALUES ('u6_dormant')"))

    summary = publish_segments(Settings(lake=tmp_path), H0, optout_engine=engine)

    rows = by_user(lk.Lake(tmp_path).read(lk.SEGMENTS, H0))
    assert rows["u2_cart"]["action"] == rows["u6_dormant"]["action"] == "opted_out"
    assert rows["u2_cart"]["reason"] == "opted out of marketing" and not rows["u2_cart"]["control"]
    assert summary["opted_out"] == 2
    key = export_key(Settings(lake=tmp_path))
    withdrawn = set(pseudonymize(["u2_cart", "u6_dormant"], key))
    exported = set()
    for path in Path(summary["exports_path"]).glob("*.parquet"):
        exported |= set(pq.read_table(path).column("user_key").to_pylist())
    assert exported and not exported & withdrawn
    contacts = pq.read_table(next((tmp_path / lk.CONTACTS).rglob("*.parquet"))).column("user_id").to_pylist()
    assert "u2_cart" not in contacts


def test_exports_carry_keyed_pseudonyms_never_raw_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROFILE_ENGINE_EXPORT_KEY", "a" * 32)
    commit_hour(tmp_path, H0, DEFAULT_USERS, DEFAULT_PROPENSITY)

    summary = publish_segments(Settings(lake=tmp_path), H0)
    monkeypatch.setenv("PROFILE_ENGINE_EXPORT_KEY", "b" * 32)
    other = publish_segments(Settings(lake=tmp_path), H0)

    export_dir = Path(summary["exports_path"])
    text = b"".join(p.read_bytes() for p in export_dir.iterdir())
    assert not any(user.encode() in text for user in DEFAULT_USERS)
    expected = hmac.new(b"b" * 32, b"u1_intent", hashlib.sha256).hexdigest()
    coupon = list(csv.DictReader(io.StringIO((export_dir / "coupon_10pct.csv").read_text())))
    assert coupon[0]["user_key"] == expected  # the files now hold the second key's pseudonyms
    assert summary["export_key"]["key_id"] != other["export_key"]["key_id"]
    assert lk.read_json(export_dir / lk.MANIFEST)["key_id"] == other["export_key"]["key_id"]


def test_production_without_a_key_fails_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROFILE_ENGINE_EXPORT_KEY", raising=False)
    commit_hour(tmp_path, H0, DEFAULT_USERS, DEFAULT_PROPENSITY)

    with pytest.raises(ExportKeyError, match="PROFILE_ENGINE_EXPORT_KEY"):
        publish_segments(Settings(lake=tmp_path, environment="production"), H0)

    assert not (tmp_path / lk.SEGMENTS).exists() and not (tmp_path / lk.EXPORTS).exists()
    production = Settings(lake=tmp_path, environment="production")
    assert export_key(production, connection_key="c" * 32).source.startswith("Airflow Connection")
    with pytest.raises(ExportKeyError, match="shorter"):
        export_key(production, environ={"PROFILE_ENGINE_EXPORT_KEY": "short"})


def test_development_generates_one_local_key_and_says_so(tmp_path: Path) -> None:
    settings_ = Settings(lake=tmp_path)

    first = export_key(settings_, environ={})
    second = export_key(settings_, environ={})

    path = tmp_path / lk.META / "export_key"
    assert first.generated and not second.generated
    assert first.secret == second.secret == path.read_text().encode()
    assert str(path) in first.source and "generated now" in first.source
    assert path.stat().st_mode & 0o777 == 0o600
    assert "secret" not in repr(first) or first.secret.decode() not in repr(first)


# ---- uplift, stability over time, report ---------------------------------------------------


def test_uplift_compares_buyers_after_treated_and_control_contacts(tmp_path: Path) -> None:
    settings_ = Settings(lake=tmp_path, label_horizon_hours=2, lateness_hours=1)
    lake = lk.Lake(tmp_path)
    treated = [f"t{i}" for i in range(10)]
    control = [f"c{i}" for i in range(10)]
    contacts = pa.table(
        {
            "user_id": treated + control,
            "action": ["coupon_10pct"] * 10 + ["control"] * 10,
            "rule": ["intent"] * 20,
            "hour": pa.array([H0] * 20, pa.timestamp("ms", tz="UTC")),
        }
    )
    lake.write_partition(lk.CONTACTS, H0, contacts)
    buyers = [*treated[:6], control[0], "c9"]  # 6/10 treated, 2/10 control
    times = [H0 + HOUR + timedelta(minutes=30)] * 7 + [H0 + 3 * HOUR]  # c9 buys after the window
    lake.write_partition(
        lk.STAGING,
        H0 + HOUR,
        pa.table(
            {
                "user_id": buyers,
                "event_type": ["purchase"] * 8,
                "ts": pa.array(times, pa.timestamp("ms", tz="UTC")),
            }
        ),
        bucket=0,
    )

    early = uplift(settings_, H0 + 2 * HOUR)
    result = uplift(settings_, H0 + 3 * HOUR)

    assert early["rules"] == []  # window + lateness not over yet
    (row,) = result["rules"]
    assert (row["treated"], row["treated_buyers"], row["control"], row["control_buyers"]) == (10, 6, 10, 1)
    assert row["uplift"] == pytest.approx(0.5)
    assert row["low"] < 0.5 < row["high"] and row["low"] >= -1 and row["high"] <= 1


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 40), st.integers(1, 40), st.integers(0, 40), st.integers(1, 40))
def test_uplift_interval_contains_the_estimate(b1: int, n1: int, b2: int, n2: int) -> None:
    b1, b2 = min(b1, n1), min(b2, n2)

    interval = rate_difference((b1, n1), (b2, n2))

    assert interval["low"] is not None and interval["high"] is not None and interval["uplift"] is not None
    assert -1 <= interval["low"] <= interval["uplift"] + 1e-9 <= interval["high"] + 2e-9 <= 1 + 2e-9


def test_report_section_has_stability_and_a_png_chart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROFILE_ENGINE_EXPORT_KEY", "z" * 32)
    settings_ = Settings(lake=tmp_path)
    for hour in (H0, H0 + HOUR):
        commit_hour(tmp_path, hour, DEFAULT_USERS, DEFAULT_PROPENSITY)
        publish_segments(settings_, hour)

    section, chart = report_section(settings_, H0 + HOUR)

    assert section["stability"]["cart_abandon"] == {
        "size": 2,
        "held_by_stay": 0,
        "control": section["stability"]["cart_abandon"]["control"],
        "previous_size": 2,
        "entered": 0,
        "exited": 0,
        "stayed": 2,
        "overlap": 1.0,
    }
    assert chart is not None and chart.startswith(b"\x89PNG")
    html_page = render_section_html(section)
    assert "cart_abandon" in html_page and section["chart"] in html_page


def _stability_by_sets(
    assigned: dict[str, list[Any]], previous: dict[str, list[Any]] | None, rule_names: list[str]
) -> dict[str, dict[str, Any]]:
    """The definition of segment_stability with Python sets (the reference for the DuckDB version)."""
    current: dict[str, set[str]] = {name: set() for name in rule_names}
    held = dict.fromkeys(rule_names, 0)
    control = dict.fromkeys(rule_names, 0)
    for uid, names, stayed, rule, is_control in zip(
        assigned["user_id"],
        assigned["segments"],
        assigned["held_by_stay"],
        assigned["rule"],
        assigned["control"],
        strict=True,
    ):
        for name in names:
            current.setdefault(name, set()).add(uid)
        for name in stayed:
            held[name] = held.get(name, 0) + 1
        if is_control and rule is not None:
            control[rule] = control.get(rule, 0) + 1
    result: dict[str, dict[str, Any]] = {}
    for name, members in current.items():
        row: dict[str, Any] = {"size": len(members), "held_by_stay": held.get(name, 0), "control": control.get(name, 0)}
        if previous is None:
            row.update(previous_size=None, entered=None, exited=None, stayed=None, overlap=None)
        else:
            old = {u for u, ns in zip(previous["user_id"], previous["segments"], strict=True) if name in ns}
            union = len(members | old)
            row.update(
                previous_size=len(old),
                entered=len(members - old),
                exited=len(old - members),
                stayed=len(members & old),
                overlap=round(len(members & old) / union, 4) if union else None,
            )
        result[name] = row
    return result


_NAMES = ["intent", "cart", "vip", "winback"]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.lists(st.sampled_from(_NAMES), max_size=3, unique=True),
            st.booleans(),
            st.booleans(),
        ),
        max_size=25,
    ),
    before=st.none() | st.lists(st.lists(st.sampled_from(_NAMES), max_size=3, unique=True), max_size=25),
)
def test_segment_stability_equals_the_set_definition(
    rows: list[tuple[list[str], bool, bool]], before: list[list[str]] | None
) -> None:
    # Arrange: users u0..; a member's rule is its first segment, held_by_stay a prefix of its segments
    from profile_engine.segments.publish import segment_stability

    assigned: dict[str, list[Any]] = {
        "user_id": [f"u{i}" for i in range(len(rows))],
        "segments": [names for names, _, _ in rows],
        "held_by_stay": [names[:1] if by_stay else [] for names, by_stay, _ in rows],
        "rule": [names[0] if names else None for names, _, _ in rows],
        "control": [is_control for _, _, is_control in rows],
    }
    previous: dict[str, list[Any]] | None = (
        None if before is None else {"user_id": [f"u{i}" for i in range(len(before))], "segments": before}
    )
    rule_names = _NAMES[:3]  # "winback" only appears as a segment name outside the rules

    # Act
    got = segment_stability(
        pa.table(assigned),
        None
        if previous is None
        else pa.table(previous, schema=pa.schema([("user_id", pa.string()), ("segments", pa.list_(pa.string()))])),
        rule_names,
    )

    # Assert
    assert got == _stability_by_sets(assigned, previous, rule_names)


# ---- uplift coverage under a known zero effect -------------------------------------------


def simulated_contacts(
    seed: int, users: int = 400, hours: int = 240, horizon: int = 24, cooldown: int = 72
) -> pa.Table:
    """Labelled contact rows of a cart-abandon rule with no effect of the action, recorded as ``publish_segments`` does.

    Like the simulator (whose users never see a contact, so every action has a true effect
    of 0), users have a persistent purchase and cart propensity. A user is a member while
    their last cart event is < 24 h old and not followed by a purchase; a fixed 20% of
    users is the control group (the md5 hold-out is fixed per user and rule); each hour a
    treated member is contacted unless contacted < ``cooldown`` hours ago, and a control
    member is recorded every hour (``assign_segments``: action ``control`` never blocks).
    The label is a purchase in ``[C+1h, C+1h+horizon)``, as ``labels.label_examples``.
    """
    from profile_engine.model.labels import LABEL

    rng = np.random.default_rng(seed)
    intent = rng.normal(0, 1, users)
    buy = np.minimum(0.004 * np.exp(intent), 0.5)  # hourly purchase probability
    cart = np.minimum(0.02 * np.exp(0.5 * intent + rng.normal(0, 0.5, users)), 0.5)
    bought = rng.random((hours + horizon + 1, users)) < buy
    carted = rng.random((hours, users)) < cart
    control = rng.random(users) < 0.2
    purchases_before = np.vstack([np.zeros(users, np.int64), np.cumsum(bought, axis=0)])
    never = -(10**6)
    last_cart, last_buy, last_treated = (np.full(users, never) for _ in range(3))
    columns: dict[str, list[Any]] = {"user_id": [], "action": [], "hour": [], LABEL: []}
    for t in range(hours):
        last_cart = np.where(carted[t], t, last_cart)
        last_buy = np.where(bought[t], t, last_buy)
        member = (t - last_cart < 24) & (last_buy < last_cart)
        treated = member & ~control & (t - last_treated >= cooldown)
        last_treated = np.where(treated, t, last_treated)
        label = purchases_before[t + 1 + horizon] - purchases_before[t + 1] > 0
        for mask, action in ((treated, "cart_reminder"), (member & control, CONTROL)):
            index = np.flatnonzero(mask)
            columns["user_id"] += [f"u{i}" for i in index]
            columns["action"] += [action] * index.size
            columns["hour"] += [H0 + t * HOUR] * index.size
            columns[LABEL] += label[index].astype(int).tolist()
    return pa.table(
        {
            "user_id": columns["user_id"],
            "action": columns["action"],
            "rule": ["cart_abandon"] * len(columns["user_id"]),
            "hour": pa.array(columns["hour"], pa.timestamp("ms", tz="UTC")),
            LABEL: pa.array(columns[LABEL], pa.int8()),
        }
    )


def test_uplift_interval_covers_a_zero_effect_in_about_95_percent_of_seeds() -> None:
    # Arrange: 80 seeds of a rule whose action has no effect (cooldown 72 h, control counted every member hour)
    tables = [simulated_contacts(seed) for seed in range(80)]

    # Act: exposures per user and cooldown period on both sides, interval clustered by user
    rows = [uplift_rows(exposure_starts(t, {"cart_abandon": 72}), {"cart_abandon": 72})[0] for t in tables]

    # Assert: binomial sd of the coverage over 80 seeds is 2.4 points, 0.88 is three below 0.95 (measured: 74 of 80).
    # Counting every contact row unclustered (the old uplift) covered 0 in 49 of 80: lingering non-buyers weigh more
    # in control, and a user's many rows were taken as independent.
    coverage = np.mean([row["low"] <= 0 <= row["high"] for row in rows])
    assert coverage >= 0.88, coverage
    assert all(row["treated"] < row["treated_users"] * 240 / 72 + 1 for row in rows)
    recorded = [t.column("action").to_pylist().count(CONTROL) for t in tables]
    assert all(row["control_users"] <= row["control"] < n for row, n in zip(rows, recorded, strict=True))


def test_exposure_starts_count_a_user_once_per_cooldown_on_both_sides() -> None:
    # Arrange: control user c recorded every hour for 5 hours; treated user t contacted at 0 and 3 (cooldown 3)
    hours = [H0 + k * HOUR for k in (0, 1, 2, 3, 4, 0, 3)]
    contacts = pa.table(
        {
            "user_id": ["c"] * 5 + ["t"] * 2,
            "action": [CONTROL] * 5 + ["coupon_10pct"] * 2,
            "rule": ["intent"] * 7,
            "hour": pa.array(hours, pa.timestamp("ms", tz="UTC")),
        }
    )

    # Act
    starts = exposure_starts(contacts, {"intent": 3})

    # Assert
    assert list(zip(starts.column("user_id").to_pylist(), starts.column("hour").to_pylist(), strict=True)) == [
        ("c", H0),
        ("c", H0 + 3 * HOUR),
        ("t", H0),
        ("t", H0 + 3 * HOUR),
    ]
    assert exposure_starts(contacts, {}).num_rows == 7  # a rule without a known cooldown: every hour


def _greedy_starts(contacts: pa.Table, periods: dict[str, int]) -> list[tuple[str, str, datetime]]:
    """Exposure starts by a plain loop over the sorted rows (what ``exposure_starts`` computes)."""
    rows = sorted(zip(*(contacts.column(c).to_pylist() for c in ("rule", "user_id", "hour")), strict=True))
    starts, current, next_start = [], None, H0
    for rule, user, hour in rows:
        if (rule, user) != current or hour >= next_start:
            current, next_start = (rule, user), hour + max(1, periods.get(rule, 1)) * HOUR
            starts.append((rule, user, hour))
    return starts


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("xyz"), st.integers(0, 30)), max_size=60))
def test_exposure_starts_are_those_of_the_plain_loop(rows: list[tuple[str, str, int]]) -> None:
    contacts = pa.table(
        {
            "user_id": [f"u{r[1]}" for r in rows],
            "action": ["coupon_10pct"] * len(rows),
            "rule": [r[0] for r in rows],
            "hour": pa.array([H0 + r[2] * HOUR for r in rows], pa.timestamp("ms", tz="UTC")),
        }
    )
    periods = {"a": 4, "b": 1}  # "c" has none: every hour starts one

    starts = exposure_starts(contacts, periods)

    got = list(zip(*(starts.column(c).to_pylist() for c in ("rule", "user_id", "hour")), strict=True))
    assert got == _greedy_starts(contacts, periods)  # same rows, in the same order (rule, user, hour)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("xyz"), st.integers(0, 30)), max_size=60),
    st.integers(1, 25),
)
def test_exposure_starts_a_chunk_of_hours_at_a_time_are_those_of_every_contact_at_once(
    rows: list[tuple[str, str, int]], chunk_rows: int
) -> None:
    contacts = pa.table(
        {
            "user_id": [f"u{r[1]}" for r in rows],
            "action": ["coupon_10pct"] * len(rows),
            "rule": [r[0] for r in rows],
            "hour": pa.array([H0 + r[2] * HOUR for r in rows], pa.timestamp("ms", tz="UTC")),
        }
    )
    periods = {"a": 4, "b": 1}
    hours = [
        contacts.filter(pc.equal(contacts.column("hour"), pa.scalar(H0 + k * HOUR, contacts.schema.field("hour").type)))
        for k in range(31)
    ]

    chunks = list(chunked_exposure_starts(iter(hours), periods, chunk_rows))

    assert all(c.schema == contacts.schema for c in chunks)
    got = sorted(
        zip(
            *(
                pa.concat_tables([contacts.slice(0, 0), *chunks]).column(c).to_pylist()
                for c in ("rule", "user_id", "hour")
            ),
            strict=True,
        )
    )
    assert got == _greedy_starts(contacts, periods)


def test_design_effect_of_counted_users_equals_the_users_listed_one_by_one() -> None:
    pairs = {(0, 1): 7, (1, 1): 2, (0, 5): 3, (2, 4): 1, (3, 3): 2}
    buyers = [b for (b, _), users in pairs.items() for _ in range(users)]
    exposures = [n for (_, n), users in pairs.items() for _ in range(users)]

    counted = design_effect([b for b, _ in pairs], [n for _, n in pairs], list(pairs.values()))

    assert counted == design_effect(buyers, exposures) > 1
    assert counted == pytest.approx(_design_effect_by_floats(buyers, exposures), rel=1e-12)


def _design_effect_by_floats(buyers: list[int], exposures: list[int]) -> float:
    m, total = len(exposures), float(sum(exposures))
    p = sum(buyers) / total
    robust = m / (m - 1) * sum((b - p * n) ** 2 for b, n in zip(buyers, exposures, strict=True)) / total**2
    return max(1.0, robust / (p * (1 - p) / total))


UPLIFT_BUCKETS = 4


def _bucketed_uplift_lake(root: Path, whole_hours: tuple[int, ...] = ()) -> tuple[Settings, datetime, pa.Table]:
    """Contacts of 8 hours and purchases, per bucket as ``publish_segments`` and ``validate_events`` write them.

    The hours (after H0) in ``whole_hours`` hold their contacts in one partition, as older code wrote them.
    Returns the settings, the report hour (contacts of its 6 first hours are old enough) and every contact.
    """
    from profile_engine.model.labels import users_by_bucket

    settings_ = Settings(lake=root, label_horizon_hours=2, lateness_hours=1, buckets=UPLIFT_BUCKETS)
    lake = lk.Lake(root)
    rng = np.random.default_rng(19)
    users = [f"user{i:03d}" for i in range(80)]
    bucket_of = {u: b for b, us in users_by_bucket(users, UPLIFT_BUCKETS).items() for u in us}
    rules = [("cart_abandon", "cart_reminder"), ("high_intent", "coupon_10pct"), ("not_a_rule_now", "old_action")]
    every = []
    for k in range(8):
        hour = H0 + k * HOUR
        chosen = sorted(rng.choice(users, size=40, replace=False))
        picks = rng.integers(0, len(rules), size=len(chosen))
        contacts = pa.table(
            {
                "user_id": chosen,
                "action": [CONTROL if u[-1] in "05" else rules[i][1] for u, i in zip(chosen, picks, strict=True)],
                "rule": [rules[i][0] for i in picks],
                "hour": pa.array([hour] * len(chosen), pa.timestamp("ms", tz="UTC")),
            }
        )
        every.append(contacts)
        buyers = sorted(rng.choice(users, size=12, replace=False))
        minutes = rng.integers(0, 60, size=len(buyers))
        for b in range(UPLIFT_BUCKETS):
            mine = [i for i, u in enumerate(buyers) if bucket_of[u] == b]
            staged = {
                "user_id": [buyers[i] for i in mine],
                "event_type": ["purchase"] * len(mine),
                "ts": pa.array(
                    [hour + int(minutes[i]) * timedelta(minutes=1) for i in mine], pa.timestamp("ms", tz="UTC")
                ),
            }
            lake.write_partition(lk.STAGING, hour, pa.table(staged), bucket=b)
        if k in whole_hours:
            lake.write_partition(lk.CONTACTS, hour, contacts)
            continue
        for b in range(UPLIFT_BUCKETS):
            lake.write_partition(
                lk.CONTACTS, hour, contacts.filter(pa.array([bucket_of[u] == b for u in chosen])), bucket=b
            )
        lk.write_json(  # the hour-level commit point publish_segments writes last
            lake.partition(lk.CONTACTS, hour) / lk.MANIFEST,
            {"layer": lk.CONTACTS, "buckets": list(range(UPLIFT_BUCKETS)), "bucket_count": UPLIFT_BUCKETS},
        )
    return settings_, H0 + 8 * HOUR, pa.concat_tables(every)


def _whole_table_uplift(settings_: Settings, contacts: pa.Table, first: datetime) -> list[dict[str, Any]]:
    """``uplift``'s rows from every contact at once (the whole-table computation the buckets must add up to)."""
    from profile_engine.contracts.profiles import SNAPSHOT_HOUR
    from profile_engine.model.labels import label_examples

    periods = {r.name: max(1, r.cooldown_hours) for r in load_rules(None) if not r.suppress}
    starts = exposure_starts(contacts, periods)
    starts = starts.filter(pc.greater_equal(starts.column("hour"), pa.scalar(first, pa.timestamp("ms", tz="UTC"))))
    examples = starts.append_column(SNAPSHOT_HOUR, starts.column("hour"))
    return uplift_rows(label_examples(settings_, examples), periods)


@pytest.mark.parametrize(
    ("lookback", "whole_hours", "chunk_rows"),
    [
        (168, (), 10**6),
        (4, (), 10**6),
        (168, (1, 4), 10**6),
        (4, (2,), 10**6),
        (168, (), 7),
        (4, (1, 4), 12),
        (168, (0, 1, 2, 5), 10**6),
        (168, (1, 2, 3, 6), 30),
    ],
)
def test_uplift_counts_one_bucket_at_a_time_what_the_whole_table_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lookback: int, whole_hours: tuple[int, ...], chunk_rows: int
) -> None:
    # Arrange: 4 buckets; with a 4-hour lookback the contacts of the 5 hours before it are read as earlier ones
    import profile_engine.segments.uplift as uplift_module
    from profile_engine.model.labels import users_by_bucket

    settings_, hour, contacts = _bucketed_uplift_lake(tmp_path, whole_hours)
    calls: list[set[str]] = []
    held: list[int] = []  # contacts of each call, without the (rule, user) starts carried from chunks before
    starts_of = uplift_module.exposure_starts

    def spy(table: pa.Table, periods: dict[str, int]) -> pa.Table:
        calls.append(set(table.column("user_id").to_pylist()))
        held.append(table.num_rows - sum(table.column(uplift_module.CARRIED).to_pylist()))
        return starts_of(table, periods)

    monkeypatch.setattr(uplift_module, "exposure_starts", spy)
    reads: list[list[datetime]] = []  # the hours of each read of a bucket's contacts
    read_contacts = uplift_module.read_bucket_contacts

    def read_spy(lake: lk.Lake, manifests: dict[datetime, Any], bucket: int, buckets: int) -> pa.Table:
        reads.append(list(manifests))
        return read_contacts(lake, manifests, bucket, buckets)

    monkeypatch.setattr(uplift_module, "read_bucket_contacts", read_spy)

    # Act
    result = uplift(settings_, hour, lookback_hours=lookback, chunk_rows=chunk_rows)

    # Assert: each call held the contacts of one bucket's users, and every user contacted in a final hour was in one
    first = max(H0, hour - (lookback - 1) * HOUR)
    contacts = contacts.filter(
        pc.less(contacts.column("hour"), pa.scalar(H0 + 6 * HOUR, contacts.schema.field("hour").type))
    )
    assert (result["contact_hours"], result["first_contact_hour"]) == (
        (H0 + 6 * HOUR - first) // HOUR,
        format_hour(first),
    )
    buckets = [set(users_by_bucket(sorted(users), UPLIFT_BUCKETS)) for users in calls if users]
    assert buckets and all(len(b) == 1 for b in buckets)
    assert set().union(*calls) == set(contacts.column("user_id").to_pylist())
    # ... an hour written per bucket read alone, consecutive hours written whole in one read
    whole = {H0 + k * HOUR for k in whole_hours}
    for read in reads:
        assert read == sorted(read) and (len(read) == 1 or set(read) <= whole)
        assert len(read) == 1 or all(b - a == HOUR for a, b in itertools.pairwise(read))
    runs = sum(1 for k in whole_hours if k - 1 not in whole_hours and H0 + k * HOUR in {h for r in reads for h in r})
    assert len(reads) == UPLIFT_BUCKETS * (len({h for r in reads for h in r} - whole) + runs)
    # ... a chunk of contacts at a time: whole hours until the chunk holds chunk_rows (a bucket-hour holds < 40)
    assert max(held) < chunk_rows + 40
    if chunk_rows < 40:
        assert len(calls) > UPLIFT_BUCKETS
    # ... and the rows are those of every contact at once
    assert result["rules"] and result["rules"] == _whole_table_uplift(settings_, contacts, first)
    assert {row["rule"] for row in result["rules"]} == {"cart_abandon", "high_intent", "not_a_rule_now"}


def test_labels_of_a_bucket_read_only_that_bucket_of_an_hour_staged_over_every_bucket(tmp_path: Path) -> None:
    from profile_engine.model.labels import staged_files

    settings_, _, _ = _bucketed_uplift_lake(tmp_path)
    lake = lk.Lake(tmp_path)
    lake.write_partition(lk.STAGING, H0 + 9 * HOUR, pa.table({"user_id": ["a"]}), bucket=0)  # one folder of 4

    assert staged_files(lake, H0, 2, UPLIFT_BUCKETS) == lake.data_files(lk.STAGING, H0, 2)
    assert staged_files(lake, H0, None, UPLIFT_BUCKETS) == lake.data_files(lk.STAGING, H0)
    assert staged_files(lake, H0, 2, 8) == lake.data_files(lk.STAGING, H0)  # staged over another count: whole
    assert staged_files(lake, H0 + 9 * HOUR, 2, UPLIFT_BUCKETS) == lake.data_files(lk.STAGING, H0 + 9 * HOUR)
    assert staged_files(lake, H0 + 20 * HOUR, 2, UPLIFT_BUCKETS) == []  # nothing staged


# ---- segments that respect the data: declared shares, null money, suppression as a change ------


TOP_SPENDERS = {
    "name": "top_spenders",
    "enter": "monetary_percentile >= 0.95",
    "action": {"channel": "account_manager", "offer": "VIP service"},
    "priority": 10,
    "max_share": 0.05,
}


def test_a_rule_over_its_declared_share_is_reported_with_actual_and_declared_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 40 buyers who all spent the same (a source whose prices are constant): all tie at percentile 1.0
    monkeypatch.setenv("PROFILE_ENGINE_EXPORT_KEY", "t" * 32)
    users = {f"b{i:02d}": {"frequency_orders": 1, "monetary_total": 10.0, "rfm_segment": "loyal"} for i in range(40)}
    users |= {f"v{i:02d}": {} for i in range(60)}  # visitors without orders: the rule cannot judge them
    path = rules_file(tmp_path, [TOP_SPENDERS])
    commit_hour(tmp_path, H0, users, None)
    settings_ = Settings(lake=tmp_path)

    summary = publish_segments(settings_, H0, rules_path=path)
    section, _ = report_section(settings_, H0)

    expected = {
        "rule": "top_spenders",
        "max_share": 0.05,
        "matched": 40,
        "judged": 40,  # buyers with a spend percentile; the 60 visitors have none
        "share": 1.0,
        "over": True,
    }
    assert summary["share_checks"] == [expected]
    assert any("top_spenders" in note and "100%" in note and "5%" in note for note in summary["notes"])
    assert section["share_checks"] == [expected]
    page = render_section_html(section)
    assert "top_spenders" in page and "declared share" in page


def test_a_rule_within_its_declared_share_is_not_over() -> None:
    spend = {f"b{i:03d}": {"frequency_orders": 1, "monetary_total": float(i + 1)} for i in range(100)}
    table = profiles_table(H0, spend)
    rule = SegmentRule(
        name="top_spenders",
        enter="monetary_percentile >= 0.95",
        offer="VIP service",
        channel="account_manager",
        priority=1,
        max_share=0.05,
    )

    checks = share_checks(table, [rule])

    # cume_dist >= 0.95 over 100 distinct amounts takes the boundary user too: 6, within the one-user allowance
    assert checks == [
        {"rule": "top_spenders", "max_share": 0.05, "matched": 6, "judged": 100, "share": 0.06, "over": False}
    ]


def test_max_share_is_validated(tmp_path: Path) -> None:
    bad = rules_file(tmp_path, [{**TOP_SPENDERS, "max_share": 1.5}])
    with pytest.raises(SegmentConfigError, match=r"top_spenders.*max_share"):
        load_rules(bad, columns=EVAL_SCHEMA)
    assert load_rules(rules_file(tmp_path, [TOP_SPENDERS], "ok.yaml"), columns=EVAL_SCHEMA)[0].max_share == 0.05


def test_shipped_percentile_and_decile_rules_declare_their_share() -> None:
    rules = {r.name: r for r in load_rules(DEFAULT_RULES_PATH, columns=EVAL_SCHEMA)}
    assert rules["vip_service"].max_share == 0.05
    assert rules["high_intent"].max_share == 0.1
    assert rules["suppress_dormant"].max_share == 0.2


def test_a_buyer_without_money_does_not_match_vip_service(tmp_path: Path) -> None:
    # A source without prices: money is NULL (unknown), not 0; the spend percentile must stay NULL
    users: dict[str, dict[str, Any]] = {
        f"n{i:02d}": {"frequency_orders": 3, "monetary_total": None, "rfm_segment": "loyal"} for i in range(10)
    }
    users |= {
        f"m{i:02d}": {"frequency_orders": 1, "monetary_total": float(i + 1), "rfm_segment": "loyal"} for i in range(20)
    }
    commit_hour(tmp_path, H0, users, {u: 0.3 for u in users})

    publish_segments(Settings(lake=tmp_path), H0, rules_path=default_rules_without_control(tmp_path))

    rows = by_user(lk.Lake(tmp_path).read(lk.SEGMENTS, H0))
    vip = {u for u, r in rows.items() if "vip_service" in r["segments"]}
    assert vip == {"m18", "m19"}  # spend percentile >= 0.95 among the 20 buyers with money; none without money


def test_null_money_rows_get_no_spend_percentile() -> None:
    table = profiles_table(
        H0,
        {
            "nomoney": {"frequency_orders": 2, "monetary_total": None},
            "low": {"frequency_orders": 1, "monetary_total": 1.0},
            "high": {"frequency_orders": 1, "monetary_total": 2.0},
        },
    )
    rule = SegmentRule(name="p", enter="monetary_percentile IS NULL", offer="welcome", channel="email", priority=1)

    assigned, _ = assign_segments(table, [rule])

    assert assigned.column("user_id").to_pylist() == ["nomoney"]


def _suppress_export(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return pq.read_table(Path(summary["exports_path"]) / "suppress.parquet").to_pylist()


def test_suppress_is_exported_as_who_entered_and_who_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROFILE_ENGINE_EXPORT_KEY", "s" * 32)
    settings_ = Settings(lake=tmp_path)
    dormant = {"lifecycle_stage": "dormant", "hours_since_last_event": 900.0}
    path = default_rules_without_control(tmp_path)
    low = {"d1": 0.01, "d2": 0.01, "d3": 0.01, "a": 0.3}
    hours = [H0 + i * HOUR for i in range(3)]
    populations = [
        {"d1": dormant, "d2": dormant, "d3": {}, "a": {}},
        {"d1": dormant, "d2": dormant, "d3": {}, "a": {}},  # nobody changed
        {"d1": dormant, "d2": {}, "d3": dormant, "a": {}},  # d2 left, d3 entered
    ]
    summaries = []
    for hour, users in zip(hours, populations, strict=True):
        commit_hour(tmp_path, hour, users, low)
        summaries.append(publish_segments(settings_, hour, rules_path=path))
    key = export_key(settings_)
    d1, d2, d3 = pseudonymize(["d1", "d2", "d3"], key)

    first, unchanged, changed = (_suppress_export(s) for s in summaries)
    manifests = [lk.read_json(Path(s["manifest_path"])) for s in summaries]

    assert {(r["user_key"], r["change"]) for r in first} == {(d1, "entered"), (d2, "entered")}
    assert manifests[0]["suppress"] == {"mode": "full", "base_hour": None, "list_size": 2, "entered": 2, "left": 0}
    assert unchanged == []  # no rows re-sent when the list did not change
    assert manifests[1]["suppress"]["mode"] == "changes" and manifests[1]["rows"]["suppress"] == 0
    assert {(r["user_key"], r["change"]) for r in changed} == {(d2, "left"), (d3, "entered")}
    assert manifests[2]["suppress"] == {
        "mode": "changes",
        "base_hour": format_hour(hours[1]),
        "list_size": 2,
        "entered": 1,
        "left": 1,
    }
    assert all(r["offer"] == "suppress" and r["channel"] == "all" for r in changed)
    csv_rows = list(csv.DictReader(io.StringIO((Path(summaries[2]["exports_path"]) / "suppress.csv").read_text())))
    assert {(r["user_key"], r["change"]) for r in csv_rows} == {(d2, "left"), (d3, "entered")}
    # a rerun compares with the committed previous hour, so it reproduces the same change
    before = (Path(summaries[2]["exports_path"]) / "suppress.csv").read_bytes()
    publish_segments(settings_, hours[2], rules_path=path, run_id="rerun")
    assert (Path(summaries[2]["exports_path"]) / "suppress.csv").read_bytes() == before


# ---- publishing one bucket at a time -----------------------------------------------------------

BUCKETS = 4


def bucketed_population(hour: datetime, seed: int) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """240 users for the default rules: 100 buyers with a known amount in groups of 5 equal amounts (the group
    at cume_dist 0.95 sits on vip_service's boundary), 20 buyers without one, carts, dormant users, new users,
    tied propensities (one decimal) and unscored users; amounts are fixed, the rest changes with ``seed``."""
    amounts = random.Random(0).sample([float(5 * (j // 5)) for j in range(100)], 100)
    rng = random.Random(seed)
    users: dict[str, dict[str, Any]] = {}
    propensity: dict[str, float] = {}
    for i in range(240):
        values: dict[str, Any] = {}
        if i % 2 == 0:
            values.update(frequency_orders=1 + rng.randrange(3), rfm_segment="loyal")
            values["monetary_total"] = None if i % 12 == 0 else amounts.pop()
        if rng.random() < 0.2:
            values.update(open_cart_items=1, hours_since_last_cart=rng.choice([2.0, 5.0, 30.0]))
        if rng.random() < 0.15:
            values.update(lifecycle_stage="dormant", hours_since_last_event=rng.choice([400.0, 900.0]))
        if rng.random() < 0.1:
            values["first_seen_at"] = hour - timedelta(hours=2)
        users[f"user{i:03d}"] = values
        if rng.random() < 0.9:
            propensity[f"user{i:03d}"] = round(rng.random(), 1)
    return users, propensity


def commit_bucketed(
    root: Path, hour: datetime, users: dict[str, dict[str, Any]], propensity: dict[str, float], buckets: int
) -> dict[int, list[str]]:
    """Commit a snapshot and scores over ``buckets`` buckets placed by the staging rule; deciles left to read_scores."""
    from profile_engine.model.labels import users_by_bucket

    lake = lk.Lake(root)
    table = profiles_table(hour, users)
    placed = users_by_bucket(sorted(users), buckets)
    for bucket in range(buckets):
        ids = placed.get(bucket, [])
        lake.write_partition(
            lk.PROFILES,
            hour,
            table.filter(pc.is_in(table.column("user_id"), pa.array(ids, pa.string()))),
            bucket=bucket,
        )
        scores = scores_table({u: p for u, p in propensity.items() if u in set(ids)})
        scores = scores.set_column(2, "propensity_decile", pa.nulls(scores.num_rows, pa.int8()))
        lake.write_partition(lk.SCORES, hour, scores, bucket=bucket)
    lk.write_json(
        lake.partition(lk.PROFILES, hour) / lk.MANIFEST, {"data_hour": format_hour(hour), "rows": table.num_rows}
    )
    return placed


def published(root: Path, hour: datetime, summary: dict[str, Any]) -> dict[str, Any]:
    """What a publish left: segments and contacts by user, export files' bytes, manifest and summary (paths aside)."""
    lake = lk.Lake(root)
    manifest = lake.manifest(lk.SEGMENTS, hour)
    return {
        "segments": lake.read(lk.SEGMENTS, hour).sort_by("user_id").to_pylist(),
        "contacts": lake.read(lk.CONTACTS, hour)
        .sort_by([("user_id", "ascending"), ("action", "ascending")])
        .to_pylist(),
        "exports": {p.name: p.read_bytes() for p in sorted(lake.partition(lk.EXPORTS, hour).iterdir())},
        "manifest": {k: v for k, v in manifest.items() if k not in ("written_at", "buckets", "bucket_count")},
        "summary": {k: v for k, v in summary.items() if not k.endswith("_path")},
    }


def publish_two_hours(root: Path, buckets: int, old_layout_between: bool = False) -> dict[str, Any]:
    """Publish the hour before H0 and H0 of ``bucketed_population`` over ``buckets`` buckets, with opt-outs."""
    settings_ = Settings(lake=root, buckets=buckets)
    optouts = root / lk.OPTOUT
    optouts.mkdir(parents=True)
    (optouts / "crm.csv").write_text("user_id\n" + "".join(f"user{i:03d}\n" for i in range(3, 240, 23)))
    first = H0 - HOUR
    commit_bucketed(root, first, *bucketed_population(first, 1), buckets)
    publish_segments(settings_, first, run_id="r")
    if old_layout_between:  # the previous hour as older code wrote it: one partition per layer and hour
        lake = lk.Lake(root)
        for layer in (lk.SEGMENTS, lk.CONTACTS):
            table = lake.read(layer, first).sort_by("user_id")
            manifest = lake.manifest(layer, first)
            shutil.rmtree(lake.partition(layer, first))
            extra = {k: v for k, v in manifest.items() if k in ("segments", "stability", "share_checks")}
            lake.write_partition(layer, first, table, run_id="r", extra=extra)
    commit_bucketed(root, H0, *bucketed_population(H0, 2), buckets)
    return published(root, H0, publish_segments(settings_, H0, run_id="r"))


def test_publishing_per_bucket_equals_publishing_the_whole_population(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROFILE_ENGINE_EXPORT_KEY", "k" * 32)

    whole = publish_two_hours(tmp_path / "one", 1)
    bucketed = publish_two_hours(tmp_path / "four", BUCKETS)
    older = publish_two_hours(tmp_path / "older", BUCKETS, old_layout_between=True)

    summary = whole["summary"]
    assert summary["previous_hour_committed"] and summary["opted_out"] > 0
    assert summary["suppress"]["entered"] and summary["suppress"]["left"]
    assert summary["stability"]["vip_service"]["stayed"] and summary["stability"]["high_intent"]["held_by_stay"]
    assert any("cooldown" in row["reason"] for row in whole["segments"])
    for got in (bucketed, older):
        assert got["segments"] == whole["segments"]
        assert got["contacts"] == whole["contacts"]
        assert got["exports"] == whole["exports"]  # every file byte for byte, the manifest and its checksums too
        assert got["manifest"] == whole["manifest"]
        assert got["summary"] == whole["summary"]
    files = sorted((tmp_path / "four" / lk.SEGMENTS).rglob("*.parquet"))
    assert len(files) == 2 * BUCKETS  # two hours, a partition per bucket
    # a rerun of an hour written whole by older code replaces its one file with the bucket folders
    lake = lk.Lake(tmp_path / "older")
    first = H0 - HOUR
    before = lake.read(lk.SEGMENTS, first).sort_by("user_id")
    publish_segments(Settings(lake=tmp_path / "older", buckets=BUCKETS), first, run_id="r")
    for layer in (lk.SEGMENTS, lk.CONTACTS):
        folder = lake.partition(layer, first)
        assert not (folder / lk.DATA_FILE).exists()
        assert len(list(folder.glob(f"bucket=*/{lk.DATA_FILE}"))) == BUCKETS
    assert lake.read(lk.SEGMENTS, first).sort_by("user_id").equals(before)


def test_spend_percentile_per_bucket_is_the_window_over_everyone_ties_at_the_boundary_included(
    tmp_path: Path,
) -> None:
    from profile_engine.segments.assign import add_population_columns, population_stats

    placed = commit_bucketed(tmp_path, H0, *bucketed_population(H0, 2), BUCKETS)
    lake = lk.Lake(tmp_path)
    parts = [lake.read(lk.PROFILES, H0, b) for b in range(BUCKETS)]
    stats = population_stats(lambda: iter(parts))
    got = {
        u: p
        for part in parts
        for u, p in zip(
            part.column("user_id").to_pylist(),
            add_population_columns(part, stats).column("monetary_percentile").to_pylist(),
            strict=True,
        )
    }
    con = rule_connection()
    con.register("everyone", pa.concat_tables(parts))
    expected = dict(
        con.execute(
            "SELECT user_id, CASE WHEN frequency_orders > 0 AND monetary_total IS NOT NULL THEN cume_dist() OVER "
            "(PARTITION BY frequency_orders > 0 AND monetary_total IS NOT NULL ORDER BY monetary_total) END "
            "FROM everyone"
        ).fetchall()
    )
    con.close()
    assert got == expected  # the same doubles, NULL for non-buyers and unknown amounts
    boundary = {u for u, p in got.items() if p == 0.95}
    assert len(boundary) == 5  # one tie group exactly on vip_service's `>= 0.95`, spread over several buckets
    assert len({b for b, ids in placed.items() if boundary & set(ids)}) > 1
    assert sum(p is not None and p >= 0.95 for p in got.values()) == 10


def published_previous_hour(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, dict[int, list[str]]]:
    """A bucketed lake whose hour before H0 is published and whose H0 profiles are committed, not published:
    the settings and H0's users per bucket."""
    monkeypatch.setenv("PROFILE_ENGINE_EXPORT_KEY", "k" * 32)
    settings_ = Settings(lake=tmp_path, buckets=BUCKETS)
    previous = H0 - HOUR
    commit_bucketed(tmp_path, previous, *bucketed_population(previous, 1), BUCKETS)
    publish_segments(settings_, previous)
    return settings_, commit_bucketed(tmp_path, H0, *bucketed_population(H0, 2), BUCKETS)


def test_publish_segments_holds_one_bucket_of_profiles_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from profile_engine.segments import publish

    settings_, placed = published_previous_hour(tmp_path, monkeypatch)
    largest = max(len(ids) for ids in placed.values())
    assert largest < 200  # a bucket is well below the 240 users
    reads: list[tuple[str, int | None, int]] = []
    evaluated: list[int] = []
    read, assign = lk.Lake.read, assign_segments

    def recording_read(self: lk.Lake, layer: str, hour: datetime, bucket: int | None = None, **kwargs: Any) -> pa.Table:
        table = read(self, layer, hour, bucket, **kwargs)
        reads.append((layer, bucket, table.num_rows))
        return table

    def recording_assign(table: pa.Table, *args: Any, **kwargs: Any) -> Any:
        evaluated.append(table.num_rows)
        return assign(table, *args, **kwargs)

    monkeypatch.setattr(lk.Lake, "read", recording_read)
    monkeypatch.setattr(publish, "assign_segments", recording_assign)

    summary = publish_segments(settings_, H0)

    assert summary["profiles"] == 240 and summary["previous_hour_committed"]
    held = [(layer, bucket, rows) for layer, bucket, rows in reads if layer in (lk.PROFILES, lk.SCORES, lk.SEGMENTS)]
    assert {layer for layer, _, _ in held} == {lk.PROFILES, lk.SCORES, lk.SEGMENTS}
    assert all(bucket is not None and rows <= largest for _, bucket, rows in held), held
    assert len(evaluated) == BUCKETS and max(evaluated) <= largest


# ---- DuckDB databases: one per process, not per bucket and step (issue 19) ----------------


def test_publish_segments_opens_its_databases_once_per_process_not_per_bucket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import duckdb

    from profile_engine.lake import db

    settings_, _ = published_previous_hour(tmp_path, monkeypatch)
    monkeypatch.setattr(db, "_DATABASES", {}, raising=False)  # as in a fresh process
    opened: list[dict[str, Any]] = []
    connect = duckdb.connect

    def counting_connect(*args: Any, **kwargs: Any) -> duckdb.DuckDBPyConnection:
        opened.append(dict(kwargs.get("config") or {}))
        return connect(*args, **kwargs)

    monkeypatch.setattr(duckdb, "connect", counting_connect)

    summary = publish_segments(settings_, H0)
    again = publish_segments(settings_, H0)

    assert summary["profiles"] == 240 and again["members"] == summary["members"]
    # the process's database and the rules' database without file access, each opened once for both runs
    assert len(opened) == 2, opened
    assert sorted(c.get("enable_external_access", True) for c in opened) == [False, True]


def test_rule_sql_cannot_read_files_on_the_shared_rule_database(tmp_path: Path) -> None:
    """The rules' database is shared by the process's rule cursors and still has no file access."""
    from profile_engine.lake import db

    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    plain = db.cursor()  # the process's database with file access is open too
    first, second = rule_connection(), rule_connection()
    try:
        assert plain.execute(f"SELECT count(*) FROM read_csv('{secret}')").fetchall() == [(1,)]
        for con in (first, second):
            with pytest.raises(Exception, match="disabled by configuration"):
                con.execute(f"SELECT count(*) FROM read_csv('{secret}')").fetchall()
            with pytest.raises(Exception, match="Cannot enable external access"):
                con.execute("SET enable_external_access = true")
            assert con.execute("SELECT current_setting('TimeZone')").fetchall() == [("UTC",)]
    finally:
        for con in (plain, first, second):
            con.close()
    # a rule past the grammar (built directly, not loaded) cannot read the file when evaluated either
    reading = SegmentRule(
        name="reads_files",
        enter=f"(SELECT count(*) FROM read_csv('{secret}')) > 0",
        offer="coupon 10%",
        channel="email",
        priority=1,
    )
    with pytest.raises(Exception, match="disabled by configuration"):
        assign_segments(synthetic_population(3), [reading])


def test_a_rule_cursor_keeps_its_own_profiles_view_and_time_zone(tmp_path: Path) -> None:
    """Views are TEMP and the time zone is per cursor: rule cursors open at once do not see each other's."""
    from profile_engine.lake import db

    held = rule_connection()
    other = db.cursor()
    try:
        held.execute("CREATE TEMP VIEW profiles AS SELECT 1 AS only_here")
        other.execute("SET TimeZone = 'America/New_York'")
        assigned, sizes = assign_segments(synthetic_population(10), [control_rule("intent", 0.0)])
        load_rules(DEFAULT_RULES_PATH)
        assert sizes == {"intent": 10} and assigned.num_rows == 10
        assert held.execute("SELECT * FROM profiles").fetchall() == [(1,)]
        assert rule_connection().execute("SELECT current_setting('TimeZone')").fetchall() == [("UTC",)]
        assert db.cursor().execute("SELECT current_setting('TimeZone')").fetchall() != [("America/New_York",)]
    finally:
        held.close()
        other.close()


# ---- one pass per bucket, cheaper (issue 19) -----------------------------------------------


def test_rule_inputs_are_the_columns_rules_read_and_what_derived_columns_need() -> None:
    from profile_engine.segments.rules import rule_inputs

    got = rule_inputs(load_rules())

    # referenced by the shipped rules, the population column's inputs, the derived columns' inputs
    assert {"user_id", "lifecycle_stage", "frequency_orders", "open_cart_items", "hours_since_last_cart"} <= got
    assert {"hours_since_last_event", "monetary_total", "snapshot_hour", "first_seen_at"} <= got
    assert not {"session_count", "rfm_segment", "last_seen_at"} & got  # no shipped rule reads them


def test_publish_segments_reads_the_profile_columns_rules_read_and_each_contact_hour_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from profile_engine.segments.rules import rule_inputs

    settings_, _ = published_previous_hour(tmp_path, monkeypatch)
    read, committed = lk.Lake.read, lk.Lake.committed
    profile_columns: list[list[str] | None] = []
    contact_hours: list[datetime] = []

    def recording_read(self: lk.Lake, layer: str, hour: datetime, bucket: int | None = None, **kwargs: Any) -> pa.Table:
        if layer == lk.PROFILES:
            profile_columns.append(kwargs.get("columns"))
        return read(self, layer, hour, bucket, **kwargs)

    def recording_committed(self: lk.Lake, layer: str, hour: datetime, bucket: int | None = None) -> bool:
        if layer == lk.CONTACTS and bucket is None:
            contact_hours.append(hour)
        return committed(self, layer, hour, bucket)

    monkeypatch.setattr(lk.Lake, "read", recording_read)
    monkeypatch.setattr(lk.Lake, "committed", recording_committed)

    summary = publish_segments(settings_, H0)

    assert summary["profiles"] == 240
    wanted = rule_inputs(load_rules())
    assert profile_columns and all(c is not None and set(c) <= wanted for c in profile_columns), profile_columns
    window = max(r.cooldown_hours for r in load_rules())
    assert len(contact_hours) == window - 1  # each hour of the cooldown window looked up once, not once per bucket
    assert len(set(contact_hours)) == window - 1


def test_scores_in_the_profiles_order_are_appended_as_the_join_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scores of every user in the profiles' order (as score_profiles writes them) and the same scores in another
    order: the same segments, contacts, exports, manifest and summary."""
    monkeypatch.setenv("PROFILE_ENGINE_EXPORT_KEY", "k" * 32)
    got = {}
    for order in ("profiles", "reversed"):
        root = tmp_path / order
        users, propensity = bucketed_population(H0, 2)
        everyone = {u: propensity.get(u, 0.05) for u in users}
        commit_bucketed(root, H0, users, everyone, BUCKETS)
        lake = lk.Lake(root)
        for bucket in range(BUCKETS):
            scores = lake.read(lk.SCORES, H0, bucket)
            assert scores.column("user_id").equals(lake.read(lk.PROFILES, H0, bucket).column("user_id"))
            if order == "reversed":
                lake.write_partition(lk.SCORES, H0, scores.take(list(range(scores.num_rows))[::-1]), bucket=bucket)
        got[order] = published(root, H0, publish_segments(Settings(lake=root, buckets=BUCKETS), H0, run_id="r"))

    assert got["profiles"] == got["reversed"]
    summary = got["profiles"]["summary"]
    assert summary["scored_profiles"] == summary["profiles"] == 240
    actions = [row["action"] for row in got["profiles"]["segments"]]
    assert summary["actions"] == {a: actions.count(a) for a in sorted(set(actions))}
    assert summary["suppress"]["entered"] == summary["actions"].get("suppress", 0)  # no previous hour: the full list


# ---- exports streamed: the merge of the buckets' sorted runs and the files it writes --------------------------------


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.lists(st.text("0123456789abcdef", min_size=1, max_size=4), max_size=12), min_size=1, max_size=5),
    st.integers(1, 4),
)
def test_merge_sorted_runs_is_one_sort_of_every_run_holding_a_batch_of_each(
    runs: list[list[str]], batch_rows: int
) -> None:
    seen: set[str] = set()
    unique: list[list[str]] = []
    for run in runs:  # a key in one run only, once
        unique.append([k for k in dict.fromkeys(run) if k not in seen])
        seen.update(run)
    schema = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("n", pa.int64())])
    with tempfile.TemporaryDirectory() as folder:
        files = []
        for i, keys in enumerate(unique):
            files.append(Path(folder) / f"{i}.parquet")
            table = pa.table({"key": keys, "n": [len(k) for k in keys]}, schema=schema).sort_by("key")
            pq.write_table(table, files[-1], row_group_size=max(1, batch_rows))

        parts = list(merge_sorted_runs(files, "key", schema, batch_rows))

    assert all(p.num_rows <= batch_rows * len(files) for p in parts)  # a batch of each run, never a whole run
    merged = pa.concat_tables([schema.empty_table(), *parts]).to_pylist()
    assert merged == [{"key": k, "n": len(k)} for k in sorted(k for run in unique for k in run)]


def test_streamed_export_files_are_the_whole_table_writers_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each action's rows are merged from the buckets' sorted runs and appended to its CSV and Parquet
    # files as they come: the files are byte for byte those the writers give of the whole sorted table.
    monkeypatch.setenv("PROFILE_ENGINE_EXPORT_KEY", "k" * 32)
    got = publish_two_hours(tmp_path, BUCKETS)
    lake = lk.Lake(tmp_path)
    manifest = lake.manifest(lk.EXPORTS, H0)
    actions = sorted(manifest["rows"])
    assert [f["name"] for f in manifest["files"]] == [f"{a}.{s}" for a in actions for s in ("csv", "parquet")]
    assert any(n > 1 for n in manifest["rows"].values())
    for action in actions:
        table = pq.read_table(lake.partition(lk.EXPORTS, H0) / f"{action}.parquet")
        assert table.column("user_key").to_pylist() == sorted(table.column("user_key").to_pylist())
        csv_bytes, parquet_bytes = io.BytesIO(), io.BytesIO()
        pacsv.write_csv(table, csv_bytes)
        pq.write_table(table, parquet_bytes, compression="zstd")
        assert got["exports"][f"{action}.csv"] == csv_bytes.getvalue()
        assert got["exports"][f"{action}.parquet"] == parquet_bytes.getvalue()
    assert not list((tmp_path / lk.TMP).glob("*/*.csv"))  # nothing left of the runs or the files in progress
