"""Who a user is outside the lake, and erased users (docs/segments.md, docs/reliability.md).

Modules: ``keys`` (``export_key``, ``pseudonymize``, ``pseudonymize_array``: export keys and keyed pseudonyms) and
``tombstones`` (``erasure_key``, ``user_hash``, ``read_tombstones``, ``write_tombstones``, ``matching_key``,
``erased_ids``, ``drop_erased``, ``count_erased``, ``tombstones_path``, ``audit_path``: the erasure records).
"""
