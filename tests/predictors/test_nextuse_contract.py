"""The predictor contract for the next-use model, which is not a registered rung.

Why not registered: a rung predicts layer l+d's experts of the same token from a
FeatureBatch per offset d; the next-use model predicts reuse across tokens from a routing
sequence, so the ladder's train / evaluate / artifact code has nothing to call on it.
It still owes what the contract test asks of every rung: constructor stores, fit returns
self, predicting before fit fails, fit is deterministic, and fit -> save -> load gives equal
predictions, offline and online.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from expertpred.predictors import NotFittedError
from expertpred.predictors.nextuse import NextUseConfig, NextUseModel

N_L, N_E, K = 3, 8, 2


def routing(n_tok: int, seed: int) -> np.ndarray:
    """int (T, L, k): skewed experts, each layer keeps its set with probability 0.5."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(N_E, 0.5), size=N_L)
    out = np.empty((n_tok, N_L, K), np.int64)
    for t in range(n_tok):
        for li in range(N_L):
            keep = t and rng.random() < 0.5
            out[t, li] = out[t - 1, li] if keep else rng.choice(N_E, K, replace=False, p=p[li])
    return out


def token_ids(experts: np.ndarray) -> np.ndarray:
    """Ids that tell layer 0's first expert: an MoE routing its early layers by token id."""
    return experts[:, 0, 0] * 2 + np.arange(len(experts)) % 2


@pytest.mark.parametrize("with_tokens", [False, True], ids=["plain", "token-ids"])
def test_nextuse_satisfies_the_predictor_contract(with_tokens: bool, tmp_path: Path) -> None:
    seqs = [routing(50, s) for s in range(5)]
    toks = [token_ids(e) for e in seqs] if with_tokens else None
    cfg = NextUseConfig(horizon=2, token_features=with_tokens)
    # 1. the constructor only stores; predicting before fit fails clearly
    m = NextUseModel(N_L, N_E, cfg)
    assert (m.n_layer, m.n_expert, m.config) == (N_L, N_E, cfg)
    with pytest.raises(NotFittedError):
        m.predict_sequence(seqs[0])
    with pytest.raises(NotFittedError):
        m.save(tmp_path / "unfitted.npz")
    # 2. fit returns self and is deterministic
    assert m.fit(seqs, toks) is m
    again = NextUseModel(N_L, N_E, cfg).fit(seqs, toks)
    np.testing.assert_array_equal(again.coef_, m.coef_)
    assert m.uses_tokens is with_tokens
    # 3. fit -> save -> load: equal predictions offline, both before and after the next
    # token id is known, shape (T, L, E) probabilities
    loaded = NextUseModel.load(m.save(tmp_path / "nextuse.npz"))
    held = routing(30, 99)
    tok = token_ids(held) if with_tokens else None
    for boundary in (True, False):
        want = m.predict_sequence(held, tok, boundary=boundary)[0]
        assert want.shape == (30, N_L, N_E) and ((want >= 0) & (want <= 1)).all()
        np.testing.assert_array_equal(loaded.predict_sequence(held, tok, boundary=boundary)[0],
                                      want)
    # 4. ... and online: the loaded model's state steps to the same probabilities
    st, st_loaded = m.online(), loaded.online()
    for t in range(len(held)):
        if tok is not None:
            st.begin_token(int(tok[t]))
            st_loaded.begin_token(int(tok[t]))
        for li in range(N_L):
            st.observe(li, held[t, li])
            st_loaded.observe(li, held[t, li])
        np.testing.assert_array_equal(st_loaded.prob, st.prob)
