"""User-profile data engine for e-commerce: hourly profiles, propensity scores and segments (docs/architecture.md).

Subpackages by concern, each importing only those below it: ``contracts``, ``lake``, ``privacy``, ``sources``,
``ingest``, ``quality``, ``profiles``, ``model``, ``segments``, ``ops``; ``config`` and ``hours`` at the bottom,
``cli`` on top. Importing the package is cheap: TensorFlow, Great Expectations and LightGBM load only inside
the functions that need them.
"""

__version__ = "0.1.0"
