"""Settings: constants in code overridden by ``PROFILE_ENGINE_*`` environment variables, read once by DAGs and tasks.

Never touches Airflow, so DAG files build it at parse time. docs/operations.md, "Configuration".
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from profile_engine.hours import parse_hour

# Buckets are DuckDB INTEGERs (schema.bucket_sql) and partition folders: far more than any worker pool needs.
MAX_BUCKETS = 1 << 16

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "include" / "config"
DEFAULT_LAKE = PROJECT_ROOT / "lake"

ENV_PREFIX = "PROFILE_ENGINE_"
# The hourly DAG's first hour when PROFILE_ENGINE_START is unset (Settings.schedule_start).
DEFAULT_SCHEDULE_START = datetime(2026, 11, 1, tzinfo=UTC)
DEFAULT_TASK_TIMEOUT_MINUTES = 120
# A DuckDB memory_limit: a number and a unit (bytes, KB..TB, KiB..TiB) or a percentage of RAM.
_MEMORY_LIMIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|[KMGT]i?B|B|bytes)?\s*$", re.IGNORECASE)


def task_timeout_minutes(environ: Mapping[str, str] | None = None) -> int:
    """``PROFILE_ENGINE_TASK_TIMEOUT_MINUTES`` (default 120): every DAG task's execution_timeout.

    A function of its own so that DAG files read it at parse time without building Settings.
    """
    env = os.environ if environ is None else environ
    return int(env.get(ENV_PREFIX + "TASK_TIMEOUT_MINUTES") or DEFAULT_TASK_TIMEOUT_MINUTES)


def task_timeout(environ: Mapping[str, str] | None = None) -> timedelta:
    """The execution_timeout of every task of every DAG (cheap: reads one environment variable)."""
    minutes = task_timeout_minutes(environ)
    if minutes < 1:
        raise ValueError(f"{ENV_PREFIX}TASK_TIMEOUT_MINUTES must be >= 1, got {minutes}")
    return timedelta(minutes=minutes)


def _flag(name: str, value: str | None, default: bool) -> bool:
    """A boolean variable: ``true``/``false`` (also 1/0, yes/no, on/off; any case), else the default when unset."""
    if value is None:
        return default
    text = value.strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{ENV_PREFIX}{name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class Settings:
    """Everything a stage needs to know besides the hour it processes."""

    lake: Path = DEFAULT_LAKE
    environment: str = "development"
    business_tz: str = "Europe/Berlin"
    buckets: int = 4
    start: datetime | None = None
    lateness_hours: int = 24
    # The hourly snapshot of a bucket starts from the hour before (docs/architecture.md, "The snapshot of the
    # changed users") when that hour's profiles hold at least this many users; below it computing every row
    # is faster (its fixed cost: about 0.08 s a bucket more at 1k users, 0.04 s less at 43k, BENCHMARKS.md).
    snapshot_from_previous_min_users: int = 20_000
    clock_skew_minutes: int = 5
    label_horizon_hours: int = 24
    retrain_every_hours: int = 24
    quarantine_threshold: float = 0.05
    quarantine_min_rows: int = 1000
    seed: int = 7
    # Threads of LightGBM training (a fixed count keeps the trees reproducible; docs/model.md).
    model_threads: int = 1
    # Train the behaviour-sequence candidates (encoder alone and combined) with every challenger. Off by
    # default: they add about 20-50 s to a training on 2 cores (2-4x the other candidates), a promoted one
    # imports TensorFlow and reads the users' staged history at every scoring, and on the only real log
    # measured they beat nothing (docs/model.md, "Sequence encoder").
    sequence_candidates: bool = False
    # Table sources (docs/sources.md): mapping names read from SQL every hour, and the
    # Airflow Connection id (or SQLAlchemy URL) of those whose mapping names none.
    sql_sources: tuple[str, ...] = ()
    sql_conn_id: str | None = None
    # Marketing: Airflow Connection ids of the SQL opt-out list and of the delivery database
    # (None = not used), and the local outbox of campaign deliveries (None = <lake>/outbox).
    optout_conn_id: str | None = None
    delivery_conn_id: str | None = None
    outbox: Path | None = None
    # Operations (docs/operations.md): alert when no snapshot was committed for this long, and
    # where alerts go: a webhook URL and/or an SMTP server "host[:port]" with recipients.
    freshness_hours: float = 3.0
    alert_webhook: str | None = None
    alert_smtp: str | None = None
    alert_email_to: str | None = None
    alert_email_from: str = "profile-engine@localhost"
    # Retention (docs/reliability.md): hour partitions older than this many days are deleted daily.
    retention_days: int = 90
    # Data Docs (docs/quality.md): the site of a passing hour is pruned once it is this many hours
    # older than the newest hour written; failed hours keep theirs until retention.
    data_docs_keep_hours: int = 48
    # Limits of every DuckDB connection (profile_engine.lake.db): threads (None = every core), memory
    # ("50%" of the machine's RAM, or e.g. "4GB"), spill directory (None = <lake>/_tmp).
    duckdb_threads: int | None = None
    duckdb_memory_limit: str = "50%"
    duckdb_temp_dir: Path | None = None
    # Airflow execution_timeout of every task of every DAG, in minutes.
    task_timeout_minutes: int = DEFAULT_TASK_TIMEOUT_MINUTES
    # A YAML file of declared traits added to the package's defaults (docs/features.md, "Declared traits").
    traits: Path | None = None

    @property
    def schedule_start(self) -> datetime:
        """The lake's first hour as the hourly DAG sees it: ``start``, else ``DEFAULT_SCHEDULE_START``."""
        return self.start or DEFAULT_SCHEDULE_START

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Read ``PROFILE_ENGINE_*`` variables over the defaults above."""
        env = dict(os.environ if environ is None else environ)

        def get(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name)
            return value if value not in (None, "") else None

        def number(name: str, kind: type[int] | type[float], default: int | float) -> Any:
            text = get(name)
            try:
                return default if text is None else kind(text)
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{name} must be a {kind.__name__}, got {text!r}") from None

        def hour(name: str) -> datetime | None:
            text = get(name)
            try:
                return parse_hour(text) if text else None
            except ValueError as error:
                raise ValueError(f"{ENV_PREFIX}{name} must be a UTC hour such as 2026-11-01T00: {error}") from None

        def path(name: str) -> Path | None:
            text = get(name)
            return Path(text).expanduser().resolve() if text else None

        base = cls()
        threads = get("DUCKDB_THREADS")
        settings = replace(
            base,
            lake=path("LAKE") or base.lake,
            environment=get("ENV") or base.environment,
            business_tz=get("TZ") or base.business_tz,
            buckets=number("BUCKETS", int, base.buckets),
            start=hour("START"),
            lateness_hours=number("LATENESS_HOURS", int, base.lateness_hours),
            snapshot_from_previous_min_users=number(
                "SNAPSHOT_FROM_PREVIOUS_MIN_USERS", int, base.snapshot_from_previous_min_users
            ),
            clock_skew_minutes=number("CLOCK_SKEW_MINUTES", int, base.clock_skew_minutes),
            label_horizon_hours=number("LABEL_HORIZON_HOURS", int, base.label_horizon_hours),
            retrain_every_hours=number("RETRAIN_EVERY_HOURS", int, base.retrain_every_hours),
            quarantine_threshold=number("QUARANTINE_THRESHOLD", float, base.quarantine_threshold),
            quarantine_min_rows=number("QUARANTINE_MIN_ROWS", int, base.quarantine_min_rows),
            seed=number("SEED", int, base.seed),
            model_threads=number("MODEL_THREADS", int, base.model_threads),
            sequence_candidates=_flag("SEQUENCE_CANDIDATES", get("SEQUENCE_CANDIDATES"), base.sequence_candidates),
            sql_sources=tuple(n.strip() for n in (get("SQL_SOURCES") or "").split(",") if n.strip()),
            sql_conn_id=get("SQL_CONN_ID"),
            optout_conn_id=get("OPTOUT_CONN_ID"),
            delivery_conn_id=get("DELIVERY_CONN_ID"),
            outbox=path("OUTBOX"),
            freshness_hours=number("FRESHNESS_HOURS", float, base.freshness_hours),
            alert_webhook=get("ALERT_WEBHOOK"),
            alert_smtp=get("ALERT_SMTP"),
            alert_email_to=get("ALERT_EMAIL_TO"),
            alert_email_from=get("ALERT_EMAIL_FROM") or base.alert_email_from,
            retention_days=number("RETENTION_DAYS", int, base.retention_days),
            data_docs_keep_hours=number("DATA_DOCS_KEEP_HOURS", int, base.data_docs_keep_hours),
            duckdb_threads=number("DUCKDB_THREADS", int, 0) if threads else None,
            duckdb_memory_limit=get("DUCKDB_MEMORY_LIMIT") or base.duckdb_memory_limit,
            duckdb_temp_dir=path("DUCKDB_TEMP_DIR"),
            task_timeout_minutes=number("TASK_TIMEOUT_MINUTES", int, DEFAULT_TASK_TIMEOUT_MINUTES),
            traits=path("TRAITS"),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Reject settings that cannot work, naming the variable."""
        if self.environment not in ("development", "production"):
            raise ValueError(f"{ENV_PREFIX}ENV must be development or production, got {self.environment!r}")
        if not 1 <= self.buckets <= MAX_BUCKETS:
            raise ValueError(f"{ENV_PREFIX}BUCKETS must be between 1 and {MAX_BUCKETS}, got {self.buckets}")
        if self.label_horizon_hours < 1:
            raise ValueError(f"{ENV_PREFIX}LABEL_HORIZON_HOURS must be >= 1, got {self.label_horizon_hours}")
        if self.retrain_every_hours < 1:
            raise ValueError(f"{ENV_PREFIX}RETRAIN_EVERY_HOURS must be >= 1, got {self.retrain_every_hours}")
        if self.snapshot_from_previous_min_users < 0:
            raise ValueError(
                f"{ENV_PREFIX}SNAPSHOT_FROM_PREVIOUS_MIN_USERS must be >= 0, got {self.snapshot_from_previous_min_users}"
            )
        if self.lateness_hours < 0 or self.clock_skew_minutes < 0 or self.quarantine_min_rows < 0:
            raise ValueError(
                f"{ENV_PREFIX}LATENESS_HOURS, CLOCK_SKEW_MINUTES and QUARANTINE_MIN_ROWS must be >= 0, got "
                f"{self.lateness_hours}, {self.clock_skew_minutes}, {self.quarantine_min_rows}"
            )
        if self.model_threads < 1:
            raise ValueError(f"{ENV_PREFIX}MODEL_THREADS must be >= 1, got {self.model_threads}")
        if self.duckdb_threads is not None and self.duckdb_threads < 1:
            raise ValueError(f"{ENV_PREFIX}DUCKDB_THREADS must be >= 1, got {self.duckdb_threads}")
        memory = _MEMORY_LIMIT.match(self.duckdb_memory_limit)
        if not memory or (memory.group(2) == "%" and not 0 < float(memory.group(1)) <= 100):
            raise ValueError(
                f"{ENV_PREFIX}DUCKDB_MEMORY_LIMIT must be a size such as 4GB, 512MiB or a share of RAM such as 50%, "
                f"got {self.duckdb_memory_limit!r}"
            )
        if self.task_timeout_minutes < 1:
            raise ValueError(f"{ENV_PREFIX}TASK_TIMEOUT_MINUTES must be >= 1, got {self.task_timeout_minutes}")
        if self.retention_days < 1:
            raise ValueError(f"{ENV_PREFIX}RETENTION_DAYS must be >= 1, got {self.retention_days}")
        if self.data_docs_keep_hours < 0:
            raise ValueError(f"{ENV_PREFIX}DATA_DOCS_KEEP_HOURS must be >= 0, got {self.data_docs_keep_hours}")
        if self.freshness_hours <= 0:
            raise ValueError(f"{ENV_PREFIX}FRESHNESS_HOURS must be > 0, got {self.freshness_hours}")
        if self.alert_smtp and not self.alert_email_to:
            raise ValueError(f"{ENV_PREFIX}ALERT_SMTP is set but {ENV_PREFIX}ALERT_EMAIL_TO (the recipients) is not")
        if not 0.0 <= self.quarantine_threshold <= 1.0:
            raise ValueError(f"{ENV_PREFIX}QUARANTINE_THRESHOLD must be in [0, 1], got {self.quarantine_threshold}")
