"""Prediction metrics: pure numpy functions over top-k predictions and true expert sets.

Shapes: ``pred`` is int (n, >=k), best first; ``targets`` is int (n, m), the experts the
layer really selected, ``-1`` as padding. Every function returns one value per row, so the
caller chooses how to aggregate (overall mean, per layer, per offset) with
:func:`grouped_mean`. No I/O here.
"""

from __future__ import annotations

import numpy as np


def hits_at_k(pred: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """int64 (n,): how many true experts are among the first ``k`` predictions.

    >>> hits_at_k(np.array([[3, 1, 0], [2, 0, 1]]), np.array([[1, 2], [2, -1]]), 2).tolist()
    [1, 1]
    """
    pred = np.asarray(pred)[:, :k]
    targets = np.asarray(targets)
    found = (pred[:, :, None] == targets[:, None, :]).any(axis=1) & (targets >= 0)
    return found.sum(axis=1).astype(np.int64)


def recall_at_k(pred: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """float64 (n,): share of the true experts found in the top ``k`` (nan for no target).

    >>> recall_at_k(np.array([[3, 1, 0], [2, 0, 1]]), np.array([[1, 2], [2, 0]]), 2).tolist()
    [0.5, 1.0]
    """
    n_true = (np.asarray(targets) >= 0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_true > 0, hits_at_k(pred, targets, k) / n_true, np.nan)


def precision_at_k(pred: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """float64 (n,): share of the top ``k`` predictions that are true experts.

    >>> precision_at_k(np.array([[3, 1, 0], [2, 0, 1]]), np.array([[1, 2], [2, 0]]), 2).tolist()
    [0.5, 1.0]
    """
    return hits_at_k(pred, targets, k) / float(k)


def exact_set_hit(pred: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """float64 (n,): 1.0 where every true expert is in the top ``k`` (the exact set if
    ``k`` equals the number of true experts), else 0.0.

    >>> exact_set_hit(np.array([[1, 2, 0], [2, 0, 1]]), np.array([[2, 1], [1, 2]]), 2).tolist()
    [1.0, 0.0]
    >>> exact_set_hit(np.array([[1, 2, 0], [2, 0, 1]]), np.array([[2, 1], [1, 2]]), 3).tolist()
    [1.0, 1.0]
    """
    n_true = (np.asarray(targets) >= 0).sum(axis=1)
    return (hits_at_k(pred, targets, k) == n_true).astype(np.float64)


def grouped_mean(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """float64 (n_groups,): mean of ``values`` per integer group id, nan-skipping;
    nan for an empty group.

    >>> grouped_mean(np.array([1.0, 0.0, 0.5, np.nan]), np.array([0, 0, 2, 2]), 3).tolist()
    [0.5, nan, 0.5]
    """
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    ok = ~np.isnan(values)
    s = np.bincount(groups[ok], weights=values[ok], minlength=n_groups)[:n_groups]
    c = np.bincount(groups[ok], minlength=n_groups)[:n_groups]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c > 0, s / np.maximum(c, 1), np.nan)


def nanmean(values: np.ndarray) -> float:
    """Mean ignoring nan; nan when nothing is left.

    >>> nanmean(np.array([1.0, np.nan, 0.0])), str(nanmean(np.array([np.nan])))
    (0.5, 'nan')
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")
