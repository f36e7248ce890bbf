"""Tests for profile_engine.lake.db: every DuckDB connection carries the configured limits (issue "trust", item 6)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from profile_engine.config import Settings
from profile_engine.lake import db
from profile_engine.lake import storage as lk

PACKAGE = Path(db.__file__).resolve().parent


def current(con: object, name: str) -> object:
    """``current_setting(name)`` on a connection."""
    return con.execute("SELECT current_setting(?)", [name]).fetchall()[0][0]  # type: ignore[attr-defined]


def test_a_connection_has_the_configured_threads_memory_and_temp_directory(tmp_path: Path) -> None:
    settings = Settings(
        lake=tmp_path / "lake", duckdb_threads=1, duckdb_memory_limit="512MB", duckdb_temp_dir=tmp_path / "spill"
    )

    con = db.connect(settings)
    try:
        assert current(con, "threads") == 1
        assert current(con, "memory_limit") == "488.2 MiB"  # 512 MB as DuckDB prints it
        temp = Path(str(current(con, "temp_directory")))
        assert temp.parent == tmp_path / "spill"
    finally:
        con.close()


def test_defaults_use_every_core_half_the_memory_and_the_lakes_tmp(tmp_path: Path) -> None:
    import duckdb

    settings = Settings(lake=tmp_path / "lake")
    plain = duckdb.connect()
    con = db.connect(settings)
    try:
        assert current(con, "threads") == (os.cpu_count() or 1)
        total = float(str(current(plain, "memory_limit")).split()[0]) / 0.8  # DuckDB's own default is 80%
        half = float(str(current(con, "memory_limit")).split()[0])
        assert abs(half - total / 2) / total < 0.01
        temp = Path(str(current(con, "temp_directory")))
        # One directory per connection, named like every _tmp/ entry so crashed leftovers are cleaned.
        assert temp.parent == settings.lake / lk.TMP and re.match(r"^[0-9a-f]{32}\.\d+\..+$", temp.name)
    finally:
        con.close()
        plain.close()


def test_settings_come_from_the_environment_without_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROFILE_ENGINE_DUCKDB_THREADS", "1")
    monkeypatch.setenv("PROFILE_ENGINE_DUCKDB_MEMORY_LIMIT", "1GB")
    monkeypatch.setenv("PROFILE_ENGINE_DUCKDB_TEMP_DIR", str(tmp_path / "t"))

    con = db.connect(enable_external_access=False)
    try:
        assert current(con, "threads") == 1
        assert current(con, "memory_limit") == "953.6 MiB"
        assert current(con, "enable_external_access") is False
        assert Path(str(current(con, "temp_directory"))).parent == tmp_path / "t"
    finally:
        con.close()


def test_two_connections_never_share_a_spill_directory(tmp_path: Path) -> None:
    settings = Settings(lake=tmp_path)
    first, second = db.connect(settings), db.connect(settings)
    try:
        assert current(first, "temp_directory") != current(second, "temp_directory")
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DUCKDB_THREADS", "0"),
        ("DUCKDB_MEMORY_LIMIT", "lots"),
        ("DUCKDB_MEMORY_LIMIT", "120%"),
        ("TASK_TIMEOUT_MINUTES", "0"),
    ],
)
def test_bad_limits_are_refused_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"PROFILE_ENGINE_{name}"):
        Settings.from_env({f"PROFILE_ENGINE_{name}": value})


def test_no_module_opens_duckdb_directly() -> None:
    """Every connection goes through db.connect, so none runs without the limits."""
    direct = re.compile(r"\bduckdb\s*\.\s*(connect|sql|query|execute|default_connection)\s*\(")
    offenders = [
        f"{path.name}:{number}"
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name != "db.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if direct.search(line)
    ]

    assert offenders == []


def test_cursors_share_the_process_database_but_not_temp_objects_or_the_time_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import duckdb

    monkeypatch.setattr(db, "_DATABASES", {})
    opened: list[object] = []
    connect = duckdb.connect

    def counting_connect(*args: object, **kwargs: object) -> duckdb.DuckDBPyConnection:
        opened.append(kwargs.get("config"))
        return connect(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(duckdb, "connect", counting_connect)
    first, second = db.cursor(), db.cursor()
    guarded = db.cursor(enable_external_access=False)
    try:
        assert len(opened) == 2  # one database per configuration
        first.execute("CREATE TEMP TABLE mine AS SELECT 1 AS x")
        first.execute("SET TimeZone = 'America/New_York'")
        with pytest.raises(duckdb.CatalogException):
            second.execute("SELECT * FROM mine")
        assert current(second, "TimeZone") != "America/New_York"
        assert current(guarded, "enable_external_access") is False
        assert current(second, "enable_external_access") is True
        monkeypatch.setattr(os, "getpid", lambda: -1)  # a forked child: its own database
        db.cursor().close()
        assert len(opened) == 3
    finally:
        for con in (first, second, guarded):
            con.close()
