"""The evaluate-and-promote stage (score every candidate, the champion and the heuristics on the same
rows, apply the gate, record the decision) and the run report's model section. docs/model.md (Evaluation and the gate).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

import numpy as np

from profile_engine.config import Settings
from profile_engine.hours import HOUR, floor_hour, format_hour
from profile_engine.lake.storage import MODELS, Lake, read_json
from profile_engine.model import artifacts, calibration, card, labels, registry, scoring
from profile_engine.model import candidates as cands
from profile_engine.model.drift import hourly_drift, snapshot_drift
from profile_engine.model.gate import HEURISTIC_PREFIX, GateConfig, choose
from profile_engine.model.metrics import (
    bootstrap_intervals,
    card_curves,
    heuristic_metrics,
    metrics,
    permutation_importance,
)


def model_report(settings: Settings, hour: datetime, summaries: Mapping[str, Any]) -> dict[str, Any]:
    """The run report's model section: which model scored, the training and gate decision, metrics and drift.

    Built from the stage summaries plus the promotion log and the lake; it never
    raises (a report must always be written), an error is reported in the section.
    """
    section: dict[str, Any] = {}
    scored = summaries.get("score_profiles")
    first = scored[0] if isinstance(scored, list) and scored and isinstance(scored[0], dict) else {}
    section["scoring"] = {
        k: first.get(k) for k in ("model", "model_version", "kind", "engine", "reason") if first.get(k) is not None
    }
    trained = summaries.get("train_challenger") or {}
    section["training"] = {k: trained.get(k) for k in ("status", "version", "reason") if trained.get(k) is not None}
    evaluated = summaries.get("evaluate_and_promote") or {}
    if evaluated.get("status") in ("promoted", "rejected"):
        section["decision"] = {
            k: evaluated.get(k)
            for k in (
                "status",
                "version",
                "candidate",
                "kind",
                "reference",
                "forced",
                "reasons",
                "deciding",
                "choice",
                "from_hour",
                "gate",
            )
            if k in evaluated
        }
        section["candidates"] = evaluated.get("candidates")
        section["metrics"] = evaluated.get("metrics")
        section["intervals"] = evaluated.get("intervals")
    try:
        entry = registry.champion_as_of(settings, hour)
        section["champion"] = (
            None
            if entry is None
            else {
                **{k: entry.get(k) for k in ("version", "from_hour", "forced", "reason")},
                "kind": registry.entry_kind(entry),
            }
        )
        section["drift"] = hourly_drift(settings, hour)
    except Exception as error:  # noqa: BLE001 - the report must be written whatever failed upstream
        section["error"] = f"{type(error).__name__}: {error}"
    return section


def _champion(settings: Settings, hour: datetime, version: str) -> tuple[str, str] | None:
    """The champion in force before this hour's promotion (for a rerun: the one it replaced) as
    ``(version, kind)``, or None."""
    entry = registry.champion_as_of(settings, hour)
    if entry is not None and entry["version"] == version:  # a rerun: compare with what this promotion replaced
        entry = registry.champion_as_of(settings, hour - HOUR)
    return None if entry is None else (str(entry["version"]), registry.entry_kind(entry))


def _rounded(values: Mapping[str, Any], digits: int = 4) -> dict[str, Any]:
    """Floats rounded for a stage summary; NaN and infinities become None (XCom is strict JSON)."""
    return {k: _finite(round(v, digits)) if isinstance(v, float) else v for k, v in values.items()}


def _finite(value: float) -> float | None:
    """``value``, or None when it is NaN or infinite (a heuristic's log loss, an undefined lift)."""
    return value if math.isfinite(value) else None


def evaluate_and_promote(
    settings: Settings,
    hour: datetime,
    *,
    run_id: str = "manual",
    force_promote: bool = False,
    gate_config: GateConfig | None = None,
    n_boot: int = 200,
    importance_rows: int = 5_000,
) -> dict[str, Any]:
    """Stage: evaluate the challenger trained at ``hour``, apply the gate and promote from ``hour`` on.

    Challenger and reference are scored on the same evaluation rows (the training
    set's ``eval.parquet``). A promotion applies to the scoring of ``hour`` itself;
    ``force_promote`` promotes whatever the gate says and is recorded as forced.
    The decision and its reasons go to the model directory (``evaluation.json``,
    the model card with its plots), the promotion log (when promoted) and the
    decision log (always). ``gate_config`` defaults to ``GateConfig.from_env()``.
    """
    hour = floor_hour(hour)
    version = registry.model_version(hour)
    if not registry.model_dir_committed(settings, version):
        return {"status": "skipped", "reason": f"no challenger trained at {format_hour(hour)}"}
    config = gate_config or GateConfig.from_env()
    _, rows, training = labels.read_training_set(settings, version)
    y = np.asarray(rows.column(labels.LABEL), dtype=np.float64)
    candidates = cands.version_candidates(settings, version)
    by_name = {c.name: c for c in candidates}
    champion = _champion(settings, hour, version)
    # Everything is scored on the same rows: every candidate of the version (network, trees, calibrated
    # baseline), the champion (margins) and, before the first promotion, the heuristics (a model and a
    # baseline sharing a bug cannot pass together against rules that use no preprocessing).
    scores = {c.name: c.predict(rows) for c in candidates}
    if champion is not None:
        scores["champion"] = artifacts.load_model(settings, champion[0], champion[1]).predict(rows)
    else:
        for name in scoring.HEURISTICS:
            scores[HEURISTIC_PREFIX + name] = scoring.heuristic_scores(rows, name)
    point = {
        name: (heuristic_metrics(y, p) if name.startswith(HEURISTIC_PREFIX) else metrics(y, p))
        for name, p in scores.items()
    }
    intervals = bootstrap_intervals(
        y,
        scores,
        n_boot=n_boot,
        seed=settings.seed,
        differences=[(c.name, n) for c in candidates for n in scores if n != c.name],
    )
    champion_label = None if champion is None else registry.kind_label(*champion)
    reference_name = (
        f"champion {champion_label}"
        if champion_label is not None
        else f"baseline {version}{artifacts.BASELINE_SUFFIX} and heuristics ({', '.join(scoring.HEURISTICS)})"
    )
    decision = choose(
        {c.name: point[c.name] for c in candidates},
        point.get("champion"),
        config,
        baselines={n: point[n] for n in scores if n == cands.BASELINE or n.startswith(HEURISTIC_PREFIX)},
        intervals=intervals,
        champion_name="champion",
    )
    notes = {c.name: calibration.calibration_note(c.calibration) for c in candidates}
    if not decision.promote:  # the cause behind the symptoms (e.g. AUC 0.50 of a flat network)
        causes = [f"cause ({name}): {note}" for name, note in notes.items() if note]
        decision = replace(decision, reasons=[*decision.reasons, *causes])
    promoted = decision.promote or force_promote
    # The candidate the record is about: the winner, else (rejected, or forced through) the network.
    chosen = by_name[decision.candidate] if decision.candidate else candidates[0]
    challenger = chosen.model
    verdict = (
        f"gate passed: {chosen.name} promoted ({decision.choice.get('reason')})"
        if decision.promote
        else "gate failed: " + "; ".join(decision.reasons)
    )
    reason = f"{'forced, ' if force_promote else ''}{verdict} (against {reference_name})"
    entry = None
    if promoted:
        entry = registry.promote(
            settings,
            version,
            hour,
            forced=force_promote,
            reason=reason,
            metrics={k: round(v, 6) for k, v in point[chosen.name].items()},
            decision=decision.as_dict(),
            run_id=run_id,
            kind=chosen.kind,
        )
    registry.record_decision(
        settings,
        version,
        hour,
        promoted=promoted,
        forced=force_promote,
        reason=reason,
        reference=reference_name,
        decision=decision.as_dict(),
        run_id=run_id,
    )
    drift = snapshot_drift(settings, hour, challenger)
    sample = labels.sample_users(rows, importance_rows, settings.seed, "importance")
    importance = permutation_importance(
        chosen.predict,
        sample,
        [*challenger.numeric, *challenger.categorical],
        np.asarray(sample.column(labels.LABEL), dtype=np.float64),
        seed=settings.seed,
    )
    evaluation: dict[str, Any] = {
        "version": version,
        "hour": format_hour(hour),
        "reference": reference_name,
        "rows": int(y.size),
        "positives": int(y.sum()),
        "base_rate": float(y.mean()),
        "candidates": [c.describe() for c in candidates],
        "chosen": chosen.name,
        "kind": chosen.kind,
        "metrics": point,
        "compared_with": "champion" if champion is not None else cands.BASELINE,
        "intervals": intervals,
        "decision": {
            **decision.as_dict(),
            "calibration": chosen.calibration,
            "calibrations": {c.name: c.calibration for c in candidates},
        },
        "promoted": promoted,
        "forced": force_promote,
        "from_hour": entry["from_hour"] if entry else None,
        "drift": drift,
        "importance": {
            "method": "permutation, mean AUC drop",
            "candidate": chosen.name,
            "rows": sample.num_rows,
            "features": importance,
        },
        "run_id": run_id,
    }
    registry.update_model_dir(
        settings,
        version,
        {
            registry.EVALUATION_FILE: json.dumps(evaluation, indent=2, sort_keys=True, default=str).encode(),
            **card.card_files(
                version,
                training,
                {"numeric": list(challenger.numeric), "categorical": list(challenger.categorical)},
                read_json(Lake(settings.lake).path(MODELS, version, registry.METRICS_FILE)),
                evaluation,
                card_curves(y, scores),
            ),
        },
    )
    return {
        "status": "promoted" if promoted else "rejected",
        "version": version,
        "candidate": chosen.name,
        "kind": chosen.kind,
        "reference": reference_name,
        "forced": force_promote,
        "reasons": decision.reasons,
        "deciding": decision.deciding,
        "choice": decision.choice,
        "candidates": {
            name: {"promote": v["promote"], "reasons": v["reasons"]} for name, v in decision.candidates.items()
        },
        "gate": {"primary_metric": config.primary_metric, "margin": config.margin},
        "metrics": {name: _rounded(m) for name, m in point.items()},
        "intervals": {
            name: {k: [_finite(round(v, 4)) for v in pair] for k, pair in values.items()}
            for name, values in evaluation["intervals"].items()
        },
        "score_psi": drift["score"],
        "from_hour": entry["from_hour"] if entry else None,
    }
