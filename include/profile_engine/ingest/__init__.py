"""Ingest an hour: landing files to the ingestion ledger, then rows to staging or quarantine. docs/sources.md.

- ``events``: ``extract_events``, ``validate_events``, ``read_ledger``, ``read_skipped``,
  ``threshold_verdict`` (the one quarantine-threshold rule), ``defective_share``,
  ``QuarantineThresholdExceeded``, ``LedgerError``.
"""
