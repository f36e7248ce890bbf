"""Every command's --help names its arguments and shows example command lines, with the hour format where it takes hours."""

from __future__ import annotations

import pytest

from profile_engine import cli
from profile_engine.hours import parse_hour

PARSER = cli.build_parser()
COMMANDS = cli.subcommands(PARSER)
# Subcommands with an hour argument (FIRST/LAST/HOUR): their help must show the format and an example hour.
HOUR_METAVARS = ("FIRST", "LAST", "HOUR")


def help_of(name: str) -> str:
    return COMMANDS[name].format_help()


def takes_an_hour(name: str) -> bool:
    usage = COMMANDS[name].format_usage()
    return any(metavar in usage.split() or f"{metavar}]" in usage for metavar in HOUR_METAVARS)


def test_the_commands_a_newcomer_needs_are_there() -> None:
    assert {"simulate", "run-hours", "replay", "demo", "verify", "models"} <= set(COMMANDS)
    assert {name for name in COMMANDS if takes_an_hour(name)} >= {"simulate", "run-hours", "verify"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_shows_an_example(name: str) -> None:
    text = help_of(name)

    assert f"python -m profile_engine {name}" in text.split("examples:")[-1], text


@pytest.mark.parametrize("name", sorted(n for n in COMMANDS if takes_an_hour(n)))
def test_commands_taking_an_hour_give_its_format_and_an_example_that_parses(name: str) -> None:
    text = help_of(name)
    examples = [line.split() for line in text.split("examples:")[-1].splitlines() if name in line]
    hours = [word for words in examples for word in words if word[:2] == "20" and "T" in word]

    assert "YYYY-MM-DDTHH" in text
    assert hours, f"{name} --help has no example hour"
    for hour in hours:
        parse_hour(hour)  # the examples use the format they document
    # and the example command lines parse as a whole
    for words in examples:
        PARSER.parse_args(words[words.index(name) :])


def test_a_bad_hour_names_the_expected_format(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        PARSER.parse_args(["run-hours", "2026-12-01T05:30", "2026-12-01T06"])

    err = capsys.readouterr().err
    assert "not an hour boundary" in err and "YYYY-MM-DDTHH" in err
