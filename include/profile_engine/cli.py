"""Command line: run stages outside Airflow for scripts, debugging and tests.

As thin as the DAG files: every subcommand parses its arguments and calls one
package function.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from datetime import datetime
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
    from profile_engine.lake import Lake
    from profile_engine.simulate import simulate

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


def cmd_run_hours(args: argparse.Namespace) -> int:
    """Process hours in-process, in order, with the hour runner."""
    from profile_engine import runner

    settings = Settings.from_env()
    for summary in runner.run_hours(
        settings,
        args.first,
        args.last,
        first_hour=args.start or settings.start or args.first,
        force_retrain=args.force_retrain,
        force_promote=args.force_promote,
        dry_run=args.dry_run,
    ):
        _print(summary["write_run_report"])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Simulate a shop, warm up its history in bulk and run the hourly DAG through Airflow."""
    from profile_engine import demo

    demo.run_demo(users=args.users, history_days=args.history_days, hours=args.hours, seed=args.seed)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Start ``airflow standalone`` on 127.0.0.1:8080 continuing after the lake's last hour."""
    from profile_engine import demo

    return demo.run_ui(port=args.port)


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

    p = sub.add_parser("demo", help="simulate, warm up and run profile_refresh through Airflow")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--history-days", type=int, default=30)
    p.add_argument("--hours", type=int, default=48)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ui", help="start the Airflow UI (airflow standalone) on 127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
