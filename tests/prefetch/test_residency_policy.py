"""The residency policy contract, run over every registered policy, and the next-use model.

For each policy in ``POLICIES`` on skewed random streams: 1. decisions have the right shape
(evictions are resident experts not used by the step, bypasses are experts of the step);
2. the bookkeeping never holds more than the budget after a step; 3. the same stream gives
the same decisions; 4. ``kernel`` decides nothing. Belady (with bypass) never reads more
than the others when experts have equal sizes.
"""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest

import expertpred.predictors.nextuse as nextuse
from expertpred.errors import ExpertPredError
from expertpred.learn.cachesim import simulate
from expertpred.learn.residency_policy import (
    POLICIES,
    Event,
    Record,
    ResidencySet,
    make_policy,
    replay,
    simulate_steps,
)
from expertpred.predictors import NotFittedError
from expertpred.predictors.nextuse import NextUseConfig, NextUseModel

N_L, N_E, K = 4, 8, 2


def stream(n_tok: int, seed: int, n_l: int = N_L, n_e: int = N_E, k: int = K) -> np.ndarray:
    """Skewed routing with some temporal locality: int (T, L, k), distinct per row."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(n_e, 0.4), size=n_l)
    out = np.empty((n_tok, n_l, k), np.int64)
    for t in range(n_tok):
        for li in range(n_l):
            if t and rng.random() < 0.5:
                out[t, li] = out[t - 1, li]
            else:
                out[t, li] = rng.choice(n_e, size=k, replace=False, p=p[li])
    return out


@pytest.fixture(scope="module")
def nextuse_model() -> NextUseModel:
    return NextUseModel(N_L, N_E, NextUseConfig(horizon=2)).fit(
        [stream(60, s) for s in range(6)])


def token_ids(experts: np.ndarray, seed: int) -> np.ndarray:
    """Token ids that tell layer 0's first expert (3 ids per expert), like an MoE that
    routes its early layers by token id."""
    rng = np.random.default_rng(seed)
    return experts[:, 0, 0] * 3 + rng.integers(0, 3, len(experts))


@pytest.fixture(scope="module")
def nextuse_tok_model() -> NextUseModel:
    seqs = [stream(60, s) for s in range(6)]
    return NextUseModel(N_L, N_E, NextUseConfig(horizon=1)).fit(
        seqs, [token_ids(e, s) for s, e in enumerate(seqs)])


def policy(name: str, experts: np.ndarray, model: NextUseModel):
    return make_policy(name, future=experts, model=model)


SIZES = np.array([3, 5, 4, 6], np.int64)  # bytes per expert by layer: unequal on purpose


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("budget_share", [0.15, 0.4])
def test_policy_contract(name: str, budget_share: float, nextuse_model) -> None:
    ex = stream(40, seed=11)
    budget = int(budget_share * SIZES.sum() * N_E)

    def run() -> list[tuple]:
        rs = ResidencySet(policy(name, ex, nextuse_model), N_L, N_E, SIZES, budget)
        out = []
        for t in range(len(ex)):
            for li in range(N_L):
                before = rs.resident.copy()
                keys = set((li * N_E + ex[t, li]).tolist())
                d = rs.step(t, li, ex[t, li])
                # 1. shapes: evictions were resident and are not this step's experts
                assert all(before[k] and k not in keys for k in d.evict)
                assert set(d.bypass) <= keys and not set(d.evict) & set(d.bypass)
                assert d.hits + d.misses == len(keys)
                assert not rs.resident[list(d.evict) + list(d.bypass)].any()
                if name == "kernel":  # 4. the kernel decides
                    assert d.evict == d.bypass == ()
                    continue
                # 2. never above the budget after a step
                assert rs.used_bytes <= budget
                assert rs.used_bytes == int(SIZES.repeat(N_E)[rs.resident].sum())
                if not rs.policy.bypasses:
                    assert d.bypass == ()
                out.append((d.evict, d.bypass, d.hits))
        return out

    assert run() == run()  # 3. deterministic


@pytest.mark.parametrize("seed", range(8))
def test_belady_reads_least(seed: int, nextuse_model) -> None:
    ex = stream(50, seed=100 + seed)
    for share in (0.1, 0.25, 0.5):
        cap = int(share * N_L * N_E)
        res = {p: simulate(ex, p, cap, 1, N_E, model=nextuse_model)
               for p in ("lru", "lfu", "learned", "belady")}
        assert all(res["belady"].demand_bytes <= r.demand_bytes for r in res.values())


def test_bypass_keeps_the_returning_expert() -> None:
    # one layer, k=1, capacity 1: 0 returns every other step, 1..n never come back.
    # Belady bypasses each one-off expert and keeps 0; LRU evicts 0 every time.
    ex = np.array([0, 1, 0, 2, 0, 3, 0, 4]).reshape(-1, 1, 1)
    assert simulate(ex, "belady", 1, n_expert=5).hits == 3
    assert simulate(ex, "lru", 1, n_expert=5).hits == 0


def test_prefetch_defers_the_routed_layers_experts() -> None:
    # two layers of 4 experts, room for 2. Layer 0 routes {0, 1}; the prefetch of layer 1's
    # expert 4 + 0 must displace one of them, whose matmul may still be running: it comes
    # back as a bypass (evicted at the next step), never as an eviction now
    ex = np.array([[[0, 1], [0, 2]], [[2, 3], [1, 3]]])
    rs = ResidencySet(make_policy("belady", future=ex), 2, 4, 1, 2)
    rs.step(0, 0, [0, 1])
    d = rs.prefetch(0, 0, [4])
    assert d.evict == () and len(d.bypass) == 1 and d.bypass[0] in (0, 1)
    assert rs.counters.bypasses == 1 and rs.used_bytes == 2


def test_replay_records_equal_simulation(nextuse_model) -> None:
    ex = stream(30, seed=5)
    for name in ("lru", "lfu", "learned", "belady"):
        a = simulate_steps(ex, policy(name, ex, nextuse_model), 40, SIZES, N_E)
        recs = [Record(Event.STEP, t, li, tuple(ex[t, li].tolist()))
                for t in range(len(ex)) for li in range(N_L)]
        b = replay(recs, policy(name, ex, nextuse_model), 40, N_L, N_E, SIZES)
        assert a.counters == b.counters and (a.resident == b.resident).all()


def test_replay_with_token_records_equals_simulation(nextuse_tok_model) -> None:
    ex = stream(30, seed=5)
    tok = token_ids(ex, 5)
    a = simulate_steps(ex, policy("learned", ex, nextuse_tok_model), 40, SIZES, N_E, tok)
    recs = [r for t in range(len(ex)) for r in
            [Record(Event.TOKEN, t, -1, (int(tok[t]),))]
            + [Record(Event.STEP, t, li, tuple(ex[t, li].tolist())) for li in range(N_L)]]
    b = replay(recs, policy("learned", ex, nextuse_tok_model), 40, N_L, N_E, SIZES)
    assert a.counters == b.counters and (a.resident == b.resident).all()
    # the ids change the decisions (else the feature would be dead weight)
    c = simulate_steps(ex, policy("learned", ex, nextuse_tok_model), 40, SIZES, N_E)
    assert c.counters != a.counters


def test_prefetch_and_adopt_stay_within_budget(nextuse_model) -> None:
    ex = stream(20, seed=9)
    for name in ("lru", "learned", "belady"):
        rs = ResidencySet(policy(name, ex, nextuse_model), N_L, N_E, SIZES, 30)
        evicted = rs.adopt(range(N_L * N_E))  # everything was cached at load
        assert rs.used_bytes <= 30 and len(evicted) > 0
        for t in range(len(ex)):
            for li in range(N_L):
                rs.step(t, li, ex[t, li])
                if li + 1 < N_L:
                    rs.prefetch(t, li, (li + 1) * N_E + ex[t, li + 1])
                assert rs.used_bytes <= 30
        assert rs.counters.prefetch_admits > 0


def test_errors() -> None:
    with pytest.raises(ExpertPredError, match="expected one of"):
        make_policy("fifo")
    with pytest.raises(ExpertPredError, match="recorded trace"):
        make_policy("belady")
    with pytest.raises(ExpertPredError, match="next-use model"):
        make_policy("learned")
    with pytest.raises(ExpertPredError, match="cannot be simulated"):
        simulate_steps(stream(3, 0), make_policy("kernel"), 10, 1, N_E)


# --- the next-use model -------------------------------------------------------------------


def test_nextuse_doctests() -> None:
    res = doctest.testmod(nextuse)
    assert res.attempted >= 2 and res.failed == 0


def test_nextuse_online_equals_offline(nextuse_model) -> None:
    ex = stream(25, seed=42)
    prob, target, valid = nextuse_model.predict_sequence(ex)
    assert prob.shape == target.shape == (25, N_L, N_E) and valid.sum() == 25 - 2
    st = nextuse_model.online()
    for t in range(len(ex)):
        for li in range(N_L):
            st.observe(li, ex[t, li])
            np.testing.assert_array_equal(st.prob[li], prob[t, li])


def test_nextuse_tokens_online_equals_offline(nextuse_tok_model) -> None:
    m = nextuse_tok_model
    assert m.uses_tokens and m._n_features() == len(m.coef_)
    ex = stream(25, seed=42)
    tok = token_ids(ex, 42)
    after, _, _ = m.predict_sequence(ex, tok)  # row t knows the id of token t+1
    before, _, _ = m.predict_sequence(ex, tok, boundary=False)
    assert not np.array_equal(after[:-1], before[:-1])
    st = m.online()
    for t in range(len(ex)):
        st.begin_token(int(tok[t]))  # the plugin's token boundary: the sampled id
        if t:
            np.testing.assert_array_equal(st.prob, after[t - 1])
        for li in range(N_L):
            st.observe(li, ex[t, li])
            np.testing.assert_array_equal(st.prob[li], before[t, li])


def test_nextuse_token_ids_lower_the_log_loss(nextuse_model, nextuse_tok_model,
                                              tmp_path) -> None:
    # fit on the first 200 tokens of 6 streams, score their next 100 (same routing law)
    seqs = [stream(300, s) for s in range(6)]
    toks = [token_ids(e, s) for s, e in enumerate(seqs)]
    cfg = NextUseConfig(horizon=1)
    plain = NextUseModel(N_L, N_E, cfg).fit([e[:200] for e in seqs])
    tokm = NextUseModel(N_L, N_E, cfg).fit([e[:200] for e in seqs], [t[:200] for t in toks])
    loss = {}
    for name, m in (("plain", plain), ("tokens", tokm)):
        p, y = [], []
        for e, tk in zip(seqs, toks):
            pr, tg, v = m.predict_sequence(e[200:], tk[200:])
            p.append(pr[v].ravel())
            y.append(tg[v].ravel())
        loss[name] = nextuse.log_loss(np.concatenate(p), np.concatenate(y))
    assert loss["tokens"] < loss["plain"]
    again = NextUseModel.load(nextuse_tok_model.save(tmp_path / "tok.npz"))
    assert again.uses_tokens
    e = stream(20, 3)
    np.testing.assert_array_equal(again.predict_sequence(e, token_ids(e, 3))[0],
                                  nextuse_tok_model.predict_sequence(e, token_ids(e, 3))[0])


def test_nextuse_old_file_loads_without_token_tables(nextuse_model, tmp_path) -> None:
    # a file written before the token tables: no tok_* arrays, no token_* config keys
    path = nextuse_model.save(tmp_path / "new.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["__meta__"]))
    for key in ("token_features", "token_prior"):
        meta["config"].pop(key)
    arrays["__meta__"] = np.array(json.dumps(meta))
    with open(tmp_path / "old.npz", "wb") as f:
        np.savez(f, **arrays)
    old = NextUseModel.load(tmp_path / "old.npz")
    assert not old.uses_tokens
    e = stream(20, 3)
    np.testing.assert_array_equal(old.predict_sequence(e, token_ids(e, 3))[0],
                                  nextuse_model.predict_sequence(e)[0])
    st = old.online()
    st.begin_token(5)  # told an id, the old model ignores it
    st.observe(0, e[0, 0])
    np.testing.assert_array_equal(st.prob[0], nextuse_model.predict_sequence(e)[0][0, 0])


def test_nextuse_beats_its_prior_and_round_trips(nextuse_model, tmp_path) -> None:
    ex = [stream(60, s) for s in range(20, 24)]
    p, y = [], []
    for e in ex:
        pr, tg, v = nextuse_model.predict_sequence(e)
        p.append(pr[v].ravel())
        y.append(tg[v].ravel())
    p, y = np.concatenate(p), np.concatenate(y)
    base = nextuse.log_loss(np.full_like(p, y.mean()), y)
    assert nextuse.log_loss(p, y) < base
    path = nextuse_model.save(tmp_path / "nextuse.npz")
    again = NextUseModel.load(path)
    np.testing.assert_array_equal(again.predict_sequence(ex[0])[0],
                                  nextuse_model.predict_sequence(ex[0])[0])
    with pytest.raises(NotFittedError):
        NextUseModel(N_L, N_E).online()
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ExpertPredError, match="bad.npz"):
        NextUseModel.load(tmp_path / "bad.npz")
