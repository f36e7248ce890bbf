"""The model, its baseline and the heuristics on a real public event log (issue "the model and the segments on real data").

Replays FILE through a shipped mapping into a lake (daily snapshots), then for the chosen snapshot
hours in order (all by default; ``--every N`` / ``--versions K``: every N-th counted back from the
newest, the newest K of those): trains a challenger (forced), runs the gate, scores every bucket,
and reads the hour's scores as the segments see them. For each trained version it reports, on its
out-of-time evaluation rows (the same rows for every scorer): AUC, PR AUC, log loss, ECE, lift in
the top 10% and 20%, each with a 95% paired bootstrap interval, and the share of users in decile
10, for every candidate of the version (network, ensemble, LightGBM, baseline), the champion it was gated
against (from the second promotion on) and the two heuristics; the gate's decision (which candidate
won and why), the champion before and after, and the seconds of training and gating; and for every
scored hour which model scored it and the share of users in decile 10. ``pooled`` repeats the metrics
over the evaluation rows of every version together (different snapshots, so a summary, not a test set).

Usage (from the repository root)::

    PYTHONPATH=include .venv/bin/python benchmarks/model_real.py FILE --mapping taobao \\
        --dataset "Taobao UserBehavior (Tianchi 649), tail" --horizon-hours 24 --business-tz Asia/Shanghai

    # UCI "Online Retail" through the order_lines mapping (it reads both editions' column names):
    # replay once, then train each horizon in its own copy of the lake
    PYTHONPATH=include .venv/bin/python benchmarks/model_real.py online-retail-dataset.csv \\
        --mapping order_lines --dataset "UCI Online Retail" --business-tz Europe/London \\
        --since 2011-05-01 --replay-lateness-hours 24 --replay-only --lake /tmp/uci
    cp -a /tmp/uci /tmp/uci-168
    PYTHONPATH=include .venv/bin/python benchmarks/model_real.py online-retail-dataset.csv \\
        --mapping order_lines --dataset "UCI Online Retail" --business-tz Europe/London \\
        --horizon-hours 168 --every 1 --versions 7 --min-train-rows 200 --lake /tmp/uci-168 \\
        --out /tmp/uci-168/result.json
    # the pooled tables again from that lake (e.g. after a stop: the .partial.json names the versions done)
    PYTHONPATH=include .venv/bin/python benchmarks/model_real.py online-retail-dataset.csv \\
        --mapping order_lines --dataset "UCI Online Retail" --business-tz Europe/London \\
        --horizon-hours 168 --lake /tmp/uci-168 --out /tmp/uci-168/result.json --pool-only

``--lake`` that already holds a replay is reused (the replay does not depend on the label horizon:
labels are computed at training time from staged events), so one replay serves several horizons;
training writes models and promotions into the lake, hence one copy per horizon. The replay's
lateness (``--replay-lateness-hours``, default 2,000 as the Taobao runs used) only has to cover
the file's stray timestamps: every event lands in its own hour, and validation reads the ledgers
and staged files of that many hours back for every hour, so 2,000 made a six-month replay slow
down as it went (UCI: 0.6 s per hour over the first 10 days, 0.9 s over the next 12, against about
0.3 s with 24 on the same loaded machine); 24 is the pipeline's default. Training and
the gate then use a lateness of 1 hour (every event of a replay is staged in its own hour).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from profile_engine.config import Settings
from profile_engine.contracts.profiles import CATEGORICAL_FEATURES, NUMERIC_FEATURES, USER_ID
from profile_engine.contracts.scores import DECILE, MODEL_VERSION, PROPENSITY
from profile_engine.hours import format_hour
from profile_engine.lake.storage import SCORES, Lake
from profile_engine.model import artifacts, calibration, candidates, labels, metrics, promotion, registry, scoring
from profile_engine.model import training as trainer
from profile_engine.ops import runner


def filtered_csv(file: Path, column: str, since: str, renames: dict[str, str], scratch: Path) -> Path:
    """A copy of a CSV with a header: rows whose ``column`` (ISO date text) is at or after ``since``, header
    columns renamed (e.g. the UCI "Online Retail" names to those of the ``order_lines`` mapping)."""
    scratch.mkdir(parents=True, exist_ok=True)  # ``--lake DIR`` need not exist yet
    out = scratch / f"since-{since}-{file.name}"
    with file.open(newline="", encoding="utf-8") as source, out.open("w", newline="", encoding="utf-8") as target:
        reader = csv.reader(source)
        writer = csv.writer(target, lineterminator="\n")
        header = next(reader)
        at = header.index(column)
        writer.writerow([renames.get(name, name) for name in header])
        writer.writerows(row for row in reader if row[at] >= since)
    return out


def _deciles(scores: np.ndarray, users: Any, loaded: Any) -> np.ndarray:
    """Deciles as the package under test assigns them (population ranks, or stored training cut points)."""
    if hasattr(calibration, "population_deciles"):
        return np.asarray(calibration.population_deciles(users, scores))
    return np.asarray(calibration.assign_deciles(scores, loaded.cut_points))


def _selected(snapshots: list[datetime], versions: int, every: int) -> list[datetime]:
    """The snapshot hours to train at, oldest first: every ``every``-th one counted back from the newest,
    the newest ``versions`` of those (0: all)."""
    chosen = snapshots[::-1][::every]
    return sorted(chosen[:versions] if versions else chosen)


REPORTED = ("auc", "pr_auc", "log_loss", "ece", "lift_at_10", "lift_at_20")


def _scorers(settings: Settings, version: str, rows: Any) -> dict[str, tuple[np.ndarray, Any]]:
    """Every scorer of the version on ``rows``: ``{name: (probabilities or ranks, loaded model or None)}``."""
    out = {c.name: (c.predict(rows), c.model) for c in candidates.version_candidates(settings, version)}
    for name in getattr(scoring, "HEURISTICS", {}):
        out[f"heuristic_{name}"] = (scoring.heuristic_scores(rows, name), None)
    return out


# The pooled scorer "the champion": on each version's rows, the champion after that version's gate.
SERVING = "champion_after_gate"


def _entry(entry: dict[str, Any]) -> str:
    """A promotion log entry as ``<version> <candidate>``."""
    return f"{entry['version']} {candidates.CANDIDATE_NAMES[registry.entry_kind(entry)]}"


def _targets(scorers: dict[str, dict[str, Any]], champion: str | None) -> dict[str, Any] | None:
    """The issue's targets for the champion on these rows (point estimates): ahead of the best heuristic
    and of LightGBM on AUC and lift at 10%, ECE at most 0.05, lift at 10% at least 2."""
    if champion is None or champion not in scorers:
        return None
    mine = scorers[champion]
    heuristics = [v for n, v in scorers.items() if n.startswith("heuristic_")]
    out: dict[str, Any] = {"champion": champion}
    for key in ("auc", "lift_at_10"):
        best = max((h[key][0] for h in heuristics if h.get(key)), default=None)
        out[f"{key}_above_best_heuristic"] = None if best is None else bool(mine[key][0] > best)
        if champion != "lightgbm" and scorers.get("lightgbm", {}).get(key):
            out[f"{key}_above_lightgbm"] = bool(mine[key][0] > scorers["lightgbm"][key][0])
    out["ece_at_most_0.05"] = None if mine.get("ece") is None else bool(mine["ece"][0] <= 0.05)
    out["lift_at_10_at_least_2"] = bool(mine["lift_at_10"][0] >= 2)
    return out


def _pooled_part(settings: Settings, hour: datetime, rows: Any, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A version's scores for pooling: every candidate and heuristic (no ``champion before``) and, where the gate
    left a champion in place, that champion (``SERVING``) on the same rows."""
    out = {name: p for name, p in raw.items() if name != "champion"}
    after = registry.champion_as_of(settings, hour + timedelta(hours=1))
    if after is not None:
        out[SERVING] = artifacts.load_model(settings, after["version"], registry.entry_kind(after)).predict(rows)
    return out


def _pool(parts: list[tuple[np.ndarray, dict[str, np.ndarray]]], n_boot: int) -> dict[str, Any]:
    """The metrics over the rows of every part together, for the scorers every part has."""
    names = [n for n in parts[0][1] if all(n in p for _, p in parts)]
    y = np.concatenate([y for y, _ in parts])
    scores = {n: np.concatenate([p[n] for _, p in parts]) for n in names}
    measured = _with_intervals(y, scores, n_boot)
    out = {"rows": int(y.size), "positives": int(y.sum()), "metrics": measured, "targets": _targets(measured, SERVING)}
    if SERVING in scores:  # the champion against every other scorer on the same resamples (the targets' evidence)
        pairs = [(SERVING, n) for n in names if n != SERVING]
        drawn = metrics.bootstrap_intervals(y, scores, n_boot=n_boot, seed=7, differences=pairs)
        out["champion_minus"] = {
            b: {k: [round(v, 4) for v in drawn[f"{a} - {b}"][k]] for k in ("auc", "lift_at_10")} for a, b in pairs
        }
    return out


def pooled_results(parts: list[tuple[np.ndarray, dict[str, np.ndarray]]], n_boot: int) -> dict[str, Any]:
    """``pooled``: every version's rows; ``pooled_served``, when some version had no champion after its gate
    (before the first promotion): the rows of the versions that had one, with the champion on the same rows."""
    served = [part for part in parts if SERVING in part[1]]
    return {
        "pooled": _pool(parts, n_boot) if parts else None,
        "pooled_served": _pool(served, n_boot) if served and len(served) < len(parts) else None,
    }


def trained_lake_settings(lake_dir: Path, horizon_hours: int, business_tz: str) -> Settings:
    """The settings training and the gate used on the lake of a run in ``lake_dir`` (lateness 1: every
    replayed event is staged in its own hour), to read its versions again."""
    return Settings(
        lake=lake_dir / "lake", lateness_hours=1, label_horizon_hours=horizon_hours, business_tz=business_tz, seed=7
    )


def pool_only(args: argparse.Namespace) -> dict[str, Any]:
    """The pooled blocks recomputed from the lake of a finished (or stopped) run: its ``--out`` JSON (or the
    ``.partial.json``) names the versions; every scorer is loaded again and scored on the version's rows."""
    out = Path(args.out)
    result = json.loads((out if out.is_file() else out.with_suffix(".partial.json")).read_text())
    settings = trained_lake_settings(Path(args.lake), args.horizon_hours, args.business_tz)
    parts = []
    for v in result["versions"]:
        _, rows, _ = labels.read_training_set(settings, v["version"])
        hour = datetime.strptime(v["version"], "v%Y%m%dT%H").replace(tzinfo=UTC)
        raw = {name: p for name, (p, _) in _scorers(settings, v["version"], rows).items()}
        parts.append((np.asarray(rows.column(labels.LABEL), dtype=np.float64), _pooled_part(settings, hour, rows, raw)))
    return {**result, "pool_only": True, **pooled_results(parts, args.n_boot)}


def _with_intervals(y: np.ndarray, scores: dict[str, np.ndarray], n_boot: int) -> dict[str, dict[str, Any]]:
    """``{scorer: {metric: [value, low, high]}}`` on the same rows (paired bootstrap, seeded)."""
    intervals = metrics.bootstrap_intervals(y, scores, n_boot=n_boot, seed=7)
    out: dict[str, dict[str, Any]] = {}
    for name, p in scores.items():
        heuristic = name.startswith("heuristic_")
        values = metrics.heuristic_metrics(y, p) if heuristic else metrics.metrics(y, p)
        out[name] = {
            key: None
            if np.isnan(values[key])
            else [round(values[key], 4), *(round(v, 4) for v in intervals[name][key])]
            for key in REPORTED
        }
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    lake_dir = Path(args.lake or tempfile.mkdtemp(prefix="model-real-"))
    settings = Settings(
        lake=lake_dir / "lake",
        lateness_hours=args.replay_lateness_hours,
        label_horizon_hours=args.horizon_hours,
        retrain_every_hours=24,
        business_tz=args.business_tz,
        seed=7,
    )
    replay_s, replayed = replay_once(settings, args, lake_dir)
    if args.replay_only:
        return {"dataset": args.dataset, "replay_seconds": replay_s, "replayed": replayed}
    settings = replace(settings, lateness_hours=1)
    lake = Lake(settings.lake)
    snapshots = labels.committed_profile_hours(lake)
    config = labels.TrainingConfig(min_train_rows=args.min_train_rows, min_positives=args.min_positives)
    versions: list[dict[str, Any]] = []
    hours: list[dict[str, Any]] = []
    parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
    selected = _selected(snapshots, args.versions, args.every)
    print(f"{len(snapshots)} snapshots; training at {[format_hour(h) for h in selected]}", file=sys.stderr, flush=True)
    for hour in selected:
        started = time.perf_counter()
        trained = trainer.train_version(
            settings, hour, NUMERIC_FEATURES, CATEGORICAL_FEATURES, training_config=config, run_id="model-real"
        )
        train_s = round(time.perf_counter() - started, 1)
        print(f"{format_hour(hour)}: {trained['status']} in {train_s} s", file=sys.stderr, flush=True)
        if trained["status"] == "trained":
            version = trained["version"]
            before = registry.champion_as_of(settings, hour)
            started = time.perf_counter()
            decision = promotion.evaluate_and_promote(settings, hour, run_id="model-real", n_boot=args.n_boot)
            gate_s = round(time.perf_counter() - started, 1)
            _, rows, training = labels.read_training_set(settings, version)
            y = np.asarray(rows.column(labels.LABEL), dtype=np.float64)
            scorers = _scorers(settings, version, rows)
            if before is not None:  # the champion the version was gated against, on the same rows
                champion = artifacts.load_model(settings, before["version"], registry.entry_kind(before))
                scorers["champion"] = (champion.predict(rows), champion)
            after = registry.champion_as_of(settings, hour + timedelta(hours=1))
            raw = {name: p for name, (p, _) in scorers.items()}
            parts.append((y, _pooled_part(settings, hour, rows, raw)))
            per_scorer = _with_intervals(y, raw, args.n_boot)
            for name, (p, loaded) in scorers.items():
                deciles = _deciles(p, rows.column(USER_ID), loaded)
                per_scorer[name]["mean_score"] = None if name.startswith("heuristic_") else round(float(np.mean(p)), 4)
                per_scorer[name]["decile_10_share"] = round(float(np.mean(deciles == 10)), 4)
            versions.append(
                {
                    "version": version,
                    "train_seconds": train_s,
                    "gate_seconds": gate_s,
                    "train_rows": trained["training"].get("train_rows"),
                    "train_positives": trained["training"].get("train_positives"),
                    "train_snapshots": len(trained["training"].get("train_snapshots") or []),
                    "eval_snapshot": trained["training"].get("eval_snapshot"),
                    "reconstructed_snapshots": len(training.get("snapshots_reconstructed", [])),
                    "eval_rows": int(y.size),
                    "eval_positives": int(y.sum()),
                    "base_rate": round(float(y.mean()), 4),
                    "champion_before": None if before is None else _entry(before),
                    "champion_after": None if after is None else _entry(after),
                    "status": decision["status"],
                    "candidate": decision.get("candidate"),
                    "choice": (decision.get("choice") or {}).get("reason"),
                    "deciding": decision.get("deciding"),
                    "reference": decision.get("reference"),
                    "reasons": decision.get("reasons"),
                    "scorers": per_scorer,
                    # the champion after the gate, on these rows: this version's winner, else the one before
                    "targets": _targets(
                        per_scorer,
                        decision.get("candidate")
                        if decision["status"] == "promoted"
                        else ("champion" if before else None),
                    ),
                }
            )
        scored = [scoring.score_profiles(settings, hour, b, run_id="model-real") for b in range(settings.buckets)]
        table = scoring.read_scores(lake, hour) if hasattr(scoring, "read_scores") else lake.read(SCORES, hour)
        deciles = table.column(DECILE)
        propensity = table.column(PROPENSITY)
        hours.append(
            {
                "hour": format_hour(hour),
                "model": scored[0]["model"],
                "model_version": scored[0][MODEL_VERSION],
                "users": table.num_rows,
                "decile_10_share": round(float(pc.mean(pc.cast(pc.equal(deciles, 10), "float64")).as_py() or 0.0), 4),
                "mean_propensity": None
                if propensity.null_count == table.num_rows
                else round(pc.mean(propensity).as_py(), 4),
            }
        )
        if args.out:  # what is done so far, so a run stopped by a time box still reports its versions
            partial = {"dataset": args.dataset, "partial": True, "versions": versions, "hours": hours}
            Path(args.out).with_suffix(".partial.json").write_text(json.dumps(partial, indent=1, default=str) + "\n")
            Path(args.out).with_suffix(".partial.md").write_text(markdown(partial) + "\n")
    return {
        "dataset": args.dataset,
        "file": str(args.file),
        "since": args.since,
        "mapping": args.mapping,
        "label_horizon_hours": args.horizon_hours,
        "events_staged": replayed.get("staged"),
        "snapshots": len(snapshots),
        "trained_at": [format_hour(h) for h in selected],
        "replay_seconds": replay_s,
        "promoted": [f"{v['version']} ({v.get('candidate')})" for v in versions if v["status"] == "promoted"],
        **pooled_results(parts, args.n_boot),
        "versions": versions,
        "hours": hours,
        "measured_at": datetime.now().isoformat(timespec="seconds"),
    }


def markdown(result: dict[str, Any]) -> str:
    """The metrics as Markdown tables (value [95% interval]), one per version and one pooled."""

    def table(title: str, scorers: dict[str, dict[str, Any]]) -> list[str]:
        lines = [f"{title}", "", "| scorer | " + " | ".join(REPORTED) + " |", "|---" * (len(REPORTED) + 1) + "|"]
        for name, values in scorers.items():
            cells = [
                "n/a" if values.get(k) is None else f"{values[k][0]:.3f} [{values[k][1]:.3f}, {values[k][2]:.3f}]"
                for k in REPORTED
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return [*lines, ""]

    out: list[str] = []
    for v in result["versions"]:
        head = (
            f"{v['version']}: {v['eval_rows']} rows, {v['eval_positives']} buyers; {v['status']}"
            + (f" {v['candidate']}" if v.get("candidate") and v["status"] == "promoted" else "")
            + f" ({v.get('choice') or '; '.join(v.get('reasons') or [])})"
            + f"; champion before: {v.get('champion_before')}, after: {v.get('champion_after')}"
            + f"; trained in {v.get('train_seconds')} s, gated in {v.get('gate_seconds')} s"
        )
        out += table(head, v["scorers"])
        if v.get("targets"):
            out += [f"targets: {json.dumps(v['targets'])}", ""]
    for key in ("pooled", "pooled_served"):
        if result.get(key):
            pooled = result[key]
            out += table(f"{key}: {pooled['rows']} rows, {pooled['positives']} buyers", pooled["metrics"])
            if pooled.get("targets"):
                out += [f"targets: {json.dumps(pooled['targets'])}", ""]
            if pooled.get("champion_minus"):
                out += [f"champion minus (95% paired intervals): {json.dumps(pooled['champion_minus'])}", ""]
    return "\n".join(out)


def replay_once(settings: Settings, args: argparse.Namespace, work: Path) -> tuple[float | None, dict[str, Any]]:
    """Replay ``args.file`` (rows since ``--since``) into the lake unless it already holds a replay (then reuse it):
    ``(seconds, runner.replay summary)``, or ``(None, {})`` when reused."""
    if labels.committed_profile_hours(Lake(settings.lake)):
        return None, {}
    file = Path(args.file)
    if args.since:
        renames = dict(r.split("=", 1) for r in args.rename)
        file = filtered_csv(file, args.date_column, args.since, renames, work)
    started = time.perf_counter()
    replayed = runner.replay(settings, file, args.mapping, quality_suite=False)
    seconds = round(time.perf_counter() - started, 1)
    print(f"replayed in {seconds} s: {json.dumps(replayed, default=str)[:2000]}", file=sys.stderr, flush=True)
    return seconds, replayed


def emit_json(result: dict[str, Any], out: str | None) -> None:
    """Print a benchmark's result as JSON, and write it to ``out`` too when given."""
    text = json.dumps(result, indent=1, default=str)
    if out:
        Path(out).write_text(text + "\n")
    print(text)


def common_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments every real-log benchmark takes (this one and ``sequence_model.py``): the log, its
    mapping and time zone, the filtered copy, the label horizon, the training minimums, the lake, the output."""
    parser.add_argument("file", help="the event log (CSV)")
    parser.add_argument("--mapping", required=True, help="a shipped mapping name (taobao, order_lines, ...)")
    parser.add_argument("--dataset", required=True, help="the public dataset's name, printed with the results")
    parser.add_argument("--horizon-hours", type=int, default=24, help="label horizon (24: next day, 168: 7 days)")
    parser.add_argument("--business-tz", default="UTC")
    parser.add_argument("--since", help="keep rows whose --date-column is at or after this ISO date (CSV with header)")
    parser.add_argument("--date-column", default="InvoiceDate")
    parser.add_argument("--rename", action="append", default=[], help="OLD=NEW header rename (with --since)")
    parser.add_argument("--min-train-rows", type=int, default=50)
    parser.add_argument("--min-positives", type=int, default=5)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--lake", help="working directory (default: a new temporary one); an existing replay is reused")
    parser.add_argument("--out", help="write the JSON result here as well")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--versions", type=int, default=0, help="train at the newest K chosen snapshot hours (0: all)")
    parser.add_argument(
        "--every", type=int, default=1, help="train at every N-th snapshot, counted back from the newest"
    )
    parser.add_argument(
        "--replay-lateness-hours",
        type=int,
        default=2000,
        help="lateness of the replay (every event lands in its own hour; validation reads this many hours back)",
    )
    parser.add_argument("--replay-only", action="store_true", help="replay into --lake and stop (no training)")
    parser.add_argument(
        "--pool-only", action="store_true", help="recompute the pooled tables of the run in --lake (--out names it)"
    )
    args = parser.parse_args(argv)
    result = pool_only(args) if args.pool_only else measure(args)
    emit_json(result, args.out)
    tables = "" if args.replay_only else markdown(result)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(tables + "\n")
    print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
