"""One change to the Keras network against the unchanged one, on the evaluation rows of versions a
``model_real.py`` run already trained (issue "the model and the segments on real data", item 3).

For each ``--version`` of the lake: reads the version's training set, refits the network alone with
the package's own functions (``build_network``, ``fit_network``, ``fit_calibration``; same seed, same
validation slice) once as the package does and once with the variant, and compares both with the
version's stored LightGBM on its evaluation rows (paired bootstrap intervals, as ``model_real.py``).

Variants (``--variant``, default ``no-class-weight``):

- ``no-class-weight``: the network fitted on the natural class balance (as the baseline is), instead of
  balanced class weights;
- ``time-decay``: the class-weighted network with each fit row also weighted by the recency of its
  snapshot, ``0.5 ** (age / half-life)`` (age in hours before the newest fit snapshot, ``--half-life-days``,
  default 7), so recent behaviour weighs more.

- architecture variants (``ARCHITECTURES``), each also rebuilt into an ensemble as ``training.fit_models``
  builds one (the calibrated variant and the version's stored calibrated LightGBM blended 0.5/0.5, then
  calibrated on the validation slice): ``package`` (the package's network as it is, ``ModelConfig()``: after
  the versions were trained by an older package, how today's network compares with the stored one), ``wide`` (one
  layer of 64, dropout 0.1), ``deep`` (64 -> 32, dropout 0.1), ``fast`` (learning rate 1e-2, patience 6, up to
  50 epochs; these three on the "log" numeric encoding, log1p and standardisation of every numeric input, the
  package's network until issue 20), ``quantile`` (piecewise-linear encoding of
  each numeric input on ``--bins`` quantile bins learned on the fit rows, in place of log1p and
  standardisation; one layer of 32), ``quantile-std`` (those pieces standardised and clipped as the package's
  inputs), ``quantile-log`` (the pieces next to the package's log1p inputs), ``quantile-deep`` (the pieces,
  64 -> 32, dropout 0.1), ``quantile-counts`` (the pieces for the count-like inputs only, ``inputs.count_columns``: the
  other numeric inputs through the package's log1p and standardisation; one layer of 32), ``quantile-continuous``
  (the reverse: the pieces for the other inputs, the counts through the package's path), ``quantile-open``
  (``quantile`` with each input's top piece linear above its top quantile and its bottom piece below its lowest,
  clipped at the package's +-6, so inputs beyond the fit rows' range keep their order);
- ``quantile-select``: per version both the package's network and ``quantile``, the one with the higher AUC on the
  validation slice kept (the plain one on a tie), and its ensemble rebuilt as above;
- ``blend-weight``: the stored network unchanged, the ensemble's network weight chosen (grid 0, 0.1 .. 1) by
  the AUC of the blend on the validation slice instead of fixed at 0.5.

Platt scaling on the validation slice is unchanged. The version's stored ensemble is reported too.

Usage (from the repository root, after ``model_real.py --lake LAKE`` trained the versions)::

    PYTHONPATH=include .venv/bin/python benchmarks/network_variant.py --lake /tmp/uci-168 \\
        --horizon-hours 168 --business-tz Europe/London --out /tmp/uci-168/variant.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from model_real import (  # the same metrics (benchmarks/ is on the path)
    _with_intervals,
    emit_json,
    trained_lake_settings,
)

from profile_engine.contracts.profiles import CATEGORICAL_FEATURES, NUMERIC_FEATURES, SNAPSHOT_HOUR
from profile_engine.model import calibration as calibrate
from profile_engine.model import candidates, ensemble, labels, metrics, registry, training
from profile_engine.model import inputs as network_inputs
from profile_engine.model import network as networks
from profile_engine.model.gate import GateConfig

# Architecture variants: ModelConfig overrides, and the numeric inputs' encoding (None: ``networks.build_network``
# under the config, "package" its defaults; wide, deep and fast its "log" encoding, log1p and standardisation; "pieces": piecewise-linear on quantile bins; "pieces-std": those pieces standardised and clipped;
# "pieces+log": the pieces and the package's inputs side by side; "pieces-open": the pieces with open end pieces;
# "pieces-counts" / "pieces-continuous": the pieces of the count-like / the other inputs, the rest the package's).
ARCHITECTURES: dict[str, tuple[dict[str, Any], str | None]] = {
    "package": ({}, None),
    "wide": ({"hidden_units": (64,), "dropout": 0.1, "numeric_encoding": "log"}, None),
    "deep": ({"hidden_units": (64, 32), "dropout": 0.1, "numeric_encoding": "log"}, None),
    "fast": ({"learning_rate": 1e-2, "patience": 6, "max_epochs": 50, "numeric_encoding": "log"}, None),
    "quantile": ({}, "pieces"),
    "quantile-std": ({}, "pieces-std"),
    "quantile-log": ({}, "pieces+log"),
    "quantile-deep": ({"hidden_units": (64, 32), "dropout": 0.1}, "pieces"),
    "quantile-counts": ({}, "pieces-counts"),
    "quantile-open": ({}, "pieces-open"),
    "quantile-continuous": ({}, "pieces-continuous"),
}
# quantile-select: per version the package's network or this architecture, by the AUC on the validation slice
SELECTED = "quantile"
# the variants that rebuild the ensemble (``variant_scores``)
ENSEMBLE_VARIANTS = (*ARCHITECTURES, "blend-weight", "quantile-select")
VARIANTS = ("no-class-weight", "time-decay", "seeds", *ENSEMBLE_VARIANTS)
# blend-weight: the network weights tried
BLEND_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def build_quantile_network(
    fit_rows: pa.Table, numeric: list[str], categorical: list[str], config: Any, bins: int, *, encoding: str
) -> Any:
    """``networks.build_network`` (not logistic) with the numeric inputs encoded as ``encoding`` says.

    ``pieces-continuous`` is the package's own network with its "quantile" numeric encoding (the non-count
    inputs piecewise-linear on ``bins`` quantile bins, ``QuantilePieces``, the ``count_columns`` through the
    log1p path). The others use the same layer on other columns: ``pieces``: every numeric input encoded
    piecewise-linearly (one input per bin: 0 below it, 1 above it, the position inside it; NaN -> 0 plus an
    is-missing indicator per column) instead of log1p and standardisation; ``pieces-std``: the pieces then
    standardised on the fit rows and clipped as the package's inputs; ``pieces+log``: the pieces next to the
    package's own numeric inputs (log1p, standardised, clipped); ``pieces-counts``: the pieces of the
    ``count_columns`` only, next to the package's inputs of the other columns; ``pieces-open``: ``pieces`` with
    open end pieces (a column's top piece linear above its top edge, its bottom piece below its lowest edge, in
    units of that bin's width, clipped at +-``NORMALISED_CLIP`` as the package's standardised inputs; a missing
    value's 0 fill encoded as in ``pieces``), so values beyond the fit rows' range keep their order."""
    import keras

    if encoding == "pieces-continuous":
        quantile = dataclasses.replace(config, numeric_encoding="quantile", quantile_bins=bins)
        return networks.build_network(fit_rows, numeric, categorical, quantile, logistic=False)
    layers = networks.custom_layers()
    counts = network_inputs.count_columns(numeric)
    pieced = counts if encoding == "pieces-counts" else list(numeric)
    # the columns also (pieces+log) or instead (pieces-counts) given the package's numeric path
    rest = list(numeric) if encoding == "pieces+log" else [c for c in numeric if c not in pieced]
    position = {c: i for i, c in enumerate(numeric)}
    numeric_in = keras.Input(shape=(len(numeric),), dtype="float32", name=network_inputs.NUMERIC_INPUT)
    pieces = layers["QuantilePieces"](
        [position[c] for c in pieced], network_inputs.quantile_edges(fit_rows, pieced, bins)
    )
    encoded = pieces(numeric_in)
    if encoding == "pieces-open":
        encoded = keras.layers.Lambda(open_ends(pieces), output_shape=(encoded.shape[-1],))([numeric_in, encoded])
    if encoding == "pieces-std":  # on (up to 20,000 of) the fit rows
        sample = np.asarray(
            pieces(network_inputs.numeric_matrix(fit_rows, numeric)[:: max(1, fit_rows.num_rows // 20_000)])
        )
        norm = keras.layers.Normalization(
            mean=sample.mean(axis=0), variance=network_inputs.normalisation_variance(sample)
        )
        encoded = layers["Clip"](network_inputs.NORMALISED_CLIP)(norm(encoded))
    parts = [encoded]
    if rest:  # the package's numeric path (networks.build_network) of those columns
        picked = (
            numeric_in if rest == list(numeric) else layers["SelectColumns"]([position[c] for c in rest])(numeric_in)
        )
        parts.append(networks.standardised_inputs(fit_rows, rest, picked))
    inputs = [numeric_in]
    for column in categorical:
        cat_in = keras.Input(shape=(1,), dtype="string", name=network_inputs.CATEGORICAL_PREFIX + column)
        vocab = network_inputs.vocabulary(network_inputs.categorical_values(fit_rows, column), config.max_vocabulary)
        index = keras.layers.StringLookup(vocabulary=vocab)(cat_in)
        parts.append(keras.layers.Flatten()(keras.layers.Embedding(len(vocab) + 1, config.embedding_dim)(index)))
        inputs.append(cat_in)
    x = keras.layers.Concatenate()(parts) if len(parts) > 1 else parts[0]
    for units in config.hidden_units:
        x = keras.layers.Dense(units, activation="relu")(x)
        x = keras.layers.Dropout(config.dropout)(x)
    output = keras.layers.Dense(1, activation="sigmoid", name="propensity")(x)
    return keras.Model(inputs, output, name="propensity_quantile")


def open_ends(pieces: Any) -> Any:
    """pieces-open: a function of (numeric input, ``pieces``' output) giving that output with each column's bottom
    piece open below its lowest edge and its top piece above its top edge (clipped at +-``NORMALISED_CLIP``), for
    present values (a missing value's 0 fill stays as ``pieces`` encodes it)."""
    import keras

    ops = keras.ops
    ends = np.flatnonzero(np.diff(pieces.piece_columns, append=-1))  # the last piece of each column
    starts = np.r_[0, ends[:-1] + 1] if ends.size else ends
    low, high = np.zeros_like(pieces.left), np.ones_like(pieces.left)
    low[starts], high[ends] = -network_inputs.NORMALISED_CLIP, network_inputs.NORMALISED_CLIP
    n_pieces = int(pieces.piece_columns.size)

    def opened(both: list[Any]) -> Any:
        x, encoded = both
        missing = ops.take(ops.isnan(x), pieces.piece_columns, axis=1)
        filled = ops.where(ops.isnan(x), ops.zeros_like(x), x)
        position_in = (ops.take(filled, pieces.piece_columns, axis=1) - pieces.left) / pieces.width
        bounded = ops.minimum(ops.maximum(position_in, low), high)
        closed, indicators = encoded[:, :n_pieces], encoded[:, n_pieces:]
        return ops.concatenate([ops.where(missing, closed, bounded), indicators], axis=-1)

    return opened


def recency_weights(snapshot_hours: pa.ChunkedArray | pa.Array, half_life_hours: float) -> np.ndarray:
    """``0.5 ** (age / half_life_hours)`` per row, age in hours before the newest of ``snapshot_hours``."""
    hours = np.asarray(
        pc.cast(pc.cast(snapshot_hours, pa.timestamp("s", tz="UTC")), pa.int64()).to_numpy(zero_copy_only=False),
        dtype=np.float64,
    )
    age = (hours.max() - hours) / 3600.0
    return np.asarray(0.5 ** (age / half_life_hours), dtype=np.float32)


def fit_network_only(
    train: pa.Table,
    numeric: list[str],
    categorical: list[str],
    *,
    class_weighted: bool,
    seed: int = 7,
    half_life_hours: float | None = None,
    architecture: str | None = None,
    bins: int = 16,
) -> tuple[Any, dict[str, Any]]:
    """The aggregate network and its calibration as ``training.fit_models`` fits them (``class_weighted``: its
    balanced class weights; else the natural class balance; ``half_life_hours``: fit rows also weighted by
    the recency of their snapshot; ``architecture``: one of ``ARCHITECTURES`` instead of the package's network)."""
    import keras
    import tensorflow as tf

    overrides, encoding = ARCHITECTURES[architecture] if architecture else ({}, None)
    config = dataclasses.replace(networks.ModelConfig(), **overrides)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    is_validation = networks.validation_split(train)
    y = np.asarray(train.column(labels.LABEL), dtype=np.float32)
    inputs = network_inputs.model_inputs(train, numeric, categorical)
    fit_in, val_in = training.take_inputs(inputs, ~is_validation), training.take_inputs(inputs, is_validation)
    fit_y, val_y = y[~is_validation], y[is_validation]
    fit_rows = train.filter(pa.array(~is_validation))
    if encoding is not None:
        network = build_quantile_network(fit_rows, numeric, categorical, config, bins, encoding=encoding)
    else:
        network = networks.build_network(fit_rows, numeric, categorical, config, logistic=False)
    weights = networks.class_weights(fit_y) if class_weighted else None
    recency = None
    if half_life_hours is not None:
        recency = recency_weights(fit_rows.column(SNAPSHOT_HOUR), half_life_hours)
    epochs = networks.fit_network(
        network, (fit_in, fit_y), (val_in, val_y), weights, config.learning_rate, config, sample_weight=recency
    )
    calibration = calibrate.fit_calibration(networks.predict_network(network, val_in), val_y)
    return network, {"epochs": epochs, "calibration": calibration, "raw_val": networks.predict_network(network, val_in)}


def differences(variant: str) -> tuple[tuple[str, str], ...]:
    """The paired differences reported: the variant against the unchanged network and against LightGBM."""
    name = f"network {variant}"
    if variant in ENSEMBLE_VARIANTS:
        mine = f"ensemble {variant}"
        pairs = [
            (name, "lightgbm (stored)"),
            (mine, "lightgbm (stored)"),
            (name, "network (stored)"),
            (mine, "ensemble (stored)"),
            ("network (stored)", "lightgbm (stored)"),
            ("ensemble (stored)", "lightgbm (stored)"),
        ]
        return tuple(pairs[1:2] + pairs[3:] if variant == "blend-weight" else pairs)
    if variant == "seeds":
        return (
            (name, "network (stored)"),
            (name, "lightgbm (stored)"),
            ("ensemble seeds", "lightgbm (stored)"),
            ("ensemble seeds", "ensemble (stored)"),
            ("ensemble seeds", name),
            ("champion-style seeds", "lightgbm (stored)"),
            ("champion-style seeds", "champion-style (stored)"),
            ("champion-style (stored)", "lightgbm (stored)"),
            ("network (stored)", "lightgbm (stored)"),
            ("ensemble (stored)", "lightgbm (stored)"),
        )
    return (
        (name, "network (stored)"),
        (name, "network (refit)"),
        (name, "lightgbm (stored)"),
        ("network (stored)", "lightgbm (stored)"),
        ("ensemble (stored)", "lightgbm (stored)"),
        ("ensemble (stored)", "network (stored)"),
    )


def fit_seeds(
    train: pa.Table,
    rows: pa.Table,
    numeric: list[str],
    categorical: list[str],
    seeds: list[int],
) -> tuple[list[np.ndarray], list[np.ndarray], list[dict[str, Any]]]:
    """The raw (uncalibrated) outputs on the validation slice of ``train`` and on ``rows`` of one class-weighted
    network per seed (``fit_network_only``), and each fit's epochs and seconds."""
    is_validation = networks.validation_split(train)
    val_in = network_inputs.model_inputs(train.filter(pa.array(is_validation)), numeric, categorical)
    eval_in = network_inputs.model_inputs(rows, numeric, categorical)
    raw_val, raw_eval, info = [], [], []
    for seed in seeds:
        started = time.perf_counter()
        network, fitted = fit_network_only(train, numeric, categorical, class_weighted=True, seed=seed)
        raw_val.append(networks.predict_network(network, val_in))
        raw_eval.append(networks.predict_network(network, eval_in))
        info.append({"seed": seed, "epochs": fitted["epochs"], "seconds": round(time.perf_counter() - started, 1)})
    return raw_val, raw_eval, info


def averaged_members(
    raw_val: list[np.ndarray], raw_eval: list[np.ndarray], val_y: np.ndarray, trees_val: np.ndarray, trees: np.ndarray
) -> dict[str, Any]:
    """The averaged network (mean raw output, one Platt fit on the validation slice) and the ensemble rebuilt
    with it as ``training.fit_models`` builds one (blend with the calibrated trees, calibrated on the slice);
    calibrated probabilities on the evaluation rows and both calibrations."""
    network_cal = calibrate.fit_calibration(np.mean(raw_val, axis=0), val_y)
    network_val = calibrate.apply_calibration(np.mean(raw_val, axis=0), network_cal)
    network_eval = calibrate.apply_calibration(np.mean(raw_eval, axis=0), network_cal)
    members_val = {"model": network_val, "lightgbm": trees_val}
    members_eval = {"model": network_eval, "lightgbm": trees}
    blend_val = ensemble.blend([members_val[k] for k in ensemble.MEMBERS], ensemble.WEIGHTS)
    ensemble_cal = calibrate.fit_calibration(blend_val, val_y)
    blend_eval = ensemble.blend([members_eval[k] for k in ensemble.MEMBERS], ensemble.WEIGHTS)
    return {
        "network": network_eval,
        "ensemble": calibrate.apply_calibration(blend_eval, ensemble_cal),
        "calibration": {"network": network_cal, "ensemble": ensemble_cal},
    }


def champion_style(y: np.ndarray, scores: dict[str, np.ndarray], margin: float) -> str:
    """The gate's tie rule alone (no floor, ceiling or champion check): of ``scores`` (named by their
    ``registry.MODEL_KINDS`` kind), the first in that order whose lift@10 is within ``margin`` of the best."""
    lift = {kind: metrics.metrics(y, p)["lift_at_10"] for kind, p in scores.items()}
    best = max(lift.values())
    return next(kind for kind in registry.MODEL_KINDS if kind in lift and lift[kind] >= best - margin)


def _stored(
    settings: Any, version: str, train: pa.Table, rows: pa.Table
) -> tuple[dict[str, Any], pa.Table, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The version's stored candidates, its validation slice (rows, labels), LightGBM's scores there and on
    ``rows``, and the stored network's, LightGBM's and ensemble's scores on ``rows``."""
    stored = {c.name: c for c in candidates.version_candidates(settings, version)}
    is_validation = networks.validation_split(train)
    val_rows = train.filter(pa.array(is_validation))
    val_y = np.asarray(val_rows.column(labels.LABEL), dtype=np.float64)
    trees_val, trees = stored["lightgbm"].predict(val_rows), stored["lightgbm"].predict(rows)
    scores = {
        "network (stored)": stored["network"].predict(rows),
        "lightgbm (stored)": trees,
        "ensemble (stored)": stored["ensemble"].predict(rows),
    }
    return stored, val_rows, val_y, trees_val, trees, scores


def seeds_scores(
    settings: Any, version: str, train: pa.Table, rows: pa.Table, numeric: list[str], categorical: list[str], k: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """The scores on ``rows`` of the stored network, LightGBM and ensemble, the K-seed network and ensemble
    and both champion-style picks; the scores of each seed alone and of the means of the first m seeds (the
    seed spread); and what was fitted (the first seed's refit checked against the stored members)."""
    y = np.asarray(rows.column(labels.LABEL), dtype=np.float64)
    _, _, val_y, trees_val, trees, scores = _stored(settings, version, train, rows)
    started = time.perf_counter()
    raw_val, raw_eval, fits = fit_seeds(train, rows, numeric, categorical, [settings.seed + i for i in range(k)])
    seconds = round(time.perf_counter() - started, 1)
    single = averaged_members(raw_val[:1], raw_eval[:1], val_y, trees_val, trees)
    averaged = averaged_members(raw_val, raw_eval, val_y, trees_val, trees)
    # point estimates only (no bootstrap): each seed alone, and the mean of the first m seeds, m = 2 .. K
    spread: dict[str, np.ndarray] = {}
    for i, seed in enumerate([f["seed"] for f in fits]):
        alone = averaged_members(raw_val[i : i + 1], raw_eval[i : i + 1], val_y, trees_val, trees)
        spread[f"network seed {seed}"], spread[f"ensemble seed {seed}"] = alone["network"], alone["ensemble"]
    for m in range(2, k + 1):
        first = averaged_members(raw_val[:m], raw_eval[:m], val_y, trees_val, trees)
        spread[f"network mean of {m}"], spread[f"ensemble mean of {m}"] = first["network"], first["ensemble"]
    scores["network seeds"], scores["ensemble seeds"] = averaged["network"], averaged["ensemble"]
    margin = GateConfig().margin
    picks = {}
    for name, network_p, ensemble_p in (
        ("champion-style (stored)", scores["network (stored)"], scores["ensemble (stored)"]),
        ("champion-style seeds", averaged["network"], averaged["ensemble"]),
    ):
        kinds = {"ensemble": ensemble_p, "model": network_p, "lightgbm": trees}
        picks[name] = champion_style(y, kinds, margin)
        scores[name] = kinds[picks[name]]
    info = {
        "fits": fits,
        "seconds_all_seeds": seconds,
        "picks": picks,
        # the first seed's refit reproduces the stored members (a check of the comparison)
        "refit_max_abs_diff": {
            "network": float(np.max(np.abs(single["network"] - scores["network (stored)"]))),
            "ensemble": float(np.max(np.abs(single["ensemble"] - scores["ensemble (stored)"]))),
        },
        "calibration": averaged["calibration"],
    }
    return scores, spread, info


def chosen_blend(val_y: np.ndarray, network_val: np.ndarray, trees_val: np.ndarray) -> float:
    """The network weight of ``BLEND_GRID`` whose blend has the best AUC on the validation slice (first on ties)."""
    aucs = [metrics.metrics(val_y, ensemble.blend([network_val, trees_val], (w, 1 - w)))["auc"] for w in BLEND_GRID]
    return BLEND_GRID[int(np.argmax(aucs))]


def variant_scores(
    settings: Any,
    version: str,
    train: pa.Table,
    rows: pa.Table,
    numeric: list[str],
    categorical: list[str],
    variant: str,
    bins: int,
    seed: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The scores on ``rows`` of the stored network, LightGBM and ensemble and of the ``variant``'s network
    (an architecture; for ``blend-weight`` the stored one) and ensemble; what was fitted or chosen."""
    stored, val_rows, val_y, trees_val, trees, scores = _stored(settings, version, train, rows)
    started = time.perf_counter()
    if variant == "blend-weight":
        network_val = stored["network"].predict(val_rows)
        weight = chosen_blend(val_y, network_val, trees_val)
        calibration = calibrate.fit_calibration(ensemble.blend([network_val, trees_val], (weight, 1 - weight)), val_y)
        blended = ensemble.blend([scores["network (stored)"], trees], (weight, 1 - weight))
        scores["ensemble blend-weight"] = calibrate.apply_calibration(blended, calibration)
        return scores, {"network_weight": weight, "seconds": round(time.perf_counter() - started, 1)}
    # quantile-select: the package's network (None) and SELECTED, the one ranking the validation slice better kept
    fits = {}
    for architecture in (None, SELECTED) if variant == "quantile-select" else (variant,):
        fits[architecture] = fit_network_only(
            train, numeric, categorical, class_weighted=True, seed=seed, architecture=architecture, bins=bins
        )
    val_auc = {a: metrics.metrics(val_y, fitted["raw_val"])["auc"] for a, (_, fitted) in fits.items()}
    kept = max(fits, key=lambda a: (val_auc[a], a is None))  # the plain network on a tie
    network, fitted = fits[kept]
    raw_eval = networks.predict_network(network, network_inputs.model_inputs(rows, numeric, categorical))
    rebuilt = averaged_members([fitted["raw_val"]], [raw_eval], val_y, trees_val, trees)
    scores[f"network {variant}"], scores[f"ensemble {variant}"] = rebuilt["network"], rebuilt["ensemble"]
    info: dict[str, Any] = {"epochs": fitted["epochs"], "seconds": round(time.perf_counter() - started, 1)}
    if variant == "quantile-select":
        info["kept"] = kept or "plain"
        info["validation_auc"] = {a or "plain": round(v, 4) for a, v in val_auc.items()}
        info["epochs_each"] = {a or "plain": f["epochs"] for a, (_, f) in fits.items()}
    return scores, info


def point_metrics(y: np.ndarray, scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """AUC, lift@10 and ECE of each of ``scores`` (point estimates, 4 decimals)."""
    return {
        name: {k: round(v, 4) for k, v in metrics.metrics(y, p).items() if k in ("auc", "lift_at_10", "ece")}
        for name, p in scores.items()
    }


def paired(
    y: np.ndarray, scores: dict[str, np.ndarray], n_boot: int, variant: str
) -> dict[str, dict[str, list[float]]]:
    """95% paired bootstrap intervals of the ``differences`` (AUC, lift, ...; an interval above 0: a real gain)."""
    pairs = [(a, b) for a, b in differences(variant) if a in scores and b in scores]
    drawn = metrics.bootstrap_intervals(y, scores, n_boot=n_boot, seed=7, differences=pairs)
    return {
        f"{a} - {b}": {k: [round(v, 4) for v in drawn[f"{a} - {b}"][k]] for k in drawn[f"{a} - {b}"]} for a, b in pairs
    }


def resample(npz: Path, boot_seeds: list[int], n_boot: int, variant: str = "seeds") -> dict[str, Any]:
    """The pooled paired intervals of the ``seeds`` differences (AUC, lift@10, ECE) from a ``--scores-out`` file,
    once per bootstrap seed: how much of an interval's end is resampling noise (``variant``: the differences of
    that variant instead)."""
    saved = np.load(npz)
    y = saved["label"]
    if variant != "seeds":
        pairs = [(a, b) for a, b in differences(variant) if a in saved.files and b in saved.files]
        return resample_pairs(y, {n: saved[n] for n in saved.files if n != "label"}, pairs, boot_seeds, n_boot)
    # the K-seed members, and those of the first 5 seeds when K was larger (``mean of 5``)
    extra = [
        (f"{kind} mean of 5", b) for kind in ("network", "ensemble") for b in ("lightgbm (stored)", f"{kind} (stored)")
    ]
    pairs = [(a, b) for a, b in (*differences("seeds"), *extra) if a in saved.files and b in saved.files]
    scores = {name: saved[name] for name in dict.fromkeys(n for pair in pairs for n in pair)}
    return resample_pairs(y, scores, pairs, boot_seeds, n_boot)


def resample_pairs(
    y: np.ndarray, scores: dict[str, np.ndarray], pairs: list[tuple[str, str]], boot_seeds: list[int], n_boot: int
) -> dict[str, Any]:
    """The paired intervals (AUC, lift@10, ECE) of ``pairs`` once per bootstrap seed."""
    out: dict[str, Any] = {}
    for boot_seed in boot_seeds:
        drawn = metrics.bootstrap_intervals(y, scores, n_boot=n_boot, seed=boot_seed, differences=pairs)
        out[str(boot_seed)] = {
            f"{a} - {b}": {k: [round(v, 4) for v in drawn[f"{a} - {b}"][k]] for k in ("auc", "lift_at_10", "ece")}
            for a, b in pairs
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", required=True, help="the working directory of a model_real.py run")
    parser.add_argument("--horizon-hours", type=int, required=True)
    parser.add_argument("--business-tz", default="UTC")
    parser.add_argument("--version", action="append", default=[], help="a trained version (default: every one)")
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--variant", choices=VARIANTS, default="no-class-weight")
    parser.add_argument("--seeds", type=int, default=5, help="seeds: the number of networks averaged")
    parser.add_argument("--half-life-days", type=float, default=7.0, help="time-decay: the weight halves per this age")
    parser.add_argument("--fit-seed", type=int, help="architecture variants: the fit's seed (default the lake's)")
    parser.add_argument("--bins", type=int, default=16, help="quantile variants: quantile bins per numeric input")
    parser.add_argument(
        "--skip-refit", action="store_true", help="compare with the stored network only (a refit reproduces it)"
    )
    parser.add_argument("--out", help="write the JSON result here as well")
    parser.add_argument("--scores-out", help="write the pooled labels and scores here (.npz), to resample again")
    parser.add_argument(
        "--resample",
        metavar="NPZ",
        help="no fit; the pooled paired intervals of a --scores-out file again, once per --boot-seed",
    )
    parser.add_argument("--boot-seed", type=int, action="append", default=[], help="--resample: bootstrap seeds")
    args = parser.parse_args(argv)
    if args.resample:
        emit_json(resample(Path(args.resample), args.boot_seed or [7], args.n_boot, args.variant), args.out)
        return 0
    settings = trained_lake_settings(Path(args.lake), args.horizon_hours, args.business_tz)
    versions = args.version or [
        v["version"] for v in json.loads((Path(args.lake) / "result.json").read_text())["versions"]
    ]
    out: dict[str, Any] = {"versions": {}}
    ys: list[np.ndarray] = []
    pooled: dict[str, list[np.ndarray]] = {}

    def record(version: str, y: np.ndarray, scores: dict[str, np.ndarray], fitted: dict[str, Any]) -> None:
        """One version's metrics and paired intervals (printed as they come), its rows kept for the pooled ones."""
        out["versions"][version] = {
            "rows": int(y.size),
            "positives": int(y.sum()),
            **fitted,
            "metrics": _with_intervals(y, scores, args.n_boot),
            "paired": paired(y, scores, args.n_boot, args.variant),
        }
        print(version, json.dumps(out["versions"][version]), file=sys.stderr, flush=True)
        ys.append(y)
        for name, p in scores.items():
            pooled.setdefault(name, []).append(p)

    for version in versions:
        train, rows, _ = labels.read_training_set(settings, version)
        # the features the version's training set carries (a set built before a feature existed lacks it)
        numeric = [c for c in NUMERIC_FEATURES if c in train.column_names]
        categorical = [c for c in CATEGORICAL_FEATURES if c in train.column_names]
        y = np.asarray(rows.column(labels.LABEL), dtype=np.float64)
        if args.variant == "seeds":
            scores, spread, seed_info = seeds_scores(settings, version, train, rows, numeric, categorical, args.seeds)
            out["versions"][version] = {
                "rows": int(y.size),
                "positives": int(y.sum()),
                **seed_info,
                "point": point_metrics(y, spread),
                "metrics": _with_intervals(y, scores, args.n_boot),
                "paired": paired(y, scores, args.n_boot, args.variant),
            }
            print(version, json.dumps(out["versions"][version]), file=sys.stderr, flush=True)
            ys.append(y)
            for name, p in {**scores, **spread}.items():
                pooled.setdefault(name, []).append(p)
            continue
        if args.variant in ENSEMBLE_VARIANTS:
            started = time.perf_counter()
            scores, fit_info = variant_scores(
                settings,
                version,
                train,
                rows,
                numeric,
                categorical,
                args.variant,
                args.bins,
                settings.seed if args.fit_seed is None else args.fit_seed,
            )
            record(version, y, scores, {"fit": fit_info, "seconds_version": round(time.perf_counter() - started, 1)})
            continue
        stored = {c.name: c.predict(rows) for c in candidates.version_candidates(settings, version)}
        scores = {"network (stored)": stored["network"], "lightgbm (stored)": stored["lightgbm"]}
        if "ensemble" in stored:
            scores["ensemble (stored)"] = stored["ensemble"]
        info: dict[str, Any] = {}
        decay = args.half_life_days * 24 if args.variant == "time-decay" else None
        variant = (f"network {args.variant}", args.variant != "no-class-weight", decay)
        fits = (("network (refit)", True, None), variant)
        for name, weighted, half_life in fits[1:] if args.skip_refit else fits:
            started = time.perf_counter()
            network, fitted = fit_network_only(
                train, numeric, categorical, class_weighted=weighted, seed=settings.seed, half_life_hours=half_life
            )
            raw = networks.predict_network(network, network_inputs.model_inputs(rows, numeric, categorical))
            scores[name] = calibrate.apply_calibration(raw, fitted["calibration"])
            info[name] = {"epochs": fitted["epochs"], "seconds": round(time.perf_counter() - started, 1)}
        record(version, y, scores, {"fits": info})
    y_all, all_scores = np.concatenate(ys), {n: np.concatenate(p) for n, p in pooled.items()}
    spread_names = [n for n in all_scores if " seed " in n or " mean of " in n]
    all_spread = {n: all_scores.pop(n) for n in spread_names}
    out["pooled"] = {
        "metrics": _with_intervals(y_all, all_scores, args.n_boot),
        "paired": paired(y_all, all_scores, args.n_boot, args.variant),
    }
    if all_spread:
        out["pooled"]["point"] = point_metrics(y_all, all_spread)
    if args.scores_out:
        arrays: dict[str, Any] = {"label": y_all, **all_scores, **all_spread}
        np.savez_compressed(args.scores_out, **arrays)
    emit_json(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
