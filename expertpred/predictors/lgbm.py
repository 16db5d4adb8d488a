"""LightGBM: one binary booster per expert (one-vs-rest multi-label), shared or per layer.

Trained with lightgbm; scored with numpy only (:mod:`expertpred.predictors.forest`: the
boosters flattened to node arrays right after fitting), so evaluation, the artifact and the
online plugin run the same code.

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

from ..features import FeatureBatch, ModelInfo, design_parts, multihot
from .base import Arrays, Predictor, Spec
from .checks import ArtifactCheck
from .design import Design
from .forest import Forest, check_trees, flatten_boosters, group_forests

log = logging.getLogger(__name__)


def constant_label(pos: float, n: int) -> float | None:
    """The log-odds score of an expert picked in ``pos`` of ``n`` rows when that is (almost)
    always or never, where a booster has nothing to learn; None otherwise."""
    if pos < 2 or pos > n - 2:
        return float(np.log((pos + 0.5) / (n - pos + 0.5)))
    return None


class LightGBMPredictor(Predictor, name="lightgbm"):
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

    @property
    def uses_hidden(self) -> bool:
        return self.design_.needs_hidden

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
        self.design_ = Design.fit(data, design_parts(self.use_hidden, self.all_layers), False,
                                  self.gguf_path, "lightgbm")
        x_all = self.design_.matrix(data)
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
                const = constant_label(float(y[j].sum()), y.shape[1])
                if const is not None:  # (almost) constant label: no booster
                    consts[gi, j] = const
                    models.append("")
                    continue
                ds.set_label(y[j])
                b = lgb.train(self._params(), ds, num_boost_round=self.n_estimators)
                models.append(b.model_to_string())
        self.set_boosters(groups, consts, models)

    def set_boosters(self, groups: list[int], constants: np.ndarray, models: list[str]) -> None:
        """The learned state from trained boosters (model strings, group-major, "" where the
        label was constant): shared by this fit and the Dask one
        (:mod:`expertpred.learn.dask_lgbm`)."""
        self.groups_ = np.asarray(groups, dtype=np.int64)
        self.constants_ = constants
        self.trees_, self.depths_, _ = flatten_boosters(models, len(groups),
                                                        constants.shape[1])

    # --- scoring: numpy only ----------------------------------------------------------------
    def _ready(self) -> None:
        super()._ready()
        self._forests: list[Forest | None] = group_forests(self.trees_, self.depths_,
                                                           self.model_.n_expert)
        self._constants64 = self.constants_.astype(np.float64)
        self._max_rows = 256  # rows per chunk: bounds the (rows, nodes) work arrays

    def _group_scores(self, gi: int, feats: np.ndarray) -> np.ndarray:
        forest = self._forests[gi]
        out = np.broadcast_to(self._constants64[gi], (len(feats), self.model_.n_expert)).copy()
        if forest is None:
            return out
        trees = self.trees_["has_trees"][gi]
        for i in range(0, len(feats), self._max_rows):
            raw = forest.raw_scores(feats[i:i + self._max_rows])
            out[i:i + self._max_rows, trees] = raw[:, trees]
        return out

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        feats = self.design_.matrix(x)
        if self.shared:
            return self._group_scores(0, feats).astype(np.float32)
        # rows of a layer never seen in training: popularity-free zero
        out = np.zeros((len(x), self.model_.n_expert), dtype=np.float32)
        if len(x) == 1:
            gi = np.flatnonzero(self.groups_ == int(x.layer[0]))
            if len(gi):
                out[:] = self._group_scores(int(gi[0]), feats)
            return out
        for gi, g in enumerate(self.groups_.tolist()):
            rows = x.layer == g
            if rows.any():
                out[rows] = self._group_scores(gi, feats[rows])
        return out

    # --- the artifact ------------------------------------------------------------------------
    @classmethod
    def check_artifact(cls, c: ArtifactCheck, m: ModelInfo, spec: Spec, a: Arrays) -> None:
        f = Design.check_artifact(c, m, spec, a)
        shared = c.typed(spec, "shared", bool, "spec")
        # shared: one group, -1; else one group per MoE layer seen in training
        groups = c.array(a, "groups", "i", (1,) if shared else (None,), lo=-1 if shared else 0,
                         hi=-1 if shared else m.n_moe - 1)
        g = len(groups)
        if g == 0 or len(np.unique(groups)) != g:
            raise c.fail(f"array '{c.prefix}groups' {groups.tolist()[:8]}, expected distinct "
                         "layers")
        depth = c.typed(spec, "depth", list, "spec")
        if len(depth) != g or not all(isinstance(x, int) and 0 <= x <= 4096 for x in depth):
            raise c.fail(f"spec.depth {depth!r:.80}, expected {g} tree depths")
        consts = c.array(a, "constants", "f", (g, m.n_expert), finite=False)
        has_trees = c.array(a, "has_trees", "b", (g, m.n_expert))
        if not np.isfinite(consts[~has_trees]).all():  # NaN where a booster decides: unused
            raise c.fail(f"array '{c.prefix}constants' is not finite for an expert without trees")
        bounds = c.array(a, "group_nodes", "i", (g, 2), lo=0)
        n = c.array(a, "node_feature", "i", (None,), lo=0, hi=max(f - 1, 0)).shape[0]
        if len(bounds) and (bounds[0, 0] != 0 or bounds[-1, 1] != n
                            or (bounds[:, 0] > bounds[:, 1]).any()
                            or (bounds[1:, 0] != bounds[:-1, 1]).any()):
            raise c.fail(f"array 'group_nodes' does not split 0..{n} into consecutive ranges")
        c.array(a, "node_threshold", "f", (n,), finite=False)
        if np.isnan(a["node_threshold"]).any():
            raise c.fail("array 'node_threshold' has NaN, expected numbers")
        left = c.array(a, "node_left", "i", (n,), lo=0, hi=n - 1)
        right = c.array(a, "node_right", "i", (n,), lo=0, hi=n - 1)
        c.array(a, "node_value", "f", (n,))
        c.array(a, "node_default_left", "b", (n,))
        c.array(a, "node_missing", "i", (n,), lo=0, hi=2)
        c.array(a, "node_is_cat", "b", (n,))
        c.array(a, "node_cat_bits", "u", (n, None))
        tree_group = c.array(a, "tree_group", "i", (None,), lo=0, hi=g - 1)
        t = len(tree_group)
        roots = c.array(a, "tree_root", "i", (t,), lo=0, hi=max(n - 1, 0))
        experts = c.array(a, "tree_expert", "i", (t,), lo=0, hi=m.n_expert - 1)
        if t and not has_trees[tree_group, experts].all():
            raise c.fail(f"array '{c.prefix}tree_expert': a tree for an expert 'has_trees' says "
                         "has none")
        check_trees(c, bounds, left, right, roots, tree_group, depth)

    def _to_artifact(self) -> tuple[Spec, Arrays]:
        spec = {**self.design_.spec(), "shared": bool(self.shared), "depth": self.depths_,
                "objective": "binary",
                "score": "raw (sum of leaf values, float64, cast to float32)"}
        arrays = {**self.design_.arrays(), **self.trees_, "groups": self.groups_,
                  "constants": self.constants_}
        return spec, arrays

    def _from_artifact(self, spec: Spec, arrays: Arrays) -> None:
        self.design_ = Design.from_artifact(self.model_, spec, arrays, "lightgbm")
        self.groups_, self.constants_ = arrays["groups"], arrays["constants"]
        self.depths_ = [int(v) for v in spec["depth"]]
        self.trees_ = {k: v for k, v in arrays.items()
                       if k.startswith(("node_", "tree_")) or k in ("has_trees", "group_nodes")}

    def _from_legacy(self, state: dict[str, Any]) -> None:
        models = bytes(state["models_blob_"]).decode().split("\x00")
        trees, depths, n_features = flatten_boosters(models, len(state["groups_"]),
                                                     self.model_.n_expert)
        parts = design_parts(self.use_hidden, self.all_layers)
        gate = {"gate_routers": state["gate_routers_"], "gate_norms": state["gate_norms_"]}
        if n_features < 0:  # every booster constant: the width without hidden columns
            n_features = Design(self.model_, parts, False, 0, **gate).n_features_without_hidden
        spec = {"parts": list(parts), "layer_onehot": False, "depth": depths,
                "n_features": n_features}
        self._from_artifact(spec, {**gate, **trees, "groups": state["groups_"],
                                   "constants": state["constants_"]})
