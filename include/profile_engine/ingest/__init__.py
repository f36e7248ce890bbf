"""Extract and validate one hour: landing files to the ingestion ledger (``events.extract_events``),
then rows to staging or quarantine (``events.validate_events``). docs/sources.md.
"""
