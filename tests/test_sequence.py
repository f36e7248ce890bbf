"""Tests for profile_engine.model.sequence: the inputs read from staging (order, padding, gaps, the cutoff),
the encoder on a synthetic set whose signal is only in the order of events, determinism, and saving."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from profile_engine.config import Settings
from profile_engine.contracts.events import CART, EVENT_TYPES, PURCHASE, STAGED_SCHEMA, VIEW
from profile_engine.contracts.profiles import SNAPSHOT_HOUR, USER_ID
from profile_engine.contracts.scores import MODEL_VERSION, PROPENSITY
from profile_engine.hours import HOUR
from profile_engine.lake.storage import MANIFEST, MODELS, PROFILES, SCORES, STAGING, Lake, read_json
from profile_engine.model import artifacts, labels, promotion, registry, scoring, sequence, training
from profile_engine.model import inputs as network_inputs
from profile_engine.model import metrics as measures
from tests.test_labels import CATEGORICAL, NUMERIC, T0, make_settings, profile_table, write_snapshot
from tests.test_model import FAST as FAST_NETWORK
from tests.test_model import SMALL

TS = pa.timestamp("ms", tz="UTC")
S = datetime(2026, 11, 3, 10, tzinfo=UTC)  # the snapshot hour; its end E = 11:00
E = S + HOUR


def _stage(settings: Settings, events: list[tuple[str, str, str | None, datetime, datetime]]) -> None:
    """Stage ``(user, type, category, ts, processing hour)`` events in each user's bucket."""
    users = sorted({e[0] for e in events})
    bucket_of = {u: b for b, us in labels.users_by_bucket(users, settings.buckets).items() for u in us}
    lake = Lake(settings.lake)
    groups: dict[tuple[datetime, int], list[tuple[str, str, str | None, datetime]]] = {}
    for user, kind, category, ts, staged in events:
        groups.setdefault((staged, bucket_of[user]), []).append((user, kind, category, ts))
    for (staged, bucket), rows in groups.items():
        n = len(rows)
        table = pa.table(
            {
                "event_id": [f"{staged:%d%H}-{i}" for i in range(n)],
                "user_id": [r[0] for r in rows],
                "event_type": [r[1] for r in rows],
                "item_id": ["item"] * n,
                "category_id": [r[2] for r in rows],
                "price": [1.0] * n,
                "quantity": pa.array([1] * n, pa.int32()),
                "order_id": [None] * n,
                "ts": pa.array([r[3] for r in rows], TS),
                "session_id": [None] * n,
                "local_hour": pa.array([r[3].hour for r in rows], pa.int8()),  # a shop in UTC
                "bucket": pa.array([bucket] * n, pa.int32()),
            },
            schema=STAGED_SCHEMA,
        )
        Lake(settings.lake).write_partition(STAGING, staged, table, bucket=bucket)
    assert lake.path(STAGING).is_dir()


def _examples(rows: list[tuple[str, datetime]]) -> pa.Table:
    return pa.table({USER_ID: [r[0] for r in rows], SNAPSHOT_HOUR: pa.array([r[1] for r in rows], TS)})


def _type(name: str) -> int:
    return EVENT_TYPES.index(name) + 1


def test_sequence_inputs_keep_the_last_events_before_the_cutoff_in_order_left_padded(settings: Settings) -> None:
    """Three users: ordering and gaps (a), truncation to the last N (b), nothing before the cutoff (c);
    events at or after the snapshot end, and events staged after the snapshot hour, are left out."""
    m = timedelta(minutes=1)
    events = [
        # user a: three events before E, staged in their own hours, given out of order
        ("a", CART, "c1", S - timedelta(hours=3), S - timedelta(hours=3)),
        ("a", VIEW, "c1", S - timedelta(hours=5), S - timedelta(hours=5)),
        ("a", PURCHASE, None, E - timedelta(milliseconds=1), S),  # the last millisecond before E is in
        ("a", VIEW, "c2", E, S),  # at E (staged early through clock skew): out
        ("a", VIEW, "c2", E + 5 * m, E),  # after E: out
        ("a", CART, "c3", S + 30 * m, S + HOUR),  # ts < E but arrived after hour S (late): out
        # user b: six events, N = 4 keeps the newest four
        *[("b", VIEW, f"k{i}", S - timedelta(hours=10 - i), S - timedelta(hours=10 - i)) for i in range(6)],
        # user c: only events after the cutoff
        ("c", VIEW, "c1", E + 10 * m, E),
    ]
    _stage(settings, events)
    config = sequence.SequenceConfig(length=4)
    inputs = sequence.sequence_inputs(settings, _examples([("a", S), ("b", S), ("c", S), ("a", S - 4 * HOUR)]), config)

    a, b, c, a_early = 0, 1, 2, 3
    assert inputs.mask[a].tolist() == [False, True, True, True]
    assert inputs.event_type[a].tolist() == [0, _type(VIEW), _type(CART), _type(PURCHASE)]
    assert inputs.category[a, 0] == 0 and inputs.category[a, 3] == sequence.NULL_CATEGORY
    assert inputs.category[a, 1] == inputs.category[a, 2] >= 2  # same category, same hash bucket
    hours_to_end = np.log1p([0, 6.0, 4.0, 1 / 3_600_000])
    np.testing.assert_allclose(inputs.time[a, :, 1], np.where(inputs.mask[a], hours_to_end, 0), rtol=1e-5)
    gaps = np.log1p([0, 0, 2.0, 4.0 - 1 / 3_600_000])  # first event of the window has no previous one
    np.testing.assert_allclose(inputs.time[a, :, 0], gaps, rtol=1e-5)

    assert inputs.mask[b].all()
    assert inputs.event_type[b].tolist() == [_type(VIEW)] * 4
    np.testing.assert_allclose(inputs.time[b, :, 1], np.log1p([9.0, 8.0, 7.0, 6.0]), rtol=1e-5)  # k2..k5
    np.testing.assert_allclose(inputs.time[b, 1:, 0], np.log1p([1.0, 1.0, 1.0]), rtol=1e-5)
    assert inputs.time[b, 0, 0] == 0.0  # its predecessor k1 is outside the window

    assert not inputs.mask[c].any() and not inputs.event_type[c].any() and not inputs.time[c].any()

    # the earlier snapshot of a (end 07:00) sees only the view at 05:00
    assert inputs.event_type[a_early].tolist() == [0, 0, 0, _type(VIEW)]
    np.testing.assert_allclose(inputs.time[a_early, 3, 1], np.log1p(2.0), rtol=1e-6)


def test_sequence_inputs_of_no_examples_and_no_staging(settings: Settings) -> None:
    config = sequence.SequenceConfig(length=3)
    empty = sequence.sequence_inputs(settings, _examples([]), config)
    assert empty.event_type.shape == (0, 3) and empty.time.shape == (0, 3, 2)
    nothing = sequence.sequence_inputs(settings, _examples([("a", S)]), config)
    assert not nothing.mask.any()


# ---- training on a synthetic set whose only signal is the order of events ---------------------------------------------
LENGTH = 8


def _ordered_set(
    rng: np.random.Generator, n: int, snapshots: list[datetime]
) -> tuple[pa.Table, sequence.SequenceInputs]:
    """Every user has the same multiset of events (one cart, seven views) one hour apart; a purchase is
    likely when the cart is among the newest two events and unlikely otherwise: counts and gaps carry nothing."""
    where = rng.integers(0, LENGTH, size=n)  # position of the cart
    types = np.full((n, LENGTH), _type(VIEW), dtype=np.int32)
    types[np.arange(n), where] = _type(CART)
    p = np.where(where >= LENGTH - 2, 0.7, 0.1)
    label = (rng.random(n) < p).astype(np.int8)
    time = np.zeros((n, LENGTH, 2), dtype=np.float32)
    time[:, 1:, 0] = np.log1p(1.0)
    time[:, :, 1] = np.log1p(np.arange(LENGTH, 0, -1, dtype=np.float32))
    inputs = sequence.SequenceInputs(
        event_type=types, category=np.full((n, LENGTH), 2, np.int32), time=time, mask=np.ones((n, LENGTH), bool)
    )
    rows = pa.table(
        {
            USER_ID: [f"u{i}" for i in range(n)],
            SNAPSHOT_HOUR: pa.array([snapshots[i % len(snapshots)] for i in range(n)], TS),
            labels.LABEL: pa.array(label, pa.int8()),
            "visits": pa.array(np.full(n, 8.0)),
        }
    )
    return rows, inputs


def _shuffled(inputs: sequence.SequenceInputs, rng: np.random.Generator) -> sequence.SequenceInputs:
    order = np.argsort(rng.random(inputs.event_type.shape), axis=1)
    rows = np.arange(order.shape[0])[:, None]
    return sequence.SequenceInputs(inputs.event_type[rows, order], inputs.category, inputs.time, inputs.mask)


FAST = sequence.SequenceConfig(
    length=LENGTH, gru_units=8, dense_units=8, max_epochs=12, batch_size=64, learning_rate=0.01
)


@pytest.fixture(scope="module")
def ordered() -> dict[str, object]:
    rng = np.random.default_rng(3)
    snapshots = [S - timedelta(hours=24 * k) for k in (3, 2, 1)]
    train, train_in = _ordered_set(rng, 900, snapshots)
    test, test_in = _ordered_set(rng, 400, [S])
    return {"train": train, "train_in": train_in, "test": test, "test_in": test_in, "rng": rng}


def test_the_encoder_learns_the_order_of_events_and_a_shuffled_order_control_does_not(
    tmp_path: Path, ordered: dict[str, object]
) -> None:
    settings = Settings(lake=tmp_path / "lake", seed=7)
    train, train_in, test, test_in = ordered["train"], ordered["train_in"], ordered["test"], ordered["test_in"]
    assert isinstance(train, pa.Table) and isinstance(test, pa.Table)
    assert isinstance(train_in, sequence.SequenceInputs) and isinstance(test_in, sequence.SequenceInputs)
    y = np.asarray(test.column(labels.LABEL), dtype=np.float64)
    fitted = sequence.train_sequence(settings, train, test, config=FAST, sequences=train_in)
    p = fitted.predict(test, test_in)
    rng = np.random.default_rng(11)
    control = sequence.train_sequence(settings, train, test, config=FAST, sequences=_shuffled(train_in, rng))
    p_control = control.predict(test, _shuffled(test_in, rng))
    assert measures.auc(y, p) > 0.75, measures.auc(y, p)
    assert measures.auc(y, p) > measures.auc(y, p_control) + 0.15
    assert p.min() > 0 and p.max() < 1 and abs(p.mean() - y.mean()) < 0.08  # calibrated on the validation slice
    assert fitted.report["validation_rows"] == 300 and fitted.report["fit_rows"] == 600


def test_two_trainings_give_the_same_predictions_and_a_saved_model_predicts_the_same(
    tmp_path: Path, ordered: dict[str, object]
) -> None:
    settings = Settings(lake=tmp_path / "lake", seed=7)
    train, train_in, test, test_in = ordered["train"], ordered["train_in"], ordered["test"], ordered["test_in"]
    assert isinstance(train, pa.Table) and isinstance(test, pa.Table)
    assert isinstance(train_in, sequence.SequenceInputs) and isinstance(test_in, sequence.SequenceInputs)
    config = sequence.SequenceConfig(length=LENGTH, gru_units=4, dense_units=4, max_epochs=3, batch_size=128)
    kwargs = {"kind": "combined", "numeric": ("visits",), "config": config, "sequences": train_in}
    first = sequence.train_sequence(settings, train, **kwargs)  # type: ignore[arg-type]
    second = sequence.train_sequence(settings, train, **kwargs)  # type: ignore[arg-type]
    p = first.predict(test, test_in)
    np.testing.assert_array_equal(p, second.predict(test, test_in))
    assert first.calibration == second.calibration
    # the aggregate branch is network.build_network's preprocessing ("visits" is not a profile count: quantile pieces)
    assert "QuantilePieces" in {type(layer).__name__ for layer in first.network.layers}
    assert network_inputs.NUMERIC_INPUT in {i.name for i in first.network.inputs}

    lake = Lake(settings.lake)
    lake.write_dir(lake.path(MODELS, "v20261103T10"), [], {"version": "v20261103T10"})
    names = sequence.save_sequence(settings, "v20261103T10", first)
    assert names == ["combined.json", "combined.keras"]
    loaded = sequence.load_sequence(settings, "v20261103T10", "combined")
    assert loaded.kind == "combined" and loaded.numeric == ("visits",) and loaded.config == config
    np.testing.assert_array_equal(loaded.predict(test, test_in), p)


# ---- a sequence candidate trained, gated and scored through the pipeline's stages ---------------------------------
ORDER_USERS = 240
ORDER_HOURS = 14


def _order_lake(settings: Settings) -> list[datetime]:
    """Snapshots whose aggregate features are noise while the order of each user's events decides purchases.

    Every hour every user has one view and one cart (staged in that hour, in its user's bucket, at
    minutes 20 and 40 in random order) and a snapshot row of noise features. A user whose newest event
    at the snapshot is the cart buys in the label window with probability 0.7, else 0.05 (purchases at
    minute 5 of the next hour, before that hour's view and cart, so they are never the newest events).
    """
    lake = Lake(settings.lake)
    rng = np.random.default_rng(5)
    users = [f"u{i:04d}" for i in range(ORDER_USERS)]
    snapshots = [T0 + i * HOUR for i in range(ORDER_HOURS)]
    events: list[tuple[str, str, str | None, datetime, datetime]] = []
    for hour in snapshots:
        write_snapshot(lake, hour, profile_table(hour, users, rng))
        cart_last = rng.random(ORDER_USERS) < 0.5
        buys = rng.random(ORDER_USERS) < np.where(cart_last, 0.7, 0.05)
        for i, user in enumerate(users):
            first, second = (VIEW, CART) if cart_last[i] else (CART, VIEW)
            events.append((user, first, "c1", hour + timedelta(minutes=20), hour))
            events.append((user, second, "c1", hour + timedelta(minutes=40), hour))
            if buys[i]:
                events.append((user, PURCHASE, "c1", hour + HOUR + timedelta(minutes=5), hour + HOUR))
    _stage(settings, events)
    return snapshots


ORDER_SEQUENCE = sequence.SequenceConfig(length=6, gru_units=8, dense_units=8, max_epochs=15, learning_rate=0.01)


@pytest.fixture(scope="module")
def order_lake(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The lake above and the version trained (with the sequence candidates on) and gated at its last hour."""
    settings = replace(make_settings(tmp_path_factory.mktemp("order")), sequence_candidates=True)
    hour = _order_lake(settings)[-1]
    trained = training.train_challenger(
        settings,
        hour,
        force=True,
        numeric=NUMERIC,
        categorical=CATEGORICAL,
        training_config=SMALL,
        model_config=FAST_NETWORK,
        sequence_config=ORDER_SEQUENCE,
        run_id="test",
    )
    gated = promotion.evaluate_and_promote(settings, hour, run_id="test", n_boot=50, importance_rows=200)
    return {"settings": settings, "hour": hour, "trained": trained, "gated": gated}


def test_a_forced_training_with_the_setting_on_trains_and_saves_every_kind(order_lake: dict[str, Any]) -> None:
    settings, trained = order_lake["settings"], order_lake["trained"]
    version = trained["version"]
    directory = Lake(settings.lake).path(MODELS, version)

    assert trained["status"] == "trained"
    assert artifacts.version_kinds(settings, version) == [
        "ensemble",
        "model",
        "lightgbm",
        "sequence",
        "combined",
        "baseline",
    ]
    assert {"sequence.keras", "sequence.json", "combined.keras", "combined.json"} <= {
        f["name"] for f in read_json(directory / MANIFEST)["files"]
    }
    metrics = read_json(directory / registry.METRICS_FILE)
    assert {"sequence", "combined", "sequence_uncalibrated", "combined_uncalibrated"} <= set(metrics["eval"])
    assert set(metrics["training"]["sequences"]) == {"sequence", "combined"}
    assert set(read_json(directory / artifacts.DECILES_FILE)) == set(registry.MODEL_KINDS)
    # the order of events is the only signal: the encoder finds it, the aggregate network cannot
    assert metrics["eval"]["sequence"]["auc"] > 0.75 > metrics["eval"]["model"]["auc"] + 0.1
    card = (directory / registry.CARD_FILE).read_text()
    assert "| sequence |" in card and "| combined |" in card


def test_the_gate_promotes_a_sequence_kind_that_wins_on_the_same_rows(order_lake: dict[str, Any]) -> None:
    settings, gated = order_lake["settings"], order_lake["gated"]

    assert gated["status"] == "promoted", gated["reasons"]
    assert gated["kind"] in registry.SEQUENCE_KINDS and gated["candidate"] == gated["kind"]
    assert set(gated["candidates"]) == {"network", "ensemble", "lightgbm", "sequence", "combined", "baseline"}
    assert not gated["candidates"]["network"]["promote"]  # noise features: AUC below the floor
    evaluation = read_json(Lake(settings.lake).path(MODELS, gated["version"], registry.EVALUATION_FILE))
    assert [c["kind"] for c in evaluation["candidates"]] == list(registry.MODEL_KINDS)
    assert evaluation["rows"] == ORDER_USERS  # every candidate was scored on the same evaluation rows
    entry = registry.champion_as_of(settings, order_lake["hour"])
    assert entry is not None and registry.entry_kind(entry) == gated["kind"]


def test_scoring_with_a_sequence_champion_reads_the_users_events_at_the_hour(order_lake: dict[str, Any]) -> None:
    settings, hour, kind = order_lake["settings"], order_lake["hour"], order_lake["gated"]["kind"]
    lake = Lake(settings.lake)

    summaries = [scoring.score_profiles(settings, hour, bucket) for bucket in range(2)]
    scores = scoring.read_scores(lake, hour)

    assert [s["kind"] for s in summaries] == [kind, kind] and {s["engine"] for s in summaries} == {"keras"}
    assert set(scores.column(MODEL_VERSION).to_pylist()) == {registry.kind_label(registry.model_version(hour), kind)}
    assert scores.num_rows == ORDER_USERS and scores.column(PROPENSITY).null_count == 0
    # the users whose newest event at the hour is the cart are the ones scored high
    staged = pa.concat_tables(
        lake.read(STAGING, hour, b) for b in range(settings.buckets) if lake.committed(STAGING, hour, b)
    )
    newest = staged.sort_by([("ts", "ascending")]).to_pylist()
    last_type = {row["user_id"]: row["event_type"] for row in newest}
    y = np.array([last_type[u] == CART for u in scores.column(USER_ID).to_pylist()], dtype=float)
    assert measures.auc(y, np.asarray(scores.column(PROPENSITY))) > 0.9
    profiles = lake.read(PROFILES, hour, 0).sort_by(USER_ID)
    loaded = artifacts.load_model(settings, registry.model_version(hour), kind)
    np.testing.assert_allclose(
        np.asarray(lake.read(SCORES, hour, 0).column(PROPENSITY)), loaded.predict(profiles), rtol=1e-6
    )


def test_the_sequence_setting_is_off_by_default_and_read_from_the_environment() -> None:
    assert Settings().sequence_candidates is False
    assert Settings.from_env({"PROFILE_ENGINE_SEQUENCE_CANDIDATES": "true"}).sequence_candidates is True
    assert Settings.from_env({"PROFILE_ENGINE_SEQUENCE_CANDIDATES": "False"}).sequence_candidates is False
    with pytest.raises(ValueError, match="PROFILE_ENGINE_SEQUENCE_CANDIDATES"):
        Settings.from_env({"PROFILE_ENGINE_SEQUENCE_CANDIDATES": "maybe"})
