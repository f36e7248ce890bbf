"""The ground floor: schemas and column names every stage shares; imports nothing of the engine but itself.

Modules: ``events`` (canonical and staged event, event types, ``bucket_sql``, ``md5_modulo_sql``), ``profiles``
(snapshot, interests and changes; column-name builders such as ``count_column``, ``open_items_column``,
``before_column``; ``profile_schema``/``snapshot_schema`` with declared traits), ``traits`` (declared traits:
``Trait``, ``load_traits``, ``traits_markdown``), ``scores`` (the scores layer), ``segments`` (segments, exports,
contact history), ``stages`` (the stages of one hour: ``STAGES``, ``REPORT_STAGE``, ``MAPPED_STAGES``,
``TRAINING_STAGES``).
docs/architecture.md.
"""
