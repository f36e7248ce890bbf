"""Data quality: Great Expectations suites, their results and Data Docs. docs/quality.md.

- ``suites``: ``check_staged_hour`` / ``run_quality`` (the staged hour), ``read_results``,
  ``validate_profiles`` (the profile snapshot), ``build_suite``, ``build_profile_suite``.
- ``datadocs``: ``prune_data_docs`` (keep recent and failed hours' sites), ``pruned_record``, ``keeps_docs``.
"""
