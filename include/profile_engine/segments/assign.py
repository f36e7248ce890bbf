"""Assigning segments: rules evaluated on one hour's profiles, one action per user, readable reasons.

Hysteresis, priority, cooldowns, control groups and declared shares: docs/segments.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from profile_engine.contracts.events import md5_modulo_sql
from profile_engine.contracts.profiles import (
    FREQUENCY_ORDERS,
    LIFECYCLE_STAGE,
    MONETARY_TOTAL,
    OPEN_CART_ITEMS,
    OPEN_CART_VALUE,
    RFM_SEGMENT,
    USER_ID,
)
from profile_engine.contracts.scores import PROPENSITY
from profile_engine.contracts.segments import (
    ACTION,
    CHANNEL,
    CONTROL_FLAG,
    HELD_BY_STAY,
    OFFER,
    OPTOUT_REASON,
    REASON,
    RULE,
    SEGMENT_SCHEMA,
    SEGMENTS_COL,
)
from profile_engine.profiles.ranks import Buckets, bucket_cume_dist
from profile_engine.segments.rules import (
    CONTROL,
    CONTROL_BASIS,
    DERIVED_COLUMNS,
    NO_ACTION,
    OPTED_OUT,
    POPULATION_COLUMNS,
    RULE_VIEW,
    SegmentRule,
    quote_identifier,
    rule_connection,
    sql_literal,
    tree_values,
)

if TYPE_CHECKING:
    import duckdb


_FLOAT_TYPES = ("DOUBLE", "FLOAT", "REAL", "DECIMAL")


def _rules_table(rules: Sequence[SegmentRule]) -> pa.Table:
    """Rule metadata as an Arrow table for the assignment query."""
    return pa.table(
        {
            RULE: [r.name for r in rules],
            "priority": pa.array([r.priority for r in rules], pa.int64()),
            ACTION: [r.action for r in rules],
            OFFER: [r.offer for r in rules],
            CHANNEL: [r.channel for r in rules],
            "cooldown_hours": pa.array([r.cooldown_hours for r in rules], pa.int64()),
            "control_bp": pa.array([round(r.control_share * CONTROL_BASIS) for r in rules], pa.int64()),
            "suppress": pa.array([r.suppress for r in rules], pa.bool_()),
        },
        schema=pa.schema(
            [
                pa.field(RULE, pa.string()),
                pa.field("priority", pa.int64()),
                pa.field(ACTION, pa.string()),
                pa.field(OFFER, pa.string()),
                pa.field(CHANNEL, pa.string()),
                pa.field("cooldown_hours", pa.int64()),
                pa.field("control_bp", pa.int64()),
                pa.field("suppress", pa.bool_()),
            ]
        ),
    )


# Comparison operators of a condition as marketers read them (SQL text, shown text).
_COMPARISONS: dict[str, tuple[str, str]] = {
    "COMPARE_GREATERTHANOREQUALTO": (">=", "\u2265"),
    "COMPARE_GREATERTHAN": (">", ">"),
    "COMPARE_LESSTHANOREQUALTO": ("<=", "\u2264"),
    "COMPARE_LESSTHAN": ("<", "<"),
    "COMPARE_EQUAL": ("=", "="),
    "COMPARE_NOTEQUAL": ("<>", "\u2260"),
}
# The same comparison with its sides swapped (``3 < x`` is ``x > 3``).
_MIRRORED = {
    "COMPARE_GREATERTHANOREQUALTO": "COMPARE_LESSTHANOREQUALTO",
    "COMPARE_LESSTHANOREQUALTO": "COMPARE_GREATERTHANOREQUALTO",
    "COMPARE_GREATERTHAN": "COMPARE_LESSTHAN",
    "COMPARE_LESSTHAN": "COMPARE_GREATERTHAN",
    "COMPARE_EQUAL": "COMPARE_EQUAL",
    "COMPARE_NOTEQUAL": "COMPARE_NOTEQUAL",
}
# Readable names of columns in reasons; ``hours_since_<x>`` reads "<x> 52h ago", others the name with spaces.
COLUMN_LABELS: dict[str, str] = {
    PROPENSITY: "propensity",
    "propensity_decile": "propensity decile",
    "monetary_percentile": "spend percentile",
    MONETARY_TOTAL: "spent",
    FREQUENCY_ORDERS: "orders",
    RFM_SEGMENT: "RFM segment",
    LIFECYCLE_STAGE: "lifecycle stage",
    OPEN_CART_ITEMS: "open cart items",
    OPEN_CART_VALUE: "open cart value",
}
_HOURS_PREFIX = "hours_since_"


@dataclass(frozen=True)
class Condition:
    """One comparison of a rule expression: ``column <op> literal(s)`` (a leaf of its AND/OR tree)."""

    column: str
    kind: str  # a key of _COMPARISONS, "between" or "in"
    literals: tuple[tuple[str, str], ...]  # (kind, text) as the parser gives them

    def sql(self) -> str:
        """The condition as SQL, evaluated per user to know whether it holds."""
        column = quote_identifier(self.column)
        values = [_literal_sql(kind, text) for kind, text in self.literals]
        if self.kind == "between":
            return f"({column} BETWEEN {values[0]} AND {values[1]})"
        if self.kind == "in":
            return f"({column} IN ({', '.join(values)}))"
        return f"({column} {_COMPARISONS[self.kind][0]} {values[0]})"


def _literal_sql(kind: str, text: str) -> str:
    """SQL text of a parsed literal."""
    return sql_literal(text) if kind == "STRING" else text


@dataclass(frozen=True)
class IdCondition:
    """A leaf of a rule's AND/OR tree that reads ``user_id`` (an A/B split): shown by its text, never by the id."""

    sql: str  # the leaf as written, evaluated per user
    text: str  # the leaf as shown in reasons, string literals masked


_MASK = "'\u2026'"


def _leaf_text(expr: str, node: dict[str, Any], offset: int) -> IdCondition:
    """The source text of a parsed leaf of ``expr`` (from the parser's locations) and its masked form."""
    spans = [
        (int(n["query_location"]), int(n["query_location"]) + int(n.get("query_location_length") or 0))
        for n in _tree_nodes(node)
        if isinstance(n.get("query_location"), int) and n.get("query_location_length") is not None
    ]
    start, end = min(a for a, _ in spans), max(b for _, b in spans)
    strings = sorted(
        (int(n["query_location"]), int(n["query_location"]) + int(n["query_location_length"]))
        for n in _tree_nodes(node)
        if n.get("class") == "CONSTANT" and (n.get("literal") or {}).get("kind") == "STRING"
    )
    text, cursor = [], start
    for a, b in strings:
        text += [expr[cursor - offset : a - offset], _MASK]
        cursor = b
    text.append(expr[cursor - offset : end - offset])
    return IdCondition(expr[start - offset : end - offset], "".join(text))


def _tree_nodes(node: Any) -> list[dict[str, Any]]:
    """Every expression node (a dict with a ``class``) of a serialized parse tree."""
    return [n for n in _all_dicts(node) if "class" in n]


def _all_dicts(node: Any) -> list[dict[str, Any]]:
    """Every dict of a serialized parse tree, ``node`` included."""
    found: list[dict[str, Any]] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _conditions(con: duckdb.DuckDBPyConnection, expr: str) -> tuple[list[Condition], list[str], list[IdCondition]]:
    """The comparisons at the top of ``expr``'s AND/OR tree, the columns of every other leaf, the leaves on user_id.

    Only leaves reached through AND/OR are taken: a comparison under NOT or inside a
    function says nothing about the user on its own. Those leaves' columns are reported
    as plain values instead, except leaves that read ``user_id``: they are reported by
    their text (string literals masked), so a reason never holds a raw id.
    """
    prefix = "SELECT "
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [prefix + expr]).fetchall()[0][0])
    if tree.get("error"):
        return [], [], []
    root = tree["statements"][0]["node"]["select_list"][0]
    conditions: list[Condition] = []
    others: list[str] = []
    hidden: list[IdCondition] = []

    def column_of(node: Any) -> str | None:
        if isinstance(node, dict) and node.get("class") == "COLUMN_REF" and node.get("column_names"):
            return str(node["column_names"][-1])
        return None

    def literal_of(node: Any) -> tuple[str, str] | None:
        if isinstance(node, dict) and node.get("class") == "CONSTANT" and isinstance(node.get("literal"), dict):
            literal = node["literal"]
            return str(literal.get("kind")), str(literal.get("text"))
        return None

    def visit(node: dict[str, Any]) -> None:
        kind = node.get("type", "")
        if node.get("class") == "CONJUNCTION":
            for child in node.get("children", []):
                visit(child)
            return
        if any(str(names[-1]) == USER_ID for names in tree_values(node, "column_names") if names):
            hidden.append(_leaf_text(expr, node, len(prefix)))
            return
        if node.get("class") == "COMPARISON" and kind in _COMPARISONS:
            left, right = node.get("left"), node.get("right")
            if column_of(left) and literal_of(right):
                conditions.append(Condition(str(column_of(left)), kind, (literal_of(right),)))  # type: ignore[arg-type]
                return
            if column_of(right) and literal_of(left):
                conditions.append(Condition(str(column_of(right)), _MIRRORED[kind], (literal_of(left),)))  # type: ignore[arg-type]
                return
        if node.get("class") == "BETWEEN":
            bounds = [literal_of(node.get("lower")), literal_of(node.get("upper"))]
            column = column_of(node.get("input"))
            if column and all(bounds):
                conditions.append(Condition(column, "between", tuple(b for b in bounds if b)))
                return
        if kind == "COMPARE_IN":
            children = node.get("children", [])
            literals = [literal_of(child) for child in children[1:]]
            column = column_of(children[0]) if children else None
            if column and literals and all(literals):
                conditions.append(Condition(column, "in", tuple(v for v in literals if v)))
                return
        for names in tree_values(node, "column_names"):
            column = str(names[-1]) if isinstance(names, list) and names else ""
            if column and column not in others:
                others.append(column)

    visit(root)
    return conditions, others, hidden


def _value_sql(column: str, types: Mapping[str, str]) -> str:
    """SQL text of a user's value: numbers with at most two decimals and no trailing zeros."""
    sql_type = types.get(column, "VARCHAR")
    if sql_type.startswith(_FLOAT_TYPES):
        return f"printf('%.10g', round({quote_identifier(column)}, 2))"
    return f"CAST({quote_identifier(column)} AS VARCHAR)"


def _condition_text_sql(condition: Condition, types: Mapping[str, str]) -> str:
    """SQL building the readable text of one condition for a user, e.g. ``last purchase 52h ago > 24h``."""
    value = f"coalesce({_value_sql(condition.column, types)}, 'unknown')"
    hours = condition.column.startswith(_HOURS_PREFIX)
    label = condition.column.removeprefix(_HOURS_PREFIX) if hours else condition.column
    label = COLUMN_LABELS.get(condition.column, label.replace("_", " "))
    unit = "h" if hours else ""
    shown = f"{sql_literal(label + ' ')} || {value} || {sql_literal(unit + (' ago' if hours else ''))}"
    texts = [text + unit for _, text in condition.literals]
    if condition.kind == "between":
        return f"{shown} || {sql_literal(f' in {texts[0]}..{texts[1]}')}"
    if condition.kind in ("in", "COMPARE_EQUAL"):
        return shown  # the value is the one asked for
    return f"{shown} || {sql_literal(f' {_COMPARISONS[condition.kind][1]} {texts[0]}')}"


def _reason_sql(
    con: duckdb.DuckDBPyConnection, label: str, expr: str | None, columns: Sequence[str], types: Mapping[str, str]
) -> str:
    """SQL for the readable reason of a membership: ``label: propensity 0.83 \u2265 0.6; orders 3 \u2265 2``.

    Every comparison of the expression that holds for the user is shown with the user's
    value; columns the comparisons do not cover are shown as ``column=value``. Conditions
    on ``user_id`` that hold are shown by their text, never with the id.
    """
    conditions, others, hidden = _conditions(con, expr) if expr else ([], [], [])
    parts = [
        f"CASE WHEN coalesce({c.sql()}, false) THEN {_condition_text_sql(c, types)} END"
        for c in conditions
        if c.column in types and c.column != USER_ID
    ]
    parts += [f"CASE WHEN coalesce(({h.sql}), false) THEN {sql_literal(h.text)} END" for h in hidden]
    covered = {c.column for c in conditions} | {USER_ID}
    plain = [c for c in (*others, *columns) if c in types and c not in covered]
    for column in dict.fromkeys(plain):
        parts.append(f"{sql_literal(column + '=')} || coalesce({_value_sql(column, types)}, 'NULL')")
    if not parts:
        return sql_literal(label)
    return f"{sql_literal(label + ': ')} || concat_ws('; ', {', '.join(parts)})"


def assign_segments(
    evaluated: pa.Table,
    rules: Sequence[SegmentRule],
    previous: pa.Table | None = None,
    contacts: pa.Table | None = None,
    optouts: pa.Table | None = None,
) -> tuple[pa.Table, dict[str, int]]:
    """Evaluate ``rules`` on one hour's profiles + scores; return memberships and segment sizes.

    ``evaluated`` holds one row per user with the profile and score columns;
    ``previous`` the previous hour's segments (``user_id``, ``segments``) for hysteresis;
    ``contacts`` the recent contact history (``user_id``, ``action``, ``hours_ago``) for
    cooldowns; ``optouts`` the users (``user_id``) who withdrew marketing consent: they
    keep their memberships but get action ``opted_out`` and are never exported. The
    result follows :data:`SEGMENT_SCHEMA`, one row per user in at least one segment,
    sorted by ``user_id``.
    """
    if not rules:
        raise ValueError("no segment rules")
    prev = (
        previous
        if previous is not None
        else pa.table({USER_ID: pa.array([], pa.string()), SEGMENTS_COL: pa.array([], pa.list_(pa.string()))})
    )
    recent = (
        contacts
        if contacts is not None
        else pa.table(
            {
                USER_ID: pa.array([], pa.string()),
                ACTION: pa.array([], pa.string()),
                "hours_ago": pa.array([], pa.int64()),
            }
        )
    )
    withdrawn = optouts.select([USER_ID]) if optouts is not None else pa.table({USER_ID: pa.array([], pa.string())})
    con = rule_connection()
    try:
        _create_profiles_view(con, evaluated)
        con.register("optouts_input", withdrawn)
        con.register("prev_input", prev.select([USER_ID, SEGMENTS_COL]))
        con.register("contacts_input", recent.select([USER_ID, ACTION, "hours_ago"]))
        con.register("rules_meta", _rules_table(rules))
        types = {str(row[0]): str(row[1]) for row in con.execute(f"DESCRIBE {RULE_VIEW}").fetchall()}
        score = f"p.{PROPENSITY}" if PROPENSITY in types else "CAST(NULL AS DOUBLE)"

        flags = []
        members = []
        # Per user, the segments (and those held by a stay condition) in priority order, from the rule flags of its
        # row: a list per row rather than an ordered list aggregate over ``members`` grouped by user (which sorted
        # each user's rows: 60 % of the assignment's CPU at 166k users a bucket, issue 19).
        ordered = sorted(range(len(rules)), key=lambda i: rules[i].priority)
        member = {i: f"(__enter_{i} OR (__prev_{i} AND __stay_{i}))" for i in ordered}
        by_stay = {i: f"(NOT __enter_{i} AND __prev_{i} AND __stay_{i})" for i in ordered}

        def rule_list(held: dict[int, str]) -> str:
            listed = ", ".join(f"CASE WHEN {held[i]} THEN {sql_literal(rules[i].name)} END" for i in ordered)
            return f"list_filter([{listed}], lambda r: r IS NOT NULL)"

        reasons: dict[int, str] = {}
        for i, rule in enumerate(rules):
            stay = f"coalesce(({rule.stay}), false)" if rule.stay else "false"
            flags.append(f"coalesce(({rule.enter}), false) AS __enter_{i}, {stay} AS __stay_{i}")
            flags.append(
                f"coalesce(list_contains(prev.__prev_segments, {sql_literal(rule.name)}), false) AS __prev_{i}"
            )
            enter_reason = _reason_sql(con, rule.name, rule.enter, rule.enter_columns, types)
            stay_reason = _reason_sql(con, f"{rule.name} (stay)", rule.stay, rule.stay_columns, types)
            reasons[i] = f"CASE WHEN __enter_{i} THEN {enter_reason} ELSE {stay_reason} END"
            members.append(f"SELECT {USER_ID}, {sql_literal(rule.name)} AS {RULE} FROM flagged WHERE {member[i]}")
        # The rule that acts: the first the user is a member of and not cooling down in, suppressing rules first,
        # then by priority; its reason is computed for it alone (not for every membership).
        first = sorted(range(len(rules)), key=lambda i: (not rules[i].suppress, rules[i].priority))
        acting = {
            i: f"{member[i]} AND NOT coalesce(list_contains(__blocked, {sql_literal(rules[i].name)}), false)"
            for i in first
        }
        chosen_rule = " ".join(f"WHEN {acting[i]} THEN {sql_literal(rules[i].name)}" for i in first)
        chosen_reason = " ".join(f"WHEN {acting[i]} THEN {reasons[i]}" for i in first)
        # A rule reads its row only; population columns come with ``evaluated`` or over it (``_create_profiles_view``).
        con.execute(
            f"CREATE TEMP TABLE flagged AS SELECT p.*, {score} AS __score, {', '.join(flags)} FROM {RULE_VIEW} p "
            f"LEFT JOIN (SELECT {USER_ID}, {SEGMENTS_COL} AS __prev_segments FROM prev_input) prev USING ({USER_ID})"
        )
        con.execute(f"CREATE TEMP TABLE members AS {' UNION ALL '.join(members)}")
        con.execute(
            f"""
            CREATE TEMP TABLE blocked AS
            SELECT DISTINCT m.{USER_ID}, m.{RULE}
            FROM members m
            JOIN rules_meta r USING ({RULE})
            JOIN contacts_input c ON c.{USER_ID} = m.{USER_ID} AND c.{ACTION} = r.{ACTION}
            WHERE c.hours_ago < r.cooldown_hours
            """
        )
        result = con.sql(
            f"""
            WITH memberships AS (
                SELECT {USER_ID}, {rule_list(member)} AS {SEGMENTS_COL}, {rule_list(by_stay)} AS {HELD_BY_STAY}, __score,
                       CASE {chosen_rule} END AS {RULE}, CASE {chosen_reason} END AS rule_reason
                FROM flagged
                LEFT JOIN (SELECT {USER_ID}, list({RULE}) AS __blocked FROM blocked GROUP BY {USER_ID}) USING ({USER_ID})
                WHERE {" OR ".join(member.values())}
            ),
            cooled AS (
                SELECT b.{USER_ID}, string_agg(b.{RULE}, ', ' ORDER BY r.priority) AS rules
                FROM blocked b JOIN rules_meta r USING ({RULE})
                GROUP BY b.{USER_ID}
            ),
            decided AS (
                SELECT u.{USER_ID}, u.{SEGMENTS_COL}, u.{HELD_BY_STAY}, u.__score, u.{RULE}, c.{OFFER}, c.{CHANNEL},
                       c.{ACTION} AS rule_action, u.rule_reason, k.rules AS cooled_rules,
                       o.{USER_ID} IS NOT NULL AS opted_out,
                       coalesce(o.{USER_ID} IS NULL AND NOT c.suppress
                                AND {md5_modulo_sql(f"u.{USER_ID} || '|' || u.{RULE}", CONTROL_BASIS)} < c.control_bp,
                                false) AS held_out
                FROM memberships u
                LEFT JOIN rules_meta c USING ({RULE})
                LEFT JOIN cooled k USING ({USER_ID})
                LEFT JOIN (SELECT DISTINCT {USER_ID} FROM optouts_input) o USING ({USER_ID})
            )
            SELECT d.{USER_ID}, {SEGMENTS_COL},
                   CASE WHEN opted_out THEN '{OPTED_OUT}' WHEN {RULE} IS NULL THEN '{NO_ACTION}'
                        WHEN held_out THEN '{CONTROL}' ELSE rule_action END AS {ACTION},
                   {OFFER}, {CHANNEL}, {RULE},
                   CASE WHEN opted_out THEN '{OPTOUT_REASON}'
                        WHEN {RULE} IS NULL THEN 'cooldown: ' || cooled_rules
                        ELSE rule_reason || coalesce(' | cooldown: ' || cooled_rules, '') END AS {REASON},
                   held_out AS {CONTROL_FLAG},
                   __score AS {PROPENSITY},
                   {HELD_BY_STAY}
            FROM decided d
            ORDER BY d.{USER_ID}
            """
        ).to_arrow_table()
        sizes = {
            str(name): int(n)
            for name, n in con.execute(f"SELECT {RULE}, count(*) FROM members GROUP BY ALL").fetchall()
        }
    finally:
        con.close()
    return result.cast(SEGMENT_SCHEMA), {rule.name: sizes.get(rule.name, 0) for rule in rules}


# Per population column (rules.POPULATION_COLUMNS), the function giving one bucket its values.
PopulationStats = dict[str, Callable[[pa.Table], pa.Array]]


def population_stats(buckets: Buckets) -> PopulationStats:
    """The population columns' statistics over every bucket (one bucket in memory at a time, exact).

    ``buckets`` returns the buckets' tables, each with the columns of
    ``PopulationColumn.inputs``; a bucket then gets its values with
    :func:`add_population_columns`, the values a window over the whole population gives.
    """
    return {name: bucket_cume_dist(buckets, column.value, column.where) for name, column in POPULATION_COLUMNS.items()}


def add_population_columns(evaluated: pa.Table, stats: PopulationStats) -> pa.Table:
    """``evaluated`` (one bucket of profiles + scores) with the population columns appended."""
    for name, values in stats.items():
        evaluated = evaluated.append_column(pa.field(name, pa.float64()), values(evaluated))
    return evaluated


def _create_profiles_view(con: duckdb.DuckDBPyConnection, evaluated: pa.Table) -> None:
    """The view rules are evaluated against: one hour's profiles + scores with the derived columns.

    Population columns ``evaluated`` does not carry are computed over ``evaluated`` itself
    (the table is the whole population); one bucket of a larger one carries them
    (:func:`add_population_columns`).
    """
    if any(name not in evaluated.column_names for name in POPULATION_COLUMNS):
        evaluated = add_population_columns(evaluated, population_stats(lambda: [evaluated]))
    con.register("snapshot_input", evaluated)
    derived = ", ".join(f"{sql} AS {name}" for name, (_, sql) in DERIVED_COLUMNS.items())
    con.execute(f"CREATE TEMP VIEW {RULE_VIEW} AS SELECT *, {derived} FROM snapshot_input")


def share_counts(evaluated: pa.Table, rules: Sequence[SegmentRule]) -> dict[str, tuple[int, int]]:
    """Per rule with a declared ``max_share``: (matched, judged) profiles of ``evaluated``; counts of buckets add up."""
    declared = [r for r in rules if r.max_share is not None]
    if not declared:
        return {}
    con = rule_connection()
    try:
        _create_profiles_view(con, evaluated)
        counts = ", ".join(
            f"count(*) FILTER (WHERE ({r.enter})), count(*) FILTER (WHERE ({r.enter}) IS NOT NULL)" for r in declared
        )
        row = con.execute(f"SELECT {counts} FROM {RULE_VIEW}").fetchall()[0]
    finally:
        con.close()
    return {rule.name: (int(row[2 * i]), int(row[2 * i + 1])) for i, rule in enumerate(declared)}


def share_report(counts: Mapping[str, tuple[int, int]], rules: Sequence[SegmentRule]) -> list[dict[str, Any]]:
    """The share checks of ``counts`` (``share_counts``, summed over the buckets), in rule order."""
    checks = []
    for rule in rules:
        if rule.max_share is None:
            continue
        matched, judged = counts.get(rule.name, (0, 0))
        limit = float(rule.max_share or 0.0)
        checks.append(
            {
                "rule": rule.name,
                "max_share": limit,
                "matched": matched,
                "judged": judged,
                "share": round(matched / judged, 4) if judged else None,
                "over": matched > limit * judged + 1,
            }
        )
    return checks


def share_checks(evaluated: pa.Table, rules: Sequence[SegmentRule]) -> list[dict[str, Any]]:
    """Per rule with a declared ``max_share``: how many profiles ``enter`` matched, of how many it could judge.

    ``judged`` counts the profiles for which ``enter`` is not NULL (a decile rule cannot
    judge an unscored user, a spend percentile a user without orders or prices), so ties
    show: when every buyer spent the same, ``monetary_percentile >= 0.95`` matches all of
    them. ``over`` when more than ``max_share`` of ``judged`` matched, allowing for the one
    user at a percentile's boundary (``cume_dist >= 0.95`` over 100 distinct amounts
    matches 6). Reported, not capped: among tied users no one is more "top 5%" than another.
    ``publish_segments`` adds the ``share_counts`` of every bucket (``share_report``).
    """
    return share_report(share_counts(evaluated, rules), rules)


def share_warning(check: Mapping[str, Any]) -> str:
    """The run summary's note (and the task log's warning) for a rule over its declared share."""
    return (
        f"rule {check['rule']} matched {check['share']:.0%} of the {check['judged']} profiles it can judge "
        f"({check['matched']} users), more than its declared max_share {check['max_share']:.0%} "
        "(ties at a percentile or decile?)"
    )
