"""Command line: run stages outside Airflow for scripts, debugging and tests.

As thin as the DAG files: every subcommand parses its arguments and calls one package function.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from profile_engine.config import Settings
from profile_engine.hours import format_hour, parse_hour


def _hour(text: str) -> datetime:
    try:
        return parse_hour(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error}; expected {HOUR_FORMAT}") from error


def _print(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))


def cmd_simulate(args: argparse.Namespace) -> int:
    """Write simulated landing files (and the ground truth) for a range of arrival hours."""
    from profile_engine.lake.storage import Lake
    from profile_engine.sources.simulate import simulate

    settings = Settings.from_env()
    summary = simulate(
        Lake(settings.lake),
        args.first,
        args.last,
        users=args.users,
        seed=args.seed if args.seed is not None else settings.seed,
        business_tz=settings.business_tz,
        defects=not args.no_defects,
    )
    _print(asdict(summary))
    return 0


# Exit status of run-hours and replay when an hour breached the quarantine threshold.
EXIT_QUARANTINE_BREACH = 3
# Exit status when a file does not match its mapping or a mapping is invalid.
EXIT_INPUT_ERROR = 2


def cmd_run_hours(args: argparse.Namespace) -> int:
    """Process hours in-process, in order, with the hour runner; a quarantine breach stops the range (exit 3).

    Each hour's report headline goes to stdout as it is written; progress goes to stderr.
    """
    from profile_engine.hours import hour_range
    from profile_engine.ingest import events as ingest
    from profile_engine.ops import runner
    from profile_engine.ops.progress import Progress, duration

    settings = Settings.from_env()
    hours = list(hour_range(args.first, args.last))
    progress = Progress("run-hours", len(hours))
    totals = {"read": 0, "staged": 0, "quarantined": 0, "failed": 0}
    try:
        for hour in hours:
            progress.start_hour(hour)
            try:
                summary = runner.run_hour(
                    settings,
                    hour,
                    first_hour=args.start or settings.start or args.first,
                    force_retrain=args.force_retrain,
                    force_promote=args.force_promote,
                    dry_run=args.dry_run,
                    on_stage=progress.stage,
                )
            except ingest.QuarantineThresholdExceeded as error:
                progress.close()
                print(f"run-hours: quarantine threshold exceeded, later hours not run: {error}", file=sys.stderr)
                return EXIT_QUARANTINE_BREACH
            headline = summary["write_run_report"]
            for key in ("read", "staged", "quarantined"):
                totals[key] += headline.get("rows_read" if key == "read" else key) or 0
            totals["failed"] += headline.get("status") != "success"
            progress.clear()
            _print(headline)
            sys.stdout.flush()
            progress.hour_done(headline.get("rows_read") or 0)
    finally:
        progress.close()
    print(
        f"run-hours: {len(hours)} hours in {duration(progress.clock() - progress.started)}: {totals['read']:,} events "
        f"read, {totals['staged']:,} staged, {totals['quarantined']:,} quarantined; {totals['failed']} hour(s) "
        f"failed; reports in {settings.lake / 'reports'}",
        file=sys.stderr,
    )
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Land an event log by event hour through a mapping and process all its hours; exit 3 on a quarantine breach."""
    from pathlib import Path

    from profile_engine.ops import runner
    from profile_engine.ops.progress import Progress

    settings = Settings.from_env()
    shown: list[Progress] = []

    def progress(total: int) -> Progress:
        shown.append(Progress("replay", total))
        return shown[-1]

    if sys.stderr.isatty():  # a transient line, replaced by the progress bar (errors stay one line in logs)
        print(f"\r[replay] landing {args.file} by event hour ...", end="", file=sys.stderr, flush=True)
    try:
        summary = runner.replay(
            settings, Path(args.file), args.mapping, quality_suite=not args.no_quality, progress=progress
        )
    finally:
        for bar in shown:
            bar.close()
    _print(summary)
    if summary["breaches"]:
        lines = [
            f"  {b['hour']} {b['source']}: {b['defective']} of {b['read']} rows defective "
            f"({b['defective_share']:.1%} > threshold {b['threshold']:.1%}); reasons {b['reasons']}"
            for b in summary["breaches"]
        ]
        hours = len({b["hour"] for b in summary["breaches"]})
        print(f"replay: quarantine threshold exceeded in {hours} hour(s):", *lines, sep="\n", file=sys.stderr)
        return EXIT_QUARANTINE_BREACH
    return 0


def cmd_land(args: argparse.Namespace) -> int:
    """Land an event log into ``landing/`` by event hour through a mapping, as a producer would; process nothing."""
    from profile_engine.sources import mappings, replay

    settings = Settings.from_env()
    plan = replay.land_for_replay(settings, Path(args.file), mappings.load_mapping(args.mapping, settings.lake))
    print(replay.describe_landing(plan, settings.lake))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulate a shop, warm up its history in bulk and run the hourly DAG through Airflow."""
    from profile_engine.ops import demo

    demo.run_demo(users=args.users, history_days=args.history_days, hours=args.hours, seed=args.seed, last=args.last)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Land the demo shop's missing hours, start ``airflow standalone`` on 127.0.0.1, print address and login."""
    from profile_engine.ops import demo

    return demo.run_ui(port=args.port)


def cmd_models(args: argparse.Namespace) -> int:
    """List, show, promote, roll back or export model versions (manual changes apply from the next unprocessed hour)."""
    from profile_engine.model import registry

    settings = Settings.from_env()
    try:
        if args.action == "list":
            _print(registry.list_models(settings))
        elif args.action == "show":
            _print(registry.show_model(settings, args.version))
        elif args.action == "promote":
            _print(registry.promote_manually(settings, args.version, reason=args.reason))
        elif args.action == "export-inference":
            from profile_engine.model.artifacts import export_inference

            _print({"version": args.version, "files": export_inference(settings, args.version)})
        else:
            _print(registry.rollback_manually(settings, to_version=args.to, reason=args.reason))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}")
        return 1
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Rebuild an hour's snapshot (or every hour of --hour..--to) from staged events and compare it with the
    committed one (1 if any differs, ``EXIT_INPUT_ERROR`` naming the hour when it cannot); a line per rebuilt
    bucket goes to stderr, the outcome of each hour to stdout."""
    from profile_engine.ops.progress import duration
    from profile_engine.profiles.verify import verify_hours

    settings = Settings.from_env()
    started = time.monotonic()

    def bucket_done(bucket: int, hours: int) -> None:
        print(
            f"[verify] bucket {bucket + 1}/{settings.buckets} rebuilt, {hours} hour(s), "
            f"{duration(time.monotonic() - started)} so far",
            file=sys.stderr,
            flush=True,
        )

    try:
        results = verify_hours(settings, args.hour, args.to or args.hour, keep_scratch=args.keep, on_bucket=bucket_done)
    except (ValueError, FileNotFoundError) as error:  # an hour not committed, a staging gap, an empty range
        print(f"verify: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    for result in results:
        print(result.render())
    different = [format_hour(r.hour) for r in results if not r.equal]
    if len(results) > 1:
        print(
            f"verify: {len(results)} hours, {len(results) - len(different)} equal, {len(different)} different"
            + (f": {', '.join(different)}" if different else "")
        )
    return 1 if different else 0


def cmd_lock(args: argparse.Namespace) -> int:
    """Show the lake lock's owner (``--force-release`` removes it: for a DAG run that died before its report)."""
    from profile_engine.lake import lock

    _print(lock.status(Settings.from_env(), force_release=args.force_release))
    return 0


def cmd_freshness(args: argparse.Namespace) -> int:
    """Check that a profile snapshot was committed recently; alert (webhook/SMTP) and return 1 if not."""
    from profile_engine.ops.alerts import run_freshness_check

    result = run_freshness_check(Settings.from_env())
    _print(result)
    return 0 if result["fresh"] else 1


def cmd_erase(args: argparse.Namespace) -> int:
    """Erase users from every retained dataset and tombstone them; prints counts, never ids."""
    import getpass

    from profile_engine.ops.erasure import erase_request

    _print(
        erase_request(
            Settings.from_env(),
            user_ids=args.user_id or [],
            ids_file=args.file,
            requested_by=f"cli:{getpass.getuser()}",
            reason=args.reason,
            tombstone_unknown=args.tombstone_unknown,
        )
    )
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    """Delete hour partitions older than PROFILE_ENGINE_RETENTION_DAYS (``--dry-run``: only list them)."""
    from profile_engine.ops.retention import run_retention

    _print(run_retention(Settings.from_env(), dry_run=args.dry_run))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the lake's size by dataset (bytes, files, newest committed hour) and its newest committed hour."""
    from profile_engine.lake.storage import Lake
    from profile_engine.lake.usage import lake_usage

    settings = Settings.from_env()
    _print(lake_usage(Lake(settings.lake), buckets=settings.buckets))
    return 0


# The hour format every hour argument takes (profile_engine.hours.parse_hour).
HOUR_FORMAT = (
    "a UTC hour as YYYY-MM-DDTHH, e.g. 2026-12-01T05 (also ISO 8601 on the hour: 2026-12-01T05:00:00+00:00, "
    "2026-12-01T06:00+01:00, 2026-12-01T05:00Z; without an offset it is UTC)"
)


def cmd_traits(args: argparse.Namespace) -> int:
    """Print the loaded declared traits (defaults plus PROFILE_ENGINE_TRAITS) as a markdown table."""
    from profile_engine.contracts.traits import load_traits, traits_markdown

    sys.stdout.write(traits_markdown(load_traits(Settings.from_env().traits)))
    return 0


def _file_and_mapping(parser: argparse.ArgumentParser) -> None:
    """The ``--file`` and ``--mapping`` arguments of the commands that read an event log."""
    parser.add_argument("--file", required=True, help="the event log (CSV, Parquet or JSON Lines, optionally .gz)")
    parser.add_argument("--mapping", required=True, help="a mapping in include/config/sources/ by name, or a YAML path")


def _sub(
    sub: Any, name: str, help: str, description: str, examples: list[str], *, examples_title: str = "examples"
) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its description and example command lines."""
    lines = "\n".join(f"  python -m profile_engine {name} {e}".rstrip() for e in examples)
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=textwrap.fill(description, 100),
        epilog=f"{examples_title}:\n{lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand; each --help names its arguments and shows examples."""
    parser = argparse.ArgumentParser(
        prog="python -m profile_engine",
        description=__doc__,
        epilog=f"Hours: {HOUR_FORMAT}.\nEvery command: python -m profile_engine COMMAND --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _sub(
        sub,
        "simulate",
        "write simulated landing files for arrival hours FIRST..LAST",
        f"Write a simulated shop's landing files (and its ground truth) for arrival hours FIRST..LAST. "
        f"FIRST and LAST are {HOUR_FORMAT}.",
        ["2026-12-01T00 2026-12-01T23", "2026-12-01T00 2026-12-02T23 --users 500 --seed 3 --no-defects"],
    )
    p.add_argument("first", type=_hour, metavar="FIRST", help="first arrival hour, e.g. 2026-12-01T00")
    p.add_argument("last", type=_hour, metavar="LAST", help="last arrival hour, inclusive, e.g. 2026-12-01T23")
    p.add_argument("--users", type=int, default=2000, help="number of simulated users (default 2000)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default PROFILE_ENGINE_SEED, 7)")
    p.add_argument("--no-defects", action="store_true", help="no late, duplicate or malformed data")
    p.set_defaults(func=cmd_simulate)

    p = _sub(
        sub,
        "run-hours",
        "process hours FIRST..LAST in-process (no Airflow)",
        f"Process the hours FIRST..LAST in order, in this process, with the same stages as the hourly DAG. "
        f"FIRST and LAST are {HOUR_FORMAT}. Progress goes to stderr (a bar on a terminal, plain lines "
        "otherwise); each hour's report headline goes to stdout. Exit 3 when an hour breaches the "
        "quarantine threshold (later hours are not run).",
        ["2026-12-01T00 2026-12-01T23", "2026-12-02T00 2026-12-02T05 --start 2026-12-01T00 --dry-run"],
    )
    p.add_argument("first", type=_hour, metavar="FIRST", help="first hour to process, e.g. 2026-12-01T00")
    p.add_argument("last", type=_hour, metavar="LAST", help="last hour to process, inclusive, e.g. 2026-12-01T23")
    p.add_argument(
        "--start",
        type=_hour,
        default=None,
        metavar="HOUR",
        help="the lake's first hour, e.g. 2026-12-01T00 (default PROFILE_ENGINE_START, else FIRST)",
    )
    p.add_argument("--force-retrain", action="store_true", help="train a challenger every hour, due or not")
    p.add_argument("--force-promote", action="store_true", help="promote the challenger whatever the gate says")
    p.add_argument("--dry-run", action="store_true", help="compute everything, export nothing")
    p.set_defaults(func=cmd_run_hours)

    p = _sub(
        sub,
        "replay",
        "land an event log by event hour through a mapping and process its hours",
        "Split an event log by event hour into landing/ through a source mapping, then process every hour "
        "it spans (validation per hour, profiles in bulk). No hour argument: the hours come from the file. "
        "Progress goes to stderr; the summary (with next_hour, where the hourly DAG continues) to stdout. "
        "Exit 3 when an hour breaches the quarantine threshold (every hour is still processed).",
        ["--file events.csv --mapping rees46", "--file orders.csv.gz --mapping path/to/mapping.yaml --no-quality"],
    )
    _file_and_mapping(p)
    p.add_argument("--no-quality", action="store_true", help="row rules only: no Great Expectations suite or Data Docs")
    p.set_defaults(func=cmd_replay)

    p = _sub(
        sub,
        "land",
        "land an event log into landing/ by event hour through a mapping, without processing it",
        "Land an event log into landing/events/dt=/hour=/source=MAPPING/ by event hour, as a producer would; "
        "nothing is processed. Prints the hours and rows landed and the run-hours command that processes them. "
        "No hour argument: the hours come from the file.",
        ["--file orders.csv --mapping order_lines", "--file events.csv.gz --mapping path/to/mapping.yaml"],
    )
    _file_and_mapping(p)
    p.set_defaults(func=cmd_land)

    p = _sub(
        sub,
        "demo",
        "simulate, warm up and run profile_refresh through Airflow",
        "Simulate a shop, warm up HISTORY_DAYS of history in bulk, then run profile_refresh through Airflow "
        f"for the HOURS hours ending at --last, with progress on stderr and a summary at the end. --last is "
        f"{HOUR_FORMAT}; default: the last complete UTC hour.",
        ["", "--users 500 --history-days 7 --hours 6", "--hours 3 --last 2026-11-30T13"],
    )
    p.add_argument("--users", type=int, default=2000, help="number of simulated users (default 2000)")
    p.add_argument("--history-days", type=int, default=30, help="days of warm-up history (default 30)")
    p.add_argument("--hours", type=int, default=48, help="hours run through Airflow (default 48)")
    p.add_argument("--seed", type=int, default=7, help="random seed of the shop (default 7)")
    p.add_argument(
        "--last",
        type=_hour,
        default=None,
        metavar="HOUR",
        help="the window's last hour, e.g. 2026-11-30T13 (default: the last complete hour); "
        "a fixed hour gives the same lake on every run (scripts/demo_checksums.py)",
    )
    p.set_defaults(func=cmd_demo)

    p = _sub(
        sub,
        "ui",
        "start the Airflow UI (airflow standalone) on 127.0.0.1",
        "Land the demo shop's missing hours, start airflow standalone on 127.0.0.1:PORT and print the "
        "address and login (Ctrl-C stops it).",
        ["", "--port 8081"],
    )
    p.add_argument("--port", type=int, default=8080, help="port of the UI (default 8080)")
    p.set_defaults(func=cmd_ui)

    p = _sub(
        sub,
        "models",
        "model registry: list | show VERSION | promote VERSION | rollback | export-inference VERSION",
        "List, show, promote, roll back or export model versions. A VERSION is v + the UTC hour it was "
        "trained at, e.g. v20261201T05; a manual change applies from the next unprocessed hour.",
        ["list", "show v20261201T05", "promote v20261201T05 --reason 'checked by hand'", "rollback"],
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every committed version with metrics, decision and champion status")
    a = actions.add_parser("show", help="everything recorded about one version")
    a.add_argument("version", help="e.g. v20261201T05")
    a = actions.add_parser("promote", help="make VERSION the champion from the next unprocessed hour (forced)")
    a.add_argument("version", help="e.g. v20261201T05")
    a.add_argument("--reason", default="manual promotion", help="recorded in the registry")
    a = actions.add_parser("rollback", help="bring back the previous champion from the next unprocessed hour")
    a.add_argument("--to", default=None, help="a specific earlier version, e.g. v20261130T05 (default: the previous)")
    a.add_argument("--reason", default="manual rollback", help="recorded in the registry")
    a = actions.add_parser(
        "export-inference", help="add the TensorFlow-free scoring files to VERSION (for versions trained before them)"
    )
    a.add_argument("version", help="e.g. v20261201T05")
    p.set_defaults(func=cmd_models)

    p = _sub(
        sub,
        "verify",
        "rebuild hour H from staged events and compare with its committed snapshot",
        f"Rebuild the profile snapshot of --hour (or of every hour from --hour to --to: one rebuild per bucket, then "
        f"each later staged hour merged in memory) from staged events and compare it with the committed one "
        f"(exit 1 if any differs, {EXIT_INPUT_ERROR} if it cannot: an hour not committed, a gap in staging). "
        f"--hour and --to are {HOUR_FORMAT}.",
        ["--hour 2026-12-01T05", "--hour 2026-12-01T00 --to 2026-12-01T23", "--hour 2026-12-01T05 --keep"],
    )
    p.add_argument("--hour", type=_hour, required=True, metavar="HOUR", help="the snapshot's hour, e.g. 2026-12-01T05")
    p.add_argument("--to", type=_hour, metavar="HOUR", help="verify every hour from --hour to this one (inclusive)")
    p.add_argument("--keep", action="store_true", help="keep the rebuilt snapshot in the lake's _tmp/ to inspect it")
    p.set_defaults(func=cmd_verify)

    p = _sub(
        sub,
        "lock",
        "show who holds the lake lock (_meta/lock) and whether it is stale",
        "Show the lake lock's owner; --force-release removes it (for a run that died before its report).",
        ["", "--force-release"],
    )
    p.add_argument("--force-release", action="store_true", help="remove the lock whoever holds it (logged)")
    p.set_defaults(func=cmd_lock)

    p = _sub(
        sub,
        "freshness",
        "alert when the current profile snapshot is older than the limit",
        "Check that a profile snapshot was committed within PROFILE_ENGINE_FRESHNESS_HOURS; alert and exit 1 "
        "if not. No arguments.",
        [""],
    )
    p.set_defaults(func=cmd_freshness)

    p = _sub(
        sub,
        "erase",
        "erase users from every retained dataset and tombstone them (GDPR)",
        "Erase users from every retained dataset and tombstone them; prints counts, never ids.",
        ["--user-id 17850", "--file ids.txt --reason 'ticket 123'"],
    )
    ids = p.add_mutually_exclusive_group(required=True)
    ids.add_argument("--user-id", action="append", help="a user id (repeatable)")
    ids.add_argument("--file", type=Path, help="a text file of user ids, one per line (# comments)")
    p.add_argument("--reason", default="erasure request", help="recorded in the audit log")
    p.add_argument(
        "--tombstone-unknown", action="store_true", help="tombstone ids found nowhere too (their data may arrive later)"
    )
    p.set_defaults(func=cmd_erase)

    p = _sub(
        sub,
        "retention",
        "delete hour partitions older than PROFILE_ENGINE_RETENTION_DAYS",
        "Delete hour partitions older than PROFILE_ENGINE_RETENTION_DAYS (default 90).",
        ["--dry-run", ""],
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    p.set_defaults(func=cmd_retention)

    p = _sub(
        sub,
        "status",
        "the lake's size by dataset (bytes, files) and its newest committed hour",
        "Print the lake's size by dataset (bytes, files, newest committed hour) and its newest committed hour. "
        "No arguments (the lake is PROFILE_ENGINE_LAKE).",
        [""],
    )
    p.set_defaults(func=cmd_status)

    p = _sub(
        sub,
        "traits",
        "the declared traits (defaults plus PROFILE_ENGINE_TRAITS) as a markdown table",
        "Print the declared traits the profiles carry (include/config/traits.yaml plus the file named by "
        "PROFILE_ENGINE_TRAITS) as a markdown table: name, events, aggregation, windows, group and columns. "
        "A bad spec exits 2 naming the file, the trait and the reason.",
        ["", "  # with PROFILE_ENGINE_TRAITS=my_traits.yaml: the defaults plus yours"],
    )
    p.set_defaults(func=cmd_traits)
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand of ``parser`` by name (to check or document their help)."""
    return {
        name: sub
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, sub in action.choices.items()
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    from profile_engine.contracts.traits import TraitConfigError
    from profile_engine.sources.mappings import MappingError, SourceError

    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except (MappingError, SourceError, TraitConfigError) as error:  # a file the user can fix: one line, no traceback
        print(f"{args.command}: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    return result
