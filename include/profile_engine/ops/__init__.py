"""Running the engine. docs/operations.md.

Modules and their public functions:

- ``runner``: ``run_hour``, ``run_hours`` (the DAG's stages in process), ``warm_up`` (history in bulk), ``replay``.
- ``progress``: ``Progress`` (hours done, events, stage, time left: a bar or plain lines), ``NoiseFilter``,
  ``install_log_filters``, ``filtered_stderr`` (known Airflow/TensorFlow noise), ``duration``.
- ``report``: ``write_run_report``, ``build_report``, ``render_html``, ``stage_states``, ``metrics_table_html``.
- ``ui``: ``create_app`` (run report pages in the Airflow UI) and the page renderers.
- ``alerts``: ``ProfileEngineNotifier``, ``send_alert``, ``check_freshness``, ``run_freshness_check``.
- ``erasure``: ``erase_users``, ``erase_request``, ``read_audit`` (validation drops tombstoned rows: ``privacy.tombstones``).
- ``retention``: ``apply_retention``, ``run_retention``, ``rebuild_checkpoint``, ``re_evaluable``.
- ``demo``: ``run_demo`` (make demo), ``run_ui`` (make ui), ``land_demo_hours`` (the demo producer).
- ``timetable``: ``HourlyTimetable``, ``hourly_timetable``.
"""
