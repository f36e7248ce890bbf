"""Event simulator: the demo's and the tests' shop, pure per (seed, settings, hour), with a ground truth.

docs/sources.md, "The simulator".
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from profile_engine.contracts.events import CART, EVENT_SCHEMA, FAV, PURCHASE, REFUND, REMOVE_CART, VIEW
from profile_engine.hours import floor_hour, hour_range
from profile_engine.lake.storage import LANDING, TRUTH, Lake

# ---- names (imported by tests and by whoever reads the truth) ----------------
CATEGORIES: tuple[str, ...] = tuple(f"c{i:02d}" for i in range(1, 21))
ITEMS_PER_CATEGORY = 400
UNKNOWN_EVENT_TYPE = "click"
DEFAULT_ORIGIN = datetime(2026, 10, 1, tzinfo=UTC)
DEFAULT_TZ = "Europe/Berlin"
RUN_ID = "simulator"

# Truth tables of a ``simulator/truth`` partition (read with ``Lake.read_named``).
TRUTH_PROPENSITY = "propensity"
TRUTH_DEFECTS = "defects"
TRUTH_FILES = "files"

# Malformed-row kinds, in the order of their codes.
EMPTY_USER_ID = "empty_user_id"
EMPTY_ITEM_ID = "empty_item_id"
UNKNOWN_TYPE = "unknown_event_type"
NEGATIVE_PRICE = "negative_price"
ZERO_QUANTITY = "zero_quantity"
FUTURE_TS = "future_ts"
MALFORMED_KINDS: tuple[str, ...] = (
    EMPTY_USER_ID,
    EMPTY_ITEM_ID,
    UNKNOWN_TYPE,
    NEGATIVE_PRICE,
    ZERO_QUANTITY,
    FUTURE_TS,
)

# File kinds: every landing file has one; all but ON_TIME are defects.
ON_TIME = "on_time"
LATE_FILE = "late_file"
TOO_LATE_FILE = "too_late_file"
RESENT_FILE = "resent_file"
FILE_DEFECT_KINDS: tuple[str, ...] = (LATE_FILE, TOO_LATE_FILE, RESENT_FILE)
DEFECT_KINDS: tuple[str, ...] = MALFORMED_KINDS + FILE_DEFECT_KINDS

TRUTH_PROPENSITY_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("hour", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("propensity", pa.float64(), nullable=False),
        pa.field("dormant", pa.bool_(), nullable=False),
        pa.field("sessions", pa.int32(), nullable=False),
    ]
)
TRUTH_DEFECTS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("file", pa.string(), nullable=False),
    ]
)
TRUTH_FILES_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("part", pa.int32(), nullable=False),
        pa.field("parts", pa.int32(), nullable=False),
        pa.field("arrival_hour", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("arrival", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("original", pa.string()),
    ]
)

# Event type codes of the generator; the last one only appears as a malformed row.
_TYPE_NAMES: tuple[str, ...] = (VIEW, CART, REMOVE_CART, FAV, PURCHASE, UNKNOWN_EVENT_TYPE, REFUND)
_VIEW, _CART, _REMOVE, _FAV, _PURCHASE, _CLICK, _REFUND = range(7)

# ---- behaviour parameters ------------------------------------------------------
_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS
_FAVOURITES = 3  # favourite categories per user
_EXPLORE = 0.12  # share of views outside the favourites
_CATEGORY_SWITCH = 0.25  # share of views leaving the session's main category
_ZIPF_EXPONENT = 1.1
_MEAN_VIEWS = 5.0
_MAX_VIEWS = 60
_VIEW_GAP_MS = 50_000.0
_SESSION_CAP_MS = 2 * _HOUR_MS - 1  # sessions end within 2 h of their start: see _events_of_hour
_FAV_RATE = 0.035
_CART_BASE = 0.03
_CART_SLOPE = 0.12
_REMOVE_RATE = 0.3
_CANCEL_RATE = 0.04  # share of bought lines cancelled (refunded) 5-60 minutes later
_REMOVE_GAP_MS = 240_000.0
_CONVERSION_SCALE = 0.75
_PROPENSITY_DAYS = 12  # daily shocks in the propensity walk
_PROPENSITY_PHI = 0.75
_PROPENSITY_DRIFT = 0.7
_ENGAGEMENT_WEEKS = 5  # weekly shocks in the engagement walk
_ENGAGEMENT_PHI = 0.5
_DORMANT_BELOW = -1.4
# Sessions per local hour of day, relative (night trough, evening peak); normalised below.
_DIURNAL = np.array(
    [0.35, 0.2, 0.12, 0.08, 0.08, 0.12, 0.25, 0.45, 0.65, 0.8, 0.9, 1.0]
    + [1.1, 1.05, 1.0, 1.0, 1.05, 1.15, 1.3, 1.5, 1.6, 1.5, 1.1, 0.7]
)
_DIURNAL = _DIURNAL / _DIURNAL.mean()

# Defect rates (per file, per hour).
_FILES_PER_HOUR = (1, 2, 3)
_FILES_PER_HOUR_P = (0.5, 0.3, 0.2)
_LATE_RATE = 0.03
_TOO_LATE_RATE = 0.004
_RESEND_RATE = 0.02
_MALFORMED_RATE = (0.001, 0.005)
_LATE_HOURS = (1, 3)
_TOO_LATE_HOURS = (30, 40)  # beyond the default 24 h lateness window
_RESEND_HOURS = (0, 2)
_MAX_ARRIVAL_LAG = _TOO_LATE_HOURS[1] + _RESEND_HOURS[1]

# Random streams: the second integer of every SeedSequence.
_S_CATALOG, _S_USERS, _S_PROPENSITY, _S_ENGAGEMENT, _S_SESSIONS, _S_PLAN, _S_MALFORMED = range(1, 8)
_S_EVENT_ID_A, _S_EVENT_ID_B, _S_SESSION_ID, _S_ORDER_ID = range(11, 15)

_MASK64 = (1 << 64) - 1
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]
I8 = npt.NDArray[np.int8]
U8 = npt.NDArray[np.uint8]
U64 = npt.NDArray[np.uint64]
B = npt.NDArray[np.bool_]
K = TypeVar("K")
V = TypeVar("V")


# ---- public API -----------------------------------------------------------------
@dataclass(frozen=True)
class SimulationSummary:
    """What one ``simulate`` call wrote: arrival hours, files, event rows and defects by kind.

    ``events`` counts rows written, re-sent copies included; ``defects`` counts defective
    files (``late_file``, ``too_late_file``, ``resent_file``) and malformed rows in the
    written files (re-sent copies included), every kind of ``DEFECT_KINDS`` present.
    Summaries of adjacent ranges add up to the summary of their union.
    """

    hours: int
    files: int
    events: int
    defects: dict[str, int]
    first_hour: datetime
    last_hour: datetime


@dataclass(frozen=True)
class LandingFile:
    """One planned landing file: a time slice of an event hour and when it arrives."""

    name: str
    event_hour: datetime
    part: int
    parts: int
    kind: str
    arrival: datetime
    original: str | None = None

    @property
    def arrival_hour(self) -> datetime:
        """The hour whose landing partition receives the file."""
        return floor_hour(self.arrival)


def simulate(
    lake: Lake,
    first_hour: datetime,
    last_hour: datetime,
    *,
    users: int,
    seed: int,
    business_tz: str = DEFAULT_TZ,
    defects: bool = True,
    origin: datetime | None = None,
    intensity: float = 1.0,
) -> SimulationSummary:
    """Write the landing files of arrival hours ``first_hour..last_hour`` and their truth.

    Each arrival hour receives the files of its own events (one to three micro-batches)
    plus late and re-sent files of earlier event hours; the truth partition of each hour
    holds the users' latent propensities, the malformed rows injected into that hour's
    events and the plan of its files (``TRUTH_*`` tables). Re-running a range rewrites the
    same files. ``origin`` anchors the users' signup times (default ``DEFAULT_ORIGIN``;
    pass the demo's start so new users arrive during it); ``intensity`` multiplies every
    user's session rate (about 8 gives one event per user and hour).
    """
    world = _World.create(users, seed, business_tz, defects, origin, intensity)
    first, last = floor_hour(first_hour), floor_hour(last_hour)
    if last < first:
        raise ValueError(f"last_hour {last} is before first_hour {first}")
    counts = dict.fromkeys(DEFECT_KINDS, 0)
    hours = files = events = 0
    for hour in hour_range(first, last):
        hours += 1
        own = world.events(hour)
        for planned in _arrivals(world, hour):
            batch = world.events(planned.event_hour)
            rows = batch.slice_of(planned)
            if rows.num_rows == 0:
                continue
            _write_landing(lake, planned, rows)
            files += 1
            events += rows.num_rows
            if planned.kind != ON_TIME:
                counts[planned.kind] += 1
            for kind, n in zip(MALFORMED_KINDS, batch.malformed_counts(planned), strict=True):
                counts[kind] += n
        lake.write_partition(TRUTH, hour, _truth_tables(world, hour, own), run_id=RUN_ID)
    return SimulationSummary(hours=hours, files=files, events=events, defects=counts, first_hour=first, last_hour=last)


def simulate_hour(
    hour: datetime,
    *,
    users: int,
    seed: int,
    business_tz: str = DEFAULT_TZ,
    defects: bool = True,
    origin: datetime | None = None,
    intensity: float = 1.0,
) -> pa.Table:
    """The canonical events of event hour ``hour`` (ts inside it), malformed rows included.

    Sorted by ts then generation order, typed as ``EVENT_SCHEMA``; the rows that the
    landing files of this hour carry, before re-sends. For benchmarks and tests that need
    events without a lake.
    """
    world = _World.create(users, seed, business_tz, defects, origin, intensity)
    return world.events(floor_hour(hour)).table


def landing_plan(hour: datetime, *, seed: int, defects: bool = True) -> tuple[LandingFile, ...]:
    """The landing files of event hour ``hour``: time slices, their arrival and re-sends.

    A function of (seed, hour, defects) only, cheap, so an arrival hour can look back at
    the plans of earlier event hours to find their late files.
    """
    h = floor_hour(hour)
    return _plan(seed, _hour_index(h), defects)


# ---- the world of one call ----------------------------------------------------------
@dataclass(frozen=True)
class _Catalog:
    item_ids: pa.Array  # string, index = category * ITEMS_PER_CATEGORY + rank
    prices: F64
    zipf_cdf: F64
    category_cdf: F64


@dataclass(frozen=True)
class _Population:
    signup_ms: I64
    activity: F64
    base_logit: F64
    loyalty: F64
    favourites: I8  # (users, _FAVOURITES) category codes
    favourite_cdf: F32  # (users, _FAVOURITES) cumulative weights
    user_ids: pa.Array


@dataclass(frozen=True)
class _Day:
    propensity: F64
    engagement: F64
    dormant: B


@dataclass(frozen=True)
class _Block:
    """Events of the sessions that started in one hour, in generation order."""

    start: int  # hour index
    ts: I64
    etype: I8
    item: I32
    user: I64
    session: I64
    quantity: I32
    sessions_per_user: I32


@dataclass(frozen=True)
class _HourEvents:
    """The events of one event hour, sorted by their true ts, with the malformed rows marked."""

    hour: datetime
    table: pa.Table
    true_ts: I64
    malformed: I8  # per row: index into MALFORMED_KINDS, -1 when clean
    files: tuple[LandingFile, ...]

    def bounds(self, planned: LandingFile) -> tuple[int, int]:
        """Row range of a file's time slice."""
        lo = _hour_index(self.hour) * _HOUR_MS
        edges = [lo + (planned.part + k) * _HOUR_MS // planned.parts for k in (0, 1)]
        start, stop = np.searchsorted(self.true_ts, edges, side="left")
        return int(start), int(stop)

    def slice_of(self, planned: LandingFile) -> pa.Table:
        """The rows of a planned file."""
        start, stop = self.bounds(planned)
        return self.table.slice(start, stop - start)

    def malformed_counts(self, planned: LandingFile) -> list[int]:
        """Malformed rows per kind in a planned file."""
        start, stop = self.bounds(planned)
        codes = self.malformed[start:stop]
        return [int(n) for n in np.bincount(codes[codes >= 0], minlength=len(MALFORMED_KINDS))]


def _lru(cache: OrderedDict[K, V], key: K, size: int, make: Callable[[], V]) -> V:
    """Memoise ``make()`` under ``key`` keeping the ``size`` most recent entries."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = make()
    cache[key] = value
    while len(cache) > size:
        cache.popitem(last=False)
    return value


@dataclass
class _World:
    seed: int
    users: int
    tz: ZoneInfo
    defects: bool
    origin_ms: int
    intensity: float
    _population: _Population | None = None
    _shocks: OrderedDict[tuple[int, int], F64] = field(default_factory=OrderedDict)
    _days: OrderedDict[int, _Day] = field(default_factory=OrderedDict)
    _blocks: OrderedDict[int, _Block] = field(default_factory=OrderedDict)
    _hours: OrderedDict[int, _HourEvents] = field(default_factory=OrderedDict)

    @classmethod
    def create(
        cls, users: int, seed: int, business_tz: str, defects: bool, origin: datetime | None, intensity: float
    ) -> _World:
        """Validate the arguments of a public call."""
        if users < 1:
            raise ValueError(f"users must be >= 1, got {users}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if intensity < 0:
            raise ValueError(f"intensity must be >= 0, got {intensity}")
        anchor = floor_hour(origin) if origin is not None else DEFAULT_ORIGIN
        return cls(seed, users, ZoneInfo(business_tz), defects, _hour_index(anchor) * _HOUR_MS, intensity)

    def population(self) -> _Population:
        """The users' static traits."""
        if self._population is None:
            self._population = _make_population(self.seed, self.users, self.origin_ms)
        return self._population

    def shocks(self, stream: int, index: int) -> F64:
        """Standard-normal shocks of all users for one day or week of a walk."""
        size = _PROPENSITY_DAYS + _ENGAGEMENT_WEEKS + 4
        return _lru(self._shocks, (stream, index), size, lambda: _normals(self.seed, stream, index, self.users))

    def day(self, day: int) -> _Day:
        """Propensity, engagement and dormancy of every user on a UTC day."""
        return _lru(self._days, day, 2, lambda: _make_day(self, day))

    def block(self, start: int) -> _Block:
        """Sessions started in hour index ``start``."""
        return _lru(self._blocks, start, 3, lambda: _make_block(self, start))

    def events(self, hour: datetime) -> _HourEvents:
        """Events of an event hour (cached: late files come back to recent hours)."""
        index = _hour_index(hour)
        return _lru(self._hours, index, 4, lambda: _events_of_hour(self, index))

    def diurnal(self, index: int) -> float:
        """Relative session rate of a UTC hour, by its local hour in the business time zone."""
        local = datetime.fromtimestamp(index * 3600, UTC).astimezone(self.tz)
        return float(_DIURNAL[local.hour])


def _hour_index(hour: datetime) -> int:
    """Hours since the Unix epoch of a UTC hour start."""
    return int(floor_hour(hour).timestamp()) // 3600


def _hour_of(index: int) -> datetime:
    """The UTC hour start of an hour index."""
    return datetime.fromtimestamp(index * 3600, UTC)


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of one (seed, stream, hour/day/week); negative indices are folded."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index & _MASK64]))


def _normals(seed: int, stream: int, index: int, n: int) -> F64:
    """``n`` standard-normal draws of one (seed, stream, index)."""
    return _rng(seed, stream, index).standard_normal(n)


@lru_cache(maxsize=4)
def _catalog(seed: int) -> _Catalog:
    """Items of every category: Zipf popularity by rank, lognormal prices by category."""
    rng = _rng(seed, _S_CATALOG, 0)
    n = len(CATEGORIES)
    category_weight = rng.dirichlet(np.full(n, 2.0))
    median = np.exp(rng.normal(np.log(25.0), 0.8, n))
    spread = rng.uniform(0.3, 0.6, n)
    prices = np.exp(rng.normal(np.log(np.repeat(median, ITEMS_PER_CATEGORY)), np.repeat(spread, ITEMS_PER_CATEGORY)))
    prices = np.maximum(np.round(prices, 2), 0.5)
    ranks = np.arange(1, ITEMS_PER_CATEGORY + 1, dtype=np.float64)
    zipf = ranks**-_ZIPF_EXPONENT
    codes = np.repeat(np.arange(1, n + 1), ITEMS_PER_CATEGORY)
    numbers = np.tile(np.arange(1, ITEMS_PER_CATEGORY + 1), n)
    item_ids = _strings(b"ic", _digits(codes, 2), np.full((codes.size, 1), ord("-"), np.uint8), _digits(numbers, 4))
    return _Catalog(item_ids, prices, np.cumsum(zipf) / zipf.sum(), np.cumsum(category_weight))


def _make_population(seed: int, users: int, origin_ms: int) -> _Population:
    """Static user traits drawn once per (seed, users)."""
    rng = _rng(seed, _S_USERS, 0)
    catalog = _catalog(seed)
    cohort = rng.random(users)
    position = rng.random(users)
    tail = rng.exponential(60 * _DAY_MS, users)
    signup = np.where(
        cohort < 0.3,
        origin_ms - position * 60 * _DAY_MS,
        np.where(cohort < 0.8, origin_ms + position * 30 * _DAY_MS, origin_ms + 30 * _DAY_MS + tail),
    ).astype(np.int64)
    activity = np.exp(rng.normal(np.log(0.35), 1.0, users))
    base_logit = rng.normal(-1.1, 0.9, users)
    loyalty = rng.normal(0.0, 0.6, users)
    favourites = _pick(catalog.category_cdf, rng.random((users, _FAVOURITES))).astype(np.int8)
    weights = rng.standard_exponential((users, _FAVOURITES))  # Dirichlet(1, 1, 1) after normalising
    cdf = np.cumsum(weights, axis=1)
    favourite_cdf = (cdf / cdf[:, -1:]).astype(np.float32)
    width = max(7, len(str(users - 1)))
    user_ids = _strings(b"u", _digits(np.arange(users, dtype=np.int64), width))
    return _Population(signup, activity, base_logit, loyalty, favourites, favourite_cdf, user_ids)


def _walk(world: _World, stream: int, index: int, terms: int, phi: float) -> F64:
    """A stationary AR(1) value with unit variance, truncated to ``terms`` shocks."""
    weights = phi ** np.arange(terms)
    total = np.zeros(world.users)
    for k in range(terms):
        total += weights[k] * world.shocks(stream, index - k)
    return total / float(np.sqrt(np.sum(weights**2)))


def _make_day(world: _World, day: int) -> _Day:
    """Daily propensity (logit walk over days) and engagement (walk over weeks, interpolated)."""
    pop = world.population()
    drift = _walk(world, _S_PROPENSITY, day, _PROPENSITY_DAYS, _PROPENSITY_PHI)
    propensity = 1.0 / (1.0 + np.exp(-(pop.base_logit + _PROPENSITY_DRIFT * drift)))
    week, into = divmod(day, 7)
    this = _walk(world, _S_ENGAGEMENT, week, _ENGAGEMENT_WEEKS, _ENGAGEMENT_PHI)
    after = _walk(world, _S_ENGAGEMENT, week + 1, _ENGAGEMENT_WEEKS, _ENGAGEMENT_PHI)
    engagement = pop.loyalty + this + (after - this) * (into / 7.0)
    return _Day(propensity, engagement, engagement < _DORMANT_BELOW)


def _pick(cdf: F64, u: F64) -> I64:
    """Index drawn from a cumulative distribution for each uniform in ``u``."""
    return np.minimum(np.searchsorted(cdf, u, side="right"), cdf.size - 1).astype(np.int64)


def _categories(pop: _Population, users: I64, u_slot: F64, u_explore: F64) -> I64:
    """A category per draw: one of the user's favourites by weight, or any category."""
    cdf = pop.favourite_cdf[users]
    slot = np.minimum((cdf < u_slot[:, None].astype(np.float32)).sum(axis=1), _FAVOURITES - 1)
    favourite = pop.favourites[users, slot].astype(np.int64)
    explore = u_explore < _EXPLORE
    anywhere = (u_explore / _EXPLORE * len(CATEGORIES)).astype(np.int64)
    return np.where(explore, np.minimum(anywhere, len(CATEGORIES) - 1), favourite)


def _make_block(world: _World, start: int) -> _Block:
    """Generate every session that starts in hour index ``start`` with all its events."""
    pop, catalog, day = world.population(), _catalog(world.seed), world.day(start // 24)
    rng = _rng(world.seed, _S_SESSIONS, start)
    start_ms = start * _HOUR_MS
    rate = pop.activity * np.exp(0.3 * day.engagement) * (world.diurnal(start) * world.intensity / 24.0)
    rate[(pop.signup_ms > start_ms) | day.dormant] = 0.0
    counts = rng.poisson(rate)

    # Sessions.
    sess_user = np.repeat(np.arange(world.users, dtype=np.int64), counts)
    n = sess_user.size
    sess_start = start_ms + rng.integers(0, _HOUR_MS, n)
    n_views = np.minimum(rng.geometric(1.0 / _MEAN_VIEWS, n), _MAX_VIEWS)
    main_category = _categories(pop, sess_user, rng.random(n), rng.random(n))
    checkout_u = rng.random(n)
    checkout_delay = rng.integers(30_000, 300_000, n)
    sess_p = day.propensity[sess_user]

    # Views: gaps within a session, category switches, Zipf items.
    v_sess = np.repeat(np.arange(n, dtype=np.int64), n_views)
    first = np.cumsum(n_views) - n_views
    gaps = rng.exponential(_VIEW_GAP_MS, v_sess.size)
    gaps[first] = 0.0
    elapsed = np.cumsum(gaps)
    view_ts = sess_start[v_sess] + (elapsed - elapsed[first][v_sess]).astype(np.int64)
    category = main_category[v_sess]
    switch = rng.random(v_sess.size) < _CATEGORY_SWITCH
    u_slot, u_explore = rng.random(v_sess.size), rng.random(v_sess.size)
    category[switch] = _categories(pop, sess_user[v_sess[switch]], u_slot[switch], u_explore[switch])
    item = category * ITEMS_PER_CATEGORY + _pick(catalog.zipf_cdf, rng.random(v_sess.size))

    # Funnel: favourites and carts follow views; removals follow carts; a converting
    # session buys its kept cart lines as one order after its last activity.
    view_p = sess_p[v_sess]
    fav = np.flatnonzero(rng.random(v_sess.size) < _FAV_RATE)
    cart = np.flatnonzero(rng.random(v_sess.size) < _CART_BASE + _CART_SLOPE * view_p)
    fav_ts = view_ts[fav] + rng.integers(2_000, 60_000, fav.size)
    cart_ts = view_ts[cart] + rng.integers(5_000, 120_000, cart.size)
    removed = rng.random(cart.size) < _REMOVE_RATE
    remove_ts = cart_ts[removed] + rng.exponential(_REMOVE_GAP_MS, int(removed.sum())).astype(np.int64)
    kept = cart[~removed]
    converts = checkout_u < sess_p * _CONVERSION_SCALE
    buy = kept[converts[v_sess[kept]]]
    buy_sess = v_sess[buy]
    new_order = np.ones(buy.size, dtype=bool)
    new_order[1:] = buy_sess[1:] != buy_sess[:-1]
    positions = np.arange(buy.size)
    line = positions - np.maximum.accumulate(np.where(new_order, positions, 0))
    sess_end = view_ts[first + n_views - 1] + 120_000
    buy_ts = sess_end[buy_sess] + checkout_delay[buy_sess] + line * 1_000
    qty_u = rng.random(buy.size)
    quantity = 1 + (qty_u > 0.88).astype(np.int32) + (qty_u > 0.97).astype(np.int32)
    # Drawn after everything else, so the other events stay what they were before refunds existed.
    cancelled = np.flatnonzero(rng.random(buy.size) < _CANCEL_RATE)
    refund_ts = buy_ts[cancelled] + rng.integers(300_000, 3_600_000, cancelled.size)

    source = np.concatenate([np.arange(v_sess.size), fav, cart, cart[removed], buy, buy[cancelled]])
    etype = np.concatenate(
        [
            np.full(v_sess.size, _VIEW, np.int8),
            np.full(fav.size, _FAV, np.int8),
            np.full(cart.size, _CART, np.int8),
            np.full(remove_ts.size, _REMOVE, np.int8),
            np.full(buy.size, _PURCHASE, np.int8),
            np.full(cancelled.size, _REFUND, np.int8),
        ]
    )
    session = v_sess[source]
    ts = np.minimum(
        np.concatenate([view_ts, fav_ts, cart_ts, remove_ts, buy_ts, refund_ts]), sess_start[session] + _SESSION_CAP_MS
    )
    qty = np.concatenate(
        [
            np.ones(source.size - buy.size - cancelled.size, np.int32),
            quantity.astype(np.int32),
            -quantity[cancelled].astype(np.int32),
        ]
    )
    return _Block(
        start=start,
        ts=ts.astype(np.int64),
        etype=etype,
        item=item[source].astype(np.int32),
        user=sess_user[session],
        session=session,
        quantity=qty,
        sessions_per_user=counts.astype(np.int32),
    )


def _events_of_hour(world: _World, index: int) -> _HourEvents:
    """Events whose ts falls in hour ``index``: sessions started in it and the two hours before."""
    lo, hi = index * _HOUR_MS, (index + 1) * _HOUR_MS
    parts: list[dict[str, Any]] = []
    for start in (index - 2, index - 1, index):
        block = world.block(start)
        sel = np.flatnonzero((block.ts >= lo) & (block.ts < hi))
        parts.append(
            {
                "ts": block.ts[sel],
                "start": np.full(sel.size, start, np.int64),
                "serial": sel.astype(np.int64),
                "etype": block.etype[sel],
                "item": block.item[sel],
                "user": block.user[sel],
                "session": block.session[sel],
                "quantity": block.quantity[sel],
                "event_a": _hash64(world.seed, _S_EVENT_ID_A, start, sel),
                "event_b": _hash64(world.seed, _S_EVENT_ID_B, start, sel),
                "session_h": _hash64(world.seed, _S_SESSION_ID, start, block.session[sel]),
                "order_h": _hash64(world.seed, _S_ORDER_ID, start, block.session[sel]),
            }
        )
    cols = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    order = np.lexsort((cols["serial"], cols["start"], cols["ts"]))
    cols = {key: value[order] for key, value in cols.items()}
    n = order.size
    true_ts = cols["ts"]
    ts = true_ts.copy()
    etype = cols["etype"].copy()
    quantity = cols["quantity"].copy()
    catalog, pop = _catalog(world.seed), world.population()
    price = catalog.prices[cols["item"]]

    malformed = np.full(n, -1, np.int8)
    rng = _rng(world.seed, _S_MALFORMED, index)
    rate = rng.uniform(*_MALFORMED_RATE)
    count = int(rng.binomial(n, rate)) if n else 0
    rows = np.sort(rng.choice(n, size=count, replace=False)) if count else np.zeros(0, np.int64)
    kinds = rng.integers(0, len(MALFORMED_KINDS), rows.size).astype(np.int8)
    if world.defects:
        malformed[rows] = kinds
        etype[malformed == MALFORMED_KINDS.index(UNKNOWN_TYPE)] = _CLICK
        negative = malformed == MALFORMED_KINDS.index(NEGATIVE_PRICE)
        price[negative] = -price[negative]
        quantity[malformed == MALFORMED_KINDS.index(ZERO_QUANTITY)] = 0
        ts[malformed == MALFORMED_KINDS.index(FUTURE_TS)] += _DAY_MS

    event_id = _strings(b"e", _hex(cols["event_a"]), _hex(cols["event_b"]))
    user_id = _blank(pop.user_ids.take(pa.array(cols["user"])), malformed == MALFORMED_KINDS.index(EMPTY_USER_ID))
    item_id = _blank(catalog.item_ids.take(pa.array(cols["item"])), malformed == MALFORMED_KINDS.index(EMPTY_ITEM_ID))
    category_names = pa.array(CATEGORIES, pa.string())
    purchase = (cols["etype"] == _PURCHASE) | (cols["etype"] == _REFUND)  # lines of an order
    order_ids = _strings(b"o", _hex(cols["order_h"][purchase]))
    order_index = np.full(n, -1, np.int64)
    order_index[purchase] = np.arange(int(purchase.sum()))
    table = pa.Table.from_arrays(
        [
            event_id,
            user_id,
            pa.array(_TYPE_NAMES, pa.string()).take(pa.array(etype)),
            item_id,
            category_names.take(pa.array(cols["item"] // ITEMS_PER_CATEGORY)),
            pa.array(price, pa.float64()),
            pa.array(quantity, pa.int32()),
            order_ids.take(pa.array(order_index, mask=~purchase)),
            pa.array(ts, pa.timestamp("ms", tz="UTC")),
            _strings(b"s", _hex(cols["session_h"])),
        ],
        schema=EVENT_SCHEMA,
    )
    files = _plan(world.seed, index, world.defects)
    return _HourEvents(_hour_of(index), table, true_ts, malformed, files)


# ---- landing plan and arrival ------------------------------------------------------
@lru_cache(maxsize=256)
def _plan(seed: int, index: int, defects: bool) -> tuple[LandingFile, ...]:
    """Files of event hour ``index``: slices, arrival times, late copies and re-sends."""
    rng = _rng(seed, _S_PLAN, index)
    hour = _hour_of(index)
    parts = int(rng.choice(_FILES_PER_HOUR, p=_FILES_PER_HOUR_P))
    stamp = hour.strftime("%Y%m%dT%H")
    planned: list[LandingFile] = []
    for part in range(parts):
        # Every draw happens whatever the outcome, so the plan's randomness does not
        # shift with the defects flag.
        jitter_ms = int(rng.integers(1_000, 60_000))
        u_late = rng.random()
        late_hours = int(rng.integers(*_LATE_HOURS, endpoint=True))
        too_late_hours = int(rng.integers(*_TOO_LATE_HOURS, endpoint=True))
        u_in_hour = rng.random()
        u_resend = rng.random()
        resend_hours = int(rng.integers(*_RESEND_HOURS, endpoint=True))
        u_resend_in_hour = rng.random()
        name = f"sim-{stamp}-p{part + 1}of{parts}"
        arrival_ms = index * _HOUR_MS + (part + 1) * _HOUR_MS // parts - jitter_ms
        kind = ON_TIME
        if defects and u_late < _TOO_LATE_RATE + _LATE_RATE:
            kind = TOO_LATE_FILE if u_late < _TOO_LATE_RATE else LATE_FILE
            delay = too_late_hours if kind == TOO_LATE_FILE else late_hours
            arrival_ms = (index + delay) * _HOUR_MS + int(u_in_hour * _HOUR_MS)
        original = LandingFile(f"{name}.parquet", hour, part, parts, kind, _moment(arrival_ms))
        planned.append(original)
        if defects and u_resend < _RESEND_RATE:
            if resend_hours == 0:
                end = (arrival_ms // _HOUR_MS + 1) * _HOUR_MS
                resend_ms = arrival_ms + 1 + int(u_resend_in_hour * (end - arrival_ms - 1))
            else:
                resend_ms = (arrival_ms // _HOUR_MS + resend_hours) * _HOUR_MS + int(u_resend_in_hour * _HOUR_MS)
            planned.append(
                LandingFile(f"{name}-resend.parquet", hour, part, parts, RESENT_FILE, _moment(resend_ms), original.name)
            )
    return tuple(planned)


def _moment(ms: int) -> datetime:
    """The UTC datetime of epoch milliseconds."""
    return datetime.fromtimestamp(ms / 1000, UTC)


def _arrivals(world: _World, hour: datetime) -> list[LandingFile]:
    """Every planned file, of this or an earlier event hour, that arrives in ``hour``."""
    index = _hour_index(hour)
    found = [
        planned
        for event_index in range(index, index - _MAX_ARRIVAL_LAG - 1, -1)
        for planned in _plan(world.seed, event_index, world.defects)
        if planned.arrival_hour == hour
    ]
    return sorted(found, key=lambda planned: (planned.arrival, planned.name))


def _write_landing(lake: Lake, planned: LandingFile, rows: pa.Table) -> None:
    """Write a landing file under ``_tmp/``, stamp its arrival time, and move it into place."""
    target = lake.partition(LANDING, planned.arrival_hour)
    target.mkdir(parents=True, exist_ok=True)
    tmp = lake.tmp_dir()
    path = tmp / planned.name
    pq.write_table(rows, path, compression="zstd")
    arrival_ns = int(round(planned.arrival.timestamp() * 1000)) * 1_000_000
    os.utime(path, ns=(arrival_ns, arrival_ns))
    os.replace(path, target / planned.name)
    tmp.rmdir()


def _truth_tables(world: _World, hour: datetime, events: _HourEvents) -> dict[str, pa.Table]:
    """Ground truth of an hour: propensities, injected malformed rows, and its files."""
    index = _hour_index(hour)
    pop, day, block = world.population(), world.day(index // 24), world.block(index)
    exists = np.flatnonzero(pop.signup_ms <= index * _HOUR_MS)
    propensity = pa.Table.from_arrays(
        [
            pop.user_ids.take(pa.array(exists)),
            pa.array(np.full(exists.size, index * _HOUR_MS, np.int64), pa.timestamp("ms", tz="UTC")),
            pa.array(day.propensity[exists], pa.float64()),
            pa.array(day.dormant[exists], pa.bool_()),
            pa.array(block.sessions_per_user[exists], pa.int32()),
        ],
        schema=TRUTH_PROPENSITY_SCHEMA,
    )
    originals = [planned for planned in events.files if planned.kind != RESENT_FILE]
    rows: list[npt.NDArray[np.intp]] = []
    kinds: list[str] = []
    files: list[str] = []
    for planned in originals:
        start, stop = events.bounds(planned)
        hit = np.flatnonzero(events.malformed[start:stop] >= 0) + start
        rows.append(hit)
        kinds.extend(MALFORMED_KINDS[code] for code in events.malformed[hit])
        files.extend([planned.name] * hit.size)
    hit_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    defects = pa.Table.from_arrays(
        [
            events.table.column("event_id").take(pa.array(hit_rows)),
            pa.array(kinds, pa.string()),
            pa.array(files, pa.string()),
        ],
        schema=TRUTH_DEFECTS_SCHEMA,
    )
    sizes = [events.bounds(planned) for planned in events.files]
    plan = pa.Table.from_pylist(
        [
            {
                "file": planned.name,
                "kind": planned.kind,
                "part": planned.part,
                "parts": planned.parts,
                "arrival_hour": planned.arrival_hour,
                "arrival": planned.arrival,
                "rows": stop - start,
                "original": planned.original,
            }
            for planned, (start, stop) in zip(events.files, sizes, strict=True)
            if stop > start
        ],
        schema=TRUTH_FILES_SCHEMA,
    )
    return {TRUTH_PROPENSITY: propensity, TRUTH_DEFECTS: defects, TRUTH_FILES: plan}


# ---- vectorised ids ----------------------------------------------------------------
def _mix(x: int) -> int:
    """splitmix64 finaliser on a Python int."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _hash64(seed: int, stream: int, start: int, values: npt.NDArray[np.int64]) -> U64:
    """splitmix64 of (seed, stream, hour, value) for every value: stable across runs and platforms."""
    key = np.uint64(_mix(_mix(_mix(seed & _MASK64) ^ stream) ^ (start & _MASK64)))
    x = values.astype(np.uint64) ^ key
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    result: U64 = x ^ (x >> np.uint64(31))
    return result


def _hex(values: U64) -> U8:
    """16 lowercase hex digits per value, as an (n, 16) byte matrix."""
    raw = values.astype(">u8").view(np.uint8).reshape(-1, 8)
    out = np.empty((raw.shape[0], 16), np.uint8)
    out[:, 0::2] = _HEX[raw >> 4]
    out[:, 1::2] = _HEX[raw & 15]
    return out


def _digits(values: npt.NDArray[np.int64], width: int) -> U8:
    """Zero-padded decimal digits per value, as an (n, width) byte matrix."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    digits: U8 = ((values.astype(np.int64)[:, None] // powers) % 10 + ord("0")).astype(np.uint8)
    return digits


def _strings(prefix: bytes, *parts: U8) -> pa.Array:
    """A string array from a prefix and fixed-width byte matrices, built without Python loops."""
    n = parts[0].shape[0]
    head = np.broadcast_to(np.frombuffer(prefix, np.uint8), (n, len(prefix)))
    matrix = np.ascontiguousarray(np.hstack([head, *parts]))
    width = matrix.shape[1]
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(matrix.tobytes())).cast(pa.string())


def _blank(values: pa.Array, mask: B) -> pa.Array:
    """``values`` with the masked entries replaced by empty strings."""
    if not mask.any():
        return values
    return pc.replace_with_mask(values, pa.array(mask), pa.array([""] * int(mask.sum()), pa.string()))


__all__ = [
    "CATEGORIES",
    "DEFECT_KINDS",
    "FILE_DEFECT_KINDS",
    "LATE_FILE",
    "MALFORMED_KINDS",
    "ON_TIME",
    "RESENT_FILE",
    "TOO_LATE_FILE",
    "TRUTH_DEFECTS",
    "TRUTH_FILES",
    "TRUTH_PROPENSITY",
    "LandingFile",
    "SimulationSummary",
    "landing_plan",
    "simulate",
    "simulate_hour",
]
