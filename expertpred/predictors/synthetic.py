"""Synthetic routing traces with known structure, for tests and for development without a model.

A hidden state per (token, layer) follows a residual-stream-like recurrence: it keeps most of
the layer below (``layer_carry``), some of the previous token at the same layer
(``token_carry``), a token embedding and noise, and is RMS-normalised. Each layer's router
``W_l`` (E × D) scores it; the top-k experts are selected. So consecutive layers, consecutive
tokens and token ids all carry information about the next layers' experts — the structure a
predictor can learn — and ``hidden @ W_{l+d}ᵀ`` is an (imperfect) gate look-ahead.

Two domains ("code", "prose") draw tokens from different halves of the vocabulary with their
own token Markov chains, so cross-domain evaluation has a real shift to measure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..features import ModelInfo
from ..trace.record import Phase, SequenceTrace

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SyntheticTraceSpec:
    """Shape and dynamics of a synthetic trace set."""

    n_layer: int = 6  # MoE layers
    n_expert: int = 16
    n_expert_used: int = 2
    n_embd: int = 32
    n_seq: int = 40  # sequences, alternating domains
    seq_len: int = 48  # tokens per sequence
    prompt_len: int = 16  # the first tokens are PROMPT phase, the rest DECODE
    vocab: int = 64
    layer_carry: float = 0.9  # share of the layer below kept in the hidden state
    token_carry: float = 0.3  # share of the previous token (same layer) kept
    noise: float = 0.3
    layer_bias: float = 0.2  # per-layer offset of the hidden state: skews popularity
    with_hidden: bool = True
    seed: int = 0


def synthetic_model(spec: SyntheticTraceSpec) -> ModelInfo:
    """The :class:`ModelInfo` of synthetic traces (no GGUF: empty sha256)."""
    return ModelInfo(sha256="", arch="synthetic", n_layer=spec.n_layer,
                     moe_layers=tuple(range(spec.n_layer)), n_expert=spec.n_expert,
                     n_expert_used=spec.n_expert_used, n_embd=spec.n_embd)


def synthetic_routers(spec: SyntheticTraceSpec) -> np.ndarray:
    """float32 (L, E, D) router matrices used by :func:`synthetic_traces`."""
    rng = np.random.default_rng(spec.seed + 1)
    w = rng.standard_normal((spec.n_layer, spec.n_expert, spec.n_embd), dtype=np.float32)
    return (w * 3.0 / np.sqrt(spec.n_embd)).astype(np.float32)


def split_of(seq_id: int) -> str:
    """Deterministic split of a synthetic sequence: 70% train, 10% validation, 20% test."""
    r = seq_id % 10
    return "test" if r in (3, 8) else "validation" if r == 5 else "train"


def synthetic_traces(spec: SyntheticTraceSpec = SyntheticTraceSpec(),
                     routers: np.ndarray | None = None) -> list[SequenceTrace]:
    """Generate ``spec.n_seq`` traces; ``routers`` (L, E, D) default: synthetic_routers()."""
    rng = np.random.default_rng(spec.seed)
    n_l, e, k, dim = spec.n_layer, spec.n_expert, spec.n_expert_used, spec.n_embd
    w = synthetic_routers(spec) if routers is None else np.asarray(routers, np.float32)
    if w.shape != (n_l, e, dim):
        raise ValueError(f"routers shape {w.shape}, expected {(n_l, e, dim)}")
    emb = rng.standard_normal((spec.vocab, dim)).astype(np.float32)
    layer_bias = rng.standard_normal((n_l, dim)).astype(np.float32) * spec.layer_bias
    half = spec.vocab // 2
    # token Markov chains: each token has 3 likely successors inside its domain's half
    succ = {dom: rng.integers(0, half, size=(half, 3)) + off
            for dom, off in (("code", 0), ("prose", half))}
    traces = []
    for s in range(spec.n_seq):
        domain = "code" if s % 2 == 0 else "prose"
        off = 0 if domain == "code" else half
        tok = np.empty(spec.seq_len, dtype=np.int32)
        tok[0] = off + rng.integers(half)
        for t in range(1, spec.seq_len):
            tok[t] = (succ[domain][tok[t - 1] - off, rng.integers(3)] if rng.random() < 0.8
                      else off + rng.integers(half))
        hid = np.zeros((spec.seq_len, n_l, dim), dtype=np.float32)
        for t in range(spec.seq_len):
            below = emb[tok[t]]
            for li in range(n_l):
                x = spec.layer_carry * below + layer_bias[li]
                if t > 0:
                    x = x + spec.token_carry * hid[t - 1, li]
                x = x + spec.noise * rng.standard_normal(dim).astype(np.float32)
                x = x / np.sqrt(np.mean(x * x) + 1e-6)
                hid[t, li] = x
                below = x
        logits = np.einsum("tld,led->tle", hid, w).astype(np.float32)
        order = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
        top = np.take_along_axis(logits, order, axis=-1)
        wts = np.exp(top - top.max(-1, keepdims=True))
        wts = (wts / wts.sum(-1, keepdims=True)).astype(np.float32)
        phase = np.full(spec.seq_len, Phase.DECODE, dtype=np.int8)
        phase[: spec.prompt_len] = Phase.PROMPT
        traces.append(SequenceTrace(
            seq_id=s, prompt_id=f"{domain}-{s:04d}", domain=domain, tokens=tok, phase=phase,
            experts=order.astype(np.int16), weights=wts, logits=logits,
            hidden=hid.astype(np.float16) if spec.with_hidden else None,
        ))
    return traces
