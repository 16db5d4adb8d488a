"""The baseline ladder: random, popularity, transition, previous-token (+ transition), oracle."""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch
from ..learn.metrics import recall_at_k
from .base import Predictor

log = logging.getLogger(__name__)


def _rank_hot(ids: np.ndarray, n: int) -> np.ndarray:
    """float32 (rows, n): k - rank for the ids of each row (best first), 0 elsewhere.

    >>> _rank_hot(np.array([[2, 0], [-1, -1]]), 3).tolist()
    [[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]
    """
    k = ids.shape[1]
    out = np.zeros((ids.shape[0], n + 1), dtype=np.float32)
    w = np.broadcast_to(np.arange(k, 0, -1, dtype=np.float32), ids.shape)
    np.put_along_axis(out, np.where(ids >= 0, ids, n).astype(np.int64), w, axis=1)
    return out[:, :n]


def _by_layer(w: np.ndarray, layer: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """float32 (n, E): ``w[i] @ tables[layer[i]]``, one matmul per layer (no (n, E, E) copy)."""
    if len(w) == 1:  # the online plugin's one-row case
        return w @ tables[int(layer[0])]
    out = np.empty((len(w), tables.shape[2]), dtype=np.float32)
    for li in np.unique(layer):
        rows = layer == li
        out[rows] = w[rows] @ tables[li]
    return out


def _layer_counts(data: FeatureBatch) -> np.ndarray:
    """float64 (L, E): how often each expert was a target, per target layer."""
    n_l, e = data.model.n_moe, data.model.n_expert
    counts = np.zeros((n_l, e), dtype=np.float64)
    tl = np.repeat(data.target_layer, data.targets.shape[1])
    tg = data.targets.reshape(-1).astype(np.int64)
    ok = tg >= 0
    np.add.at(counts, (tl[ok], tg[ok]), 1.0)
    return counts


class RandomPredictor(Predictor, name="random"):
    """Uniformly random scores, reproducible from ``seed`` (the floor of the ladder)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _fit(self, data: FeatureBatch) -> None:
        self.n_expert_ = data.model.n_expert

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return rng.random((len(x), self.n_expert_), dtype=np.float32)


class PopularityPredictor(Predictor, name="popularity"):
    """Per-layer selection frequency of each expert in the training data."""

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha  # Laplace smoothing: experts never seen still get a score

    def _fit(self, data: FeatureBatch) -> None:
        c = _layer_counts(data) + self.alpha
        self.freq_ = (c / c.sum(axis=1, keepdims=True)).astype(np.float32)

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        return self.freq_[x.target_layer]


class TransitionPredictor(Predictor, name="transition"):
    """P(expert j at l + d | expert i at l), Laplace-smoothed, averaged over the chosen i.

    ``source="experts"`` averages the rows of the k chosen experts; ``"probs"`` weights every
    row by softmax(router logits at l).
    """

    def __init__(self, alpha: float = 1.0, source: str = "experts") -> None:
        self.alpha = alpha
        self.source = source

    def _fit(self, data: FeatureBatch) -> None:
        if self.source not in ("experts", "probs"):
            raise ExpertPredError(f"transition source={self.source!r}: expected experts|probs")
        n_l, e = data.model.n_moe, data.model.n_expert
        counts = np.zeros((n_l, e, e), dtype=np.float64)
        rows = np.arange(len(data))
        src = data.experts[rows, data.layer.astype(np.int64)].astype(np.int64)  # (n, k)
        tgt = data.targets.astype(np.int64)
        lay = data.layer.astype(np.int64)
        for a in range(src.shape[1]):
            for b in range(tgt.shape[1]):
                ok = (src[:, a] >= 0) & (tgt[:, b] >= 0)
                np.add.at(counts, (lay[ok], src[ok, a], tgt[ok, b]), 1.0)
        counts += self.alpha
        self.table_ = (counts / counts.sum(axis=2, keepdims=True)).astype(np.float32)

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        lay = x.layer.astype(np.int64)
        if self.source == "probs":
            z = x.logits - x.logits.max(axis=1, keepdims=True)
            w = np.exp(z)
            w /= w.sum(axis=1, keepdims=True)
        else:
            w = x.current_multihot()
            w /= np.maximum(w.sum(axis=1, keepdims=True), 1.0)
        return _by_layer(w.astype(np.float32), lay, self.table_)


class PreviousTokenPredictor(Predictor, name="previous-token"):
    """The experts the previous token used at layer l + d (rank order); popularity breaks ties."""

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha

    def _fit(self, data: FeatureBatch) -> None:
        c = _layer_counts(data) + self.alpha
        self.freq_ = (c / c.sum(axis=1, keepdims=True)).astype(np.float32)

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        rows = np.arange(len(x))
        prev = x.prev_experts[rows, x.target_layer]
        return _rank_hot(prev, x.model.n_expert) + 1e-3 * self.freq_[x.target_layer]


class PreviousTokenTransitionPredictor(Predictor, name="previous-token+transition"):
    """``w·previous-token + (1-w)·transition``; ``w`` is picked on the training data."""

    def __init__(self, alpha: float = 1.0, weight: float | None = None) -> None:
        self.alpha = alpha
        self.weight = weight  # None: choose from a grid by recall@k on the training rows

    def _fit(self, data: FeatureBatch) -> None:
        trans = TransitionPredictor(alpha=self.alpha)
        trans._fit(data)
        self.table_ = trans.table_
        c = _layer_counts(data) + self.alpha
        self.freq_ = (c / c.sum(axis=1, keepdims=True)).astype(np.float32)
        if self.weight is not None:
            self.weight_ = float(self.weight)
            return
        sample = data.take(np.random.default_rng(0).permutation(len(data))[:20000])
        p, t = self._parts(sample)
        k = data.model.n_expert_used
        best, best_w = -1.0, 0.5
        for w in np.linspace(0.0, 1.0, 11):
            top = np.argsort(-(w * p + (1 - w) * t), axis=1, kind="stable")[:, :k]
            r = _recall(top, sample.targets)
            if r > best + 1e-9:
                best, best_w = r, float(w)
        self.weight_ = best_w

    def _parts(self, x: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(len(x))
        prev = x.prev_experts[rows, x.target_layer]
        p = _rank_hot(prev, x.model.n_expert)
        p /= np.maximum(p.sum(axis=1, keepdims=True), 1.0)
        w = x.current_multihot()
        w /= np.maximum(w.sum(axis=1, keepdims=True), 1.0)
        t = _by_layer(w, x.layer.astype(np.int64), self.table_)
        return p, t + 1e-4 * self.freq_[x.target_layer]

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        p, t = self._parts(x)
        return self.weight_ * p + (1.0 - self.weight_) * t


class OraclePredictor(Predictor, name="oracle"):
    """The true experts (upper bound): reads the labels, so it only works offline."""

    def __init__(self) -> None:
        pass

    def _fit(self, data: FeatureBatch) -> None:
        self.n_expert_ = data.model.n_expert

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        if x.targets is None:
            raise ExpertPredError("oracle predictor needs labelled features (offline only)")
        return _rank_hot(x.targets, self.n_expert_)


def _recall(top: np.ndarray, targets: np.ndarray) -> float:
    return float(np.nanmean(recall_at_k(top, targets, top.shape[1])))
