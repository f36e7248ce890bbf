"""
### profile_refresh

Every hour, turn the raw behaviour events that landed into up-to-date user
profiles, a purchase-propensity score and marketing segment exports, with a
data-quality report and a run report.

`extract_events -> validate_events -> build_profiles[bucket] -> publish_profiles
-> train_challenger? -> evaluate_and_promote? -> score_profiles[bucket] -> publish_segments -> write_run_report`,
and `validate_events -> check_quality -> write_run_report` beside the profile branch.

* `validate_events` applies the row rules: valid events are staged per user bucket, the rest
  quarantined with reasons. `check_quality` then runs the Great Expectations suite over the
  hour's staged events and publishes its results and Data Docs, in parallel with
  `build_profiles`; its verdict goes to the run report and gates nothing. It also runs when
  `validate_events` failed the hour on the quarantine threshold (after staging it), so that
  hour has its Data Docs too.
* The run processes its data interval `[data_interval_start, data_interval_end)`, or
  the hour given in the `hour` param. A manual run with logical date H on the hour processes
  [H, H+1) (`profile_engine.ops.timetable.HourlyTimetable`), the run the scheduler would create for H,
  so the schedule goes on with H+1; a manual run at any other moment takes the last complete hour.
* Every hour is processed in order (`catchup`, `max_active_runs=1`, `depends_on_past` on
  stateful tasks); a run whose previous hour is missing fails and names it.
* Retraining runs on its own cadence (`PROFILE_ENGINE_RETRAIN_EVERY_HOURS`) or when forced.
* `write_run_report` always runs, so every failed hour has a report.
* A task that fails after its retries sends an alert to `PROFILE_ENGINE_ALERT_WEBHOOK` and/or
  by e-mail (`PROFILE_ENGINE_ALERT_SMTP`); see docs/operations.md.

All logic lives in `include/profile_engine/`; the tasks only wire it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from profile_engine.config import Settings, task_timeout  # light: reads environment variables only
from profile_engine.contracts.stages import MAPPED_STAGES, STAGES  # light: names only
from profile_engine.ops.alerts import ProfileEngineNotifier  # light: reads its settings when it fires
from profile_engine.ops.timetable import hourly_timetable  # light: Airflow's own timetable classes
from profile_engine.privacy.keys import EXPORT_KEY_CONN_ID, ExportKeyError
from profile_engine.segments import delivery  # light: the Asset's name only; stages import inside tasks

# Cheap, local settings only: no Variable, Connection, network or heavy import at parse time. The same
# Settings the tasks read (a bad PROFILE_ENGINE_* value is an import error naming the variable).
SETTINGS = Settings.from_env()
# Updated by publish_segments; deliver_campaigns is scheduled on it.
SEGMENT_EXPORTS = Asset(name=delivery.EXPORTS_ASSET_NAME, uri=delivery.EXPORTS_ASSET_URI)


def _context() -> tuple[Any, datetime, str]:
    """Settings (with per-run overrides from params), the hour and the run id of the running task."""
    from dataclasses import replace

    from profile_engine.config import Settings
    from profile_engine.hours import hour_for_run

    context = get_current_context()
    params = context["params"]
    settings = Settings.from_env()
    if params.get("quarantine_threshold") is not None:
        settings = replace(settings, quarantine_threshold=float(params["quarantine_threshold"]))
    hour = hour_for_run(params.get("hour"), context.get("data_interval_start"))
    from profile_engine.lake import lock

    # Every task holds the lake lock for its run (taken by the first, released by write_run_report).
    lock.join_run(settings, str(context["run_id"]))
    return settings, hour, str(context["run_id"])


@dag(
    schedule=hourly_timetable("UTC"),
    start_date=SETTINGS.schedule_start,
    catchup=True,
    max_active_runs=1,
    tags=["profile-engine", "profiles", "hourly"],
    doc_md=__doc__,
    # A task that fails for good (retries spent) sends an alert (PROFILE_ENGINE_ALERT_*).
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "execution_timeout": task_timeout(),  # PROFILE_ENGINE_TASK_TIMEOUT_MINUTES
        "on_failure_callback": [ProfileEngineNotifier()],
    },
    params={
        "hour": Param(
            None,
            type=["null", "string"],
            description="UTC hour to process (ISO, e.g. 2026-11-01T05:00:00+00:00); empty = the data interval start.",
        ),
        "force_retrain": Param(False, type="boolean", description="Train a challenger this hour even if not due."),
        "force_promote": Param(
            False, type="boolean", description="Promote this hour's challenger whatever the gate says."
        ),
        "quarantine_threshold": Param(
            None,
            type=["null", "number"],
            minimum=0,
            maximum=1,
            description="Fail the run when more than this share of rows is quarantined (empty = the configured default).",
        ),
        "dry_run": Param(False, type="boolean", description="Compute everything but write no segment exports."),
    },
)
def profile_refresh() -> None:
    """The hourly profile refresh (see the module docstring)."""

    @task(depends_on_past=True, multiple_outputs=False)
    def extract_events() -> dict[str, Any]:
        """Record in the ingestion ledger which landing files this hour takes."""
        from profile_engine.ingest import events as ingest

        settings, hour, run_id = _context()
        return ingest.extract_events(settings, hour, run_id=run_id)

    @task(depends_on_past=True, multiple_outputs=False)
    def validate_events(extracted: dict[str, Any]) -> dict[str, Any]:
        """Stage valid events per bucket and quarantine the rest (the row rules)."""
        from profile_engine.ingest import events as ingest

        settings, hour, run_id = _context()
        try:
            return ingest.validate_events(settings, hour, run_id=run_id)
        except ingest.QuarantineThresholdExceeded as error:
            # The hour's counts still reach the run report, then the policy fails the run.
            get_current_context()["ti"].xcom_push(key="return_value", value={**error.summary, "status": "failed"})
            raise AirflowFailException(str(error)) from error

    # all_done: an hour failed on the quarantine threshold has staged events (and a summary) to check.
    @task(trigger_rule="all_done", multiple_outputs=False)
    def check_quality() -> dict[str, Any]:
        """Run the Great Expectations suite on the hour's staged events and publish results and Data Docs."""
        from profile_engine.quality import suites as quality

        settings, hour, run_id = _context()
        validated = get_current_context()["ti"].xcom_pull(task_ids="validate_events")
        if not validated:
            raise AirflowSkipException("validate_events left no summary: nothing was staged to check")
        return quality.check_staged_hour(settings, hour, validated, run_id=run_id)

    # Mapped tasks (.expand) do not take doc_md from the docstring (Airflow 3.3): set it here.
    @task(depends_on_past=True, multiple_outputs=False, doc_md="Merge one bucket's staged events into its state.")
    def build_profiles(bucket: int, validated: dict[str, Any]) -> dict[str, Any]:
        """Merge this hour's staged events of one bucket into the previous hour's state."""
        from profile_engine.profiles import build

        settings, hour, run_id = _context()
        return build.build_profiles(settings, hour, bucket, run_id=run_id, first_hour=settings.schedule_start)

    @task(depends_on_past=True, multiple_outputs=False)
    def publish_profiles(built: list[dict[str, Any]]) -> dict[str, Any]:
        """Add population features (RFM), write the change log and commit the snapshot."""
        from profile_engine.profiles import build
        from profile_engine.quality import suites as quality

        settings, hour, run_id = _context()
        try:
            return build.publish_profiles(settings, hour, run_id=run_id)
        except quality.ProfileValidationError as error:
            raise AirflowFailException(str(error)) from error  # the data is wrong: a retry gives the same

    @task(multiple_outputs=False)
    def train_challenger(published: dict[str, Any]) -> dict[str, Any]:
        """Train a challenger when retraining is due for this hour (or forced); skipped otherwise."""
        from profile_engine.model import training

        settings, hour, run_id = _context()
        result = training.train_challenger(
            settings, hour, run_id=run_id, force=bool(get_current_context()["params"]["force_retrain"])
        )
        if result.get("status") == "skipped":
            raise AirflowSkipException(result.get("reason", "retraining not due"))
        return result

    @task(retries=0, multiple_outputs=False)  # a gate decision is deterministic: retrying cannot change it
    def evaluate_and_promote(trained: dict[str, Any]) -> dict[str, Any]:
        """Evaluate the challenger against the champion and promote it when it clears the gate."""
        from profile_engine.model import promotion

        settings, hour, run_id = _context()
        force = bool(get_current_context()["params"]["force_promote"])
        return promotion.evaluate_and_promote(settings, hour, run_id=run_id, force_promote=force)

    @task(
        trigger_rule="none_failed_min_one_success",
        multiple_outputs=False,
        doc_md="Score one bucket's profiles with the champion as of this hour (mapped: doc_md set here).",
    )
    def score_profiles(bucket: int) -> dict[str, Any]:
        """Score one bucket's profiles with the champion as of this hour."""
        from profile_engine.model import scoring

        settings, hour, run_id = _context()
        return scoring.score_profiles(settings, hour, bucket, run_id=run_id)

    @task(multiple_outputs=False, outlets=[SEGMENT_EXPORTS])
    def publish_segments(scored: list[dict[str, Any]]) -> dict[str, Any]:
        """Evaluate the segment rules, assign one action per user, write the exports and announce them."""
        from profile_engine.segments import publish, rules

        settings, hour, run_id = _context()
        context = get_current_context()
        optouts = delivery.connection_engine(settings.optout_conn_id) if settings.optout_conn_id else None
        try:
            summary = publish.publish_segments(
                settings,
                hour,
                run_id=run_id,
                dry_run=bool(context["params"]["dry_run"]),
                export_key_secret=delivery.connection_secret(EXPORT_KEY_CONN_ID),
                optout_engine=optouts,
            )
        except (rules.SegmentConfigError, ExportKeyError) as error:
            raise AirflowFailException(str(error)) from error  # a broken rules file or a missing key: no retry
        # The Asset event tells deliver_campaigns which hour and manifest to deliver.
        context["outlet_events"][SEGMENT_EXPORTS].extra = delivery.asset_extra(summary)
        return summary

    @task(trigger_rule="all_done", multiple_outputs=False)
    def write_run_report(**upstream: Any) -> dict[str, Any]:
        """Write the run report, whatever happened upstream."""
        from profile_engine.ops import report

        settings, hour, run_id = _context()
        ti = get_current_context()["ti"]
        summaries: dict[str, Any] = {}
        for name in STAGES:
            value = ti.xcom_pull(task_ids=name)
            summaries[name] = list(value) if name in MAPPED_STAGES and value else value
        states = report.stage_states(ti.get_task_states(dag_id=ti.dag_id, run_ids=[run_id]).get(run_id, {}))
        try:
            return report.write_run_report(settings, hour, summaries, run_id=run_id, states=states)
        finally:
            from profile_engine.lake import lock

            lock.release_run(settings, run_id)  # the run's last task (all_done) frees the lake

    buckets = list(range(SETTINGS.buckets))
    validated = validate_events(extract_events())
    checked = check_quality()
    validated >> checked
    built = build_profiles.partial(validated=validated).expand(bucket=buckets)
    published = publish_profiles(built)
    promoted = evaluate_and_promote(train_challenger(published))
    scored = score_profiles.expand(bucket=buckets)
    published >> scored
    promoted >> scored
    segments_done = publish_segments(scored)
    [segments_done, checked] >> write_run_report()


profile_refresh()
