"""The ensemble candidate: the calibrated probabilities of a version's network and LightGBM blended, then
calibrated again; it reuses the version's own fits. docs/model.md (Model).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

ENSEMBLE_FILE = "ensemble.json"
FORMAT = "profile_engine.ensemble/1"
# The kinds blended (the network and the trees of the same version) and their weights: fixed, equal weights, so
# nothing is chosen on the calibration slice but the calibration itself (a weight tuned on it would also be tuned
# on the rows that stopped both members' training early).
MEMBERS: tuple[str, ...] = ("model", "lightgbm")
WEIGHTS: tuple[float, ...] = (0.5, 0.5)
# Kinds that may be members: scored from the profile row alone (no sequence kind, no other ensemble).
MEMBER_KINDS: tuple[str, ...] = ("model", "lightgbm", "baseline")


class Member(Protocol):
    """A member as loaded for scoring (``artifacts.LoadedModel``): calibrated ``predict`` and its engine."""

    @property
    def engine(self) -> str: ...

    def predict(self, table: pa.Table) -> np.ndarray: ...


def blend(probabilities: Sequence[np.ndarray], weights: Sequence[float] = WEIGHTS) -> np.ndarray:
    """The weighted mean of the members' calibrated probabilities (float64; weights normalised to sum 1)."""
    if len(probabilities) != len(weights) or not probabilities:
        raise ValueError(f"{len(probabilities)} member probabilities for {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if not (np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0):
        raise ValueError(f"ensemble weights must be finite, non-negative and not all 0: {list(weights)}")
    stacked = np.vstack([np.asarray(p, dtype=np.float64) for p in probabilities])
    return np.asarray((w / w.sum()) @ stacked, dtype=np.float64)


def spec_bytes(members: Sequence[str] = MEMBERS, weights: Sequence[float] = WEIGHTS) -> bytes:
    """``ensemble.json``: the format, the member kinds and their weights (stable bytes)."""
    spec = {"format": FORMAT, "members": list(members), "weights": [float(w) for w in weights]}
    return json.dumps(spec, indent=2, sort_keys=True).encode()


def read_spec(payload: bytes) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``(members, weights)`` of an ``ensemble.json``; ``ValueError`` for another format or member."""
    spec: dict[str, Any] = json.loads(payload)
    if spec.get("format") != FORMAT:
        raise ValueError(f"{ENSEMBLE_FILE}: format {spec.get('format')!r}, expected {FORMAT!r}")
    members, weights = tuple(str(m) for m in spec["members"]), tuple(float(w) for w in spec["weights"])
    unknown = [m for m in members if m not in MEMBER_KINDS]
    if unknown or len(members) != len(weights) or not members:
        raise ValueError(
            f"{ENSEMBLE_FILE}: members {list(members)} with weights {list(weights)} (allowed {MEMBER_KINDS})"
        )
    return members, weights


@dataclass(frozen=True)
class EnsembleScorer:
    """The members of one version as loaded for scoring, and their weights; ``predict_raw`` is the blend
    before the ensemble's own calibration."""

    members: tuple[Member, ...]
    weights: tuple[float, ...]

    @property
    def engine(self) -> str:
        """The members' engines joined by ``+`` (``numpy+lightgbm``: no TensorFlow at scoring)."""
        return "+".join(m.engine for m in self.members)

    def predict_raw(self, table: pa.Table) -> np.ndarray:
        """The blend of the members' calibrated probabilities of profile rows."""
        return blend([m.predict(table) for m in self.members], self.weights)
