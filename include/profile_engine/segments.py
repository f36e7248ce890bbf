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
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import yaml

from profile_engine import features as ft
from profile_engine import lake as lk
from profile_engine.config import CONFIG_DIR, Settings
from profile_engine.hours import HOUR, floor_hour, format_hour
from profile_engine.model import PROPENSITY, SCORES_SCHEMA

if TYPE_CHECKING:
    import duckdb

DEFAULT_RULES_PATH = CONFIG_DIR / "segments.yaml"

USER_ID = ft.USER_ID
# Score columns (scores/ layer, written by the model stage) joined to the profile snapshot.
SCORE_SCHEMA = pa.schema([field for field in SCORES_SCHEMA if field.name != USER_ID])
SCORE_COLUMNS: tuple[str, ...] = tuple(SCORE_SCHEMA.names)

# Columns derived here from the snapshot so rules stay readable (name -> DuckDB type, SQL).
_SNAPSHOT_END_SQL = f"{ft.SNAPSHOT_HOUR} + INTERVAL 1 HOUR"
DERIVED_COLUMNS: dict[str, tuple[str, str]] = {
    "snapshot_end": ("TIMESTAMPTZ", _SNAPSHOT_END_SQL),
    "hours_since_first_seen": ("DOUBLE", f"(epoch({_SNAPSHOT_END_SQL}) - epoch({ft.FIRST_SEEN_AT})) / 3600.0"),
    # Share of buyers spending at most this user's amount (cume_dist among users with orders).
    "monetary_percentile": (
        "DOUBLE",
        f"CASE WHEN {ft.FREQUENCY_ORDERS} > 0 THEN cume_dist() OVER "
        f"(PARTITION BY {ft.FREQUENCY_ORDERS} > 0 ORDER BY {ft.MONETARY_TOTAL}) END",
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
MAX_CONTROL_SHARE = 0.5
# Control-group hash resolution: shares are applied in basis points.
CONTROL_BASIS = 10_000

# Output columns of the segments layer.
SEGMENTS_COL = "segments"
ACTION = "action"
OFFER = "offer"
CHANNEL = "channel"
RULE = "rule"
REASON = "reason"
CONTROL_FLAG = "control"
SEGMENT_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(SEGMENTS_COL, pa.list_(pa.string()), nullable=False),
        pa.field(ACTION, pa.string(), nullable=False),
        pa.field(OFFER, pa.string()),
        pa.field(CHANNEL, pa.string()),
        pa.field(RULE, pa.string()),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(CONTROL_FLAG, pa.bool_(), nullable=False),
    ]
)
EXPORT_COLUMNS: tuple[str, ...] = (USER_ID, OFFER, CHANNEL, REASON)

CONTACT_HOUR = "hour"
CONTACT_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(ACTION, pa.string(), nullable=False),
        pa.field(RULE, pa.string(), nullable=False),
        pa.field(CONTACT_HOUR, pa.timestamp("ms", tz="UTC"), nullable=False),
    ]
)

_RULE_KEYS = {"name", "description", "enter", "stay", "action", "priority", "cooldown_hours", "control_share"}
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
    return [*ft.PROFILE_COLUMNS, *SCORE_COLUMNS]


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
    import duckdb

    con = duckdb.connect(config={"enable_external_access": False})
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


def _reason_sql(label: str, columns: Sequence[str], types: Mapping[str, str]) -> str:
    """SQL for a compact reason text: ``label: col=value, col=value``."""
    parts = []
    for column in columns:
        value = f"round({_quote(column)}, 4)" if types[column].startswith(_FLOAT_TYPES) else _quote(column)
        parts.append(f"{_literal(column + '=')} || coalesce(CAST({value} AS VARCHAR), 'NULL')")
    if not parts:
        return _literal(label)
    return f"{_literal(label + ': ')} || concat_ws(', ', {', '.join(parts)})"


def assign_segments(
    evaluated: pa.Table,
    rules: Sequence[SegmentRule],
    previous: pa.Table | None = None,
    contacts: pa.Table | None = None,
) -> tuple[pa.Table, dict[str, int]]:
    """Evaluate ``rules`` on one hour's profiles + scores; return memberships and segment sizes.

    ``evaluated`` holds one row per user with the profile and score columns;
    ``previous`` the previous hour's segments (``user_id``, ``segments``) for hysteresis;
    ``contacts`` the recent contact history (``user_id``, ``action``, ``hours_ago``) for
    cooldowns. The result follows :data:`SEGMENT_SCHEMA`, one row per user in at least
    one segment, sorted by ``user_id``.
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
    con = _rule_connection()
    try:
        con.register("snapshot_input", evaluated)
        con.register("prev_input", prev.select([USER_ID, SEGMENTS_COL]))
        con.register("contacts_input", recent.select([USER_ID, ACTION, "hours_ago"]))
        con.register("rules_meta", _rules_table(rules))
        derived = ", ".join(f"{sql} AS {name}" for name, (_, sql) in DERIVED_COLUMNS.items())
        con.execute(f"CREATE VIEW {RULE_VIEW} AS SELECT *, {derived} FROM snapshot_input")
        types = {str(row[0]): str(row[1]) for row in con.execute(f"DESCRIBE {RULE_VIEW}").fetchall()}

        flags = []
        members = []
        for i, rule in enumerate(rules):
            stay = f"coalesce(({rule.stay}), false)" if rule.stay else "false"
            flags.append(f"coalesce(({rule.enter}), false) AS __enter_{i}, {stay} AS __stay_{i}")
            flags.append(f"coalesce(list_contains(prev.__prev_segments, {_literal(rule.name)}), false) AS __prev_{i}")
            enter_reason = _reason_sql(rule.name, rule.enter_columns, types)
            stay_reason = _reason_sql(f"{rule.name} (stay)", rule.stay_columns, types)
            members.append(
                f"SELECT {USER_ID}, {_literal(rule.name)} AS {RULE}, "
                f"CASE WHEN __enter_{i} THEN {enter_reason} ELSE {stay_reason} END AS {REASON} "
                f"FROM flagged WHERE __enter_{i} OR (__prev_{i} AND __stay_{i})"
            )
        # Rule expressions (window functions included) see the whole population of the hour.
        con.execute(
            f"CREATE TEMP TABLE flagged AS SELECT p.*, {', '.join(flags)} FROM {RULE_VIEW} p "
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
                SELECT m.{USER_ID}, list(m.{RULE} ORDER BY r.priority) AS {SEGMENTS_COL}
                FROM members m JOIN rules_meta r USING ({RULE})
                GROUP BY m.{USER_ID}
            ),
            cooled AS (
                SELECT b.{USER_ID}, string_agg(b.{RULE}, ', ' ORDER BY r.priority) AS rules
                FROM blocked b JOIN rules_meta r USING ({RULE})
                GROUP BY b.{USER_ID}
            ),
            decided AS (
                SELECT u.{USER_ID}, u.{SEGMENTS_COL}, c.{RULE}, c.{OFFER}, c.{CHANNEL}, c.{ACTION} AS rule_action,
                       c.{REASON} AS rule_reason, k.rules AS cooled_rules,
                       coalesce(NOT c.suppress
                                AND md5_number(u.{USER_ID} || '|' || c.{RULE}) % {CONTROL_BASIS} < c.control_bp,
                                false) AS held_out
                FROM memberships u
                LEFT JOIN chosen c USING ({USER_ID})
                LEFT JOIN cooled k USING ({USER_ID})
            )
            SELECT {USER_ID}, {SEGMENTS_COL},
                   CASE WHEN {RULE} IS NULL THEN '{NO_ACTION}' WHEN held_out THEN '{CONTROL}' ELSE rule_action END
                       AS {ACTION},
                   {OFFER}, {CHANNEL}, {RULE},
                   CASE WHEN {RULE} IS NULL THEN 'cooldown: ' || cooled_rules
                        ELSE rule_reason || coalesce(' | cooldown: ' || cooled_rules, '') END AS {REASON},
                   held_out AS {CONTROL_FLAG}
            FROM decided
            ORDER BY {USER_ID}
            """
        ).to_arrow_table()
        sizes = {
            str(name): int(n)
            for name, n in con.execute(f"SELECT {RULE}, count(*) FROM members GROUP BY ALL").fetchall()
        }
    finally:
        con.close()
    return result.cast(SEGMENT_SCHEMA), {rule.name: sizes.get(rule.name, 0) for rule in rules}


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
    """Committed scores of ``hour`` (score columns only), or None when none are committed."""
    try:
        return lake.read(lk.SCORES, hour, columns=[USER_ID, *SCORE_COLUMNS])
    except FileNotFoundError:
        return None


def _join_scores(profiles: pa.Table, scores: pa.Table | None) -> pa.Table:
    """Profiles with the score columns (NULL where a user has no score)."""
    base = profiles.drop_columns([c for c in SCORE_COLUMNS if c in profiles.column_names])
    if scores is None:
        for field in SCORE_SCHEMA:
            base = base.append_column(field, pa.nulls(base.num_rows, field.type))
        return base
    import duckdb

    con = duckdb.connect()
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
    import duckdb

    con = duckdb.connect()
    try:
        con.register("assigned_input", assigned)
        table = con.sql(
            f"SELECT {USER_ID}, {ACTION}, {RULE} FROM assigned_input "
            f"WHERE {ACTION} NOT IN ('{NO_ACTION}', '{SUPPRESS}') ORDER BY {USER_ID}"
        ).to_arrow_table()
    finally:
        con.close()
    hours = pa.array([floor_hour(hour)] * table.num_rows, pa.timestamp("ms", tz="UTC"))
    return table.append_column(CONTACT_HOUR, hours).cast(CONTACT_SCHEMA)


def _export_files(assigned: pa.Table, actions: Sequence[str]) -> list[tuple[str, bytes, int]]:
    """One CSV per exported action (header only when empty): ``(name, bytes, rows)``."""
    import duckdb

    files = []
    con = duckdb.connect()
    try:
        con.register("assigned_input", assigned)
        for action in actions:
            table = con.sql(
                f"SELECT {', '.join(EXPORT_COLUMNS)} FROM assigned_input WHERE {ACTION} = {_literal(action)} "
                f"ORDER BY {USER_ID}"
            ).to_arrow_table()
            buffer = io.BytesIO()
            pacsv.write_csv(table, buffer)
            files.append((f"{action}.csv", buffer.getvalue(), table.num_rows))
    finally:
        con.close()
    return files


def publish_segments(
    settings: Settings,
    hour: datetime,
    *,
    run_id: str = "manual",
    rules_path: Path | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Assign segments and actions for ``hour``, write the segments partition and the exports.

    Reads the committed profile snapshot of the hour and its scores (NULL propensity,
    said in the summary, when none are committed), validates the rules against those
    columns before writing anything, then writes ``segments/`` (one row per member),
    the hour's contact history (rewritten whole, so reruns do not double count) and
    ``exports/`` (one CSV per action plus a manifest with row counts and checksums).
    ``dry_run`` computes and returns the summary but writes nothing. Returns a small
    JSON-able summary: sizes per segment and action and the change against the previous hour.
    """
    hour = floor_hour(hour)
    lake = lk.Lake(settings.lake)
    profiles = _read_snapshot(lake, hour)
    scores = _read_scores(lake, hour)
    evaluated = _join_scores(profiles, scores)
    path = DEFAULT_RULES_PATH if rules_path is None else rules_path
    rules = load_rules(path, columns=evaluated.schema)

    previous_hour = hour - HOUR
    previous = lake.read(lk.SEGMENTS, previous_hour) if lake.committed(lk.SEGMENTS, previous_hour) else None
    contacts = _read_recent_contacts(lake, hour, max(r.cooldown_hours for r in rules))
    assigned, sizes = assign_segments(evaluated, rules, previous, contacts)

    action_counts: dict[str, int] = {}
    for action in assigned.column(ACTION).to_pylist():
        action_counts[action] = action_counts.get(action, 0) + 1
    previous_sizes: dict[str, int] = {}
    if previous is not None:
        for names in previous.column(SEGMENTS_COL).to_pylist():
            for name in names:
                previous_sizes[name] = previous_sizes.get(name, 0) + 1
    changes = {
        name: (size - previous_sizes.get(name, 0) if previous is not None else None) for name, size in sizes.items()
    }

    notes = []
    scored = 0 if scores is None else evaluated.num_rows - evaluated.column(PROPENSITY).null_count
    if scores is None:
        notes.append(f"no scores committed for {format_hour(hour)}: {PROPENSITY} is NULL, rules on it do not fire")
    elif scored < evaluated.num_rows:
        notes.append(f"{evaluated.num_rows - scored} of {evaluated.num_rows} profiles have no score")
    if previous is None:
        notes.append(f"no segments committed for {format_hour(previous_hour)}: no hysteresis, no size change")

    exported_actions = sorted({r.action for r in rules})
    files = _export_files(assigned, exported_actions)
    contact_rows = _contacts_of(assigned, hour)
    rules_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
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
        "previous_hour_committed": previous is not None,
        "segments": sizes,
        "segment_change": changes,
        "actions": dict(sorted(action_counts.items())),
        "exports": {name.removesuffix(".csv"): rows for name, _, rows in files},
        "contacts": contact_rows.num_rows,
        "notes": notes,
        "segments_path": None,
        "exports_path": None,
    }
    if dry_run:
        return summary

    extra = {"rules_sha256": rules_sha256, "scores_available": scores is not None}
    lake.write_partition(lk.SEGMENTS, hour, assigned, run_id=run_id, extra=extra)
    lake.write_partition(lk.CONTACTS, hour, contact_rows, run_id=run_id)
    exports_dir = lake.partition(lk.EXPORTS, hour)
    lake.write_dir(
        exports_dir,
        [(name, payload) for name, payload, _ in files],
        {
            "layer": lk.EXPORTS,
            "data_hour": format_hour(hour),
            "run_id": run_id,
            "rules_sha256": rules_sha256,
            "columns": list(EXPORT_COLUMNS),
            "rows": {name.removesuffix(".csv"): rows for name, _, rows in files},
        },
    )
    summary["segments_path"] = str(lake.partition(lk.SEGMENTS, hour))
    summary["exports_path"] = str(exports_dir)
    return summary
