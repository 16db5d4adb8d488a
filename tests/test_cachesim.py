"""Cache simulator: hand-checkable sequences, Belady is a lower bound, predictive prefetch."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

import expertpred.learn.cachesim as cachesim
from expertpred.errors import ExpertPredError
from expertpred.learn.cachesim import prefetch_plan, simulate


def test_doctests():
    res = doctest.testmod(cachesim)
    assert res.attempted >= 2 and res.failed == 0


def _acc(*keys: int) -> np.ndarray:
    """A one-layer stream (T, 1, 1) of expert ids."""
    return np.array(keys).reshape(-1, 1, 1)


# classic textbook stream: a b c a b d a b c d, capacity 3
STREAM = _acc(0, 1, 2, 0, 1, 3, 0, 1, 2, 3)


@pytest.mark.parametrize("policy,hits", [
    ("lru", 4),  # a b c [a b] d(evict c) [a b] c(evict d) d(evict a)
    ("belady", 5),  # ... d evicts c (next use 8); c evicts a or b; d hits
    ("lfu", 4),
])
def test_textbook_stream(policy, hits):
    r = simulate(STREAM, policy, capacity_bytes=3, n_expert=4)
    assert (r.hits, r.accesses) == (hits, 10)
    assert r.demand_bytes == 10 - hits and r.prefetch_bytes == 0


def test_lfu_keeps_the_frequent_expert():
    # 0 is used often; a scan of 1,2,3 must not evict it under LFU (it does under LRU)
    s = _acc(0, 0, 0, 1, 2, 3, 0)
    assert simulate(s, "lfu", 2, n_expert=4).hits == 3
    assert simulate(s, "lru", 2, n_expert=4).hits == 2


@pytest.mark.parametrize("seed", range(30))
def test_belady_is_a_lower_bound_on_misses(seed):
    rng = np.random.default_rng(seed)
    t, n_l, k, e = rng.integers(2, 30), rng.integers(1, 4), rng.integers(1, 3), rng.integers(2, 7)
    acc = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(n_l)])
                    for _ in range(t)])
    cap = int(rng.integers(1, n_l * e + 1))
    res = {p: simulate(acc, p, cap, n_expert=e) for p in ("lru", "lfu", "belady")}
    assert all(res["belady"].hits >= r.hits for r in res.values())
    # the whole working set fits: only compulsory misses
    full = simulate(acc, "lru", n_l * e, n_expert=e)
    assert full.accesses - full.hits == len(np.unique(acc + np.arange(n_l)[None, :, None] * e))


def test_byte_sizes_per_layer():
    acc = np.array([[[0], [0]], [[0], [0]]])  # two layers, one expert each
    r = simulate(acc, "lru", capacity_bytes=10, expert_bytes=np.array([4, 6]), n_expert=1)
    assert (r.hits, r.demand_bytes, r.bytes_per_token) == (2, 10, 5.0)
    r = simulate(acc, "lru", capacity_bytes=9, expert_bytes=np.array([4, 6]), n_expert=1)
    assert r.hits == 0 and r.demand_bytes == 20


def test_predictive_with_oracle_prefetch():
    rng = np.random.default_rng(0)
    t, n_l, k, e = 50, 4, 2, 8
    acc = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(n_l)])
                    for _ in range(t)])
    cap = n_l * e // 4  # 25% budget
    oracle = np.full((t, n_l, k), -1)
    oracle[:, :-1] = acc[:, 1:]  # perfect prediction of l + 1
    plan = prefetch_plan({1: oracle}, n_expert=e)
    pred = simulate(acc, "predictive", cap, n_expert=e, prefetch=plan)
    lru = simulate(acc, "lru", cap, n_expert=e)
    # every access but layer 0's is prefetched
    assert pred.hits >= t * (n_l - 1) * k
    assert pred.hit_rate > lru.hit_rate + 0.3
    # wrap: layer 0 of the next token guessed from this token's layer 0
    same = np.repeat(acc[:1], t, axis=0)  # every token routes the same
    plan = prefetch_plan({1: np.concatenate([same[:, 1:], oracle[:, -1:]], 1)}, e,
                         experts=same, wrap=1)
    r = simulate(same, "predictive", cap, n_expert=e, prefetch=plan)
    assert r.accesses - r.hits == k  # only the very first token's layer 0 misses


def test_prefetch_plan_and_errors():
    p = prefetch_plan({1: np.array([[[1], [0]]]), 2: np.array([[[1], [1]]])}, n_expert=2)
    assert p.shape == (1, 2, 2) and p.tolist() == [[[3, -1], [-1, -1]]]
    with pytest.raises(ExpertPredError, match="prefetch plan"):
        simulate(STREAM, "predictive", 3, n_expert=4)
    with pytest.raises(ExpertPredError, match="expected one of lru, lfu"):
        simulate(STREAM, "fifo", 3, n_expert=4)
