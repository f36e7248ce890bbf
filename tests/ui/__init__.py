"""Browser tests of the standalone UI (``make test-browser``; not part of ``make test``)."""
