"""User profiles: mergeable per-bucket state, hourly snapshots and population features
(``features.build_profiles``, ``features.publish_profiles``) and the rebuild check (``verify.verify_hour``).

docs/features.md.
"""
