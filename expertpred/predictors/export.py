"""Exported predictors: one self-describing file per predictor, scored with numpy only.

``expertpred export --predictor DIR_OR_FILE --out P.artifact`` (or :func:`export_saved`)
turns a trained predictor — every offset ``d`` of one rung of the ladder — into one
artifact; :func:`load_artifact` reads it back **without torch, lightgbm or sklearn** and
predicts exactly what the in-memory predictor predicts (``tests/test_export.py``).

Using it (this is what :func:`expertpred.prefetch.plugin.load_predictors` calls for a file)::

    from expertpred.predictors.export import load_artifact

    art = load_artifact("lgbm.artifact", gguf_path="model.gguf")  # checks the identity
    art.offsets                     # (1, 2, 3, 4)
    art.by_d[1].predict_topk(x, 2)  # x: FeatureBatch, e.g. OnlineFeatures(...).features(1)
    art.topk(1, x, 2)               # the plugin's PredictorProvider interface
    # art.model / art.history_decay / art.needs_hidden: build OnlineFeatures with these

Artifact format (version :data:`FORMAT_VERSION`): a NumPy ``.npz`` (zip, no pickle) with

- ``__header__``: a JSON string — ``format``, ``format_version``, ``predictor`` (registry
  name), ``params`` (constructor arguments), ``model`` (:class:`ModelInfo`: arch, n_layer,
  moe_layers, n_expert, n_expert_used, n_embd, GGUF sha256), ``features`` (the feature
  builder's parameters: ``history_decay``), ``needs_hidden``, and ``offsets``: for each
  ``d`` its scorer ``kind``, ``spec`` (e.g. the design-matrix parts, the MLP activations)
  and the dtype / shape of every array it owns;
- ``d<d>.<array>``: those arrays (tables, router weights, flattened trees, MLP weights).

Scorer kinds (:data:`SCORERS`): ``random``, ``popularity``, ``transition``,
``previous-token``, ``previous-token+transition``, ``gate-lookahead``, ``lightgbm`` (trees
from ``Booster.dump_model()`` flattened to node arrays — split feature, threshold,
children, leaf values, decision type incl. categorical bitsets, missing type and
default_left — evaluated for all trees at once), ``mlp`` (Linear weights, ReLU, per-layer
heads, float32) and ``oracle``: a marker. The oracle reads the true future, so it has no
weights: offline it scores the labels of a labelled :class:`FeatureBatch`; online the
plugin resolves it from a recorded trace (``expertpred run --mode oracle --oracle-trace``).

Identity: with ``gguf_path`` the artifact's model must have the GGUF's shapes (n_layer,
moe_layers, n_expert, n_expert_used, n_embd — always enforced) and sha256 (one-line error
naming both prefixes; ``allow_sha_mismatch=True`` / ``--allow-sha-mismatch`` accepts
another file of the same shapes, and the loaded set then reports the GGUF's identity as
``model`` and the original as ``trained_model``).
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..errors import ExpertPredError
from ..features import DenseRow, FeatureBatch, FeatureConfig, ModelInfo, dense_features

# numpy-only kernels shared with the in-memory predictors (these modules import no torch,
# lightgbm or sklearn at import time; tests/test_export.py checks it in a subprocess)
from .baselines import _by_layer, _rank_hot
from .gate import gate_scores

if TYPE_CHECKING:
    from . import Predictor

log = logging.getLogger(__name__)

FORMAT = "expertpred.predictor-artifact"
FORMAT_VERSION = 1
HEADER = "__header__"
SUFFIX = ".artifact"
CACHE_ROWS = 1 << 16  # one-row answers cached per offset (lookup predictors), then reset


# --- numpy helpers (mirror the in-memory predictors operation for operation) ------------------

def _normalised_current(x: FeatureBatch) -> np.ndarray:
    w = x.current_multihot()
    w /= np.maximum(w.sum(axis=1, keepdims=True), 1.0)
    return w


def _gate(x: FeatureBatch, routers: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """float32 (n, E): ``(hidden_l / g_l * g_(l+d)) @ W_(l+d)ᵀ`` (gate look-ahead)."""
    if x.hidden is None:
        raise ExpertPredError("exported predictor uses gate look-ahead: the features have no "
                              "hidden states (router input)")
    return gate_scores(x, routers, norms)


# --- scorers: numpy-only prediction of one kind ------------------------------------------------

SCORERS: dict[str, type[Scorer]] = {}


class Scorer:
    """Scores of one exported offset; subclasses register with ``kind=...``."""

    kind: ClassVar[str] = ""
    arrays: ClassVar[tuple[str, ...]] = ()  # names this kind must find in the artifact
    needs_hidden: bool = False

    def __init_subclass__(cls, kind: str | None = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if kind is not None:
            cls.kind = kind
            SCORERS[kind] = cls

    def __init__(self, spec: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                 model: ModelInfo) -> None:
        self.spec = dict(spec)
        self.model = model
        for name in self.arrays:
            setattr(self, name, arrays[name])
        self._setup()

    def _setup(self) -> None:
        pass

    def scores(self, x: FeatureBatch) -> np.ndarray:
        raise NotImplementedError

    def row_key(self, x: FeatureBatch) -> Hashable | None:
        """For a one-row batch: a key that determines its scores (discrete inputs only), so
        that repeated inputs are answered from a cache; None = not cacheable."""
        return None


class RandomScorer(Scorer, kind="random"):
    """Seeded uniform scores (the same stream as the ``random`` predictor)."""

    def scores(self, x: FeatureBatch) -> np.ndarray:
        rng = np.random.default_rng(int(self.spec["seed"]))
        return rng.random((len(x), self.model.n_expert), dtype=np.float32)

    def row_key(self, x: FeatureBatch) -> Hashable | None:
        return 0  # the same seeded stream for every call: one row is always the same


class PopularityScorer(Scorer, kind="popularity"):
    arrays = ("freq",)

    def scores(self, x: FeatureBatch) -> np.ndarray:
        return self.freq[x.target_layer]

    def row_key(self, x: FeatureBatch) -> Hashable | None:
        return int(x.layer[0])


class TransitionScorer(Scorer, kind="transition"):
    arrays = ("table",)

    def scores(self, x: FeatureBatch) -> np.ndarray:
        if self.spec["source"] == "probs":
            z = x.logits - x.logits.max(axis=1, keepdims=True)
            w = np.exp(z)
            w /= w.sum(axis=1, keepdims=True)
        else:
            w = _normalised_current(x)
        return _by_layer(w.astype(np.float32), x.layer.astype(np.int64), self.table)

    def row_key(self, x: FeatureBatch) -> Hashable | None:
        if self.spec["source"] == "probs":
            return None
        li = int(x.layer[0])
        return li, x.experts[0, li].tobytes()


class PreviousTokenScorer(Scorer, kind="previous-token"):
    arrays = ("freq",)

    def scores(self, x: FeatureBatch) -> np.ndarray:
        tl = x.target_layer
        prev = x.prev_experts[np.arange(len(x)), tl]
        return _rank_hot(prev, self.model.n_expert) + 1e-3 * self.freq[tl]

    def row_key(self, x: FeatureBatch) -> Hashable | None:
        li = int(x.layer[0])
        return li, x.prev_experts[0, li + x.d].tobytes()


class PreviousTokenTransitionScorer(Scorer, kind="previous-token+transition"):
    arrays = ("table", "freq")

    def _setup(self) -> None:
        k, e = self.model.n_expert_used, self.model.n_expert
        self._ranks = np.arange(k, 0, -1, dtype=np.float32)  # _rank_hot's k - rank
        self._p = np.zeros(e + 1, dtype=np.float32)  # [e]: trash slot for padding ids
        self._w = np.zeros(e + 1, dtype=np.float32)
        self._one = np.float32(1.0)

    def _scores_row(self, x: FeatureBatch) -> np.ndarray:
        """One row, the same float32 operations as :meth:`scores` without (n, ·) temporaries
        (a cache miss of the online path: ~4× cheaper)."""
        e = self.model.n_expert
        li = int(x.layer[0])
        tl = li + x.config.d
        ids = x.prev_experts[0, tl]
        p, w = self._p, self._w
        p.fill(0.0)
        p[np.where(ids >= 0, ids, e)] = self._ranks
        pv = p[:e] / max(p[:e].sum(), self._one)
        cur = x.experts[0, li]
        w.fill(0.0)
        w[np.where(cur >= 0, cur, e)] = 1.0
        wv = w[None, :e] / max(w[:e].sum(), self._one)
        t = wv @ self.table[li]
        t = t + 1e-4 * self.freq[tl]
        wt = float(self.spec["weight"])
        return wt * pv + (1.0 - wt) * t

    def scores(self, x: FeatureBatch) -> np.ndarray:
        if len(x) == 1:
            return self._scores_row(x)
        tl = x.target_layer
        p = _rank_hot(x.prev_experts[np.arange(len(x)), tl], self.model.n_expert)
        p /= np.maximum(p.sum(axis=1, keepdims=True), 1.0)
        t = _by_layer(_normalised_current(x), x.layer.astype(np.int64), self.table)
        t = t + 1e-4 * self.freq[tl]
        w = float(self.spec["weight"])
        return w * p + (1.0 - w) * t

    def row_key(self, x: FeatureBatch) -> Hashable | None:
        li = int(x.layer[0])
        return li, x.experts[0, li].tobytes(), x.prev_experts[0, li + x.d].tobytes()


class GateScorer(Scorer, kind="gate-lookahead"):
    arrays = ("routers", "norms")
    needs_hidden = True

    def scores(self, x: FeatureBatch) -> np.ndarray:
        return _gate(x, self.routers, self.norms)


class OracleScorer(Scorer, kind="oracle"):
    """A marker: the true future is not a weight. Offline it reads the labels."""

    def scores(self, x: FeatureBatch) -> np.ndarray:
        if x.targets is None:
            raise ExpertPredError("oracle artifact: needs the true experts; offline pass "
                                  "labelled features, online use the plugin's oracle mode "
                                  "with a recorded trace (--mode oracle --oracle-trace)")
        return _rank_hot(x.targets, self.model.n_expert)


class _DesignScorer(Scorer):
    """Learned models: the design matrix of :func:`dense_features` (+ gate columns)."""

    def _setup(self) -> None:
        self.parts = tuple(self.spec["parts"])
        self.layer_onehot = bool(self.spec["layer_onehot"])
        self.uses_gate = bool(self.spec["gate"])
        self.n_features = int(self.spec["n_features"])
        self.needs_hidden = bool(self.spec["uses_hidden"]) or self.uses_gate

        self._rows: dict[int, DenseRow] = {}  # one-row encoders by hidden width

    def design(self, x: FeatureBatch) -> np.ndarray:
        if len(x) == 1 and not self.uses_gate:  # online: one preallocated row, same values
            n_h = 0 if x.hidden is None or "hidden" not in self.parts else x.hidden.shape[1]
            enc = self._rows.get(n_h)
            if enc is None:
                enc = self._rows[n_h] = DenseRow(self.model, self.parts, self.layer_onehot,
                                                 n_hidden=n_h)
            if enc.width == self.n_features:
                return enc.row(x)
        cols = [dense_features(x, self.parts, layer_onehot=self.layer_onehot)]
        if self.uses_gate:
            cols.append(_gate(x, self.gate_routers, self.gate_norms))
        z = np.concatenate(cols, axis=1) if len(cols) > 1 else cols[0]
        if z.shape[1] != self.n_features:
            raise ExpertPredError(f"exported {self.kind}: {z.shape[1]} input features, trained "
                                  f"with {self.n_features} (hidden states present in one and "
                                  "not the other?)")
        return z


class MLPScorer(_DesignScorer, kind="mlp"):
    """Standardise, ``relu(W0 z + b0)``, ``relu(W1 a + b1)``, per-layer linear head."""

    arrays = ("mean", "std", "w0", "b0", "w1", "b1", "w2", "b2", "gate_routers", "gate_norms")

    def _setup(self) -> None:
        super()._setup()
        acts = tuple(self.spec["activations"])
        if acts != ("relu", "relu", "linear"):
            raise ExpertPredError(f"exported mlp: activations {list(acts)}, this loader "
                                  "knows relu, relu, linear")
        self.w2l = self.w2.reshape(-1, self.model.n_expert, self.w2.shape[1])
        self.b2l = self.b2.reshape(-1, self.model.n_expert)

        # one-row path: transposed weights made contiguous once, preallocated activations
        self.w0t = np.ascontiguousarray(self.w0.T)
        self.w1t = np.ascontiguousarray(self.w1.T)
        self._z = np.empty((1, self.w0.shape[1]), dtype=np.float32)
        self._a0 = np.empty((1, self.w0.shape[0]), dtype=np.float32)
        self._a1 = np.empty((1, self.w1.shape[0]), dtype=np.float32)
        self.w2t = np.ascontiguousarray(self.w2l.transpose(0, 2, 1))  # (L, H, E) heads

    def scores(self, x: FeatureBatch) -> np.ndarray:
        if len(x) == 1:
            return self._scores_row(x)
        z = (self.design(x) - self.mean) / self.std
        a = np.maximum(z @ self.w0.T + self.b0, 0.0)
        a = np.maximum(a @ self.w1.T + self.b1, 0.0)
        lay = x.layer.astype(np.int64)
        return (np.einsum("nh,neh->ne", a, self.w2l[lay]) + self.b2l[lay]).astype(np.float32)

    def _scores_row(self, x: FeatureBatch) -> np.ndarray:
        """The same operations on one row, into preallocated buffers (no temporaries)."""
        z = self.design(x)
        if z.shape[1] != self._z.shape[1]:
            raise ExpertPredError(f"exported mlp: {z.shape[1]} input features, trained with "
                                  f"{self._z.shape[1]}")
        np.subtract(z, self.mean, out=self._z)
        np.divide(self._z, self.std, out=self._z)
        a0, a1 = self._a0, self._a1
        np.matmul(self._z, self.w0t, out=a0)
        np.add(a0, self.b0, out=a0)
        np.maximum(a0, 0.0, out=a0)
        np.matmul(a0, self.w1t, out=a1)
        np.add(a1, self.b1, out=a1)
        np.maximum(a1, 0.0, out=a1)
        li = int(x.layer[0])
        out = a1 @ self.w2t[li]
        out += self.b2l[li]
        return out


MISSING = {"None": 0, "Zero": 1, "NaN": 2}
K_ZERO = 1e-35  # LightGBM's kZeroThreshold


@dataclass
class _Forest:
    """The trees of one LightGBM group (all experts), as flat node arrays (local ids)."""

    feature: np.ndarray  # int32 (N,) split feature; 0 for leaves
    threshold: np.ndarray  # float64 (N,)
    left: np.ndarray  # int32 (N,) leaves point to themselves
    right: np.ndarray  # int32 (N,)
    value: np.ndarray  # float64 (N,) leaf value, 0 for internal nodes
    roots: np.ndarray  # int32 (T,)
    expert_of: np.ndarray  # (T, E) float64 0/1: which expert's score a tree adds to
    depth: int
    default_left: np.ndarray  # bool (N,)
    missing: np.ndarray  # int8 (N,) MISSING values
    cat_bits: np.ndarray | None  # uint32 (N, W) categories going left; None: no cat split
    is_cat: np.ndarray | None  # bool (N,)
    zero_missing: bool = False
    nan_missing: bool = False

    def raw_row(self, x: np.ndarray) -> np.ndarray | None:
        """float64 (1, E) for one row of numeric splits without NaN, else None (use
        :meth:`raw_scores`). Same decisions, fewer passes: gather the 1-D row once."""
        if self.cat_bits is not None or self.zero_missing:
            return None
        x64 = x[0].astype(np.float64)
        if np.isnan(x64).any():  # NaN: missing-value rules of the general path
            return None
        nxt = np.where(x64[self.feature] <= self.threshold, self.left, self.right)
        cur = self.roots
        for _ in range(self.depth):
            cur = nxt[cur]
        return (self.value[cur] @ self.expert_of)[None]

    def raw_scores(self, x: np.ndarray) -> np.ndarray:
        """float64 (n, E): the sum of each expert's trees (LightGBM's raw score)."""
        if len(x) == 1:
            raw = self.raw_row(x)
            if raw is not None:
                return raw
        v = x[:, self.feature].astype(np.float64)  # (n, N)
        nan = np.isnan(v)
        has_nan = bool(nan.any())
        v0 = np.where(nan, 0.0, v) if has_nan else v
        go_left = v0 <= self.threshold
        if self.zero_missing:
            zero = (self.missing == 1) & (np.abs(v0) <= K_ZERO)
            go_left = np.where(zero, self.default_left, go_left)
        if self.nan_missing and has_nan:
            go_left = np.where((self.missing == 2) & nan, self.default_left, go_left)
        if self.cat_bits is not None:
            iv = np.where(nan, -1, v0).astype(np.int64)
            ok = (iv >= 0) & (iv < 32 * self.cat_bits.shape[1])
            ivc = np.where(ok, iv, 0)
            node = np.broadcast_to(np.arange(len(self.feature)), iv.shape)
            bit = (self.cat_bits[node, ivc >> 5] >> (ivc & 31).astype(np.uint32)) & 1
            go_left = np.where(self.is_cat, ok & (bit == 1), go_left)
        nxt = np.where(go_left, self.left, self.right)  # (n, N): each node's next node
        if len(x) == 1:  # 1-D gathers: the online case
            nxt1, cur1 = nxt[0], self.roots
            for _ in range(self.depth):
                cur1 = nxt1[cur1]
            return (self.value[cur1] @ self.expert_of)[None]
        cur = np.broadcast_to(self.roots, (len(x), len(self.roots)))
        for _ in range(self.depth):
            cur = np.take_along_axis(nxt, cur, axis=1)
        return self.value[cur] @ self.expert_of


class LightGBMScorer(_DesignScorer, kind="lightgbm"):
    """One-vs-rest boosters per (group, expert) as flattened trees; constants elsewhere."""

    arrays = ("groups", "constants", "has_trees", "node_feature", "node_threshold",
              "node_left", "node_right", "node_value", "node_default_left", "node_missing",
              "node_is_cat", "node_cat_bits", "tree_root", "tree_group", "tree_expert",
              "group_nodes", "gate_routers", "gate_norms")

    def _setup(self) -> None:
        super()._setup()
        self.shared = bool(self.spec["shared"])
        e = self.model.n_expert
        self.forests: list[_Forest | None] = []
        for gi in range(len(self.groups)):
            lo, hi = (int(v) for v in self.group_nodes[gi])
            trees = np.flatnonzero(self.tree_group == gi)
            if len(trees) == 0:
                self.forests.append(None)
                continue
            is_cat = self.node_is_cat[lo:hi]
            miss = self.node_missing[lo:hi]
            expert_of = np.zeros((len(trees), e), dtype=np.float64)
            expert_of[np.arange(len(trees)), self.tree_expert[trees]] = 1.0
            self.forests.append(_Forest(
                feature=self.node_feature[lo:hi].astype(np.intp),
                threshold=self.node_threshold[lo:hi],
                left=self.node_left[lo:hi] - lo, right=self.node_right[lo:hi] - lo,
                value=self.node_value[lo:hi], roots=(self.tree_root[trees] - lo).astype(np.intp),
                expert_of=expert_of, depth=int(self.spec["depth"][gi]),
                default_left=self.node_default_left[lo:hi], missing=miss,
                cat_bits=self.node_cat_bits[lo:hi] if is_cat.any() else None,
                is_cat=is_cat if is_cat.any() else None,
                zero_missing=bool((miss == 1).any()), nan_missing=bool((miss == 2).any())))
        self.constants64 = self.constants.astype(np.float64)
        self._max_rows = 256  # rows per chunk: bounds the (rows, nodes) work arrays

    def _group_scores(self, gi: int, feats: np.ndarray) -> np.ndarray:
        forest = self.forests[gi]
        out = np.broadcast_to(self.constants64[gi], (len(feats), self.model.n_expert)).copy()
        if forest is None:
            return out
        trees = self.has_trees[gi]
        for i in range(0, len(feats), self._max_rows):
            raw = forest.raw_scores(feats[i:i + self._max_rows])
            out[i:i + self._max_rows, trees] = raw[:, trees]
        return out

    def scores(self, x: FeatureBatch) -> np.ndarray:
        feats = self.design(x)
        if self.shared:
            return self._group_scores(0, feats).astype(np.float32)
        out = np.zeros((len(x), self.model.n_expert), dtype=np.float32)
        if len(x) == 1:
            gi = np.flatnonzero(self.groups == int(x.layer[0]))
            if len(gi):
                out[:] = self._group_scores(int(gi[0]), feats)
            return out
        for gi, g in enumerate(self.groups.tolist()):
            rows = x.layer == g
            if rows.any():
                out[rows] = self._group_scores(gi, feats[rows])
        return out


# --- the loaded artifact -----------------------------------------------------------------------

class ExportedPredictor:
    """One offset ``d`` of an artifact: ``predict_scores`` / ``predict_topk`` like a
    :class:`~expertpred.predictors.Predictor` (same inputs, same outputs), numpy only."""

    def __init__(self, name: str, scorer: Scorer, model: ModelInfo,
                 feature_config: FeatureConfig) -> None:
        self.name = name
        self.scorer = scorer
        self.model_ = model
        self.feature_config_ = feature_config
        self.needs_hidden = scorer.needs_hidden
        self._seen_model: ModelInfo | None = None
        self._seen_config: FeatureConfig | None = None
        # one-row answers of scorers with discrete inputs (row_key): exact, bounded
        self._scores_cache: dict[Hashable, np.ndarray] = {}
        self._topk_cache: dict[tuple[Hashable, int], np.ndarray] = {}

    @property
    def d(self) -> int:
        return self.feature_config_.d

    def _check(self, x: FeatureBatch) -> None:
        if x.model is not self._seen_model:  # shapes only; identity is checked at load
            m, o = self.model_, x.model
            if (m.moe_layers, m.n_expert, m.n_expert_used) != (o.moe_layers, o.n_expert,
                                                               o.n_expert_used):
                m.check_same(o, f"exported {self.name} predictor")
            self._seen_model = o
        if x.config is self._seen_config:  # OnlineFeatures reuses one config per d
            return
        if x.config == self.feature_config_:
            self._seen_config = x.config
        else:
            raise ExpertPredError(f"exported {self.name}: features built with d={x.d}, "
                                  f"history_decay={x.config.history_decay}; artifact expects "
                                  f"d={self.d}, history_decay={self.feature_config_.history_decay}")

    def predict_scores(self, x: FeatureBatch) -> np.ndarray:
        """float32 (n, E) scores for the experts of layer ``l + d``, higher = more likely."""
        self._check(x)
        if len(x) == 0:
            return np.zeros((0, self.model_.n_expert), dtype=np.float32)
        key = self.scorer.row_key(x) if len(x) == 1 else None
        if key is None:
            return np.ascontiguousarray(self.scorer.scores(x), dtype=np.float32)
        got = self._scores_cache.get(key)
        if got is None:
            got = np.ascontiguousarray(self.scorer.scores(x), dtype=np.float32)
            if len(self._scores_cache) >= CACHE_ROWS:
                self._scores_cache.clear()
            self._scores_cache[key] = got
        return got.copy()

    def predict_topk(self, x: FeatureBatch, k: int) -> np.ndarray:
        """int64 (n, k) expert ids, best first (ties: lower id first)."""
        if not 1 <= k <= self.model_.n_expert:
            raise ExpertPredError(f"k={k}: expected 1..{self.model_.n_expert}")
        key = self.scorer.row_key(x) if len(x) == 1 else None
        if key is not None:
            self._check(x)
            got = self._topk_cache.get((key, k))
            if got is not None:
                return got.copy()
        elif len(x) == 1:  # online, not cacheable (learned models): no copies, 1-D sort
            self._check(x)
            s = self.scorer.scores(x)[0]
            if s.dtype != np.float32:
                s = s.astype(np.float32)
            return np.argsort(-s, kind="stable")[None, :k].astype(np.int64, copy=False)
        s = self.predict_scores(x)
        top = np.argsort(-s, axis=1, kind="stable")[:, :k].astype(np.int64)
        if key is not None:
            if len(self._topk_cache) >= CACHE_ROWS:
                self._topk_cache.clear()
            self._topk_cache[(key, k)] = top.copy()
        return top

    def __repr__(self) -> str:
        return f"ExportedPredictor({self.name!r}, d={self.d}, kind={self.scorer.kind!r})"


@dataclass
class ExportedPredictorSet:
    """A loaded artifact: one :class:`ExportedPredictor` per offset, and the plugin's
    :class:`~expertpred.prefetch.plugin.PredictorProvider` interface (``topk(d, x, k)``)."""

    by_d: dict[int, ExportedPredictor]
    model: ModelInfo  # the model to run on (the GGUF's after an allowed sha mismatch)
    history_decay: float
    needs_hidden: bool
    name: str  # registry name of the exported predictor
    source: str = ""  # the artifact path
    header: dict[str, Any] = field(default_factory=dict)
    trained_model: ModelInfo | None = None  # the model it was trained on

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(sorted(self.by_d))

    def topk(self, d: int, x: FeatureBatch, k: int) -> np.ndarray:
        """int64 (k,) experts of layer ``l + d`` for the one row of ``x``, best first."""
        return self.by_d[d].predict_topk(x, k).reshape(-1)[:k]

    def __getitem__(self, d: int) -> ExportedPredictor:
        return self.by_d[d]

    def keys(self) -> Any:
        return self.by_d.keys()


# --- export: predictor → (kind, spec, arrays) ---------------------------------------------------

Exported = tuple[str, dict[str, Any], dict[str, np.ndarray]]
EXPORTERS: dict[str, Callable[[Any], Exported]] = {}


def _exporter(*names: str) -> Callable[[Callable[[Any], Exported]], Callable[[Any], Exported]]:
    def reg(fn: Callable[[Any], Exported]) -> Callable[[Any], Exported]:
        for n in names:
            EXPORTERS[n] = fn
        return fn
    return reg


def _f32(a: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


@_exporter("random")
def _export_random(p: Any) -> Exported:
    return "random", {"seed": int(p.seed)}, {}


@_exporter("popularity", "previous-token")
def _export_freq(p: Any) -> Exported:
    return p.name, {}, {"freq": _f32(p.freq_)}


@_exporter("transition")
def _export_transition(p: Any) -> Exported:
    return "transition", {"source": str(p.source)}, {"table": _f32(p.table_)}


@_exporter("previous-token+transition")
def _export_prev_transition(p: Any) -> Exported:
    return (p.name, {"weight": float(p.weight_)},
            {"table": _f32(p.table_), "freq": _f32(p.freq_)})


@_exporter("gate-lookahead")
def _export_gate(p: Any) -> Exported:
    return "gate-lookahead", {}, {"routers": _f32(p.routers_), "norms": _f32(p.norms_)}


@_exporter("oracle")
def _export_oracle(p: Any) -> Exported:
    return "oracle", {"resolved_by": "recorded trace (plugin oracle mode)"}, {}


def _design_spec(p: Any, parts: tuple[str, ...], layer_onehot: bool,
                 n_features: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    m: ModelInfo = p.model_
    gate = _f32(p.gate_routers_)
    widths = {"layer": m.n_moe if layer_onehot else 1, "logits": m.n_expert,
              "current": m.n_expert, "prev_target": m.n_expert, "prev_source": m.n_expert,
              "history": m.n_expert, "position": 1, "hidden": 0,
              "current_all": m.n_moe * m.n_expert, "prev_all": m.n_moe * m.n_expert}
    without_hidden = sum(widths[q] for q in parts) + (m.n_expert if gate.size else 0)
    uses_hidden = "hidden" in parts and n_features > without_hidden
    spec = {"parts": list(parts), "layer_onehot": layer_onehot, "gate": bool(gate.size),
            "n_features": int(n_features), "uses_hidden": bool(uses_hidden),
            "builder": "expertpred.features.dense_features"}
    return spec, {"gate_routers": gate, "gate_norms": _f32(p.gate_norms_)}


@_exporter("mlp")
def _export_mlp(p: Any) -> Exported:
    parts = tuple(q for q in _dense_parts() if p.use_hidden or q != "hidden")
    parts += _extra_parts() if p.all_layers else ()
    spec, arrays = _design_spec(p, parts, True, int(p.n_features_))
    spec["activations"] = ["relu", "relu", "linear"]
    spec["head"] = "per source layer: rows l*E..(l+1)*E of the last Linear"
    arrays.update({"mean": _f32(p.mean_), "std": _f32(p.std_)})
    for i, w in enumerate(p.weights_):
        arrays[f"{'wb'[i % 2]}{i // 2}"] = _f32(w)
    return "mlp", spec, arrays


def _dense_parts() -> tuple[str, ...]:
    from ..features import DENSE_PARTS

    return DENSE_PARTS


def _extra_parts() -> tuple[str, ...]:
    from ..features import EXTRA_PARTS

    return EXTRA_PARTS


def _flatten_tree(root: Mapping[str, Any], nodes: list[dict[str, Any]]) -> int:
    """Append a dumped tree's nodes (preorder, global ids) to ``nodes``; returns its depth.

    A leaf's children are itself, so walking ``depth`` steps from any root ends on a leaf.
    """
    stack: list[tuple[Mapping[str, Any], int, int]] = [(root, -1, 0)]  # node, parent slot, depth
    depth = 0
    while stack:
        node, parent, dep = stack.pop()
        idx = len(nodes)
        if parent >= 0:
            slot = nodes[parent // 2]
            slot["left" if parent % 2 == 0 else "right"] = idx
        depth = max(depth, dep)
        if "split_feature" in node:
            rec = {"feature": int(node["split_feature"]), "left": -1, "right": -1,
                   "value": 0.0, "default_left": bool(node.get("default_left", True)),
                   "missing": MISSING[str(node.get("missing_type", "None"))]}
            if node.get("decision_type", "<=") == "==":
                rec["cats"] = [int(c) for c in str(node["threshold"]).split("||") if c != ""]
                rec["threshold"] = 0.0
            elif node.get("decision_type", "<=") == "<=":
                rec["threshold"] = float(node["threshold"])
            else:
                raise ExpertPredError(f"lightgbm tree: decision_type "
                                      f"{node.get('decision_type')!r}, expected <= or ==")
            nodes.append(rec)
            stack.append((node["right_child"], 2 * idx + 1, dep + 1))
            stack.append((node["left_child"], 2 * idx, dep + 1))
        else:
            nodes.append({"feature": 0, "threshold": 0.0, "left": idx, "right": idx,
                          "value": float(node["leaf_value"]), "default_left": True,
                          "missing": 0})
    return depth


@_exporter("lightgbm")
def _export_lightgbm(p: Any) -> Exported:
    import lightgbm as lgb

    parts = tuple(q for q in _dense_parts() if p.use_hidden or q != "hidden")
    parts += _extra_parts() if p.all_layers else ()
    e = p.model_.n_expert
    nodes: list[dict[str, Any]] = []
    tree_root: list[int] = []
    tree_group: list[int] = []
    tree_expert: list[int] = []
    group_nodes: list[tuple[int, int]] = []
    depths: list[int] = []
    has_trees = np.zeros((len(p.groups_), e), dtype=bool)
    n_features = -1
    for gi in range(len(p.groups_)):
        lo, depth = len(nodes), 0
        for j in range(e):
            s = p.models_[gi * e + j]
            if not s:
                continue
            dump = lgb.Booster(model_str=s).dump_model()
            if dump.get("num_tree_per_iteration", 1) != 1 or dump.get("average_output"):
                raise ExpertPredError("lightgbm export: expected one binary tree per iteration")
            n_features = int(dump["max_feature_idx"]) + 1
            has_trees[gi, j] = True
            for t in dump["tree_info"]:
                tree_root.append(len(nodes))
                tree_group.append(gi)
                tree_expert.append(j)
                depth = max(depth, _flatten_tree(t["tree_structure"], nodes))
        group_nodes.append((lo, len(nodes)))
        depths.append(depth)
    if n_features < 0:  # every booster constant: the design width is still recorded
        n_features = 0
    n = len(nodes)
    max_cat = max((max(r["cats"], default=0) for r in nodes if "cats" in r), default=-1)
    words = max(1, (max_cat + 32) // 32) if max_cat >= 0 else 1
    cat_bits = np.zeros((n, words), dtype=np.uint32)
    is_cat = np.zeros(n, dtype=bool)
    for i, r in enumerate(nodes):
        if "cats" in r:
            is_cat[i] = True
            for c in r["cats"]:
                cat_bits[i, c >> 5] |= np.uint32(1 << (c & 31))
    arrays = {
        "groups": np.asarray(p.groups_, dtype=np.int64), "constants": _f32(p.constants_),
        "has_trees": has_trees,
        "node_feature": np.array([r["feature"] for r in nodes], dtype=np.int32),
        "node_threshold": np.array([r["threshold"] for r in nodes], dtype=np.float64),
        "node_left": np.array([r["left"] for r in nodes], dtype=np.int32),
        "node_right": np.array([r["right"] for r in nodes], dtype=np.int32),
        "node_value": np.array([r["value"] for r in nodes], dtype=np.float64),
        "node_default_left": np.array([r["default_left"] for r in nodes], dtype=bool),
        "node_missing": np.array([r["missing"] for r in nodes], dtype=np.int8),
        "node_is_cat": is_cat, "node_cat_bits": cat_bits,
        "tree_root": np.array(tree_root, dtype=np.int32),
        "tree_group": np.array(tree_group, dtype=np.int32),
        "tree_expert": np.array(tree_expert, dtype=np.int32),
        "group_nodes": np.array(group_nodes, dtype=np.int64).reshape(-1, 2),
    }
    if n_features == 0:
        n_features = _design_width(p, parts)
    spec, gate = _design_spec(p, parts, False, n_features)
    arrays.update(gate)
    spec.update({"shared": bool(p.shared), "depth": depths, "objective": "binary",
                 "score": "raw (sum of leaf values, float64, cast to float32)"})
    return "lightgbm", spec, arrays


def _design_width(p: Any, parts: tuple[str, ...]) -> int:
    m: ModelInfo = p.model_
    w = {"layer": 1, "position": 1, "hidden": 0, "current_all": m.n_moe * m.n_expert,
         "prev_all": m.n_moe * m.n_expert}
    return sum(w.get(q, m.n_expert) for q in parts) + (m.n_expert if p.gate_routers_.size
                                                        else 0)


# --- writing ------------------------------------------------------------------------------------

def export_predictors(by_d: Mapping[int, Predictor], out: str | os.PathLike[str],
                      source: str = "") -> Path:
    """Write fitted predictors of one name (one per offset ``d``) as one artifact."""
    if not by_d:
        raise ExpertPredError(f"{source or 'export'}: no predictor for any offset d")
    preds = [by_d[d] for d in sorted(by_d)]
    first = preds[0]
    for p in preds:
        p._check_fitted()
        if p.name != first.name:
            raise ExpertPredError(f"export: mixes predictors {first.name!r} and {p.name!r}")
        if p.model_ != first.model_:
            raise ExpertPredError(f"export: {p.name} d={p.d} was trained on another model")
        if p.feature_config_.history_decay != first.feature_config_.history_decay:
            raise ExpertPredError(f"export: {p.name} offsets use different history_decay")
    if first.name not in EXPORTERS:
        raise ExpertPredError(f"export: no exporter for predictor {first.name!r}; known: "
                              f"{', '.join(sorted(EXPORTERS))}")
    arrays: dict[str, np.ndarray] = {}
    offsets: dict[str, Any] = {}
    needs_hidden = False
    for p in preds:
        kind, spec, arrs = EXPORTERS[p.name](p)
        scorer_needs = SCORERS[kind].needs_hidden or bool(spec.get("uses_hidden")) \
            or bool(spec.get("gate"))
        needs_hidden |= scorer_needs
        offsets[str(p.d)] = {
            "kind": kind, "spec": spec,
            "arrays": {k: {"dtype": v.dtype.str, "shape": list(v.shape)} for k, v in arrs.items()},
        }
        for k, v in arrs.items():
            arrays[f"d{p.d}.{k}"] = np.ascontiguousarray(v)
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "predictor": first.name,
        "params": first.get_params(), "model": first.model_.to_dict(),
        "features": {"history_decay": first.feature_config_.history_decay,
                     "builder": "expertpred.features.OnlineFeatures / iter_feature_batches"},
        "needs_hidden": needs_hidden, "offsets": offsets, "source": source,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **{HEADER: np.array(json.dumps(header))}, **arrays)
    os.replace(tmp, out)
    log.info("exported %s (d=%s) to %s", first.name, sorted(by_d), out)
    return out


def export_saved(predictor: str | os.PathLike[str], out: str | os.PathLike[str],
                 name: str | None = None, offsets: Sequence[int] | None = None) -> Path:
    """Export from disk: a saved predictor ``.npz`` (one offset) or a directory of them
    (``expertpred train``'s ``<out>/models``, files ``<name>-d<d>.npz``; every offset of
    ``name``, which may be omitted when the directory holds only one predictor)."""
    from . import Predictor

    src = Path(predictor)
    if src.is_file():
        p = Predictor.load(src)
        if name is not None and p.name != name:
            raise ExpertPredError(f"{src}: holds a {p.name!r} predictor, expected {name!r}")
        return export_predictors({p.d: p}, out, source=str(src))
    if not src.is_dir():
        raise ExpertPredError(f"{src}: no such saved predictor file or directory")
    files = sorted(src.glob("*-d*.npz"))
    stems: dict[str, list[tuple[int, Path]]] = {}
    for f in files:
        stem, _, d = f.stem.rpartition("-d")
        if d.isdigit():
            stems.setdefault(stem.replace("_plus_", "+"), []).append((int(d), f))
    if name is None:
        if len(stems) != 1:
            raise ExpertPredError(f"{src}: holds predictors {sorted(stems) or 'none'}; "
                                  "choose one with --name")
        name = next(iter(stems))
    if name not in stems:
        raise ExpertPredError(f"{src}: no saved {name!r} predictor (files {name}-d<d>.npz); "
                              f"has {sorted(stems) or 'none'}")
    want = None if offsets is None else set(offsets)
    by_d = {}
    for d, f in sorted(stems[name]):
        if want is None or d in want:
            p = Predictor.load(f)
            by_d[p.d] = p
    if want is not None and want - set(by_d):
        raise ExpertPredError(f"{src}: no saved {name!r} for d={sorted(want - set(by_d))}")
    return export_predictors(by_d, out, source=str(src))


# --- loading ------------------------------------------------------------------------------------

def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of an artifact (one-line error if it is not one)."""
    return _read(Path(path))[0]


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    bad = f"{path}: not a readable expertpred artifact"
    if not path.is_file():
        raise ExpertPredError(f"{path}: no such artifact file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ExpertPredError(f"{bad} (a bare .npy, expected an .npz artifact)")
            if HEADER not in z.files:
                raise ExpertPredError(f"{bad} (no {HEADER} entry; a saved predictor? "
                                      "run expertpred export on it)")
            header = json.loads(str(z[HEADER]))
            arrays = {k: z[k] for k in z.files if k != HEADER}
    except ExpertPredError:
        raise
    except json.JSONDecodeError as exc:
        raise ExpertPredError(f"{path}: artifact header is not valid JSON ({exc})") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile,
            zipfile.LargeZipFile) as exc:
        raise ExpertPredError(f"{bad} (truncated or corrupt: "
                              f"{type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ExpertPredError(f"{path}: header format "
                              f"{header.get('format') if isinstance(header, dict) else header!r}"
                              f", expected {FORMAT!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise ExpertPredError(f"{path}: artifact format_version "
                              f"{header.get('format_version')!r}, this expertpred reads "
                              f"{FORMAT_VERSION}")
    return header, arrays


def _check_model(path: Path, trained: ModelInfo, gguf_path: str | os.PathLike[str],
                 allow_sha_mismatch: bool) -> ModelInfo:
    """The model to run on: ``trained`` or, after an allowed sha mismatch, the GGUF's."""
    from ..gguf.layout import file_sha256, read_layout

    lay = read_layout(gguf_path)
    mine = (trained.n_layer, tuple(trained.moe_layers), trained.n_expert,
            trained.n_expert_used, trained.n_embd)
    theirs = (lay.n_layer, tuple(lay.moe_layers), lay.n_expert, lay.n_expert_used, lay.n_embd)
    if mine != theirs:
        keys = ("n_layer", "moe_layers", "n_expert", "n_expert_used", "n_embd")
        diff = ", ".join(f"{k} {a} vs {b}" for k, a, b in zip(keys, mine, theirs) if a != b)
        raise ExpertPredError(f"{path}: trained for another model shape than {gguf_path} "
                              f"(artifact vs GGUF: {diff}); not overridable")
    sha = file_sha256(gguf_path)
    if not trained.sha256:
        log.warning("%s: artifact records no model sha256 (synthetic training data?); "
                    "accepted for %s on shapes alone", path, gguf_path)
        return trained
    if sha == trained.sha256:
        return trained
    if not allow_sha_mismatch:
        raise ExpertPredError(f"{path}: trained for model sha256 {trained.sha256[:12]}…, "
                              f"{gguf_path} has sha256 {sha[:12]}… (same shapes: "
                              "--allow-sha-mismatch to use it anyway)")
    log.warning("%s: trained for sha256 %s…, used with %s (sha256 %s…): allowed", path,
                trained.sha256[:12], gguf_path, sha[:12])
    return ModelInfo(sha256=sha, arch=lay.arch, n_layer=lay.n_layer,
                     moe_layers=tuple(lay.moe_layers), n_expert=lay.n_expert,
                     n_expert_used=lay.n_expert_used, n_embd=lay.n_embd)


def load_artifact(path: str | os.PathLike[str], gguf_path: str | os.PathLike[str] | None = None,
                  allow_sha_mismatch: bool = False) -> ExportedPredictorSet:
    """Load an artifact (numpy only); with ``gguf_path`` check it was trained for that model.

    Errors are one-line :class:`ExpertPredError`: not a file / truncated / bad JSON / missing
    or malformed array / unknown kind / another model (shape: always; sha256: unless
    ``allow_sha_mismatch``).
    """
    path = Path(path)
    header, arrays = _read(path)
    try:
        trained = ModelInfo.from_manifest(header["model"])
        decay = float(header["features"]["history_decay"])
        offsets = {int(d): v for d, v in header["offsets"].items()}
        name = str(header["predictor"])
    except (KeyError, TypeError, ValueError, AttributeError, ExpertPredError) as exc:
        raise ExpertPredError(f"{path}: artifact header lacks or mangles a field ({exc})") \
            from None
    model = trained
    if gguf_path is not None:
        model = _check_model(path, trained, gguf_path, allow_sha_mismatch)
    by_d: dict[int, ExportedPredictor] = {}
    for d, entry in sorted(offsets.items()):
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind not in SCORERS:
            raise ExpertPredError(f"{path}: d={d} scorer kind {kind!r}; known: "
                                  f"{', '.join(sorted(SCORERS))}")
        own: dict[str, np.ndarray] = {}
        declared = entry.get("arrays", {})
        for a in set(SCORERS[kind].arrays) | set(declared):
            key = f"d{d}.{a}"
            if key not in arrays:
                raise ExpertPredError(f"{path}: missing array {key!r} ({kind} d={d})")
            v = arrays[key]
            want = declared.get(a)
            if want is None or v.dtype.str != want["dtype"] or list(v.shape) != want["shape"]:
                raise ExpertPredError(f"{path}: array {key!r} is {v.dtype.str} {list(v.shape)}"
                                      f", header declares {want}")
            own[a] = v
        try:
            scorer = SCORERS[kind](entry.get("spec", {}), own, trained)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ExpertPredError(f"{path}: d={d} {kind} spec or arrays inconsistent "
                                  f"({type(exc).__name__}: {exc})") from None
        by_d[d] = ExportedPredictor(name, scorer, model, FeatureConfig(d=d, history_decay=decay))
    if not by_d:
        raise ExpertPredError(f"{path}: artifact holds no offset d")
    return ExportedPredictorSet(
        by_d=by_d, model=model, history_decay=decay,
        needs_hidden=any(p.needs_hidden for p in by_d.values()), name=name,
        source=str(path), header=header, trained_model=trained)
