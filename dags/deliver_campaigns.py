"""
### deliver_campaigns

Deliver each hour's marketing segment exports to the campaign tools.

Scheduled on the Asset `profile_engine_segment_exports`, which `publish_segments`
(DAG `profile_refresh`) updates every hour with the hour and the path of the export
manifest in the event's `extra`. Events coalesce when hours run fast (backfills,
catch-up), so one run reads **every** triggering event and delivers each hour once,
oldest first.

* Destinations: a local outbox folder (`PROFILE_ENGINE_OUTBOX`, default `<lake>/outbox`),
  and SQL tables (`campaign_deliveries`, and the current suppression list folded from the
  hours' entered/left suppress rows in `campaign_suppressions`) through the Airflow
  Connection named by `PROFILE_ENGINE_DELIVERY_CONN_ID` when set.
* Only committed exports (manifest present, checksums match) are delivered; the same
  hour delivered twice adds nothing; a changed rerun of an hour replaces that hour.
* Trigger by hand with the `hour` param to deliver (again) one committed hour.

All logic lives in `include/profile_engine/delivery.py`; the task only wires it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Asset, Param, dag, get_current_context, task

from profile_engine.config import task_timeout  # light: reads one environment variable
from profile_engine.segments import delivery  # light: the Asset's name only

SEGMENT_EXPORTS = Asset(name=delivery.EXPORTS_ASSET_NAME, uri=delivery.EXPORTS_ASSET_URI)


@dag(
    schedule=[SEGMENT_EXPORTS],
    start_date=datetime(2026, 1, 1),
    catchup=False,  # asset-scheduled: runs follow events, there are no intervals to catch up
    max_active_runs=1,  # deliveries of consecutive hours in order
    tags=["profile-engine", "marketing", "delivery"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "execution_timeout": task_timeout()},
    params={
        "hour": Param(
            None,
            type=["null", "string"],
            description="Deliver this committed hour (ISO UTC) in addition to the triggering events.",
        ),
    },
)
def deliver_campaigns() -> None:
    """Deliver the exports named by the triggering Asset events (see the module docstring)."""

    @task(multiple_outputs=False)
    def deliver_exports() -> dict[str, Any]:
        """Deliver every hour the triggering events (or the `hour` param) name, idempotently."""
        from profile_engine.config import Settings

        context = get_current_context()
        extras = [dict(event.extra) for events in context["triggering_asset_events"].values() for event in events]
        if context["params"].get("hour"):
            extras.append({delivery.EXTRA_HOUR: context["params"]["hour"]})
        settings = Settings.from_env()
        engine = delivery.connection_engine(settings.delivery_conn_id) if settings.delivery_conn_id else None
        return delivery.deliver_events(settings, extras, engine=engine)

    deliver_exports()


deliver_campaigns()
