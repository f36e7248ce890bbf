"""Settings from the environment: defaults, every variable, and errors that name the variable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from profile_engine.config import (
    DEFAULT_SCHEDULE_START,
    DEFAULT_TASK_TIMEOUT_MINUTES,
    ENV_PREFIX,
    Settings,
    task_timeout,
)


def test_no_variables_give_the_defaults() -> None:
    settings = Settings.from_env({})

    assert settings == Settings()
    assert settings.start is None and settings.schedule_start == DEFAULT_SCHEDULE_START
    assert settings.buckets == 4 and settings.environment == "development"
    assert task_timeout({}) == timedelta(minutes=DEFAULT_TASK_TIMEOUT_MINUTES)


def test_empty_variables_count_as_unset() -> None:
    assert Settings.from_env({ENV_PREFIX + "BUCKETS": "", ENV_PREFIX + "START": ""}) == Settings()


# (variable, value, field, expected)
EACH = [
    ("LAKE", "/tmp/pe-lake", "lake", Path("/tmp/pe-lake").resolve()),
    ("ENV", "production", "environment", "production"),
    ("TZ", "America/New_York", "business_tz", "America/New_York"),
    ("BUCKETS", "8", "buckets", 8),
    ("START", "2026-12-01T06:00+01:00", "start", datetime(2026, 12, 1, 5, tzinfo=UTC)),
    ("LATENESS_HOURS", "2", "lateness_hours", 2),
    ("CLOCK_SKEW_MINUTES", "0", "clock_skew_minutes", 0),
    ("LABEL_HORIZON_HOURS", "6", "label_horizon_hours", 6),
    ("RETRAIN_EVERY_HOURS", "12", "retrain_every_hours", 12),
    ("QUARANTINE_THRESHOLD", "0.2", "quarantine_threshold", 0.2),
    ("QUARANTINE_MIN_ROWS", "10", "quarantine_min_rows", 10),
    ("SEED", "11", "seed", 11),
    ("MODEL_THREADS", "2", "model_threads", 2),
    ("SEQUENCE_CANDIDATES", "Yes", "sequence_candidates", True),
    ("SQL_SOURCES", " orders , ,crm", "sql_sources", ("orders", "crm")),
    ("SQL_CONN_ID", "shop_db", "sql_conn_id", "shop_db"),
    ("OPTOUT_CONN_ID", "crm", "optout_conn_id", "crm"),
    ("DELIVERY_CONN_ID", "esp", "delivery_conn_id", "esp"),
    ("OUTBOX", "/tmp/pe-outbox", "outbox", Path("/tmp/pe-outbox").resolve()),
    ("FRESHNESS_HOURS", "1.5", "freshness_hours", 1.5),
    ("ALERT_WEBHOOK", "http://hook", "alert_webhook", "http://hook"),
    ("ALERT_EMAIL_FROM", "a@b", "alert_email_from", "a@b"),
    ("RETENTION_DAYS", "30", "retention_days", 30),
    ("DATA_DOCS_KEEP_HOURS", "0", "data_docs_keep_hours", 0),
    ("DUCKDB_THREADS", "2", "duckdb_threads", 2),
    ("DUCKDB_MEMORY_LIMIT", "512MiB", "duckdb_memory_limit", "512MiB"),
    ("DUCKDB_TEMP_DIR", "/tmp/pe-spill", "duckdb_temp_dir", Path("/tmp/pe-spill").resolve()),
    ("TASK_TIMEOUT_MINUTES", "7", "task_timeout_minutes", 7),
    ("SNAPSHOT_FROM_PREVIOUS_MIN_USERS", "0", "snapshot_from_previous_min_users", 0),
]


@pytest.mark.parametrize(("name", "value", "field", "expected"), EACH, ids=[e[0] for e in EACH])
def test_each_variable_sets_its_field(name: str, value: str, field: str, expected: object) -> None:
    settings = Settings.from_env({ENV_PREFIX + name: value})

    assert getattr(settings, field) == expected
    others = {k: v for k, v in vars(settings).items() if k != field}
    assert others == {k: v for k, v in vars(Settings()).items() if k != field}


def test_smtp_alerts_need_recipients() -> None:
    with pytest.raises(ValueError, match=f"{ENV_PREFIX}ALERT_EMAIL_TO"):
        Settings.from_env({ENV_PREFIX + "ALERT_SMTP": "mail:25"})
    settings = Settings.from_env({ENV_PREFIX + "ALERT_SMTP": "mail:25", ENV_PREFIX + "ALERT_EMAIL_TO": "ops@x"})
    assert (settings.alert_smtp, settings.alert_email_to) == ("mail:25", "ops@x")


BAD = [
    ("BUCKETS", "four"),
    ("BUCKETS", "0"),
    ("BUCKETS", "70000"),
    ("START", "2026-12-01T05:30"),
    ("START", "yesterday"),
    ("ENV", "staging"),
    ("LATENESS_HOURS", "-1"),
    ("LATENESS_HOURS", "1.5"),
    ("LABEL_HORIZON_HOURS", "0"),
    ("RETRAIN_EVERY_HOURS", "0"),
    ("QUARANTINE_THRESHOLD", "1.5"),
    ("QUARANTINE_THRESHOLD", "5%"),
    ("SEED", "x"),
    ("MODEL_THREADS", "0"),
    ("SEQUENCE_CANDIDATES", "maybe"),
    ("FRESHNESS_HOURS", "0"),
    ("RETENTION_DAYS", "0"),
    ("DATA_DOCS_KEEP_HOURS", "-1"),
    ("DATA_DOCS_KEEP_HOURS", "two days"),
    ("DUCKDB_THREADS", "0"),
    ("DUCKDB_THREADS", "many"),
    ("DUCKDB_MEMORY_LIMIT", "150%"),
    ("DUCKDB_MEMORY_LIMIT", "lots"),
    ("TASK_TIMEOUT_MINUTES", "0"),
    ("TASK_TIMEOUT_MINUTES", "an hour"),
    ("SNAPSHOT_FROM_PREVIOUS_MIN_USERS", "-1"),
]


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_a_bad_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=ENV_PREFIX + name):
        Settings.from_env({ENV_PREFIX + name: value})


def test_settings_read_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PREFIX + "BUCKETS", "3")

    assert Settings.from_env().buckets == 3
