"""Cost and size of ``labels.build_training_set`` by stride, on a lake whose history was warmed up in bulk.

A simulated shop (``--users`` users, ``--days`` days, the demo's intensity) is landed,
extracted, validated and built with ``runner.warm_up``, which commits one snapshot a day
(what replays and the demo's history do). Then, for each ``--strides`` value, a training
set is built at the last hour (``PROFILE_ENGINE_TRAINING_STRIDE_HOURS``: 0 = committed
snapshots only, k = also every reproducible hour whose end is a multiple of k hours) and the
script reports the snapshots (read, reconstructed), rows, positives and the seconds spent
drawing the rows (reconstruction included) and in the whole build (leakage check included).

    PYTHONPATH=include .venv/bin/python benchmarks/training_set.py --users 2000 --days 30
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from profile_engine.config import Settings
from profile_engine.hours import HOUR, format_hour
from profile_engine.lake.storage import MANIFEST, TRAINING, Lake, read_json
from profile_engine.model import labels
from profile_engine.ops import runner
from profile_engine.ops.demo import DEMO_INTENSITY
from profile_engine.sources.simulate import simulate

FIRST = datetime(2026, 10, 1, tzinfo=UTC)


def build_lake(work: Path, users: int, days: int) -> tuple[Settings, datetime]:
    """A warmed-up lake (daily snapshots) of ``days`` days, reused when ``work`` already holds it."""
    last = FIRST + timedelta(days=days) - HOUR
    settings = Settings(lake=work / "lake", start=FIRST, label_horizon_hours=24, seed=7)
    marker = work / "built.json"
    if not marker.is_file():
        simulate(Lake(settings.lake), FIRST, last, users=users, seed=7, origin=FIRST, intensity=DEMO_INTENSITY)
        started = time.perf_counter()
        runner.warm_up(settings, FIRST, last)
        marker.write_text(json.dumps({"users": users, "days": days, "warm_up_s": time.perf_counter() - started}))
    return settings, last


def measure(settings: Settings, hour: datetime, strides: list[int]) -> list[dict[str, Any]]:
    out = []
    for stride in strides:
        config = labels.TrainingConfig(stride_hours=stride)
        version = f"bench-stride-{stride}"
        started = time.perf_counter()
        built = labels.build_training_set(settings, hour, version, config=config, run_id="bench")
        seconds = time.perf_counter() - started
        manifest = read_json(Lake(settings.lake).path(TRAINING, version) / MANIFEST)
        out.append(
            {
                "stride_hours": stride,
                "candidates": len(labels.training_hours(settings, stride)[0]),
                "train_snapshots": len(built.train_snapshots),
                "read": len(manifest["snapshots_read"]),
                "reconstructed": len(manifest["snapshots_reconstructed"]),
                "train_rows": built.train.num_rows,
                "train_positives": labels.positives(built.train),
                "eval_rows": built.eval.num_rows,
                "eval_positives": labels.positives(built.eval),
                "eval_snapshot": format_hour(built.eval_snapshot),
                "drawing_s": manifest["drawing_seconds"],
                "build_s": round(seconds, 2),
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--strides", default="0,24,6,1", help="comma-separated strides to measure")
    parser.add_argument("--work", help="working directory, reused between runs (default: a new temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="training-set-"))
    work.mkdir(parents=True, exist_ok=True)
    settings, last = build_lake(work, args.users, args.days)
    strides = [int(s) for s in args.strides.split(",")]
    results = measure(settings, last, strides)
    print(json.dumps({"users": args.users, "days": args.days, "hour": format_hour(last), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
