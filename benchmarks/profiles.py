"""Benchmark of the profile stage (issue 5): full build, hourly refresh, memory per bucket.

Reproducible: the data comes from the simulator (``simulate_hour``, deterministic per
hour, no defects), staged directly per user bucket as ``validate_events`` would stage
it, into lakes under ``--work`` (reused across invocations when the sizes match).
Every measured step runs in its own Python process, ``--runs`` times; the parent
reports the median, min and max of the wall time of the step (imports excluded) and
the child's peak RSS, and appends them to ``BENCHMARKS.md`` with the date, machine,
versions and the exact command.

Figures:

1. ``full_build``: all staged events of the build set into profiles (the rebuild path:
   ``rebuild_bucket`` + ``snapshot`` + population features) with one bucket, next to
   ``duckdb_floor``: one plain DuckDB group-by over the same Parquet files (per user
   and type: count, first/last time, spend), the scan floor of the machine.
2. ``refresh_31d`` / ``refresh_60d``: ``build_profiles`` of every bucket plus
   ``publish_profiles`` for one busy hour on top of 31 and 60 days of history (built
   once in bulk with ``build_profiles_range``), and ``rebuild_60d``: a full rebuild of
   those 60 days plus the hour.
3. ``bucket_of_N``: peak memory of building one bucket (bucket 0) of the build set
   staged over N buckets, N in 1, 4, 16.
4. ``--publish-compare OLD_INCLUDE``: ``publish_profiles`` alone (RFM, validation,
   change log) of one hour of a lake of ``--publish-users`` simulated users over
   ``--publish-buckets`` buckets, run alternately with this checkout's package and the
   package in ``OLD_INCLUDE`` (e.g. an exported older commit), each run in a fresh
   process; prints medians and ratios (append them to BENCHMARKS.md by hand).
   ``--publish-stage segments``: the same for ``publish_segments`` of that hour (the shipped
   rules, first-hour heuristic scores, the hour before published first so hysteresis,
   cooldowns and the suppress change have a previous hour); each run also reports the
   export files' checksums, and the comparison says whether both packages wrote the same files.
   ``--publish-stage report``: ``write_run_report`` of that hour on the segments' lake (drift against the
   hour before, its scores). For ``profiles`` and ``report`` too each run reports its output files'
   checksums (the partitions of the profiles and the change log; the report without its ``written_at``) and
   the comparison says whether both packages wrote the same; each run's peak RSS and CPU seconds are listed.
   ``--segments-profile``: that ``publish_segments`` once under cProfile, timed by the process's CPU
   (where its CPU goes, per function, cumulative).
5. ``--hour-scaling OLD_INCLUDE``: one hour's ``build_profiles`` against the state's size (issue 19),
   this checkout and ``OLD_INCLUDE`` alternately (``--scaling-keep-new``: this checkout's lake of the last
   invocation kept, for a change that left the layout as it was; ``--scaling-busy``: the 12:00 UTC hours, about
   20k events each as the issue's target has them, in lakes of their own, instead of the quiet 00:00 UTC hours
   that compact the day before); ``--hour-statements``: on this checkout's scaling lake
   (built by ``--hour-scaling``, only read), every DuckDB statement of ``advance`` and ``snapshot`` of the
   ``--scaling-days`` hours timed (medians of ``--runs``, wall and process CPU seconds), to see where an hour
   goes before changing it; with ``--statements-lake DIR --statements-hour H [--statements-bucket N]`` on
   hour ``H`` of any built lake instead (settings from ``PROFILE_ENGINE_*``, e.g. a copy of a
   ``benchmarks/pipeline.py`` base lake with the hour staged).

    .venv/bin/python benchmarks/profiles.py            # the sizes in BENCHMARKS.md
    .venv/bin/python benchmarks/profiles.py --quick    # a small smoke run, nothing appended
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from inspect import signature
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ORIGIN = datetime(2026, 9, 1, tzinfo=UTC)  # users sign up around here, well before the data
END = datetime(2026, 11, 20, 12, tzinfo=UTC)  # the hour refreshed (and the last hour of the build set)
TZ = "Europe/Berlin"
SEED = 7


@dataclass(frozen=True)
class Sizes:
    """Everything that decides the data; the work folder is reused only when these match.

    The defaults fit about 15 minutes on 2 cores; the issue's sizes (10M events of 1M
    users, history at 20k events an hour) are ``--issue-sizes``.
    """

    build_users: int = 300_000
    build_hours: int = 32
    build_intensity: float = 4.0
    history_users: int = 50_000
    history_days: int = 60
    history_intensity: float = 0.5
    refresh_intensity: float = 36.0
    refresh_buckets: int = 2


# Intensities calibrated on the simulator: 2.0 gave 15.1M build events and 2.5 about 46k history events an hour.
ISSUE = Sizes(
    build_users=1_000_000,
    build_hours=64,
    build_intensity=1.32,
    history_users=200_000,
    history_days=60,
    history_intensity=1.09,
    refresh_intensity=9.0,
    refresh_buckets=4,
)
QUICK = Sizes(
    build_users=20_000,
    build_hours=12,
    build_intensity=2.0,
    history_users=5_000,
    history_days=33,
    history_intensity=1.0,
    refresh_intensity=6.0,
)


# ---- data ----------------------------------------------------------------------------
def _stage(lakes: dict[int, Path], hours: list[datetime], users: int, intensity: float, log: str) -> int:
    """Simulate ``hours`` and stage their events into one lake per bucket count; returns the events."""
    import duckdb
    import pyarrow.compute as pc

    from profile_engine.contracts.events import BUCKET, STAGED_SCHEMA, bucket_sql
    from profile_engine.lake.storage import STAGING, Lake
    from profile_engine.profiles.merge import with_local_hour
    from profile_engine.sources.simulate import simulate_hour

    total, started = 0, time.monotonic()
    for i, hour in enumerate(hours):
        events = simulate_hour(
            hour, users=users, seed=SEED, business_tz=TZ, defects=False, origin=ORIGIN, intensity=intensity
        )
        total += events.num_rows
        con = duckdb.connect()
        con.register("e", events)
        for buckets, root in lakes.items():
            staged = con.sql(f"SELECT *, {bucket_sql('user_id', buckets)} AS {BUCKET} FROM e").to_arrow_table()
            staged = with_local_hour(staged, TZ).select(STAGED_SCHEMA.names).cast(STAGED_SCHEMA)
            for b in range(buckets):
                part = staged.filter(pc.equal(staged.column(BUCKET), b))
                Lake(root).write_partition(STAGING, hour, part, bucket=b, run_id="bench")
        con.close()
        if (i + 1) % 24 == 0 or i + 1 == len(hours):
            print(
                f"[bench] {log}: {i + 1}/{len(hours)} hours, {total} events, {time.monotonic() - started:.0f}s",
                flush=True,
            )
    return total


def prepare(work: Path, sizes: Sizes) -> dict[str, Any]:
    """Simulate and stage the build set and the history (once per ``sizes``), build the history in bulk."""
    stamp = work / "sizes.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("sizes") == asdict(sizes):
        _upgrade_history(work, sizes)
        return dict(json.loads(stamp.read_text()))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from profile_engine.config import Settings
    from profile_engine.hours import HOUR, hour_range
    from profile_engine.profiles import build

    build_hours = [END - HOUR * (sizes.build_hours - i) for i in range(sizes.build_hours)] + [END]
    build_events = _stage(
        {n: work / f"build_b{n}" for n in (1, 4, 16)},
        build_hours,
        sizes.build_users,
        sizes.build_intensity,
        "build set",
    )

    first = END - timedelta(days=sizes.history_days)
    history = list(hour_range(first, END - HOUR))
    lakes = {31: work / "refresh_31d", sizes.history_days: work / "refresh_60d"}
    history_events = _stage(
        {sizes.refresh_buckets: lakes[sizes.history_days]},
        history,
        sizes.history_users,
        sizes.history_intensity,
        "history",
    )
    refresh_events = _stage(
        {sizes.refresh_buckets: lakes[sizes.history_days]},
        [END],
        sizes.history_users,
        sizes.refresh_intensity,
        "refresh hour",
    )
    short = lakes[31] / "staging" / "events"
    short.mkdir(parents=True)
    for hour in hour_range(END - timedelta(days=31), END):
        source = lakes[sizes.history_days] / "staging" / "events" / f"dt={hour:%Y-%m-%d}" / f"hour={hour:%H}"
        shutil.copytree(source, short / f"dt={hour:%Y-%m-%d}" / f"hour={hour:%H}")
    bulk: dict[str, float] = {}
    for days, root in lakes.items():
        settings = replace(Settings(), lake=root, buckets=sizes.refresh_buckets, business_tz=TZ)
        started = time.monotonic()
        start = END - timedelta(days=days)
        for b in range(settings.buckets):
            build.build_profiles_range(settings, start, END - HOUR, b, first_hour=start, snapshot_every=24)
        build.publish_profiles(settings, END - HOUR)
        bulk[f"{days}d"] = round(time.monotonic() - started, 1)
        print(f"[bench] history of {days} days built in bulk in {bulk[f'{days}d']}s", flush=True)
    info = {
        "sizes": asdict(sizes),
        "build_events": build_events,
        "build_hours": len(build_hours),
        "history_events": history_events,
        "refresh_events": refresh_events,
        "bulk_build_seconds": bulk,
    }
    stamp.write_text(json.dumps(info, indent=2))
    return info


def _upgrade_history(work: Path, sizes: Sizes) -> None:
    """Bring the cached history lakes' state checkpoint (the hour before ``END``) to the current
    layout once, so that no refresh run pays the conversion (``build.upgrade_state``)."""
    from profile_engine.hours import HOUR
    from profile_engine.lake.storage import STATE, Lake
    from profile_engine.profiles import build

    for name in ("refresh_31d", "refresh_60d"):
        lake = Lake(work / name)
        for b in range(sizes.refresh_buckets):
            if lake.committed(STATE, END - HOUR, b) and build.upgrade_state(lake, END - HOUR, b):
                print(f"[bench] {name} bucket {b}: state upgraded to the current layout", flush=True)


# ---- measured steps (each in its own process) --------------------------------------------
def _settings(root: Path, buckets: int) -> Any:
    from profile_engine.config import Settings

    return replace(Settings(), lake=root, buckets=buckets, business_tz=TZ)


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss would carry the parent's over fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure_export_phase(out: dict[str, Any]) -> None:
    """Measure ``publish_segments``' export phase apart: the lake's directory writers (``Lake.write_dir``, and
    ``Lake.write_dir_streamed`` where the package has it) are wrapped to note the peak RSS so far (the bucket
    phases), reset the peak (``/proc/self/clear_refs``) and note the resident set then, the export's own peak, wall
    and CPU seconds."""
    from profile_engine.lake import storage as lk

    depth = [0]

    def wrap(method: Any) -> Any:
        def measured(self: Any, *args: Any, **kwargs: Any) -> Any:
            if depth[0]:  # write_dir by way of write_dir_streamed: measured once
                return method(self, *args, **kwargs)
            depth[0] += 1
            out["before_export_peak_rss_mb"] = _peak_rss_mb()
            Path("/proc/self/clear_refs").write_text("5")
            out["export_start_rss_mb"] = _rss_mb()
            started, cpu_started = time.monotonic(), time.process_time()
            try:
                return method(self, *args, **kwargs)
            finally:
                depth[0] -= 1
                out["export_s"] = time.monotonic() - started
                out["export_cpu_s"] = time.process_time() - cpu_started
                out["export_peak_rss_mb"] = _peak_rss_mb()

        return measured

    for attr in ("write_dir", "write_dir_streamed"):
        if hasattr(lk.Lake, attr):
            setattr(lk.Lake, attr, wrap(getattr(lk.Lake, attr)))


def _rss_mb() -> float:
    """This process's resident set now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def step(name: str, work: Path, sizes: Sizes) -> dict[str, Any]:
    """Run one measured step in this process; returns seconds, peak RSS and what it produced."""
    import duckdb  # noqa: F401  imported before the clock starts, as a worker would have it
    import pyarrow  # noqa: F401

    from profile_engine.contracts.traits import load_traits
    from profile_engine.hours import HOUR
    from profile_engine.profiles import build, population, replay
    from profile_engine.profiles.snapshot import snapshot

    out: dict[str, Any] = {}
    if name.startswith(("refresh_", "publish_")):
        # publish_profiles validates with Great Expectations: its import (several seconds, once
        # per worker process) is measured apart, like every other import.
        started = time.monotonic()
        import great_expectations  # noqa: F401

        out["gx_import_s"] = time.monotonic() - started
    if name.startswith("segments_"):
        from profile_engine.segments.publish import publish_segments  # imported before the clock, like the rest
    if name.startswith("report_"):
        from profile_engine.ops.report import write_run_report  # imported before the clock, like the rest
    hour = END
    started, cpu_started = time.monotonic(), time.process_time()
    if name == "duckdb_floor":
        import duckdb as db

        glob = str(work / "build_b1" / "staging" / "events" / "**" / "*.parquet")
        relation = db.sql(
            f"""SELECT user_id, event_type, count(*) AS n, min(ts) AS first_ts, max(ts) AS last_ts,
                       sum(price * quantity) FILTER (WHERE event_type = 'purchase') AS spend
                FROM read_parquet('{glob}') GROUP BY ALL"""
        )
        assert relation is not None  # a SELECT always gives a relation
        table = relation.to_arrow_table()
        out["rows"] = table.num_rows
    elif name in ("full_build", "rebuild_60d") or name.startswith("bucket_of_"):
        if name == "full_build":
            root, buckets, built = work / "build_b1", 1, [0]
        elif name == "rebuild_60d":
            root, buckets, built = work / "refresh_60d", sizes.refresh_buckets, list(range(sizes.refresh_buckets))
        else:
            n = int(name.removeprefix("bucket_of_"))
            root, buckets, built = work / f"build_b{n}", n, [0]
        settings = _settings(root, buckets)
        parts = []
        for b in built:
            _, state = replay.rebuild_bucket(settings, hour, b)
            parts.append(snapshot(state, hour + HOUR, settings)[0])
            del state
        profiles = (
            population.population_snapshot(parts, hour, load_traits(settings.traits))
            if len(built) == buckets
            else parts[0]
        )
        out["profiles"] = profiles.num_rows
    elif name.startswith("segments_"):  # segments_<users>_<buckets>: publish_segments of the prepared hour
        users, buckets = (int(v) for v in name.removeprefix("segments_").split("_"))
        _measure_export_phase(out)
        published = publish_segments(_settings(work / f"publish_{users}_{buckets}", buckets), hour, run_id="bench")
        out["profiles"], out["members"] = published["profiles"], published["members"]
        manifest = json.loads(Path(published["manifest_path"]).read_text())
        out["exports_sha256"] = {f["name"]: f["sha256"] for f in manifest["files"]}
    elif name.startswith("publish_"):  # publish_<users>_<buckets>: re-publish the prepared hour
        users, buckets = (int(v) for v in name.removeprefix("publish_").split("_"))
        published = build.publish_profiles(_settings(work / name, buckets), hour, run_id="bench")
        out["profiles"] = published["profiles"]
        out["outputs_sha256"] = _published_checksums(work / name, buckets)
    elif name.startswith("report_"):  # report_<users>_<buckets>: the run report of the prepared hour
        users, buckets = (int(v) for v in name.removeprefix("report_").split("_"))
        root = work / f"publish_{users}_{buckets}"
        write_run_report(_settings(root, buckets), hour, {}, run_id="bench")
        out["outputs_sha256"] = _report_checksum(root)
    elif name.startswith("refresh_"):
        settings = _settings(work / name, sizes.refresh_buckets)
        built_rows = [build.build_profiles(settings, hour, b, run_id="bench") for b in range(settings.buckets)]
        out["build_s"] = time.monotonic() - started
        published = build.publish_profiles(settings, hour, run_id="bench")
        out["publish_s"] = time.monotonic() - started - out["build_s"]
        out["events_merged"] = sum(r["events_merged"] for r in built_rows)
        out["profiles"] = published["profiles"]
    else:
        raise SystemExit(f"unknown step {name}")
    out["seconds"] = time.monotonic() - started
    # CPU time of every thread of the step: less disturbed than wall time on a shared machine
    out["cpu_s"] = time.process_time() - cpu_started
    # the peak of the whole step: the export phase's measurement resets the process's peak
    out["peak_rss_mb"] = max(_peak_rss_mb(), out.get("before_export_peak_rss_mb", 0.0))
    out["loadavg_1m"] = os.getloadavg()[0]
    return out


def _published_checksums(root: Path, buckets: int) -> dict[str, str]:
    """The files ``publish_profiles`` wrote for ``END`` (profiles and change log per bucket), by their manifests."""
    from profile_engine.lake.storage import PROFILE_CHANGES, PROFILES, Lake

    lake = Lake(root)
    return {
        f"{layer}/{b}": ",".join(f["sha256"] for f in lake.manifest(layer, END, b)["files"])
        for layer in (PROFILES, PROFILE_CHANGES)
        for b in range(buckets)
    }


def _report_checksum(root: Path) -> dict[str, str]:
    """The run report of ``END`` without its ``written_at`` (report.json, and the HTML page), hashed."""
    import hashlib

    from profile_engine.lake.storage import REPORTS, Lake

    base = Lake(root).partition(REPORTS, END)
    report = json.loads((base / "report.json").read_text())
    report.pop("written_at", None)
    html = (base / "report.html").read_text()
    return {
        "report.json": hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest(),
        "report.html": hashlib.sha256(html.encode()).hexdigest(),
    }


def _run_step(name: str, work: Path, flags: list[str], package: Path | None = None) -> dict[str, Any]:
    """One run of ``step`` in a fresh process (``package``: the include/ directory to import from)."""
    command = [sys.executable, __file__, "--step", name, "--work", str(work), *flags]
    env = None if package is None else {**os.environ, "PYTHONPATH": str(package)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"step {name} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def prepare_publish(work: Path, users: int, buckets: int, hours: int = 8, intensity: float = 2.0) -> str:
    """A lake of ``users`` simulated users over ``buckets`` buckets, built and published up to ``END`` (once)."""
    from profile_engine.hours import HOUR
    from profile_engine.profiles import build

    name = f"publish_{users}_{buckets}"
    root = work / name
    if (root / "ready.json").is_file():
        return name
    shutil.rmtree(root, ignore_errors=True)
    span = [END - HOUR * (hours - 1 - i) for i in range(hours)]
    events = _stage({buckets: root}, span, users, intensity, "publish set")
    settings = _settings(root, buckets)
    for b in range(buckets):
        build.build_profiles_range(settings, span[0], END - HOUR, b, first_hour=span[0])
        build.build_profiles(settings, END, b)  # after the hour before, so the change log has a previous snapshot
    build.publish_profiles(settings, END - HOUR)
    published = build.publish_profiles(settings, END)
    (root / "ready.json").write_text(json.dumps({"events": events, "profiles": published["profiles"]}))
    return name


def prepare_segments(work: Path, users: int, buckets: int) -> str:
    """The ``prepare_publish`` lake with scores of ``END`` and the hour before and that hour's segments (once)."""
    from profile_engine.hours import HOUR
    from profile_engine.model.scoring import score_profiles
    from profile_engine.segments.publish import publish_segments

    root = work / prepare_publish(work, users, buckets)
    name = f"segments_{users}_{buckets}"
    if not (root / "segments_ready.json").is_file():
        settings = _settings(root, buckets)
        for hour in (END - HOUR, END):
            for b in range(buckets):
                score_profiles(settings, hour, b, run_id="bench")
        published = publish_segments(settings, END - HOUR, run_id="bench")
        (root / "segments_ready.json").write_text(json.dumps({"previous_members": published["members"]}))
    return name


def compare_publish(
    work: Path, old_package: Path, users: int, buckets: int, runs: int, stage: str = "profiles"
) -> dict[str, Any]:
    """``publish_profiles`` (or ``publish_segments``) of this checkout and of ``old_package``, alternately, medians."""
    name = prepare_publish(work, users, buckets) if stage == "profiles" else prepare_segments(work, users, buckets)
    if stage == "report":  # the run report of the segments' lake (scores of the hour and the one before)
        name = f"report_{users}_{buckets}"
    results: dict[str, list[dict[str, Any]]] = {"new": [], "old": []}
    for _ in range(runs):
        results["new"].append(_run_step(name, work, [], ROOT / "include"))
        results["old"].append(_run_step(name, work, [], old_package))
    ready = work / f"publish_{users}_{buckets}" / "ready.json"
    summary: dict[str, Any] = {"step": name, "runs": runs, **json.loads(ready.read_text())}
    for code, rows in results.items():
        summary[code] = {
            "median_s": statistics.median(r["seconds"] for r in rows),
            "min_s": min(r["seconds"] for r in rows),
            "max_s": max(r["seconds"] for r in rows),
            "cpu_s": statistics.median(r["cpu_s"] for r in rows),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rows),
            "peak_rss_max_mb": max(r["peak_rss_mb"] for r in rows),
            "peak_rss_each_mb": [round(r["peak_rss_mb"]) for r in rows],
            "cpu_each_s": [round(r["cpu_s"], 2) for r in rows],
            **({"gx_import_s": statistics.median(r["gx_import_s"] for r in rows)} if stage == "profiles" else {}),
        }
    if stage == "segments":
        for code, rows in results.items():
            fields = (
                "before_export_peak_rss_mb",
                "export_start_rss_mb",
                "export_peak_rss_mb",
                "export_s",
                "export_cpu_s",
            )
            for field in fields:
                summary[code][field] = statistics.median(r[field] for r in rows)
                summary[code][field.removesuffix("_mb").removesuffix("_s") + "_each"] = [
                    round(r[field], 2) for r in rows
                ]
        summary["loadavg_1m_each"] = [r["loadavg_1m"] for rows in results.values() for r in rows]
        every = [r["exports_sha256"] for rows in results.values() for r in rows]
        summary["same_export_files"] = all(sha == every[0] for sha in every)
        summary["members"] = results["new"][0]["members"]
    else:  # the same files from both packages (publish_profiles' partitions; the report without its time)
        every = [r["outputs_sha256"] for rows in results.values() for r in rows]
        summary["same_output_files"] = all(sha == every[0] for sha in every)
    summary["time_ratio_new_over_old"] = summary["new"]["median_s"] / summary["old"]["median_s"]
    summary["rss_ratio_new_over_old"] = summary["new"]["peak_rss_mb"] / summary["old"]["peak_rss_mb"]
    print(f"[bench] {json.dumps(summary)}", flush=True)
    return summary


def profile_segments(work: Path, users: int, buckets: int, top: int = 40) -> str:
    """``publish_segments`` of the prepared hour (``prepare_segments``) once in this process under cProfile with the
    process's CPU time as its clock (DuckDB's threads included): the functions by cumulative CPU seconds."""
    import cProfile
    import io
    import pstats

    from profile_engine.segments.publish import publish_segments

    name = prepare_segments(work, users, buckets)
    settings = _settings(work / f"publish_{users}_{buckets}", buckets)
    profiler = cProfile.Profile(time.process_time)
    started, cpu_started = time.monotonic(), time.process_time()
    profiler.enable()
    published = publish_segments(settings, END, run_id="bench")
    profiler.disable()
    wall, cpu = time.monotonic() - started, time.process_time() - cpu_started
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    head = f"{name}: {published['profiles']} profiles, wall {wall:.2f} s, CPU {cpu:.2f} s (profiled), "
    return head + f"peak RSS {_peak_rss_mb():.0f} MB\n{text.getvalue()}"


def measure(name: str, work: Path, runs: int, flags: list[str]) -> dict[str, Any]:
    """Run ``step`` ``runs`` times, each in a fresh process; median/min/max of time and peak RSS."""
    results = [_run_step(name, work, flags) for _ in range(runs)]
    secs = [r["seconds"] for r in results]
    rss = [r["peak_rss_mb"] for r in results]
    summary = {
        "step": name,
        "runs": runs,
        "median_s": statistics.median(secs),
        "min_s": min(secs),
        "max_s": max(secs),
        "peak_rss_mb": statistics.median(rss),
        "peak_rss_max_mb": max(rss),
        **{k: v for k, v in results[0].items() if k not in ("seconds", "peak_rss_mb")},
        # parts of a step's time (``*_s``): medians too
        **{k: statistics.median(r[k] for r in results) for k in results[0] if k.endswith("_s") and k != "seconds"},
    }
    print(f"[bench] {json.dumps(summary)}", flush=True)
    return summary


# ---- hour scaling (issue 19): one hour's build_profiles against growing state ------------------
SCALING_USERS = 100_000
SCALING_DAYS = 30
SCALING_INTENSITY = 1.3  # about 20k events in a 12:00 UTC hour of 100k users (the measured 00:00 UTC ones: 2.3k-4.3k)
SCALING_POINTS = (1, 2, 4, 8, 16, 29)  # days (and 12 hours) of history before the measured hour
SCALING_PARTS = ("read_state", "advance", "snapshot", "write_state", "write_profiles", "other")


# ``--scaling-busy``: the measured hours are the 12:00 UTC ones (issue 19's "20k events an hour"); set in the
# environment so that the steps run in child processes measure the same hours.
SCALING_BUSY = "PROFILE_BENCH_SCALING_BUSY"


def _scaling_busy() -> bool:
    return os.environ.get(SCALING_BUSY) == "1"


def _scaling_root(work: Path) -> Path:
    """The scaling lakes' directory: one per kind of measured hour (their checkpoints differ)."""
    return work / ("hour_scaling_busy" if _scaling_busy() else "hour_scaling")


def _scaling_hours() -> tuple[datetime, list[datetime]]:
    """The history's first hour (12:00 UTC) and the measured hours: 00:00 UTC, after each of ``SCALING_POINTS``
    days and 12 hours of history (01:00 or 02:00 in ``TZ``: a quiet hour, and the one that compacts the day
    before); with ``--scaling-busy`` the 12:00 UTC hour after each of ``SCALING_POINTS`` days (13:00 or 14:00
    in ``TZ``: about 20k events at 100k users, the issue's hour)."""
    first = END - timedelta(days=SCALING_DAYS)
    late = timedelta(hours=0 if _scaling_busy() else 12)
    return first, [first + timedelta(days=d) + late for d in SCALING_POINTS]


def prepare_hour_scaling(work: Path, old_package: Path, derive: bool = False, keep_new: bool = False) -> dict[str, Any]:
    """Stage ``SCALING_DAYS`` days of one bucket once, then build them with each package (its own lake;
    the old package's lake is reused, this checkout's rebuilt).

    Each lake gets the staging as hard links and a state checkpoint at the hour before each
    measured hour (``build_profiles_range`` in segments ending there), built by that package
    in its own process, so each measures its own state layout. ``derive``: this checkout's lake is
    the old one (hard links) with the day before each measured hour rebuilt by this checkout from
    the old checkpoint before it (``hour_step("derive")``): minutes instead of a 30-day build, for a
    change that reads the old layout (older lakes must keep working anyway) and writes its own.
    ``keep_new``: this checkout's lake of the last invocation is kept too (a change of the code that left
    the lake's layout as it was: the measurement again without the 12-minute build).
    """
    from profile_engine.hours import hour_range

    root = _scaling_root(work)
    stamp = root / "ready.json"
    first, measured = _scaling_hours()
    if not (root / "staged" / "ready").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        quiet = work / "hour_scaling" / "staged"  # the 00:00 UTC hours' staging holds the busy hours' too
        if _scaling_busy() and (quiet / "ready").is_file():
            subprocess.run(["cp", "-al", str(quiet), str(root / "staged")], check=True)
        else:
            hours = list(hour_range(first, measured[-1]))
            _stage({1: root / "staged"}, hours, SCALING_USERS, SCALING_INTENSITY, "hour scaling")
            (root / "staged" / "ready").write_text("ok")
    info: dict[str, Any] = {"users": SCALING_USERS, "days": SCALING_DAYS, "intensity": SCALING_INTENSITY}
    if stamp.is_file():  # the old package's lake is kept; this checkout's is rebuilt every time
        kept = ("old_", "new_") if keep_new and (root / "new").is_dir() else ("old_",)
        info |= {k: v for k, v in json.loads(stamp.read_text()).items() if k.startswith(kept)}
    codes = (("old", old_package), ("new", ROOT / "include"))  # old first: ``derive`` copies its lake
    for code, package in codes if derive else codes[::-1]:
        if f"{code}_build" in info:
            continue
        lake = root / code
        shutil.rmtree(lake, ignore_errors=True)
        started = time.monotonic()
        if code == "new" and derive:
            subprocess.run(["cp", "-al", str(root / "old"), str(lake)], check=True)
            info[f"{code}_build"] = _run_hour_step("derive", lake, package)
            info[f"{code}_build_s"] = round(time.monotonic() - started, 1)
            info["new_derived"] = True
            print(f"[bench] hour scaling: {code} lake derived in {info[f'{code}_build_s']}s", flush=True)
            continue
        (lake / "staging").mkdir(parents=True)
        subprocess.run(["cp", "-al", str(root / "staged" / "staging" / "events"), str(lake / "staging")], check=True)
        info[f"{code}_build"] = _run_hour_step("build", lake, package)
        info[f"{code}_build_s"] = round(time.monotonic() - started, 1)
        print(f"[bench] hour scaling: {code} lake built in {info[f'{code}_build_s']}s", flush=True)
    stamp.write_text(json.dumps(info, indent=2))
    return info


def _state_rows(lake: Path, hour: datetime) -> dict[str, int]:
    """Rows per state table of the checkpoint of ``hour`` (bucket 0), from the Parquet footers, plus the
    tile rows it reads (``sealed_<table>``: sealed by its end) when the layout has them."""
    import pyarrow.parquet as pq

    from profile_engine.lake.storage import STATE, Lake

    rows = {
        f.stem: pq.read_metadata(f).num_rows for f in sorted(Lake(lake).partition(STATE, hour, 0).glob("*.parquet"))
    }
    tiles = lake / "state_tiles" / "bucket=0"
    end = int((hour + timedelta(hours=1)).timestamp()) * 1000
    for f in sorted(tiles.rglob("*.parquet")) if tiles.is_dir() else []:
        sealed = pq.read_table(f, columns=["sealed_ms"]).column("sealed_ms").to_numpy()
        key = "sealed_" + f.parent.parent.name
        rows[key] = rows.get(key, 0) + int((sealed <= end).sum())
    return rows


def hour_step(name: str, lake: Path) -> dict[str, Any]:
    """In this process: ``build`` the scaling lake's checkpoints, or time ``hour_<i>``'s ``build_profiles``
    split into its parts (timers wrapped around the functions it calls; ``other``: the rest)."""
    import duckdb  # noqa: F401  imported before the clock starts
    import pyarrow  # noqa: F401

    from profile_engine.hours import HOUR
    from profile_engine.profiles import build

    settings = _settings(lake, 1)
    first, measured = _scaling_hours()
    if name in ("build", "derive"):
        start = first
        for hour in measured:
            if name == "derive":  # from the checkpoint a day before (23:00 UTC, every 24 hours)
                start = hour - timedelta(days=1)
            build.build_profiles_range(settings, start, hour - HOUR, 0, first_hour=first, snapshot_every=24)
            start = hour
        return {
            "checkpoints": {str(d): _state_rows(lake, h - HOUR) for d, h in zip(SCALING_POINTS, measured, strict=True)}
        }
    return _timed_build(settings, measured[int(name.removeprefix("hour_"))], [0])


def _timed_build(settings: Any, hour: datetime, buckets: list[int]) -> dict[str, Any]:
    """``build_profiles`` of ``hour`` for ``buckets`` in this process, split into its parts (timers wrapped
    around the functions it calls; ``other``: the rest), and the users ``snapshot`` computed from the state
    (``changed``: all of them when it had no hour before to start from)."""
    from profile_engine.lake.storage import INTERESTS, PROFILES, STATE, Lake
    from profile_engine.profiles import build
    from profile_engine.profiles import snapshot as snapshot_module

    spent = dict.fromkeys(SCALING_PARTS, 0.0)
    changed = {"users": 0, "changed": 0}

    def timed(function: Any, part: str) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.monotonic()
            try:
                return function(*args, **kwargs)
            finally:
                spent[part] += time.monotonic() - began

        return wrapper

    build.read_state = timed(build.read_state, "read_state")  # type: ignore[assignment]
    build.advance = timed(build.advance, "advance")  # type: ignore[assignment]
    build.snapshot = timed(build.snapshot, "snapshot")  # type: ignore[assignment]
    for optional, part in (("seal_state", "write_state"),):
        if hasattr(build, optional):
            setattr(build, optional, timed(getattr(build, optional), part))
    if hasattr(snapshot_module, "from_previous_hour"):  # count the users the snapshot computes from the state
        changed_only = snapshot_module.from_previous_hour

        def counted(con: Any, *args: Any) -> Any:
            profiles = changed_only(con, *args)
            changed["changed"] += con.sql(f"SELECT count(*) FROM {snapshot_module.CHANGED}").fetchall()[0][0]
            changed["incremental"] = changed.get("incremental", 0) + 1
            return profiles

        snapshot_module.from_previous_hour = counted
    write = Lake.write_partition

    def write_partition(self: Any, layer: str, *args: Any, **kwargs: Any) -> Any:
        part = "write_state" if layer == STATE else "write_profiles" if layer in (PROFILES, INTERESTS) else "other"
        began = time.monotonic()
        try:
            return write(self, layer, *args, **kwargs)
        finally:
            spent[part] += time.monotonic() - began

    Lake.write_partition = write_partition  # type: ignore[method-assign]
    started, cpu_started = time.monotonic(), time.process_time()
    built = [build.build_profiles(settings, hour, b, run_id="bench") for b in buckets]
    total = time.monotonic() - started
    spent["other"] += total - sum(spent.values())
    users = sum(b["users"] for b in built)
    return {
        "seconds": total,
        "cpu_s": time.process_time() - cpu_started,
        "peak_rss_mb": _peak_rss_mb(),
        "events": sum(b["events_read"] for b in built),
        "users": users,
        "changed_users": changed["changed"] if changed.get("incremental") == len(buckets) else users,
        **{f"{k}_s": v for k, v in spent.items()},
    }


def lake_hour_step(lake: Path, hour: datetime, action: str) -> dict[str, Any]:
    """In this process, on a copy of any built lake (settings from ``PROFILE_ENGINE_*``, the lake replaced):
    ``prepare`` builds every bucket hour by hour from the newest state checkpoint before ``hour`` up to the
    hour before it, so that hour's checkpoint and profiles are this package's; ``time`` is ``_timed_build``
    of ``hour`` for every bucket."""
    from profile_engine.config import Settings
    from profile_engine.hours import HOUR
    from profile_engine.lake.storage import STATE, Lake
    from profile_engine.profiles import build

    settings = replace(Settings.from_env(), lake=lake)
    buckets = list(range(settings.buckets))
    if action == "time":
        return _timed_build(settings, hour, buckets)
    checkpoints = [h for h in build.staged_hours(Lake(lake), 0, STATE) if h < hour - HOUR]
    if not checkpoints:
        raise SystemExit(f"{lake}: no state checkpoint before {hour:%Y-%m-%dT%H}")
    built = 0
    for b in buckets:
        at = checkpoints[-1] + HOUR
        while at < hour:
            build.build_profiles(settings, at, b, run_id="bench-prepare")
            at += HOUR
            built += 1
    return {"from_checkpoint": checkpoints[-1].isoformat(), "hours_built": built}


def compare_lake_hour(work: Path, source: Path, hour: datetime, old_package: Path, runs: int) -> str:
    """``build_profiles`` of ``hour`` (every bucket) on copies of the built lake ``source``, this checkout and
    ``old_package`` alternately in fresh processes (each copy prepared by its own package); medians."""
    results: dict[str, list[dict[str, Any]]] = {"new": [], "old": []}
    packages = {"new": ROOT / "include", "old": old_package}
    prepared = {}
    for code, package in packages.items():
        lake = work / "lake_hour" / code
        shutil.rmtree(lake, ignore_errors=True)
        lake.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", str(source), str(lake)], check=True)
        prepared[code] = _run_lake_hour(lake, hour, "prepare", package)
    for _ in range(runs):
        for code, package in packages.items():
            results[code].append(_run_lake_hour(work / "lake_hour" / code, hour, "time", package))
    lines = [
        f"### {source}, hour {hour:%Y-%m-%dT%H} (every bucket; medians of {runs}, new and old alternately)",
        "",
        f"Prepared from checkpoint {prepared['new']['from_checkpoint']} ({prepared['new']['hours_built']} bucket-hours built by each package).",
        "",
        "| code | events | users | users computed from the state | total s | CPU s | read_state | advance | snapshot | write_state | write_profiles | other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for code, rs in results.items():
        m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        parts = " | ".join(f"{m[f'{p}_s']:.3f}" for p in SCALING_PARTS)
        lines.append(
            f"| {code} | {m['events']:,.0f} | {m['users']:,.0f} | {m['changed_users']:,.0f} | {m['seconds']:.3f} | {m['cpu_s']:.3f} | {parts} |"
        )
    return "\n".join(lines) + "\n"


def _run_lake_hour(lake: Path, hour: datetime, action: str, package: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--lake-hour-step",
        action,
        "--work",
        str(lake),
        "--lake-hour-at",
        hour.isoformat(),
    ]
    return _run_child(command, package, f"lake hour {action}")


def _run_hour_step(name: str, lake: Path, package: Path) -> dict[str, Any]:
    """One ``hour_step`` in a fresh process importing the package in ``package``."""
    return _run_child(
        [sys.executable, __file__, "--hour-step", name, "--work", str(lake)], package, f"hour step {name}"
    )


def _run_child(command: list[str], package: Path, what: str) -> dict[str, Any]:
    """Run a step of this script in a fresh process importing the package in ``package``; its last line (JSON)."""
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(package)}
    )
    if done.returncode != 0:
        raise SystemExit(f"{what} ({package}) failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def compare_hour_scaling(
    work: Path,
    old_package: Path,
    runs: int,
    days: tuple[int, ...] = SCALING_POINTS,
    derive: bool = False,
    keep_new: bool = False,
) -> str:
    """One hour's ``build_profiles`` (1 bucket) at each history length, this checkout and ``old_package``
    alternately in fresh processes; medians of ``runs``, parts and ratios as a markdown table."""
    info = prepare_hour_scaling(work, old_package, derive, keep_new)
    root = _scaling_root(work)
    _, measured = _scaling_hours()
    rows = []
    for i, history in enumerate(SCALING_POINTS):
        if history not in days:
            continue
        results: dict[str, list[dict[str, Any]]] = {"new": [], "old": []}
        for _ in range(runs):
            results["new"].append(_run_hour_step(f"hour_{i}", root / "new", ROOT / "include"))
            results["old"].append(_run_hour_step(f"hour_{i}", root / "old", old_package))
        medians = {
            code: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
            for code, rs in results.items()
        }
        state_rows = {code: info[f"{code}_build"]["checkpoints"][str(history)] for code in ("new", "old")}
        row = {"days": history, "events": results["new"][0]["events"], "users": results["new"][0]["users"]}
        row |= {"state_rows": state_rows, "medians": medians}
        print(f"[bench] {json.dumps(row)}", flush=True)
        rows.append(row)
    text = render_hour_scaling(info, rows, runs)
    (root / "results.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    return text


def render_hour_scaling(info: dict[str, Any], rows: list[dict[str, Any]], runs: int) -> str:
    """Markdown: per history length, the state rows and the medians of each part, new and old, and ratios."""

    def rows_of(counts: dict[str, int]) -> int:
        return sum(v for k, v in counts.items() if k != "meta")

    head = (
        "| days | events | users | state rows (old) | rows in checkpoint (new) | tile rows read (new) | code | total s | "
        + " | ".join(SCALING_PARTS)
        + " |\n|"
        + "---|" * (8 + len(SCALING_PARTS))
    )
    lines = [head]
    for r in rows:
        for code in ("old", "new"):
            m = r["medians"][code]
            lines.append(
                f"| {r['days']} | {r['events']:,} | {r['users']:,} | {rows_of(r['state_rows']['old']):,} | "
                f"{rows_of({k: v for k, v in r['state_rows']['new'].items() if not k.startswith('sealed_')}):,} | "
                f"{sum(v for k, v in r['state_rows']['new'].items() if k.startswith('sealed_')):,} | "
                f"{code} | {m['seconds']:.2f} | " + " | ".join(f"{m[p + '_s']:.2f}" for p in SCALING_PARTS) + " |"
            )
    base = rows[0]["medians"]
    scaling = " ".join(
        f"{r['days']}d: old {r['medians']['old']['seconds'] / base['old']['seconds']:.2f}x, "
        f"new {r['medians']['new']['seconds'] / base['new']['seconds']:.2f}x;"
        for r in rows
    )
    ratios = " ".join(
        f"{r['days']}d {r['medians']['new']['seconds'] / r['medians']['old']['seconds']:.2f};" for r in rows
    )
    built = ": derived from the old lake, the day before each measured hour rebuilt" if info.get("new_derived") else ""
    measured_hour = (
        "the 12:00 UTC hour after each number of days (`--scaling-busy`; the history starts at 12:00 UTC)"
        if _scaling_busy()
        else "the 00:00 UTC hour after each number of days (and 12 hours: the history starts at 12:00 UTC)"
    )
    biggest = rows[-1]["state_rows"]["old"]
    tables = ", ".join(f"{k} {v:,}" for k, v in sorted(biggest.items(), key=lambda kv: -kv[1]) if v)
    return f"""
## Hour scaling (issue 19): one hour's build_profiles against the state's size, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC

- Machine: {_machine()}; {_versions()}
- Command: `.venv/bin/python benchmarks/profiles.py --hour-scaling OLD_INCLUDE [--scaling-days ...]` (old = the previous commit's
  `include/`); {info["users"]:,} simulated users, intensity {info["intensity"]}, one bucket, {measured_hour}; each lake built by its own package
  (new {info["new_build_s"]} s{built}, old {info["old_build_s"]} s); medians of {runs} runs, new and old alternately, each in a fresh process.
- Parts: `read_state`, `advance`, `snapshot`, `write_state` (the checkpoint and, new, tile files),
  `write_profiles` (profiles and interests), `other` (staging read, bookkeeping).

{chr(10).join(lines)}

Time relative to the shortest history: {scaling}
new / old: {ratios}
Rows of the largest checkpoint ({rows[-1]["days"]} days, old layout): {tables}.
"""


def _cpu_s() -> float:
    """User + system CPU seconds of this process, every thread (DuckDB's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def hour_statements(
    work: Path,
    days: tuple[int, ...],
    runs: int,
    top: int = 24,
    lake_dir: Path | None = None,
    hour: datetime | None = None,
    bucket: int = 0,
) -> str:
    """Where ``advance`` and ``snapshot`` of the measured hours spend their time: every DuckDB statement
    they run, timed (wall and process CPU seconds), on the checkpoints of this checkout's scaling lake
    (``--work``/hour_scaling/new, built by ``--hour-scaling``), or on hour ``hour`` of bucket ``bucket``
    of any built lake ``lake_dir`` (its settings from ``PROFILE_ENGINE_*``). Lakes are only read. Each hour
    runs ``runs`` + 1 times (the first a warm-up); a markdown table of the ``top`` statements by median,
    their share of the two functions, and the rest."""
    import duckdb

    from profile_engine.hours import HOUR
    from profile_engine.lake import db
    from profile_engine.lake.storage import STAGING, Lake
    from profile_engine.profiles import build, merge
    from profile_engine.profiles import snapshot as snapshot_module

    if lake_dir is None:
        lake_dir = _scaling_root(work) / "new"
        if not (lake_dir / "state").is_dir():
            raise SystemExit(f"{lake_dir}: no scaling lake; build it first with --hour-scaling")
    spent: list[tuple[str, str, float, float]] = []
    where = ["advance"]

    class Timed:
        """A DuckDB connection whose statements (``execute``, ``sql(...).to_arrow_table()``) are timed."""

        def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
            self.con = con

        def execute(self, sql: str, *args: Any) -> Any:
            began, cpu = time.monotonic(), _cpu_s()
            try:
                return self.con.execute(sql, *args)
            finally:
                spent.append((where[0], sql, time.monotonic() - began, _cpu_s() - cpu))

        def sql(self, sql: str, *args: Any) -> Any:
            relation = self.con.sql(sql, *args)

            class Fetch:
                def to_arrow_table(self) -> Any:
                    began, cpu = time.monotonic(), _cpu_s()
                    try:
                        return relation.to_arrow_table()
                    finally:
                        spent.append((where[0], sql, time.monotonic() - began, _cpu_s() - cpu))

                def __getattr__(self, name: str) -> Any:
                    return getattr(relation, name)

            return Fetch()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.con, name)

    # advance, snapshot and the helpers they call open their connections with ``db.cursor()``
    cursor = db.cursor
    db.cursor = lambda *a, **k: Timed(cursor(*a, **k))  # type: ignore[assignment,return-value]
    if hour is None:
        settings = _settings(lake_dir, 1)
        _, measured = _scaling_hours()
        points = [(f"{history} days of history", h) for history, h in zip(SCALING_POINTS, measured, strict=True)]
        points = [(label, h) for (label, h), history in zip(points, SCALING_POINTS, strict=True) if history in days]
    else:
        from profile_engine.config import Settings

        settings = replace(Settings.from_env(), lake=lake_dir)
        points = [(f"{lake_dir.name}, hour {hour:%Y-%m-%dT%H}, bucket {bucket}", hour)]
    out = []
    for label, at in points:
        lake = Lake(lake_dir)
        state = build.read_state(lake, at - HOUR, bucket)
        events = lake.read(STAGING, at, bucket)
        previous = build.previous_hour(lake, settings, state, events, bucket)  # as build_profiles passes it
        # as build_profiles calls it: keeping the unrounded affinities for the next hour, where the package does
        keep = {"keep_affinities": True} if "keep_affinities" in signature(snapshot_module.snapshot).parameters else {}
        per: dict[tuple[str, str], list[tuple[float, float]]] = {}
        totals: dict[str, list[tuple[float, float]]] = {"advance": [], "snapshot": []}
        for run in range(runs + 1):
            spent.clear()
            where[0] = "advance"
            began, cpu = time.monotonic(), _cpu_s()
            advanced = merge.advance(state, events, at + HOUR, settings)
            advance_s = (time.monotonic() - began, _cpu_s() - cpu)
            where[0] = "snapshot"
            began, cpu = time.monotonic(), _cpu_s()
            snapshot_module.snapshot(advanced, at + HOUR, settings, previous, **keep)
            snapshot_s = (time.monotonic() - began, _cpu_s() - cpu)
            if run == 0:
                continue
            totals["advance"].append(advance_s)
            totals["snapshot"].append(snapshot_s)
            for function, sql, seconds, cpu_seconds in spent:
                per.setdefault((function, " ".join(sql.split())), []).append((seconds, cpu_seconds))

        def medians(values: list[tuple[float, float]]) -> tuple[float, float]:
            return statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)

        median = {k: medians(v) for k, v in per.items()}
        whole = {k: medians(v) for k, v in totals.items()}
        lines = [
            "| function | median s | median CPU s | % of the function (CPU) | statement |",
            "|---|---|---|---|---|",
        ]
        ranked = sorted(median.items(), key=lambda kv: -kv[1][1])
        for (function, sql), (seconds, cpu_seconds) in ranked[:top]:
            short = sql[:110].replace("|", "\\|")
            share = 100 * cpu_seconds / whole[function][1] if whole[function][1] else 0.0
            lines.append(f"| {function} | {seconds:.3f} | {cpu_seconds:.3f} | {share:.1f} | `{short}` |")
        rest = sum(cpu_seconds for _, (_, cpu_seconds) in ranked[top:])
        outside = {f: whole[f][1] - sum(c for (g, _), (_, c) in median.items() if g == f) for f in whole}
        out.append(
            f"""
### {label}: {events.num_rows:,} events in the hour, {state.tables["users"].num_rows:,} users in the state

`advance` {whole["advance"][0]:.2f} s ({whole["advance"][1]:.2f} CPU s), `snapshot` {whole["snapshot"][0]:.2f} s
({whole["snapshot"][1]:.2f} CPU s) (medians of {runs} runs after a warm-up); CPU outside DuckDB statements
(registering, Arrow concatenation and casts): advance {outside["advance"]:.2f} s, snapshot {outside["snapshot"]:.2f} s;
the {max(0, len(ranked) - top)} statements not listed: {rest:.3f} CPU s together.

{chr(10).join(lines)}
"""
        )
    db.cursor = cursor  # type: ignore[assignment]
    return "".join(out)


# ---- report ----------------------------------------------------------------------------------
def _machine() -> str:
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def _versions() -> str:
    import duckdb
    import pyarrow

    return f"Python {platform.python_version()}, duckdb {duckdb.__version__}, pyarrow {pyarrow.__version__}"


def render(info: dict[str, Any], rows: dict[str, dict[str, Any]], command: str) -> str:
    """The markdown section appended to BENCHMARKS.md."""

    def line(label: str, r: dict[str, Any]) -> str:
        return (
            f"| {label} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} | {r.get('cpu_s', 0):.2f} "
            f"| {r['peak_rss_mb']:.0f} | {r['runs']} |"
        )

    s = info["sizes"]
    full, floor = rows["full_build"], rows["duckdb_floor"]
    r31, r60, rb = rows["refresh_31d"], rows["refresh_60d"], rows["rebuild_60d"]
    ratio_floor = full["median_s"] / floor["median_s"]
    ratio_60_31 = r60["median_s"] / r31["median_s"]
    ratio_rebuild = rb["median_s"] / r60["median_s"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    head = "| step | median s | min s | max s | median CPU s | peak RSS MB (median) | runs |\n|---|---|---|---|---|---|---|"
    return f"""
## Run of {datetime.now(UTC):%Y-%m-%d %H:%M} UTC

- Machine: {_machine()}
- Versions: {_versions()}
- Command: `{command}`
- Build set: {info["build_events"]:,} events of {s["build_users"]:,} simulated users over {info["build_hours"]} hours
  (intensity {s["build_intensity"]}); {full.get("profiles", 0):,} profiles.
- History: {s["history_days"]} days of {s["history_users"]:,} users, {info["history_events"]:,} events
  (about {info["history_events"] / (s["history_days"] * 24):,.0f} per hour); the refreshed hour has
  {info["refresh_events"]:,} events; {s["refresh_buckets"]} buckets. Built once in bulk in
  {info["bulk_build_seconds"]} seconds (`build_profiles_range`, daily checkpoints).

### 1. Full build vs the DuckDB scan floor

{head}
{line("duckdb_floor (group-by per user and type)", floor)}
{line("full_build (every feature, 1 bucket)", full)}

Full build / floor: **{ratio_floor:.1f}x** (issue 19: at most 10x, {verdict(ratio_floor <= 10)}; issue 5 asked 3x).

### 2. Hourly refresh on top of 31 and 60 days

{head}
{line("refresh_31d (build_profiles x buckets + publish_profiles)", r31)}
{line("refresh_60d", r60)}
{line("rebuild_60d (full rebuild of 60 days + the hour)", rb)}

60-day / 31-day refresh: **{ratio_60_31:.2f}x** (target at most 1.2x: {verdict(ratio_60_31 <= 1.2)});
full rebuild / 60-day refresh: **{ratio_rebuild:.1f}x** (target at least 20x: {verdict(ratio_rebuild >= 20)}).
Of the 60-day refresh, `build_profiles` of every bucket took {r60.get("build_s", 0):.2f} s and `publish_profiles`
{r60.get("publish_s", 0):.2f} s (medians); importing Great Expectations, which `publish_profiles` needs and a worker
process pays once, took {r60.get("gx_import_s", 0):.1f} s and is not included.

### 3. Peak memory of one bucket

{head}
{chr(10).join(line(f"bucket 0 of {n} (rebuild + snapshot of the build set)", rows[f"bucket_of_{n}"]) for n in (1, 4, 16))}
"""


def main() -> None:
    """Prepare the data, run every step in its own processes, append the results to BENCHMARKS.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "profile-engine-bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, nothing appended to BENCHMARKS.md")
    parser.add_argument("--issue-sizes", action="store_true", help="the sizes of issue 5 (hours of machine time)")
    parser.add_argument("--publish-compare", type=Path, metavar="OLD_INCLUDE", help="publish_profiles: this vs older")
    parser.add_argument("--publish-users", type=int, default=200_000)
    parser.add_argument("--publish-buckets", type=int, default=4)
    parser.add_argument("--publish-stage", choices=("profiles", "segments", "report"), default="profiles")
    parser.add_argument(
        "--segments-profile", action="store_true", help="publish_segments of --publish-users/-buckets under cProfile"
    )
    parser.add_argument("--hour-scaling", type=Path, metavar="OLD_INCLUDE", help="one hour vs state size (issue 19)")
    parser.add_argument("--scaling-days", help=f"days of history measured (comma-separated, of {SCALING_POINTS})")
    parser.add_argument(
        "--hour-statements", action="store_true", help="time each DuckDB statement of advance and snapshot (issue 19)"
    )
    parser.add_argument("--statements-lake", type=Path, help="--hour-statements on this built lake (only read)")
    parser.add_argument("--statements-hour", help="--hour-statements: the hour measured in --statements-lake (ISO)")
    parser.add_argument("--statements-bucket", type=int, default=0, help="--hour-statements: the bucket measured")
    parser.add_argument("--scaling-derive", action="store_true", help="derive this checkout's lake from the old one")
    parser.add_argument("--scaling-keep-new", action="store_true", help="--hour-scaling: keep this checkout's lake")
    parser.add_argument(
        "--scaling-busy", action="store_true", help="--hour-scaling/--hour-statements: the 12:00 UTC hours (20k events)"
    )
    parser.add_argument("--lake-hour", type=Path, help="time build_profiles of one hour of this built lake (copied)")
    parser.add_argument("--lake-hour-at", help="--lake-hour: the hour measured (ISO, UTC)")
    parser.add_argument("--lake-hour-compare", type=Path, metavar="OLD_INCLUDE", help="--lake-hour: the older package")
    parser.add_argument("--lake-hour-step", help=argparse.SUPPRESS)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--hour-step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scaling_busy:
        os.environ[SCALING_BUSY] = "1"  # read by this process's and its children's ``_scaling_hours``
    sizes = QUICK if args.quick else ISSUE if args.issue_sizes else Sizes()
    if args.step:
        print(json.dumps(step(args.step, args.work, sizes)))
        return
    if args.lake_hour_step:
        print(json.dumps(lake_hour_step(args.work, datetime.fromisoformat(args.lake_hour_at), args.lake_hour_step)))
        return
    if args.lake_hour:
        if not (args.lake_hour_at and args.lake_hour_compare):
            raise SystemExit("--lake-hour needs --lake-hour-at and --lake-hour-compare")
        at = datetime.fromisoformat(args.lake_hour_at)
        print(compare_lake_hour(args.work, args.lake_hour, at, args.lake_hour_compare, args.runs))
        return
    if args.hour_step:
        print(json.dumps(hour_step(args.hour_step, args.work)))
        return
    if args.hour_statements:
        days = tuple(int(d) for d in args.scaling_days.split(",")) if args.scaling_days else SCALING_POINTS
        at = datetime.fromisoformat(args.statements_hour) if args.statements_hour else None
        lake_arg = args.statements_lake
        if (lake_arg is None) != (at is None):
            raise SystemExit("--statements-lake and --statements-hour go together")
        print(hour_statements(args.work, days, args.runs, lake_dir=lake_arg, hour=at, bucket=args.statements_bucket))
        return
    if args.hour_scaling:
        days = tuple(int(d) for d in args.scaling_days.split(",")) if args.scaling_days else SCALING_POINTS
        print(
            compare_hour_scaling(
                args.work, args.hour_scaling, args.runs, days, args.scaling_derive, args.scaling_keep_new
            )
        )
        return
    if args.segments_profile:
        print(profile_segments(args.work, args.publish_users, args.publish_buckets))
        return
    if args.publish_compare:
        compare_publish(
            args.work, args.publish_compare, args.publish_users, args.publish_buckets, args.runs, args.publish_stage
        )
        return
    info = prepare(args.work, sizes)
    steps = ["duckdb_floor", "full_build", "refresh_31d", "refresh_60d", "rebuild_60d", "bucket_of_4", "bucket_of_16"]
    flags = [f for f in ("--quick", "--issue-sizes") if getattr(args, f[2:].replace("-", "_"))]
    rows = {name: measure(name, args.work, args.runs, flags) for name in steps}
    rows["bucket_of_1"] = rows["full_build"]  # one bucket of one is the full build
    command = " ".join([".venv/bin/python", "benchmarks/profiles.py", *sys.argv[1:]])
    text = render(info, rows, command)
    print(text)
    if not args.quick:
        target = ROOT / "BENCHMARKS.md"
        with target.open("a") as handle:
            handle.write(text)
        (args.work / "results.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
