#!/usr/bin/env bash
# Run the test suite under fixed clocks at the calendar's edges, so that a test or a stage that depends on
# the date (a zero-padded day, a month or year boundary, "today" vs "the last complete hour") fails here
# rather than on the first days of a month in CI. Not part of .ci/run: it runs the suite once per clock.
#
#   bash scripts/test-calendar.sh                      # make test's suite under each clock below
#   bash scripts/test-calendar.sh tests/test_ingest.py # only these pytest arguments
#   CLOCKS="2027-07-01T00:30:00Z" bash scripts/test-calendar.sh
#   make test-calendar                                 # the same (CALENDAR_ARGS=tests/ui: the browser test)
#
# The clock comes from libfaketime, a Debian package (apt-get install faketime libfaketime), preloaded
# into pytest and everything it starts (Airflow, DuckDB, Chromium). It is a constant offset from the real
# clock, so time goes on as usual in every process (a frozen clock hangs code that waits for time to pass,
# and libfaketime's "@start-at" form restarts the clock in each new process); the monotonic clock is left
# alone, and scripts/faketime/sitecustomize.py works around libfaketime 0.9.10's time.sleep bug in
# Python 3.11 (see there). Each clock runs in its own AIRFLOW_HOME under a temporary directory, as the suite would on a
# fresh clone, so no state of another run or date is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

# 00:30 on the 1st of a month that is also the 1st of a year (the last complete hour is the day, the
# month and the year before), and 23:30 on the last day of February (the suite then runs on into March 1).
CLOCKS=${CLOCKS:-"2027-01-01T00:30:00Z 2027-02-28T23:30:00Z"}
PYTHON=${PYTHON:-.venv/bin/python}

lib=""
for candidate in /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 /usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1 \
    /usr/lib/faketime/libfaketime.so.1 /usr/local/lib/faketime/libfaketime.so.1; do
    if [[ -e $candidate ]]; then lib=$candidate; break; fi
done
if [[ -z $lib ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime libfaketime >/dev/null
        lib=$(dpkg -L libfaketime | grep '/libfaketime\.so\.1$' | head -n1)
    fi
    [[ -n $lib ]] || { echo "libfaketime not found: apt-get install faketime libfaketime" >&2; exit 2; }
fi

# Tests that fail under libfaketime itself, not because of the date: libfaketime 0.9.10 does not fake the file
# times that Python's os.stat reads (statx), so a file written "now" looks as old as the offset. These tests
# compare a file's modification time with the clock; they run in make test.
# The lock race is one of them: every lock file looks as old as the offset, so a racer may take over a
# fresh lock (3 winners of 4 under the 2027-02-28 clock; it passes on the real clock).
ARTIFACTS=(--deselect "tests/reliability/test_lock.py::test_unreadable_lock_waits_for_its_grace_then_goes"
    --deselect "tests/reliability/test_lock.py::test_only_one_of_racing_processes_gets_the_lock")

status=0
for clock in $CLOCKS; do
    offset=$(( $(date -u -d "$clock" +%s) - $(date -u +%s) ))
    [[ $offset -ge 0 ]] && offset="+$offset"  # libfaketime's relative form: "+N" or "-N" seconds
    home=$(mktemp -d "${TMPDIR:-/tmp}/profile-engine-calendar.XXXXXX")
    faked=(env LD_PRELOAD="$lib" FAKETIME="$offset" FAKETIME_DONT_FAKE_MONOTONIC=1
        PYTHONPATH="scripts/faketime:include${PYTHONPATH:+:$PYTHONPATH}"
        TEST_AIRFLOW_HOME="$home/airflow" TMPDIR="$home")
    echo "=== clock $clock: FAKETIME=$offset, files under $home"
    "${faked[@]}" "$PYTHON" -c 'from datetime import UTC, datetime; print("=== now", datetime.now(UTC).isoformat())'
    if "${faked[@]}" "$PYTHON" -m pytest -p no:cacheprovider "${ARTIFACTS[@]}" "$@"; then
        echo "=== clock $clock: passed"
        rm -rf "$home"
    else
        echo "=== clock $clock: FAILED (files kept in $home)"
        status=1
    fi
done
exit $status
