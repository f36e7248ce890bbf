"""Command line: run stages outside Airflow for scripts, debugging and tests.

As thin as the DAG files: every subcommand parses its arguments and calls one
package function.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from profile_engine.config import Settings
from profile_engine.hours import parse_hour


def _hour(text: str) -> datetime:
    try:
        return parse_hour(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


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
    """Process hours in-process, in order, with the hour runner; a quarantine breach stops the range (exit 3)."""
    from profile_engine.hours import hour_range
    from profile_engine.ingest import events as ingest
    from profile_engine.ops import runner

    settings = Settings.from_env()
    for hour in hour_range(args.first, args.last):
        try:
            summary = runner.run_hour(
                settings,
                hour,
                first_hour=args.start or settings.start or args.first,
                force_retrain=args.force_retrain,
                force_promote=args.force_promote,
                dry_run=args.dry_run,
            )
        except ingest.QuarantineThresholdExceeded as error:
            print(f"run-hours: quarantine threshold exceeded, later hours not run: {error}", file=sys.stderr)
            return EXIT_QUARANTINE_BREACH
        _print(summary["write_run_report"])
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Land an event log by event hour through a mapping and process all its hours; exit 3 on a quarantine breach."""
    from pathlib import Path

    from profile_engine.ops import runner

    settings = Settings.from_env()
    summary = runner.replay(settings, Path(args.file), args.mapping, quality_suite=not args.no_quality)
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

    demo.run_demo(users=args.users, history_days=args.history_days, hours=args.hours, seed=args.seed)
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
            from profile_engine.model.training import export_inference

            _print({"version": args.version, "files": export_inference(settings, args.version)})
        else:
            _print(registry.rollback_manually(settings, to_version=args.to, reason=args.reason))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}")
        return 1
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Rebuild an hour's snapshot from staged events and compare it with the committed one (1 if they differ)."""
    from profile_engine.profiles.verify import verify_hour

    result = verify_hour(Settings.from_env(), args.hour, keep_scratch=args.keep)
    print(result.render())
    return 0 if result.equal else 1


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
    """Erase users from every retained dataset and tombstone them (issue 9); prints counts, never ids."""
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


def cmd_traits(args: argparse.Namespace) -> int:
    """Print the loaded declared traits (defaults plus PROFILE_ENGINE_TRAITS) as a markdown table."""
    from profile_engine.contracts.traits import load_traits, traits_markdown

    sys.stdout.write(traits_markdown(load_traits(Settings.from_env().traits)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="python -m profile_engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write simulated landing files for arrival hours FIRST..LAST")
    p.add_argument("first", type=_hour, help="first arrival hour (UTC, ISO)")
    p.add_argument("last", type=_hour, help="last arrival hour (UTC, ISO), inclusive")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-defects", action="store_true", help="no late, duplicate or malformed data")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("run-hours", help="process hours FIRST..LAST in-process (no Airflow)")
    p.add_argument("first", type=_hour)
    p.add_argument("last", type=_hour)
    p.add_argument(
        "--start", type=_hour, default=None, help="the lake's first hour (default PROFILE_ENGINE_START or FIRST)"
    )
    p.add_argument("--force-retrain", action="store_true")
    p.add_argument("--force-promote", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="compute everything, export nothing")
    p.set_defaults(func=cmd_run_hours)

    p = sub.add_parser("replay", help="land an event log by event hour through a mapping and process its hours")
    p.add_argument("--file", required=True, help="the event log (CSV, Parquet or JSON Lines, optionally .gz)")
    p.add_argument("--mapping", required=True, help="a mapping in include/config/sources/ by name, or a YAML path")
    p.add_argument("--no-quality", action="store_true", help="row rules only: no Great Expectations suite or Data Docs")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "land",
        help="land an event log into landing/ by event hour through a mapping, without processing it",
        description="Land an event log into landing/events/dt=/hour=/source=MAPPING/ by event hour, as a producer "
        "would; nothing is processed. Prints the hours and rows landed and the run-hours command that processes "
        "them. Example: python -m profile_engine land --file orders.csv --mapping order_lines",
    )
    p.add_argument("--file", required=True, help="the event log (CSV, Parquet or JSON Lines, optionally .gz)")
    p.add_argument("--mapping", required=True, help="a mapping in include/config/sources/ by name, or a YAML path")
    p.set_defaults(func=cmd_land)

    p = sub.add_parser("demo", help="simulate, warm up and run profile_refresh through Airflow")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--history-days", type=int, default=30)
    p.add_argument("--hours", type=int, default=48)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ui", help="start the Airflow UI (airflow standalone) on 127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser(
        "models", help="model registry: list | show VERSION | promote VERSION | rollback | export-inference VERSION"
    )
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every committed version with metrics, decision and champion status")
    a = actions.add_parser("show", help="everything recorded about one version")
    a.add_argument("version", help="e.g. v20261101T05")
    a = actions.add_parser("promote", help="make VERSION the champion from the next unprocessed hour (forced)")
    a.add_argument("version")
    a.add_argument("--reason", default="manual promotion")
    a = actions.add_parser("rollback", help="bring back the previous champion from the next unprocessed hour")
    a.add_argument("--to", default=None, help="a specific earlier version (default: the previous champion)")
    a.add_argument("--reason", default="manual rollback")
    a = actions.add_parser(
        "export-inference", help="add the TensorFlow-free scoring files to VERSION (for versions trained before them)"
    )
    a.add_argument("version")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("verify", help="rebuild hour H from staged events and compare with its committed snapshot")
    p.add_argument("--hour", type=_hour, required=True, help="the snapshot's hour (UTC, ISO, e.g. 2026-11-28T05:00)")
    p.add_argument("--keep", action="store_true", help="keep the rebuilt snapshot in the lake's _tmp/ to inspect it")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("lock", help="show who holds the lake lock (_meta/lock) and whether it is stale")
    p.add_argument("--force-release", action="store_true", help="remove the lock whoever holds it (logged)")
    p.set_defaults(func=cmd_lock)

    p = sub.add_parser("freshness", help="alert when the current profile snapshot is older than the limit")
    p.set_defaults(func=cmd_freshness)

    p = sub.add_parser("erase", help="erase users from every retained dataset and tombstone them (GDPR)")
    ids = p.add_mutually_exclusive_group(required=True)
    ids.add_argument("--user-id", action="append", help="a user id (repeatable)")
    ids.add_argument("--file", type=Path, help="a text file of user ids, one per line (# comments)")
    p.add_argument("--reason", default="erasure request", help="recorded in the audit log")
    p.add_argument(
        "--tombstone-unknown", action="store_true", help="tombstone ids found nowhere too (their data may arrive later)"
    )
    p.set_defaults(func=cmd_erase)

    p = sub.add_parser("retention", help="delete hour partitions older than PROFILE_ENGINE_RETENTION_DAYS")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    p.set_defaults(func=cmd_retention)

    p = sub.add_parser("status", help="the lake's size by dataset (bytes, files) and its newest committed hour")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("traits", help="the declared traits (defaults plus PROFILE_ENGINE_TRAITS) as a markdown table")
    p.set_defaults(func=cmd_traits)
    return parser


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
