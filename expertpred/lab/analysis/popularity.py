"""Expert popularity: how often each expert of a layer is selected. Pure numpy.

``experts`` is an int array ``(N, L, k)`` of selected experts, best first; ``counts`` is
``(L, E)`` (or ``(..., E)``) selections per expert.
"""

from __future__ import annotations

import numpy as np


def expert_counts(experts: np.ndarray, n_expert: int, first_only: bool = False) -> np.ndarray:
    """(L, E) int: how often each expert was selected at each layer (or chosen first).

    >>> x = np.array([[[0, 1]], [[0, 2]], [[1, 0]]])  # N=3 tokens, L=1, k=2
    >>> expert_counts(x, 3)
    array([[3, 2, 1]])
    >>> expert_counts(x, 3, first_only=True)
    array([[2, 1, 0]])
    """
    x = experts[:, :, :1] if first_only else experts
    n_layer = x.shape[1]
    flat = (x.astype(np.int64) + (np.arange(n_layer) * n_expert)[None, :, None]).ravel()
    return np.bincount(flat, minlength=n_layer * n_expert).reshape(n_layer, n_expert)


def usage_shares(counts: np.ndarray) -> np.ndarray:
    """Counts normalised to shares along the last axis (NaN where a row is all zero).

    >>> usage_shares(np.array([[3, 1], [0, 0]]))
    array([[0.75, 0.25],
           [ nan,  nan]])
    """
    c = np.asarray(counts, dtype=np.float64)
    tot = c.sum(axis=-1, keepdims=True)
    return np.divide(c, tot, out=np.full_like(c, np.nan), where=tot > 0)


def zipf_slope(counts: np.ndarray) -> np.ndarray:
    """(L,) slope of log(count) against log(rank) over the used experts of each layer.

    0 is uniform; -1 is Zipf's law; NaN when fewer than two experts were used.

    >>> zipf_slope(np.array([[12, 6, 4, 3], [5, 5, 5, 5], [7, 0, 0, 0]])).round(6)
    array([-1.,  0., nan])
    """
    c = np.atleast_2d(counts)
    out = np.full(len(c), np.nan)
    for i, row in enumerate(c):
        used = np.sort(row[row > 0])[::-1].astype(np.float64)
        if len(used) >= 2:
            rank = np.arange(1, len(used) + 1, dtype=np.float64)
            out[i] = np.polyfit(np.log(rank), np.log(used), 1)[0]
    return out


def gini(counts: np.ndarray) -> np.ndarray:
    """(L,) Gini coefficient of expert usage: 0 uniform, (E-1)/E when one expert takes all.

    >>> gini(np.array([[1, 1, 1, 1], [0, 0, 0, 4]]))
    array([0.  , 0.75])
    """
    c = np.sort(np.atleast_2d(counts).astype(np.float64), axis=-1)
    n = c.shape[-1]
    weight = 2 * np.arange(1, n + 1) - n - 1
    tot = c.sum(axis=-1)
    return np.divide((c * weight).sum(axis=-1), n * tot, out=np.full(len(c), np.nan),
                     where=tot > 0)


def dead_experts(counts: np.ndarray) -> np.ndarray:
    """(L, E) bool: experts never selected at that layer.

    >>> dead_experts(np.array([[3, 0, 1]]))
    array([[False,  True, False]])
    """
    return np.asarray(counts) == 0


def hot_experts(counts: np.ndarray, factor: float = 2.0) -> np.ndarray:
    """(L, E) bool: experts whose share of a layer's selections is >= factor x uniform (1/E).

    >>> hot_experts(np.array([[6, 1, 1, 0]]))
    array([[ True, False, False, False]])
    """
    c = np.asarray(counts)
    return usage_shares(c) >= factor / c.shape[-1]


def topn_coverage(counts: np.ndarray, n: int) -> np.ndarray:
    """(L,) share of selections that went to the n most used experts of each layer.

    With n = k this is the top-k recall of always predicting the most popular experts.

    >>> topn_coverage(np.array([[6, 2, 1, 1]]), 2)
    array([0.8])
    """
    c = np.sort(np.atleast_2d(counts), axis=-1)[:, ::-1]
    return usage_shares(c)[:, :n].sum(axis=-1)

