"""The Celery workers' ``[core] hostname_callable``: the name the cluster test gave the worker.

Two workers on one machine share its hostname, so the task instances' ``hostname`` could not
tell them apart; each worker of the test sets ``PROFILE_ENGINE_CLUSTER_WORKER`` and points
``AIRFLOW__CORE__HOSTNAME_CALLABLE`` here, as two hosts of a real cluster would differ.
"""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    """The worker's name from ``PROFILE_ENGINE_CLUSTER_WORKER``, else the machine's name."""
    return os.environ.get("PROFILE_ENGINE_CLUSTER_WORKER") or socket.getfqdn()
