"""Next-day purchase on a real behaviour log: do the funnel features of the profile help?

Replays an event log (for example the public Taobao/Tianchi "UserBehavior" log, dataset
649 of Alibaba Tianchi: views, carts, favourites and purchases, mapping ``taobao``) into a
temporary lake through the project's own path (``runner.replay``: landing, validation,
staging, profiles). At every local midnight of the business time zone (except the last
day, which has no next day) it rebuilds the profile snapshot from the staged events
(``replay.rebuild_bucket`` + ``snapshot`` + population features, the path ``verify``
checks against the hourly one) and labels each profiled user 1 when the log holds a
purchase of that user in the next 24 hours among the staged events (the file's rows
through the mapping; the script prints how many file rows were staged, so a quarantined
row would show).

For each of the last ``--test-days`` snapshots it prints the ROC AUC of:

* every funnel column alone (``features.FUNNEL_COLUMNS``; hours-since columns negated,
  nulls scored lowest);
* the rule "an item carted in the last 24 h and not bought (``open_cart_items_24h > 0``),
  then the number of past orders" (lexicographic);
* ``-hours_since_last_event``;
* an L2-regularised logistic regression (numpy, Newton steps) trained on all earlier
  snapshots, on the numeric profile columns without the funnel columns ("old") and with
  them ("old+new"). Inputs are ``sign(x) log(1 + |x|)``, nulls replaced by the training
  median plus a missing indicator, standardised on the training rows.

    PROFILE_ENGINE_TZ=Asia/Shanghai PROFILE_ENGINE_LATENESS_HOURS=2000 \\
        .venv/bin/python benchmarks/funnel_features.py UserBehavior_tail.csv --mapping taobao

``PROFILE_ENGINE_*`` settings come from the environment (``Settings.from_env``); the lake is
always a temporary folder (``--keep`` keeps it). Nothing is appended to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.ops import runner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "include"))

from profile_engine.config import Settings  # noqa: E402
from profile_engine.contracts.events import PURCHASE  # noqa: E402
from profile_engine.contracts.profiles import (  # noqa: E402
    FREQUENCY_ORDERS,
    FUNNEL_COLUMNS,
    HOURS_SINCE_LAST_EVENT,
    NUMERIC_FEATURES,
    RECENCY_HOURS,
    USER_ID,
    open_items_column,
)
from profile_engine.contracts.traits import load_traits  # noqa: E402
from profile_engine.hours import HOUR, format_hour, parse_hour  # noqa: E402
from profile_engine.lake.db import cursor as connect  # noqa: E402
from profile_engine.lake.storage import STAGING, Lake  # noqa: E402
from profile_engine.model.metrics import auc  # noqa: E402
from profile_engine.profiles.population import population_snapshot  # noqa: E402
from profile_engine.profiles.replay import rebuild_bucket  # noqa: E402
from profile_engine.profiles.snapshot import snapshot  # noqa: E402
from profile_engine.sources import mappings as sources  # noqa: E402

HORIZON = timedelta(hours=24)


def snapshot_table(settings: Settings, end: datetime) -> pa.Table:
    """The whole profile snapshot ending at ``end``, rebuilt from the lake's staged events."""
    hour = end - HOUR
    parts = []
    for bucket in range(settings.buckets):
        _, state = rebuild_bucket(settings, hour, bucket)
        parts.append(snapshot(state, end, settings)[0])
    return population_snapshot(parts, hour, load_traits(settings.traits))


def staged_events(settings: Settings) -> pa.Table:
    """Every staged event (user, type, ts) in the lake: the labels' source."""
    lake = Lake(settings.lake)
    files = sorted(str(p) for p in lake.path(STAGING).glob("dt=*/hour=*/bucket=*/*.parquet"))
    con = connect()
    try:
        listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        return con.sql(f"SELECT user_id, event_type, ts FROM read_parquet([{listed}])").to_arrow_table()
    finally:
        con.close()


def labels_for(users: pa.Array, bought: pa.Table, end: datetime) -> np.ndarray:
    """1 for users with a purchase in ``[end, end + 24 h)``."""
    ts = bought.column("ts")
    inside = pc.and_(pc.greater_equal(ts, pa.scalar(end, ts.type)), pc.less(ts, pa.scalar(end + HORIZON, ts.type)))
    buyers = pc.unique(bought.filter(inside).column(USER_ID))
    return np.asarray(pc.is_in(users, value_set=buyers).to_numpy(zero_copy_only=False), dtype=bool)


def column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 with NaN for null."""
    return np.asarray(pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def oriented(table: pa.Table, name: str) -> np.ndarray:
    """Score of one column alone: larger = more likely to buy; hours-since negated, nulls lowest."""
    values = column(table, name)
    if name.startswith("hours_since") or name == RECENCY_HOURS:
        values = -values
    return np.where(np.isnan(values), -np.inf, values)


def design(tables: list[pa.Table], names: list[str], reference: dict[str, Any] | None) -> tuple[np.ndarray, dict]:
    """Model matrix (log-compressed, imputed, missing indicators, standardised); fitted on the first call."""
    raw = np.column_stack([np.concatenate([column(t, n) for t in tables]) for n in names])
    x = np.sign(raw) * np.log1p(np.abs(raw))
    missing = np.isnan(x)
    if reference is None:
        medians = np.nan_to_num(np.nanmedian(np.where(missing.all(axis=0), 0.0, x), axis=0))
        flagged = missing.any(axis=0)
        reference = {"medians": medians, "flagged": flagged}
    x = np.where(missing, reference["medians"], x)
    full = np.column_stack([x, missing[:, reference["flagged"]].astype(np.float64)])
    if "mean" not in reference:
        reference["mean"], reference["std"] = full.mean(axis=0), full.std(axis=0)
    std = np.where(reference["std"] > 0, reference["std"], 1.0)
    return (full - reference["mean"]) / std, reference


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """Weights (intercept last) of an L2-penalised logistic regression by Newton steps."""
    xb = np.column_stack([x, np.ones(len(x))])
    w = np.zeros(xb.shape[1])
    penalty = np.full(xb.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ w, -30, 30)))
        gradient = xb.T @ (p - y) + penalty * w
        hessian = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def logistic_auc(
    train: list[pa.Table], y_train: np.ndarray, test: pa.Table, y_test: np.ndarray, names: list[str], l2: float
) -> float:
    x, reference = design(train, names, None)
    w = fit_logistic(x, y_train.astype(np.float64), l2)
    xt, _ = design([test], names, reference)
    return auc(y_test, np.column_stack([xt, np.ones(len(xt))]) @ w)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="the event log")
    parser.add_argument("--mapping", required=True, help="source mapping name or YAML path (e.g. taobao)")
    parser.add_argument("--test-days", type=int, default=2, help="snapshots evaluated (the last local midnights)")
    parser.add_argument(
        "--l2", type=float, nargs="+", default=[1.0, 10.0, 100.0], help="L2 penalties of the logistic regression"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary lake and print its path")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="funnel_features_"))
    settings = replace(Settings.from_env(), lake=work / "lake")
    try:
        sources.load_mapping(args.mapping, settings.lake)  # fails early on an unknown mapping
        replayed = runner.replay(settings, args.file.resolve(), args.mapping, quality_suite=False)
        first, last = parse_hour(str(replayed["first_hour"])), parse_hour(str(replayed["last_hour"])) + HOUR
        staged = staged_events(settings)
        bought = staged.filter(pc.equal(staged.column("event_type"), PURCHASE))
        tz = ZoneInfo(settings.business_tz)
        first_local = first.astimezone(tz)
        midnight = datetime(first_local.year, first_local.month, first_local.day, tzinfo=tz) + timedelta(days=1)
        ends = []
        while midnight + HORIZON <= last:
            ends.append(midnight.astimezone(UTC))
            midnight += timedelta(days=1)
        snapshots = [snapshot_table(settings, e) for e in ends]
        ys = [labels_for(s.column(USER_ID).combine_chunks(), bought, e) for s, e in zip(snapshots, ends, strict=True)]

        old = [n for n in NUMERIC_FEATURES if n not in FUNNEL_COLUMNS]
        new = list(NUMERIC_FEATURES)
        results: dict[str, Any] = {
            "file_rows": replayed["rows"],
            "staged_rows": staged.num_rows,
            "file": str(args.file),
            "mapping": args.mapping,
            "tz": settings.business_tz,
            "snapshots": [],
        }
        for k in range(max(1, len(ends) - args.test_days), len(ends)):
            table, y = snapshots[k], ys[k]
            y_train = np.concatenate(ys[:k])
            rule = np.where(column(table, open_items_column("cart", "24h")) > 0, 1e6, 0.0) + np.nan_to_num(
                column(table, FREQUENCY_ORDERS)
            )
            entry = {
                "snapshot_end": format_hour(ends[k]),
                "users": int(table.num_rows),
                "buyers_next_24h": int(y.sum()),
                "train_rows": int(len(y_train)),
                "train_buyers": int(y_train.sum()),
                "auc": {
                    "rule_open_cart_24h_then_orders": auc(y, rule),
                    "hours_since_last_event": auc(y, oriented(table, HOURS_SINCE_LAST_EVENT)),
                    **{
                        f"logistic_{kind}_l2={l2:g}": logistic_auc(snapshots[:k], y_train, table, y, names, l2)
                        for l2 in args.l2
                        for kind, names in (("old", old), ("old_plus_new", new))
                    },
                    **{f"alone:{n}": auc(y, oriented(table, n)) for n in FUNNEL_COLUMNS},
                },
                "columns": {"old": len(old), "old_plus_new": len(new)},
            }
            results["snapshots"].append(entry)
        text = json.dumps(results, indent=2, default=lambda v: round(v, 4) if isinstance(v, float) else str(v))
        print(text)
        if args.json:
            args.json.write_text(text)
        if args.keep:
            print(f"lake kept at {settings.lake}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
