"""The model card of a version: Markdown (data, features, metrics, gate decision, drift) and its PNG
plots. docs/model.md (Model card).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import numpy as np

from profile_engine.hours import format_hour
from profile_engine.model import labels, registry
from profile_engine.model.metrics import HIGHER_IS_BETTER, auc_from_curve
from profile_engine.model.registry import CARD_FILE, SEQUENCE_KINDS

# The model card's plots (PNG, next to model_card.md).
PLOT_FILES: dict[str, str] = {
    "roc": "roc.png",
    "pr": "pr.png",
    "calibration": "calibration.png",
    "lift": "lift_by_decile.png",
    "importance": "importance.png",
}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(
    version: str,
    training: Mapping[str, Any],
    features: Mapping[str, Any],
    metrics: Mapping[str, Any],
    evaluation: Mapping[str, Any] | None = None,
) -> str:
    """The human-readable card of a version (Markdown): data windows and sizes, base rates, features,
    metrics with intervals, the gate decision, drift, and links to the plots once evaluated."""
    horizon = training["label_horizon_hours"]
    train_snapshots = training["train_snapshots"]
    first_window = label_window(train_snapshots[0], horizon)
    eval_window = label_window(training["eval_snapshot"], horizon)
    lines = [
        f"# Model card: {version}",
        "",
        f"Purchase propensity: the probability that a user purchases within {horizon} h after the end of a "
        "profile snapshot. Candidates, each with Platt calibration on the newest training snapshot: the Keras "
        "network with its own preprocessing (the main model), "
        + (
            "the ensemble (the mean of the network's and LightGBM's calibrated probabilities, calibrated again), "
            if "ensemble" in metrics.get("eval", {})
            else ""
        )
        + "gradient-boosted trees (LightGBM)"
        + (
            ", the behaviour-sequence encoder over each user's last events alone (sequence) and with the "
            "network's inputs (combined)"
            if any(kind in metrics.get("eval", {}) for kind in SEQUENCE_KINDS)
            else ""
        )
        + " and the baseline, logistic regression on the network's preprocessing; the gate promotes at most one.",
        "",
        "## Data",
        "",
        f"- training hour: {training['training_hour']}",
        f"- training snapshots: {train_snapshots[0]} .. {train_snapshots[-1]} ({len(train_snapshots)} snapshots; "
        "the newest is the validation and calibration slice)",
        f"- training label windows: {first_window[0]} .. {label_window(train_snapshots[-1], horizon)[1]}",
        f"- training rows: {training['train_rows']}, positives: {training['train_positives']} "
        f"(base rate {_rate(training['train_positives'], training['train_rows'])})",
        f"- evaluation snapshot (out of time): {training['eval_snapshot']}, label window "
        f"{eval_window[0]} .. {eval_window[1]}",
        f"- evaluation rows: {training['eval_rows']}, positives: {training['eval_positives']} "
        f"(base rate {_rate(training['eval_positives'], training['eval_rows'])})",
        f"- labels final after horizon {horizon} h + lateness {training['lateness_hours']} h",
        "",
        "## Features",
        "",
        f"- numeric ({len(features['numeric'])}): {', '.join(features['numeric'])}",
        f"- categorical ({len(features['categorical'])}): {', '.join(features['categorical']) or 'none'}",
        "",
        "## Metrics on the evaluation snapshot",
    ]
    if evaluation is None:
        lines += ["", "| model | " + " | ".join(HIGHER_IS_BETTER) + " |"]
        lines += ["|---" * (len(HIGHER_IS_BETTER) + 1) + "|"]
        for name, values in metrics["eval"].items():
            lines.append(f"| {name} | " + " | ".join(_fmt(values[k]) for k in HIGHER_IS_BETTER) + " |")
        lines += ["", "## Gate", "", "Not evaluated yet."]
        return "\n".join(lines) + "\n"
    names = list(evaluation["metrics"])
    compared = evaluation.get("compared_with", "reference")  # evaluations written before 2026-12 say "reference"
    chosen = registry.evaluated_candidate(dict(evaluation))
    lines += [
        "",
        f"Reference: {evaluation['reference']}. 95% paired bootstrap intervals in brackets; "
        f"the last column is the interval of {chosen} minus {compared}. Heuristics are ranks: "
        "only their ranking metrics are shown.",
        "",
        "| metric | " + " | ".join(names) + " | difference |",
        "|---" * (len(names) + 2) + "|",
    ]
    intervals = evaluation["intervals"]
    difference = intervals.get(f"{chosen} - {compared}", {})
    for key in HIGHER_IS_BETTER:
        cells = [
            f"{_fmt(evaluation['metrics'][n][key])} [{_fmt(intervals[n][key][0])}, {_fmt(intervals[n][key][1])}]"
            for n in names
        ]
        diff = f"[{_fmt(difference[key][0])}, {_fmt(difference[key][1])}]" if key in difference else ""
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {diff} |")
    if "model_uncalibrated" in metrics.get("eval", {}):
        raw = metrics["eval"]["model_uncalibrated"]
        lines += ["", f"Before calibration: log loss {_fmt(raw['log_loss'])}, ECE {_fmt(raw['ece'])}."]
    decision = evaluation["decision"]
    verdict = "promoted" if evaluation["promoted"] else "not promoted"
    config = decision.get("config") or {}
    lines += [
        "",
        "## Gate",
        "",
        f"- rule: floors {config.get('floors')}, primary metric {config.get('primary_metric')} "
        f"(margin {config.get('margin')}), guard margins {config.get('margins')}",
        f"- reference: {evaluation['reference']}",
        f"- decision: {verdict}{' (forced)' if evaluation['forced'] else ''}; " + "; ".join(decision["reasons"]),
    ]
    choice = decision.get("choice") or {}
    if choice:
        lines.append(
            f"- candidate: {decision.get('candidate') or 'none'} ({choice.get('reason') or choice.get('rule')}); "
            f"tie rule: {choice.get('rule')}"
        )
    for name, verdict_of in (decision.get("candidates") or {}).items():
        lines.append(
            f"  - {name}: {'passes' if verdict_of['promote'] else 'fails'}; " + "; ".join(verdict_of["reasons"])
        )
    deciding = decision.get("deciding") or {}
    if deciding:
        interval = deciding.get("interval")
        lines.append(
            f"- deciding check: {deciding['check']} on {deciding['metric']} ({_fmt(deciding['value'])}"
            + (f", 95% interval [{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else "")
            + ")"
        )
    if evaluation.get("from_hour"):
        lines.append(f"- champion from hour {evaluation['from_hour']}")
    drift = evaluation.get("drift") or {}
    if drift.get("score") is not None:
        worst = drift.get("max_feature")
        lines.append(
            f"- drift against the previous snapshot ({drift['previous_hour']}): score PSI {_fmt(drift['score'])}"
            + (f", largest feature PSI {worst} {_fmt(drift['features'][worst])}" if worst else "")
        )
    lines += [
        "",
        "## Plots",
        "",
        "![ROC curve](roc.png) ![Precision-recall curve](pr.png)",
        "",
        "![Calibration curve](calibration.png) ![Lift by decile](lift_by_decile.png)",
        "",
        "![Permutation feature importance](importance.png)",
    ]
    importance = (evaluation.get("importance") or {}).get("features") or {}
    if importance:
        lines += ["", "Permutation importance (mean AUC drop when the feature is shuffled), top 10:", ""]
        lines += [f"- {name}: {_fmt(value)}" for name, value in list(importance.items())[:10]]
    return "\n".join(lines) + "\n"


def _rate(positives: int, rows: int) -> str:
    return f"{positives / rows:.4f}" if rows else "n/a"


def label_window(snapshot: str, horizon_hours: int) -> tuple[str, str]:
    """The label window of a snapshot given as an ISO hour, as ISO hours."""
    start, end = labels.label_window(datetime.fromisoformat(snapshot), horizon_hours)
    return format_hour(start), format_hour(end)


def card_plots(curves: Mapping[str, Any], importance: Mapping[str, float]) -> dict[str, bytes]:
    """The card's PNGs (``PLOT_FILES``) from ``metrics.card_curves`` output and permutation importance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(figure: Any) -> bytes:
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=90)
        plt.close(figure)
        return buffer.getvalue()

    models = curves["models"]
    base = curves["base_rate"]
    out: dict[str, bytes] = {}
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, c in models.items():
        auc = auc_from_curve(c["roc"]["fpr"], c["roc"]["tpr"])
        ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="random")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve")
    ax.legend(loc="lower right")
    out[PLOT_FILES["roc"]] = png(fig)

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name, c in models.items():
        ax.step(c["pr"]["recall"], c["pr"]["precision"], where="post", label=name)
    ax.axhline(base, color="grey", linestyle=":", label=f"base rate {base:.3f}")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall curve", ylim=(0, 1.02))
    ax.legend(loc="upper right")
    out[PLOT_FILES["pr"]] = png(fig)

    fig, ax = plt.subplots(figsize=(5, 4.5))
    top = 0.0
    for name, c in models.items():
        cal = c["calibration"]
        ax.plot(cal["predicted"], cal["observed"], marker="o", label=name)
        top = max(top, *cal["predicted"], *cal["observed"])
    ax.plot([0, top], [0, top], color="grey", linestyle=":", label="perfect calibration")
    ax.set(xlabel="mean predicted probability", ylabel="observed purchase rate", title="Calibration (10 bins)")
    ax.legend(loc="upper left")
    out[PLOT_FILES["calibration"]] = png(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    width = 0.8 / max(len(models), 1)
    for i, (name, c) in enumerate(models.items()):
        ax.bar(np.arange(1, 11) + (i - (len(models) - 1) / 2) * width, c["lift_by_decile"], width, label=name)
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set(xlabel="score decile (10 = highest)", ylabel="lift (rate / base rate)", title="Lift by decile")
    ax.set_xticks(range(1, 11))
    ax.legend(loc="upper left")
    out[PLOT_FILES["lift"]] = png(fig)

    shown = list(importance.items())[:20][::-1]
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.3 * len(shown) + 1)))
    ax.barh([n for n, _ in shown], [v for _, v in shown])
    ax.set(xlabel="mean AUC drop when shuffled", title="Permutation feature importance (top 20)")
    out[PLOT_FILES["importance"]] = png(fig)
    return out


def card_files(
    version: str,
    training: Mapping[str, Any],
    features: Mapping[str, Any],
    metrics: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    curves: Mapping[str, Any],
) -> dict[str, bytes]:
    """The evaluated card (``CARD_FILE``) and its plots, ready for ``update_model_dir``."""
    files = {CARD_FILE: model_card(version, training, features, metrics, evaluation).encode()}
    files.update(card_plots(curves, (evaluation.get("importance") or {}).get("features") or {}))
    return files
