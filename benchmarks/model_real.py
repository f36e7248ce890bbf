"""The model, its baseline and the heuristics on a real public event log (issue "the model and the segments on real data").

Replays FILE through a shipped mapping into a fresh lake (daily snapshots), then for every
snapshot hour in order: trains a challenger (forced), runs the gate, scores every bucket, and
reads the hour's scores as the segments see them. For each trained version it reports, on its
out-of-time evaluation rows (the same rows for every scorer): AUC, ECE and the share of users
in decile 10 for the calibrated model, the baseline and the two heuristics, the gate's decision,
and for every scored hour which model scored it and the share of users in decile 10.

Runs against whatever ``profile_engine`` is first on the path, so the same script measures
the code before and after a change (the heuristics need the newer package).

Usage (from the repository root)::

    PYTHONPATH=include .venv/bin/python benchmarks/model_real.py FILE --mapping taobao \\
        --dataset "Taobao UserBehavior (Tianchi 649), tail" --horizon-hours 24 --business-tz Asia/Shanghai

The replay uses a lateness of 2,000 hours so a long file is replayed whole; training and the
gate then use a lateness of 1 hour (every event of a replay is staged in its own hour).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from profile_engine import evaluate, labels, model, runner
from profile_engine.config import Settings
from profile_engine.features import CATEGORICAL_FEATURES, NUMERIC_FEATURES, USER_ID
from profile_engine.hours import format_hour
from profile_engine.lake import SCORES, Lake


def _filtered(file: Path, column: str, since: str, scratch: Path) -> Path:
    """A copy of a CSV with a header, keeping rows whose ``column`` (ISO date text) is at or after ``since``."""
    out = scratch / f"since-{since}-{file.name}"
    with file.open(newline="", encoding="utf-8") as source, out.open("w", newline="", encoding="utf-8") as target:
        reader = csv.reader(source)
        writer = csv.writer(target, lineterminator="\n")
        header = next(reader)
        writer.writerow(header)
        at = header.index(column)
        writer.writerows(row for row in reader if row[at] >= since)
    return out


def _deciles(scores: np.ndarray, users: Any, loaded: Any) -> np.ndarray:
    """Deciles as the package under test assigns them (population ranks, or stored training cut points)."""
    if hasattr(model, "population_deciles"):
        return np.asarray(model.population_deciles(users, scores))
    return np.asarray(model.assign_deciles(scores, loaded.cut_points))


def _scorers(settings: Settings, version: str, rows: Any) -> dict[str, np.ndarray]:
    out = {
        "model": model.load_model(settings, version, "model").predict(rows),
        "baseline": model.load_model(settings, version, "baseline").predict(rows),
    }
    for name in getattr(model, "HEURISTICS", {}):
        out[f"heuristic_{name}"] = model.heuristic_scores(rows, name)
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    lake_dir = Path(args.lake or tempfile.mkdtemp(prefix="model-real-"))
    file = Path(args.file)
    if args.since:
        file = _filtered(file, args.date_column, args.since, lake_dir.parent)
    settings = Settings(
        lake=lake_dir / "lake",
        lateness_hours=2000,
        label_horizon_hours=args.horizon_hours,
        retrain_every_hours=24,
        business_tz=args.business_tz,
        seed=7,
    )
    started = time.perf_counter()
    replayed = runner.replay(settings, file, args.mapping, quality_suite=False)
    replay_s = time.perf_counter() - started
    settings = replace(settings, lateness_hours=1)
    lake = Lake(settings.lake)
    snapshots = labels.committed_profile_hours(lake)
    config = labels.TrainingConfig(min_train_rows=args.min_train_rows, min_positives=args.min_positives)
    versions: list[dict[str, Any]] = []
    hours: list[dict[str, Any]] = []
    for hour in snapshots:
        trained = model.train_version(
            settings, hour, NUMERIC_FEATURES, CATEGORICAL_FEATURES, training_config=config, run_id="model-real"
        )
        if trained["status"] == "trained":
            version = trained["version"]
            decision = evaluate.evaluate_and_promote(settings, hour, run_id="model-real", n_boot=args.n_boot)
            _, rows, training = labels.read_training_set(settings, version)
            y = np.asarray(rows.column(labels.LABEL), dtype=np.float64)
            per_scorer = {}
            for name, p in _scorers(settings, version, rows).items():
                loaded = model.load_model(settings, version, "baseline" if name == "baseline" else "model")
                deciles = _deciles(p, rows.column(USER_ID), loaded)
                per_scorer[name] = {
                    "auc": round(evaluate.auc(y, p), 4),
                    "ece": None if name.startswith("heuristic_") else round(evaluate.ece(y, p), 4),
                    "mean_score": None if name.startswith("heuristic_") else round(float(np.mean(p)), 4),
                    "decile_10_share": round(float(np.mean(deciles == 10)), 4),
                }
            versions.append(
                {
                    "version": version,
                    "train_snapshots": len(training["train_snapshots"]),
                    "reconstructed_snapshots": len(training.get("snapshots_reconstructed", [])),
                    "train_rows": training["train_rows"],
                    "train_positives": training["train_positives"],
                    "eval_rows": int(y.size),
                    "eval_positives": int(y.sum()),
                    "base_rate": round(float(y.mean()), 4),
                    "status": decision["status"],
                    "reference": decision.get("reference"),
                    "reasons": decision.get("reasons"),
                    "scorers": per_scorer,
                }
            )
        scored = [model.score_profiles(settings, hour, b, run_id="model-real") for b in range(settings.buckets)]
        table = model.read_scores(lake, hour) if hasattr(model, "read_scores") else lake.read(SCORES, hour)
        deciles = table.column(model.DECILE)
        propensity = table.column(model.PROPENSITY)
        hours.append(
            {
                "hour": format_hour(hour),
                "model": scored[0]["model"],
                "model_version": scored[0][model.MODEL_VERSION],
                "users": table.num_rows,
                "decile_10_share": round(float(pc.mean(pc.cast(pc.equal(deciles, 10), "float64")).as_py() or 0.0), 4),
                "mean_propensity": None
                if propensity.null_count == table.num_rows
                else round(pc.mean(propensity).as_py(), 4),
            }
        )
    return {
        "dataset": args.dataset,
        "file": str(args.file),
        "since": args.since,
        "mapping": args.mapping,
        "label_horizon_hours": args.horizon_hours,
        "events_staged": replayed.get("staged"),
        "snapshots": len(snapshots),
        "replay_seconds": round(replay_s, 1),
        "promoted": [v["version"] for v in versions if v["status"] == "promoted"],
        "versions": versions,
        "hours": hours,
        "measured_at": datetime.now().isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", help="the event log (CSV)")
    parser.add_argument("--mapping", required=True, help="a shipped mapping name (taobao, order_lines, ...)")
    parser.add_argument("--dataset", required=True, help="the public dataset's name, printed with the results")
    parser.add_argument("--horizon-hours", type=int, default=24, help="label horizon (24: next day, 168: 7 days)")
    parser.add_argument("--business-tz", default="UTC")
    parser.add_argument("--since", help="keep rows whose --date-column is at or after this ISO date (CSV with header)")
    parser.add_argument("--date-column", default="InvoiceDate")
    parser.add_argument("--min-train-rows", type=int, default=50)
    parser.add_argument("--min-positives", type=int, default=5)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--lake", help="working directory (default: a new temporary one)")
    parser.add_argument("--out", help="write the JSON result here as well")
    args = parser.parse_args(argv)
    result = measure(args)
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
