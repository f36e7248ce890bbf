"""The behaviour-sequence model: a Keras GRU encoder over each user's last staged events before a snapshot, alone
and combined with the aggregate inputs. docs/model.md (Sequence encoder).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.config import Settings
from profile_engine.contracts.events import EVENT_TYPES, bucket_sql, md5_modulo_sql
from profile_engine.contracts.profiles import SNAPSHOT_HOUR, USER_ID
from profile_engine.hours import HOUR, floor_hour
from profile_engine.lake import db
from profile_engine.lake.storage import MODELS, STAGING, Lake, read_json
from profile_engine.model import labels
from profile_engine.model.calibration import apply_calibration, fit_calibration
from profile_engine.model.inputs import model_inputs
from profile_engine.model.network import (
    ModelConfig,
    build_network,
    class_weights,
    custom_layers,
    fit_network,
    predict_network,
    validation_split,
)
from profile_engine.model.registry import SEQUENCE_KINDS, sequence_file_names, update_model_dir
from profile_engine.profiles.build import staged_hours

# The two kinds: the encoder alone, and the encoder concatenated with the aggregate network's inputs.
KINDS = SEQUENCE_KINDS

# Input names of the sequence branch (the aggregate ones are inputs.NUMERIC_INPUT and inputs.CATEGORICAL_PREFIX...).
TYPE_INPUT = "seq_event_type"
CATEGORY_INPUT = "seq_category"
TIME_INPUT = "seq_time"
# Per-step time features: log1p of the hours since the previous event of the sequence (0 for the first
# event the window holds) and log1p of the hours from the event to the snapshot end.
TIME_FEATURES = ("log_hours_since_previous", "log_hours_to_snapshot_end")

# Index 0 pads; event types are 1 + their position in schema.EVENT_TYPES, an unknown type the next index.
PAD = 0
UNKNOWN_TYPE = len(EVENT_TYPES) + 1
# Categories: 0 pads, 1 is a null category, 2.. are md5 hash buckets (stable across processes and versions).
NULL_CATEGORY = 1


@dataclass(frozen=True)
class SequenceConfig:
    """Sequence window and encoder knobs; the defaults train the Taobao tail (about 1,000 rows) in seconds."""

    length: int = 50  # the last N events before the cutoff
    category_buckets: int = 1024  # hash buckets of category_id (plus padding and null)
    type_embedding: int = 4
    category_embedding: int = 8
    gru_units: int = 16
    dense_units: int = 16
    dropout: float = 0.3
    learning_rate: float = 3e-3
    batch_size: int = 256
    max_epochs: int = 30
    patience: int = 3


@dataclass(frozen=True)
class SequenceInputs:
    """The encoder's arrays for n examples, left-padded to ``length`` (the newest event last).

    ``event_type`` and ``category`` are int32 (n, length) with 0 as padding, ``time`` is
    float32 (n, length, 2) (``TIME_FEATURES``, 0 where padded) and ``mask`` bool (n, length).
    """

    event_type: np.ndarray
    category: np.ndarray
    time: np.ndarray
    mask: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        """The Keras input dict of the sequence branch."""
        return {TYPE_INPUT: self.event_type, CATEGORY_INPUT: self.category, TIME_INPUT: self.time}

    def take(self, rows: np.ndarray) -> SequenceInputs:
        """The inputs of a subset of rows (a boolean mask or indices)."""
        return SequenceInputs(self.event_type[rows], self.category[rows], self.time[rows], self.mask[rows])


def sequence_inputs(settings: Settings, examples: pa.Table, config: SequenceConfig | None = None) -> SequenceInputs:
    """Each example's last ``config.length`` staged events before its snapshot's cutoff, as arrays.

    ``examples`` needs ``USER_ID`` and ``SNAPSHOT_HOUR`` (hour S; end E = S + 1h). An event
    is in the window of an example when the user's event has ``ts < E`` and was staged in
    a processing hour at or before S (what the hourly path knew at S, as
    ``labels.check_no_leakage`` rebuilds it). Events are ordered by ``ts`` then
    ``event_id`` (ties stable), the newest last; shorter histories are left-padded.
    Staging is read in one DuckDB query per bucket, joined to that bucket's examples.
    """
    config = config or SequenceConfig()
    n, length = examples.num_rows, config.length
    event_type = np.zeros((n, length), dtype=np.int32)
    category = np.zeros((n, length), dtype=np.int32)
    time = np.zeros((n, length, len(TIME_FEATURES)), dtype=np.float32)
    mask = np.zeros((n, length), dtype=bool)
    if n == 0:
        return SequenceInputs(event_type, category, time, mask)
    lake = Lake(settings.lake)
    hour_ms = HOUR // timedelta(milliseconds=1)
    keys = pa.table(
        {
            "idx": pa.array(np.arange(n, dtype=np.int64)),
            "uid": pc.cast(examples.column(USER_ID), pa.string()),
            "snapshot": pc.cast(examples.column(SNAPSHOT_HOUR), pa.timestamp("ms", tz="UTC")),
        }
    )
    newest = floor_hour(max(examples.column(SNAPSHOT_HOUR).to_pylist()))
    types_sql = " ".join(f"WHEN '{t}' THEN {i + 1}" for i, t in enumerate(EVENT_TYPES))
    category_sql = f"CASE WHEN s.category_id IS NULL THEN {NULL_CATEGORY} ELSE 2 + CAST({md5_modulo_sql('s.category_id', config.category_buckets)} AS INTEGER) END"
    con = db.connect(settings)
    try:
        con.register("keys_all", keys)
        # end E = S + 1h in epoch ms, and the epoch hour of S (events staged at or before it were known at S)
        con.execute(
            f"""CREATE TEMP TABLE keys AS
            SELECT idx, uid, epoch_ms(snapshot) + {hour_ms} AS end_ms, epoch_ms(snapshot) // {hour_ms} AS staged_limit,
                   {bucket_sql("uid", settings.buckets)} AS b
            FROM keys_all"""
        )
        buckets = sorted(int(b) for (b,) in con.execute("SELECT DISTINCT b FROM keys").fetchall())
        parts = []
        for bucket in buckets:  # only the buckets of the examples (scoring reads one bucket's users)
            files = [
                str(f) for h in staged_hours(lake, bucket) if h <= newest for f in lake.data_files(STAGING, h, bucket)
            ]
            if not files:
                continue
            # Rank events newest first per example; keep the last `length` before the cutoff.
            parts.append(
                con.sql(
                    f"""
                    WITH s AS (
                        SELECT s.user_id, s.event_id, s.event_type, s.category_id, epoch_ms(s.ts) AS ts_ms,
                               CAST(epoch(s.dt) // 3600 + s.hour AS BIGINT) AS staged_hour
                        FROM read_parquet(?, hive_partitioning = true, hive_types = {{'dt': DATE, 'hour': INTEGER}}) s
                        WHERE s.user_id IN (SELECT uid FROM keys WHERE b = ?)
                    ), windowed AS (
                        SELECT k.idx, s.ts_ms, k.end_ms,
                               CASE s.event_type {types_sql} ELSE {UNKNOWN_TYPE} END AS type_id,
                               {category_sql} AS category_id,
                               ROW_NUMBER() OVER (PARTITION BY k.idx ORDER BY s.ts_ms DESC, s.event_id DESC) AS back
                        FROM keys k JOIN s ON s.user_id = k.uid
                        WHERE k.b = ? AND s.ts_ms < k.end_ms AND s.staged_hour <= k.staged_limit
                    )
                    SELECT idx, back, ts_ms, end_ms, type_id, category_id FROM windowed WHERE back <= ?
                    """,
                    params=[files, bucket, bucket, length],
                ).to_arrow_table()
            )
    finally:
        con.close()
    if not parts:
        return SequenceInputs(event_type, category, time, mask)
    rows = pa.concat_tables(parts)
    idx = np.asarray(rows.column("idx"), dtype=np.int64)
    back = np.asarray(rows.column("back"), dtype=np.int64)  # 1 = the newest event
    position = length - back
    ts_ms = np.asarray(rows.column("ts_ms"), dtype=np.int64)
    event_type[idx, position] = np.asarray(rows.column("type_id"), dtype=np.int32)
    category[idx, position] = np.asarray(rows.column("category_id"), dtype=np.int32)
    mask[idx, position] = True
    stamp = np.zeros((n, length), dtype=np.int64)
    stamp[idx, position] = ts_ms
    to_end = (np.asarray(rows.column("end_ms"), dtype=np.int64) - ts_ms) / hour_ms
    time[idx, position, 1] = np.log1p(to_end)
    gap = np.zeros((n, length), dtype=np.float64)
    gap[:, 1:] = (stamp[:, 1:] - stamp[:, :-1]) / hour_ms
    has_previous = np.zeros((n, length), dtype=bool)
    has_previous[:, 1:] = mask[:, :-1] & mask[:, 1:]
    time[:, :, 0] = np.where(has_previous, np.log1p(np.maximum(gap, 0.0)), 0.0)
    return SequenceInputs(event_type, category, time, mask)


# ---- network ---------------------------------------------------------------------------------------------------------
def _aggregate_branch(
    train: pa.Table, numeric: Sequence[str], categorical: Sequence[str], config: ModelConfig
) -> tuple[list[Any], Any]:
    """The aggregate network's inputs and its normalised input vector (what its first dense layer reads).

    Built by ``build_network`` itself, so the preprocessing (QuantilePieces of the non-count inputs,
    FillMissing, Normalization with the training statistics and Clip of the counts, StringLookup +
    Embedding) is the main network's code.
    """
    import keras

    network = build_network(train, numeric, categorical, config, logistic=False)
    first_dense = next(layer for layer in network.layers if isinstance(layer, keras.layers.Dense))
    return list(network.inputs), first_dense.input


def build_sequence_network(
    config: SequenceConfig,
    *,
    aggregate: tuple[list[Any], Any] | None = None,
) -> Any:
    """The uncompiled encoder: embeddings + time features -> masked GRU -> dense -> sigmoid.

    With ``aggregate`` (inputs and normalised vector of ``_aggregate_branch``) the GRU state
    is concatenated with the aggregate vector before the dense layer (the combined kind).
    """
    import keras

    types = keras.Input(shape=(config.length,), dtype="int32", name=TYPE_INPUT)
    categories = keras.Input(shape=(config.length,), dtype="int32", name=CATEGORY_INPUT)
    times = keras.Input(shape=(config.length, len(TIME_FEATURES)), dtype="float32", name=TIME_INPUT)
    type_vectors = keras.layers.Embedding(UNKNOWN_TYPE + 1, config.type_embedding, mask_zero=True)(types)
    category_vectors = keras.layers.Embedding(config.category_buckets + 2, config.category_embedding)(categories)
    steps = keras.layers.Concatenate()([type_vectors, category_vectors, times])  # carries the type mask
    state = keras.layers.GRU(config.gru_units, name="encoder")(steps)
    inputs = [types, categories, times]
    x = state
    if aggregate is not None:
        aggregate_inputs, aggregate_vector = aggregate
        inputs = [*aggregate_inputs, *inputs]
        x = keras.layers.Concatenate()([state, aggregate_vector])
    x = keras.layers.Dense(config.dense_units, activation="relu")(x)
    x = keras.layers.Dropout(config.dropout)(x)
    output = keras.layers.Dense(1, activation="sigmoid", name="propensity")(x)
    return keras.Model(inputs, output, name="combined" if aggregate is not None else "sequence")


# ---- training and prediction -----------------------------------------------------------------------------------------
@dataclass
class SequenceModel:
    """A fitted encoder (``kind`` "sequence" or "combined") with its calibration."""

    kind: str
    network: Any
    calibration: dict[str, Any]
    config: SequenceConfig
    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    report: dict[str, Any] = field(default_factory=dict)

    def inputs(self, rows: pa.Table, sequences: SequenceInputs) -> dict[str, Any]:
        """The Keras input dict of ``rows`` (profile rows, for the combined kind) and their sequences."""
        out: dict[str, Any] = sequences.as_dict()
        if self.kind == "combined":
            out.update(model_inputs(rows, self.numeric, self.categorical))
        return out

    def predict_raw(self, rows: pa.Table, sequences: SequenceInputs) -> np.ndarray:
        """The network's uncalibrated output."""
        if rows.num_rows == 0:
            return np.zeros(0, dtype=np.float64)
        return predict_network(self.network, self.inputs(rows, sequences))

    def predict(self, rows: pa.Table, sequences: SequenceInputs) -> np.ndarray:
        """Calibrated purchase probabilities (float64) of profile rows whose sequences are ``sequences``."""
        return apply_calibration(self.predict_raw(rows, sequences), self.calibration)


def predict(settings: Settings, fitted: SequenceModel, rows: pa.Table) -> np.ndarray:
    """Calibrated probabilities for rows with ``USER_ID`` and ``SNAPSHOT_HOUR``, reading their sequences from staging."""
    return fitted.predict(rows, sequence_inputs(settings, rows, fitted.config))


def _examples_key(rows: pa.Table) -> str:
    """A digest of the rows' users and snapshot hours: which sequences ``sequence_inputs`` would read."""
    digest = hashlib.sha256()
    digest.update("\x00".join(pc.cast(rows.column(USER_ID), pa.string()).to_pylist()).encode())
    hours = pc.cast(pc.cast(rows.column(SNAPSHOT_HOUR), pa.timestamp("ms", tz="UTC")), pa.int64())
    digest.update(np.asarray(pc.fill_null(hours, 0), dtype=np.int64).tobytes())
    return digest.hexdigest()


@dataclass(eq=False)
class SequenceScorer:
    """A saved encoder as a version's scorer (``artifacts.LoadedModel.network`` of the sequence kinds).

    Profile rows in, raw scores out: the rows' sequences are read from staging at each row's
    snapshot cutoff (``sequence_inputs``). The last rows' sequences are kept, so scoring the
    same users and hours again (permutation importance shuffles feature columns only) reads
    staging once.
    """

    settings: Settings
    fitted: SequenceModel
    _cached: tuple[str, SequenceInputs] | None = field(default=None, repr=False)

    def sequences(self, rows: pa.Table) -> SequenceInputs:
        """The sequences of ``rows`` (``USER_ID``, ``SNAPSHOT_HOUR``), from the cache when the rows are the same."""
        key = _examples_key(rows)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, sequence_inputs(self.settings, rows, self.fitted.config))
        return self._cached[1]

    def predict_raw(self, rows: pa.Table) -> np.ndarray:
        """The encoder's uncalibrated output for profile rows (calibration is ``artifacts.LoadedModel``'s)."""
        return self.fitted.predict_raw(rows, self.sequences(rows))


def train_sequence(
    settings: Settings,
    train: pa.Table,
    eval: pa.Table | None = None,
    *,
    kind: str = "sequence",
    numeric: Sequence[str] = (),
    categorical: Sequence[str] = (),
    config: SequenceConfig | None = None,
    model_config: ModelConfig | None = None,
    sequences: SequenceInputs | None = None,
) -> SequenceModel:
    """Fit the encoder (``kind`` "sequence") or encoder + aggregate inputs ("combined") on a training table.

    ``train`` holds ``USER_ID``, ``SNAPSHOT_HOUR``, ``labels.LABEL`` (and the feature columns
    for "combined"). The newest snapshot is the validation slice (early stopping on its AUC,
    Platt calibration on it); ``eval`` is not used for fitting, only to report its size.
    ``sequences``: precomputed ``sequence_inputs`` of ``train`` (read from staging otherwise).
    """
    import keras
    import tensorflow as tf

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    config = config or SequenceConfig()
    model_config = model_config or ModelConfig()
    keras.utils.set_random_seed(settings.seed)
    tf.config.experimental.enable_op_determinism()
    is_validation = validation_split(train)
    sequences = sequences if sequences is not None else sequence_inputs(settings, train, config)
    y = np.asarray(train.column(labels.LABEL), dtype=np.float32)
    fit_rows, val_rows = train.filter(pa.array(~is_validation)), train.filter(pa.array(is_validation))
    fit_y, val_y = y[~is_validation], y[is_validation]
    aggregate = None
    if kind == "combined":
        aggregate = _aggregate_branch(fit_rows, numeric, categorical, model_config)
    network = build_sequence_network(config, aggregate=aggregate)
    fitted = SequenceModel(
        kind, network, {}, config, tuple(numeric) if aggregate else (), tuple(categorical) if aggregate else ()
    )
    fit_in = fitted.inputs(fit_rows, sequences.take(~is_validation))
    val_in = fitted.inputs(val_rows, sequences.take(is_validation))
    class_weight = class_weights(fit_y)
    epochs = fit_network(network, (fit_in, fit_y), (val_in, val_y), class_weight, config.learning_rate, config)
    fitted.calibration = fit_calibration(predict_network(network, val_in), val_y)
    fitted.report = {
        "fit_rows": int(fit_y.size),
        "validation_rows": int(val_y.size),
        "eval_rows": None if eval is None else eval.num_rows,
        "class_weight": {str(k): v for k, v in class_weight.items()},
        "epochs": epochs,
    }
    return fitted


# ---- saving and loading ------------------------------------------------------------------------------------------------
def sequence_files(fitted: SequenceModel, scratch: Path) -> dict[str, bytes]:
    """The saved network and its metadata (kind, config, features, calibration, report) as files."""
    network_name, meta_name = sequence_file_names(fitted.kind)
    path = scratch / network_name
    fitted.network.save(path)
    meta = {
        "format": "profile_engine.model.sequence/1",
        "kind": fitted.kind,
        "config": asdict(fitted.config),
        "numeric": list(fitted.numeric),
        "categorical": list(fitted.categorical),
        "calibration": fitted.calibration,
        "report": fitted.report,
    }
    return {network_name: path.read_bytes(), meta_name: json.dumps(meta, indent=2, sort_keys=True).encode()}


def save_sequence(settings: Settings, version: str, fitted: SequenceModel) -> list[str]:
    """Add the model to the committed ``models/<version>/`` (atomically, ``update_model_dir``); the file names."""
    lake = Lake(settings.lake)
    scratch = lake.tmp_dir()
    try:
        files = sequence_files(fitted, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    update_model_dir(settings, version, files)
    return sorted(files)


def load_sequence(settings: Settings, version: str, kind: str = "sequence") -> SequenceModel:
    """Load a saved encoder of ``version`` with Keras (this imports TensorFlow; no numpy export exists)."""
    import keras

    directory = Lake(settings.lake).path(MODELS, version)
    network_name, meta_name = sequence_file_names(kind)
    meta: Mapping[str, Any] = read_json(directory / meta_name)
    network = keras.saving.load_model(directory / network_name, custom_objects=custom_layers())
    return SequenceModel(
        kind=meta["kind"],
        network=network,
        calibration=dict(meta["calibration"]),
        config=SequenceConfig(**meta["config"]),
        numeric=tuple(meta["numeric"]),
        categorical=tuple(meta["categorical"]),
        report=dict(meta.get("report") or {}),
    )
