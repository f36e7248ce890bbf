"""Great Expectations suites over the staged hour and the profile snapshot, and their Data Docs
(``suites.check_staged_hour``, ``suites.validate_profiles``). docs/quality.md.
"""
