"""Running the engine: the in-process runner, run reports and UI pages, alerts, erasure, retention,
the demo and the Airflow timetable. docs/operations.md.
"""
