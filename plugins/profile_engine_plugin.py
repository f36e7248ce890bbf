"""Airflow plugin: the profile engine's run-report pages in the Airflow 3 UI.

Mounts the FastAPI app of ``profile_engine.ops.ui`` under ``/profile-engine`` (every
route requires the Airflow login) and adds a "Run reports" entry to the UI's
navigation, shown inside the UI as an external view. All logic is in the package.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from profile_engine.ops.ui import URL_PREFIX, create_app


class ProfileEnginePlugin(AirflowPlugin):
    """Run reports, Data Docs and model cards, read from the lake."""

    name = "profile_engine"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Profile engine run reports"}]
    external_views = [
        {
            "name": "Run reports",
            "href": f"{URL_PREFIX}/",
            "destination": "nav",
            "category": "browse",
            "url_route": "profile-engine",
        }
    ]
