"""User profiles: mergeable per-bucket state, hourly snapshots, population features and the rebuild check.

Modules (each imports only the ones before it):
``state`` (feature constants, state tables, ``ProfileState``, ``empty_state``, ``connect``, ``gap_groups``,
``interval_groups``), ``traits`` (declared traits compiled to SQL: ``tile_rows_sql``, ``trait_ctes``),
``merge`` (``advance``, ``rebuild``, ``with_local_hour``), ``snapshot`` (``snapshot``),
``ranks`` (exact population ranks from per-bucket summaries: ``rank_cuts``, ``apply_scores``, ``bucket_deciles``, ``deciles_of``),
``population`` (``add_population_features``, ``rfm_cuts``, ``population_snapshot``, ``profile_changes``,
``change_counts``),
``build`` (lake stages: ``build_profiles``, ``build_profiles_range``, ``publish_profiles``, ``read_state``,
``upgrade_state``, ``staged_hours``, ``snapshot_committed``), ``replay`` (rebuilds from staged events:
``rebuild_bucket``, ``rebuild_before_cutoffs``, ``reproducible_hours``, ``profiles_at``), ``verify``
(``verify_hour``, ``compare_tables``). docs/features.md.
"""
