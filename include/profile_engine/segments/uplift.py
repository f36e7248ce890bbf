"""Uplift of actions (treated against control), segment sizes over time and the run report's section.

Exposure periods and the clustered interval: docs/segments.md.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.config import Settings
from profile_engine.contracts.profiles import SNAPSHOT_HOUR, USER_ID
from profile_engine.contracts.segments import ACTION, CONTACT_HOUR, CONTACT_SCHEMA, RULE, SEGMENTS_COL
from profile_engine.hours import HOUR, MS_HOUR, floor_hour, format_hour, hour_range
from profile_engine.lake import storage as lk
from profile_engine.segments.assign import share_warning
from profile_engine.segments.partitions import bucket_rows
from profile_engine.segments.rules import CONTROL, load_rules

UPLIFT_LOOKBACK_HOURS = 168
# contacts of a bucket held at once while finding exposure starts (whole hours: at least one hour's)
UPLIFT_CHUNK_ROWS = 2_000_000
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


def design_effect(buyers: Sequence[int], exposures: Sequence[int], users: Sequence[int] | None = None) -> float:
    """Variance of a rate over users with several exposures each, relative to independent exposures (>= 1).

    ``buyers[i]`` of ``exposures[i]`` exposures of user i bought (of each of ``users[i]``
    users when given: counts of users per ``(buyers, exposures)``). The rate ``B / N`` is a
    ratio estimator; its cluster-robust variance ``m / (m - 1) * sum (b_i - p n_i)^2 / N^2``
    over the binomial ``p (1 - p) / N``. 1 when every user has one exposure (or no spread).
    The sum is taken in integers, ``sum (b_i N - B n_i)^2 / N^2``: exact whatever the users' order.
    """
    weights = [1] * len(exposures) if users is None else list(users)
    m = sum(weights)
    total = sum(w * n for w, n in zip(weights, exposures, strict=True))
    if m < 2 or total == 0:
        return 1.0
    bought = sum(w * b for w, b in zip(weights, buyers, strict=True))
    p = bought / total
    if p in (0.0, 1.0):
        return 1.0
    spread = sum(w * (b * total - bought * n) ** 2 for w, b, n in zip(weights, buyers, exposures, strict=True))
    robust = m / (m - 1) * (spread / total**2) / total**2
    return max(1.0, robust / (p * (1 - p) / total))


def exposure_starts(contacts: pa.Table, periods: Mapping[str, int]) -> pa.Table:
    """The contacts that start an exposure: per (user, rule) the first contact, then the first at least a period later.

    A treated user is contacted at most once per cooldown, while a control user is
    recorded every hour they are held out, so counting every contact row compares one
    treated exposure with up to ``cooldown`` control rows of the same user (user_rank who
    linger in a segment without buying weigh more in control). Counting each user once per
    exposure period (``periods[rule]`` hours, the rule's cooldown; 1 for a rule not in
    ``periods``) on both sides makes the two comparable. ``contacts`` follows
    :data:`CONTACT_SCHEMA`; the result keeps its columns, sorted by rule, user and hour.
    Sorted by ranks of the rule and user names (``np.lexsort``, the order of a stable sort by
    the names); each row's next start (the first row of its (rule, user) at least a period
    later) is found by one binary search over all rows, and the starts are followed from
    each (rule, user)'s first row, one step for every (rule, user) at a time.
    """
    if contacts.num_rows == 0:
        return contacts
    (rule_rank, names), (user_rank, _) = _ranks(contacts.column(RULE)), _ranks(contacts.column(USER_ID))
    ms = np.asarray(contacts.column(CONTACT_HOUR).cast(pa.int64()).to_numpy())  # ms since the epoch
    order = np.lexsort((ms, user_rank, rule_rank))
    ordered, rule_rank, user_rank, ms = contacts.take(pa.array(order)), rule_rank[order], user_rank[order], ms[order]
    del order
    n = ordered.num_rows
    first = np.ones(n, dtype=bool)  # the first row of its (rule, user)
    first[1:] = (rule_rank[1:] != rule_rank[:-1]) | (user_rank[1:] != user_rank[:-1])
    del user_rank
    group = np.cumsum(first, dtype=np.int64) - 1
    period = _periods_ms(names, periods)[rule_rank]
    del rule_rank
    # (group, ms) as one ascending key: groups a span apart, wider than any contact plus period.
    ms -= ms.min()
    span = int(ms.max()) + int(period.max()) + 1
    key = group * span
    key += ms
    del ms
    period += key
    step = np.searchsorted(key, period, side="left")  # the first row at least a period later
    del key, period
    keep = np.zeros(n, dtype=bool)
    current = np.flatnonzero(first)
    while current.size:
        keep[current] = True
        nxt = step[current]
        inside = nxt < n
        nxt, current = nxt[inside], current[inside]
        current = nxt[group[nxt] == group[current]]
    return ordered.filter(pa.array(keep))


def _periods_ms(rules: pa.Array, periods: Mapping[str, int]) -> np.ndarray:
    """The exposure period of each rule name in ``rules``, in ms (``periods[rule]`` hours, at least 1)."""
    return np.array([max(1, periods.get(r, 1)) * MS_HOUR for r in rules.to_pylist()], dtype=np.int64)


def _ranks(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Each value's rank among the column's distinct values, ascending (equal values, equal ranks; int32), and
    those values in rank order."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    order = pc.sort_indices(encoded.dictionary)
    rank = np.empty(len(encoded.dictionary), dtype=np.int32)
    rank[np.asarray(order)] = np.arange(len(encoded.dictionary), dtype=np.int32)
    ranks: np.ndarray = rank[np.asarray(encoded.indices.to_numpy())]
    return ranks, encoded.dictionary.take(order)


CARRIED = "__carried"


def chunked_exposure_starts(
    hours: Iterable[pa.Table], periods: Mapping[str, int], chunk_rows: int
) -> Iterator[pa.Table]:
    """:func:`exposure_starts` of contacts read an hour at a time, a chunk of hours at a time.

    ``hours``: the contacts of consecutive hours, oldest first (each contact's ``CONTACT_HOUR`` is its hour).
    Hours are gathered until they hold ``chunk_rows`` rows; each chunk's starts are found with the last start
    of every (rule, user) of the chunks before it put first in its group, so the starts yielded (chunk by
    chunk, each sorted by rule, user and hour) are, together, those of every contact at once: a start is the
    first contact of its (rule, user) at least a period after the one before, and the one before is either
    in the chunk or the carried one (a later contact of an earlier chunk would have been a start itself).
    What is held: one chunk and the last start of every (rule, user) whose period is still open at the chunk's
    first hour (a start whose period ended before it cannot hold back a contact of the chunk).
    """
    carried: pa.Table | None = None
    pending: list[pa.Table] = []
    rows = 0

    def chunk_starts(chunk: pa.Table) -> pa.Table:
        nonlocal carried
        marked = chunk.append_column(CARRIED, pa.repeat(pa.scalar(False), chunk.num_rows))
        if carried is not None:
            marked = pa.concat_tables([_still_open(carried, periods, pc.min(chunk.column(CONTACT_HOUR))), marked])
        starts = exposure_starts(marked, periods)  # sorted by rule, user, hour
        rule, user = starts.column(RULE), starts.column(USER_ID)
        n = starts.num_rows
        last = np.ones(n, dtype=bool)  # the last start of its (rule, user)
        if n > 1:
            same = pc.and_(pc.equal(rule.slice(1), rule.slice(0, n - 1)), pc.equal(user.slice(1), user.slice(0, n - 1)))
            last[:-1] = ~np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)
        kept = starts.filter(pa.array(last))
        carried = kept.set_column(
            kept.schema.get_field_index(CARRIED), CARRIED, pa.repeat(pa.scalar(True), kept.num_rows)
        )
        return starts.filter(pc.invert(starts.column(CARRIED))).drop_columns([CARRIED])

    for part in hours:
        if part.num_rows:
            pending.append(part)
            rows += part.num_rows
        if rows >= chunk_rows:
            yield chunk_starts(pa.concat_tables(pending))
            pending, rows = [], 0
    if rows:
        yield chunk_starts(pa.concat_tables(pending))


def _still_open(starts: pa.Table, periods: Mapping[str, int], at: pa.Scalar) -> pa.Table:
    """The rows of ``starts`` whose exposure period (``periods[rule]`` hours, 1 for a rule not in it) has not
    ended at the contact hour ``at``."""
    encoded = pc.dictionary_encode(starts.column(RULE).combine_chunks())
    period = _periods_ms(encoded.dictionary, periods)
    ends = np.asarray(starts.column(CONTACT_HOUR).cast(pa.int64()).to_numpy()) + period[encoded.indices.to_numpy()]
    return starts.filter(pa.array(ends > at.cast(pa.int64()).as_py()))


@dataclass
class UpliftCounts:
    """What :func:`uplift_rows` is made of, mergeable over buckets (a user is in one bucket).

    ``users[(rule, side)][(buyers, exposures)]``: the users of a side (``treated`` or
    ``control``) of a rule with that many exposures and that many of them followed by a
    purchase; ``actions[rule]``: the rule's treated actions.
    """

    users: dict[tuple[str, str], dict[tuple[int, int], int]] = field(default_factory=dict)
    actions: dict[str, set[str]] = field(default_factory=dict)

    def add(self, other: UpliftCounts) -> None:
        """Add ``other``'s counts (of other users) to these."""
        for key, counts in other.users.items():
            mine = self.users.setdefault(key, {})
            for pair, n in counts.items():
                mine[pair] = mine.get(pair, 0) + n
        for rule, actions in other.actions.items():
            self.actions.setdefault(rule, set()).update(actions)


def uplift_counts(labelled: pa.Table) -> UpliftCounts:
    """The :class:`UpliftCounts` of exposure starts with ``labels.LABEL`` (:func:`uplift_rows`' input)."""
    if labelled.num_rows == 0:
        return UpliftCounts()
    counts = _counts_per_user(_exposures_per_user(labelled))
    counts.actions = _treated_actions(labelled)
    return counts


_BOUGHT, _EXPOSURES = "bought_sum", "bought_count"


def _exposures_per_user(labelled: pa.Table) -> pa.Table:
    """Per (rule, side, user) of labelled exposure starts: the exposures (``bought_count``) and those followed
    by a purchase (``bought_sum``); summable over tables of other exposures of the same users."""
    from profile_engine.model import labels

    side = pc.if_else(pc.equal(labelled.column(ACTION), CONTROL), "control", "treated")
    table = pa.table(
        {
            RULE: labelled.column(RULE),
            "side": side,
            USER_ID: labelled.column(USER_ID),
            "bought": pc.cast(labelled.column(labels.LABEL), pa.int64()),
        }
    )
    return table.group_by([RULE, "side", USER_ID], use_threads=False).aggregate(
        [("bought", "sum"), ("bought", "count")]
    )


def _counts_per_user(per_user: pa.Table) -> UpliftCounts:
    """:class:`UpliftCounts` (without actions) of one row per (rule, side, user) of :func:`_exposures_per_user`."""
    counts = UpliftCounts()
    if per_user.num_rows == 0:
        return counts
    pairs = per_user.group_by([RULE, "side", _BOUGHT, _EXPOSURES], use_threads=False).aggregate([([], "count_all")])
    for rule, side_, bought, exposures, n in zip(
        *(pairs.column(c).to_pylist() for c in (RULE, "side", _BOUGHT, _EXPOSURES, "count_all")), strict=True
    ):
        counts.users.setdefault((rule, side_), {})[(int(bought), int(exposures))] = int(n)
    return counts


def _treated_actions(labelled: pa.Table) -> dict[str, set[str]]:
    treated = labelled.filter(pc.not_equal(labelled.column(ACTION), CONTROL))
    actions = treated.group_by([RULE, ACTION], use_threads=False).aggregate([])
    found: dict[str, set[str]] = {}
    for rule, action in zip(actions.column(RULE).to_pylist(), actions.column(ACTION).to_pylist(), strict=True):
        found.setdefault(rule, set()).add(action)
    return found


# hours written whole (older code) read in one DuckDB scan: each scan reads every row of its files
WHOLE_HOURS_AT_ONCE = 24


def _reads(manifests: Mapping[datetime, Mapping[str, Any]], buckets: int) -> Iterator[dict[datetime, Any]]:
    """The hours of ``manifests``, in order, grouped into reads: an hour written per bucket over ``buckets`` alone
    (its bucket's folder), consecutive hours written whole or over another count up to ``WHOLE_HOURS_AT_ONCE``
    together (one scan filtered to the bucket, not one a hour)."""
    whole: dict[datetime, Any] = {}
    for hour, manifest in manifests.items():
        if manifest.get("bucket_count") == buckets:
            if whole:
                yield whole
                whole = {}
            yield {hour: manifest}
            continue
        whole[hour] = manifest
        if len(whole) == WHOLE_HOURS_AT_ONCE:
            yield whole
            whole = {}
    if whole:
        yield whole


def bucket_uplift_counts(
    settings: Settings,
    manifests: Mapping[datetime, Mapping[str, Any]],
    bucket: int,
    periods: Mapping[str, int],
    first: datetime,
    chunk_rows: int = UPLIFT_CHUNK_ROWS,
) -> UpliftCounts:
    """The :class:`UpliftCounts` of ``bucket``'s users: their contacts in the hours of ``manifests`` (oldest first)
    read an hour at a time, exposure starts found a chunk of ``chunk_rows`` contacts at a time
    (:func:`chunked_exposure_starts`), those from ``first`` on labelled (``labels.label_examples``) and summed per
    user over the chunks. Holds one chunk and one row per (rule, user), not the bucket's contacts of the look-back.
    """
    from profile_engine.model import labels

    lake = lk.Lake(settings.lake)
    hours = (read_bucket_contacts(lake, read, bucket, settings.buckets) for read in _reads(manifests, settings.buckets))
    window_start = pa.scalar(first, CONTACT_SCHEMA.field(CONTACT_HOUR).type)
    per_user: list[pa.Table] = []
    actions = UpliftCounts()
    for starts in chunked_exposure_starts(hours, periods, chunk_rows):
        starts = starts.filter(pc.greater_equal(starts.column(CONTACT_HOUR), window_start))
        if starts.num_rows == 0:
            continue
        examples = starts.append_column(SNAPSHOT_HOUR, starts.column(CONTACT_HOUR))
        labelled = labels.label_examples(settings, examples, bucket)
        per_user.append(_exposures_per_user(labelled))
        actions.add(UpliftCounts(actions=_treated_actions(labelled)))
    if not per_user:
        return actions
    summed = (
        pa.concat_tables(per_user)
        .group_by([RULE, "side", USER_ID], use_threads=False)
        .aggregate([(_BOUGHT, "sum"), (_EXPOSURES, "sum")])
    )
    counts = _counts_per_user(
        pa.table({c: summed.column(c) for c in (RULE, "side", USER_ID)})
        .append_column(_BOUGHT, summed.column(f"{_BOUGHT}_sum"))
        .append_column(_EXPOSURES, summed.column(f"{_EXPOSURES}_sum"))
    )
    counts.actions = actions.actions
    return counts


def counted_rows(counts: UpliftCounts, periods: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """:func:`uplift_rows` of the exposures ``counts`` holds (of one table or summed over buckets)."""
    rows = []
    for rule in sorted({key[0] for key in counts.users}):
        sides = {side: sorted(counts.users.get((rule, side), {}).items()) for side in ("treated", "control")}
        (bt, nt), (bc, nc) = ((sum(b * u for (b, _), u in v), sum(n * u for (_, n), u in v)) for v in sides.values())
        effects = tuple(
            design_effect([b for (b, _), _ in v], [n for (_, n), _ in v], [u for _, u in v]) for v in sides.values()
        )
        rows.append(
            {
                "rule": rule,
                "action": ", ".join(sorted(counts.actions.get(rule, ()))) or None,
                "exposure_hours": max(1, (periods or {}).get(rule, 1)),
                "treated": nt,
                "treated_users": sum(u for _, u in sides["treated"]),
                "treated_buyers": bt,
                "treated_rate": round(bt / nt, 6) if nt else None,
                "control": nc,
                "control_users": sum(u for _, u in sides["control"]),
                "control_buyers": bc,
                "control_rate": round(bc / nc, 6) if nc else None,
                **rate_difference((bt, nt), (bc, nc), design_effects=(effects[0], effects[1])),
            }
        )
    return rows


def uplift_rows(labelled: pa.Table, periods: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """Per rule: exposures, users and buyers, treated against control, with the clustered 95% interval.

    ``labelled`` holds exposure starts (:func:`exposure_starts`) with ``labels.LABEL``
    (bought in the window after the contact). A user's exposures are one cluster: the
    interval's effective sizes use :func:`design_effect` of each side.
    """
    return counted_rows(uplift_counts(labelled), periods)


def read_bucket_contacts(
    lake: lk.Lake, manifests: Mapping[datetime, Mapping[str, Any]], bucket: int, buckets: int
) -> pa.Table:
    """The contacts of ``bucket``'s users (``bucket_sql`` over ``buckets``) in the committed contact hours of
    ``manifests`` (their hour-level manifests, read once for every bucket; ``partitions.bucket_rows``)."""
    rows = bucket_rows(lake, lk.CONTACTS, manifests, bucket, buckets, CONTACT_SCHEMA.names)
    return CONTACT_SCHEMA.empty_table() if rows is None else rows.cast(CONTACT_SCHEMA)


def uplift(
    settings: Settings,
    hour: datetime,
    *,
    lookback_hours: int = UPLIFT_LOOKBACK_HOURS,
    rules_path: Path | None = None,
    chunk_rows: int = UPLIFT_CHUNK_ROWS,
) -> dict[str, Any]:
    """Purchase rate after an action, treated against control, per rule, for exposures old enough.

    A user's contacts of a rule are grouped into exposure periods of the rule's cooldown
    (from the rules file; :func:`exposure_starts`), on both sides; an exposure starting at
    contact hour C counts when the purchase window that follows it (the label window
    ``[C+1h, C+1h+horizon)`` of ``labels``) is final at ``hour`` (window end + lateness),
    within the last ``lookback_hours``. Contacts up to a cooldown before that are read so
    an exposure running into the lookback is not counted twice. Buyers are read from
    staged purchase events, like the model's labels; the interval clusters by user.
    A user's contacts and purchases are in the user's bucket: they are read, labelled and
    counted one bucket at a time (:func:`read_bucket_contacts`, ``labels.label_examples``),
    and the buckets' :class:`UpliftCounts` added.
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
    manifests = {h: lake.manifest(lk.CONTACTS, h) for h in [*earlier, *hours]}
    total = UpliftCounts()
    for bucket in range(settings.buckets):
        total.add(bucket_uplift_counts(settings, manifests, bucket, periods, hours[0], chunk_rows))
    result["rules"] = counted_rows(total, periods)
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
