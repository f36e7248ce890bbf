"""Progress output (a bar on a terminal, plain lines elsewhere) and the filter of known third-party noise."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from profile_engine.hours import HOUR
from profile_engine.ops import progress
from profile_engine.ops.progress import NOISE, NoiseFilter, Progress, duration

H = datetime(2026, 12, 1, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_plain_stream_gets_one_line_per_hour_with_events_stage_and_time_left() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = Progress("run-hours", 4, stream=stream, tty=False, clock=clock, every=0.0)

    for i in range(4):
        bar.start_hour(H + i * HOUR)
        bar.stage("build_profiles (4/9)")
        clock.now += 30
        bar.hour_done(events=100)
    bar.close()

    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0] == "[run-hours] 1/4 hours | 100 events | hour 2026-12-01T00 done | 1m30s left"
    assert lines[2] == "[run-hours] 3/4 hours | 300 events | hour 2026-12-01T02 done | 30s left"
    assert lines[3] == "[run-hours] 4/4 hours | 400 events | 2m00s so far"
    assert len(lines) == 4  # stages of an hour are not lines of their own on a plain stream


def test_plain_lines_are_throttled_but_the_first_and_last_hour_always_show() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = Progress("replay", 100, stream=stream, tty=False, clock=clock, every=10.0)

    for _ in range(100):
        clock.now += 1
        bar.hour_done(events=1)

    done = [line.split()[1] for line in stream.getvalue().splitlines()]
    assert done[0] == "1/100" and done[-1] == "100/100"
    assert 9 <= len(done) <= 12


def test_bulk_phases_after_the_last_hour_get_a_line_per_kind_then_throttled() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = Progress("warm-up", 1, stream=stream, tty=False, clock=clock, every=10.0)
    bar.hour_done(events=5)

    bar.stage("build_profiles bucket 1/2")
    bar.stage("build_profiles bucket 2/2")
    for i in range(1, 21):
        clock.now += 1
        bar.stage(f"publish_profiles snapshot {i}/20")

    lines = stream.getvalue().splitlines()[1:]
    assert lines[0] == "[warm-up] 1/1 hours | 5 events | build_profiles bucket 1/2 | 0s so far"
    assert [line.split(" | ")[2] for line in lines] == [
        "build_profiles bucket 1/2",
        "publish_profiles snapshot 1/20",
        "publish_profiles snapshot 11/20",
    ]


def test_a_terminal_gets_one_updating_line_with_a_bar() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = Progress("run-hours", 2, stream=stream, tty=True, clock=clock)

    bar.start_hour(H)
    bar.stage("extract_events (1/9)")
    clock.now += 10
    bar.hour_done(events=7)
    bar.clear()
    bar.start_hour(H + HOUR)
    bar.close()

    out = stream.getvalue()
    assert out.count("\n") == 1 and out.endswith("\n")
    frames = [frame for frame in out.split("\r\x1b[K") if frame]
    assert frames[1].startswith("[" + "-" * progress.BAR_WIDTH + "] [run-hours] 0/2 hours | 0 events | hour 2026")
    assert "extract_events (1/9)" in frames[1]
    half = "#" * (progress.BAR_WIDTH // 2) + "-" * (progress.BAR_WIDTH // 2)
    assert frames[2] == f"[{half}] [run-hours] 1/2 hours | 7 events | hour 2026-12-01T00 done | 10s left"


def test_the_stream_decides_terminal_or_not() -> None:
    assert Progress("x", 1, stream=io.StringIO()).tty is False


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (59.4, "59s"), (61, "1m01s"), (3600, "1h00m"), (7322, "2h02m")]
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_the_log_filter_drops_only_the_known_noise(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("airflow.sdk.definitions.dag")
    noise = progress.install_log_filters()
    try:
        assert progress.install_log_filters() is noise  # installed once
        with caplog.at_level(logging.INFO, logger="airflow.sdk.definitions.dag"):
            logger.warning("No tasks to run. unrunnable tasks: %s", {"score_profiles"})
            logger.warning("Task %s failed", "score_profiles")
    finally:
        logger.removeFilter(noise)

    assert [r.getMessage() for r in caplog.records] == ["Task score_profiles failed"]
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "a real warning", None, None)
    assert NoiseFilter().filter(record)


def test_filtered_stderr_drops_noise_lines_written_to_the_descriptor_and_keeps_the_rest() -> None:
    lines = [
        "I0000 00:00:1796551099.948013   30772 port.cc:153] oneDNN custom operations are on. You may see ...",
        "E0000 00:00:1796543267.253214   24321 node_def_util.cc:682] NodeDef mentions attribute "
        "use_unbounded_threadpool which is not in the op definition: Op<name=MapDataset>",
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "E0000 00:00:1796543267.253214   24321 some_op.cc:1] a real error",
        "UserWarning: a real warning",
    ]
    script = (
        "import os, sys\n"
        "from profile_engine.ops.progress import filtered_stderr\n"
        "with filtered_stderr():\n"
        f"    for line in {lines!r}:\n"
        "        os.write(2, (line + '\\n').encode())\n"  # as C++ writes: below Python's sys.stderr
        "print('after', file=sys.stderr)\n"
    )

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [lines[3], lines[4], "after"]


def test_every_noise_pattern_is_specific() -> None:
    for pattern in NOISE:
        assert len(pattern) >= 25  # a whole phrase, never a bare word like "warning"
