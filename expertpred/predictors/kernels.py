"""numpy kernels the lookup rungs share (no torch / lightgbm: the online path imports them)."""

from __future__ import annotations

import numpy as np

from ..features import FeatureBatch
from ..learn.metrics import recall_at_k


def rank_hot(ids: np.ndarray, n: int) -> np.ndarray:
    """float32 (rows, n): k - rank for the ids of each row (best first), 0 elsewhere.

    >>> rank_hot(np.array([[2, 0], [-1, -1]]), 3).tolist()
    [[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]
    """
    k = ids.shape[1]
    out = np.zeros((ids.shape[0], n + 1), dtype=np.float32)
    w = np.broadcast_to(np.arange(k, 0, -1, dtype=np.float32), ids.shape)
    np.put_along_axis(out, np.where(ids >= 0, ids, n).astype(np.int64), w, axis=1)
    return out[:, :n]


def by_layer(w: np.ndarray, layer: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """float32 (n, E): ``w[i] @ tables[layer[i]]``, one matmul per layer (no (n, E, E) copy)."""
    if len(w) == 1:  # the online plugin's one-row case
        return w @ tables[int(layer[0])]
    out = np.empty((len(w), tables.shape[2]), dtype=np.float32)
    for li in np.unique(layer):
        rows = layer == li
        out[rows] = w[rows] @ tables[li]
    return out


def layer_counts(data: FeatureBatch) -> np.ndarray:
    """float64 (L, E): how often each expert is a target, per target layer (whole numbers,
    so partial counts of disjoint row sets add up exactly)."""
    n_l, e = data.model.n_moe, data.model.n_expert
    counts = np.zeros((n_l, e), dtype=np.float64)
    tl = np.repeat(data.target_layer, data.targets.shape[1])
    tg = data.targets.reshape(-1).astype(np.int64)
    ok = tg >= 0
    np.add.at(counts, (tl[ok], tg[ok]), 1.0)
    return counts


def freq_from_counts(counts: np.ndarray, alpha: float) -> np.ndarray:
    """float32 (L, E): Laplace-smoothed shares from :func:`layer_counts`."""
    c = counts + alpha
    return (c / c.sum(axis=1, keepdims=True)).astype(np.float32)


def layer_freq(data: FeatureBatch, alpha: float) -> np.ndarray:
    """float32 (L, E): Laplace-smoothed share of each expert among the targets, per layer."""
    return freq_from_counts(layer_counts(data), alpha)


def normalised_current(x: FeatureBatch) -> np.ndarray:
    """float32 (n, E): this token's experts at ``l`` as 0/1, divided by their count."""
    w = x.current_multihot()
    w /= np.maximum(w.sum(axis=1, keepdims=True), 1.0)
    return w


def mean_recall(top: np.ndarray, targets: np.ndarray) -> float:
    """Mean recall@k of ranked ids ``top`` (n, k) against ``targets`` (n, k)."""
    return float(np.nanmean(recall_at_k(top, targets, top.shape[1])))
