"""Progress of long commands (run-hours, replay, the demo) and the filter of known third-party noise.

One updating bar where the stream is a terminal, plain lines where it is not. docs/operations.md, "Progress".
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager
from datetime import datetime
from typing import TextIO

from profile_engine.hours import format_hour

# Plain (non-terminal) output: at most one line per this many seconds, plus the first and last hour.
PLAIN_EVERY_SECONDS = 10.0
BAR_WIDTH = 24

# Messages that say nothing about the run (matched as substrings, nothing else is dropped):
NOISE: tuple[str, ...] = (
    # dag.test() polls mapped tasks whose upstream is still running, and warns each time.
    "No tasks to run. unrunnable tasks",
    # TensorFlow at import (INFO) and at every tf.data pipeline Keras builds (an ERROR-level line that is not one).
    "oneDNN custom operations are on",
    "NodeDef mentions attribute use_unbounded_threadpool",
    # absl's note that precedes the first of them.
    "All log messages before absl::InitializeLog() is called",
)
# Environment for TensorFlow: its INFO lines (oneDNN, CPU features) off; warnings and errors stay. oneDNN itself
# stays on (TF_ENABLE_ONEDNN_OPTS=0 would change the model's numbers).
TF_QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "1"}


def duration(seconds: float) -> str:
    """``42s``, ``3m10s``, ``1h02m``: a short human duration."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Hours done of a total, events, the current hour and stage, and the time left, on ``stream``.

    On a terminal one line is redrawn (``\\r``) at every change; elsewhere (a file, a pipe, a CI log)
    a plain line is written when an hour is done, at most every ``every`` seconds (always the first and
    the last), and for the stages after the last hour (bulk phases such as building profiles): when a
    new kind of stage starts, else at most every ``every`` seconds.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        every: float = PLAIN_EVERY_SECONDS,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.every = every
        self.started = clock()
        self.done = 0
        self.events = 0
        self.hour: datetime | None = None
        self.hour_finished = False
        self.stage_name = ""
        self._last_plain: float | None = None
        self._last_kind = ""
        self._shown = False

    def start_hour(self, hour: datetime) -> None:
        """The hour now being processed."""
        self.hour = hour
        self.hour_finished = False
        self.stage_name = ""
        self._draw()

    def stage(self, name: str) -> None:
        """The stage now running (of the current hour, or a bulk phase after the last hour)."""
        kind = name.split()[0] if name else ""
        self.stage_name = name
        if self.tty:
            self._draw()
        elif self.done >= self.total and (kind != self._last_kind or self._due()):
            self._plain()
        self._last_kind = kind

    def hour_done(self, events: int = 0) -> None:
        """One more hour done, with the events it read."""
        self.done += 1
        self.events += events
        self.hour_finished = True
        self.stage_name = ""
        if self.tty:
            self._draw()
        elif self.done in (1, self.total) or self._due():
            self._plain()

    def _due(self) -> bool:
        return self._last_plain is None or self.clock() - self._last_plain >= self.every

    def time_left(self) -> float | None:
        """Seconds left at the pace so far (None before the first hour is done or after the last)."""
        if self.done == 0 or self.done >= self.total:
            return None
        return (self.clock() - self.started) / self.done * (self.total - self.done)

    def text(self) -> str:
        """The progress as one line of text, without the bar."""
        parts = [f"{self.done}/{self.total} hours", f"{self.events:,} events"]
        if self.hour is not None and self.done < self.total:
            parts.append(f"hour {format_hour(self.hour)[:13]}" + (" done" if self.hour_finished else ""))
        if self.stage_name:
            parts.append(self.stage_name)
        left = self.time_left()
        parts.append(
            f"{duration(left)} left" if left is not None else f"{duration(self.clock() - self.started)} so far"
        )
        return f"[{self.label}] " + " | ".join(parts)

    def bar(self) -> str:
        """``[#####-----]``: the share of hours done."""
        filled = BAR_WIDTH * self.done // self.total if self.total else BAR_WIDTH
        return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]"

    def clear(self) -> None:
        """Remove the bar from the terminal line (before other output); nothing on plain streams."""
        if self.tty and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def close(self) -> None:
        """End the bar's line so later output starts on a fresh one."""
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False

    def _draw(self) -> None:
        if not self.tty:
            return
        self.stream.write(f"\r\x1b[K{self.bar()} {self.text()}")
        self.stream.flush()
        self._shown = True

    def _plain(self) -> None:
        self._last_plain = self.clock()
        self.stream.write(self.text() + "\n")
        self.stream.flush()


class NoiseFilter(logging.Filter):
    """Drops log records whose message contains one of ``NOISE``; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in NOISE)


# The loggers the noise comes from (a filter on a logger sees only its own records).
NOISY_LOGGERS = ("airflow.sdk.definitions.dag",)


def install_log_filters() -> NoiseFilter:
    """Attach one ``NoiseFilter`` to the noisy loggers (idempotent); returns it."""
    noise = NoiseFilter()
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        installed = [f for f in logger.filters if isinstance(f, NoiseFilter)]
        if installed:
            noise = installed[0]
        else:
            logger.addFilter(noise)
    return noise


def is_noise(line: str | bytes) -> bool:
    """Whether an output line is one of the known noise messages."""
    text = line.decode(errors="replace") if isinstance(line, bytes) else line
    return any(noise in text for noise in NOISE)


@contextmanager
def filtered_stderr(before_line: Callable[[], None] | None = None) -> Generator[None]:
    """Drop the ``NOISE`` lines written to file descriptor 2 (also by C++ libraries) while inside.

    Every other line is relayed unchanged to the original stderr (``before_line`` runs first, e.g. to
    clear a progress bar). Without a real descriptor 2 (some test runners) nothing is filtered.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    read, write = os.pipe()
    os.dup2(write, fd)
    os.close(write)
    relayed = os.dup(saved)  # the relay's own copy: ``saved`` is closed on exit, maybe before the relay ends

    def relay() -> None:
        with os.fdopen(read, "rb") as pipe, os.fdopen(relayed, "wb", buffering=0) as out:
            for line in pipe:
                if not is_noise(line):
                    if before_line is not None:
                        before_line()
                    out.write(line)

    thread = threading.Thread(target=relay, name="filtered-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)
        thread.join(timeout=5)  # a child still holding the pipe keeps it open: the daemon thread ends with it
