"""Model evaluation, drift and the promotion gate (DESIGN.md §5, TFX Evaluator style).

Challenger and reference (the champion as of the hour, or the challenger's own
baseline before any promotion) are scored on the same out-of-time evaluation
rows. Metrics: AUC, PR-AUC, log loss, Brier score, expected calibration error,
precision and lift in the top decile, each with a seeded bootstrap interval.
Drift: PSI of every feature and of the score between the hour's snapshot and the
previous one. The gate promotes a challenger that clears absolute floors and is
not worse than the reference beyond a margin on any compared metric.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profile_engine import labels, registry
from profile_engine.config import Settings
from profile_engine.hours import HOUR, floor_hour, format_hour
from profile_engine.lake import MODELS, Lake, read_json

if TYPE_CHECKING:
    from profile_engine.model import LoadedModel

EPS = 1e-7

# Whether a larger value of a metric is better; the gate needs the direction.
HIGHER_IS_BETTER: dict[str, bool] = {
    "auc": True,
    "pr_auc": True,
    "top_decile_precision": True,
    "top_decile_lift": True,
    "log_loss": False,
    "brier": False,
    "ece": False,
}


# ---- metrics -------------------------------------------------------------------------------------------------------
def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return ((upper - counts + 1 + upper) / 2.0)[inverse]


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties count half); NaN when only one class is present."""
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(p, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pr_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (area under the precision-recall step curve, tied scores as one threshold)."""
    y = np.asarray(y, dtype=np.float64)
    n_pos = y.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-np.asarray(p, dtype=np.float64), kind="stable")
    scores = np.asarray(p)[order]
    true_pos = np.cumsum(y[order])
    # keep the last index of each run of equal scores: one threshold per distinct score
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
    tp = true_pos[last]
    precision = tp / (last + 1.0)
    recall_gain = np.diff(np.r_[0.0, tp]) / n_pos
    return float(np.sum(precision * recall_gain))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy with probabilities clipped away from 0 and 1."""
    y = np.asarray(y, dtype=np.float64)
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared error of the probabilities."""
    return float(np.mean((np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2))


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-width probability bins (weighted |mean p - rate|)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, weights=p, minlength=bins) - np.bincount(index, weights=y, minlength=bins))
    return float(gap.sum() / max(count.sum(), 1))


def top_decile(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """``(precision, lift)`` among the 10% highest scores (ties broken by position, deterministically)."""
    y = np.asarray(y, dtype=np.float64)
    k = max(1, int(np.ceil(0.1 * y.size)))
    top = np.argsort(-np.asarray(p, dtype=np.float64), kind="stable")[:k]
    precision = float(y[top].mean())
    base = float(y.mean())
    return precision, (precision / base if base > 0 else float("nan"))


def metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Every reported metric (keys of ``HIGHER_IS_BETTER``) for labels ``y`` and probabilities ``p``."""
    precision, lift = top_decile(y, p)
    return {
        "auc": auc(y, p),
        "pr_auc": pr_auc(y, p),
        "log_loss": log_loss(y, p),
        "brier": brier(y, p),
        "ece": ece(y, p),
        "top_decile_precision": precision,
        "top_decile_lift": lift,
    }


def bootstrap_intervals(
    y: np.ndarray, scores: Mapping[str, np.ndarray], *, n_boot: int = 200, seed: int = 7, level: float = 0.95
) -> dict[str, dict[str, list[float]]]:
    """Percentile intervals ``{model: {metric: [low, high]}}`` from paired bootstrap resamples.

    Every model is scored on the same resampled rows, so intervals are comparable.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, y.size, size=(n_boot, y.size))
    out: dict[str, dict[str, list[float]]] = {}
    tail = (1 - level) / 2 * 100
    for name, p in scores.items():
        p = np.asarray(p)
        samples = [metrics(y[rows], p[rows]) for rows in draws]
        out[name] = {
            key: [float(v) for v in np.nanpercentile([s[key] for s in samples], [tail, 100 - tail])]
            for key in HIGHER_IS_BETTER
        }
    return out


# ---- drift ---------------------------------------------------------------------------------------------------------
def psi(expected: np.ndarray, actual: np.ndarray, *, bins: int = 10) -> float:
    """Population stability index of a numeric variable; NaN is its own bin.

    Bins are deciles of ``expected``; empty bins get a small floor so the index stays finite.
    """
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    known = expected[~np.isnan(expected)]
    edges = np.unique(np.quantile(known, np.linspace(0, 1, bins + 1)[1:-1])) if known.size else np.array([])

    def shares(values: np.ndarray) -> np.ndarray:
        index = np.where(np.isnan(values), edges.size + 1, np.searchsorted(edges, values, side="right"))
        return np.bincount(index, minlength=edges.size + 2) / max(values.size, 1)

    return _psi_from_shares(shares(expected), shares(actual))


def psi_categorical(expected: Sequence[Any] | np.ndarray, actual: Sequence[Any] | np.ndarray) -> float:
    """Population stability index of a categorical variable (None is a category)."""
    expected_codes = np.asarray([str(v) for v in expected], dtype=object)
    actual_codes = np.asarray([str(v) for v in actual], dtype=object)
    levels, inverse = np.unique(np.concatenate([expected_codes, actual_codes]), return_inverse=True)
    first = inverse[: expected_codes.size]
    second = inverse[expected_codes.size :]
    return _psi_from_shares(
        np.bincount(first, minlength=levels.size) / max(first.size, 1),
        np.bincount(second, minlength=levels.size) / max(second.size, 1),
    )


def _psi_from_shares(expected: np.ndarray, actual: np.ndarray, floor: float = 1e-4) -> float:
    e = np.maximum(expected, floor)
    a = np.maximum(actual, floor)
    return float(np.sum((a - e) * np.log(a / e)))


def _numeric(table: pa.Table, column: str) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.cast(table.column(column), pa.float64()), np.nan))


def feature_drift(
    previous: pa.Table, current: pa.Table, numeric: Sequence[str], categorical: Sequence[str]
) -> dict[str, float]:
    """PSI of every feature from the previous snapshot to the current one."""
    drift = {c: psi(_numeric(previous, c), _numeric(current, c)) for c in numeric}
    drift.update(
        {c: psi_categorical(previous.column(c).to_pylist(), current.column(c).to_pylist()) for c in categorical}
    )
    return drift


# ---- gate ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateConfig:
    """Absolute floors and the allowed shortfall against the reference, per metric."""

    floors: Mapping[str, float] = field(default_factory=lambda: {"auc": 0.6, "top_decile_lift": 1.2})
    margins: Mapping[str, float] = field(default_factory=lambda: {"auc": 0.01, "log_loss": 0.02})


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict with every check it made."""

    promote: bool
    reasons: list[str]
    checks: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"promote": self.promote, "reasons": self.reasons, "checks": self.checks}


def gate(
    challenger: Mapping[str, float], reference: Mapping[str, float] | None, config: GateConfig | None = None
) -> GateDecision:
    """Promote when every floor is cleared and no margin is exceeded against ``reference``.

    A floor on a lower-is-better metric is a ceiling. A NaN metric fails its check.
    """
    config = config or GateConfig()
    checks: list[dict[str, Any]] = []
    for name, floor in config.floors.items():
        value = challenger[name]
        ok = bool(value >= floor) if HIGHER_IS_BETTER[name] else bool(value <= floor)
        checks.append({"check": "floor", "metric": name, "value": value, "threshold": floor, "passed": ok})
    if reference is not None:
        for name, margin in config.margins.items():
            value, ref = challenger[name], reference[name]
            shortfall = (ref - value) if HIGHER_IS_BETTER[name] else (value - ref)
            ok = bool(shortfall <= margin)
            checks.append(
                {"check": "margin", "metric": name, "value": value, "reference": ref, "threshold": margin, "passed": ok}
            )
    failed = [c for c in checks if not c["passed"]]
    reasons = [
        f"{c['metric']} {c['value']:.4f} fails floor {c['threshold']}"
        if c["check"] == "floor"
        else f"{c['metric']} {c['value']:.4f} worse than reference {c['reference']:.4f} beyond margin {c['threshold']}"
        for c in failed
    ]
    return GateDecision(promote=not failed, reasons=reasons or ["all checks passed"], checks=checks)


# ---- stage ---------------------------------------------------------------------------------------------------------
def snapshot_drift(settings: Settings, hour: datetime, model: LoadedModel, *, max_rows: int = 50_000) -> dict[str, Any]:
    """PSI of the model's features and of its score from the previous committed snapshot to the hour's.

    Both snapshots are sampled by the same user hash, so a stable population compares
    with itself.
    """
    lake = Lake(settings.lake)
    earlier = [h for h in labels.committed_profile_hours(lake) if h < hour]
    if not earlier or not labels.profile_committed(lake, hour):
        return {"previous_hour": None, "features": {}, "score": None, "reason": "no two committed snapshots to compare"}
    previous = labels.sample_users(labels.read_snapshot(lake, earlier[-1]), max_rows, settings.seed, "drift")
    current = labels.sample_users(labels.read_snapshot(lake, hour), max_rows, settings.seed, "drift")
    features = feature_drift(previous, current, model.numeric, model.categorical)
    worst = max(features, key=lambda k: features[k]) if features else None
    return {
        "previous_hour": format_hour(earlier[-1]),
        "features": features,
        "max_feature": worst,
        "score": psi(model.predict(previous), model.predict(current)),
    }


def _reference(settings: Settings, hour: datetime, version: str) -> tuple[str, LoadedModel]:
    """The champion in force before this hour's promotion, else the challenger's own baseline."""
    from profile_engine.model import load_model

    entry = registry.champion_as_of(settings, hour)
    if entry is not None and entry["version"] == version:  # a rerun: compare with what this promotion replaced
        entry = registry.champion_as_of(settings, hour - HOUR)
    if entry is not None:
        return f"champion {entry['version']}", load_model(settings, entry["version"], "model")
    return f"baseline {version}", load_model(settings, version, "baseline")


def evaluate_and_promote(
    settings: Settings,
    hour: datetime,
    *,
    run_id: str = "manual",
    force_promote: bool = False,
    gate_config: GateConfig | None = None,
    n_boot: int = 200,
) -> dict[str, Any]:
    """Stage: evaluate the challenger trained at ``hour``, apply the gate and promote from ``hour`` on.

    Challenger and reference are scored on the same evaluation rows (the training
    set's ``eval.parquet``). A promotion applies to the scoring of ``hour`` itself;
    ``force_promote`` promotes whatever the gate says and is recorded as forced.
    The decision is written into the model directory (``evaluation.json``, card).
    """
    from profile_engine import model as models

    hour = floor_hour(hour)
    version = registry.model_version(hour)
    if not registry.model_dir_committed(settings, version):
        return {"status": "skipped", "reason": f"no challenger trained at {format_hour(hour)}"}
    _, rows, training = labels.read_training_set(settings, version)
    y = np.asarray(rows.column(labels.LABEL), dtype=np.float64)
    challenger = models.load_model(settings, version, "model")
    reference_name, reference = _reference(settings, hour, version)
    scores = {"challenger": challenger.predict(rows), "reference": reference.predict(rows)}
    point = {name: metrics(y, p) for name, p in scores.items()}
    decision = gate(point["challenger"], point["reference"], gate_config)
    promoted = decision.promote or force_promote
    entry = None
    if promoted:
        verdict = "gate passed" if decision.promote else "gate failed: " + "; ".join(decision.reasons)
        entry = registry.promote(
            settings,
            version,
            hour,
            forced=force_promote,
            reason=f"{'forced, ' if force_promote else ''}{verdict} (against {reference_name})",
            metrics={k: round(v, 6) for k, v in point["challenger"].items()},
            run_id=run_id,
        )
    drift = snapshot_drift(settings, hour, challenger)
    evaluation: dict[str, Any] = {
        "version": version,
        "hour": format_hour(hour),
        "reference": reference_name,
        "rows": int(y.size),
        "positives": int(y.sum()),
        "metrics": point,
        "intervals": bootstrap_intervals(y, scores, n_boot=n_boot, seed=settings.seed),
        "decision": decision.as_dict(),
        "promoted": promoted,
        "forced": force_promote,
        "drift": drift,
        "run_id": run_id,
    }
    features = {"numeric": list(challenger.numeric), "categorical": list(challenger.categorical)}
    models.update_model_dir(
        settings,
        version,
        {
            models.EVALUATION_FILE: json.dumps(evaluation, indent=2, sort_keys=True, default=str).encode(),
            models.CARD_FILE: models.model_card(
                version,
                training,
                features,
                read_json(Lake(settings.lake).path(MODELS, version, models.METRICS_FILE)),
                evaluation,
            ).encode(),
        },
    )
    return {
        "status": "promoted" if promoted else "rejected",
        "version": version,
        "reference": reference_name,
        "forced": force_promote,
        "reasons": decision.reasons,
        "metrics": {name: {k: round(v, 4) for k, v in m.items()} for name, m in point.items()},
        "score_psi": drift["score"],
        "from_hour": entry["from_hour"] if entry else None,
    }
