"""User-profile data engine for e-commerce: hourly profiles, propensity, segments.

Every pipeline stage lives in its own module (``ingest``, ``quality``,
``features``, ``labels``, ``model``, ``evaluate``, ``registry``, ``segments``,
``report``); ``lake`` owns paths and atomic writes, ``config`` the settings and
``runner`` runs whole hours in-process. Importing this package is cheap: no
module imports TensorFlow, Great Expectations or DuckDB at import time except
where a stage function needs it.
"""

__version__ = "0.1.0"
