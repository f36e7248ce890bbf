"""Gradient-boosted trees (LightGBM), a candidate trained on the network's rows and features; LightGBM is
imported inside functions only. docs/model.md (Model).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profile_engine.model.inputs import categorical_values, category_strings, vocabulary

LIGHTGBM_FILE = "lightgbm.txt"
LIGHTGBM_SPEC = "lightgbm.json"
FORMAT = "profile_engine.lightgbm/1"


@dataclass(frozen=True)
class GBMConfig:
    """LightGBM knobs: small trees, shrinkage and L2 so a few thousand rows do not overfit."""

    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 20
    lambda_l2: float = 1.0
    feature_fraction: float = 0.9
    max_rounds: int = 400
    early_stopping_rounds: int = 30
    max_categories: int = 500  # as the network's vocabulary


@dataclass
class GBMModel:
    """A trained booster with the feature layout and category vocabularies it was trained on."""

    booster: Any  # lightgbm.Booster
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    categories: dict[str, list[str]]
    info: dict[str, Any] = field(default_factory=dict)  # parameters, best iteration, rounds

    def matrix(self, table: pa.Table) -> np.ndarray:
        """The float64 feature matrix: numeric columns, then one code column per categorical (NaN = missing)."""
        return feature_matrix(table, self.numeric, self.categorical, self.categories)

    def predict(self, table: pa.Table) -> np.ndarray:
        """Uncalibrated probabilities (float64) of profile rows."""
        if table.num_rows == 0:
            return np.zeros(0, dtype=np.float64)
        return np.asarray(self.booster.predict(self.matrix(table), num_threads=1), dtype=np.float64)

    def files(self) -> dict[str, bytes]:
        """``lightgbm.txt`` and ``lightgbm.json`` (the same booster gives the same bytes)."""
        spec = {
            "format": FORMAT,
            "numeric": list(self.numeric),
            "categorical": list(self.categorical),
            "categories": self.categories,
            **self.info,
        }
        text = self.booster.model_to_string(num_iteration=-1)
        return {
            LIGHTGBM_FILE: text.encode(),
            LIGHTGBM_SPEC: json.dumps(spec, indent=2, sort_keys=True).encode(),
        }

    @classmethod
    def from_bytes(cls, spec_bytes: bytes, model_bytes: bytes) -> GBMModel:
        """Load the files written by ``files``; ``ValueError`` for another format."""
        import lightgbm

        spec = json.loads(spec_bytes)
        if spec.get("format") != FORMAT:
            raise ValueError(f"{LIGHTGBM_SPEC}: format {spec.get('format')!r}, expected {FORMAT!r}")
        info = {k: v for k, v in spec.items() if k not in ("format", "numeric", "categorical", "categories")}
        return cls(
            booster=lightgbm.Booster(model_str=model_bytes.decode()),
            numeric=tuple(spec["numeric"]),
            categorical=tuple(spec["categorical"]),
            categories={k: list(v) for k, v in spec["categories"].items()},
            info=info,
        )


def feature_matrix(
    table: pa.Table, numeric: Sequence[str], categorical: Sequence[str], categories: Mapping[str, Sequence[str]]
) -> np.ndarray:
    """Numeric features as float64 (nulls NaN) and each categorical as its vocabulary index (unseen: NaN)."""
    out = np.empty((table.num_rows, len(numeric) + len(categorical)), dtype=np.float64)
    for i, column in enumerate(numeric):
        out[:, i] = pc.cast(table.column(column), pa.float64()).to_numpy(zero_copy_only=False)
    for j, column in enumerate(categorical):
        codes = pc.index_in(category_strings(table, column), value_set=pa.array(categories[column], pa.string()))
        out[:, len(numeric) + j] = pc.cast(codes, pa.float64()).to_numpy(zero_copy_only=False)
    return out


def fit_gbm(
    fit_rows: pa.Table,
    fit_y: np.ndarray,
    validation_rows: pa.Table,
    validation_y: np.ndarray,
    numeric: Sequence[str],
    categorical: Sequence[str],
    *,
    seed: int,
    threads: int = 1,
    config: GBMConfig | None = None,
) -> GBMModel:
    """Fit LightGBM on ``fit_rows`` with early stopping on the validation slice's AUC; deterministic.

    ``deterministic=True``, ``force_col_wise``, a fixed seed and ``threads`` threads give
    the same trees on a rerun (for the same thread count). No class weights: the output
    stays close to a probability, and the caller's Platt fit does the rest.
    """
    import lightgbm

    config = config or GBMConfig()
    categories = {c: vocabulary(categorical_values(fit_rows, c), config.max_categories) for c in categorical}
    params: dict[str, Any] = {
        "objective": "binary",
        "metric": "auc",
        "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves,
        "min_data_in_leaf": config.min_data_in_leaf,
        "lambda_l2": config.lambda_l2,
        "feature_fraction": config.feature_fraction,
        "seed": seed,
        "deterministic": True,
        "force_col_wise": True,
        "num_threads": threads,
        "verbose": -1,
    }
    columns = [*numeric, *categorical]
    codes = list(range(len(numeric), len(columns)))

    def dataset(rows: pa.Table, y: np.ndarray, reference: Any = None) -> Any:
        return lightgbm.Dataset(
            feature_matrix(rows, numeric, categorical, categories),
            label=np.asarray(y, dtype=np.float64),
            feature_name=[f"f{i}" for i in range(len(columns))],  # LightGBM rejects some characters in names
            categorical_feature=codes,
            reference=reference,
            free_raw_data=True,
        )

    train_set = dataset(fit_rows, fit_y)
    valid_set = dataset(validation_rows, validation_y, reference=train_set)
    booster = lightgbm.train(
        params,
        train_set,
        num_boost_round=config.max_rounds,
        valid_sets=[valid_set],
        valid_names=["validation"],
        callbacks=[lightgbm.early_stopping(config.early_stopping_rounds, verbose=False)],
    )
    best = int(booster.best_iteration) or booster.current_iteration()
    # Keep only the best iterations: the saved text model then scores exactly what early stopping chose.
    kept = lightgbm.Booster(model_str=booster.model_to_string(num_iteration=best))
    return GBMModel(
        booster=kept,
        numeric=tuple(numeric),
        categorical=tuple(categorical),
        categories=categories,
        info={
            "features": columns,
            "best_iteration": best,
            "rounds": booster.current_iteration(),
            "params": params,
            "lightgbm_version": lightgbm.__version__,
        },
    )
