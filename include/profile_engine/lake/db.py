"""DuckDB connections with the engine's limits (threads, memory, a spill directory under ``_tmp/``).

Every module connects through :func:`connect` (a new database) or :func:`cursor` (a connection
on the process's database); docs/operations.md ("Limits").
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from profile_engine.config import Settings

if TYPE_CHECKING:
    import duckdb


def limits(settings: Settings) -> dict[str, Any]:
    """The DuckDB configuration every connection gets: threads, memory_limit, temp_directory."""
    from profile_engine.lake import storage as lk

    base = settings.duckdb_temp_dir if settings.duckdb_temp_dir is not None else settings.lake / lk.TMP
    return {
        "threads": settings.duckdb_threads or os.cpu_count() or 1,
        "memory_limit": settings.duckdb_memory_limit.strip(),
        "temp_directory": str(base / lk.tmp_name()),
    }


def connect(settings: Settings | None = None, **config: Any) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB connection with the limits of ``settings`` (None: read from the environment).

    ``config`` adds DuckDB options (e.g. ``enable_external_access=False``) and wins over the
    limits. It is applied first: DuckDB refuses a temp_directory set after external access
    was disabled.
    """
    import duckdb

    limit = limits(Settings.from_env() if settings is None else settings)
    return duckdb.connect(config={**config, **{k: v for k, v in limit.items() if k not in config}})


# Per configuration, the process that opened the database and the database itself.
_DATABASES: dict[tuple[tuple[str, Any], ...], tuple[int, duckdb.DuckDBPyConnection]] = {}
_DATABASES_LOCK = threading.Lock()


def cursor(**config: Any) -> duckdb.DuckDBPyConnection:
    """A new connection (a DuckDB cursor) on this process's in-memory database opened with ``config``.

    Opening a database costs 20-30 ms, a cursor on an open one microseconds; code that runs many
    short queries (per hour, per bucket) connects here. A cursor has its own temporary
    objects, registrations and session settings (``SET TimeZone`` holds for it alone), but
    non-temporary objects and database options (``enable_external_access``) are the
    database's: create only ``TEMP`` objects, and pass such options as ``config``, which gets
    a database of its own. The limits are those of the environment when the process first
    asked (:func:`connect`); a forked child opens its own database.
    """
    key = tuple(sorted(config.items()))
    with _DATABASES_LOCK:
        held = _DATABASES.get(key)
        if held is None or held[0] != os.getpid():
            held = _DATABASES[key] = (os.getpid(), connect(**config))
        return held[1].cursor()
