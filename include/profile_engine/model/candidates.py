"""The candidates a trained version offers to the gate, behind one small interface. docs/model.md (Evaluation and
the gate).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from profile_engine.config import Settings
from profile_engine.lake.storage import MODELS, Lake, read_json
from profile_engine.model import artifacts, registry

if TYPE_CHECKING:
    from profile_engine.model.artifacts import LoadedModel

# Candidate name (in evaluation.json, reports and the card) of each model kind. The order of preference the
# gate's tie rule uses is ``registry.MODEL_KINDS``: the ensemble of the network and the trees first, then the
# network alone (the main model, and the ensemble's first member), the trees, the sequence encoder alone and
# combined with the aggregate inputs (when trained), then the baseline.
CANDIDATE_NAMES: dict[str, str] = {
    "model": "network",
    "ensemble": "ensemble",
    "lightgbm": "lightgbm",
    "sequence": "sequence",
    "combined": "combined",
    "baseline": "baseline",
}
# The candidate every other one is checked against on the primary metric (never worse, no margin).
BASELINE = "baseline"


@dataclass(frozen=True)
class Candidate:
    """One scorer of a version: its name and kind, calibrated ``predict`` and training-time metrics."""

    name: str  # "network", "ensemble", "lightgbm", "sequence", "combined", "baseline"
    kind: str  # the ``artifacts.load_model`` kind that scores it (``registry.MODEL_KINDS``)
    model: LoadedModel
    metrics: Mapping[str, float] = field(default_factory=dict)  # metrics.json's eval metrics (calibrated)

    @property
    def label(self) -> str:
        """What scores record as ``model_version`` when this candidate scores."""
        return self.model.label

    @property
    def numeric(self) -> tuple[str, ...]:
        return self.model.numeric

    @property
    def categorical(self) -> tuple[str, ...]:
        return self.model.categorical

    @property
    def calibration(self) -> dict[str, Any] | None:
        return self.model.calibration

    def predict(self, table: pa.Table) -> np.ndarray:
        """Calibrated purchase probabilities of profile rows."""
        return self.model.predict(table)

    def describe(self) -> dict[str, str]:
        """JSON-able identity (``evaluation.json``'s ``candidates``)."""
        return {"name": self.name, "kind": self.kind, "label": self.label}


def version_candidates(settings: Settings, version: str) -> list[Candidate]:
    """Every candidate of a committed version, in preference order (versions trained before LightGBM: two,
    before the ensemble: no ensemble)."""
    metrics_file = Lake(settings.lake).path(MODELS, version, registry.METRICS_FILE)
    evaluated = read_json(metrics_file).get("eval", {}) if metrics_file.is_file() else {}
    out = []
    for kind in artifacts.version_kinds(settings, version):
        name = CANDIDATE_NAMES[kind]
        out.append(
            Candidate(
                name=name,
                kind=kind,
                model=artifacts.load_model(settings, version, kind),
                metrics=evaluated.get(kind, {}),
            )
        )
    return out
