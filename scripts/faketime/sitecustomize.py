"""Loaded by every Python process of ``scripts/test-calendar.sh`` (its PYTHONPATH): ``time.sleep`` through select.

Python 3.11 sleeps with ``clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)``, which libfaketime 0.9.10 (Debian 12)
shifts by the fake offset even when the monotonic clock is not faked: every ``time.sleep`` then fails with
EINVAL (a clock ahead) or sleeps for the offset (a clock behind); libfaketime issue 426. ``select`` with no file
descriptors waits for a relative timeout, which libfaketime leaves alone, and like ``time.sleep`` it is
interrupted by signals and resumed after their handlers (PEP 475). Only this script puts the module on the path.
"""

from __future__ import annotations

import select
import time


def _sleep(seconds: float) -> None:
    """``time.sleep`` on the real monotonic clock."""
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    select.select([], [], [], seconds)


time.sleep = _sleep
