"""The trace replay's hit rate (BufferManager bookkeeping) equals cachesim's.

``benchmarks/trace_replay.py --trace`` replays a recorded access stream with real reads,
a real PrefetchEngine (threads) and a BufferManager. Its hit rate — a used expert the buffer
holds when it is used — must equal ``cachesim.simulate``'s for the same policy, budget and
prefetch plan. With asynchronous prefetch the two can differ (a prefetch admitted after the
use it was meant for, or dropped as stale), so the replay awaits each prefetch here
(``await_prefetch=True``), which puts the buffer's admissions in cachesim's order: then the
agreement is exact. No timing is asserted.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from expertpred.gguf.layout import read_layout
from expertpred.learn.cachesim import prefetch_plan, simulate

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def trace_replay():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("trace_replay")
    finally:
        sys.path.remove(str(BENCH))


def _stream(n_tok: int, n_l: int, n_e: int, k: int, seed: int) -> np.ndarray:
    """Skewed random routing (some experts hot), k distinct experts per (token, layer)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(n_e, 0.5), size=n_l)
    return np.array([[rng.choice(n_e, size=k, replace=False, p=p[li]) for li in range(n_l)]
                     for _ in range(n_tok)], dtype=np.int64)


@pytest.mark.parametrize("policy", ["lru", "predictive"])
def test_replay_hit_rate_equals_cachesim(model_file, trace_replay, policy):
    layout = read_layout(model_file)
    n_l, n_e, k = len(layout.moe_layers), layout.n_expert, layout.n_expert_used
    experts = _stream(25, n_l, n_e, k, seed=7)  # 25 tokens x 4 layers x 2 = 200 accesses
    plan = None
    if policy == "predictive":  # a fixed plan: half right (next layer's first expert), half not
        guess = np.stack([np.roll(experts[:, :, 0], -1, axis=1),
                          np.random.default_rng(3).integers(0, n_e, experts.shape[:2])], axis=2)
        plan = prefetch_plan({1: guess}, n_e, experts=experts, wrap=1)
    sizes = layout.nbytes.sum(axis=2)[:, 0].astype(np.int64)
    budget = int(0.3 * layout.nbytes.sum())
    sim = simulate(experts, policy, budget, sizes, n_e, prefetch=plan)
    r = trace_replay.replay_stream(model_file, layout, experts, plan, budget,
                                   await_prefetch=True, queue_depth=2)
    assert r["accesses"] == sim.accesses == 200
    assert 0 < sim.hits < sim.accesses
    assert r["hits"] == sim.hits
    if policy == "predictive":  # the plan really ran: its reads happened
        assert r["prefetch GB"] > 0
