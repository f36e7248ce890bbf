"""Marketing segments from YAML rules, their exports, uplift and delivery (docs/segments.md).

Modules: ``rules`` (``load_rules``, ``known_columns``, ``SegmentRule``, ``POPULATION_COLUMNS``, ``rule_connection``),
``assign`` (``assign_segments``, ``population_stats``, ``add_population_columns``, ``share_counts``,
``share_report``, ``share_checks``, ``share_warning``), ``optouts`` (``read_optouts``), ``publish``
(``publish_segments``, one bucket at a time; ``stability_counts``, ``stability_report``, ``segment_stability``),
``uplift`` (``uplift``, one bucket at a time; ``uplift_rows``, ``uplift_counts``, ``UpliftCounts``, ``counted_rows``,
``read_bucket_contacts``, ``exposure_starts``, ``rate_difference``, ``design_effect``, ``segment_size_history``,
``segment_sizes_chart``, ``report_section``, ``render_section_html``), ``partitions`` (``bucket_rows``: one bucket's
users of the segments and contacts layers, however an hour was written) and ``delivery``
(``deliver_events``, ``deliver_to_outbox``, ``deliver_to_sql``, ``read_export``, ``export_digest``, ``outbox_root``,
``fold_suppressions``, ``asset_extra``, ``connection_engine``, ``connection_secret``).
"""
