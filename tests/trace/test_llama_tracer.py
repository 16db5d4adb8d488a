"""LlamaTracer on real llama.cpp: random-weight GGUFs of four archs (llama/Mixtral-style,
qwen2moe with a shared expert, qwen3moe, olmoe) written into tmp_path.

Checked: selected experts are the top-k of the captured logits after the arch's gating
(softmax for all four), mixing weights are the (re)normalised softmax llama.cpp uses for the
arch, every token (prompt and generated, last layer included) has routing at every MoE
layer, traced generation equals untraced generation, prompts split into several ubatches
give the same routing, the router input reproduces the logits, the Python fallback callback
equals the C one. The shipped-model cross-check against transformers is in
test_hf_tracer.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from expertpred.errors import ExpertPredError
from expertpred.gguf.layout import router_weight
from expertpred.gguf.random_models import SyntheticSpec, write_random_moe
from expertpred.llama import ggml
from expertpred.trace.llama_tracer import LlamaTracer
from expertpred.trace.record import Phase

# arch -> (spec overrides, does llama.cpp renormalise the top-k softmax weights?)
# (norm_w argument of build_moe_ffn in src/models/<arch>.cpp)
ARCHS = {
    "llama": ({}, True),
    "qwen2moe": ({"n_ff_shexp": 64}, False),
    "qwen3moe": ({"n_expert": 16, "n_expert_used": 4}, True),
    "olmoe": ({}, False),
}
PROMPT = list(range(3, 43))  # 40 byte tokens
N_GEN = 12


@pytest.fixture(scope="module")
def gguf_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("llama_tracer")
    return {arch: write_random_moe(d / f"{arch}.gguf", SyntheticSpec(arch=arch, **kw))
            for arch, (kw, _) in ARCHS.items()}


@pytest.fixture(scope="module")
def traces(gguf_paths: dict[str, Path]) -> dict[str, dict[str, object]]:
    """Per arch: a traced greedy run, its untraced twin, and the tracer's node choices."""
    out: dict[str, dict[str, object]] = {}
    for arch, path in gguf_paths.items():
        with LlamaTracer(path, n_ctx=256, n_batch=64, n_threads=1, capture_hidden=True) as tr:
            out[arch] = {
                "trace": tr.trace(PROMPT, N_GEN, seq_id=7, prompt_id="p7", domain="code"),
                "plain": tr.generate(PROMPT, N_GEN),
                "score": tr.score_node_, "weights": tr.weight_node_,
                "callback": tr.callback_,
            }
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_experts_are_topk_of_gated_logits_and_weights_match(traces, arch):
    t = traces[arch]["trace"]
    assert traces[arch]["score"] == "ffn_moe_logits"
    k = t.experts.shape[-1]
    probs = _softmax(t.logits.astype(np.float64))
    top = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    assert np.array_equal(top, t.experts), "selected experts != top-k of softmax(logits)"
    sel = np.take_along_axis(probs, t.experts.astype(np.int64), axis=-1)
    if ARCHS[arch][1]:
        sel = sel / sel.sum(-1, keepdims=True)
    np.testing.assert_allclose(t.weights, sel, atol=2e-6)
    assert (np.diff(t.weights, axis=-1) <= 1e-7).all(), "weights not in rank order"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_token_has_routing_at_every_layer(traces, gguf_paths, arch):
    from expertpred.gguf.layout import read_layout

    t = traces[arch]["trace"]
    lay = read_layout(gguf_paths[arch])
    n = len(PROMPT) + N_GEN
    assert t.n_tokens == n
    assert t.logits.shape == (n, len(lay.moe_layers), lay.n_expert)
    assert t.experts.shape == t.weights.shape == (n, len(lay.moe_layers), lay.n_expert_used)
    assert t.hidden is not None and t.hidden.shape == (n, len(lay.moe_layers), lay.n_embd)
    assert t.experts.dtype == np.int16 and t.logits.dtype == np.float32
    assert t.hidden.dtype == np.float16
    assert np.isfinite(t.logits).all() and np.isfinite(t.weights).all()
    # no zero rows anywhere: prompt tokens and the last layer included
    assert (np.abs(t.logits).sum(-1) > 0).all()
    assert (np.abs(t.hidden.astype(np.float32)).sum(-1) > 0).all()
    assert (t.weights > 0).all()
    assert ((t.experts >= 0) & (t.experts < lay.n_expert)).all()
    srt = np.sort(t.experts, axis=-1)
    assert (np.diff(srt, axis=-1) > 0).all(), "an expert selected twice for one token"
    assert list(t.phase) == [Phase.PROMPT] * len(PROMPT) + [Phase.DECODE] * N_GEN
    assert list(t.tokens[: len(PROMPT)]) == PROMPT
    assert (t.seq_id, t.prompt_id, t.domain) == (7, "p7", "code")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_traced_generation_equals_untraced(traces, arch):
    t, g = traces[arch]["trace"], traces[arch]["plain"]
    assert g.n_prompt == len(PROMPT)
    assert np.array_equal(t.tokens, g.tokens)
    assert t.text == g.text


def test_router_input_reproduces_logits(traces, gguf_paths):
    from expertpred.gguf.layout import read_layout

    path = gguf_paths["qwen2moe"]
    t = traces["qwen2moe"]["trace"]
    lay = read_layout(path)
    for li, layer in enumerate(lay.moe_layers):
        w = router_weight(path, layer)  # (E, D)
        approx = t.hidden[:, li].astype(np.float32) @ w.T
        scale = np.abs(t.logits[:, li]).max()
        assert np.abs(approx - t.logits[:, li]).max() < 2e-2 * scale


def test_sampled_generation_traced_equals_untraced(gguf_paths):
    with LlamaTracer(gguf_paths["llama"], n_ctx=128, n_threads=1) as tr:
        kw = dict(greedy=False, temperature=1.0, top_k=50, top_p=0.9, seed=123)
        a = tr.trace(PROMPT[:5], 16, **kw)
        b = tr.generate(PROMPT[:5], 16, **kw)
        c = tr.trace(PROMPT[:5], 16, **{**kw, "seed": 124})
    assert np.array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_ubatch_split_prompt_gives_same_routing(gguf_paths):
    """A prompt decoded in 5 ubatches of 8 equals one ubatch of 40 (rows land in order)."""
    path = gguf_paths["qwen3moe"]
    with LlamaTracer(path, n_ctx=128, n_batch=8, n_threads=1) as small, \
            LlamaTracer(path, n_ctx=128, n_batch=64, n_threads=1) as big:
        a, b = small.trace(PROMPT), big.trace(PROMPT)
    assert a.n_tokens == b.n_tokens == len(PROMPT)
    np.testing.assert_allclose(a.logits, b.logits, atol=5e-3)
    assert (a.experts == b.experts).mean() > 0.97


def test_teacher_forced_trace_matches_generated_rows(traces, gguf_paths):
    """Re-tracing prompt+generated tokens as one prompt reproduces the decode-time routing."""
    t = traces["llama"]["trace"]
    with LlamaTracer(gguf_paths["llama"], n_ctx=256, n_threads=1) as tr:
        tf = tr.trace(t.tokens, max_tokens=0)
    assert (tf.phase == Phase.PROMPT).all() and tf.text == ""
    np.testing.assert_allclose(tf.logits, t.logits, atol=5e-3)
    assert (tf.experts == t.experts).mean() > 0.97


def test_python_callback_equals_c_callback(gguf_paths, monkeypatch):
    path = gguf_paths["qwen2moe"]
    with LlamaTracer(path, n_ctx=128, n_threads=1, capture_hidden=True) as tr:
        c = tr.trace(PROMPT[:20], 6)
        kind_c = tr.callback_
    monkeypatch.setenv("EXPERTPRED_PY_CALLBACK", "1")
    ggml.capture_lib.cache_clear()
    try:
        with LlamaTracer(path, n_ctx=128, n_threads=1, capture_hidden=True) as tr:
            p = tr.trace(PROMPT[:20], 6)
            kind_p = tr.callback_
    finally:
        monkeypatch.delenv("EXPERTPRED_PY_CALLBACK")
        ggml.capture_lib.cache_clear()
    assert (kind_c, kind_p) == ("C", "python")
    for name in ("tokens", "experts", "weights", "logits", "hidden"):
        assert np.array_equal(getattr(c, name), getattr(p, name)), name


def test_text_prompt_and_reuse(gguf_paths):
    with LlamaTracer(gguf_paths["olmoe"], n_ctx=128, n_threads=1) as tr:
        toks = tr.tokenize("hello, world")
        a = tr.trace("hello, world", 4)
        b = tr.trace("hello, world", 4)  # buffers and KV cache are reset between traces
        long = tr.trace(list(range(1, 101)), 2)  # grows the capture buffers
    assert list(a.tokens[: len(toks)]) == toks
    assert np.array_equal(a.logits, b.logits) and np.array_equal(a.experts, b.experts)
    assert long.n_tokens == 102 and (np.abs(long.logits).sum(-1) > 0).all()


def test_dense_model_is_a_one_line_user_error(tmp_path):
    dense = write_random_moe(tmp_path / "dense.gguf", SyntheticSpec(n_expert=0))
    with pytest.raises(ExpertPredError) as err:
        LlamaTracer(dense)
    msg = str(err.value)
    assert "\n" not in msg and str(dense) in msg and "Mixture-of-Experts" in msg


def test_bad_inputs_are_user_errors(gguf_paths, tmp_path):
    with pytest.raises(ExpertPredError, match="no such file"):
        LlamaTracer(tmp_path / "missing.gguf")
    tr = LlamaTracer(gguf_paths["llama"], n_ctx=32, n_threads=1)
    with pytest.raises(ExpertPredError, match="exceeds n_ctx=32"):
        tr.trace(list(range(1, 30)), 10)
    with pytest.raises(ExpertPredError, match="out of range"):
        tr.trace([5, 100000])
    with pytest.raises(ExpertPredError, match="empty prompt"):
        tr.trace([])
    tr.close()
    tr.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        tr.trace([1, 2, 3])
