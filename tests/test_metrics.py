"""Metrics: doctests plus table-driven hand-checked cases."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import expertpred.learn.metrics as metrics
from expertpred.learn.metrics import (
    exact_set_hit,
    grouped_mean,
    hits_at_k,
    precision_at_k,
    recall_at_k,
)


def test_doctests():
    res = doctest.testmod(metrics)
    assert res.attempted >= 6 and res.failed == 0


PRED = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]])
TRUE = np.array([[0, 1], [0, 1], [1, -1]])


@pytest.mark.parametrize("k,recall,precision,exact", [
    (1, [0.5, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]),
    (2, [1.0, 0.0, 1.0], [1.0, 0.0, 0.5], [1.0, 0.0, 1.0]),
    (4, [1.0, 1.0, 1.0], [0.5, 0.5, 0.25], [1.0, 1.0, 1.0]),
])
def test_table(k, recall, precision, exact):
    assert recall_at_k(PRED, TRUE, k).tolist() == recall
    assert precision_at_k(PRED, TRUE, k).tolist() == precision
    assert exact_set_hit(PRED, TRUE, k).tolist() == exact


def test_properties_on_random_rankings():
    rng = np.random.default_rng(0)
    pred = np.argsort(rng.random((200, 16)), axis=1)
    true = np.stack([rng.choice(16, 4, replace=False) for _ in range(200)])
    prev = np.zeros(200)
    for k in range(1, 17):
        r = recall_at_k(pred, true, k)
        assert (r >= prev).all()  # recall grows with k
        prev = r
        assert np.allclose(hits_at_k(pred, true, k), precision_at_k(pred, true, k) * k)
    assert (prev == 1.0).all()
    assert abs(recall_at_k(pred, true, 4).mean() - 0.25) < 0.05  # random: k / E


def test_grouped_mean_matches_loop():
    rng = np.random.default_rng(1)
    v, g = rng.random(100), rng.integers(0, 5, 100)
    got = grouped_mean(v, g, 6)
    for i in range(5):
        assert got[i] == pytest.approx(v[g == i].mean())
    assert np.isnan(got[5])
