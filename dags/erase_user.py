"""
### erase_user

Erase one or more users from the lake (a GDPR / CCPA erasure request). Trigger it by hand
from the UI with **one** of the Params:

* `user_id`: a user id as the shop knows it;
* `ids_file`: the path of a text file of user ids (one per line, `#` comments) that the
  workers can read;

and a `reason` (kept in the audit log). `tombstone_unknown` also tombstones ids found
nowhere in the lake (their events have not arrived yet).

What it does (`profile_engine.ops.erasure.erase_users`, under the lake lock, so it waits for
the running hour and never interleaves with one):

* removes the users' rows from every retained dataset (staging, quarantine, state,
  profiles, interests, profile changes, scores, segments, contact history, exports and
  their manifests, training sets, the outbox) and their ids from Data Docs pages, run
  reports and other text, each partition rewritten whole;
* adds their keyed hashes (HMAC-SHA256) to the permanent tombstone list, which every later
  validation honours: late files, reruns, replays and rebuilds count their rows as
  `erased` and never store them, even if the same id signs up again;
* appends an audit entry per user to `_meta/erasure/audit.jsonl` with the keyed hash,
  the rows removed per dataset, who triggered it and why: never the raw id.

`landing/` (the producers' raw files) is not rewritten: the ingestion ledger must keep
proving what each hour read; it is filtered by the tombstones on every read and deleted
by the `lake_retention` DAG after `PROFILE_ENGINE_RETENTION_DAYS`.

All logic lives in `include/profile_engine/erasure.py`; the task only wires it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task

from profile_engine.config import task_timeout  # light: reads one environment variable


@dag(
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,  # manual only: there are no intervals
    max_active_runs=1,
    tags=["profile-engine", "privacy", "erasure"],
    doc_md=__doc__,
    # Retries wait for a running hour to free the lake lock (LakeLocked); a rerun of an
    # erasure is harmless (it finds the users already erased).
    default_args={"retries": 3, "retry_delay": timedelta(minutes=10), "execution_timeout": task_timeout()},
    params={
        "user_id": Param(None, type=["null", "string"], description="The user id to erase."),
        "ids_file": Param(
            None, type=["null", "string"], description="Or: a file of user ids (one per line) the workers can read."
        ),
        "reason": Param("erasure request", type="string", description="Why (kept in the audit log)."),
        "tombstone_unknown": Param(
            False, type="boolean", description="Also tombstone ids found nowhere (their data may arrive later)."
        ),
    },
)
def erase_user() -> None:
    """Erase the users named by the Params (see the module docstring)."""

    @task(multiple_outputs=False)
    def erase_users() -> dict[str, Any]:
        """Remove the users from every retained dataset, tombstone them, audit it; returns counts only."""
        from airflow.sdk.exceptions import AirflowFailException

        from profile_engine.config import Settings
        from profile_engine.ops.erasure import erase_request

        context = get_current_context()
        params = context["params"]
        dag_run = context["dag_run"]
        who = getattr(dag_run, "triggering_user_name", None) or "airflow"
        try:
            return erase_request(
                Settings.from_env(),
                user_ids=[params["user_id"]] if params.get("user_id") else [],
                ids_file=params.get("ids_file"),
                requested_by=f"airflow:{who} ({dag_run.run_id})",
                reason=params["reason"],
                tombstone_unknown=bool(params.get("tombstone_unknown")),
            )
        except (ValueError, FileNotFoundError) as error:
            raise AirflowFailException(str(error)) from error  # a bad request: retrying cannot help

    erase_users()


erase_user()
