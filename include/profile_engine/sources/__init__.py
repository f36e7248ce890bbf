"""Where events come from (docs/sources.md).

- ``mappings``: ``load_mapping``, ``parse_mapping``, ``resolve_mapping_path``, ``canonical_mapping``,
  ``mapping_names``; ``Mapping``, ``MappingError``, ``SourceError``.
- ``readers``: ``source_select``, ``mapped_select``, ``file_format``, ``file_delimiter``, ``is_gzip``,
  ``local_hour_sql``, ``clean_sql``.
- ``sql``: ``read_sql_batch``, ``sql_select``, ``sql_label``, ``connection_url``; ``SqlBatch``.
- ``replay``: ``land_for_replay``, ``describe_landing``, ``main_range``; ``ReplayPlan``.
- ``simulate``: ``simulate``, ``simulate_hour`` (the demo shop).
"""
