"""Benchmark of the whole hourly pipeline (issue 10): every task of ``profile_refresh``, the DAG run, training, scaling.

Reproducible: the data comes from the simulator. A *base lake* (cached under
``--work``, reused while the sizes match) holds ``--history-hours`` hours of history
of ``--users`` simulated users at about ``--events`` events an hour, extracted and
validated hour by hour and built in bulk with ``build_profiles_range`` (snapshots
every 6 hours), plus a champion model trained and promoted on that history; the
landing files of the benchmark hour ``END`` are simulated but not yet extracted.
Every measurement runs on a copy of the base lake, so reruns start from the same state.

Sections (``--sections``):

``tasks``
    each task of ``profile_refresh`` for the hour, each run in its own Python process
    (``--runs`` times; the hour's idempotent rerun: every run starts from the same lake
    state, the ledger of the hour is removed before each ``extract_events``):
    extract_events, validate_events (row rules, staging, quarantine), check_quality (the
    Great Expectations suite + Data Docs; beside build_profiles in the DAG), build_profiles
    per bucket and total, publish_profiles, score_profiles per bucket and total,
    publish_segments, write_run_report. The "whole hour" row sums them all (check_quality
    included, though the DAG runs it in parallel with build_profiles).
``dag``
    the whole hour as a DAG run (``dag.test`` with logical date H and ``hour`` = H, as
    ``make demo`` runs it) in its own process, and Airflow's overhead: the run minus the
    sum of the task medians.
``train``
    ``train_challenger`` (forced) + ``evaluate_and_promote`` on about ``--train-rows``
    training rows.
``scaling``
    the hour's stages (in one process per variant, run through the stage functions in
    DAG order) at ``--scale-events`` events per hour on the base state, and with
    ``--scale-buckets`` buckets on a short history (``SCALE_HISTORY_HOURS``).

Wall time is the time of the task's call (imports of the task module excluded; the
heavy libraries the task imports itself, TensorFlow or Great Expectations, included);
``CPU s`` is the task's user + system CPU time (steadier than wall time on a shared
machine); ``process s`` adds the interpreter and package start-up. Peak RSS is ``VmHWM`` of the
task's process (``ru_maxrss`` of a forked child carries the parent's peak on Linux).

    .venv/bin/python benchmarks/pipeline.py                 # the issue's sizes, appends to BENCHMARKS.md
    .venv/bin/python benchmarks/pipeline.py --quick         # a small smoke run, nothing appended
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from profile_engine.contracts.stages import MAPPED_STAGES, REPORT_STAGE, STAGES, TRAINING_STAGES

PROCESS_START = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
END = datetime(2026, 11, 20, 12, tzinfo=UTC)  # the benchmark hour (retraining not due: 24 h cadence)
ORIGIN = datetime(2026, 9, 1, tzinfo=UTC)  # users sign up well before the data
SEED = 7
SNAPSHOT_EVERY = 6  # history checkpoints (snapshots for training) every 6 UTC hours
# The simulator gives about 1.0M events at 12:00 UTC for 1M users at intensity 6.1.
EVENTS_PER_USER_INTENSITY = 1.0 / 6.1
# Labels for the benchmark's model: a 2 h horizon, final after 1 h (the history is one day).
TRAIN_HORIZON_HOURS = 2
TRAIN_LATENESS_HOURS = 1
SCALE_HISTORY_HOURS = 3
# Every stage but training (benchmarked on its own, in the "train" section), then the report. check_quality
# runs beside build_profiles in the DAG; it is measured in its own process like the rest.
TASKS = tuple(s for s in STAGES if s not in TRAINING_STAGES) + (REPORT_STAGE,)
MAPPED = MAPPED_STAGES
NEEDS_SUMMARIES = ("check_quality", "write_run_report")  # tasks that read earlier tasks' summaries
SECTIONS = ("tasks", "dag", "train", "scaling")


@dataclass(frozen=True)
class Sizes:
    """Everything that decides the base lake; a cached base lake is reused only when these match."""

    users: int = 1_000_000
    events: int = 1_000_000
    history_hours: int = 24
    buckets: int = 4
    champion: bool = True

    @property
    def intensity(self) -> float:
        """Simulator intensity giving about ``events`` events an hour for ``users`` users."""
        return intensity_for(self.events, self.users)


QUICK = Sizes(users=5_000, events=5_000, history_hours=3, buckets=2, champion=False)


def intensity_for(events: int, users: int) -> float:
    """The simulator's session-rate multiplier for about ``events`` events an hour (at 12:00 UTC)."""
    return events / users / EVENTS_PER_USER_INTENSITY


# ---- lake setup -------------------------------------------------------------------------------------------------
def settings_for(lake: Path, buckets: int, start: datetime) -> Any:
    """Settings of a benchmark lake (defaults otherwise: 24 h lateness window, as in production)."""
    from profile_engine.config import Settings

    return replace(
        Settings.from_env({}), lake=lake, buckets=buckets, start=start, label_horizon_hours=TRAIN_HORIZON_HOURS
    )


def child_env(lake: Path, buckets: int, start: datetime) -> dict[str, str]:
    """Environment of a measured process: the same settings as ``settings_for``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROFILE_ENGINE_")}
    env.update(
        {
            "PROFILE_ENGINE_LAKE": str(lake),
            "PROFILE_ENGINE_BUCKETS": str(buckets),
            "PROFILE_ENGINE_START": start.isoformat(),
            "PROFILE_ENGINE_LABEL_HORIZON_HOURS": str(TRAIN_HORIZON_HOURS),
        }
    )
    return env


def training_settings(settings: Any) -> Any:
    """Settings for training on a one-day history: labels final 1 h after their 2 h window."""
    return replace(settings, lateness_hours=TRAIN_LATENESS_HOURS)


def build_base(base: Path, sizes: Sizes, log: Any) -> dict[str, Any]:
    """Simulate, validate and build the history of the base lake; simulate the landing of ``END``."""
    from profile_engine.hours import HOUR, format_hour, hour_range
    from profile_engine.ingest import events as ingest
    from profile_engine.lake.storage import Lake
    from profile_engine.model import labels, registry, training
    from profile_engine.profiles import build
    from profile_engine.sources.simulate import simulate

    first = END - sizes.history_hours * HOUR
    last = END - HOUR
    tmp = base.with_name(base.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    settings = settings_for(tmp, sizes.buckets, first)
    lake = Lake(tmp)
    started = time.monotonic()
    simulated = simulate(lake, first, END, users=sizes.users, seed=SEED, origin=ORIGIN, intensity=sizes.intensity)
    log(f"simulated {simulated.events} events over {simulated.hours} hours ({time.monotonic() - started:.0f} s)")
    staged = 0
    for hour in hour_range(first, last):
        ingest.extract_events(settings, hour, run_id="bench-history")
        staged += ingest.validate_events(settings, hour, run_id="bench-history")[
            "staged"
        ]  # row rules only (no check_staged)
    log(f"validated {staged} staged events ({time.monotonic() - started:.0f} s)")
    chunk_first = first
    while chunk_first <= last:
        chunk_last = min(
            last, chunk_first + (SNAPSHOT_EVERY - 1 - (int(chunk_first.timestamp()) // 3600) % SNAPSHOT_EVERY) * HOUR
        )
        for bucket in range(sizes.buckets):
            build.build_profiles_range(
                settings, chunk_first, chunk_last, bucket, run_id="bench-history", snapshot_every=SNAPSHOT_EVERY
            )
        build.publish_profiles(settings, chunk_last, run_id="bench-history")
        chunk_first = chunk_last + HOUR
    log(f"built the state ({time.monotonic() - started:.0f} s)")
    champion = None
    if sizes.champion:
        # Committed snapshots only (stride 0): the default stride of 1 h rebuilds every hour's snapshot of
        # every bucket first, which took longer than the whole history at 1M users and 4 buckets.
        trained = training.train_challenger(
            training_settings(settings),
            last,
            run_id="bench-history",
            force=True,
            training_config=labels.TrainingConfig(stride_hours=0),
        )
        if trained.get("status") != "trained":
            raise SystemExit(f"the champion could not be trained: {trained}")
        registry.promote(settings, trained["version"], last, forced=True, reason="benchmark champion")
        champion = trained["version"]
        log(f"trained and promoted champion {champion} ({time.monotonic() - started:.0f} s)")
    profiles = sum(lake.read("profiles", last, b).num_rows for b in range(sizes.buckets))
    info = {
        "sizes": asdict(sizes),
        "history_events": simulated.events,
        "history_staged": staged,
        "profiles": profiles,
        "champion": champion,
        "first": format_hour(first),
        "seconds": round(time.monotonic() - started, 1),
    }
    (tmp / "_bench.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(base, ignore_errors=True)
    tmp.rename(base)
    return info


def base_lake(work: Path, sizes: Sizes, log: Any) -> tuple[Path, dict[str, Any]]:
    """The cached base lake for ``sizes`` (built when missing)."""
    key = f"base-u{sizes.users}-e{sizes.events}-h{sizes.history_hours}-b{sizes.buckets}-c{int(sizes.champion)}"
    base = work / key
    marker = base / "_bench.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info["sizes"] == asdict(sizes):
            log(f"reusing {base}")
            upgrade_base(base, sizes, info, log)
            return base, info
    log(f"building {base} (cached for later runs)")
    return base, build_base(base, sizes, log)


def upgrade_base(base: Path, sizes: Sizes, info: dict[str, Any], log: Any) -> None:
    """Bring a cached base lake to the current layouts once, so that no measured run pays a conversion:
    the state checkpoint the hour builds on (``build.upgrade_state``) and the champion's numpy
    export (``artifacts.export_inference``; a version without it is scored with Keras)."""
    from profile_engine.lake.storage import STATE, Lake
    from profile_engine.model import artifacts
    from profile_engine.profiles import build

    lake = Lake(base)
    before = END - timedelta(hours=1)
    upgraded = [
        b for b in range(sizes.buckets) if lake.committed(STATE, before, b) and build.upgrade_state(lake, before, b)
    ]
    if upgraded:
        log(f"upgraded the state of {base.name} (buckets {upgraded}) to the current layout")
    champion = info.get("champion")
    settings = settings_for(base, sizes.buckets, datetime.fromisoformat(info["first"]))
    if champion and artifacts.load_model(settings, champion).engine != "numpy":
        log(f"added the numpy export of {champion}: {artifacts.export_inference(settings, champion)}")


def fresh_copy(base: Path, target: Path) -> Path:
    """A working copy of ``base`` (hard links would let an in-place write reach the base)."""
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(["cp", "-a", str(base), str(target)], check=True)
    return target


def reset_hour(base: Path, lake: Path) -> None:
    """Undo the extraction of hour ``END`` on ``lake``, a working copy of ``base``, so that the next
    ``extract_events`` takes the hour's landing files as a first run does: the hour's ledger removed and the
    landing index (every path a ledger named, which each extract brings up to date through its hour, so that
    it lists the hour's own files after the first run) put back as ``base`` has it, or removed if it has none."""
    from profile_engine.hours import partition_values
    from profile_engine.ingest.events import LANDING_INDEX
    from profile_engine.lake.storage import LEDGER

    dt, hh = partition_values(END)
    shutil.rmtree(lake / LEDGER / f"dt={dt}" / f"hour={hh}", ignore_errors=True)
    index, kept = lake / LEDGER / LANDING_INDEX, base / LEDGER / LANDING_INDEX
    if kept.is_file():
        shutil.copy2(kept, index)
    else:
        index.unlink(missing_ok=True)


def resimulate_hour(lake: Path, events: int, users: int) -> None:
    """Replace the landing files that arrive in hour ``END`` by those of another intensity."""
    from profile_engine.hours import partition_values
    from profile_engine.lake.storage import Lake
    from profile_engine.sources.simulate import simulate

    dt, hh = partition_values(END)
    shutil.rmtree(lake / "landing" / "events" / f"dt={dt}" / f"hour={hh}", ignore_errors=True)
    simulate(Lake(lake), END, END, users=users, seed=SEED, origin=ORIGIN, intensity=intensity_for(events, users))


# ---- measured processes ---------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_task(task: str, hour: datetime, bucket: int | None, summaries_file: Path | None) -> dict[str, Any]:
    """Run one stage function as the DAG task does; returns its summary (in the child process)."""
    from profile_engine.config import Settings
    from profile_engine.ingest import events as ingest
    from profile_engine.model import scoring, training
    from profile_engine.ops import report
    from profile_engine.profiles import build
    from profile_engine.segments import publish as segments

    settings = Settings.from_env()
    run_id = f"bench__{hour:%Y%m%dT%H}"
    if task == "extract_events":
        return ingest.extract_events(settings, hour, run_id=run_id)
    if task == "validate_events":
        return ingest.validate_events(settings, hour, run_id=run_id)
    if task == "check_quality":
        from profile_engine.quality import suites as quality

        validated = json.loads(summaries_file.read_text())["validate_events"] if summaries_file else {}
        return quality.check_staged_hour(settings, hour, validated, run_id=run_id)
    if task == "build_profiles":
        assert bucket is not None
        return build.build_profiles(settings, hour, bucket, run_id=run_id, first_hour=settings.start)
    if task == "publish_profiles":
        return build.publish_profiles(settings, hour, run_id=run_id)
    if task == "score_profiles":
        assert bucket is not None
        return scoring.score_profiles(settings, hour, bucket, run_id=run_id)
    if task == "publish_segments":
        return segments.publish_segments(settings, hour, run_id=run_id)
    if task == "write_run_report":
        summaries = json.loads(summaries_file.read_text()) if summaries_file else {}
        return report.write_run_report(settings, hour, summaries, run_id=run_id)
    if task == "train":
        from profile_engine.model import labels, promotion

        rows = int(os.environ["BENCH_TRAIN_ROWS"])
        trainer = training_settings(settings)
        config = labels.TrainingConfig(max_rows=rows * 3 // 2, max_snapshots=2)  # 2 training + 1 eval snapshot
        started = time.monotonic()
        trained = training.train_challenger(trainer, hour, run_id=run_id, force=True, training_config=config)
        train_s = time.monotonic() - started
        evaluated = promotion.evaluate_and_promote(trainer, hour, run_id=run_id)
        return {
            "status": trained.get("status"),
            "reason": trained.get("reason", ""),
            "train_rows": trained.get("training", {}).get("train_rows"),
            "eval_rows": trained.get("training", {}).get("eval_rows"),
            "train_s": round(train_s, 2),
            "evaluate_s": round(time.monotonic() - started - train_s, 2),
            "decision": evaluated.get("status"),
        }
    if task == "dag":
        return run_dag(hour)
    if task == "hour":
        return run_stages(settings, hour)
    raise SystemExit(f"unknown task {task}")


def run_dag(hour: datetime) -> dict[str, Any]:
    """The hour as one ``dag.test`` run (in the child; Airflow's metadata DB is migrated by the parent)."""
    from airflow.dag_processing.dagbag import DagBag

    from profile_engine.hours import format_hour

    bag = DagBag(dag_folder=str(ROOT / "dags" / "profile_refresh.py"))
    if bag.import_errors:
        raise SystemExit(f"profile_refresh does not import: {bag.import_errors}")
    started = time.monotonic()
    run = bag.dags["profile_refresh"].test(logical_date=hour, run_conf={"hour": format_hour(hour)})
    return {"state": str(getattr(run, "state", "unknown")), "dag_test_s": round(time.monotonic() - started, 2)}


def run_stages(settings: Any, hour: datetime) -> dict[str, Any]:
    """The hour's stages in DAG order in this process, each timed (for the scaling figures)."""
    from profile_engine.ingest import events as ingest
    from profile_engine.model import scoring
    from profile_engine.ops import report
    from profile_engine.profiles import build
    from profile_engine.quality import suites as quality
    from profile_engine.segments import publish as segments

    run_id = f"bench__{hour:%Y%m%dT%H}"
    times: dict[str, float] = {}
    summaries: dict[str, Any] = {}

    def timed(name: str, call: Any) -> Any:
        started = time.monotonic()
        summaries[name] = call()
        times[name] = round(time.monotonic() - started, 2)
        return summaries[name]

    timed("extract_events", lambda: ingest.extract_events(settings, hour, run_id=run_id))
    validated = timed("validate_events", lambda: ingest.validate_events(settings, hour, run_id=run_id))
    timed("check_quality", lambda: quality.check_staged_hour(settings, hour, validated, run_id=run_id))
    timed(
        "build_profiles",
        lambda: [build.build_profiles(settings, hour, b, run_id=run_id) for b in range(settings.buckets)],
    )
    timed("publish_profiles", lambda: build.publish_profiles(settings, hour, run_id=run_id))
    timed(
        "score_profiles",
        lambda: [scoring.score_profiles(settings, hour, b, run_id=run_id) for b in range(settings.buckets)],
    )
    timed("publish_segments", lambda: segments.publish_segments(settings, hour, run_id=run_id))
    timed("write_run_report", lambda: report.write_run_report(settings, hour, summaries, run_id=run_id))
    return {"times": times, "read": validated["read"], "staged": validated["staged"]}


def child_main(args: argparse.Namespace) -> None:
    """Entry of a measured process: run one task, print one JSON line with times and peak RSS."""
    import resource

    import profile_engine.ingest.events  # noqa: F401
    import profile_engine.model.promotion  # noqa: F401
    import profile_engine.model.training  # noqa: F401
    import profile_engine.ops.report  # noqa: F401
    import profile_engine.profiles.build  # noqa: F401  (the package's own imports are start-up, not task work)
    import profile_engine.segments.publish  # noqa: F401
    import profile_engine.segments.uplift  # noqa: F401

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    cpu_before = cpu()
    started = time.monotonic()
    result = run_task(args.child, END, args.bucket, Path(args.summaries) if args.summaries else None)
    seconds = time.monotonic() - started
    out = {
        "seconds": seconds,
        "cpu_seconds": cpu() - cpu_before,
        "process_seconds": time.monotonic() - PROCESS_START,
        "peak_rss_mb": peak_rss_mb(),
        "result": result,
    }
    print("BENCH " + json.dumps(out, default=str), flush=True)


def measure(
    task: str, env: dict[str, str], *, bucket: int | None = None, summaries: Path | None = None
) -> dict[str, Any]:
    """Run one task in a fresh Python process; its JSON line (raises with its stderr when it fails)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", task]
    if bucket is not None:
        cmd += ["--bucket", str(bucket)]
    if summaries is not None:
        cmd += ["--summaries", str(summaries)]
    started = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{task} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    out: dict[str, Any] = json.loads(lines[-1][len("BENCH ") :])
    out["process_seconds"] = wall
    return out


@dataclass
class Row:
    """One line of a result table: a step, its runs and what they measured."""

    step: str
    seconds: list[float]
    process_seconds: list[float]
    peak_rss_mb: list[float]
    note: str = ""
    cpu_seconds: list[float] = field(default_factory=list)

    def cells(self) -> list[str]:
        """Markdown cells: step, median/min/max s, median process s, median and max peak RSS, runs, note."""
        med = statistics.median
        return [
            self.step,
            f"{med(self.seconds):.2f}",
            f"{min(self.seconds):.2f}",
            f"{max(self.seconds):.2f}",
            f"{med(self.cpu_seconds):.2f}" if self.cpu_seconds else "",
            f"{med(self.process_seconds):.2f}" if self.process_seconds else "",
            f"{med(self.peak_rss_mb):.0f}" if self.peak_rss_mb else "",
            f"{max(self.peak_rss_mb):.0f}" if self.peak_rss_mb else "",
            str(len(self.seconds)),
            self.note,
        ]


HEADER = [
    "step",
    "median s",
    "min s",
    "max s",
    "CPU s (median)",
    "process s (median)",
    "peak RSS MB (median)",
    "peak RSS MB (max)",
    "runs",
    "note",
]


def table(rows: list[Row]) -> str:
    """A markdown table of ``rows``."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def _row(step: str, outs: list[dict[str, Any]], note: str = "") -> Row:
    return Row(
        step,
        [o["seconds"] for o in outs],
        [o["process_seconds"] for o in outs],
        [o["peak_rss_mb"] for o in outs],
        note,
        [o["cpu_seconds"] for o in outs if "cpu_seconds" in o],
    )


# ---- sections --------------------------------------------------------------------------------------------------
def bench_tasks(
    base: Path, work: Path, sizes: Sizes, info: dict[str, Any], runs: int, log: Any
) -> tuple[list[Row], dict[str, Any]]:
    """Each task of the hour in its own process, ``runs`` times, on one working copy (idempotent reruns)."""
    lake = fresh_copy(base, work / "tasks")
    env = child_env(lake, sizes.buckets, datetime.fromisoformat(info["first"]))
    summaries: dict[str, Any] = {}
    outs: dict[str, list[dict[str, Any]]] = {}
    for run in range(runs):
        for task in TASKS:
            if task == "extract_events":
                reset_hour(base, lake)
            if task in MAPPED:
                for bucket in range(sizes.buckets):
                    out = measure(task, env, bucket=bucket)
                    outs.setdefault(f"{task}[{bucket}]", []).append(out)
                    summaries.setdefault(task, {})[bucket] = out["result"]
                continue
            if task in NEEDS_SUMMARIES:
                path = work / "summaries.json"
                flat = {k: (list(v.values()) if k in MAPPED else v) for k, v in summaries.items()}
                path.write_text(json.dumps(flat, default=str))
                out = measure(task, env, summaries=path)
            else:
                out = measure(task, env)
            outs.setdefault(task, []).append(out)
            summaries[task] = out["result"]
        log(f"tasks: run {run + 1} of {runs} done")
    rows: list[Row] = []
    totals: dict[str, list[float]] = {}
    for task in TASKS:
        if task in MAPPED:
            per_bucket = [outs[f"{task}[{b}]"] for b in range(sizes.buckets)]
            for b, bucket_outs in enumerate(per_bucket):
                rows.append(_row(f"{task}[{b}]", bucket_outs))
            total = [
                {
                    "seconds": sum(bo[r]["seconds"] for bo in per_bucket),
                    "process_seconds": sum(bo[r]["process_seconds"] for bo in per_bucket),
                    "peak_rss_mb": max(bo[r]["peak_rss_mb"] for bo in per_bucket),
                    "cpu_seconds": sum(bo[r]["cpu_seconds"] for bo in per_bucket),
                }
                for r in range(runs)
            ]
            rows.append(_row(f"{task} (all {sizes.buckets} buckets, one after another)", total, "sum of the buckets"))
            totals[task] = [t["seconds"] for t in total]
        else:
            note = ""
            if task == "validate_events":
                v = summaries[task]
                note = f"{v['read']:,} rows read, {v['staged']:,} staged"
            if task == "score_profiles":
                note = ""
            rows.append(_row(task, outs[task], note))
            totals[task] = [o["seconds"] for o in outs[task]]
    hour_total = [sum(totals[t][r] for t in TASKS) for r in range(runs)]
    rows.append(Row("whole hour: sum of the tasks", hour_total, [], [], "excluding retraining"))
    scored = summaries["score_profiles"]
    facts = {
        "read": summaries["validate_events"]["read"],
        "staged": summaries["validate_events"]["staged"],
        "profiles": sum(int(s["rows"]) for s in scored.values()),
        "model": sorted({str(s.get("model")) for s in scored.values()}),
        "task_medians": {t: statistics.median(v) for t, v in totals.items()},
    }
    return rows, facts


def airflow_home(work: Path) -> dict[str, str]:
    """A private Airflow home (SQLite) under the work folder, migrated once."""
    home = work / "airflow"
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
    }
    if not (home / "airflow.db").is_file():
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
        )
    return env


def bench_dag(
    base: Path, work: Path, sizes: Sizes, info: dict[str, Any], runs: int, task_sum: float | None, log: Any
) -> list[Row]:
    """The hour as a ``dag.test`` run in its own process, ``runs`` times, each on a fresh copy."""
    outs = []
    for run in range(runs):
        lake = fresh_copy(base, work / "dag")
        shutil.rmtree(work / "airflow", ignore_errors=True)  # dag.test of the same logical date again
        env = {**child_env(lake, sizes.buckets, datetime.fromisoformat(info["first"])), **airflow_home(work)}
        out = measure("dag", env)
        if "success" not in out["result"]["state"]:
            raise RuntimeError(f"the DAG run failed: {out['result']}")
        out["seconds"] = out["result"]["dag_test_s"]
        outs.append(out)
        log(f"dag: run {run + 1} of {runs} done ({out['seconds']:.1f} s)")
    rows = [_row("profile_refresh as dag.test (one process)", outs, "tasks run in-process, one after another")]
    if task_sum is not None:
        overhead = [o["seconds"] - task_sum for o in outs]
        rows.append(
            Row(
                "Airflow overhead (dag.test minus the sum of task medians)",
                overhead,
                [],
                [],
                "may be negative: one process imports once",
            )
        )
    return rows


def bench_train(
    base: Path, work: Path, sizes: Sizes, info: dict[str, Any], runs: int, train_rows: int, log: Any
) -> list[Row]:
    """``train_challenger`` (forced) + ``evaluate_and_promote`` of the hour on a fresh copy, ``runs`` times."""
    outs = []
    for run in range(runs):
        lake = fresh_copy(base, work / "train")
        env = {
            **child_env(lake, sizes.buckets, datetime.fromisoformat(info["first"])),
            "BENCH_TRAIN_ROWS": str(train_rows),
        }
        outs.append(measure("train", env))
        log(f"train: run {run + 1} of {runs} done ({outs[-1]['seconds']:.1f} s: {outs[-1]['result']})")
    result = outs[-1]["result"]
    note = (
        f"{result['train_rows']:,} training rows, {result['eval_rows']:,} evaluation rows; gate: {result['decision']}"
        if result["status"] == "trained"
        else f"training {result['status']}: {result['reason']}"
    )
    rows = [_row("train_challenger + evaluate_and_promote", outs, note)]
    for key in ("train_s", "evaluate_s"):
        rows.append(Row(f"  of which {key[:-2]}", [o["result"][key] for o in outs], [], [], ""))
    return rows


def bench_scaling(
    base: Path, work: Path, sizes: Sizes, info: dict[str, Any], events: list[int], buckets: list[int], log: Any
) -> list[dict[str, Any]]:
    """The hour's stages at several event counts (base state) and bucket counts (short history), one process each."""
    results = []
    for n in events:
        lake = fresh_copy(base, work / "scale")
        resimulate_hour(lake, n, sizes.users)
        out = measure("hour", child_env(lake, sizes.buckets, datetime.fromisoformat(info["first"])))
        results.append({"variant": f"{n:,} events, {sizes.buckets} buckets", **out})
        log(f"scaling: {n} events done ({out['seconds']:.1f} s)")
    for b in buckets:
        # A few hours of history leave no final labels to train a champion on: scores are null here.
        small = replace(sizes, history_hours=SCALE_HISTORY_HOURS, buckets=b, champion=False)
        small_base, small_info = base_lake(work, small, log)
        lake = fresh_copy(small_base, work / "scale")
        out = measure("hour", child_env(lake, b, datetime.fromisoformat(small_info["first"])))
        variant = f"{sizes.events:,} events, {b} buckets, {SCALE_HISTORY_HOURS} h history, no champion"
        results.append({"variant": variant, **out})
        log(f"scaling: {b} buckets done ({out['seconds']:.1f} s)")
    return results


def scaling_table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per variant, seconds per stage, total and peak RSS."""
    head = ["variant", "rows read", *TASKS, "total s", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        times = r["result"]["times"]
        lines.append(
            "| "
            + " | ".join(
                [r["variant"], f"{r['result']['read']:,}"]
                + [f"{times[t]:.2f}" for t in TASKS]
                + [f"{r['seconds']:.2f}", f"{r['peak_rss_mb']:.0f}"]
            )
            + " |"
        )
    return "\n".join(lines)


# ---- report ----------------------------------------------------------------------------------------------------
def machine() -> str:
    """CPU model, cores, RAM and kernel of this machine."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        ram = int(
            next(li for li in Path("/proc/meminfo").read_text().splitlines() if li.startswith("MemTotal")).split()[1]
        )
        ram_text = f"{ram / 1024 / 1024:.0f} GiB RAM"
    except (OSError, StopIteration):
        ram_text = "RAM unknown"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, {ram_text}, Linux {platform.release()} (load average at the end: {load})"


def versions() -> str:
    """Versions of Python and the libraries the pipeline's time goes to."""
    from importlib.metadata import version

    names = ("apache-airflow", "duckdb", "pyarrow", "pandas", "great-expectations", "tensorflow-cpu", "keras")
    parts = [f"Python {platform.python_version()}"]
    for name in names:
        try:
            parts.append(f"{name} {version(name)}")
        except Exception:  # noqa: BLE001 - a missing optional package is reported as such
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


def render(
    args: argparse.Namespace, sizes: Sizes, info: dict[str, Any], sections: dict[str, Any], facts: dict[str, Any]
) -> str:
    """The dated markdown section appended to BENCHMARKS.md."""
    command = " ".join([".venv/bin/python", "benchmarks/pipeline.py", *sys.argv[1:]])
    out = [
        f"## Pipeline run of {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (issue 10)",
        "",
        f"- Machine: {machine()}; shared with other work while measured.",
        f"- Versions: {versions()}",
        f"- Command: `{command}`",
        f"- Data: {sizes.users:,} simulated users; {sizes.history_hours} hours of history "
        f"({info['history_staged']:,} staged events, {info['profiles']:,} profiles in the state), built once in "
        f"{info['seconds']:.0f} s; the hour {END:%Y-%m-%d %H}:00 UTC with about {sizes.events:,} events; "
        f"{sizes.buckets} buckets; 24 h lateness window (validation deduplicates against the staged events of the "
        f"last 25 hours); champion {info['champion'] or 'none (scores null)'}.",
        "",
    ]
    if "tasks" in sections:
        out += [
            f"### Tasks of `profile_refresh`, each in its own process ({facts.get('read', 0):,} rows read, "
            f"{facts.get('profiles', 0):,} profiles scored by {', '.join(facts.get('model', []))})",
            "",
            table(sections["tasks"]),
            "",
        ]
    if "dag" in sections:
        out += ["### The hour as a DAG run", "", table(sections["dag"]), ""]
    if "train" in sections:
        out += ["### Training and evaluation of a challenger", "", table(sections["train"]), ""]
    if "scaling" in sections:
        out += [
            "### Scaling (stage seconds, one process per variant, stages in DAG order)",
            "",
            scaling_table(sections["scaling"]),
            "",
        ]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=Sizes.users)
    parser.add_argument("--events", type=int, default=Sizes.events, help="events of the benchmark hour")
    parser.add_argument("--history-hours", type=int, default=Sizes.history_hours)
    parser.add_argument("--buckets", type=int, default=Sizes.buckets)
    parser.add_argument("--runs", type=int, default=3, help="runs of every task")
    parser.add_argument("--dag-runs", type=int, help="runs of the DAG (default: --runs)")
    parser.add_argument("--train-runs", type=int, help="runs of training + evaluation (default: --runs)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--train-rows", type=int, default=1_000_000)
    parser.add_argument("--scale-events", default="100000,1000000,3000000")
    parser.add_argument("--scale-buckets", default="1,2,4")
    parser.add_argument("--no-champion", action="store_true", help="no model in the base lake (scores are null)")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "profile-engine-pipeline-bench",
        help="cache of base lakes and working copies (outside the repository)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run, nothing appended")
    parser.add_argument("--no-append", action="store_true", help="print the section, do not append to BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--bucket", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--summaries", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections and append (or print) the results."""
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    sys.path.insert(0, str(ROOT / "include"))
    if args.quick:
        sizes = replace(QUICK, champion=QUICK.champion and not args.no_champion)
        args.runs, args.dag_runs, args.train_runs, args.no_append = 1, 1, 1, True
        args.train_rows = min(args.train_rows, 5_000)
        scale_events, scale_buckets = [2_000, 5_000], [1, 2]
    else:
        sizes = Sizes(args.users, args.events, args.history_hours, args.buckets, not args.no_champion)
        scale_events = [int(x) for x in args.scale_events.split(",") if x]
        scale_buckets = [int(x) for x in args.scale_buckets.split(",") if x]
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[pipeline {time.monotonic() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    base, info = base_lake(args.work, sizes, log)
    sections: dict[str, Any] = {}
    facts: dict[str, Any] = {}
    if "tasks" in wanted:
        sections["tasks"], facts = bench_tasks(base, args.work, sizes, info, args.runs, log)
    if "dag" in wanted:
        task_sum = sum(facts["task_medians"].values()) if facts else None
        sections["dag"] = bench_dag(base, args.work, sizes, info, args.dag_runs or args.runs, task_sum, log)
    if "train" in wanted:
        sections["train"] = bench_train(
            base, args.work, sizes, info, args.train_runs or args.runs, args.train_rows, log
        )
    if "scaling" in wanted:
        sections["scaling"] = bench_scaling(base, args.work, sizes, info, scale_events, scale_buckets, log)
    text = render(args, sizes, info, sections, facts)
    print(text)
    if args.json:
        raw = {k: ([asdict(r) for r in v] if k != "scaling" else v) for k, v in sections.items()}
        args.json.write_text(
            json.dumps({"sizes": asdict(sizes), "info": info, "facts": facts, "sections": raw}, default=str)
        )
    if not args.no_append:
        with (ROOT / "BENCHMARKS.md").open("a") as handle:
            handle.write("\n" + text + "\n")
    for name in ("tasks", "dag", "train", "scale"):
        shutil.rmtree(args.work / name, ignore_errors=True)
    log(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
