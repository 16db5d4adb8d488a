"""Feature builder: online == batch, no leakage from the future, shapes and streaming."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from expertpred.errors import ExpertPredError
from expertpred.features import (
    DENSE_PARTS,
    EXTRA_PARTS,
    DenseRow,
    FeatureBatch,
    FeatureConfig,
    ModelInfo,
    OnlineFeatures,
    build_features,
    dense_features,
    iter_feature_batches,
    sequence_features,
)
from expertpred.predictors.synthetic import (
    SyntheticTraceSpec,
    synthetic_model,
    synthetic_traces,
)

SPEC = SyntheticTraceSpec(n_layer=5, n_expert=8, n_expert_used=2, n_embd=16, n_seq=4,
                          seq_len=12, prompt_len=4)


@pytest.fixture(scope="module")
def traces():
    return synthetic_traces(SPEC)


def _same(a: FeatureBatch, b: FeatureBatch) -> None:
    for name in FeatureBatch.FEATURE_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.config == b.config


@pytest.mark.parametrize("d", [1, 2, 4])
def test_online_equals_batch(traces, d):
    model = synthetic_model(SPEC)
    tr = traces[1]
    batch = sequence_features(tr, model, FeatureConfig(d=d, history_decay=0.7))
    online = OnlineFeatures(model, history_decay=0.7)
    row = 0
    for t in range(tr.n_tokens):
        online.next_token(int(tr.tokens[t]), int(tr.phase[t]))
        for li in range(SPEC.n_layer):
            online.update(li, tr.logits[t, li], tr.experts[t, li], tr.hidden[t, li])
            f = online.features(d)
            if li + d >= SPEC.n_layer:
                assert f is None
                continue
            _same(f, batch.take(slice(row, row + 1)))
            row += 1
    assert row == len(batch)


def _online_rows(tr, model, d, decay=0.7, hidden=True):
    """Every online row of ``tr`` for offset ``d`` (kept: they must stay valid)."""
    online = OnlineFeatures(model, history_decay=decay)
    rows = []
    for t in range(tr.n_tokens):
        online.next_token(int(tr.tokens[t]), int(tr.phase[t]))
        for li in range(SPEC.n_layer):
            online.update(li, tr.logits[t, li], tr.experts[t, li],
                          tr.hidden[t, li] if hidden else None)
            f = online.features(d)
            if f is not None:
                rows.append(f)
    return rows


@pytest.mark.parametrize("d", [1, 3])
def test_online_rows_stay_valid_after_later_steps(traces, d):
    """Rows share per-step buffers across d; later updates must never change them."""
    model = synthetic_model(SPEC)
    batch = sequence_features(traces[2], model, FeatureConfig(d=d, history_decay=0.7))
    rows = _online_rows(traces[2], model, d)
    assert len(rows) == len(batch)
    for i, f in enumerate(rows):
        _same(f, batch.take(slice(i, i + 1)))


@pytest.mark.parametrize("parts,onehot,hidden", [
    (DENSE_PARTS, True, True), (DENSE_PARTS, False, True), (DENSE_PARTS, True, False),
    (DENSE_PARTS + EXTRA_PARTS, True, True), (("prev_all", "position", "layer"), False, False),
    (("layer_logits", "logits", "current_all"), True, False),
])
@pytest.mark.parametrize("d", [1, 2])
def test_dense_row_equals_dense_features(traces, parts, onehot, hidden, d):
    model = synthetic_model(SPEC)
    tr = traces[3]
    if not hidden:
        tr = replace(tr, hidden=None)
    batch = sequence_features(tr, model, FeatureConfig(d=d, history_decay=0.7))
    want = dense_features(batch, parts, layer_onehot=onehot)
    enc = DenseRow(model, parts, layer_onehot=onehot,
                   n_hidden=SPEC.n_embd if hidden else 0)
    assert enc.width == want.shape[1]
    for i, f in enumerate(_online_rows(tr, model, d, hidden=hidden)):
        got = enc.row(f)
        assert got.shape == (1, want.shape[1]) and got.dtype == np.float32
        np.testing.assert_array_equal(got[0], want[i])
        np.testing.assert_array_equal(dense_features(f, parts, layer_onehot=onehot), got)


@pytest.mark.parametrize("t0,l0,d", [(0, 0, 1), (5, 2, 1), (5, 0, 3), (11, 3, 1), (7, 1, 2)])
def test_no_leakage_from_the_future(traces, t0, l0, d):
    """Perturbing everything after (t0, l0) must not change any feature up to that row."""
    model = synthetic_model(SPEC)
    cfg = FeatureConfig(d=d)
    tr = traces[2]
    rng = np.random.default_rng(t0 * 10 + l0)
    fut = replace(tr, tokens=tr.tokens.copy(), phase=tr.phase.copy(), experts=tr.experts.copy(),
                  weights=tr.weights.copy(), logits=tr.logits.copy(), hidden=tr.hidden.copy())
    later = np.zeros(tr.experts.shape[:2], bool)
    later[t0 + 1:] = True
    later[t0, l0 + 1:] = True
    fut.experts[later] = rng.integers(0, SPEC.n_expert, (later.sum(), SPEC.n_expert_used))
    fut.logits[later] = rng.standard_normal((later.sum(), SPEC.n_expert))
    fut.hidden[later] = rng.standard_normal((later.sum(), SPEC.n_embd))
    fut.tokens[t0 + 1:] = rng.integers(0, 50, tr.n_tokens - t0 - 1)
    fut.phase[t0 + 1:] = 1 - fut.phase[t0 + 1:]
    a = sequence_features(tr, model, cfg)
    b = sequence_features(fut, model, cfg)
    n_src = SPEC.n_layer - d
    upto = t0 * n_src + l0 + 1  # rows (t < t0, any l) and (t0, l <= l0)
    _same(a.take(slice(0, upto)), b.take(slice(0, upto)))
    # the label of row (t0, l0) is in the future: the perturbation must reach it
    assert not np.array_equal(a.targets[upto - 1:], b.targets[upto - 1:])


def test_rows_shapes_and_masking(traces):
    model = synthetic_model(SPEC)
    b = sequence_features(traces[0], model, FeatureConfig(d=2))
    n_src = SPEC.n_layer - 2
    assert len(b) == SPEC.seq_len * n_src
    assert b.logits.shape == (len(b), SPEC.n_expert) and b.logits.dtype == np.float32
    assert b.experts.shape == (len(b), SPEC.n_layer, SPEC.n_expert_used)
    assert b.hidden.shape == (len(b), SPEC.n_embd) and b.hidden.dtype == np.float16
    above = np.arange(SPEC.n_layer)[None, :] > b.layer[:, None]
    assert (b.experts[above] == -1).all() and (b.experts[~above] >= 0).all()
    assert (b.prev_experts[b.position == 0] == -1).all()
    np.testing.assert_array_equal(b.targets, traces[0].experts[b.position, b.layer + 2])
    x = dense_features(b)
    assert x.shape[0] == len(b) and x.dtype == np.float32 and np.isfinite(x).all()
    cur = dense_features(b, ("current_all",)).reshape(len(b), SPEC.n_layer, SPEC.n_expert)
    assert (cur.sum(axis=2) == np.where(above, 0, SPEC.n_expert_used)).all()


def test_streaming_batches_and_sampling(traces):
    model = synthetic_model(SPEC)
    cfg = FeatureConfig(d=1)
    chunks = list(iter_feature_batches(traces, model, cfg, max_rows=40))
    assert len(chunks) == len(traces)  # whole sequences per chunk
    full = build_features(traces, model, cfg)
    assert len(full) == sum(len(c) for c in chunks)
    sample = build_features(traces, model, cfg, max_rows=30, seed=1)
    assert len(sample) == 30
    assert (np.diff(sample.seq * 1000 + sample.position * 10 + sample.layer) >= 0).all()


def test_bad_inputs(traces):
    model = synthetic_model(SPEC)
    other = ModelInfo("", "x", 5, tuple(range(5)), 16, 2, 16)
    with pytest.raises(ExpertPredError, match="logits shape"):
        sequence_features(traces[0], other, FeatureConfig(d=1))
    with pytest.raises(ExpertPredError, match="d=0"):
        FeatureConfig(d=0)
    with pytest.raises(ExpertPredError, match="empty"):
        build_features([], model, FeatureConfig(d=1))
    with pytest.raises(ExpertPredError, match="another model"):
        model.check_same(replace(model, n_expert=16), "test")
    with pytest.raises(ExpertPredError, match="sha256"):
        replace(model, sha256="a" * 64).check_same(replace(model, sha256="b" * 64), "test")
    online = OnlineFeatures(model)
    with pytest.raises(ExpertPredError, match="before next_token"):
        online.update(0, np.zeros(8), np.zeros(2))
