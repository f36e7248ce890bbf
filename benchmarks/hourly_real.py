"""The hourly path on a real public event log, checked hour by hour against rebuilds (issue 19).

Lands FILE through a shipped mapping by event hour, processes the hours before ``--cut`` in bulk
(``runner.warm_up``, as ``replay`` does), then runs every hour from ``--cut`` to ``--until`` (default:
the file's last hour) through the hour runner, as the hourly DAG does, with every bucket's snapshot
started from the hour before whenever it can (``PROFILE_ENGINE_SNAPSHOT_FROM_PREVIOUS_MIN_USERS`` = 0, so
even small buckets take that path; ``snapshot.MOST_CHANGED`` stays the shipped rule). Then
``verify --hour CUT --to UNTIL`` rebuilds every one of those hours from staged events and compares it
with the committed snapshot, and ``verify --hour UNTIL`` alone is timed for comparison.

Reports, as JSON: the hours and events, the bucket-hours whose snapshot started from the hour before
(and in how many of them more than ``MOST_CHANGED`` of the users had changed, so every row was computed),
the users computed from the state against the users of those snapshots (``build_profiles``' summary), the seconds of the hourly runs,
of the range verification and of one hour's, and every hour that differs (none expected).

Usage (from the repository root; the public datasets: UCI "Online Retail", archive.ics.uci.edu dataset
352; Taobao "UserBehavior", Alibaba Tianchi dataset 649)::

    PYTHONPATH=include .venv/bin/python benchmarks/hourly_real.py online-retail-dataset.csv \\
        --mapping order_lines --dataset "UCI Online Retail" --business-tz Europe/London \\
        --since 2011-11-06 --cut 2011-12-06T00 --until 2011-12-07T12 --buckets 4 --lateness-hours 24
    PYTHONPATH=include .venv/bin/python benchmarks/hourly_real.py UserBehavior_tail.csv \\
        --mapping taobao --dataset "Taobao UserBehavior (Tianchi 649), tail" --business-tz Asia/Shanghai \\
        --cut 2017-12-02T00 --buckets 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from profile_engine.config import Settings
from profile_engine.hours import format_hour, hour_range, parse_hour
from profile_engine.ops import runner
from profile_engine.ops.progress import Progress
from profile_engine.profiles.verify import verify_hour, verify_hours
from profile_engine.sources import mappings
from profile_engine.sources import replay as source_replay

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_real import filtered_csv  # noqa: E402  the same --since filter as the model benchmark


def run(args: argparse.Namespace) -> dict[str, Any]:
    lake = Path(args.lake or tempfile.mkdtemp(prefix="hourly-real-")) / "lake"
    settings = replace(
        Settings.from_env({}),
        lake=lake,
        buckets=args.buckets,
        business_tz=args.business_tz,
        lateness_hours=args.lateness_hours,
        snapshot_from_previous_min_users=0,
    )
    file = Path(args.file)
    if args.since:
        file = filtered_csv(file, args.date_column, args.since, {}, lake.parent)
    plan = source_replay.land_for_replay(settings, file, mappings.load_mapping(args.mapping, settings.lake))
    cut = parse_hour(args.cut)
    until = min(parse_hour(args.until), plan.last) if args.until else plan.last
    if not plan.first < cut <= until:
        raise SystemExit(
            f"--cut {format_hour(cut)} must be after {format_hour(plan.first)} and at most {format_hour(until)}"
        )
    settings = replace(settings, start=plan.first)
    started = time.perf_counter()
    before = len(list(hour_range(plan.first, cut - timedelta(hours=1))))
    progress = Progress("hourly-real, the hours before the cut", before)
    try:
        bulk = runner.warm_up(
            settings,
            plan.first,
            cut - timedelta(hours=1),
            run_id="hourly-real",
            enforce_threshold=False,
            progress=progress,
        )
    finally:
        progress.close()
    bulk_s = time.perf_counter() - started
    print(f"[hourly-real] {bulk['hours']} hours before the cut in bulk in {bulk_s:.1f} s", file=sys.stderr, flush=True)

    built: list[dict[str, Any]] = []  # every bucket-hour's build_profiles summary
    hours = list(hour_range(cut, until))
    read = 0
    started = time.perf_counter()
    for i, hour in enumerate(hours, 1):
        summary = runner.run_hour(settings, hour, first_hour=plan.first)
        read += summary["write_run_report"].get("rows_read") or 0
        built += summary["build_profiles"]
        print(f"[hourly-real] hour {format_hour(hour)} done ({i}/{len(hours)})", file=sys.stderr, flush=True)
    hourly_s = time.perf_counter() - started
    seen = [b for b in built if b["snapshot_from_previous_hour"]]

    started = time.perf_counter()
    results = verify_hours(settings, cut, until)
    range_s = time.perf_counter() - started
    started = time.perf_counter()
    alone = verify_hour(settings, until)
    alone_s = time.perf_counter() - started
    return {
        "dataset": args.dataset,
        "file": str(args.file),
        "mapping": args.mapping,
        "buckets": args.buckets,
        "bulk": {
            "first": format_hour(plan.first),
            "hours": bulk["hours"],
            "staged": bulk["staged"],
            "s": round(bulk_s, 1),
        },
        "hourly": {
            "first": format_hour(cut),
            "last": format_hour(until),
            "hours": len(hours),
            "rows_read": read,
            "s": round(hourly_s, 1),
            "bucket_hours": len(hours) * args.buckets,
            "from_the_hour_before": len(seen),
            "every_row_computed": sum(b["users_from_state"] == b["users"] for b in seen),
            "users_computed": sum(b["users_from_state"] for b in seen),
            "users": sum(b["users"] for b in seen),
        },
        "verify": {
            "hours": len(results),
            "equal": sum(r.equal for r in results),
            "different": [r.render() for r in results if not r.equal],
            "range_s": round(range_s, 1),
            "one_hour_s": round(alone_s, 1),
            "one_hour_equal": alone.equal,
        },
        "lake": str(lake),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="the event log (CSV)")
    parser.add_argument("--mapping", required=True, help="a shipped mapping name (taobao, order_lines, ...)")
    parser.add_argument("--dataset", required=True, help="the public dataset's name, printed with the results")
    parser.add_argument("--cut", required=True, help="the first hour run through the hour runner (UTC)")
    parser.add_argument("--until", help="the last hour run (default: the file's last hour)")
    parser.add_argument("--since", help="keep rows whose --date-column is at or after this ISO date (CSV with header)")
    parser.add_argument("--date-column", default="InvoiceDate")
    parser.add_argument("--buckets", type=int, default=1)
    parser.add_argument("--business-tz", default="UTC")
    parser.add_argument("--lateness-hours", type=int, default=24)
    parser.add_argument("--lake", help="work folder (default: a new temporary one, kept)")
    parser.add_argument("--out", help="also write the JSON result here")
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0 if result["verify"]["equal"] == result["verify"]["hours"] and result["verify"]["one_hour_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
