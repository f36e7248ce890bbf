"""``python -m profile_engine``: the command line (see ``profile_engine.cli``)."""

from profile_engine.cli import main

raise SystemExit(main())
