"""Platt calibration of a scorer on the validation slice, and score deciles (training cut points and
population ranks). docs/model.md (Model; Scores and deciles).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.lake import db


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(q / (1 - q))


# Calibration: a Platt fit whose slope leaves (0, PLATT_MAX_SLOPE] or a slice with fewer than
# CALIBRATION_MIN_CLASS rows of either class falls back to the intercept only (slope 1: the raw ranking and
# spread are kept, the mean moves to the base rate). Probabilities are kept inside CALIBRATION_BOUNDS.
PLATT_MAX_SLOPE = 20.0
PLATT_RIDGE = 1.0  # Gaussian prior on (slope - 1), in pseudo-observations (the intercept is free)
CALIBRATION_MIN_CLASS = 10
CALIBRATION_BOUNDS = (1e-4, 1 - 1e-4)
# A network whose output spreads less than this (std of logit over the calibration slice) has not learnt.
FLAT_LOGIT_STD = 1e-3


def fit_platt(raw: np.ndarray, y: np.ndarray, *, slope: bool = True, iterations: int = 100) -> dict[str, Any]:
    """Platt scaling ``p = sigmoid(a * logit(raw) + b)`` by damped Newton steps on Platt's smoothed targets.

    The smoothed targets ((N+ + 1)/(N+ + 2), 1/(N- + 2)) keep a small slice from
    producing overconfident extremes; a ridge prior (``PLATT_RIDGE``) pulls the slope
    towards 1, so a separable slice or a near-constant
    score (the curvature in ``a`` vanishes) cannot run the coefficients to infinity.
    ``slope=False`` fits the intercept only (``a`` = 1).
    """
    y = np.asarray(y, dtype=np.float64)
    n_pos = y.sum()
    n_neg = y.size - n_pos
    target = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    x = np.column_stack([_logit(raw), np.ones(y.size)])
    free = np.array([slope, True])
    prior = np.array([1.0, 0.0])
    ridge = np.array([PLATT_RIDGE, 1e-9])  # a free intercept: a base rate of 1% needs b near -4.6
    w = prior.copy()

    def loss(v: np.ndarray) -> float:
        z = x @ v
        return float(np.sum(np.logaddexp(0, z) - target * z) + np.sum(ridge / 2 * (v - prior) ** 2))

    current = loss(w)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(x @ w)))
        gradient = (x.T @ (p - target) + ridge * (w - prior)) * free
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + np.diag(ridge)
        hessian = np.where(np.outer(free, free), hessian, np.eye(2))
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-6 and not loss(w - scale * step) <= current:  # halve until the loss does not rise
            scale /= 2
        w = w - scale * step
        current = loss(w)
        if np.max(np.abs(scale * step)) < 1e-10:
            break
    return {"method": "platt" if slope else "platt_intercept", "a": float(w[0]), "b": float(w[1])}


def fit_calibration(raw: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The calibration of one network from its scores on the held-out (newest) time slice.

    Regularised Platt scaling, checked: a finite slope in (0, ``PLATT_MAX_SLOPE``]
    (monotone, no step function) and enough rows of both classes. Otherwise the
    intercept alone is fitted and ``fallback`` says why; ``flat`` notes a network
    whose output hardly varies (it has not learnt: any calibration of it is the base
    rate). Outputs are clipped to ``CALIBRATION_BOUNDS`` by ``apply_calibration``.
    """
    y = np.asarray(y, dtype=np.float64)
    raw = np.asarray(raw, dtype=np.float64)
    positives, rows = int(y.sum()), int(y.size)
    spread = float(np.std(_logit(raw))) if rows else 0.0
    fallback = None
    if min(positives, rows - positives) < CALIBRATION_MIN_CLASS:
        fallback = (
            f"{positives} positives and {rows - positives} negatives in the calibration slice "
            f"(fewer than {CALIBRATION_MIN_CLASS} of a class): slope kept at 1, intercept fitted"
        )
    else:
        platt = fit_platt(raw, y)
        if not (np.isfinite(platt["a"]) and np.isfinite(platt["b"]) and 0 < platt["a"] <= PLATT_MAX_SLOPE):
            fallback = f"platt slope {platt['a']:.4g} outside (0, {PLATT_MAX_SLOPE}]: slope kept at 1, intercept fitted"
    fitted = fit_platt(raw, y, slope=False) if fallback else platt
    return {
        **fitted,
        "bounds": list(CALIBRATION_BOUNDS),
        "rows": rows,
        "positives": positives,
        "logit_std": spread,
        "flat": bool(spread < FLAT_LOGIT_STD),
        "fallback": fallback,
    }


def calibration_note(calibration: Mapping[str, Any] | None) -> str | None:
    """A short sentence on what went wrong with a calibration (fallback, flat network), or None."""
    if not calibration:
        return None
    notes = []
    if calibration.get("flat"):
        notes.append(
            f"output nearly constant on the calibration slice (logit std {calibration['logit_std']:.2g}): "
            "the model did not learn"
        )
    if calibration.get("fallback"):
        notes.append(f"calibration fell back ({calibration['fallback']})")
    return "; ".join(notes) or None


def apply_calibration(raw: np.ndarray, calibration: Mapping[str, Any] | None) -> np.ndarray:
    """Calibrated probabilities (identity without a calibration), inside the calibration's bounds if it has any."""
    if calibration is None:
        return np.asarray(raw, dtype=np.float64)
    p = np.asarray(1 / (1 + np.exp(-(calibration["a"] * _logit(raw) + calibration["b"]))), dtype=np.float64)
    bounds = calibration.get("bounds")
    return np.clip(p, bounds[0], bounds[1]) if bounds else p


def decile_cut_points(scores: np.ndarray) -> list[float]:
    """The nine cut points (10th..90th percentiles) of the training scores (``deciles.json``, for reference).

    Scoring does not use them: tied scores at a cut all went up, so the top decile held a
    quarter of the users. Hourly deciles come from ``population_deciles``.
    """
    return [float(v) for v in np.quantile(np.asarray(scores, dtype=np.float64), np.linspace(0.1, 0.9, 9))]


def assign_deciles(scores: np.ndarray, cut_points: Sequence[float]) -> np.ndarray:
    """Decile 1-10 (10 = highest) of each score against stored cut points; a score on a cut goes up."""
    return (1 + np.searchsorted(np.asarray(cut_points), np.asarray(scores), side="right")).astype(np.int8)


def population_deciles(user_ids: pa.Array | pa.ChunkedArray, scores: np.ndarray) -> np.ndarray:
    """Decile 1-10 (10 = highest) of every user by rank in the scored population; 0 where the score is NaN.

    Users are ordered by score, ties by ``md5(user_id)`` (stable across processes,
    versions and row orders), and the user with t users above it (of n) gets
    ``10 - floor(10 t / n)``: every decile holds n/10 users within one user, however many
    scores are tied, and the highest score is in decile 10 even with fewer than ten users. The cut between two deciles may fall inside a group of equal
    scores; which of those users go up is decided by the hash, the same every hour.
    """

    values = np.asarray(scores, dtype=np.float64)
    scored = ~np.isnan(values)
    out = np.zeros(values.size, dtype=np.int8)
    n = int(scored.sum())
    if n == 0:
        return out
    index = np.flatnonzero(scored)
    ids = pc.cast(user_ids, pa.string()).take(pa.array(index))
    table = pa.table({"i": pa.array(index, pa.int64()), "u": ids, "s": pa.array(values[scored])})
    con = db.connect()
    try:
        con.register("population", table)
        order = con.execute("SELECT i FROM population ORDER BY s, md5(u), u").fetchnumpy()["i"]
    finally:
        con.close()
    from_top = np.arange(n - 1, -1, -1, dtype=np.int64)  # 0 for the highest score
    out[np.asarray(order, dtype=np.int64)] = (10 - (10 * from_top) // n).astype(np.int8)
    return out
