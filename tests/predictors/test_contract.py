"""One contract test over every registered predictor (like sklearn's parametrize_with_checks)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from expertpred.errors import ExpertPredError
from expertpred.features import FeatureConfig, OnlineFeatures, build_features
from expertpred.gguf.layout import router_weight
from expertpred.gguf.random_models import SyntheticSpec, write_random_moe
from expertpred.predictors import (
    REGISTRY,
    NotFittedError,
    Predictor,
    available,
    get_predictor_class,
    make_predictor,
)
from expertpred.predictors.artifact import PredictorSet, load_artifact
from expertpred.predictors.synthetic import (
    SyntheticTraceSpec,
    split_of,
    synthetic_model,
    synthetic_traces,
)

GGUF_SPEC = SyntheticSpec(arch="llama", n_layer=4, n_embd=32, n_head=4, n_head_kv=2,
                          n_expert=8, n_expert_used=2, n_ff=16)
SPEC = SyntheticTraceSpec(n_layer=4, n_expert=8, n_expert_used=2, n_embd=32, n_seq=12,
                          seq_len=24, prompt_len=6)
# small settings so that the whole contract runs in seconds
FAST = {"mlp": {"epochs": 2, "hidden_size": 32}, "lightgbm": {"n_estimators": 3},
        "fast-mlp": {"epochs": 2, "hidden_size": 16}}


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    return write_random_moe(tmp_path_factory.mktemp("model") / "tiny.gguf", GGUF_SPEC)


@pytest.fixture(scope="module")
def traces(gguf_path):
    routers = np.stack([router_weight(gguf_path, i) for i in range(SPEC.n_layer)])
    return synthetic_traces(SPEC, routers=routers)


@pytest.fixture(scope="module")
def data(traces):
    model = synthetic_model(SPEC)
    cfg = FeatureConfig(d=1)
    train = build_features([t for t in traces if split_of(t.seq_id) != "test"], model, cfg)
    test = build_features([t for t in traces if split_of(t.seq_id) == "test"], model, cfg)
    return train, test


def _make(name: str, gguf_path: Path, **extra) -> Predictor:
    params = dict(FAST.get(name, {}))
    if name in ("gate-lookahead", "mlp", "lightgbm", "fast-mlp"):
        params["gguf_path"] = str(gguf_path)  # learned models: gate scores as inputs
    params.update(extra)
    return make_predictor(name, **params)


ALL = available()


def test_registry_lists_the_ladder():
    expected = {"random", "popularity", "transition", "previous-token",
                "previous-token+transition", "gate-lookahead", "lightgbm", "mlp", "oracle"}
    assert expected <= set(ALL)
    with pytest.raises(ExpertPredError, match="known: .*popularity"):
        get_predictor_class("nope")
    with pytest.raises(ExpertPredError, match="unknown parameter"):
        make_predictor("popularity", bogus=1)


@pytest.mark.parametrize("name", ALL)
def test_contract(name, data, gguf_path, tmp_path):
    train, test = data
    p = _make(name, gguf_path)
    params = p.get_params()
    # 1. predict (and save) before fit fails clearly
    with pytest.raises(NotFittedError, match="not fitted"):
        p.predict_scores(test)
    with pytest.raises(NotFittedError):
        p.save(tmp_path / "x.npz")
    # 2. fit returns self, keeps the constructor arguments, learned state ends in "_"
    before = set(vars(p))
    assert p.fit(train) is p
    assert p.get_params() == params
    assert all(a.endswith("_") or a.startswith("_") for a in set(vars(p)) - before)
    # 3. shapes and dtypes
    s = p.predict_scores(test)
    e, k = SPEC.n_expert, SPEC.n_expert_used
    assert s.shape == (len(test), e) and s.dtype == np.float32 and np.isfinite(s).all()
    top = p.predict_topk(test, k)
    assert top.shape == (len(test), k) and np.issubdtype(top.dtype, np.integer)
    assert ((top >= 0) & (top < e)).all()
    assert (top[:, 0] != top[:, 1]).all()
    # 4. deterministic with a seed
    np.testing.assert_array_equal(_make(name, gguf_path).fit(train).predict_scores(test), s)
    # 5. save -> load gives identical predictions
    path = p.save(tmp_path / f"{name}.npz")
    q = Predictor.load(path)
    assert type(q) is type(p) and q.get_params() == params
    np.testing.assert_array_equal(q.predict_scores(test), s)
    np.testing.assert_array_equal(q.predict_topk(test, k), top)
    # 6. features of another model or another offset are refused
    other = replace(test, model=replace(test.model, n_expert=e * 2))
    with pytest.raises(ExpertPredError, match="another model"):
        q.predict_scores(other)
    with pytest.raises(ExpertPredError, match="d=2"):
        q.predict_scores(replace(test, config=FeatureConfig(d=2)))
    with pytest.raises(ExpertPredError, match="history_decay=0.9"):
        q.predict_scores(replace(test, config=FeatureConfig(d=1, history_decay=0.9)))
    # 7. too few examples
    with pytest.raises(ExpertPredError, match="too few examples"):
        _make(name, gguf_path).fit(train.take(slice(0, 0)))


@pytest.mark.parametrize("name", ["transition", "previous-token+transition", "lightgbm", "mlp",
                                  "fast-mlp"])
def test_learned_beat_random(name, data, gguf_path):
    train, test = data
    k = SPEC.n_expert_used

    def recall(p: Predictor) -> float:
        top = p.predict_topk(test, k)
        return float((top[:, :, None] == test.targets[:, None, :]).any(1).mean())

    extra = {"epochs": 10, "batch_size": 64} if name in ("mlp", "fast-mlp") else {}
    learned = recall(_make(name, gguf_path, **extra).fit(train))
    assert learned > recall(_make("random", gguf_path).fit(train)) + 0.1


def test_gate_lookahead_is_exact_on_its_own_layer(data, gguf_path):
    """hidden_l @ W_l reproduces layer l's own routing: check the wiring of routers_."""
    train, test = data
    p = _make("gate-lookahead", gguf_path).fit(train)
    h = test.hidden.astype(np.float32)
    own = np.einsum("nd,ned->ne", h, p.routers_[test.layer.astype(int)])
    top = np.argsort(-own, axis=1, kind="stable")[:, :2]
    cur = test.experts[np.arange(len(test)), test.layer.astype(int)]
    assert (np.sort(top, 1) == np.sort(cur, 1)).mean() > 0.95  # f16 hidden: rare ties


def test_gate_lookahead_errors(data, tmp_path):
    train, _ = data
    with pytest.raises(ExpertPredError, match="gguf_path is empty"):
        make_predictor("gate-lookahead").fit(train)
    with pytest.raises(ExpertPredError, match="no such model file"):
        make_predictor("gate-lookahead", gguf_path=str(tmp_path / "x.gguf")).fit(train)
    with pytest.raises(ExpertPredError, match="needs hidden"):
        make_predictor("gate-lookahead", gguf_path="x").fit(replace(train, hidden=None))


def test_oracle_needs_labels(data, gguf_path):
    train, test = data
    p = _make("oracle", gguf_path).fit(train)
    with pytest.raises(ExpertPredError, match="offline only"):
        p.predict_scores(replace(test, targets=None))


def test_load_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ExpertPredError, match="not a saved expertpred predictor"):
        Predictor.load(bad)


def _online_rows(traces, model, decay: float):
    """(row, batch row index) pairs: a test sequence replayed through OnlineFeatures, the
    plugin's path, one layer-step at a time."""
    seq = next(t for t in traces if split_of(t.seq_id) == "test")
    f = OnlineFeatures(model, history_decay=decay)
    for t in range(seq.n_tokens):
        f.next_token(int(seq.tokens[t]), int(seq.phase[t]))
        for li in range(model.n_moe):
            f.update(li, seq.logits[t, li], seq.experts[t, li], seq.hidden[t, li])
            x = f.features(1)
            if x is not None:
                yield x


@pytest.mark.parametrize("name", ALL)
def test_artifact_contract(name, data, traces, gguf_path, tmp_path):
    """fit -> save -> load_artifact: equal predict_scores and topk_shares, in batches and on
    the online one-row path; the loaded rung is the registered class, not a copy of it."""
    train, test = data
    k = SPEC.n_expert_used
    # 1. a set of an unfitted predictor cannot be built or saved
    with pytest.raises(NotFittedError):
        PredictorSet.from_predictors({1: _make(name, gguf_path)})
    p = _make(name, gguf_path).fit(train)
    mem = PredictorSet.from_predictors({1: p})
    # 2. fit -> save -> load_artifact: the same class, parameters and batch scores
    art = load_artifact(mem.save(tmp_path / f"{name}.artifact"))
    q = art.by_d[1]
    assert type(q) is REGISTRY[name] and q.get_params() == p.get_params()
    assert (art.name, art.offsets, art.model, art.needs_hidden) == \
        (name, (1,), mem.model, mem.needs_hidden)
    np.testing.assert_array_equal(q.predict_scores(test), p.predict_scores(test))
    np.testing.assert_array_equal(q.predict_topk(test, k), p.predict_topk(test, k))
    # 3. the online path: one row at a time, scores as in the batch, topk / topk_shares equal
    rows = list(_online_rows(traces, train.model, art.history_decay))
    if name == "oracle":  # reads the labels: online it has nothing to read
        with pytest.raises(ExpertPredError, match="offline only"):
            art.topk_shares(1, rows[0], k)
        return
    for x in rows:
        a_top, a_share = art.topk_shares(1, x, k)
        m_top, m_share = mem.topk_shares(1, x, k)
        np.testing.assert_array_equal(a_top, m_top)
        np.testing.assert_array_equal(a_share, m_share)
        assert ((a_share >= 0) & (a_share <= 1)).all()
        np.testing.assert_array_equal(art.topk(1, x, k), a_top)
        np.testing.assert_allclose(q.predict_scores(x), p.predict_scores(x), rtol=1e-6)
