"""Segment rules: the YAML rules file, its grammar and its checks, validated before anything is written.

The rule grammar and every check: docs/segments.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import yaml

from profile_engine.config import CONFIG_DIR
from profile_engine.contracts.profiles import (
    FIRST_SEEN_AT,
    FREQUENCY_ORDERS,
    MONETARY_TOTAL,
    PROFILE_COLUMNS,
    SNAPSHOT_HOUR,
    USER_ID,
)
from profile_engine.contracts.scores import SCORE_COLUMNS
from profile_engine.contracts.traits import Trait, load_traits, trait_fields
from profile_engine.lake import db

if TYPE_CHECKING:
    import duckdb


DEFAULT_RULES_PATH = CONFIG_DIR / "segments.yaml"


# Columns derived here from the snapshot so rules stay readable (name -> DuckDB type, SQL), each from its own row.
_SNAPSHOT_END_SQL = f"{SNAPSHOT_HOUR} + INTERVAL 1 HOUR"
_HAS_SPEND_SQL = f"({FREQUENCY_ORDERS} > 0 AND {MONETARY_TOTAL} IS NOT NULL)"
DERIVED_COLUMNS: dict[str, tuple[str, str]] = {
    "snapshot_end": ("TIMESTAMPTZ", _SNAPSHOT_END_SQL),
    "hours_since_first_seen": ("DOUBLE", f"(epoch({_SNAPSHOT_END_SQL}) - epoch({FIRST_SEEN_AT})) / 3600.0"),
}


@dataclass(frozen=True)
class PopulationColumn:
    """A derived column that is a population statistic: ``cume_dist()`` of ``value`` among the rows where ``where``
    holds, NULL elsewhere; computed over every bucket from per-bucket summaries (``profiles.ranks``), so one
    bucket at a time gets the values the whole population would. ``inputs``: the snapshot columns it reads."""

    sql_type: str
    value: str
    where: str
    inputs: tuple[str, ...]


# Share of buyers spending at most this user's amount (cume_dist among users with orders and a known
# amount). NULL without orders and where money is unknown (a source without prices): sorted NULLs are
# peers, so a cume_dist over them would put every such buyer at 1.0, the "top 5%".
POPULATION_COLUMNS: dict[str, PopulationColumn] = {
    "monetary_percentile": PopulationColumn(
        "DOUBLE", MONETARY_TOTAL, _HAS_SPEND_SQL, (FREQUENCY_ORDERS, MONETARY_TOTAL)
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


def rules_file(path: Path | None = None) -> Path:
    """``path``, or the default rules file :data:`DEFAULT_RULES_PATH` (read when called, so tests can point it elsewhere)."""
    return DEFAULT_RULES_PATH if path is None else path


def known_columns(traits: tuple[Trait, ...] | None = None) -> list[str]:
    """Production column list for validating rules: profile contract + declared trait + score columns.

    The profile contract is ``contracts.profiles.PROFILE_COLUMNS``; ``traits`` are the loaded
    declared traits (None: the package's defaults); derived columns are added by
    ``load_rules`` itself.
    """
    declared = load_traits() if traits is None else traits
    return [*PROFILE_COLUMNS, *(name for name, _ in trait_fields(declared)), *SCORE_COLUMNS]


def load_rules(path: Path | None = None, columns: Sequence[str] | pa.Schema | None = None) -> list[SegmentRule]:
    """Load and validate segment rules, sorted by priority.

    ``columns`` are the profile + score columns a rule may use: a schema (types are then
    checked too, e.g. that ``enter`` is boolean) or names; ``None`` means
    :func:`known_columns`. The derived columns (``snapshot_end``,
    ``hours_since_first_seen``, ``monetary_percentile``) are always allowed. Raises
    :class:`SegmentConfigError` naming the file, the rule and the problem.
    """
    path = rules_file(path)
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

    con = rule_connection()
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
    functions = {str(name).lower() for name in tree_values(node, "function_name")}
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
    for names in tree_values(node, "column_names"):
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


def rule_inputs(rules: Sequence[SegmentRule]) -> set[str]:
    """The snapshot columns evaluating ``rules`` reads (their memberships and reasons): ``user_id``, the columns
    their expressions reference (``enter_columns``, ``stay_columns``) and the inputs of every derived and
    population column (any rule may read those), so a bucket's profiles can be read with these columns only."""
    found = {USER_ID}
    for rule in rules:
        found |= {*rule.enter_columns, *rule.stay_columns}
    for column in POPULATION_COLUMNS.values():
        found |= set(column.inputs)
    con = db.cursor()
    try:
        for _, sql in DERIVED_COLUMNS.values():
            tree = json.loads(con.execute("SELECT json_serialize_sql(?)", ["SELECT " + sql]).fetchall()[0][0])
            found |= {str(names[-1]) for names in tree_values(tree, "column_names") if names}
    finally:
        con.close()
    return found


def tree_values(node: Any, key: str) -> list[Any]:
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


def rule_connection() -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that cannot touch files, in UTC: rule expressions run here.

    A cursor on the process's database opened with ``enable_external_access = false`` (one
    for rules alone: DuckDB disables it for a whole database and never re-enables it); the
    time zone is a session setting, set on every cursor. Objects created on it must be
    ``TEMP`` (its own): a view of the database would be seen, and replaced, by every cursor.
    """
    con = db.cursor(enable_external_access=False)
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
        base = "SELECT " + ", ".join(f"NULL AS {quote_identifier(c)}" for c in names)
    types = {name: sql_type for name, (sql_type, _) in DERIVED_COLUMNS.items()}
    types |= {name: column.sql_type for name, column in POPULATION_COLUMNS.items()}
    derived = ", ".join(f"CAST(NULL AS {sql_type}) AS {name}" for name, sql_type in types.items())
    con.execute(f"CREATE OR REPLACE TEMP VIEW {RULE_VIEW} AS SELECT *, {derived} FROM ({base}) WHERE false")
    return {*names, *types}


def quote_identifier(identifier: str) -> str:
    """A DuckDB quoted identifier."""
    return '"' + identifier.replace('"', '""') + '"'


def sql_literal(text: str) -> str:
    """A DuckDB string literal."""
    return "'" + text.replace("'", "''") + "'"
