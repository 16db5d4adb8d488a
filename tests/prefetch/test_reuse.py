"""The reuse-distance head of the next-use model (``predictors/reuse.py``).

1. The copy feature is exact on a stream that repeats itself: wherever it predicts, it
   predicts the true next-use distance. 2. Online (the policy's ``NextUseState``) equals
   offline (``predict_reuse``) bit for bit, after each routing and after each boundary.
3. The head beats a constant on held-out tokens. 4. Save / load round-trips it; files
   without it load and the policy falls back to the probability ranking; a damaged head is
   one ``ExpertPredError``. 5. On a repeating stream the learned policy reads fewer bytes
   than LRU. 6. The tracker's per-position ids are bounded by its window, not by the run,
   and its columns equal those of the unbounded id lists it replaced, bit for bit.
"""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest

import expertpred.predictors.reuse as reuse
from expertpred.errors import ExpertPredError
from expertpred.learn.cachesim import simulate
from expertpred.predictors.nextuse import NextUseConfig, NextUseModel
from expertpred.predictors.reuse import CAP, FAR, WINDOW, ReuseTracker, next_use_distance

from .conftest import assert_reuse_online_equals_offline

N_L, N_E, K = 3, 8, 2
PREFIX = 10  # random tokens before the loop starts


def looping(n_tok: int, seed: int, period: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Greedy-decoding-like stream: token ids loop with ``period`` after a random prefix;
    each id routes to its own experts per layer. Returns experts (T, L, k), ids (T,)."""
    rng = np.random.default_rng(seed)
    n_id = 12
    table = np.stack([[rng.choice(N_E, K, replace=False) for _ in range(N_L)]
                      for _ in range(n_id)])
    prefix = rng.integers(0, n_id, PREFIX)
    cycle = rng.choice(n_id, period, replace=False)  # an id occurs once per cycle
    ids = np.concatenate([prefix, np.tile(cycle, n_tok // period + 1)])[:n_tok]
    return table[ids], ids


def used_of(ex: np.ndarray) -> np.ndarray:
    u = np.zeros((*ex.shape[:2], N_E), bool)
    t, j, k = np.nonzero(ex >= 0)
    u[t, j, ex[t, j, k]] = True
    return u


@pytest.fixture(scope="module")
def model() -> NextUseModel:
    data = [looping(120, s) for s in range(4)]
    return NextUseModel(N_L, N_E, NextUseConfig(horizon=1)).fit(
        [e for e, _ in data], [t for _, t in data])


def test_reuse_doctests() -> None:
    res = doctest.testmod(reuse)
    assert res.attempted >= 2 and res.failed == 0


def test_copy_distance_is_exact_on_a_loop(model) -> None:
    period = 7
    ex, ids = looping(60, seed=9, period=period)
    dist = next_use_distance(used_of(ex))
    tr = ReuseTracker(model)
    matched = 0
    for t in range(len(ex)):
        tr.begin_token(int(ids[t]))
        if t < PREFIX + period:  # the last occurrence may lie in the random prefix
            for j in range(N_L):
                tr.observe(j, ex[t, j])
            continue
        if t:
            for j in range(N_L):  # the next id is known: the alignment includes token t
                c = tr.copy_distance(j, known_next=True)
                ok = (c < FAR) & (dist[t - 1, j] < FAR)
                np.testing.assert_array_equal(c[ok], dist[t - 1, j][ok])
                matched += int(ok.sum())
        for j in range(N_L):
            tr.observe(j, ex[t, j])
            c = tr.copy_distance(j, known_next=False)
            ok = (c < FAR) & (dist[t, j] < FAR)
            np.testing.assert_array_equal(c[ok], dist[t, j][ok])
            matched += int(ok.sum())
    assert matched > len(ex) * N_L  # it predicted, and often


def test_reuse_online_equals_offline(model) -> None:
    assert model.has_reuse
    ex, ids = looping(40, seed=5)
    assert_reuse_online_equals_offline(model, ex, ids)


def test_reuse_head_beats_a_constant(model) -> None:
    ex, ids = looping(80, seed=77)
    dist = next_use_distance(used_of(ex))
    y = np.log2(np.minimum(dist, reuse.CAP))
    routed, told = model.predict_reuse(ex, ids)
    ok = dist < FAR  # distances the stream itself shows
    const = ((y[ok] - y[ok].mean()) ** 2).mean()
    assert ((routed[ok] - y[ok]) ** 2).mean() < const
    ok[-1] = False  # the last token has no next id
    assert ((told[ok] - y[ok]) ** 2).mean() < ((routed[ok] - y[ok]) ** 2).mean()


def test_reuse_round_trips_and_old_files_fall_back(model, tmp_path) -> None:
    ex, ids = looping(30, seed=3)
    again = NextUseModel.load(model.save(tmp_path / "m.npz"))
    for a, b in zip(again.predict_reuse(ex, ids), model.predict_reuse(ex, ids), strict=True):
        np.testing.assert_array_equal(a, b)
    with np.load(tmp_path / "m.npz") as z:
        arrays = {k: z[k] for k in z.files}
    # a file from before the head: no reuse_coef, the learned policy ranks by probability
    with open(tmp_path / "old.npz", "wb") as f:
        np.savez(f, **{k: v for k, v in arrays.items() if k != "reuse_coef"})
    old = NextUseModel.load(tmp_path / "old.npz")
    assert not old.has_reuse and old.online().reuse is None
    r = simulate(ex, "learned", 10, 1, N_E, model=old, tokens=ids)
    assert r.accesses == ex.size
    # damaged heads: wrong length, not finite, wrong dtype
    for name, bad in (("short", arrays["reuse_coef"][:-1]),
                      ("nan", np.full_like(arrays["reuse_coef"], np.nan)),
                      ("int", arrays["reuse_coef"].astype(np.int64))):
        with open(tmp_path / f"{name}.npz", "wb") as f:
            np.savez(f, **{**arrays, "reuse_coef": bad})
        with pytest.raises(ExpertPredError, match=f"{name}.npz") as e:
            NextUseModel.load(tmp_path / f"{name}.npz")
        assert "\n" not in str(e.value)
    meta = json.loads(str(arrays["__meta__"]))
    assert meta["config"]["reuse"] is True


def test_learned_with_reuse_reads_less_than_lru(model) -> None:
    ex, ids = looping(200, seed=21, period=11)
    cap = N_L * N_E // 2  # half of the experts, one byte each
    lru = simulate(ex, "lru", cap, 1, N_E)
    learned = simulate(ex, "learned", cap, 1, N_E, model=model, tokens=ids)
    belady = simulate(ex, "belady", cap, 1, N_E)
    assert belady.demand_bytes <= learned.demand_bytes < lru.demand_bytes


def test_mlp_head_online_equals_offline_and_round_trips(tmp_path) -> None:
    data = [looping(120, s) for s in range(4)]
    cfg = NextUseConfig(horizon=1, reuse_hidden=8, reuse_epochs=2)
    m = NextUseModel(N_L, N_E, cfg).fit([e for e, _ in data], [t for _, t in data])
    assert m.reuse_.w1.shape[1] == 8 and np.abs(m.reuse_.w2).sum() > 0
    ex, ids = looping(30, seed=8)
    assert_reuse_online_equals_offline(m, ex, ids)
    routed = m.predict_reuse(ex, ids)[0]
    path = m.save(tmp_path / "mlp.npz")
    again = NextUseModel.load(path)
    np.testing.assert_array_equal(again.predict_reuse(ex, ids)[0], routed)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    for key, bad in (("reuse_w1", arrays["reuse_w1"][:, :-1]),  # width disagrees with b1
                     ("reuse_sd", np.zeros_like(arrays["reuse_sd"]))):
        with open(tmp_path / "bad.npz", "wb") as f:
            np.savez(f, **{**arrays, key: bad})
        with pytest.raises(ExpertPredError, match="bad.npz"):
            NextUseModel.load(tmp_path / "bad.npz")


class UnboundedTracker(ReuseTracker):
    """The id bookkeeping as it was before it was bounded: every position's id and prev
    link kept for the whole run (the reference for the bounded one)."""

    def __init__(self, model: NextUseModel, window: int) -> None:
        super().__init__(model, window)
        self.all_ids: list[int] = []
        self.all_prev: list[int] = []
        self.all_last: dict[int, int] = {}

    def begin_token(self, token: int) -> None:
        v = int(token)
        self.all_prev.append(self.all_last.get(v, -1) if v >= 0 else -1)
        self.all_ids.append(v)
        if v >= 0:
            self.all_last[v] = len(self.all_ids) - 1

    def token_id(self, p: int) -> int:
        return self.all_ids[p] if 0 <= p < len(self.all_ids) else -1

    def _anchor(self, p: int, back: int) -> int:
        for _ in range(back):
            if not 0 <= p < len(self.all_prev):
                return -1
            p = self.all_prev[p]
        return p


def test_bounded_ids_equal_the_unbounded_lists(model) -> None:
    # a small window and ids that come back after short and long gaps (some never, some
    # not told): anchors fall before the dropped positions again and again
    window, n_tok = 4, 600
    rng = np.random.default_rng(4)
    ids = np.minimum(rng.zipf(1.3, n_tok), 200) - 2  # ids -1 (not told) .. 198
    ex = np.stack([rng.choice(N_E, (N_L, K)) for _ in range(n_tok)])
    ex[rng.random((n_tok, N_L, K)) < 0.1] = -1
    bounded, reference = ReuseTracker(model, window), UnboundedTracker(model, window)
    old_anchors = 0
    for t in range(n_tok):
        for tr in (bounded, reference):
            tr.begin_token(int(ids[t]))
        for j in range(N_L):
            for known_next in (True, False):
                if known_next and t == 0:
                    continue
                np.testing.assert_array_equal(bounded.columns(j, known_next),
                                              reference.columns(j, known_next))
                a = reference._anchor(int(reference.pos[j]) + known_next, 2)
                old_anchors += 0 <= a < bounded.base
            for tr in (bounded, reference):
                tr.observe(j, ex[t, j])
            np.testing.assert_array_equal(bounded.columns(j, False),
                                          reference.columns(j, False))
        # what the tracker keeps: at most about two windows (+ CAP) of positions
        assert len(bounded.ids) <= 2 * window + CAP + 2
    assert old_anchors > 50  # the dropped positions were asked for, and often
    assert bounded.base > n_tok - 3 * window - CAP


def test_the_policy_state_does_not_grow_with_the_run(model) -> None:
    ex, ids = looping(4 * WINDOW, seed=2)
    st = model.online()
    for t in range(len(ex)):
        st.begin_token(int(ids[t]))
        for j in range(N_L):
            st.observe(j, ex[t, j])
    assert len(st.reuse.ids) == len(st.reuse.prev) <= 2 * WINDOW + CAP + 2 < len(ex)
    assert st.reuse.told == len(ex)
