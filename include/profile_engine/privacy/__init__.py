"""Who a user is outside the lake: export keys and keyed pseudonyms (``keys.export_key``,
``keys.pseudonymize_array``) and the tombstones of erased users (``tombstones.drop_erased``,
``tombstones.erased_ids``). docs/reliability.md.
"""
