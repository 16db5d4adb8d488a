"""Per-layer residency budgets (``ResidencySet(..., layer_budgets=)``): one set with a
budget per layer decides like one independent set per layer for the policies whose
ranking inside a layer does not depend on the other layers (LRU, LFU, Belady), every layer
stays within its own budget, and bad budgets are one error."""

from __future__ import annotations

import numpy as np
import pytest

from expertpred.errors import ExpertPredError
from expertpred.learn.residency_policy import ResidencySet, make_policy, simulate_steps

N_L, N_E, K = 3, 10, 2


def stream(n_tok: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(N_E, 0.5), size=N_L)
    return np.stack([[rng.choice(N_E, K, replace=False, p=p[j]) for j in range(N_L)]
                     for _ in range(n_tok)])


@pytest.mark.parametrize("name", ["lru", "lfu", "belady"])
@pytest.mark.parametrize("slots", [2, 4, 7])
def test_one_set_with_layer_budgets_equals_a_set_per_layer(name: str, slots: int) -> None:
    ex = stream(80, seed=slots)
    sizes = np.array([3, 5, 4], np.int64)
    together = simulate_steps(ex, make_policy(name, future=ex), 0, sizes, N_E,
                              layer_budgets=slots * sizes).counters
    apart = [simulate_steps(ex[:, j:j + 1], make_policy(name, future=ex[:, j:j + 1]),
                            int(slots * sizes[j]), sizes[j:j + 1], N_E).counters
             for j in range(N_L)]
    assert together.hits == sum(c.hits for c in apart)
    assert together.miss_bytes == sum(c.miss_bytes for c in apart)


def test_every_layer_stays_within_its_budget() -> None:
    ex = stream(60, seed=1)
    budgets = np.array([2, 5, 3], np.int64)
    rs = ResidencySet(make_policy("belady", future=ex), N_L, N_E, 1, 0, budgets)
    for t in range(len(ex)):
        for j in range(N_L):
            rs.step(t, j, ex[t, j])
            held = rs.resident.reshape(N_L, N_E).sum(axis=1)
            assert (held <= np.maximum(budgets, K)).all()  # a step's own experts may exceed
            assert (rs.layer_bytes == held).all()
    assert rs.budget_bytes == budgets.sum()


@pytest.mark.parametrize("bad", [np.array([1, 2]), np.array([1, -1, 2])])
def test_bad_layer_budgets_are_one_error(bad: np.ndarray) -> None:
    with pytest.raises(ExpertPredError, match="per-layer budgets"):
        ResidencySet(make_policy("lru"), N_L, N_E, 1, 0, bad)
