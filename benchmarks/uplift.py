"""Benchmark of the run report's uplift (issue 19): CPU and peak memory of ``segments.uplift.uplift`` against the
contacts it reads, and against ``chunk_rows`` (the contacts of a bucket held at once while finding exposure starts).

Reproducible: a simulated lake of contacts and purchases (no real dataset has contact logs), written per bucket
as ``publish_segments`` and ``validate_events`` write them: each hour ``--contacts`` users drawn from
``--users`` are contacted by one of five shipped rules (a fifth of them control), each user buys in an hour with
probability 0.002 x lognormal. The report hour is the last of ``--hours``; the uplift reads its window (a week
whose purchase windows are over) and up to a cooldown of earlier hours.

Each measurement runs ``uplift(settings, hour, chunk_rows=N)`` in a fresh process (``--package`` puts another
``include/`` first on ``PYTHONPATH``, e.g. an older commit's, to compare) and prints wall and CPU seconds
(user + system of the process) and its peak RSS, with the section's rows' digest so runs can be compared
(``--whole``: contacts written an hour in one partition, as before per-bucket publishing):

    .venv/bin/python benchmarks/uplift.py --work /tmp/uplift --users 400000 --contacts 16000 --hours 400 \\
        --buckets 1 --chunk-rows 0,1000000,250000 --runs 3

``--chunk-rows 0`` passes no ``chunk_rows`` (the package's default; an older package has no such argument).
Results: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
END = datetime(2026, 11, 20, 12, tzinfo=UTC)
RULES = (
    ("high_intent", "coupon_10pct"),
    ("cart_abandon", "cart_reminder"),
    ("vip", "vip_care"),
    ("win_back", "win_back_offer"),
    ("welcome", "welcome_mail"),
)


def build_lake(work: Path, users: int, contacts: int, hours: int, buckets: int, whole: bool = False) -> Path:
    """Write the lake once (reused when ``sizes.json`` matches); returns its root. ``whole``: each hour's contacts
    in one partition, as code before per-bucket publishing wrote them."""
    import numpy as np
    import pyarrow as pa

    from profile_engine.lake import storage as lk
    from profile_engine.model.labels import users_by_bucket

    root = work / "lake"
    sizes = {"users": users, "contacts": contacts, "hours": hours, "buckets": buckets, "whole": whole}
    stamp = work / "sizes.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == sizes:
        return root
    lake = lk.Lake(root)
    rng = np.random.default_rng(19)
    ids = np.array([f"user{i:08d}" for i in range(users)], dtype=object)
    bucket_of = np.zeros(users, dtype=np.int64)
    index = {u: i for i, u in enumerate(ids)}
    for b, members in users_by_bucket(list(ids), buckets).items():
        bucket_of[[index[u] for u in members]] = b
    control = rng.random(users) < 0.2
    propensity = 0.002 * rng.lognormal(0.0, 1.0, users)
    hour_type = pa.timestamp("ms", tz="UTC")
    for k in range(hours):
        hour = END - (hours - 1 - k) * timedelta(hours=1)
        chosen = np.sort(rng.choice(users, size=contacts, replace=False))
        rule = rng.integers(0, len(RULES), size=contacts)
        bought = np.flatnonzero(rng.random(users) < propensity)
        minutes = rng.integers(0, 60, size=len(bought))

        def contact_rows(mine: np.ndarray, picks: np.ndarray, hour: datetime = hour) -> pa.Table:
            return pa.table(
                {
                    "user_id": pa.array(ids[mine], pa.string()),
                    "action": pa.array(
                        ["control" if c else RULES[r][1] for c, r in zip(control[mine], picks, strict=True)],
                        pa.string(),
                    ),
                    "rule": pa.array([RULES[r][0] for r in picks], pa.string()),
                    "hour": pa.array([hour] * len(mine), hour_type),
                }
            )

        if whole:
            lake.write_partition(lk.CONTACTS, hour, contact_rows(chosen, rule))
        for b in range(buckets):
            if not whole:
                in_bucket = bucket_of[chosen] == b
                lake.write_partition(lk.CONTACTS, hour, contact_rows(chosen[in_bucket], rule[in_bucket]), bucket=b)
            buyers = bought[bucket_of[bought] == b]
            staged = {
                "user_id": pa.array(ids[buyers], pa.string()),
                "event_type": pa.array(["purchase"] * len(buyers), pa.string()),
                "ts": pa.array(
                    [hour + int(m) * timedelta(minutes=1) for m in minutes[bucket_of[bought] == b]], hour_type
                ),
            }
            lake.write_partition(lk.STAGING, hour, pa.table(staged), bucket=b)
        if not whole:
            lk.write_json(
                lake.partition(lk.CONTACTS, hour) / lk.MANIFEST,
                {"layer": lk.CONTACTS, "buckets": list(range(buckets)), "bucket_count": buckets},
            )
        if k % 50 == 0:
            print(f"lake: hour {k + 1}/{hours}", file=sys.stderr, flush=True)
    stamp.write_text(json.dumps(sizes))
    return root


def measure(lake: Path, buckets: int, chunk_rows: int) -> dict[str, object]:
    """In this process: ``uplift`` of the lake's last hour; seconds, peak RSS and a digest of its rows."""
    from profile_engine.config import Settings
    from profile_engine.segments.uplift import uplift

    settings = Settings(lake=lake, buckets=buckets)
    started, cpu = time.perf_counter(), os.times()
    result = uplift(settings, END, chunk_rows=chunk_rows) if chunk_rows else uplift(settings, END)
    after = os.times()
    rows = json.dumps(result["rules"], sort_keys=True)
    return {
        "wall_s": round(time.perf_counter() - started, 2),
        "cpu_s": round(after.user + after.system - cpu.user - cpu.system, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "contact_hours": result["contact_hours"],
        "rules": len(result["rules"]),
        "digest": hashlib.sha256(rows.encode()).hexdigest()[:16],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="where the simulated lake is written (reused)")
    parser.add_argument("--users", type=int, default=400_000)
    parser.add_argument("--contacts", type=int, default=16_000, help="contacts an hour")
    parser.add_argument("--hours", type=int, default=400)
    parser.add_argument("--buckets", type=int, default=1)
    parser.add_argument("--whole", action="store_true", help="contacts of an hour in one partition (older code)")
    parser.add_argument("--chunk-rows", default="0", help="comma-separated chunk_rows values (0: the default)")
    parser.add_argument("--package", type=Path, help="an include/ tree to measure instead of this checkout's")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.work / "lake", args.buckets, args.child)))
        return 0
    build_lake(args.work, args.users, args.contacts, args.hours, args.buckets, args.whole)
    include = str((args.package or ROOT / "include").resolve())
    env = {**os.environ, "PYTHONPATH": include}
    base = [sys.executable, __file__, "--work", str(args.work), "--buckets", str(args.buckets)]
    results: dict[int, list[dict[str, object]]] = {}
    chunks = [int(c) for c in args.chunk_rows.split(",")]
    for _ in range(args.runs):
        for chunk in chunks:  # alternately, each run in a fresh process
            out = subprocess.run([*base, "--child", str(chunk)], env=env, check=True, capture_output=True, text=True)
            results.setdefault(chunk, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"chunk_rows={chunk}: {results[chunk][-1]} load={os.getloadavg()[0]:.2f}", flush=True)
    print(
        f"\n{include}, {args.users} users, {args.contacts} contacts an hour, {args.hours} hours, {args.buckets} buckets"
    )
    print("| chunk_rows | wall s | CPU s | peak RSS MB | digests |")
    print("|---|---|---|---|---|")
    for chunk, runs in results.items():
        med = {k: statistics.median(float(r[k]) for r in runs) for k in ("wall_s", "cpu_s", "peak_rss_mb")}  # type: ignore[arg-type]
        digests = sorted({str(r["digest"]) for r in runs})
        label = chunk or "default"
        print(
            f"| {label} | {med['wall_s']:.2f} | {med['cpu_s']:.2f} | {med['peak_rss_mb']:,.0f} | {', '.join(digests)} |"
        )
    return 0


if __name__ == "__main__":
    if "--child" not in sys.argv:  # a child imports the package from PYTHONPATH (``--package``)
        sys.path.insert(0, str(ROOT / "include"))
    raise SystemExit(main())
