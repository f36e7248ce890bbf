"""Rebuild per-bucket states and snapshots from staged events: the verification, label and retention paths.

docs/features.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.config import Settings
from profile_engine.contracts.events import PURCHASE, STAGED_SCHEMA
from profile_engine.contracts.profiles import TIMESTAMP, USER_ID
from profile_engine.hours import HOUR, floor_hour, format_hour, hour_range
from profile_engine.lake.storage import STATE, Lake
from profile_engine.profiles.build import epoch_hour, read_staged, read_state, staged_hours
from profile_engine.profiles.merge import advance, as_staged
from profile_engine.profiles.snapshot import snapshot
from profile_engine.profiles.state import META, ORDERS, PENDING, USER_EVENTS, USERS, ProfileState, empty_state


def _rebuild_start(lake: Lake, hour: datetime, bucket: int) -> tuple[list[datetime], ProfileState]:
    """The staged hours a rebuild of ``hour`` reads (oldest first) and the state it starts from.

    The oldest staged hour S the lake still holds starts it: from the state checkpoint of
    S-1 when retention kept one, else from an empty state. ``FileNotFoundError`` when
    nothing is staged at or before ``hour`` or staging has a gap (naming the first
    missing hour).
    """
    staged = [h for h in staged_hours(lake, bucket) if h <= hour]
    if not staged:
        raise FileNotFoundError(f"no staged hour at or before {format_hour(hour)} in bucket {bucket}")
    first = staged[0]
    hours = list(hour_range(first, hour))
    missing = sorted(set(hours) - set(staged))
    if missing:
        raise FileNotFoundError(
            f"staged hour {format_hour(missing[0])} bucket {bucket} is missing: cannot rebuild "
            f"{format_hour(hour)} from {format_hour(first)}"
        )
    start = read_state(lake, first - HOUR, bucket) if lake.committed(STATE, first - HOUR, bucket) else empty_state()
    return hours, start


def rebuild_bucket(settings: Settings, hour: datetime, bucket: int) -> tuple[datetime, ProfileState]:
    """The state of one bucket as of the end of ``hour`` rebuilt from staged events (the rebuild path).

    Starts from the oldest staged hour S the lake still holds: from the state checkpoint
    of S-1 when retention kept one (older hours were deleted), else from an empty state
    (S is the lake's first hour); then merges every staged hour S..``hour`` in one
    ``advance``. Returns S and the state. Nothing is read from the states after S-1, so
    the result is independent of how the committed hours were built. Raises
    ``FileNotFoundError`` naming the first missing staged hour when staging has a gap.
    """
    _, first, state = next(rebuild_bucket_hours(settings, hour, hour, bucket))
    return first, state


def rebuild_bucket_hours(
    settings: Settings, first: datetime, last: datetime, bucket: int
) -> Iterator[tuple[datetime, datetime, ProfileState]]:
    """The rebuilt states of one bucket as of the end of every hour ``first``..``last``: ``rebuild_bucket`` of
    ``first``, then each later staged hour merged in memory with one ``advance`` of its own, as the hourly path
    merges it (never sealed, no checkpoint read after S-1, every row of every snapshot computed: none of the
    hourly path's shortcuts). Yields ``(hour, S, state)``; staging is checked for gaps up to ``last`` first.
    """
    first, last = floor_hour(first), floor_hour(last)
    lake = Lake(settings.lake)
    hours, state = _rebuild_start(lake, last, bucket)
    if first < hours[0]:
        raise FileNotFoundError(
            f"hour {format_hour(first)} is before the oldest staged hour {format_hour(hours[0])} of bucket {bucket}"
        )
    before = [h for h in hours if h <= first]
    for merged in (before, *([h] for h in hours[len(before) :])):
        events = read_staged(lake, merged, bucket, settings.business_tz).select(STAGED_SCHEMA.names)
        state = advance(state, events.cast(STAGED_SCHEMA), merged[-1] + HOUR, settings)
        yield merged[-1], hours[0], state


def _users_only(state: ProfileState, users: pa.Array) -> ProfileState:
    """``state`` restricted to ``users`` (every state table but ``meta`` is per user)."""
    return ProfileState(
        {
            name: table if name == META else table.filter(pc.is_in(table.column(USER_ID), value_set=users))
            for name, table in state.tables.items()
        },
        sealed=None if state.sealed is None else replace(state.sealed, users=users),
    )


def rebuild_before_cutoffs(
    settings: Settings, hours: list[datetime], bucket: int, users: pa.Array
) -> dict[datetime, pa.Table]:
    """Per-bucket profiles of ``users`` in the snapshots of ``hours``, rebuilt with every later event deleted.

    The cutoff of the snapshot of hour S is its end E = S + 1h in event time and S itself in
    arrival time (the hourly path has read staging up to S): the rebuild reads the staged
    hours up to S only, deletes every event with ``ts >= E`` (the held-back ones too) and
    merges the rest in one ``advance`` from the start ``rebuild_bucket`` uses. A snapshot
    whose features differ from this one depends on something after its cutoff. Per-user
    features depend on the user's own events only, so a sample of users is rebuilt alone;
    staging is scanned once for every hour. Returns ``{hour: profiles}`` (``SNAPSHOT_SCHEMA``).
    """
    lake = Lake(settings.lake)
    wanted = sorted({floor_hour(h) for h in hours})
    if not wanted:
        return {}
    users = pa.array(users, pa.string())
    staged_range, start = _rebuild_start(lake, wanted[-1], bucket)
    first = staged_range[0]
    if wanted[0] < first:
        raise FileNotFoundError(
            f"snapshot {format_hour(wanted[0])} is older than the oldest staged hour {format_hour(first)} "
            f"of bucket {bucket}: its events are no longer staged"
        )
    start = _users_only(start, users)
    staged = read_staged(lake, staged_range, bucket, settings.business_tz, users)
    staged = staged.select([*STAGED_SCHEMA.names, "staged_hour"]).cast(
        STAGED_SCHEMA.append(staged.schema.field("staged_hour"))
    )
    out: dict[datetime, pa.Table] = {}
    for hour in wanted:
        end = hour + HOUR
        before = pc.and_(
            pc.less_equal(staged.column("staged_hour"), epoch_hour(hour)),
            pc.less(staged.column("ts"), pa.scalar(end, TIMESTAMP)),
        )
        events = staged.filter(before).select(STAGED_SCHEMA.names)
        pending = start.tables[PENDING]
        begin = ProfileState(
            {**start.tables, PENDING: pending.filter(pc.less(pending.column("ts"), pa.scalar(end, TIMESTAMP)))},
            sealed=start.sealed,
        )
        out[hour] = snapshot(advance(begin, events, end, settings), end, settings)[0]
    return out


def reproducible_hours(settings: Settings, bucket: int) -> dict[datetime, datetime]:
    """Every hour whose snapshot of ``bucket`` the lake can rebuild, with the hour P it starts after.

    The rebuild of hour H merges the staged hours P+1..H into the state of P: the newest
    committed state checkpoint P < H after which every hour up to H is staged, or, with no
    such checkpoint, the hour before the oldest staged one (an empty state when it has no
    checkpoint: the lake's first hours, the rule of ``rebuild_bucket``). A gap in staging
    (retention, a lost partition) makes the hours after it unreproducible until the next
    checkpoint.
    """
    lake = Lake(settings.lake)
    staged = staged_hours(lake, bucket)
    if not staged:
        return {}
    checkpoints = set(staged_hours(lake, bucket, STATE))
    present = set(staged)
    out: dict[datetime, datetime] = {}
    start: datetime | None = staged[0] - HOUR
    for hour in hour_range(staged[0], staged[-1]):
        if hour - HOUR in checkpoints:
            start = hour - HOUR
        if hour not in present:
            start = None
        elif start is not None:
            out[hour] = start
    return out


def profiles_at(
    settings: Settings,
    hours: list[datetime],
    bucket: int,
    pick: Callable[[datetime, pa.Array], pa.Array],
) -> dict[datetime, pa.Table]:
    """Per-bucket profiles at ``hours`` as the hourly path builds them, whether or not they were committed.

    Hour H starts from the state of P (``reproducible_hours``: a checkpoint or an empty
    state) and merges the staged hours P+1..H in one ``advance`` to H+1, which is what
    ``build_profiles_range`` does between checkpoints: the state depends on the merged events
    and the end only, so the snapshot equals the hourly one. ``pick(H, users)`` gets the
    users the snapshot of H has (those of the state of P and of the events due by H+1) and
    returns the ones to rebuild. Every user with an order is rebuilt as well: RFM ranks all
    buyers, so ``population_snapshot`` over every bucket's result gives the picked users the
    RFM of the whole snapshot; per-user features depend on the user's own events only.
    Staging is read once per starting hour. ``FileNotFoundError`` names an hour that cannot
    be rebuilt. Returns ``{hour: profiles}`` (``SNAPSHOT_SCHEMA``; picked users and buyers).
    """
    lake = Lake(settings.lake)
    starts = reproducible_hours(settings, bucket)
    wanted = sorted({floor_hour(h) for h in hours})
    missing = [h for h in wanted if h not in starts]
    if missing:
        raise FileNotFoundError(
            f"snapshot {format_hour(missing[0])} of bucket {bucket} cannot be rebuilt: no state checkpoint "
            "before it is followed by every staged hour up to it"
        )
    groups: dict[datetime, list[datetime]] = {}
    for hour in wanted:
        groups.setdefault(starts[hour], []).append(hour)
    out: dict[datetime, pa.Table] = {}
    for start_hour, group in groups.items():
        state = read_state(lake, start_hour, bucket) if lake.committed(STATE, start_hour, bucket) else empty_state()
        staged = read_staged(lake, list(hour_range(start_hour + HOUR, group[-1])), bucket, settings.business_tz)
        staged_hour = staged.column("staged_hour")
        staged = staged.select(STAGED_SCHEMA.names).cast(STAGED_SCHEMA)
        pending = as_staged(state.tables[PENDING], settings.business_tz)  # an older state's buffer too
        users = state.tables[USERS]
        buyers_before = pa.concat_arrays(
            [
                users.filter(pc.greater(users.column("orders_n"), 0)).column(USER_ID).combine_chunks(),
                state.tables[ORDERS].column(USER_ID).combine_chunks(),
            ]
        )
        for hour in group:
            end = pa.scalar(hour + HOUR, TIMESTAMP)
            events = staged.filter(pc.less_equal(staged_hour, epoch_hour(hour)))
            due = pa.concat_tables([pending, events]).filter(pc.less(pc.field("ts"), end))
            present = pc.unique(
                pa.concat_arrays(
                    [state.tables[USER_EVENTS].column(USER_ID).combine_chunks(), due.column(USER_ID).combine_chunks()]
                )
            )
            bought = due.filter(pc.equal(pc.field("event_type"), PURCHASE)).column(USER_ID).combine_chunks()
            chosen = pc.unique(pa.concat_arrays([pa.array(pick(hour, present), pa.string()), buyers_before, bought]))
            begin = _users_only(state, chosen)
            merged = advance(
                begin, events.filter(pc.is_in(events.column(USER_ID), value_set=chosen)), hour + HOUR, settings
            )
            out[hour] = snapshot(merged, hour + HOUR, settings)[0]
    return out
