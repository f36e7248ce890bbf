"""Storage: lake layout, atomic commits and manifests (``storage``), the lake lock (``lock``), DuckDB
connections with the engine's limits (``db.connect``) and the crash points tests use (``faults``).

docs/architecture.md, docs/operations.md.
"""
