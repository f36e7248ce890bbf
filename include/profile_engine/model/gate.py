"""The promotion gate: floors, margins against the champion and baselines, and the choice among a
version's candidates. docs/model.md (Evaluation and the gate).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from profile_engine.config import ENV_PREFIX
from profile_engine.model.metrics import HIGHER_IS_BETTER, RANKING_METRICS

GATE_ENV = {
    "min_auc": ENV_PREFIX + "GATE_MIN_AUC",
    "max_ece": ENV_PREFIX + "GATE_MAX_ECE",
    "primary_metric": ENV_PREFIX + "GATE_PRIMARY_METRIC",
    "margin": ENV_PREFIX + "GATE_MARGIN",
    "auc_margin": ENV_PREFIX + "GATE_AUC_MARGIN",
}


@dataclass(frozen=True)
class GateConfig:
    """The promotion rule: absolute floors, the primary metric with its margin, and guard margins.

    ``floors`` maps a metric to its bound (a floor for higher-is-better metrics, a
    ceiling for lower-is-better ones such as ECE). The challenger may be worse than
    the reference by at most ``margin`` on ``primary_metric`` and by at most
    ``margins[m]`` on each guard metric ``m``; margins are in the metric's own units.
    """

    floors: Mapping[str, float] = field(default_factory=lambda: {"auc": 0.6, "ece": 0.05})
    # A ceiling's interval must also end at or below the ceiling times this: an interval that wide says the
    # evaluation rows cannot tell a calibrated model from a badly miscalibrated one.
    ceiling_evidence: float = 2.0
    primary_metric: str = "lift_at_10"
    margin: float = 0.1
    margins: Mapping[str, float] = field(default_factory=lambda: {"auc": 0.01})

    def __post_init__(self) -> None:
        unknown = sorted({self.primary_metric, *self.floors, *self.margins} - set(HIGHER_IS_BETTER))
        if unknown:
            raise ValueError(f"gate: unknown metric(s) {unknown}; known: {sorted(HIGHER_IS_BETTER)}")
        if self.margin < 0 or any(v < 0 for v in self.margins.values()):
            raise ValueError("gate: margins must be >= 0")
        if self.ceiling_evidence < 1:
            raise ValueError("gate: ceiling_evidence must be >= 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GateConfig:
        """The default rule with ``PROFILE_ENGINE_GATE_*`` overrides (MIN_AUC, MAX_ECE, PRIMARY_METRIC,
        MARGIN, AUC_MARGIN); a bad value raises ``ValueError`` naming the variable."""
        env = os.environ if environ is None else environ
        base = cls()
        values = {key: env.get(name) or None for key, name in GATE_ENV.items()}
        try:
            floors = {
                "auc": float(values["min_auc"] or base.floors["auc"]),
                "ece": float(values["max_ece"] or base.floors["ece"]),
            }
            margin = float(values["margin"] or base.margin)
            auc_margin = float(values["auc_margin"] or base.margins["auc"])
        except ValueError as error:
            raise ValueError(f"{', '.join(n for k, n in GATE_ENV.items() if values[k])}: {error}") from error
        try:
            return cls(
                floors=floors,
                primary_metric=values["primary_metric"] or base.primary_metric,
                margin=margin,
                margins={"auc": auc_margin},
            )
        except ValueError as error:
            raise ValueError(f"{ENV_PREFIX}GATE_*: {error}") from error

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (recorded with every decision)."""
        return {
            "floors": dict(self.floors),
            "primary_metric": self.primary_metric,
            "margin": self.margin,
            "margins": dict(self.margins),
            "ceiling_evidence": self.ceiling_evidence,
        }


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict with every check it made; ``deciding`` is the check that decided it.

    From ``choose``: ``candidate`` is the promoted candidate (None when none passed),
    ``candidates`` every candidate's own verdict and ``choice`` how the winner was picked.
    """

    promote: bool
    reasons: list[str]
    checks: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    deciding: dict[str, Any] = field(default_factory=dict)
    candidate: str | None = None
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)
    choice: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        out = {
            "promote": self.promote,
            "reasons": self.reasons,
            "checks": self.checks,
            "config": self.config,
            "deciding": self.deciding,
        }
        if self.candidates:
            out.update({"candidate": self.candidate, "candidates": self.candidates, "choice": self.choice})
        return out


# Names of heuristic scorers among the gate's baselines and in evaluation.json.
HEURISTIC_PREFIX = "heuristic_"


def _passes(value: float, bound: float, higher_is_better: bool) -> bool:
    """``value`` on the good side of ``bound``; NaN never passes."""
    return bool(value >= bound) if higher_is_better else bool(value <= bound)


def _interval(
    intervals: Mapping[str, Mapping[str, Sequence[float]]] | None, name: str, metric: str
) -> list[float] | None:
    pair = (intervals or {}).get(name, {}).get(metric)
    return None if pair is None else [float(pair[0]), float(pair[1])]


def gate(
    challenger: Mapping[str, float],
    reference: Mapping[str, float] | None,
    config: GateConfig | None = None,
    *,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    reference_name: str = "reference",
    challenger_name: str = "challenger",
) -> GateDecision:
    """Promote when every floor is cleared, the challenger is not worse than any baseline on the primary
    metric, and no margin is exceeded against ``reference`` (the champion).

    - Floors (higher-is-better) are tested on the point estimate; ceilings (ECE) on
      the challenger's interval when ``intervals`` has one: rejected only when the whole
      interval is above the ceiling (a point estimate of 0.055 against 0.05 is noise).
    - ``baselines`` (the challenger's own baseline; before the first promotion also the
      heuristics, named ``heuristic_*``): the challenger must not be below any of them on
      the primary metric, with no margin. Heuristics are ranks, so they are only
      compared on ranking metrics.
    - ``reference``: worse by at most ``margin`` on the primary metric and by at most
      ``margins[m]`` on each guard metric.

    ``intervals`` is ``bootstrap_intervals`` output with the challenger under
    ``challenger_name`` and paired differences under ``"<challenger_name> - <name>"``;
    reasons quote them. Every reason names its metric; a NaN metric fails its check.
    """
    config = config or GateConfig()
    checks: list[dict[str, Any]] = []
    for name, bound in config.floors.items():
        higher = HIGHER_IS_BETTER[name]
        value = float(challenger[name])
        interval = _interval(intervals, challenger_name, name)
        # A ceiling fails when the interval lies entirely above it, or reaches past ``ceiling_evidence`` times it
        # (too few rows to tell); without an interval it is tested on the point estimate.
        tested = interval[0] if (interval is not None and not higher) else value
        check: dict[str, Any] = {
            "check": "floor" if higher else "ceiling",
            "metric": name,
            "value": value,
            "threshold": bound,
            "interval": interval,
            "passed": _passes(tested, bound, higher),
        }
        if not higher and interval is not None and check["passed"]:
            evidence = bound * config.ceiling_evidence
            check["evidence"] = evidence
            check["passed"] = _passes(interval[1], evidence, higher)
        checks.append(check)
    primary = config.primary_metric
    primary_higher = HIGHER_IS_BETTER[primary]
    for name, values in (baselines or {}).items():
        if name.startswith(HEURISTIC_PREFIX) and primary not in RANKING_METRICS:
            continue
        value, ref = float(challenger[primary]), float(values[primary])
        checks.append(
            {
                "check": f"not worse than {name}",
                "metric": primary,
                "against": name,
                "value": value,
                "reference": ref,
                "interval": _interval(intervals, f"{challenger_name} - {name}", primary),
                "passed": _passes(value, ref, primary_higher),
            }
        )
    if reference is not None:
        compared = {primary: config.margin, **{k: v for k, v in config.margins.items()}}
        for name, margin in compared.items():
            higher = HIGHER_IS_BETTER[name]
            value, ref = float(challenger[name]), float(reference[name])
            shortfall = (ref - value) if higher else (value - ref)
            checks.append(
                {
                    "check": "primary margin" if name == primary else "margin",
                    "metric": name,
                    "against": reference_name,
                    "value": value,
                    "reference": ref,
                    "threshold": margin,
                    "interval": _interval(intervals, f"{challenger_name} - {reference_name}", name),
                    "passed": bool(shortfall <= margin),
                }
            )
    failed = [c for c in checks if not c["passed"]]
    reasons = [_reason(c) for c in failed]
    deciding = failed[0] if failed else _deciding_pass(checks, primary)
    return GateDecision(
        promote=not failed,
        reasons=reasons or ["all checks passed"],
        checks=checks,
        config=config.as_dict(),
        deciding=dict(deciding) if deciding else {},
    )


def _shortfall(value: float, best: float, metric: str) -> float:
    """How much worse ``value`` is than ``best`` on ``metric`` (0 or negative when not worse)."""
    return (best - value) if HIGHER_IS_BETTER[metric] else (value - best)


def choose(
    candidates: Mapping[str, Mapping[str, float]],
    champion: Mapping[str, float] | None,
    config: GateConfig | None = None,
    *,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    champion_name: str = "champion",
) -> GateDecision:
    """The gate over a version's candidates (``candidates`` in preference order, ``registry.MODEL_KINDS``).

    Each candidate goes through ``gate`` on its own: floors, the ECE ceiling on its
    interval, never worse than any baseline on the primary metric (a candidate is not
    compared with itself), within the margins of the champion. Among those that pass,
    the best on the primary metric is found, and the winner is the first passing
    candidate in preference order whose primary metric is worse than the best by at
    most ``config.margin`` (the tie rule: the preferred candidate is kept unless another
    beats it by more than the margin, as a challenger replaces a champion). ``choice``
    records the winner, the best, the primary metric's values and the paired interval
    of best minus winner. With no candidate passing, nothing is promoted: the reasons
    list every candidate's, prefixed by its name, and ``deciding`` is the first
    candidate's deciding check. ``intervals`` must hold ``"<candidate> - <other>"``
    differences (``bootstrap_intervals``).
    """
    config = config or GateConfig()
    primary = config.primary_metric
    verdicts = {
        name: gate(
            metrics,
            champion,
            config,
            baselines={b: m for b, m in (baselines or {}).items() if b != name},
            intervals=intervals,
            reference_name=champion_name,
            challenger_name=name,
        )
        for name, metrics in candidates.items()
    }
    summary = {
        name: {
            "promote": v.promote,
            "reasons": v.reasons,
            "deciding": {**v.deciding, "candidate": name},
            primary: float(candidates[name][primary]),
        }
        for name, v in verdicts.items()
    }
    order = list(candidates)
    passed = [n for n in order if verdicts[n].promote]
    if not passed:
        first = order[0]
        return GateDecision(
            promote=False,
            reasons=[f"{n}: {r}" for n in order for r in verdicts[n].reasons],
            checks=[{**c, "candidate": n} for n in order for c in verdicts[n].checks],
            config=config.as_dict(),
            deciding={**verdicts[first].deciding, "candidate": first},
            candidate=None,
            candidates=summary,
            choice={"winner": None, "rule": "no candidate passed the gate"},
        )
    values = {n: float(candidates[n][primary]) for n in passed}
    sign = 1.0 if HIGHER_IS_BETTER[primary] else -1.0
    signed = {n: (sign * v if not math.isnan(v) else -math.inf) for n, v in values.items()}
    best = next(n for n in passed if signed[n] == max(signed.values()))  # ties: the preferred one
    winner = next(n for n in passed if not _shortfall(values[n], values[best], primary) > config.margin)
    interval = _interval(intervals, f"{best} - {winner}", primary) if best != winner else None
    if best != winner:
        why = (
            f"{winner} kept: {primary} {values[winner]:.4f} within margin {config.margin} of {best} "
            f"{values[best]:.4f} (difference {values[best] - values[winner]:.4f}"
            + (f", 95% paired interval {_fmt_interval(interval)}" if interval else "")
            + ")"
        )
    else:
        why = f"{winner} is the best passing candidate on {primary} ({values[winner]:.4f})"
        passed_over = [n for n in order[: order.index(winner)] if n in passed]
        for n in passed_over:  # preferred candidates that passed but lost by more than the margin
            beaten = _interval(intervals, f"{winner} - {n}", primary)
            interval = interval or beaten
            why += (
                f"; better than {n} {values[n]:.4f} by {values[winner] - values[n]:.4f}, beyond margin "
                f"{config.margin}" + (f" (95% paired interval {_fmt_interval(beaten)})" if beaten else "")
            )
    others = [n for n in passed if n not in (winner, best)]
    choice = {
        "winner": winner,
        "best": best,
        "metric": primary,
        "values": values,
        "interval": interval,
        "margin": config.margin,
        "passed": passed,
        "rule": "first passing candidate in preference order within the margin of the best on the primary metric",
        "reason": why + (f"; also passed: {', '.join(others)}" if others else ""),
    }
    chosen = verdicts[winner]
    return GateDecision(
        promote=True,
        reasons=chosen.reasons,
        checks=[{**c, "candidate": n} for n in order for c in verdicts[n].checks],
        config=config.as_dict(),
        deciding={**chosen.deciding, "candidate": winner},
        candidate=winner,
        candidates=summary,
        choice=choice,
    )


def _deciding_pass(checks: Sequence[Mapping[str, Any]], primary: str) -> Mapping[str, Any] | None:
    """For a promotion: the primary metric's comparison with the champion, else with a baseline, else a floor."""
    for kind in ("primary margin", "not worse than"):
        for check in checks:
            if check["check"].startswith(kind) and check["metric"] == primary:
                return check
    return checks[0] if checks else None


def _fmt_interval(interval: Sequence[float] | None) -> str:
    return "" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def _reason(check: Mapping[str, Any]) -> str:
    metric, value = check["metric"], check["value"]
    interval = check.get("interval")
    if check["check"] == "floor":
        tail = f" (95% interval {_fmt_interval(interval)})" if interval else ""
        return f"{metric} {value:.4f} fails floor {check['threshold']}{tail}"
    if check["check"] == "ceiling":
        if interval and interval[0] <= check["threshold"] and "evidence" in check:
            factor = check["evidence"] / check["threshold"]
            return (
                f"{metric} {value:.4f} not established under ceiling {check['threshold']} (95% interval "
                f"{_fmt_interval(interval)} reaches above {check['evidence']:g}, {factor:g}x the ceiling: too few "
                "evaluation rows to tell)"
            )
        tail = f" (95% interval {_fmt_interval(interval)} entirely above)" if interval else ""
        return f"{metric} {value:.4f} exceeds ceiling {check['threshold']}{tail}"
    difference = value - check["reference"]
    paired = f", 95% paired interval {_fmt_interval(interval)}" if interval else ""
    if check["check"].startswith("not worse than"):
        return (
            f"{metric} {value:.4f} worse than {check['against']} {check['reference']:.4f} "
            f"(difference {difference:.4f}{paired})"
        )
    tail = f" (difference {difference:.4f}{paired})" if interval else ""
    return (
        f"{metric} {value:.4f} worse than {check['against']} {check['reference']:.4f} "
        f"beyond margin {check['threshold']}{tail}"
    )
