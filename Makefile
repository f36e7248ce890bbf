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

.PHONY: install demo test lint fmt ui clean constraints replay bench

install: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: install
	$(BIN)/python -m profile_engine demo --users $(USERS) --history-days $(HISTORY_DAYS) --hours $(HOURS)

# tests/cluster and tests/ui need servers and a browser: they run in their own targets below.
test: install
	$(BIN)/python -m pytest --ignore=tests/cluster --ignore=tests/ui

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

# Re-pin the full dependency set from a fresh resolution of requirements.txt.
constraints:
	rm -rf /tmp/profile-engine-constraints && $(PYTHON) -m venv /tmp/profile-engine-constraints
	/tmp/profile-engine-constraints/bin/pip install --quiet -r requirements.txt
	/tmp/profile-engine-constraints/bin/pip freeze --exclude-editable | grep -v '^profile-engine' > constraints.txt

clean:
	rm -rf $(VENV) .airflow lake
