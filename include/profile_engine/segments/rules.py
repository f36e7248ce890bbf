"""Marketing segments: YAML rules evaluated on each hourly snapshot, one action per user, exports.

DESIGN.md §2-3 (``publish_segments``). Marketers edit ``include/config/segments.yaml``;
each rule is a DuckDB boolean expression over the profile + score columns. Rules are
validated on load (bad SQL, unknown columns, duplicates, unknown offers...) so a typo
fails the run before anything is written, with an error naming the file and the rule.

Each hour every profile is evaluated. A user may be in several segments (hysteresis:
a member of the previous hour stays while ``stay`` holds) and gets at most one action:
suppression first, then the highest-priority rule whose action is not in cooldown for
that user (contact history under ``contacts/``). A deterministic md5 hash of
(user, rule) holds a configured share out as a control group. Expressions run on a
DuckDB connection with external access disabled, so a rule cannot read files.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from profile_engine.config import CONFIG_DIR, Settings
from profile_engine.contracts.events import md5_modulo_sql
from profile_engine.contracts.profiles import (
    FIRST_SEEN_AT,
    FREQUENCY_ORDERS,
    LIFECYCLE_STAGE,
    MONETARY_TOTAL,
    OPEN_CART_ITEMS,
    OPEN_CART_VALUE,
    PROFILE_COLUMNS,
    RFM_SEGMENT,
    SNAPSHOT_HOUR,
    USER_ID,
)
from profile_engine.contracts.scores import MODEL_VERSION, PROPENSITY, SCORE_COLUMNS, SCORE_SCHEMA
from profile_engine.contracts.segments import (
    ACTION,
    CHANGE,
    CHANNEL,
    CONTACT_HOUR,
    CONTACT_SCHEMA,
    CONTROL_FLAG,
    ENTERED,
    EXPORT_COLUMNS,
    EXPORT_SCHEMA,
    HELD_BY_STAY,
    LEFT,
    OFFER,
    OPTOUT_REASON,
    REASON,
    RULE,
    SEGMENT,
    SEGMENT_SCHEMA,
    SEGMENTS_COL,
    SUPPRESS_CHANGES,
    SUPPRESS_FULL,
    USER_KEY,
)
from profile_engine.hours import HOUR, floor_hour, format_hour, hour_range
from profile_engine.lake import db, faults
from profile_engine.lake import storage as lk
from profile_engine.privacy.keys import ExportKey, export_key, pseudonymize_array

if TYPE_CHECKING:
    import duckdb

DEFAULT_RULES_PATH = CONFIG_DIR / "segments.yaml"
_LOG = logging.getLogger(__name__)


# Columns derived here from the snapshot so rules stay readable (name -> DuckDB type, SQL).
_SNAPSHOT_END_SQL = f"{SNAPSHOT_HOUR} + INTERVAL 1 HOUR"
_HAS_SPEND_SQL = f"({FREQUENCY_ORDERS} > 0 AND {MONETARY_TOTAL} IS NOT NULL)"
DERIVED_COLUMNS: dict[str, tuple[str, str]] = {
    "snapshot_end": ("TIMESTAMPTZ", _SNAPSHOT_END_SQL),
    "hours_since_first_seen": ("DOUBLE", f"(epoch({_SNAPSHOT_END_SQL}) - epoch({FIRST_SEEN_AT})) / 3600.0"),
    # Share of buyers spending at most this user's amount (cume_dist among users with orders and a known
    # amount). NULL without orders and where money is unknown (a source without prices): sorted NULLs are
    # peers, so a cume_dist over them would put every such buyer at 1.0, the "top 5%".
    "monetary_percentile": (
        "DOUBLE",
        f"CASE WHEN {_HAS_SPEND_SQL} THEN cume_dist() OVER "
        f"(PARTITION BY {_HAS_SPEND_SQL} ORDER BY {MONETARY_TOTAL}) END",
    ),
}

# The view rules are evaluated against (a rule's subquery may read it, nothing else).
RULE_VIEW = "profiles"

# Offer text in the YAML -> action id (CSV file name, contact history value).
OFFERS: dict[str, str] = {
    "coupon 10%": "coupon_10pct",
    "cart reminder": "cart_reminder",
    "VIP service": "vip_service",
    "win-back 15%": "win_back_15pct",
    "welcome": "welcome",
    "suppress": "suppress",
}
SUPPRESS = "suppress"
SUPPRESS_CHANNEL = "all"
CHANNELS: tuple[str, ...] = ("email", "push", "sms", "onsite", "account_manager", SUPPRESS_CHANNEL)
CONTROL = "control"
NO_ACTION = "none"
# Users on the opt-out list: recorded in segments/ with this action, never exported, never contacted.
OPTED_OUT = "opted_out"
MAX_CONTROL_SHARE = 0.5
# Control-group hash resolution: shares are applied in basis points.
CONTROL_BASIS = 10_000

_RULE_KEYS = {
    "name",
    "description",
    "enter",
    "stay",
    "action",
    "priority",
    "cooldown_hours",
    "control_share",
    "max_share",
}
_REQUIRED_KEYS = ("name", "enter", "action", "priority")
_ACTION_KEYS = {"channel", "offer"}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# Reruns must reproduce, so rules may not depend on the wall clock or chance.
_VOLATILE_FUNCTIONS = frozenset(
    {
        "now",
        "current_timestamp",
        "get_current_timestamp",
        "transaction_timestamp",
        "current_date",
        "today",
        "current_time",
        "random",
        "uuid",
        "gen_random_uuid",
        "setseed",
    }
)
_FLOAT_TYPES = ("DOUBLE", "FLOAT", "REAL", "DECIMAL")

# The rule grammar (docs/segments.md): a rule is an expression over one profile's columns, so it
# costs a bounded amount of work per row and reads nothing else. Parse-tree node classes allowed:
_RULE_NODES = frozenset(
    {"COLUMN_REF", "CONSTANT", "COMPARISON", "CONJUNCTION", "BETWEEN", "CASE", "CAST", "TYPE", "OPERATOR", "FUNCTION"}
)
# OPERATOR nodes allowed: NOT, IS [NOT] NULL, [NOT] IN (list), coalesce(...).
_RULE_OPERATORS = frozenset(
    {"OPERATOR_NOT", "OPERATOR_IS_NULL", "OPERATOR_IS_NOT_NULL", "COMPARE_IN", "COMPARE_NOT_IN", "OPERATOR_COALESCE"}
)
# Arithmetic, string concatenation and [NOT] [I]LIKE, as the parser names them.
_RULE_OPERATOR_FUNCTIONS = frozenset({"+", "-", "*", "/", "//", "%", "^", "**", "||", "~~", "!~~", "~~*", "!~~*"})
# Hashes: the only functions ``user_id`` may appear in (an A/B split such as md5_number(user_id) % 100 < 50).
HASH_FUNCTIONS: tuple[str, ...] = ("md5_number", "md5")
# Scalar functions a rule may call (besides the operators above); each is cheap, per row and reads nothing.
RULE_FUNCTIONS: tuple[str, ...] = (
    *HASH_FUNCTIONS,
    "abs",
    "round",
    "floor",
    "ceil",
    "ceiling",
    "trunc",
    "sign",
    "sqrt",
    "ln",
    "log",
    "log10",
    "log2",
    "power",
    "pow",
    "least",
    "greatest",
    "nullif",
    "if",
    "lower",
    "upper",
    "length",
    "starts_with",
    "ends_with",
    "contains",
    "list_contains",
    "len",
    "epoch",
    "date_part",
    "date_diff",
    "hour",
    "dayofweek",
    "isodow",
    "to_minutes",
    "to_hours",
    "to_days",
    "to_weeks",
)
_NODE_NAMES = {
    "SUBQUERY": "a subquery",
    "WINDOW": "a window function",
    "STAR": "a * or COLUMNS(...)",
    "LAMBDA": "a lambda",
    "PARAMETER": "a parameter",
    "COLLATE": "COLLATE",
}


class SegmentConfigError(ValueError):
    """A segment rules file is invalid; the message names the file, the rule and the problem."""


@dataclass(frozen=True)
class SegmentRule:
    """One validated segment rule with its action."""

    name: str
    enter: str
    offer: str
    channel: str
    priority: int
    stay: str | None = None
    cooldown_hours: int = 0
    control_share: float = 0.0
    description: str = ""
    # Share of the profiles it can judge that ``enter`` is meant to match at most (a percentile or decile rule).
    max_share: float | None = None
    enter_columns: tuple[str, ...] = ()
    stay_columns: tuple[str, ...] = ()

    @property
    def action(self) -> str:
        """Action id of the offer (CSV name and contact-history value)."""
        return OFFERS[self.offer]

    @property
    def suppress(self) -> bool:
        """Whether this rule suppresses every other action."""
        return self.offer == SUPPRESS


# ---- rules -------------------------------------------------------------------------------


def known_columns() -> list[str]:
    """Production column list for validating rules: profile contract + score columns.

    The profile contract is ``features.PROFILE_COLUMNS``; derived columns are added by
    ``load_rules`` itself.
    """
    return [*PROFILE_COLUMNS, *SCORE_COLUMNS]


def load_rules(path: Path | None = None, columns: Sequence[str] | pa.Schema | None = None) -> list[SegmentRule]:
    """Load and validate segment rules, sorted by priority.

    ``columns`` are the profile + score columns a rule may use: a schema (types are then
    checked too, e.g. that ``enter`` is boolean) or names; ``None`` means
    :func:`known_columns`. The derived columns (``snapshot_end``,
    ``hours_since_first_seen``, ``monetary_percentile``) are always allowed. Raises
    :class:`SegmentConfigError` naming the file, the rule and the problem.
    """
    path = DEFAULT_RULES_PATH if path is None else path
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SegmentConfigError(f"{path}: cannot read rules: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("segments"), list):
        raise SegmentConfigError(f"{path}: expected a mapping with a 'segments' list")
    unknown_top = set(document) - {"version", "segments"}
    if unknown_top:
        raise SegmentConfigError(f"{path}: unknown top-level keys {sorted(unknown_top)}")
    if not document["segments"]:
        raise SegmentConfigError(f"{path}: no segments defined")

    con = _rule_connection()
    try:
        known = _create_rule_view(con, columns if columns is not None else known_columns())
        rules: list[SegmentRule] = []
        for index, raw in enumerate(document["segments"], start=1):
            rules.append(_parse_rule(con, path, index, raw, known))
    finally:
        con.close()

    seen_names: dict[str, int] = {}
    seen_priorities: dict[int, str] = {}
    for index, rule in enumerate(rules, start=1):
        where = f"{path}: rule {rule.name!r} (#{index})"
        if rule.name in seen_names:
            raise SegmentConfigError(f"{where}: duplicate name (first used by rule #{seen_names[rule.name]})")
        if rule.priority in seen_priorities:
            raise SegmentConfigError(
                f"{where}: duplicate priority {rule.priority} (already used by rule {seen_priorities[rule.priority]!r})"
            )
        seen_names[rule.name] = index
        seen_priorities[rule.priority] = rule.name
    return sorted(rules, key=lambda r: r.priority)


def _parse_rule(con: duckdb.DuckDBPyConnection, path: Path, index: int, raw: Any, known: set[str]) -> SegmentRule:
    """Validate one raw YAML rule into a :class:`SegmentRule`."""
    label = f"rule {raw.get('name')!r} (#{index})" if isinstance(raw, dict) and "name" in raw else f"rule #{index}"
    where = f"{path}: {label}"
    if not isinstance(raw, dict):
        raise SegmentConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    missing = [key for key in _REQUIRED_KEYS if raw.get(key) is None]
    if missing:
        raise SegmentConfigError(f"{where}: missing field(s) {', '.join(missing)}")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise SegmentConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")

    name = raw["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SegmentConfigError(f"{where}: name must be lower_snake_case (letters, digits, _), got {name!r}")
    priority = raw["priority"]
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise SegmentConfigError(f"{where}: priority must be an integer, got {priority!r}")

    action = raw["action"]
    if not isinstance(action, dict):
        raise SegmentConfigError(f"{where}: action must be a mapping with channel and offer")
    missing_action = [key for key in sorted(_ACTION_KEYS) if action.get(key) is None]
    if missing_action:
        raise SegmentConfigError(f"{where}: missing field(s) action.{', action.'.join(missing_action)}")
    if set(action) - _ACTION_KEYS:
        raise SegmentConfigError(
            f"{where}: unknown field(s) in action: {', '.join(sorted(set(action) - _ACTION_KEYS))}"
        )
    offer, channel = str(action["offer"]), str(action["channel"])
    if offer not in OFFERS:
        raise SegmentConfigError(f"{where}: unknown offer {offer!r}; known: {', '.join(OFFERS)}")
    if channel not in CHANNELS:
        raise SegmentConfigError(f"{where}: unknown channel {channel!r}; known: {', '.join(CHANNELS)}")
    if (offer == SUPPRESS) != (channel == SUPPRESS_CHANNEL):
        raise SegmentConfigError(f"{where}: offer {SUPPRESS!r} goes with channel {SUPPRESS_CHANNEL!r} and only with it")

    cooldown = raw.get("cooldown_hours", 0)
    if isinstance(cooldown, bool) or not isinstance(cooldown, int) or cooldown < 0:
        raise SegmentConfigError(f"{where}: cooldown_hours must be an integer >= 0, got {cooldown!r}")
    share = raw.get("control_share", 0.0)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 <= share <= MAX_CONTROL_SHARE:
        raise SegmentConfigError(f"{where}: control_share must be a number in [0, {MAX_CONTROL_SHARE}], got {share!r}")
    if offer == SUPPRESS and (cooldown or share):
        raise SegmentConfigError(
            f"{where}: a suppress rule contacts nobody: it takes no cooldown_hours or control_share"
        )
    max_share = raw.get("max_share")
    if max_share is not None and (
        isinstance(max_share, bool) or not isinstance(max_share, int | float) or not 0.0 < max_share <= 1.0
    ):
        raise SegmentConfigError(f"{where}: max_share must be a number in (0, 1], got {max_share!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise SegmentConfigError(f"{where}: description must be text")

    enter, enter_columns = _check_expression(con, where, "enter", raw["enter"], known)
    stay: str | None = None
    stay_columns: tuple[str, ...] = ()
    if raw.get("stay") is not None:
        stay, stay_columns = _check_expression(con, where, "stay", raw["stay"], known)
    return SegmentRule(
        name=name,
        enter=enter,
        offer=offer,
        channel=channel,
        priority=priority,
        stay=stay,
        cooldown_hours=cooldown,
        control_share=float(share),
        description=description.strip(),
        max_share=None if max_share is None else float(max_share),
        enter_columns=enter_columns,
        stay_columns=stay_columns,
    )


def _check_expression(
    con: duckdb.DuckDBPyConnection, where: str, field: str, value: Any, known: set[str]
) -> tuple[str, tuple[str, ...]]:
    """Check that ``value`` is one boolean SQL expression over known columns.

    Returns the stripped expression and the known columns it references (in order), which
    the membership reason reports.
    """
    import duckdb

    if not isinstance(value, str | bool) or (isinstance(value, str) and not value.strip()):
        raise SegmentConfigError(f"{where}: {field} must be a non-empty SQL expression")
    expr = str(value).strip()
    if ";" in expr:
        raise SegmentConfigError(f"{where}: {field} must be a single expression, ';' is not allowed")
    serialized = con.execute("SELECT json_serialize_sql(?)", ["SELECT " + expr]).fetchall()[0][0]
    tree = json.loads(serialized)
    if tree.get("error"):
        raise SegmentConfigError(f"{where}: {field} is not valid SQL: {tree.get('error_message')}")
    statements = tree["statements"]
    node = statements[0]["node"] if len(statements) == 1 else {}
    single = (
        node.get("type") == "SELECT_NODE"
        and len(node.get("select_list", [])) == 1
        and node["select_list"][0].get("alias") == ""
        and node.get("from_table", {}).get("type") == "EMPTY"
        and not node.get("modifiers")
        and not node.get("group_expressions")
        and all(node.get(key) is None for key in ("where_clause", "having", "qualify", "sample"))
    )
    if not single:
        raise SegmentConfigError(f"{where}: {field} must be a single expression, not a query or a list: {expr!r}")
    functions = {str(name).lower() for name in _tree_values(node, "function_name")}
    volatile = sorted(functions & _VOLATILE_FUNCTIONS)
    if volatile:
        raise SegmentConfigError(
            f"{where}: {field} uses {', '.join(volatile)}: reruns must reproduce, use snapshot_end instead"
        )
    problem = _grammar_problem(node["select_list"][0])
    if problem:
        raise SegmentConfigError(
            f"{where}: {field} uses {problem}; a rule is an expression over the profile's columns: column names, "
            "literals, operators, CASE, CAST and the functions listed in docs/segments.md"
        )
    try:
        described = con.execute(f"DESCRIBE SELECT ({expr}) AS v FROM {RULE_VIEW}").fetchall()
    except duckdb.Error as exc:
        problem = str(exc).splitlines()[0]
        raise SegmentConfigError(f"{where}: {field} does not bind against the profile columns: {problem}") from exc
    result_type = str(described[0][1]).strip('"')
    if result_type not in ("BOOLEAN", "NULL"):
        raise SegmentConfigError(f"{where}: {field} must be a boolean expression, it yields {result_type}")
    referenced: list[str] = []
    for names in _tree_values(node, "column_names"):
        column = str(names[-1]) if isinstance(names, list) and names else ""
        if column in known and column not in referenced:
            referenced.append(column)
    return expr, tuple(referenced)


def _grammar_problem(node: Any, hashed: bool = False) -> str | None:
    """What in a parsed rule expression is outside the rule grammar (None when nothing is).

    Only the node classes of :data:`_RULE_NODES` are allowed, functions only from
    :data:`RULE_FUNCTIONS` and the operators, and ``user_id`` only as an argument of a
    hash (:data:`HASH_FUNCTIONS`), alone or concatenated (``||``), so that no rule can
    compare, print or fail on a raw id (a CAST inside the hash could fail naming it).
    ``hashed`` says whether ``node`` is such an argument.
    """
    if isinstance(node, list):
        return next((p for p in (_grammar_problem(item, hashed) for item in node) if p), None)
    if not isinstance(node, dict):
        return None
    kind = node.get("class")
    if kind is not None:
        if kind not in _RULE_NODES:
            name = node.get("function_name")
            return _NODE_NAMES.get(str(kind), str(kind).lower()) + (f" ({name})" if name else "")
        if kind == "OPERATOR" and node.get("type") not in _RULE_OPERATORS:
            return f"the operator {str(node.get('type')).removeprefix('OPERATOR_').lower()}"
        if kind == "COLUMN_REF" and (node.get("column_names") or [""])[-1] == USER_ID and not hashed:
            return (
                f"{USER_ID} outside {'() or '.join(HASH_FUNCTIONS)}(): a rule may split users by a hash of their id "
                f"(md5_number({USER_ID}) % 100 < 50) but never use the raw id"
            )
        if kind == "FUNCTION":
            name = str(node.get("function_name", "")).lower()
            if name not in RULE_FUNCTIONS and name not in _RULE_OPERATOR_FUNCTIONS:
                return f"the function {name}(), which is not allowed in rules"
            if node.get("schema") or node.get("catalog") or node.get("filter") or node.get("distinct"):
                return f"a qualified, filtered or DISTINCT call of {name}()"
            if (node.get("order_bys") or {}).get("orders") or node.get("export_state"):
                return f"an aggregate form of {name}()"
        # What a hash hashes, and the parts of a concatenation inside it, may be user_id.
        name = str(node.get("function_name", "")).lower()
        hashed = kind == "FUNCTION" and (name in HASH_FUNCTIONS or (hashed and name == "||"))
    return next((p for p in (_grammar_problem(value, hashed) for value in node.values()) if p), None)


def _tree_values(node: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in a serialized parse tree, in reading order."""
    found: list[Any] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if key in item:
                found.append(item[key])
            stack.extend(reversed(item.values()))
        elif isinstance(item, list):
            stack.extend(reversed(item))
    return found


def _rule_connection() -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that cannot touch files: rule expressions run here."""
    con = db.connect(enable_external_access=False)
    con.execute("SET TimeZone = 'UTC'")
    return con


def _create_rule_view(con: duckdb.DuckDBPyConnection, columns: Sequence[str] | pa.Schema) -> set[str]:
    """Create an empty ``profiles`` view with ``columns`` + derived columns; return the known names.

    With bare names the columns are untyped (SQL NULL), which still catches unknown
    columns and bad SQL; with a schema the types are real.
    """
    if isinstance(columns, pa.Schema):
        con.register("rule_check_input", columns.empty_table())
        base = "SELECT * FROM rule_check_input"
        names = list(columns.names)
    else:
        names = list(columns)
        if not names:
            raise ValueError("no columns to validate segment rules against")
        base = "SELECT " + ", ".join(f"NULL AS {_quote(c)}" for c in names)
    derived = ", ".join(f"CAST(NULL AS {sql_type}) AS {name}" for name, (sql_type, _) in DERIVED_COLUMNS.items())
    con.execute(f"CREATE OR REPLACE VIEW {RULE_VIEW} AS SELECT *, {derived} FROM ({base}) WHERE false")
    return {*names, *DERIVED_COLUMNS}


def _quote(identifier: str) -> str:
    """A DuckDB quoted identifier."""
    return '"' + identifier.replace('"', '""') + '"'


def _literal(text: str) -> str:
    """A DuckDB string literal."""
    return "'" + text.replace("'", "''") + "'"


# ---- assignment --------------------------------------------------------------------------


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
        column = _quote(self.column)
        values = [_literal_sql(kind, text) for kind, text in self.literals]
        if self.kind == "between":
            return f"({column} BETWEEN {values[0]} AND {values[1]})"
        if self.kind == "in":
            return f"({column} IN ({', '.join(values)}))"
        return f"({column} {_COMPARISONS[self.kind][0]} {values[0]})"


def _literal_sql(kind: str, text: str) -> str:
    """SQL text of a parsed literal."""
    return _literal(text) if kind == "STRING" else text


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
        if any(str(names[-1]) == USER_ID for names in _tree_values(node, "column_names") if names):
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
        for names in _tree_values(node, "column_names"):
            column = str(names[-1]) if isinstance(names, list) and names else ""
            if column and column not in others:
                others.append(column)

    visit(root)
    return conditions, others, hidden


def _value_sql(column: str, types: Mapping[str, str]) -> str:
    """SQL text of a user's value: numbers with at most two decimals and no trailing zeros."""
    sql_type = types.get(column, "VARCHAR")
    if sql_type.startswith(_FLOAT_TYPES):
        return f"printf('%.10g', round({_quote(column)}, 2))"
    return f"CAST({_quote(column)} AS VARCHAR)"


def _condition_text_sql(condition: Condition, types: Mapping[str, str]) -> str:
    """SQL building the readable text of one condition for a user, e.g. ``last purchase 52h ago > 24h``."""
    value = f"coalesce({_value_sql(condition.column, types)}, 'unknown')"
    hours = condition.column.startswith(_HOURS_PREFIX)
    label = condition.column.removeprefix(_HOURS_PREFIX) if hours else condition.column
    label = COLUMN_LABELS.get(condition.column, label.replace("_", " "))
    unit = "h" if hours else ""
    shown = f"{_literal(label + ' ')} || {value} || {_literal(unit + (' ago' if hours else ''))}"
    texts = [text + unit for _, text in condition.literals]
    if condition.kind == "between":
        return f"{shown} || {_literal(f' in {texts[0]}..{texts[1]}')}"
    if condition.kind in ("in", "COMPARE_EQUAL"):
        return shown  # the value is the one asked for
    return f"{shown} || {_literal(f' {_COMPARISONS[condition.kind][1]} {texts[0]}')}"


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
    parts += [f"CASE WHEN coalesce(({h.sql}), false) THEN {_literal(h.text)} END" for h in hidden]
    covered = {c.column for c in conditions} | {USER_ID}
    plain = [c for c in (*others, *columns) if c in types and c not in covered]
    for column in dict.fromkeys(plain):
        parts.append(f"{_literal(column + '=')} || coalesce({_value_sql(column, types)}, 'NULL')")
    if not parts:
        return _literal(label)
    return f"{_literal(label + ': ')} || concat_ws('; ', {', '.join(parts)})"


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
    con = _rule_connection()
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
        for i, rule in enumerate(rules):
            stay = f"coalesce(({rule.stay}), false)" if rule.stay else "false"
            flags.append(f"coalesce(({rule.enter}), false) AS __enter_{i}, {stay} AS __stay_{i}")
            flags.append(f"coalesce(list_contains(prev.__prev_segments, {_literal(rule.name)}), false) AS __prev_{i}")
            enter_reason = _reason_sql(con, rule.name, rule.enter, rule.enter_columns, types)
            stay_reason = _reason_sql(con, f"{rule.name} (stay)", rule.stay, rule.stay_columns, types)
            members.append(
                f"SELECT {USER_ID}, {_literal(rule.name)} AS {RULE}, "
                f"CASE WHEN __enter_{i} THEN {enter_reason} ELSE {stay_reason} END AS {REASON}, "
                f"NOT __enter_{i} AS by_stay "
                f"FROM flagged WHERE __enter_{i} OR (__prev_{i} AND __stay_{i})"
            )
        # Rule expressions (window functions included) see the whole population of the hour.
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
            WITH chosen AS (
                SELECT m.{USER_ID}, m.{RULE}, m.{REASON}, r.{ACTION}, r.{OFFER}, r.{CHANNEL}, r.control_bp, r.suppress
                FROM members m
                JOIN rules_meta r USING ({RULE})
                ANTI JOIN blocked b ON b.{USER_ID} = m.{USER_ID} AND b.{RULE} = m.{RULE}
                QUALIFY row_number() OVER (PARTITION BY m.{USER_ID} ORDER BY r.suppress DESC, r.priority) = 1
            ),
            memberships AS (
                SELECT m.{USER_ID}, list(m.{RULE} ORDER BY r.priority) AS {SEGMENTS_COL},
                       coalesce(list(m.{RULE} ORDER BY r.priority) FILTER (WHERE m.by_stay), []) AS {HELD_BY_STAY}
                FROM members m JOIN rules_meta r USING ({RULE})
                GROUP BY m.{USER_ID}
            ),
            cooled AS (
                SELECT b.{USER_ID}, string_agg(b.{RULE}, ', ' ORDER BY r.priority) AS rules
                FROM blocked b JOIN rules_meta r USING ({RULE})
                GROUP BY b.{USER_ID}
            ),
            decided AS (
                SELECT u.{USER_ID}, u.{SEGMENTS_COL}, u.{HELD_BY_STAY}, c.{RULE}, c.{OFFER}, c.{CHANNEL},
                       c.{ACTION} AS rule_action, c.{REASON} AS rule_reason, k.rules AS cooled_rules,
                       o.{USER_ID} IS NOT NULL AS opted_out,
                       coalesce(o.{USER_ID} IS NULL AND NOT c.suppress
                                AND {md5_modulo_sql(f"u.{USER_ID} || '|' || c.{RULE}", CONTROL_BASIS)} < c.control_bp,
                                false) AS held_out
                FROM memberships u
                LEFT JOIN chosen c USING ({USER_ID})
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
                   f.__score AS {PROPENSITY},
                   {HELD_BY_STAY}
            FROM decided d
            JOIN flagged f USING ({USER_ID})
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


def _create_profiles_view(con: duckdb.DuckDBPyConnection, evaluated: pa.Table) -> None:
    """The view rules are evaluated against: one hour's profiles + scores with the derived columns."""
    con.register("snapshot_input", evaluated)
    derived = ", ".join(f"{sql} AS {name}" for name, (_, sql) in DERIVED_COLUMNS.items())
    con.execute(f"CREATE VIEW {RULE_VIEW} AS SELECT *, {derived} FROM snapshot_input")


def share_checks(evaluated: pa.Table, rules: Sequence[SegmentRule]) -> list[dict[str, Any]]:
    """Per rule with a declared ``max_share``: how many profiles ``enter`` matched, of how many it could judge.

    ``judged`` counts the profiles for which ``enter`` is not NULL (a decile rule cannot
    judge an unscored user, a spend percentile a user without orders or prices), so ties
    show: when every buyer spent the same, ``monetary_percentile >= 0.95`` matches all of
    them. ``over`` when more than ``max_share`` of ``judged`` matched, allowing for the one
    user at a percentile's boundary (``cume_dist >= 0.95`` over 100 distinct amounts
    matches 6). Reported, not capped: among tied users no one is more "top 5%" than another.
    """
    declared = [r for r in rules if r.max_share is not None]
    if not declared:
        return []
    con = _rule_connection()
    try:
        _create_profiles_view(con, evaluated)
        counts = ", ".join(
            f"count(*) FILTER (WHERE ({r.enter})), count(*) FILTER (WHERE ({r.enter}) IS NOT NULL)" for r in declared
        )
        row = con.execute(f"SELECT {counts} FROM {RULE_VIEW}").fetchall()[0]
    finally:
        con.close()
    checks = []
    for i, rule in enumerate(declared):
        matched, judged = int(row[2 * i]), int(row[2 * i + 1])
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


def share_warning(check: Mapping[str, Any]) -> str:
    """The run summary's note (and the task log's warning) for a rule over its declared share."""
    return (
        f"rule {check['rule']} matched {check['share']:.0%} of the {check['judged']} profiles it can judge "
        f"({check['matched']} users), more than its declared max_share {check['max_share']:.0%} "
        "(ties at a percentile or decile?)"
    )


# ---- lake I/O ----------------------------------------------------------------------------


def _read_snapshot(lake: lk.Lake, hour: datetime) -> pa.Table:
    """The committed profile snapshot of ``hour``; fails naming the hour when uncommitted."""
    marker = lake.partition(lk.PROFILES, hour) / lk.MANIFEST
    if not marker.is_file():
        raise FileNotFoundError(
            f"profile snapshot of hour {format_hour(hour)} is not committed (no {marker}); "
            "publish_profiles must finish that hour first"
        )
    return lake.read(lk.PROFILES, hour)


def _read_scores(lake: lk.Lake, hour: datetime) -> pa.Table | None:
    """Committed scores of ``hour`` (score columns only, deciles on the whole scored population), or None."""
    from profile_engine.model.scoring import read_scores

    try:
        return read_scores(lake, hour).select([USER_ID, *SCORE_COLUMNS])
    except FileNotFoundError:
        return None


def _join_scores(profiles: pa.Table, scores: pa.Table | None) -> pa.Table:
    """Profiles with the score columns (NULL where a user has no score)."""
    base = profiles.drop_columns([c for c in SCORE_COLUMNS if c in profiles.column_names])
    if scores is None:
        for field in SCORE_SCHEMA:
            base = base.append_column(field, pa.nulls(base.num_rows, field.type))
        return base

    con = db.connect()
    try:
        con.register("base_input", base)
        con.register(
            "scores_input",
            scores.select([USER_ID, *SCORE_COLUMNS]).cast(pa.schema([pa.field(USER_ID, pa.string()), *SCORE_SCHEMA])),
        )
        score_cols = ", ".join(f"s.{c}" for c in SCORE_COLUMNS)
        joined = con.sql(
            f"SELECT b.*, {score_cols} FROM base_input b LEFT JOIN scores_input s USING ({USER_ID}) ORDER BY b.{USER_ID}"
        ).to_arrow_table()
    finally:
        con.close()
    return joined.cast(pa.schema([*base.schema, *SCORE_SCHEMA]))


def _read_recent_contacts(lake: lk.Lake, hour: datetime, window_hours: int) -> pa.Table:
    """Contacts of the ``window_hours - 1`` hours before ``hour`` with their age in hours.

    A contact ``k`` hours ago blocks an action whose cooldown is more than ``k`` hours; the
    hour itself is excluded, so a rerun of ``hour`` does not block itself.
    """
    tables = []
    for age in range(1, window_hours):
        past = hour - age * HOUR
        if lake.committed(lk.CONTACTS, past):
            table = lake.read(lk.CONTACTS, past, columns=[USER_ID, ACTION])
            tables.append(table.append_column("hours_ago", pa.array([age] * table.num_rows, pa.int64())))
    if not tables:
        return pa.table(
            {
                USER_ID: pa.array([], pa.string()),
                ACTION: pa.array([], pa.string()),
                "hours_ago": pa.array([], pa.int64()),
            }
        )
    return pa.concat_tables(tables)


def _contacts_of(assigned: pa.Table, hour: datetime) -> pa.Table:
    """This hour's contact rows: every delivered action and every control hold-out."""
    con = db.connect()
    try:
        con.register("assigned_input", assigned)
        table = con.sql(
            f"SELECT {USER_ID}, {ACTION}, {RULE} FROM assigned_input "
            f"WHERE {ACTION} NOT IN ('{NO_ACTION}', '{SUPPRESS}', '{OPTED_OUT}') ORDER BY {USER_ID}"
        ).to_arrow_table()
    finally:
        con.close()
    hours = pa.array([floor_hour(hour)] * table.num_rows, pa.timestamp("ms", tz="UTC"))
    return table.append_column(CONTACT_HOUR, hours).cast(CONTACT_SCHEMA)


# ---- opt-outs ----------------------------------------------------------------------------

OPTOUT_TABLE = "marketing_optouts"
_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


def read_optouts(lake: lk.Lake, engine: Any | None = None, table: str = OPTOUT_TABLE) -> pa.Table:
    """Users who withdrew marketing consent (one ``user_id`` column, distinct, sorted).

    Every ``*.csv`` (with a ``user_id`` header) and ``*.parquet`` file under
    ``<lake>/_meta/optout/``, plus, when a SQLAlchemy ``engine`` is given (from an Airflow
    Connection), the ``user_id`` column of SQL table ``table``. The list is read when the
    hour is published, so a rerun honours opt-outs recorded since.
    """
    ids: set[str] = set()
    folder = lake.path(lk.OPTOUT)
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if path.suffix == ".csv":
            options = pacsv.ConvertOptions(column_types={USER_ID: pa.string()})
            found = pacsv.read_csv(path, convert_options=options)
        elif path.suffix == ".parquet":
            found = pq.read_table(path)
        else:
            continue
        if USER_ID not in found.column_names:
            raise ValueError(f"{path}: an opt-out file needs a {USER_ID!r} column, found {found.column_names}")
        ids.update(str(v) for v in found.column(USER_ID).to_pylist() if v not in (None, ""))
    if engine is not None:
        import sqlalchemy as sa

        if not _IDENTIFIER_RE.match(table):
            raise ValueError(f"opt-out table name {table!r} is not a plain SQL identifier")
        with engine.connect() as connection:
            rows = connection.execute(sa.text(f"SELECT {USER_ID} FROM {table}")).fetchall()
        ids.update(str(row[0]) for row in rows if row[0] not in (None, ""))
    return pa.table({USER_ID: pa.array(sorted(ids), pa.string())})


# ---- exports and stability ---------------------------------------------------------------


def _export_tables(assigned: pa.Table, actions: Sequence[str], previous: pa.Table | None) -> dict[str, pa.Table]:
    """The rows each exported action's file holds (raw ids still; pseudonymised when written).

    Contact actions list this hour's recipients. ``suppress`` lists the change of the
    suppression list (users with action ``suppress``) against ``previous``, the committed
    segments of the previous hour: ``entered`` (suppressed now, not then) and ``left``
    (suppressed then, not now), so an unchanged list exports no row; without ``previous``
    every member is ``entered`` (a full list). A user who opted out since gets no ``left``
    row: opted-out users are never exported, and they stay suppressed downstream.
    """
    con = db.connect()
    tables: dict[str, pa.Table] = {}
    prev = (
        previous.select([USER_ID, ACTION, RULE, OFFER, CHANNEL])
        if previous is not None
        else pa.table({c: pa.array([], pa.string()) for c in (USER_ID, ACTION, RULE, OFFER, CHANNEL)})
    )
    try:
        con.register("assigned_input", assigned)
        con.register("previous_input", prev)
        for action in actions:
            if action != SUPPRESS:
                tables[action] = con.sql(
                    f"SELECT {USER_ID}, {RULE} AS {SEGMENT}, {OFFER}, {CHANNEL}, {REASON}, {PROPENSITY}, "
                    f"CAST(NULL AS VARCHAR) AS {CHANGE} "
                    f"FROM assigned_input WHERE {ACTION} = {_literal(action)} ORDER BY {USER_ID}"
                ).to_arrow_table()
                continue
            tables[action] = con.sql(
                f"""
                WITH now AS (SELECT * FROM assigned_input WHERE {ACTION} = '{SUPPRESS}'),
                was AS (SELECT * FROM previous_input WHERE {ACTION} = '{SUPPRESS}')
                SELECT {USER_ID}, {RULE} AS {SEGMENT}, {OFFER}, {CHANNEL}, {REASON}, {PROPENSITY},
                       '{ENTERED}' AS {CHANGE}
                FROM now ANTI JOIN was USING ({USER_ID})
                UNION ALL
                SELECT w.{USER_ID}, w.{RULE}, w.{OFFER}, w.{CHANNEL}, w.{RULE} || ': left the suppression list',
                       CAST(NULL AS DOUBLE), '{LEFT}'
                FROM was w
                ANTI JOIN (SELECT {USER_ID} FROM assigned_input WHERE {ACTION} IN ('{SUPPRESS}', '{OPTED_OUT}')) a
                    USING ({USER_ID})
                ORDER BY {USER_ID}
                """
            ).to_arrow_table()
    finally:
        con.close()
    return tables


def _suppress_summary(
    tables: Mapping[str, pa.Table], assigned: pa.Table, previous_hour: datetime, has_previous: bool
) -> dict[str, Any] | None:
    """What the suppress export holds: ``full`` list or ``changes`` to ``base_hour``'s, list size, entered, left."""
    if SUPPRESS not in tables:
        return None
    changes = tables[SUPPRESS].column(CHANGE).to_pylist()
    return {
        "mode": SUPPRESS_CHANGES if has_previous else SUPPRESS_FULL,
        "base_hour": format_hour(previous_hour) if has_previous else None,
        "list_size": assigned.column(ACTION).to_pylist().count(SUPPRESS),
        "entered": changes.count(ENTERED),
        "left": changes.count(LEFT),
    }


def _export_files(tables: Mapping[str, pa.Table], key: ExportKey) -> list[tuple[str, bytes]]:
    """``<action>.csv`` and ``<action>.parquet`` per action, users as pseudonyms, sorted by pseudonym."""
    files: list[tuple[str, bytes]] = []
    for action, table in tables.items():
        keyed = table.drop_columns([USER_ID]).add_column(0, USER_KEY, pseudonymize_array(table.column(USER_ID), key))
        keyed = keyed.sort_by([(USER_KEY, "ascending")]).select(list(EXPORT_COLUMNS)).cast(EXPORT_SCHEMA)
        text = io.BytesIO()
        pacsv.write_csv(keyed, text)
        parquet = io.BytesIO()
        pq.write_table(keyed, parquet, compression="zstd")
        files += [(f"{action}.csv", text.getvalue()), (f"{action}.parquet", parquet.getvalue())]
    return files


def segment_stability(
    assigned: pa.Table, previous: pa.Table | None, rule_names: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per segment: size, entered, exited, stayed, overlap with the previous hour, flips prevented, control size.

    ``overlap`` is the Jaccard index of this hour's and the previous hour's members;
    ``held_by_stay`` counts members kept only by the ``stay`` condition (flips that
    hysteresis prevented); ``control`` the members held out as control group of that
    segment. Without a previous hour, entered/exited/stayed/overlap are None.
    """
    con = _rule_connection()
    try:
        con.register("current_input", assigned.select([USER_ID, SEGMENTS_COL, HELD_BY_STAY, RULE, CONTROL_FLAG]))
        has_previous = previous is not None
        prev = (
            previous.select([USER_ID, SEGMENTS_COL])
            if previous is not None
            else pa.table({USER_ID: pa.array([], pa.string()), SEGMENTS_COL: pa.array([], pa.list_(pa.string()))})
        )
        con.register("previous_input", prev)
        con.register("rule_names", pa.table({"name": pa.array(list(rule_names), pa.string())}))
        # Set operations per segment in DuckDB (a Python set per segment took 2.2 s at 654k users).
        rows = con.execute(
            f"""
            WITH cur AS (SELECT DISTINCT {USER_ID}, unnest({SEGMENTS_COL}) AS name FROM current_input),
            names AS (SELECT name FROM rule_names UNION SELECT name FROM cur),
            old AS (
                SELECT DISTINCT {USER_ID}, name FROM (
                    SELECT {USER_ID}, unnest({SEGMENTS_COL}) AS name FROM previous_input
                ) WHERE name IN (SELECT name FROM names)
            ),
            pairs AS (
                SELECT coalesce(c.name, o.name) AS name, c.{USER_ID} IS NOT NULL AS now, o.{USER_ID} IS NOT NULL AS was
                FROM cur c FULL OUTER JOIN old o ON c.{USER_ID} = o.{USER_ID} AND c.name = o.name
            ),
            counts AS (
                SELECT name, count(*) FILTER (WHERE now) AS size, count(*) FILTER (WHERE was) AS previous_size,
                       count(*) FILTER (WHERE now AND NOT was) AS entered,
                       count(*) FILTER (WHERE was AND NOT now) AS exited,
                       count(*) FILTER (WHERE now AND was) AS stayed
                FROM pairs GROUP BY name
            ),
            held AS (
                SELECT name, count(*) AS held_by_stay
                FROM (SELECT unnest({HELD_BY_STAY}) AS name FROM current_input) GROUP BY name
            ),
            control AS (
                SELECT {RULE} AS name, count(*) AS control FROM current_input
                WHERE {CONTROL_FLAG} AND {RULE} IS NOT NULL GROUP BY {RULE}
            )
            SELECT n.name, coalesce(k.size, 0), coalesce(h.held_by_stay, 0), coalesce(c.control, 0),
                   coalesce(k.previous_size, 0), coalesce(k.entered, 0), coalesce(k.exited, 0), coalesce(k.stayed, 0)
            FROM names n LEFT JOIN counts k USING (name) LEFT JOIN held h USING (name) LEFT JOIN control c USING (name)
            """
        ).fetchall()
    finally:
        con.close()
    order = {name: i for i, name in enumerate(rule_names)}
    result: dict[str, dict[str, Any]] = {}
    for name, size, held, control, previous_size, entered, exited, stayed in sorted(
        rows, key=lambda r: (order.get(r[0], len(order)), r[0])
    ):
        union = size + exited
        result[str(name)] = {
            "size": int(size),
            "held_by_stay": int(held),
            "control": int(control),
            "previous_size": int(previous_size) if has_previous else None,
            "entered": int(entered) if has_previous else None,
            "exited": int(exited) if has_previous else None,
            "stayed": int(stayed) if has_previous else None,
            "overlap": (round(stayed / union, 4) if union else None) if has_previous else None,
        }
    return result


def _model_version(evaluated: pa.Table) -> str | list[str] | None:
    """The model version(s) behind this hour's scores (one string when one model scored everyone)."""
    if MODEL_VERSION not in evaluated.column_names:
        return None
    versions = sorted({v for v in evaluated.column(MODEL_VERSION).to_pylist() if v})
    return versions[0] if len(versions) == 1 else (versions or None)


def publish_segments(
    settings: Settings,
    hour: datetime,
    *,
    run_id: str = "manual",
    rules_path: Path | None = None,
    dry_run: bool = False,
    export_key_secret: str | None = None,
    optout_engine: Any | None = None,
) -> dict[str, Any]:
    """Assign segments and actions for ``hour``, write the segments partition and the exports.

    Reads the committed profile snapshot of the hour and its scores (NULL propensity,
    said in the summary, when none are committed), validates the rules against those
    columns and resolves the export key before writing anything, then writes
    ``segments/`` (one row per member with score and control flag), the hour's contact
    history (rewritten whole, so reruns do not double count) and ``exports/`` (per action
    a CSV and a Parquet file of pseudonymised users, then ``_manifest.json`` with run id,
    hour, rules-file hash, model version, segment sizes, entered/exited/stayed and
    checksums). Opted-out users (:func:`read_optouts`; ``optout_engine`` adds the SQL
    table) are never exported. ``export_key_secret`` is the Airflow Connection's key (see
    :func:`export_key`). ``dry_run`` computes and returns the summary but writes nothing.
    Returns a small JSON-able summary, including ``manifest_path`` for the Asset event.
    """
    hour = floor_hour(hour)
    lake = lk.Lake(settings.lake)
    profiles = _read_snapshot(lake, hour)
    scores = _read_scores(lake, hour)
    evaluated = _join_scores(profiles, scores)
    path = DEFAULT_RULES_PATH if rules_path is None else rules_path
    rules = load_rules(path, columns=evaluated.schema)
    key = None if dry_run else export_key(settings, connection_key=export_key_secret)

    previous_hour = hour - HOUR
    previous = lake.read(lk.SEGMENTS, previous_hour) if lake.committed(lk.SEGMENTS, previous_hour) else None
    contacts = _read_recent_contacts(lake, hour, max(r.cooldown_hours for r in rules))
    optouts = read_optouts(lake, optout_engine)
    assigned, sizes = assign_segments(evaluated, rules, previous, contacts, optouts)
    stability = segment_stability(assigned, previous, [r.name for r in rules])
    checks = share_checks(evaluated, rules)

    action_counts: dict[str, int] = {}
    for action in assigned.column(ACTION).to_pylist():
        action_counts[action] = action_counts.get(action, 0) + 1
    changes = {
        name: (row["size"] - row["previous_size"] if previous is not None else None)
        for name, row in stability.items()
        if name in sizes
    }

    notes = []
    scored = 0 if scores is None else evaluated.num_rows - evaluated.column(PROPENSITY).null_count
    if scores is None:
        notes.append(f"no scores committed for {format_hour(hour)}: {PROPENSITY} is NULL, rules on it do not fire")
    elif scored < evaluated.num_rows:
        notes.append(f"{evaluated.num_rows - scored} of {evaluated.num_rows} profiles have no score")
    if previous is None:
        notes.append(f"no segments committed for {format_hour(previous_hour)}: no hysteresis, no size change")
    if key is not None and key.generated:
        notes.append(f"pseudonyms use a new {key.source}")
    for check in checks:
        if check["over"]:
            notes.append(share_warning(check))
            _LOG.warning("%s: %s", format_hour(hour), share_warning(check))

    exported_actions = sorted({r.action for r in rules})
    tables = _export_tables(assigned, exported_actions, previous)
    suppress = _suppress_summary(tables, assigned, previous_hour, previous is not None)
    contact_rows = _contacts_of(assigned, hour)
    rules_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    model_version = _model_version(evaluated)
    exports_dir = lake.partition(lk.EXPORTS, hour)
    summary: dict[str, Any] = {
        "hour": format_hour(hour),
        "run_id": run_id,
        "dry_run": dry_run,
        "rules_file": str(path),
        "rules": [r.name for r in rules],
        "profiles": evaluated.num_rows,
        "members": assigned.num_rows,
        "scores_available": scores is not None,
        "scored_profiles": scored,
        "model_version": model_version,
        "previous_hour_committed": previous is not None,
        "segments": sizes,
        "segment_change": changes,
        "stability": stability,
        "share_checks": checks,
        "actions": dict(sorted(action_counts.items())),
        "exports": {action: table.num_rows for action, table in tables.items()},
        "suppress": suppress,
        "opted_out": action_counts.get(OPTED_OUT, 0),
        "contacts": contact_rows.num_rows,
        "export_key": None if key is None else {"source": key.source, "key_id": key.key_id},
        "notes": notes,
        "segments_path": None,
        "exports_path": None,
        "manifest_path": None,
    }
    if dry_run or key is None:
        return summary

    extra = {
        "rules_sha256": rules_sha256,
        "scores_available": scores is not None,
        "model_version": model_version,
        "segments": sizes,
        "stability": stability,
        "share_checks": checks,
    }
    lake.write_partition(lk.SEGMENTS, hour, assigned, run_id=run_id, extra=extra)
    lake.write_partition(lk.CONTACTS, hour, contact_rows, run_id=run_id)
    lake.write_dir(
        exports_dir,
        _export_files(tables, key),
        {
            "layer": lk.EXPORTS,
            "data_hour": format_hour(hour),
            "run_id": run_id,
            "rules_file": path.name,
            "rules_sha256": rules_sha256,
            "model_version": model_version,
            "key_id": key.key_id,
            "columns": list(EXPORT_COLUMNS),
            "rows": summary["exports"],
            "suppress": suppress,
            "segments": sizes,
            "changes": {name: {k: row[k] for k in ("entered", "exited", "stayed")} for name, row in stability.items()},
            "previous_hour_committed": previous is not None,
        },
    )
    summary["segments_path"] = str(lake.partition(lk.SEGMENTS, hour))
    summary["exports_path"] = str(exports_dir)
    summary["manifest_path"] = str(exports_dir / lk.MANIFEST)
    faults.maybe_fail(faults.EXPORTS_BEFORE_ASSET)
    return summary


# ---- uplift, stability over time, run report section ------------------------------------

UPLIFT_LOOKBACK_HOURS = 168
CHART_FILE = "segment_sizes.png"
CHART_HOURS = 168
_Z95 = 1.959963984540054


def _wilson(successes: float, n: float, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (``successes`` and ``n`` may be effective, non-integer counts)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_difference(
    treated: tuple[int, int], control: tuple[int, int], *, design_effects: tuple[float, float] = (1.0, 1.0)
) -> dict[str, float | None]:
    """Difference of two purchase rates with Newcombe's 95% hybrid score interval.

    ``treated`` and ``control`` are ``(buyers, exposures)``. ``design_effects`` (>= 1 each)
    divide each side's count into an effective sample size (Wilson's interval of a
    clustered proportion): exposures of one user are not independent. The interval stays
    inside [-1, 1] and behaves for small groups and rates near 0, where a Wald interval does not.
    """
    (b1, n1), (b2, n2) = treated, control
    if n1 == 0 or n2 == 0:
        return {"uplift": None, "low": None, "high": None}
    p1, p2 = b1 / n1, b2 / n2
    e1, e2 = n1 / max(1.0, design_effects[0]), n2 / max(1.0, design_effects[1])
    (l1, u1), (l2, u2) = _wilson(p1 * e1, e1), _wilson(p2 * e2, e2)
    d = p1 - p2
    return {
        "uplift": round(d, 6),
        "low": round(d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), 6),
        "high": round(d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2), 6),
    }


def design_effect(buyers: Sequence[int], exposures: Sequence[int]) -> float:
    """Variance of a rate over users with several exposures each, relative to independent exposures (>= 1).

    ``buyers[i]`` of ``exposures[i]`` exposures of user i bought. The rate ``B / N`` is a
    ratio estimator; its cluster-robust variance ``m / (m - 1) * sum (b_i - p n_i)^2 / N^2``
    over the binomial ``p (1 - p) / N``. 1 when every user has one exposure (or no spread).
    """
    m = len(exposures)
    total = float(sum(exposures))
    if m < 2 or total == 0:
        return 1.0
    p = sum(buyers) / total
    if p in (0.0, 1.0):
        return 1.0
    robust = m / (m - 1) * sum((b - p * n) ** 2 for b, n in zip(buyers, exposures, strict=True)) / total**2
    return max(1.0, robust / (p * (1 - p) / total))


def exposure_starts(contacts: pa.Table, periods: Mapping[str, int]) -> pa.Table:
    """The contacts that start an exposure: per (user, rule) the first contact, then the first at least a period later.

    A treated user is contacted at most once per cooldown, while a control user is
    recorded every hour they are held out, so counting every contact row compares one
    treated exposure with up to ``cooldown`` control rows of the same user (users who
    linger in a segment without buying weigh more in control). Counting each user once per
    exposure period (``periods[rule]`` hours, the rule's cooldown; 1 for a rule not in
    ``periods``) on both sides makes the two comparable. ``contacts`` follows
    :data:`CONTACT_SCHEMA`; the result keeps its columns, sorted by rule, user and hour.
    """
    if contacts.num_rows == 0:
        return contacts
    ordered = contacts.sort_by([(RULE, "ascending"), (USER_ID, "ascending"), (CONTACT_HOUR, "ascending")])
    rules = ordered.column(RULE).to_pylist()
    users = ordered.column(USER_ID).to_pylist()
    hours = ordered.column(CONTACT_HOUR).cast(pa.int64()).to_pylist()  # ms since the epoch
    hour_ms = HOUR // timedelta(milliseconds=1)
    keep: list[int] = []
    current: tuple[str, str] | None = None
    next_start = 0
    for i, (rule, user, ms) in enumerate(zip(rules, users, hours, strict=True)):
        if (rule, user) != current or ms >= next_start:
            current = (rule, user)
            next_start = ms + max(1, periods.get(rule, 1)) * hour_ms
            keep.append(i)
    return ordered.take(pa.array(keep, pa.int64()))


def uplift_rows(labelled: pa.Table, periods: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """Per rule: exposures, users and buyers, treated against control, with the clustered 95% interval.

    ``labelled`` holds exposure starts (:func:`exposure_starts`) with ``labels.LABEL``
    (bought in the window after the contact). A user's exposures are one cluster: the
    interval's effective sizes use :func:`design_effect` of each side.
    """
    from profile_engine.model import labels

    data = labelled.select([USER_ID, RULE, ACTION, labels.LABEL]).to_pydict()
    per_user: dict[tuple[str, str, str], list[int]] = {}
    actions: dict[str, set[str]] = {}
    for user, rule, action, bought in zip(data[USER_ID], data[RULE], data[ACTION], data[labels.LABEL], strict=True):
        side = "control" if action == CONTROL else "treated"
        counts = per_user.setdefault((rule, side, user), [0, 0])
        counts[0] += int(bought)
        counts[1] += 1
        if action != CONTROL:
            actions.setdefault(rule, set()).add(action)
    rows = []
    for rule in sorted({key[0] for key in per_user}):
        sides = {
            side: [counts for (r, s, _), counts in per_user.items() if r == rule and s == side]
            for side in ("treated", "control")
        }
        (bt, nt), (bc, nc) = ((sum(c[0] for c in v), sum(c[1] for c in v)) for v in sides.values())
        effects = tuple(design_effect([c[0] for c in v], [c[1] for c in v]) for v in sides.values())
        rows.append(
            {
                "rule": rule,
                "action": ", ".join(sorted(actions.get(rule, ()))) or None,
                "exposure_hours": max(1, (periods or {}).get(rule, 1)),
                "treated": nt,
                "treated_users": len(sides["treated"]),
                "treated_buyers": bt,
                "treated_rate": round(bt / nt, 6) if nt else None,
                "control": nc,
                "control_users": len(sides["control"]),
                "control_buyers": bc,
                "control_rate": round(bc / nc, 6) if nc else None,
                **rate_difference((bt, nt), (bc, nc), design_effects=(effects[0], effects[1])),
            }
        )
    return rows


def uplift(
    settings: Settings,
    hour: datetime,
    *,
    lookback_hours: int = UPLIFT_LOOKBACK_HOURS,
    rules_path: Path | None = None,
) -> dict[str, Any]:
    """Purchase rate after an action, treated against control, per rule, for exposures old enough.

    A user's contacts of a rule are grouped into exposure periods of the rule's cooldown
    (from the rules file; :func:`exposure_starts`), on both sides; an exposure starting at
    contact hour C counts when the purchase window that follows it (the label window
    ``[C+1h, C+1h+horizon)`` of ``labels``) is final at ``hour`` (window end + lateness),
    within the last ``lookback_hours``. Contacts up to a cooldown before that are read so
    an exposure running into the lookback is not counted twice. Buyers are read from
    staged purchase events, like the model's labels; the interval clusters by user.
    """
    from profile_engine.model import labels

    hour = floor_hour(hour)
    lake = lk.Lake(settings.lake)
    periods = {r.name: max(1, r.cooldown_hours) for r in load_rules(rules_path) if not r.suppress}
    first = hour - (lookback_hours - 1) * HOUR
    hours = [
        h for h in hour_range(first, hour) if labels.labels_final(settings, h, hour) and lake.committed(lk.CONTACTS, h)
    ]
    result: dict[str, Any] = {
        "window_hours": settings.label_horizon_hours,
        "contact_hours": len(hours),
        "first_contact_hour": format_hour(hours[0]) if hours else None,
        "last_contact_hour": format_hour(hours[-1]) if hours else None,
        "rules": [],
    }
    if not hours:
        return result
    earlier = [
        h
        for h in hour_range(first - (max(periods.values(), default=1) - 1) * HOUR, first - HOUR)
        if lake.committed(lk.CONTACTS, h)
    ]
    tables = [lake.read(lk.CONTACTS, h).cast(CONTACT_SCHEMA) for h in [*earlier, *hours]]
    starts = exposure_starts(pa.concat_tables(tables), periods)
    in_window = pc.greater_equal(
        starts.column(CONTACT_HOUR), pa.scalar(hours[0], CONTACT_SCHEMA.field(CONTACT_HOUR).type)
    )
    starts = starts.filter(in_window)
    if starts.num_rows == 0:
        return result
    examples = starts.append_column(SNAPSHOT_HOUR, starts.column(CONTACT_HOUR))
    result["rules"] = uplift_rows(labels.label_examples(settings, examples), periods)
    return result


def segment_size_history(lake: lk.Lake, hour: datetime, hours: int = CHART_HOURS) -> dict[str, dict[str, int]]:
    """Segment sizes per committed hour of the last ``hours`` hours: ``{hour: {segment: size}}``."""
    history: dict[str, dict[str, int]] = {}
    for past in hour_range(floor_hour(hour) - (hours - 1) * HOUR, floor_hour(hour)):
        if not lake.committed(lk.SEGMENTS, past):
            continue
        sizes = lake.manifest(lk.SEGMENTS, past).get("segments")
        if sizes is None:  # written before sizes were kept in the manifest
            sizes = {}
            for names in lake.read(lk.SEGMENTS, past, columns=[SEGMENTS_COL]).column(SEGMENTS_COL).to_pylist():
                for name in names:
                    sizes[name] = sizes.get(name, 0) + 1
        history[format_hour(past)] = {str(k): int(v) for k, v in sizes.items()}
    return history


def segment_sizes_chart(history: Mapping[str, Mapping[str, int]]) -> bytes | None:
    """A PNG line chart of segment sizes over time (None without any hour)."""
    if not history:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import date2num
    from matplotlib.figure import Figure

    hours = sorted(history)
    times = [date2num(datetime.fromisoformat(h)) for h in hours]  # type: ignore[no-untyped-call]
    names = sorted({name for sizes in history.values() for name in sizes})
    figure = Figure(figsize=(9, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for name in names:
        axes.plot(times, [history[h].get(name, 0) for h in hours], marker="." if len(hours) < 50 else None, label=name)
    axes.set_title(f"Segment sizes, {hours[0][:13]} .. {hours[-1][:13]} UTC")
    axes.set_ylabel("members")
    axes.xaxis_date()
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize="small", ncols=2)
    figure.autofmt_xdate()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def report_section(settings: Settings, hour: datetime) -> tuple[dict[str, Any], bytes | None]:
    """The run report's marketing section for ``hour`` and the PNG chart of segment sizes.

    Stability per segment (from the hour's committed segments), the uplift of actions old
    enough, and the chart's file name (None when no segments were ever committed). Never
    raises: the run report must be written, so an error is returned as the section.
    """
    lake = lk.Lake(settings.lake)
    hour = floor_hour(hour)
    try:
        manifest = lake.manifest(lk.SEGMENTS, hour) if lake.committed(lk.SEGMENTS, hour) else {}
        chart = segment_sizes_chart(segment_size_history(lake, hour))
        section = {
            "stability": manifest.get("stability"),
            # rules with a declared max_share: matched vs judged profiles (absent before shares were declared)
            "share_checks": manifest.get("share_checks") or [],
            "uplift": uplift(settings, hour),
            "chart": CHART_FILE if chart else None,
        }
    except Exception as error:  # the run report is written whatever failed; it shows the error instead
        return {"error": f"{type(error).__name__}: {error}"}, None
    return section, chart


def render_section_html(section: Mapping[str, Any]) -> str:
    """HTML tables of the marketing section (stability, uplift, chart) for the run report page."""
    if section.get("error"):
        return f"<h2>Segments</h2><p class='failed'>{html.escape(str(section['error']))}</p>"

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"<td>{value:.4f}</td>"
        return f"<td>{html.escape('' if value is None else str(value))}</td>"

    parts = ["<h2>Segments: stability this hour</h2>"]
    stability = section.get("stability") or {}
    if stability:
        keys = ["size", "entered", "exited", "stayed", "overlap", "held_by_stay", "control"]
        head = "".join(f"<th>{k.replace('_', ' ')}</th>" for k in ["segment", *keys])
        body = "".join(
            f"<tr>{cell(name)}{''.join(cell(row.get(k)) for k in keys)}</tr>" for name, row in stability.items()
        )
        parts.append(f"<table><tr>{head}</tr>{body}</table>")
    else:
        parts.append("<p>No segments committed for this hour.</p>")
    checks = section.get("share_checks") or []
    if checks:
        over = [c for c in checks if c.get("over")]
        parts.append(
            "<h2>Segments: declared shares</h2>"
            + (
                f"<p class='failed'>{len(over)} rule(s) matched more than their declared share: "
                + html.escape("; ".join(share_warning(c) for c in over))
                + "</p>"
                if over
                else "<p>Every rule stayed within its declared share.</p>"
            )
        )
        keys = ["rule", "max_share", "share", "matched", "judged", "over"]
        head = "".join(
            f"<th>{label}</th>"
            for label in ("rule", "declared share", "actual share", "matched", "judged (enter not NULL)", "over")
        )
        body = "".join(f"<tr>{''.join(cell(c.get(k)) for k in keys)}</tr>" for c in checks)
        parts.append(f"<table><tr>{head}</tr>{body}</table>")
    lift = section.get("uplift") or {}
    parts.append(
        f"<h2>Uplift: purchase rate in the {lift.get('window_hours')} h after an action, treated vs control</h2>"
    )
    if lift.get("rules"):
        keys = ["rule", "action", "treated", "treated_rate", "control", "control_rate", "uplift", "low", "high"]
        head = "".join(f"<th>{k.replace('_', ' ')}</th>" for k in keys)
        body = "".join(f"<tr>{''.join(cell(row.get(k)) for k in keys)}</tr>" for row in lift["rules"])
        parts.append(
            f"<p>Contacts of {lift['contact_hours']} hours ({html.escape(str(lift['first_contact_hour']))} .. "
            f"{html.escape(str(lift['last_contact_hour']))}); low/high: 95% interval of the uplift.</p>"
            f"<table><tr>{head}</tr>{body}</table>"
        )
    else:
        parts.append("<p>No action is old enough yet (its purchase window and the lateness must have passed).</p>")
    if section.get("chart"):
        parts.append(f"<h2>Segment sizes over time</h2><img src='{html.escape(str(section['chart']))}' alt='chart'>")
    return "".join(parts)
