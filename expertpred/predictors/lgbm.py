"""LightGBM: one binary booster per expert (one-vs-rest multi-label), shared or per layer.

``shared=True`` fits one booster per expert over all source layers, with the layer as a
categorical feature; ``shared=False`` fits one per (source layer, expert). One binned
``lgb.Dataset`` is built per group and only its labels change between experts, so binning
is paid once. One-vs-rest beats a softmax multiclass over k-times duplicated rows by a
factor k in tree-building work and models each expert's marginal P(selected) directly.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..features import DENSE_PARTS, EXTRA_PARTS, FeatureBatch, dense_features, multihot
from .base import Predictor
from .gate import GateFeatures

log = logging.getLogger(__name__)


class LightGBMPredictor(GateFeatures, Predictor, name="lightgbm"):
    """Gradient-boosted trees over :func:`~expertpred.features.dense_features`."""

    min_rows = 50

    def __init__(self, shared: bool = False, n_estimators: int = 40, num_leaves: int = 15,
                 learning_rate: float = 0.15, min_child_samples: int = 20,
                 max_rows: int = 60000, use_hidden: bool = False, all_layers: bool = True,
                 gguf_path: str = "", seed: int = 0, n_jobs: int = 1) -> None:
        self.shared = shared  # one model for all layers (layer = categorical feature)
        self.n_estimators = n_estimators
        self.num_leaves = num_leaves
        self.learning_rate = learning_rate
        self.min_child_samples = min_child_samples
        self.max_rows = max_rows  # training rows are subsampled to this many
        self.use_hidden = use_hidden  # hidden states as features (wide: D columns)
        self.all_layers = all_layers  # every layer's experts, this and the previous token
        self.gguf_path = gguf_path  # model file: gate look-ahead scores become features too
        self.seed = seed
        self.n_jobs = n_jobs  # 1: fastest for small data, no spin-waiting on a busy box

    def _parts(self) -> tuple[str, ...]:
        base = tuple(p for p in DENSE_PARTS if self.use_hidden or p != "hidden")
        return base + (EXTRA_PARTS if self.all_layers else ())

    def _design(self, x: FeatureBatch) -> np.ndarray:
        return np.concatenate([dense_features(x, self._parts(), layer_onehot=False),
                               *self._gate_columns(x)], axis=1)

    def _params(self) -> dict[str, Any]:
        return {"objective": "binary", "num_leaves": self.num_leaves,
                "learning_rate": self.learning_rate,
                "min_data_in_leaf": self.min_child_samples, "verbose": -1,
                "num_threads": self.n_jobs, "seed": self.seed, "deterministic": True,
                "force_col_wise": True, "feature_fraction": 0.8, "bagging_fraction": 0.8,
                "bagging_freq": 1, "max_bin": 63}

    def _fit(self, data: FeatureBatch) -> None:
        import lightgbm as lgb

        rng = np.random.default_rng(self.seed)
        if len(data) > self.max_rows:
            data = data.take(np.sort(rng.permutation(len(data))[: self.max_rows]))
        e = data.model.n_expert
        self._fit_gate(data)
        x_all = self._design(data)
        y_all = multihot(data.targets, e)
        groups = [-1] if self.shared else sorted(int(v) for v in np.unique(data.layer))
        models: list[str] = []
        consts = np.full((len(groups), e), np.nan, dtype=np.float32)
        for gi, g in enumerate(groups):
            x, y = (x_all, y_all) if g < 0 else (x_all[data.layer == g], y_all[data.layer == g])
            y = np.ascontiguousarray(y.T)  # (E, n): one contiguous label row per expert
            ds = lgb.Dataset(x, label=y[0], categorical_feature=[0] if g < 0 else "auto",
                             params=self._params(),
                             free_raw_data=False).construct()
            for j in range(e):
                pos, n = float(y[j].sum()), y.shape[1]
                if pos < 2 or pos > n - 2:  # (almost) constant label: no booster
                    consts[gi, j] = np.log((pos + 0.5) / (n - pos + 0.5))
                    models.append("")
                    continue
                ds.set_label(y[j])
                b = lgb.train(self._params(), ds, num_boost_round=self.n_estimators)
                models.append(b.model_to_string())
        self.groups_ = np.asarray(groups, dtype=np.int64)
        self.constants_ = consts
        self.models_ = models
        self._boosters = None

    def _live(self) -> list[Any]:
        import lightgbm as lgb

        if getattr(self, "_boosters", None) is None:
            self._boosters = [lgb.Booster(model_str=s) if s else None for s in self.models_]
        return self._boosters

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        e = self.model_.n_expert
        boosters = self._live()
        feats = self._design(x)
        out = np.zeros((len(x), e), dtype=np.float32)
        for gi, g in enumerate(self.groups_.tolist()):
            rows = np.ones(len(x), bool) if g < 0 else x.layer == g
            if not rows.any():
                continue
            xr = feats[rows]
            for j in range(e):
                b = boosters[gi * e + j]
                if b is None:
                    out[rows, j] = self.constants_[gi, j]
                else:
                    out[rows, j] = b.predict(xr, raw_score=True, num_threads=self.n_jobs)
        if not self.shared:  # rows of a layer never seen in training: popularity-free zero
            seen = np.isin(x.layer, self.groups_)
            out[~seen] = 0.0
        return out

    def _get_state(self) -> dict[str, Any]:
        blob = "\x00".join(self.models_).encode()
        return {"groups_": self.groups_, "constants_": self.constants_, **self._gate_state(),
                "models_blob_": np.frombuffer(blob, dtype=np.uint8).copy()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.groups_ = state["groups_"]
        self.constants_ = state["constants_"]
        self.gate_routers_, self.gate_norms_ = state["gate_routers_"], state["gate_norms_"]
        self.models_ = bytes(state["models_blob_"]).decode().split("\x00")
        self._boosters = None
