"""DuckDB connections with the engine's limits (threads, memory, a spill directory under ``_tmp/``).

Every module connects through :func:`connect`; docs/operations.md ("Limits").
"""

from __future__ import annotations

import os
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
