"""The behaviour-sequence encoder against the aggregate network on a real public event log (issue "the model and
the segments on real data", item 4).

Replays FILE through a shipped mapping into a fresh lake (daily snapshots), then at every snapshot hour builds
the training set the way the pipeline does (``labels.build_training_set``: out-of-time evaluation snapshot,
newest training snapshot as the validation slice) and fits, on the same rows:

- ``network``: the aggregate network of ``trainer.fit_models`` (calibrated), and its ``baseline``;
- ``sequence``: the sequence encoder alone (``sequence.train_sequence``, last N staged events);
- ``combined``: the encoder concatenated with the aggregate network's normalised inputs.

Each is scored on the version's evaluation rows; the report gives, per version and pooled over every version
(rolling-origin evaluation: each row scored by the models trained at its version's hour), AUC, PR AUC, log
loss, ECE and lift at 10% with 95% paired bootstrap intervals (``metrics.metrics`` and
``metrics.bootstrap_intervals``), plus the intervals of the differences ``sequence - network``,
``combined - network`` and ``combined - sequence``.

Usage (from the repository root)::

    PYTHONPATH=include .venv/bin/python benchmarks/sequence_model.py \\
        /work/shared/data/taobao-userbehavior-tail/UserBehavior_tail.csv --mapping taobao \\
        --dataset "Taobao UserBehavior (Tianchi 649), tail" --horizon-hours 24 --business-tz Asia/Shanghai

The replay uses a lateness of 2,000 hours so a long file is replayed whole; training then uses a lateness of
1 hour (every event of a replay is staged in its own hour), as ``benchmarks/model_real.py`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from model_real import (  # the same replay and arguments (benchmarks/ is on the path)
    common_arguments,
    emit_json,
    replay_once,
)

from profile_engine.config import Settings
from profile_engine.contracts.profiles import CATEGORICAL_FEATURES, NUMERIC_FEATURES
from profile_engine.hours import format_hour
from profile_engine.lake.storage import Lake
from profile_engine.model import calibration as calibrate
from profile_engine.model import inputs, labels, metrics, network, sequence
from profile_engine.model import training as trainer

REPORTED = ("auc", "pr_auc", "log_loss", "ece", "lift_at_10")
SCORERS = ("network", "baseline", "sequence", "combined")
DIFFERENCES = (("sequence", "network"), ("combined", "network"), ("combined", "sequence"))


def _fit_and_score(settings: Settings, training: labels.TrainingSet, config: sequence.SequenceConfig) -> dict[str, Any]:
    """Fit the four scorers on ``training.train`` and score ``training.eval``; scores, seconds and epochs."""
    train, rows = training.train, training.eval
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    fitted = trainer.fit_models(train, NUMERIC_FEATURES, CATEGORICAL_FEATURES, seed=settings.seed)
    seconds["network+baseline"] = time.perf_counter() - started
    eval_in = inputs.model_inputs(rows, fitted.numeric, fitted.categorical)
    scores = {
        "network": calibrate.apply_calibration(network.predict_network(fitted.model, eval_in), fitted.calibration),
        "baseline": calibrate.apply_calibration(
            network.predict_network(fitted.baseline, eval_in), fitted.baseline_calibration
        ),
    }
    started = time.perf_counter()
    train_seq = sequence.sequence_inputs(settings, train, config)
    eval_seq = sequence.sequence_inputs(settings, rows, config)
    seconds["sequence_inputs"] = time.perf_counter() - started
    epochs = dict(fitted.report["epochs"])
    calibration: dict[str, Any] = {"network": calibrate.calibration_note(fitted.calibration)}
    for kind in sequence.KINDS:
        started = time.perf_counter()
        encoder = sequence.train_sequence(
            settings,
            train,
            rows,
            kind=kind,
            numeric=NUMERIC_FEATURES,
            categorical=CATEGORICAL_FEATURES,
            config=config,
            sequences=train_seq,
        )
        seconds[kind] = time.perf_counter() - started
        scores[kind] = encoder.predict(rows, eval_seq)
        epochs[kind] = encoder.report["epochs"]
        calibration[kind] = calibrate.calibration_note(encoder.calibration)
    events = eval_seq.mask.sum(axis=1)
    return {
        "scores": scores,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "epochs": epochs,
        "calibration_notes": {k: v for k, v in calibration.items() if v},
        "eval_events_per_row": {"median": float(np.median(events)), "full": float(np.mean(events == config.length))},
    }


def _table(y: np.ndarray, scores: dict[str, np.ndarray], n_boot: int, seed: int) -> dict[str, Any]:
    """Metrics with 95% paired bootstrap intervals of every scorer and of the differences, on the same rows."""
    intervals = metrics.bootstrap_intervals(y, scores, n_boot=n_boot, seed=seed, differences=DIFFERENCES)
    out: dict[str, Any] = {}
    for name, p in scores.items():
        values = metrics.metrics(y, p)
        out[name] = {k: [round(values[k], 4), *(round(v, 4) for v in intervals[name][k])] for k in REPORTED}
    for a, b in DIFFERENCES:
        pa_, pb = metrics.metrics(y, scores[a]), metrics.metrics(y, scores[b])
        key = f"{a} - {b}"
        out[key] = {k: [round(pa_[k] - pb[k], 4), *(round(v, 4) for v in intervals[key][k])] for k in REPORTED}
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.lake or tempfile.mkdtemp(prefix="sequence-model-"))
    settings = Settings(
        lake=work / "lake",
        lateness_hours=2000,
        label_horizon_hours=args.horizon_hours,
        retrain_every_hours=24,
        business_tz=args.business_tz,
        seed=7,
    )
    replay_s, replayed = replay_once(settings, args, work)
    settings = replace(settings, lateness_hours=1)
    snapshots = labels.committed_profile_hours(Lake(settings.lake))
    config = sequence.SequenceConfig(length=args.length)
    training_config = labels.TrainingConfig(
        min_train_rows=args.min_train_rows, min_positives=args.min_positives, max_rows=args.max_rows
    )
    versions: list[dict[str, Any]] = []
    pooled_y: list[np.ndarray] = []
    pooled: dict[str, list[np.ndarray]] = {name: [] for name in SCORERS}
    for hour in snapshots[-args.versions :] if args.versions else snapshots:
        version = f"seq{hour:%Y%m%dT%H}"
        try:
            training = labels.build_training_set(settings, hour, version, config=training_config, run_id="seq")
            fitted = _fit_and_score(settings, training, config)
        except labels.InsufficientData as reason:
            versions.append({"hour": format_hour(hour), "skipped": str(reason)})
            continue
        y = np.asarray(training.eval.column(labels.LABEL), dtype=np.float64)
        pooled_y.append(y)
        for name in SCORERS:
            pooled[name].append(fitted["scores"][name])
        versions.append(
            {
                **training.summary(),
                "training_hour": format_hour(hour),
                "seconds": fitted["seconds"],
                "epochs": fitted["epochs"],
                "calibration_notes": fitted["calibration_notes"],
                "eval_events_per_row": fitted["eval_events_per_row"],
                "metrics": _table(y, fitted["scores"], args.n_boot, settings.seed),
            }
        )
        print(f"{format_hour(hour)}: {json.dumps(versions[-1]['metrics']['combined - network'])}", file=sys.stderr)
    result: dict[str, Any] = {
        "dataset": args.dataset,
        "file": str(args.file),
        "since": args.since,
        "mapping": args.mapping,
        "label_horizon_hours": args.horizon_hours,
        "sequence_length": args.length,
        "events_staged": replayed.get("staged"),
        "snapshots": len(snapshots),
        "replay_seconds": replay_s,
        "versions": versions,
        "measured_at": datetime.now().isoformat(timespec="seconds"),
    }
    if pooled_y:
        y = np.concatenate(pooled_y)
        result["pooled"] = {
            "rows": int(y.size),
            "positives": int(y.sum()),
            "versions": len(pooled_y),
            "metrics": _table(y, {k: np.concatenate(v) for k, v in pooled.items()}, args.n_boot, settings.seed),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--length", type=int, default=50, help="events per sequence (the last N before the cutoff)")
    parser.add_argument("--versions", type=int, default=0, help="train only at the newest K snapshot hours (0: all)")
    parser.add_argument("--max-rows", type=int, default=200_000)
    args = parser.parse_args(argv)
    result = measure(args)
    emit_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
