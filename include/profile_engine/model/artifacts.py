"""The model directory ``models/<version>/``: writing it, the TensorFlow-free inference export, and
loading a version's scorer of any kind. docs/model.md (Model; Without TensorFlow).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from profile_engine.config import Settings
from profile_engine.contracts.profiles import SNAPSHOT_HOUR, USER_ID
from profile_engine.hours import format_hour
from profile_engine.lake.storage import MANIFEST, MODELS, TRAINING, Lake, read_json
from profile_engine.model import ensemble, gbm, inference, labels, registry
from profile_engine.model import metrics as measures
from profile_engine.model.calibration import apply_calibration
from profile_engine.model.card import model_card
from profile_engine.model.inputs import model_inputs, numpy_inputs
from profile_engine.model.network import custom_layers, predict_network
from profile_engine.model.registry import (
    BASELINE_FILE,
    CARD_FILE,
    METRICS_FILE,
    MODEL_FILE,
    MODEL_KINDS,
    SEQUENCE_KINDS,
    kind_label,
    sequence_file_names,
    update_model_dir,
)

if TYPE_CHECKING:
    from profile_engine.model.sequence import SequenceModel


log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
DECILES_FILE = "deciles.json"
FEATURES_FILE = "features.json"
# The TensorFlow-free export of each network (spec, weights), next to its .keras file.
NETWORK_FILES: dict[str, str] = {"model": MODEL_FILE, "baseline": BASELINE_FILE}
INFERENCE_FILES: dict[str, tuple[str, str]] = {
    kind: inference.inference_file_names(name) for kind, name in NETWORK_FILES.items()
}
BASELINE_SUFFIX = "-baseline"


@dataclass
class FittedModels:
    """The fitted network, its calibration and cut points, the baseline, the gradient-boosted trees and the
    ensemble's calibration."""

    model: Any
    baseline: Any
    calibration: dict[str, Any]
    baseline_calibration: dict[str, Any]
    cut_points: list[float]
    baseline_cut_points: list[float]
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    report: dict[str, Any]
    lightgbm: gbm.GBMModel | None = None
    lightgbm_calibration: dict[str, Any] | None = None
    lightgbm_cut_points: list[float] | None = None
    # The ensemble of network and trees (``ensemble.MEMBERS``): its calibration and cut points; None without trees.
    ensemble_calibration: dict[str, Any] | None = None
    ensemble_cut_points: list[float] | None = None
    # The sequence kinds (``SEQUENCE_KINDS``) when trained, each with its calibration; their cut points.
    sequences: dict[str, SequenceModel] = field(default_factory=dict)
    sequence_cut_points: dict[str, list[float]] = field(default_factory=dict)


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, indent=2, sort_keys=True, default=str).encode()


def _keras_bytes(network: Any, scratch: Path, name: str) -> bytes:
    path = scratch / name
    network.save(path)
    return path.read_bytes()


def write_model_dir(
    settings: Settings, version: str, fitted: FittedModels, training: labels.TrainingSet, hour: datetime, run_id: str
) -> dict[str, Any]:
    """Write ``models/<version>/`` atomically and return its metrics."""
    lake = Lake(settings.lake)
    eval_inputs = model_inputs(training.eval, fitted.numeric, fitted.categorical)
    y = np.asarray(training.eval.column(labels.LABEL), dtype=np.float64)
    raw = predict_network(fitted.model, eval_inputs)
    baseline_raw = predict_network(fitted.baseline, eval_inputs)
    metrics = {
        "eval": {
            "model": measures.metrics(y, apply_calibration(raw, fitted.calibration)),
            "model_uncalibrated": measures.metrics(y, raw),
            "baseline": measures.metrics(y, apply_calibration(baseline_raw, fitted.baseline_calibration)),
            "baseline_uncalibrated": measures.metrics(y, baseline_raw),
        },
        "training": fitted.report,
    }
    if fitted.lightgbm is not None:
        trees_raw = fitted.lightgbm.predict(training.eval)
        metrics["eval"]["lightgbm"] = measures.metrics(y, apply_calibration(trees_raw, fitted.lightgbm_calibration))
        metrics["eval"]["lightgbm_uncalibrated"] = measures.metrics(y, trees_raw)
        if fitted.ensemble_calibration is not None:
            members = {
                "model": apply_calibration(raw, fitted.calibration),
                "lightgbm": apply_calibration(trees_raw, fitted.lightgbm_calibration),
            }
            blended = ensemble.blend([members[kind] for kind in ensemble.MEMBERS], ensemble.WEIGHTS)
            metrics["eval"]["ensemble"] = measures.metrics(y, apply_calibration(blended, fitted.ensemble_calibration))
            metrics["eval"]["ensemble_uncalibrated"] = measures.metrics(y, blended)
    encoder_files: dict[str, bytes] = {}
    if fitted.sequences:
        from profile_engine.model import sequence

        eval_sequences = sequence.sequence_inputs(settings, training.eval, next(iter(fitted.sequences.values())).config)
        for kind, trained in fitted.sequences.items():
            sequence_raw = trained.predict_raw(training.eval, eval_sequences)
            metrics["eval"][kind] = measures.metrics(y, apply_calibration(sequence_raw, trained.calibration))
            metrics["eval"][f"{kind}_uncalibrated"] = measures.metrics(y, sequence_raw)
    fitted_on = training.summary()["train_snapshots"][-1]
    calibrations: dict[str, Any] = {
        **fitted.calibration,
        "fitted_on": fitted_on,
        "baseline": {**fitted.baseline_calibration, "fitted_on": fitted_on},
    }
    cut_points: dict[str, Any] = {"model": fitted.cut_points, "baseline": fitted.baseline_cut_points}
    tree_files: dict[str, bytes] = {}
    if fitted.lightgbm is not None:
        calibrations["lightgbm"] = {**(fitted.lightgbm_calibration or {}), "fitted_on": fitted_on}
        cut_points["lightgbm"] = fitted.lightgbm_cut_points
        tree_files = fitted.lightgbm.files()
        if fitted.ensemble_calibration is not None:
            calibrations["ensemble"] = {**fitted.ensemble_calibration, "fitted_on": fitted_on}
            cut_points["ensemble"] = fitted.ensemble_cut_points
            tree_files[ensemble.ENSEMBLE_FILE] = ensemble.spec_bytes(ensemble.MEMBERS, ensemble.WEIGHTS)
    cut_points.update(fitted.sequence_cut_points)
    features = {"numeric": list(fitted.numeric), "categorical": list(fitted.categorical), "label": labels.LABEL}
    training_info = {
        **training.summary(),
        "training_hour": format_hour(hour),
        "label_horizon_hours": settings.label_horizon_hours,
        "lateness_hours": settings.lateness_hours,
    }
    scratch = lake.tmp_dir()
    try:
        networks = {"model": fitted.model, "baseline": fitted.baseline}
        saved = {kind: _keras_bytes(networks[kind], scratch, name) for kind, name in NETWORK_FILES.items()}
        for trained in fitted.sequences.values():
            encoder_files.update(sequence.sequence_files(trained, scratch))
        files = [
            (MODEL_FILE, saved["model"]),
            (BASELINE_FILE, saved["baseline"]),
            *[
                item
                for kind, network in networks.items()
                for item in inference_files(
                    network,
                    kind,
                    saved[kind],
                    numeric=fitted.numeric,
                    categorical=fitted.categorical,
                    check_rows=training.eval,
                ).items()
            ],
            *tree_files.items(),
            *encoder_files.items(),
            (CALIBRATION_FILE, _json_bytes(calibrations)),
            (DECILES_FILE, _json_bytes(cut_points)),
            (FEATURES_FILE, _json_bytes(features)),
            (METRICS_FILE, _json_bytes(metrics)),
            (CARD_FILE, model_card(version, training_info, features, metrics).encode()),
        ]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lake.write_dir(
        lake.path(MODELS, version),
        files,
        {"version": version, "training": training_info, "seed": settings.seed, "run_id": run_id},
    )
    return metrics


class ExportMismatch(ValueError):
    """The numpy export of a network does not reproduce its Keras predictions."""


# Rows of the evaluation set on which an export is checked against Keras, and the largest difference allowed
# (float32 forward passes in different orders differ by a few ulp; 1e-5 leaves two orders of magnitude of room).
EXPORT_CHECK_ROWS = 1_000
EXPORT_TOLERANCE = 1e-5


def inference_files(
    network: Any,
    kind: str,
    keras_bytes: bytes,
    *,
    numeric: Sequence[str],
    categorical: Sequence[str],
    check_rows: pa.Table | None = None,
) -> dict[str, bytes]:
    """The inference spec and weights of one network (``kind`` "model" or "baseline") as files.

    ``keras_bytes`` is the network's saved ``.keras`` file: its checksum goes into
    the spec, so a later rewrite of the network makes the export stale. With
    ``check_rows``, the numpy forward pass is compared with Keras on up to
    ``EXPORT_CHECK_ROWS`` of them (``ExportMismatch`` beyond ``EXPORT_TOLERANCE``).
    Raises ``inference.UnsupportedLayer`` for a layer the export does not know.
    """
    layers = custom_layers()
    spec, weights = inference.export_network(
        network,
        layers["FillMissing"],
        source_sha256=hashlib.sha256(keras_bytes).hexdigest(),
        clip_class=layers["Clip"],
        custom=layers,
    )
    spec_name, weights_name = INFERENCE_FILES[kind]
    files = {spec_name: inference.spec_bytes(spec), weights_name: weights}
    if check_rows is not None and check_rows.num_rows:
        rows = check_rows.slice(0, EXPORT_CHECK_ROWS)
        exported = inference.InferenceNetwork.from_bytes(files[spec_name], files[weights_name])
        expected = predict_network(network, model_inputs(rows, numeric, categorical))
        actual = exported.predict(numpy_inputs(rows, numeric, categorical)).astype(np.float64)
        worst = float(np.max(np.abs(expected - actual)))
        if not worst <= EXPORT_TOLERANCE:
            raise ExportMismatch(
                f"{kind} network {network.name!r}: numpy export differs from Keras by {worst:.3g} "
                f"(> {EXPORT_TOLERANCE}) on {rows.num_rows} rows"
            )
    return files


def export_inference(settings: Settings, version: str) -> list[str]:
    """Add the TensorFlow-free inference files of both networks to an existing version; their names.

    For versions written before the export existed (they score through Keras
    until then). The export is checked against Keras on the version's evaluation
    rows when its training set is still in the lake, and added atomically through
    ``update_model_dir``; when the version already holds identical files nothing
    is rewritten (idempotent). Imports TensorFlow.
    """
    import keras
    import pyarrow.parquet as pq

    lake = Lake(settings.lake)
    directory = lake.path(MODELS, version)
    if not registry.model_dir_committed(settings, version):
        raise FileNotFoundError(f"model version {version} is not committed ({directory})")
    features = read_json(directory / FEATURES_FILE)
    eval_file = lake.path(TRAINING, version, labels.EVAL_FILE)
    check_rows = None
    if eval_file.is_file():
        first = next(pq.ParquetFile(eval_file).iter_batches(batch_size=EXPORT_CHECK_ROWS), None)
        check_rows = None if first is None else pa.Table.from_batches([first])
    updates: dict[str, bytes] = {}
    for kind, name in NETWORK_FILES.items():
        payload = (directory / name).read_bytes()
        network = keras.saving.load_model(directory / name, custom_objects=custom_layers())
        updates.update(
            inference_files(
                network,
                kind,
                payload,
                numeric=features["numeric"],
                categorical=features["categorical"],
                check_rows=check_rows,
            )
        )
    listed = {f["name"] for f in read_json(directory / MANIFEST)["files"]}
    if any(n not in listed or (directory / n).read_bytes() != b for n, b in updates.items()):
        update_model_dir(settings, version, updates)
    return sorted(updates)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score: network, calibration and decile cut points of one version and kind.

    ``network`` is an ``inference.InferenceNetwork`` (numpy, no TensorFlow) when
    the version holds the export, else the Keras model; for kind ``lightgbm`` a
    ``gbm.GBMModel`` (LightGBM, no TensorFlow either); for kind ``ensemble`` an
    ``ensemble.EnsembleScorer`` over the version's loaded members; for the ``SEQUENCE_KINDS`` a
    ``sequence.SequenceScorer`` (Keras, reading each row's events from staging).
    """

    version: str
    kind: str  # one of MODEL_KINDS: "model" (the network), "ensemble", "lightgbm", "sequence", "combined", "baseline"
    network: Any
    calibration: dict[str, Any] | None
    cut_points: tuple[float, ...]
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]

    @property
    def label(self) -> str:
        """What scores record as ``model_version``: the version for the network, else ``<version>-<kind>``."""
        return kind_label(self.version, self.kind)

    @property
    def engine(self) -> str:
        """``numpy`` (the inference export), ``keras`` (the fallback and the sequence kinds), ``lightgbm``, or
        the ensemble's members' joined by ``+`` (``numpy+lightgbm``)."""
        if isinstance(self.network, ensemble.EnsembleScorer):
            return self.network.engine
        if isinstance(self.network, gbm.GBMModel):
            return "lightgbm"
        return "numpy" if isinstance(self.network, inference.InferenceNetwork) else "keras"

    @property
    def columns(self) -> list[str]:
        """The profile columns ``predict`` reads: the user and the features (and the snapshot hour, whose
        cutoff the sequence kinds read the user's events up to)."""
        keys = [USER_ID, SNAPSHOT_HOUR] if self.kind in SEQUENCE_KINDS else [USER_ID]
        return list(dict.fromkeys([*keys, *self.numeric, *self.categorical]))

    def predict(self, table: pa.Table) -> np.ndarray:
        """Purchase probabilities (float64) for profile rows (with ``SNAPSHOT_HOUR`` for the sequence kinds)."""
        if table.num_rows == 0:
            return np.zeros(0, dtype=np.float64)
        if self.kind in SEQUENCE_KINDS or isinstance(self.network, ensemble.EnsembleScorer):
            raw = self.network.predict_raw(table)
        elif isinstance(self.network, gbm.GBMModel):
            raw = self.network.predict(table)
        elif isinstance(self.network, inference.InferenceNetwork):
            inputs = numpy_inputs(table, self.numeric, self.categorical)
            raw = self.network.predict(inputs).astype(np.float64)
        else:
            raw = predict_network(self.network, model_inputs(table, self.numeric, self.categorical))
        return apply_calibration(raw, self.calibration)


def _inference_network(path: Path, kind: str) -> tuple[inference.InferenceNetwork | None, str]:
    """The version's numpy network of ``kind``, or None and why not (missing or stale export)."""
    listed = {f["name"]: f["sha256"] for f in read_json(path / MANIFEST)["files"]}
    spec_name, weights_name = INFERENCE_FILES[kind]
    if spec_name not in listed or weights_name not in listed:
        return None, "has no inference export"
    try:
        network = inference.InferenceNetwork.from_bytes(
            (path / spec_name).read_bytes(), (path / weights_name).read_bytes()
        )
    except (ValueError, KeyError) as error:  # e.g. a format written by newer code
        return None, f"has an unreadable inference export ({error})"
    if network.source_sha256 != listed.get(NETWORK_FILES[kind]):
        return None, f"has an inference export of another {NETWORK_FILES[kind]} (stale)"
    return network, ""


_FELL_BACK: set[tuple[str, str]] = set()


def network_calibration(stored: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    """The calibration of ``kind`` in a version's ``calibration.json``: the network's at the top level,
    the others' under their kind (``baseline``: None in versions written before the baseline was calibrated)."""
    if kind == "model":
        return {k: v for k, v in stored.items() if k not in MODEL_KINDS}
    other = stored.get(kind)
    return dict(other) if other else None


def _lightgbm(path: Path) -> gbm.GBMModel:
    """The version's LightGBM model; ``FileNotFoundError`` for a version trained before LightGBM was a candidate."""
    listed = {f["name"] for f in read_json(path / MANIFEST)["files"]}
    if gbm.LIGHTGBM_FILE not in listed or gbm.LIGHTGBM_SPEC not in listed:
        raise FileNotFoundError(f"model version {path.name} has no LightGBM model ({gbm.LIGHTGBM_FILE}) in {path}")
    return gbm.GBMModel.from_bytes((path / gbm.LIGHTGBM_SPEC).read_bytes(), (path / gbm.LIGHTGBM_FILE).read_bytes())


def _ensemble(path: Path, stamp: str) -> ensemble.EnsembleScorer:
    """The version's ensemble over its loaded members; ``FileNotFoundError`` for a version trained before the
    ensemble was a candidate."""
    listed = {f["name"] for f in read_json(path / MANIFEST)["files"]}
    if ensemble.ENSEMBLE_FILE not in listed:
        raise FileNotFoundError(f"model version {path.name} has no ensemble ({ensemble.ENSEMBLE_FILE}) in {path}")
    members, weights = ensemble.read_spec((path / ensemble.ENSEMBLE_FILE).read_bytes())
    return ensemble.EnsembleScorer(tuple(_load(str(path), kind, stamp) for kind in members), weights)


def version_kinds(settings: Settings, version: str) -> list[str]:
    """The kinds a committed version can score with, in ``MODEL_KINDS`` order (older versions: no lightgbm,
    no ensemble; the ensemble only with its members; the sequence kinds only when they were trained)."""
    listed = {f["name"] for f in read_json(Lake(settings.lake).path(MODELS, version, MANIFEST))["files"]}
    present = {
        "model": MODEL_FILE in listed,
        "lightgbm": gbm.LIGHTGBM_FILE in listed,
        "baseline": BASELINE_FILE in listed,
        **{kind: sequence_file_names(kind)[0] in listed for kind in SEQUENCE_KINDS},
    }
    present["ensemble"] = ensemble.ENSEMBLE_FILE in listed and all(present[kind] for kind in ensemble.MEMBERS)
    return [kind for kind in MODEL_KINDS if present[kind]]


@functools.lru_cache(maxsize=8)
def _load(directory: str, kind: str, stamp: str) -> LoadedModel:
    path = Path(directory)
    features = read_json(path / FEATURES_FILE)
    network: Any
    if kind == "lightgbm":
        network, why = _lightgbm(path), ""
    elif kind == "ensemble":
        network, why = _ensemble(path, stamp), ""
    else:
        network, why = _inference_network(path, kind)
    if network is None:
        import keras

        if (directory, kind) not in _FELL_BACK:
            _FELL_BACK.add((directory, kind))
            log.warning(
                "model version %s (%s) %s: scoring with Keras, which imports TensorFlow (seconds per process); "
                "add the export with `python -m profile_engine models export-inference %s`",
                path.name,
                kind,
                why,
                path.name,
            )
        network = keras.saving.load_model(path / NETWORK_FILES[kind], custom_objects=custom_layers())
    return LoadedModel(
        version=path.name,
        kind=kind,
        network=network,
        calibration=network_calibration(read_json(path / CALIBRATION_FILE), kind),
        cut_points=tuple(read_json(path / DECILES_FILE)[kind]),
        numeric=tuple(features["numeric"]),
        categorical=tuple(features["categorical"]),
    )


@functools.lru_cache(maxsize=2)
def _load_sequence(settings: Settings, directory: str, kind: str, stamp: str) -> LoadedModel:
    from profile_engine.model import sequence

    path = Path(directory)
    fitted = sequence.load_sequence(settings, path.name, kind)  # imports TensorFlow: no numpy export of the GRU
    return LoadedModel(
        version=path.name,
        kind=kind,
        network=sequence.SequenceScorer(settings, fitted),
        calibration=fitted.calibration,
        cut_points=tuple(read_json(path / DECILES_FILE)[kind]),
        numeric=fitted.numeric,
        categorical=fitted.categorical,
    )


def load_model(settings: Settings, version: str, kind: str = "model") -> LoadedModel:
    """Load a version's scorer (``kind`` one of ``MODEL_KINDS``) once per process.

    The cache key includes the manifest's modification time, so a retrained (rewritten)
    version is loaded afresh. Only the ``SEQUENCE_KINDS`` import TensorFlow (and read
    staging when they predict); the others never do when the version holds its exports.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    directory = Lake(settings.lake).path(MODELS, version)
    stamp = str((directory / MANIFEST).stat().st_mtime_ns)
    if kind in SEQUENCE_KINDS:
        return _load_sequence(settings, str(directory), kind, stamp)
    return _load(str(directory), kind, stamp)
