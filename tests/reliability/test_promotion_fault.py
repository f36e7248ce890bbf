"""Fault point ``model_before_promotion``: a saved model whose promotion was killed is not in force.

The full-hour fault tests (``test_faults.py``) run hours too small to train a model, so
this point is driven directly: ``registry.promote`` in a subprocess, over a lake with
two committed model versions, the first one promoted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from profile_engine.config import Settings
from profile_engine.lake import faults
from profile_engine.lake.storage import MODELS, Lake, read_json
from profile_engine.model import registry

HOUR = datetime(2026, 11, 3, 5, tzinfo=UTC)
EARLIER = datetime(2026, 11, 2, 5, tzinfo=UTC)
PROMOTE = (
    "import sys; from datetime import datetime; from pathlib import Path; "
    "from profile_engine.model import registry; from profile_engine.config import Settings; "
    "registry.promote(Settings(lake=Path(sys.argv[1])), sys.argv[2], datetime.fromisoformat(sys.argv[3]), "
    "reason='gate passed')"
)


def _commit_model(settings: Settings, hour: datetime) -> str:
    version = registry.model_version(hour)
    lake = Lake(settings.lake)
    lake.write_dir(lake.path(MODELS, version), [("model.keras", b"weights")], {"version": version})
    return version


def _promote(settings: Settings, version: str, fault: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROFILE_ENGINE_")}
    if fault:
        env[faults.FAULT_ENV] = fault
    args = [sys.executable, "-c", PROMOTE, str(settings.lake), version, HOUR.isoformat()]
    return subprocess.run(args, env=env, capture_output=True, check=False, timeout=120).returncode


def test_killed_promotion_leaves_the_old_champion_and_reruns_cleanly(tmp_path: Path) -> None:
    # Arrange: v1 is the champion; the challenger of HOUR is saved (committed) before its promotion.
    settings = Settings(lake=tmp_path / "lake")
    old = _commit_model(settings, EARLIER)
    registry.promote(settings, old, EARLIER, reason="first")
    new = _commit_model(settings, HOUR)
    champion_file = Lake(settings.lake).path(MODELS, registry.CHAMPION_FILE)

    # Act 1: the promotion dies after the model is saved, before the log moves.
    code = _promote(settings, new, faults.MODEL_BEFORE_PROMOTION)

    # Assert 1: nothing moved: the old champion is in force for HOUR and champion.json still names it.
    assert code == faults.EXIT_CODE
    assert registry.model_dir_committed(settings, new)
    assert [e["version"] for e in registry.promotion_log(settings)] == [old]
    assert (registry.champion_as_of(settings, HOUR) or {})["version"] == old
    assert read_json(champion_file)["version"] == old

    # Act 2: the rerun promotes.
    assert _promote(settings, new, None) == 0

    # Assert 2: one entry for HOUR (no trace of the killed attempt), mirrored by champion.json.
    log = registry.promotion_log(settings)
    assert [e["version"] for e in log] == [old, new] and "replaces" not in log[-1]
    assert read_json(champion_file)["version"] == new
