"""DuckDB connections with the engine's limits: every connection gets threads, memory and a spill directory.

Every module opens DuckDB through :func:`connect` (``tests/test_db.py`` greps the package
for direct calls), so no query runs without the limits of ``PROFILE_ENGINE_DUCKDB_*``
(``Settings.duckdb_threads``, ``duckdb_memory_limit``, ``duckdb_temp_dir``). Limits are
per connection: DuckDB gives each in-memory database its own buffer pool.

Each connection spills into a directory of its own (DuckDB names its temporary files the
same way in every database and removes its directory on close), named like every
``_tmp/`` entry of the lake (``<uuid>.<pid>.<host>``): the lake's cleanup
(``lake.clean_tmp_leftovers``) removes what a crashed process left there. DuckDB creates
the directory only when a query spills.
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
