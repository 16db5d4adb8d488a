"""fast-mlp's online row kernel: the accumulated first layer, its compiled step and its numpy
twin give the offline predictions, whatever order the rows come in."""

from __future__ import annotations

import numpy as np
import pytest

from expertpred.features import FeatureConfig, OnlineFeatures, build_features, sequence_features
from expertpred.predictors import fast_mlp_jit, make_predictor
from expertpred.predictors.fast_mlp_row import RowKernel
from expertpred.predictors.synthetic import SyntheticTraceSpec, synthetic_model, synthetic_traces

SPEC = SyntheticTraceSpec(n_layer=5, n_expert=8, n_expert_used=2, n_embd=16, n_seq=8,
                          seq_len=20, prompt_len=5)
D = 2
SHAPES = {  # the kernel's branches: 1 or 2 hidden layers, with / without the growing parts
    "one-layer": {"hidden_size": 16},
    "two-layers": {"hidden_size": 16, "n_hidden": 2},
    "no-layer-logits": {"hidden_size": 16, "layer_logits": False},
    "no-all-layers": {"hidden_size": 16, "all_layers": False, "use_hidden": True},
}


@pytest.fixture(scope="module")
def traces():
    return synthetic_traces(SPEC)


def _fit(traces, **params):
    model = synthetic_model(SPEC)
    cfg = FeatureConfig(d=D, history_decay=0.6)
    return make_predictor("fast-mlp", epochs=1, **params).fit(build_features(traces[:6], model,
                                                                               cfg))


def _rows(p, seq):
    """The online rows of ``seq`` in decode order (kept: each must stay valid)."""
    online = OnlineFeatures(p.model_, history_decay=p.feature_config_.history_decay)
    rows = []
    for t in range(seq.n_tokens):
        online.next_token(int(seq.tokens[t]), int(seq.phase[t]))
        for li in range(SPEC.n_layer):
            online.update(li, seq.logits[t, li], seq.experts[t, li], seq.hidden[t, li])
            x = online.features(D)
            if x is not None:
                rows.append(x)
    return rows


@pytest.mark.parametrize("shape", list(SHAPES))
def test_row_kernel_any_order_equals_batch(shape, traces):
    """In order (the accumulator carried), shuffled and repeated (rebuilt by replay): the
    same scores bit for bit, and the batch kernel's top-k and scores (to float32 rounding)."""
    p = _fit(traces, **SHAPES[shape])
    seq = traces[7]
    batch = p.predict_scores(sequence_features(seq, p.model_, p.feature_config_))
    rows = _rows(p, seq)
    in_order = np.stack([p.predict_row(x) for x in rows])
    order = np.random.default_rng(0).permutation(len(rows))
    shuffled = np.empty_like(in_order)
    for i in order:
        shuffled[i] = p.predict_row(rows[i])
    again = np.stack([p.predict_row(x) for x in rows[::-1]])[::-1]
    np.testing.assert_array_equal(shuffled, in_order)
    np.testing.assert_array_equal(again, in_order)
    np.testing.assert_allclose(in_order, batch, rtol=1e-5, atol=1e-5)
    k = SPEC.n_expert_used
    np.testing.assert_array_equal(np.argsort(-in_order, axis=1, kind="stable")[:, :k],
                                  np.argsort(-batch, axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_topk_shares_equal_generic(shape, traces):
    """The fused call gives the experts and shares the generic path computes from the
    scores (same top-k; shares to float32 rounding of the mass)."""
    p = _fit(traces, **SHAPES[shape])
    k = SPEC.n_expert_used
    for x in _rows(p, traces[7]):
        top, shares = p.predict_topk_shares(x, k)
        s = p.predict_row(x)
        np.testing.assert_array_equal(top, np.argsort(-s, kind="stable")[:k])
        np.testing.assert_array_equal(p.predict_topk(x, k), top[None])
        pos = np.maximum(s, 0.0)
        want = pos[top] / pos.sum() if pos.sum() > 0 else np.ones(k, np.float32)
        np.testing.assert_allclose(shares, want, rtol=1e-5)
        assert top.dtype == np.int64 and shares.dtype == np.float32


@pytest.mark.skipif(not fast_mlp_jit.HAVE_NUMBA, reason="numba not installed: only the numpy twin")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_compiled_step_equals_numpy_twin(shape, traces, monkeypatch):
    """The compiled step this process resolves (ahead of time by default) and its numpy
    fallback: the same values, row by row (every output)."""
    assert fast_mlp_jit.resolve() in ("aot", "jit")
    p = _fit(traces, **SHAPES[shape])
    rows = _rows(p, traces[7])
    k = SPEC.n_expert_used

    def run(step, advance):
        monkeypatch.setattr(fast_mlp_jit, "step", step)
        monkeypatch.setattr(fast_mlp_jit, "advance", advance)
        n_h = 0 if rows[0].hidden is None or "hidden" not in p.design_.parts \
            else rows[0].hidden.shape[1]
        kern = RowKernel(p.design_, p.weights_, n_h)
        got = [kern._run(x, k) for x in rows]
        got += [kern._run(x, k) for x in rows[::-3]]  # out of order: the replay path
        return [np.concatenate([a.astype(np.float64) for a in g]) for g in got]

    compiled = run(fast_mlp_jit.step, fast_mlp_jit.advance)
    twin = run(fast_mlp_jit.step_np, fast_mlp_jit.advance_np)
    np.testing.assert_array_equal(np.stack(compiled), np.stack(twin))


def test_row_kernel_rejects_rows_without_layer_logits(traces):
    p = _fit(traces, hidden_size=16)
    x = _rows(p, traces[7])[0]
    bad = object.__new__(type(x))
    bad.__dict__.update(x.__dict__, layer_logits=None)
    with pytest.raises(Exception, match="layer_logits"):
        p.predict_row(bad)


_CHILD = """
import sys, numpy as np
from expertpred.features import OnlineFeatures
from expertpred.predictors import fast_mlp_jit
from expertpred.predictors.base import Predictor
p = Predictor.load(sys.argv[1])
z = np.load(sys.argv[2], allow_pickle=False)
online = OnlineFeatures(p.model_, history_decay=p.feature_config_.history_decay)
out = []
for t in range(len(z["tokens"])):
    online.next_token(int(z["tokens"][t]), int(z["phase"][t]))
    for li in range(z["experts"].shape[1]):
        online.update(li, z["logits"][t, li], z["experts"][t, li], z["hidden"][t, li])
        x = online.features(int(sys.argv[4]))
        if x is not None:
            out.append(p.predict_row(x))
np.save(sys.argv[3], np.stack(out))
print(fast_mlp_jit.KIND, "numba" in sys.modules)
"""


@pytest.mark.skipif(not fast_mlp_jit.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("kind", ["aot", "jit", "numpy"])
def test_each_kernel_in_a_fresh_process(kind, traces, tmp_path, monkeypatch):
    """A serving process picks the step by ``EXPERTPRED_KERNEL``: every kind gives the
    numpy twin's scores bit for bit, and the default (``aot``) and ``numpy`` never import
    numba, whose JIT keeps ~50 MB of LLVM in the process."""
    import os
    import subprocess
    import sys

    p = _fit(traces, hidden_size=16)
    art = p.save(tmp_path / "fast-mlp.npz")
    seq = traces[7]
    np.savez(tmp_path / "seq.npz", tokens=seq.tokens, phase=seq.phase, logits=seq.logits,
             experts=seq.experts, hidden=seq.hidden)
    # an empty cache: the aot case builds the module (in its own subprocess) every run
    env = dict(os.environ, EXPERTPRED_KERNEL=kind,
               EXPERTPRED_KERNEL_CACHE=str(tmp_path / "kernels"))
    env.pop("EXPERTPRED_NO_JIT", None)
    r = subprocess.run([sys.executable, "-c", _CHILD, str(art), str(tmp_path / "seq.npz"),
                        str(tmp_path / "out.npy"), str(D)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    got_kind, numba_loaded = r.stdout.split()
    assert got_kind == kind
    assert numba_loaded == str(kind == "jit")
    built = list((tmp_path / "kernels").glob("fastmlp-*/expertpred_fastmlp_step*"))
    assert len(built) == (kind == "aot")
    monkeypatch.setattr(fast_mlp_jit, "step", fast_mlp_jit.step_np)
    monkeypatch.setattr(fast_mlp_jit, "advance", fast_mlp_jit.advance_np)
    twin = np.stack([p.predict_row(x) for x in _rows(p, seq)])
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), twin)


@pytest.mark.skipif(not fast_mlp_jit.HAVE_NUMBA, reason="numba not installed")
def test_unbuildable_aot_falls_back_to_the_jit_with_one_warning(tmp_path):
    """A cache that cannot be written (here: a file where the directory should be) costs
    one warning naming why, and the JIT runs instead."""
    import os
    import subprocess
    import sys

    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    env = dict(os.environ, EXPERTPRED_KERNEL="aot", EXPERTPRED_KERNEL_CACHE=str(blocker))
    env.pop("EXPERTPRED_NO_JIT", None)
    code = ("import logging; logging.basicConfig(level=logging.WARNING)\n"
            "from expertpred.predictors import fast_mlp_jit\n"
            "print(fast_mlp_jit.resolve())\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["jit"]
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("WARNING")]
    assert len(warnings) == 1 and "no ahead-of-time compiled step" in warnings[0]
    assert str(blocker) in warnings[0]
