"""The one llama.cpp hook (``expertpred.llama``): the tracer and the prefetch plugin capture
identical routing for the same prompt through it, on the shipped models in real llama.cpp;
node names and the C callback's table come from one place."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from expertpred.llama import ggml, nodes
from expertpred.llama.runtime import prompt_tokens
from expertpred.prefetch.plugin import PrefetchLlama, generate_greedy
from expertpred.shipped import SHIPPED_MODELS, model_gguf
from expertpred.trace.llama_tracer import LlamaTracer

PROMPT = "def read_config(path):\n    with open(path) as f:\n"
N_TOKENS = 6
LLAMA = dict(n_ctx=256, n_threads=2, seed=0)


class Recorder:
    """A ``RoutingRecorder``: what the plugin's callback saw, by (position, MoE layer)."""

    def __init__(self) -> None:
        self.experts: dict[tuple[int, int], np.ndarray] = {}
        self.scores: dict[tuple[int, int], np.ndarray] = {}
        self.weights: dict[tuple[int, int], np.ndarray] = {}
        self.layers: dict[int, set[int]] = defaultdict(set)

    def record(self, li: int, pos0: int, experts: np.ndarray, scores: np.ndarray | None) -> None:
        for i in range(len(experts)):
            self.experts[pos0 + i, li] = experts[i].copy()
            self.layers[li].add(pos0 + i)
            if scores is not None:
                self.scores[pos0 + i, li] = scores[i].copy()

    def record_weights(self, li: int, pos0: int, weights: np.ndarray) -> None:
        for i in range(len(weights)):
            self.weights[pos0 + i, li] = weights[i].copy()


def _plugin_run(path, recorder_at_start: bool) -> tuple[list[int], int, Recorder]:
    """Greedy run with the plugin in d0 mode. ``recorder_at_start``: the recorder is given to
    the constructor, so the plugin probes the graph and captures the tracer's plan (score
    and weight nodes); else it is attached after the context exists, so the plugin keeps its
    own one-split plan (experts at the argsort node) and reports experts only."""
    rec = Recorder()
    kw = {"recorder": rec} if recorder_at_start else {}
    with PrefetchLlama(path, mode="d0", **kw, **LLAMA) as llm:
        if not recorder_at_start:
            llm.plugin.recorder = rec
        toks, n_prompt, _, _ = generate_greedy(llm, PROMPT, N_TOKENS)
        st = llm.prefetch_stats()
    assert st.counters.callback_errors == 0, st.first_error
    return toks, n_prompt, rec


@pytest.mark.parametrize("name", SHIPPED_MODELS)
@pytest.mark.parametrize("plan", ["trace-plan", "argsort-plan"])
def test_tracer_and_plugin_capture_identical_routing(name: str, plan: str) -> None:
    path = model_gguf(name)
    ids = prompt_tokens(path, PROMPT)
    with LlamaTracer(path, n_ctx=256, n_threads=2) as tr:
        seq = tr.trace(ids, N_TOKENS)
        score_node = tr.score_node_
    toks, n_prompt, rec = _plugin_run(path, recorder_at_start=plan == "trace-plan")
    assert n_prompt == len(ids) and seq.tokens[n_prompt:].tolist() == toks
    evaluated = n_prompt + len(toks) - 1  # generate_greedy does not decode its last token
    n_moe = seq.experts.shape[1]
    # every evaluated token at every layer but the last, which computes output rows only
    for li in range(n_moe - 1):
        assert rec.layers[li] == set(range(evaluated)), li
    assert set(range(n_prompt - 1, evaluated)) <= rec.layers[n_moe - 1]
    for (pos, li), ex in rec.experts.items():
        want = seq.experts[pos, li]
        if ex.tolist() == want.tolist():
            continue
        # The two paths batch the prompt differently, so router logits differ in the last
        # bits (see below); with 64 experts (tiny-olmoe) two near-tied experts then swap
        # places. Allowed only where the tracer's own logits are tied within that noise.
        lg = seq.logits[pos, li]
        swapped = [(a, b) for a, b in zip(ex.tolist(), want.tolist()) if a != b]
        assert all(abs(lg[a] - lg[b]) < 5e-3 for a, b in swapped), (pos, li, swapped)
    if plan == "argsort-plan":
        assert not rec.scores and not rec.weights
        return
    assert score_node == nodes.LOGITS  # the shipped archs select on raw router logits
    assert rec.scores.keys() == rec.experts.keys() == rec.weights.keys()
    # Same nodes, but not the same arithmetic: the tracer decodes the prompt's last token in
    # a batch of its own and Llama.eval the whole prompt in one, and with llama.cpp's default
    # f16 KV cache the attention sums differ in the last bits (measured: <= 7e-4 here).
    for key, s in rec.scores.items():
        np.testing.assert_allclose(s, seq.logits[key], atol=5e-3, err_msg=str(key))
        np.testing.assert_allclose(rec.weights[key], seq.weights[key], atol=5e-3)


def test_plugin_with_one_thread_runs() -> None:
    """Llama's batch thread count defaults to the core count: the hooked context's threadpool
    must serve it too (a one-thread pool crashed llama.cpp with SIGSEGV)."""
    path = model_gguf(SHIPPED_MODELS[0])
    with PrefetchLlama(path, mode="d0", n_ctx=128, n_threads=1, seed=0) as llm:
        toks, _, _, _ = generate_greedy(llm, PROMPT, 4)
        st = llm.prefetch_stats()
    assert len(toks) == 4 and st.counters.layer_events > 0 and st.counters.callback_errors == 0


def test_node_names_are_defined_once() -> None:
    """The C callback's table and flags are generated from ``llama.nodes``."""
    for base in nodes.BASE_NAMES:
        assert f'"{base}"' in ggml.CAPTURE_C
    for w in nodes.Want:
        assert f"{w.name} = {int(w)}" in ggml.CAPTURE_C
    every = {*nodes.SCORE_CHAIN, nodes.SCORE_FALLBACK, nodes.ARGSORT, *nodes.WEIGHT_CHAIN}
    assert {nodes.PREFIX + b for b in nodes.BASE_NAMES} == every
    plan = nodes.routing_plan(scores=True)
    table = plan.by_name([3, 5])
    assert table[b"ffn_moe_argsort-5"] == (int(nodes.Want.EXPERTS), 1)
    assert table[b"ffn_moe_logits-3"] == (int(nodes.Want.SCORE), 0)
