"""The ground floor: schemas and column names every stage shares; imports nothing of the engine but itself.

Modules: ``events`` (canonical and staged event, event types, buckets), ``profiles`` (snapshot, interests,
changes), ``scores`` (the scores layer), ``segments`` (segments, exports, contact history),
``stages`` (the stages of one hour: STAGES, REPORT_STAGE, MAPPED_STAGES, TRAINING_STAGES). docs/architecture.md.
"""
