"""Declared traits: window aggregates over a user's events read from YAML (the package's defaults plus a user's
file), checked at load, with their snapshot columns and docs table. docs/features.md ("Declared traits").
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from profile_engine.contracts.events import EVENT_TYPES

DEFAULT_TRAITS_PATH = Path(__file__).resolve().parents[2] / "config" / "traits.yaml"  # include/config/
TRAIT_PREFIX = "trait_"

COUNT, SUM, DISTINCT_COUNT, LAST, DECAYED_COUNT = "count", "sum", "distinct_count", "last", "decayed_count"
AGGREGATIONS: tuple[str, ...] = (COUNT, SUM, DISTINCT_COUNT, LAST, DECAYED_COUNT)
# What each aggregation may be "of" (None: nothing), with the Arrow type of its value.
# Sums of money are in cents per event (rounded to the cent), so they are exact in any order.
VALUE, PRICE, QUANTITY = "value", "price", "quantity"  # value = price x quantity (negative for a refund)
SUM_OF: dict[str, pa.DataType] = {VALUE: pa.float64(), PRICE: pa.float64(), QUANTITY: pa.int64()}
DISTINCT_OF: tuple[str, ...] = ("item_id", "category_id", "order_id", "session_id")
LAST_OF: dict[str, pa.DataType] = {
    "item_id": pa.string(),
    "category_id": pa.string(),
    "event_type": pa.string(),
    "order_id": pa.string(),
    "session_id": pa.string(),
    PRICE: pa.float64(),
    QUANTITY: pa.int64(),
}
GROUP_BY: tuple[str, ...] = ("category_id", "item_id", "event_type")
MAX_WINDOW_HOURS = 90 * 24  # tiles are kept for the longest window: a bound on the state's size
TRAIT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_DURATION = re.compile(r"^([1-9][0-9]*)([hd])$")
_KEYS = {"name", "description", "events", "aggregation", "of", "half_life", "windows", "group_by"}
_REQUIRED = ("name", "events", "aggregation", "windows")


class TraitConfigError(ValueError):
    """A trait file that cannot be used: names the file, the trait and the reason."""


@dataclass(frozen=True)
class Trait:
    """One declared window aggregate of a user's events (docs/features.md, "Declared traits")."""

    name: str
    events: tuple[str, ...]  # event types counted
    aggregation: str  # one of AGGREGATIONS
    windows: tuple[tuple[str, int], ...]  # (suffix as written, hours), each ending at the snapshot end
    of: str | None = None  # sum: SUM_OF, distinct_count: DISTINCT_OF, last: LAST_OF
    half_life_hours: int | None = None  # decayed_count only
    group_by: str | None = None  # the top group of the window and its value
    description: str = ""

    @property
    def key(self) -> str:
        """The name plus a digest of what the tiles hold: a changed definition starts new tiles, never mixes."""
        spec = [sorted(self.events), self.aggregation, self.of, self.half_life_hours, self.group_by]
        return f"{self.name}:{hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:12]}"

    @property
    def value_type(self) -> pa.DataType:
        """Arrow type of the aggregate."""
        if self.aggregation == SUM:
            return SUM_OF[str(self.of)]
        if self.aggregation == LAST:
            return LAST_OF[str(self.of)]
        return pa.float64() if self.aggregation == DECAYED_COUNT else pa.int64()

    def column(self, window: str) -> str:
        """The snapshot column of a window: ``trait_<name>_<window>`` (the top group when grouped)."""
        return f"{TRAIT_PREFIX}{self.name}_{window}"

    def value_column(self, window: str) -> str:
        """The value of the top group of a grouped trait's window: ``trait_<name>_<window>_value``."""
        return f"{self.column(window)}_value"

    def columns(self) -> list[tuple[str, pa.DataType]]:
        """Every snapshot column of the trait with its Arrow type, window by window."""
        out: list[tuple[str, pa.DataType]] = []
        for window, _ in self.windows:
            if self.group_by is None:
                out.append((self.column(window), self.value_type))
            else:
                out += [(self.column(window), pa.string()), (self.value_column(window), self.value_type)]
        return out


def traits_digest(traits: tuple[Trait, ...]) -> str:
    """A fingerprint of the declared traits: a snapshot taken with other traits has other trait values."""
    return hashlib.sha256(repr(traits).encode()).hexdigest()[:16]


def trait_fields(traits: tuple[Trait, ...]) -> list[tuple[str, pa.DataType]]:
    """Every snapshot column of ``traits``, in declaration order."""
    return [field for trait in traits for field in trait.columns()]


def non_negative_columns(traits: tuple[Trait, ...]) -> list[str]:
    """Trait columns that can never be negative (counts, distinct and decayed counts): the quality suite's ranges."""
    columns = []
    for trait in traits:
        if trait.aggregation in (COUNT, DISTINCT_COUNT, DECAYED_COUNT):
            value = trait.column if trait.group_by is None else trait.value_column
            columns += [value(window) for window, _ in trait.windows]
    return columns


def longest_window_hours(traits: tuple[Trait, ...]) -> int:
    """How long tiles are kept: the longest window of any trait (0 without traits)."""
    return max((hours for trait in traits for _, hours in trait.windows), default=0)


def _hours(text: Any, what: str) -> int:
    match = _DURATION.match(str(text).strip()) if isinstance(text, str | int) else None
    if match is None:
        raise ValueError(f"{what} {text!r} is not a duration such as 24h or 7d")
    return int(match.group(1)) * (24 if match.group(2) == "d" else 1)


def parse_trait(raw: Any) -> Trait:
    """One trait from its YAML mapping, or ``ValueError`` with the reason."""
    if not isinstance(raw, dict):
        raise ValueError(f"a trait must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    missing = [k for k in _REQUIRED if raw.get(k) in (None, "", [])]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    name = raw["name"]
    if not isinstance(name, str) or not TRAIT_NAME.match(name):
        raise ValueError(f"name {name!r} must be lower_snake_case, starting with a letter, at most 40 characters")
    events = raw["events"] if isinstance(raw["events"], list) else [raw["events"]]
    bad = [e for e in events if e not in EVENT_TYPES]
    if bad or len(set(events)) != len(events):
        raise ValueError(f"events {events} must be distinct event types of {list(EVENT_TYPES)}")
    aggregation = raw["aggregation"]
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r} is not one of {list(AGGREGATIONS)}")
    allowed: dict[str, tuple[str, ...]] = {
        SUM: tuple(SUM_OF),
        DISTINCT_COUNT: DISTINCT_OF,
        LAST: tuple(LAST_OF),
    }
    of = raw.get("of")
    if aggregation in allowed and of not in allowed[aggregation]:
        raise ValueError(f"{aggregation} needs 'of', one of {list(allowed[aggregation])}; got {of!r}")
    if aggregation not in allowed and of is not None:
        raise ValueError(f"{aggregation} takes no 'of' (got {of!r})")
    half_life = raw.get("half_life")
    if aggregation == DECAYED_COUNT:
        if half_life is None:
            raise ValueError("decayed_count needs 'half_life', e.g. 6h or 7d")
        half_life_hours: int | None = _hours(half_life, "half_life")
    elif half_life is not None:
        raise ValueError(f"half_life is for decayed_count only, not {aggregation}")
    else:
        half_life_hours = None
    windows_raw = raw["windows"] if isinstance(raw["windows"], list) else [raw["windows"]]
    windows = tuple((str(w).strip(), _hours(w, "window")) for w in windows_raw)
    lengths = [h for _, h in windows]
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"windows {[w for w, _ in windows]} repeat a length")
    if max(lengths) > MAX_WINDOW_HOURS:
        raise ValueError(f"window longer than the limit of {MAX_WINDOW_HOURS // 24}d: {[w for w, _ in windows]}")
    group_by = raw.get("group_by")
    if group_by is not None and group_by not in GROUP_BY:
        raise ValueError(f"group_by {group_by!r} is not one of {list(GROUP_BY)}")
    if group_by is not None and aggregation == LAST:
        raise ValueError("last has no top group: drop group_by")
    description = raw.get("description") or ""
    if not isinstance(description, str):
        raise ValueError("description must be text")
    return Trait(
        name=name,
        events=tuple(events),
        aggregation=aggregation,
        windows=windows,
        of=of,
        half_life_hours=half_life_hours,
        group_by=group_by,
        description=" ".join(description.split()),
    )


def _read(path: Path) -> tuple[list[Trait], list[str]]:
    """The traits of one file and the default traits it disables, or ``TraitConfigError`` naming the file."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise TraitConfigError(f"{path}: cannot read traits: {exc}") from exc
    if not isinstance(document, dict) or document.get("version") != 1:
        raise TraitConfigError(f"{path}: a traits file is a mapping with 'version: 1' and a list 'traits'")
    extra = sorted(set(document) - {"version", "traits", "disable"})
    if extra:
        raise TraitConfigError(f"{path}: unknown top-level key(s) {extra}")
    entries = document.get("traits") or []
    disable = document.get("disable") or []
    if not isinstance(entries, list) or not isinstance(disable, list):
        raise TraitConfigError(f"{path}: 'traits' and 'disable' must be lists")
    traits: list[Trait] = []
    for i, raw in enumerate(entries):
        label = raw.get("name") if isinstance(raw, dict) and raw.get("name") else f"#{i + 1}"
        try:
            trait = parse_trait(raw)
        except ValueError as exc:
            raise TraitConfigError(f"{path}: trait {label!r}: {exc}") from None
        if any(t.name == trait.name for t in traits):
            raise TraitConfigError(f"{path}: trait {trait.name!r}: declared twice")
        traits.append(trait)
    return traits, [str(d) for d in disable]


@lru_cache(maxsize=16)
def _load(default: Path, user: Path | None, _stamp: tuple[str, str]) -> tuple[Trait, ...]:
    traits, _ = _read(default)
    if user is not None:
        added, disable = _read(user)
        names = {t.name for t in traits}
        unknown = [d for d in disable if d not in names]
        if unknown:
            raise TraitConfigError(f"{user}: disable names no default trait: {unknown}")
        # a user trait named like a default replaces it
        replaced = {t.name for t in added} | set(disable)
        traits = [t for t in traits if t.name not in replaced] + added
    seen: dict[str, str] = {}
    for trait in traits:
        for column, _ in trait.columns():
            if column in seen:
                where = user if user is not None else default
                raise TraitConfigError(
                    f"{where}: trait {trait.name!r}: column {column} is also a column of {seen[column]!r}"
                )
            seen[column] = trait.name
    return tuple(traits)


def _stamp(path: Path | None) -> str:
    """What the cache of ``load_traits`` is keyed by: the file's content (a small file; mtimes can tie)."""
    if path is None or not path.is_file():
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_traits(user_path: Path | None = None, default_path: Path | None = None) -> tuple[Trait, ...]:
    """The package's default traits plus (replacing or disabling defaults) those of ``user_path``.

    ``user_path`` is ``Settings.traits`` (``PROFILE_ENGINE_TRAITS``). Cached per file
    content, since every hour of every bucket reads it. Raises ``TraitConfigError``.
    """
    default = DEFAULT_TRAITS_PATH if default_path is None else default_path
    return _load(default, user_path, (_stamp(default), _stamp(user_path)))


def traits_markdown(traits: tuple[Trait, ...]) -> str:
    """The traits as a markdown table (``python -m profile_engine traits``, docs/features.md)."""
    lines = [
        "| trait | events | aggregation | windows | group by | columns | description |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in traits:
        aggregation = t.aggregation + (f" of {t.of}" if t.of else "")
        if t.half_life_hours is not None:
            aggregation += f" (half-life {t.half_life_hours}h)"
        columns = ", ".join(f"`{c}`" for c, _ in t.columns())
        windows = ", ".join(w for w, _ in t.windows)
        lines.append(
            f"| {t.name} | {', '.join(t.events)} | {aggregation} | {windows} | {t.group_by or ''} | {columns} "
            f"| {t.description} |"
        )
    return "\n".join(lines) + "\n"
