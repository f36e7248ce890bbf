"""Tests for profile_engine.model.inference: the export's refusals, StringLookup semantics and stable files.

Scores of trained versions against Keras are tested in test_model.py (one shared fit).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from profile_engine.model import inference
from profile_engine.model import network as networks


def _fill_missing() -> type:
    return networks.custom_layers()["FillMissing"]  # type: ignore[no-any-return]


def _numeric_model(hidden: Callable[[Any], Any]) -> Any:
    import keras

    numeric = keras.Input(shape=(3,), dtype="float32", name="numeric")
    x = _fill_missing()()(numeric)
    x = hidden(x)
    return keras.Model(numeric, keras.layers.Dense(1, activation="sigmoid", name="propensity")(x))


def _unknown_layer(x: Any) -> Any:
    import keras

    return keras.layers.BatchNormalization(name="batch_norm")(x)


def _tanh_dense(x: Any) -> Any:
    import keras

    return keras.layers.Dense(4, activation="tanh", name="hidden_tanh")(x)


def _normalization_inverted(x: Any) -> Any:
    import keras

    return keras.layers.Normalization(mean=np.zeros(6), variance=np.ones(6), invert=True, name="denorm")(x)


@pytest.mark.parametrize(
    ("hidden", "layer", "cls", "why"),
    [
        (_unknown_layer, "batch_norm", "BatchNormalization", "no numpy equivalent"),
        (_tanh_dense, "hidden_tanh", "Dense", "activation 'tanh'"),
        (_normalization_inverted, "denorm", "Normalization", "invert=True"),
    ],
)
def test_export_refuses_a_layer_it_cannot_reproduce_and_names_it(
    hidden: Callable[[Any], Any], layer: str, cls: str, why: str
) -> None:
    # Arrange
    network = _numeric_model(hidden)

    # Act
    with pytest.raises(inference.UnsupportedLayer) as refused:
        inference.export_network(network, _fill_missing(), source_sha256="0" * 64)

    # Assert
    message = str(refused.value)
    assert f"layer {layer!r} ({cls})" in message and why in message


@pytest.mark.parametrize("output_mode", ["int", "one_hot"])
def test_string_lookup_follows_keras_oov_semantics(output_mode: str) -> None:
    # Arrange: "" is a real token (nulls become ""), "[UNK]" is the OOV token's text but not in the vocabulary
    import keras

    text = keras.Input(shape=(1,), dtype="string", name="cat__segment")
    lookup = keras.layers.StringLookup(vocabulary=["", "a", "b"], output_mode=output_mode, name="lookup")
    network = keras.Model(text, lookup(text))
    values = np.array(["a", "", "zzz", "[UNK]", "b", "A", " a"], dtype=object).reshape(-1, 1)
    expected = np.asarray(network.predict(keras.ops.convert_to_tensor(values), verbose=0))

    # Act
    spec, weights = inference.export_network(network, _fill_missing(), source_sha256="0" * 64)
    exported = inference.InferenceNetwork.from_bytes(inference.spec_bytes(spec), weights)
    actual = exported.predict({"cat__segment": pa.array(values.ravel(), pa.string())})

    # Assert
    assert spec["nodes"][-1]["tokens"] == ["", "a", "b"] and spec["nodes"][-1]["oov_index"] == 0
    assert actual.tolist() == expected.astype(np.float32).reshape(actual.shape).tolist()


def test_exported_files_are_byte_stable_and_round_trip() -> None:
    # Arrange
    arrays = {"dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "dense/bias": np.ones(3, np.float32)}

    # Act
    first, second = inference.npz_bytes(arrays), inference.npz_bytes(dict(reversed(list(arrays.items()))))
    with np.load(io.BytesIO(first), allow_pickle=False) as loaded:
        back = {key: loaded[key] for key in loaded.files}

    # Assert
    assert first == second
    assert set(back) == set(arrays) and all(np.array_equal(back[k], v) for k, v in arrays.items())
    assert inference.inference_file_names("model.keras") == ("model.inference.json", "model.inference.npz")


def test_predict_checks_its_inputs() -> None:
    # Arrange
    network = _numeric_model(lambda x: x)
    spec, weights = inference.export_network(network, _fill_missing(), source_sha256="0" * 64)
    exported = inference.InferenceNetwork.from_bytes(inference.spec_bytes(spec), weights)

    # Act / Assert
    with pytest.raises(KeyError, match="numeric"):
        exported.predict({})
    with pytest.raises(ValueError, match="shape"):
        exported.predict({"numeric": np.zeros((2, 4), np.float32)})
    with pytest.raises(ValueError, match="format"):
        inference.InferenceNetwork({**spec, "format": "other/9"}, {})


def test_an_export_written_before_the_layout_move_still_loads_and_scores_the_same() -> None:
    # Arrange: versions trained before the package moved into subpackages wrote the format name
    # "profile_engine.inference/1" (the module's old path); the layer specs are the same, without the later clip op
    network = _numeric_model(lambda x: x)
    spec, weights = inference.export_network(network, _fill_missing(), source_sha256="0" * 64)
    rows = {"numeric": np.array([[0.5, -1.0, 2.0], [3.0, 0.0, -0.25]], np.float32)}
    older = {**spec, "format": "profile_engine.inference/1"}

    # Act
    current = inference.InferenceNetwork.from_bytes(inference.spec_bytes(spec), weights).predict(rows)
    before_move = inference.InferenceNetwork.from_bytes(inference.spec_bytes(older), weights).predict(rows)

    # Assert
    assert np.array_equal(current, before_move)
    assert "profile_engine.inference/1" in inference.READ_FORMATS and inference.FORMAT in inference.READ_FORMATS


def test_the_quantile_encoded_network_scores_in_numpy_as_in_keras() -> None:
    # Arrange: the network's default encoding (quantile pieces for the recency, money and peak hour, the counts
    # log1p-standardised); rows with NaN, values below the lowest edge, above the top edge, and new values of
    # the peak hour, constant in training (no pieces, only its is-missing indicator)
    import keras

    from profile_engine.model import inputs as network_inputs

    keras.utils.set_random_seed(6)
    rng = np.random.default_rng(8)
    n = 500
    numeric = ["count_cart_24h", "recency_hours", "monetary_total", "peak_hour_local", "session_count"]
    train = pa.table(
        {
            "count_cart_24h": rng.poisson(1.0, n),
            "recency_hours": pa.array(rng.exponential(200.0, n), mask=rng.random(n) < 0.2),
            "monetary_total": rng.gamma(2.0, 30.0, n),
            "peak_hour_local": np.full(n, 1.0),
            "session_count": rng.poisson(4.0, n),
            "label": rng.integers(0, 2, n),
        }
    )
    network = networks.build_network(train, numeric, [], networks.ModelConfig(hidden_units=(8,)), logistic=False)
    rows = pa.concat_tables(
        [
            train.slice(0, 50).drop_columns(["label"]),
            pa.table(
                {
                    "count_cart_24h": pa.array([None, 0, 10_000, 2], pa.int64()),
                    "recency_hours": [None, -10.0, 1e9, 0.5],
                    "monetary_total": [None, -1e6, 1e12, 30.0],
                    "peak_hour_local": [None, 0.0, 1e9, 23.0],
                    "session_count": pa.array([3, None, 1_000_000, 0], pa.int64()),
                }
            ),
        ]
    )
    layers = networks.custom_layers()

    # Act
    spec, weights = inference.export_network(
        network, layers["FillMissing"], source_sha256="0" * 64, clip_class=layers["Clip"], custom=layers
    )
    exported = inference.InferenceNetwork.from_bytes(inference.spec_bytes(spec), weights)
    expected = networks.predict_network(network, network_inputs.model_inputs(rows, numeric, []))
    actual = exported.predict(network_inputs.numpy_inputs(rows, numeric, []))

    # Assert
    assert {"quantile_pieces", "select"} <= {node["op"] for node in spec["nodes"]}
    pieces = next(node for node in spec["nodes"] if node["op"] == "quantile_pieces")
    assert pieces["columns"] == [1, 2, 3] and 3 not in pieces["piece_columns"]
    assert np.isfinite(actual).all()
    assert actual == pytest.approx(expected, abs=1e-6)


def test_export_without_the_quantile_layer_class_refuses_it() -> None:
    # Arrange: a network using QuantilePieces, exported without the package's custom layers
    import keras

    numeric = keras.Input(shape=(2,), dtype="float32", name="numeric")
    x = networks.custom_layers()["QuantilePieces"]([0], [[0.0, 1.0, 2.0]], name="pieces")(numeric)
    network = keras.Model(numeric, keras.layers.Dense(1, activation="sigmoid")(x))

    # Act / Assert
    with pytest.raises(inference.UnsupportedLayer, match="layer 'pieces' \\(QuantilePieces\\)"):
        inference.export_network(network, _fill_missing(), source_sha256="0" * 64)


def _pieces_reference(x: np.ndarray, columns: list[int], edges: list[list[float]]) -> np.ndarray:
    """QuantilePieces element by element in float32 scalars: clip((x - left) / width, 0, 1), NaN as 0, then
    the is-missing indicators (the layer's formula, written independently of the numpy pass)."""
    rows = []
    for row in x:
        pieces: list[np.float32] = []
        for column, column_edges in zip(columns, edges, strict=True):
            value = np.float32(0) if np.isnan(row[column]) else np.float32(row[column])
            kept = np.asarray(column_edges, dtype=np.float32)
            for left, right in zip(kept[:-1], kept[1:], strict=True):
                with np.errstate(invalid="ignore", over="ignore"):
                    position = (value - left) / np.float32(right - left)
                pieces.append(min(max(position, np.float32(0)), np.float32(1)))
        rows.append([*pieces, *(np.float32(np.isnan(row[c])) for c in columns)])
    return np.asarray(rows, dtype=np.float32)


def test_quantile_pieces_equal_the_formula_bit_for_bit_at_edges_nan_and_beyond_every_edge() -> None:
    # Arrange: a QuantilePieces layer alone (a column with one edge has only its indicator; a column not
    # encoded); inputs at every edge and the float32 values either side of it, NaN, below and above all
    # edges, infinities, signed zeros, a subnormal and the largest float32
    import keras

    layers = networks.custom_layers()
    edges = [[-1.5, 0.0, 0.1, 2.0, 1e6], [3.0], [0.25, 0.5, 0.75]]
    columns = [0, 2, 3]
    numeric = keras.Input(shape=(4,), dtype="float32", name="numeric")
    network = keras.Model(numeric, layers["QuantilePieces"](columns, edges, name="pieces")(numeric))
    f32 = np.finfo(np.float32)
    special = [np.nan, -np.inf, np.inf, -0.0, 0.0, float(f32.smallest_subnormal), float(f32.max), -float(f32.max)]
    near = [
        float(v)
        for e in (edge for column_edges in edges for edge in column_edges)
        for v in (
            np.nextafter(np.float32(e), np.float32(-np.inf)),
            np.float32(e),
            np.nextafter(np.float32(e), np.float32(np.inf)),
        )
    ]
    values = np.asarray([*special, *near, -7.0, 0.05, 1.0, 3e5, 2e6], dtype=np.float32)
    rng = np.random.default_rng(3)
    x = np.stack([rng.permutation(values) for _ in range(4)], axis=1)  # each column sees every value
    spec, weights = inference.export_network(network, layers["FillMissing"], source_sha256="0" * 64, custom=layers)
    exported = inference.InferenceNetwork.from_bytes(inference.spec_bytes(spec), weights)

    # Act
    with np.errstate(over="ignore"):  # (the largest float32 - left) / width overflows to inf, clipped to 1
        actual = exported.predict({"numeric": x})
    keras_out = np.asarray(network(x))

    # Assert: the formula bit for bit (no NaN anywhere); Keras (TensorFlow flushes subnormals) to 1e-6
    expected = _pieces_reference(x, columns, edges)
    assert actual.shape == expected.shape == (len(x), 4 + 0 + 2 + 3)
    assert np.array_equal(actual.view(np.uint32) << 1, expected.view(np.uint32) << 1)  # -0.0 == 0.0
    assert actual == pytest.approx(keras_out, abs=1e-6)


def test_the_forward_pass_in_encoding_blocks_is_bit_for_bit_the_pass_in_one_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: the default network (quantile pieces, log1p-standardised counts, an embedded category) on rows
    # with NaN and out-of-range values, predicted in batches of 40 rows (a shorter last one)
    import keras

    from profile_engine.model import inputs as network_inputs

    keras.utils.set_random_seed(4)
    rng = np.random.default_rng(5)
    n = 300
    numeric = ["count_cart_24h", "recency_hours", "monetary_total"]
    train = pa.table(
        {
            "count_cart_24h": rng.poisson(1.0, n),
            "recency_hours": pa.array(rng.exponential(200.0, n), mask=rng.random(n) < 0.2),
            "monetary_total": rng.gamma(2.0, 30.0, n),
            "segment": rng.choice(["a", "b", "c"], n),
            "label": rng.integers(0, 2, n),
        }
    )
    network = networks.build_network(
        train, numeric, ["segment"], networks.ModelConfig(hidden_units=(8,)), logistic=False
    )
    layers = networks.custom_layers()
    spec, weights = inference.export_network(
        network, layers["FillMissing"], source_sha256="0" * 64, clip_class=layers["Clip"], custom=layers
    )
    exported = inference.InferenceNetwork.from_bytes(inference.spec_bytes(spec), weights)
    rows = train.drop_columns(["label"]).slice(0, 230)
    rows = rows.set_column(1, "recency_hours", pa.array([None, -1e9, 1e12, *([5.0] * 227)], pa.float64()))
    inputs = network_inputs.numpy_inputs(rows, numeric, ["segment"])

    # Act
    monkeypatch.setattr(inference, "ENCODE_ROWS", 1_000_000)
    whole = exported.predict(inputs, batch_rows=40)
    monkeypatch.setattr(inference, "ENCODE_ROWS", 7)
    blocks = exported.predict(inputs, batch_rows=40)

    # Assert
    assert whole.shape == (230,) and np.isfinite(whole).all()
    assert np.array_equal(whole.view(np.uint32), blocks.view(np.uint32))
