"""The lake: where every dataset lives and how it is written, locked and measured. docs/architecture.md.

- ``storage``: layer names, ``Lake`` (``partition``, ``committed``, ``manifest``, ``read``, ``read_named``,
  ``write_partition``, ``write_dir``), ``partition_hours``, ``replace_dir``, ``recover_commits``,
  ``clean_tmp_leftovers``, ``write_json``, ``read_json``, ``sha256_file``, ``tmp_name``.
- ``lock``: ``hold_lake``, ``join_run``, ``release_run``, ``status``, ``LakeLocked``.
- ``db``: ``connect`` (DuckDB with the engine's limits), ``limits``.
- ``faults``: ``maybe_fail`` at the named fault points ``POINTS``.
- ``usage``: ``lake_usage`` (size by dataset, ``python -m profile_engine status``).
"""
