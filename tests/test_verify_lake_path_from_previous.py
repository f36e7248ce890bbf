"""The hourly lake path from the hour before equals an independent rebuild (split from tests/test_verify.py, beside
tests/test_verify_lake_path.py, so that pytest-xdist's ``--dist loadfile`` can run the two on different workers)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_verify_lake_path import LAKE_HOURS, check_hourly_lake_path


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 10_000), users=st.integers(200, 300), erase_after=st.integers(2, LAKE_HOURS - 3))
def test_hourly_lake_path_from_the_hour_before_equals_an_independent_rebuild_with_resends_late_events_and_erasures(
    seed: int, users: int, erase_after: int
) -> None:
    """The same with every bucket's snapshot started from the hour before (``snapshot.from_previous_hour``)
    whatever the bucket's size and the share of its users that changed; erasures rewrite the hour before."""
    check_hourly_lake_path(seed, users, erase_after, from_previous=True)
