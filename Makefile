# The README's commands. Everything installs into .venv from requirements.txt
# pinned by constraints.txt; nothing is written outside the repository.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export PATH := $(CURDIR)/$(BIN):$(PATH)

USERS ?= 2000
HISTORY_DAYS ?= 30
HOURS ?= 48

.PHONY: install demo test lint fmt ui clean constraints replay bench bench-quick

install: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: install
	$(BIN)/python -m profile_engine demo --users $(USERS) --history-days $(HISTORY_DAYS) --hours $(HOURS)

# tests/cluster and tests/ui need servers and a browser: pytest collects them only when named
# (pyproject.toml), so they run in their own targets below.
# Two pytest-xdist workers (this project's CI machine has 2 cores), each test file on one of them
# (module fixtures are built once), the slowest files first (tests/conftest.py); `pytest -n 0` runs in one
# process. --durations=25: the log lists the slowest tests.
test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=25

# Airflow with CeleryExecutor, two workers, its own PostgreSQL and Redis (Debian packages, installed
# when missing; needs root then), all started and stopped by the test: docs/operations.md, "Cluster test".
.PHONY: test-cluster
test-cluster: install
	bash scripts/ensure-cluster-packages.sh
	$(BIN)/python -m pytest tests/cluster -s

# The standalone UI in headless Debian Chromium driven by Playwright (installed from requirements.txt;
# `playwright install` downloads browsers and cannot work offline). Screenshots: test-artifacts/.
.PHONY: test-browser
test-browser: install
	test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	$(BIN)/python -m pytest tests/ui

# The suite under fixed clocks at the calendar's edges (1st of a month 00:30 UTC, last day 23:30 UTC) with
# libfaketime (Debian packages faketime libfaketime, installed when missing; needs root then). Not in
# .ci/run: it runs the suite once per clock. CALENDAR_ARGS=tests/ui runs the browser test instead.
.PHONY: test-calendar
test-calendar: install
	bash scripts/test-calendar.sh $(CALENDAR_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

ui: install
	$(BIN)/python -m profile_engine ui

# make replay FILE=path/to/events.csv MAPPING=rees46   (or MAPPING=path/to/mapping.yaml)
replay: install
	@test -n "$(FILE)" -a -n "$(MAPPING)" || { echo "usage: make replay FILE=... MAPPING=..."; exit 2; }
	$(BIN)/python -m profile_engine replay --file "$(FILE)" --mapping "$(MAPPING)"

# Benchmarks append their results to BENCHMARKS.md (one script per line; more are added here).
bench: install
	$(BIN)/python benchmarks/profiles.py
	$(BIN)/python benchmarks/pipeline.py $(PIPELINE_BENCH)

# The whole hourly pipeline at 1M events / 1M users (benchmarks/pipeline.py; the first run
# also builds a cached base lake under $TMPDIR). PIPELINE_BENCH="--sections tasks" etc. narrows it.
PIPELINE_BENCH ?= --runs 3 --dag-runs 2 --train-runs 1

# Smoke run of the pipeline benchmark at tiny sizes (about a minute, nothing appended).
bench-quick: install
	$(BIN)/python benchmarks/pipeline.py --quick

# Re-pin the full dependency set from a fresh resolution of requirements.txt.
constraints:
	rm -rf /tmp/profile-engine-constraints && $(PYTHON) -m venv /tmp/profile-engine-constraints
	/tmp/profile-engine-constraints/bin/pip install --quiet -r requirements.txt
	/tmp/profile-engine-constraints/bin/pip freeze --exclude-editable | grep -v '^profile-engine' > constraints.txt

# The refactoring check (CONTRIBUTING.md): build a demo lake with this checkout's code and compare its
# content checksums with BEFORE, a checksum file built the same way from the code before the change.
DEMO_CHECK_DIR ?= /tmp/demo-check
.PHONY: demo-check
demo-check: install
	@test -n "$(BEFORE)" || { echo "usage: make demo-check BEFORE=path/to/before.json"; exit 2; }
	$(BIN)/python scripts/demo_checksums.py build --checkout . --lake $(DEMO_CHECK_DIR)/after-lake --out $(DEMO_CHECK_DIR)/after.json
	$(BIN)/python scripts/demo_checksums.py compare "$(BEFORE)" $(DEMO_CHECK_DIR)/after.json

clean:
	rm -rf $(VENV) .airflow lake
