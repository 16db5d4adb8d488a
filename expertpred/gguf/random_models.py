"""Random-weight GGUF models of several MoE architectures, for tests and I/O benchmarks.

These are not the shipped (trained) models: they exist to check that the tracer, the
layout module and the prefetch engine work on architectures and sizes the shipped models
do not cover (shared experts, per-head q/k norms, multi-GB expert files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .writer import byte_tokenizer, write_gguf

# Architectures this module can write, and the attention extras each one needs.
SUPPORTED_ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe")


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of a random model. ``n_expert=0`` writes a dense (non-MoE) llama model."""

    arch: str = "llama"
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff: int = 96  # expert FFN width (dense FFN width when n_expert == 0)
    n_ff_shexp: int = 0  # shared-expert width (qwen2moe only; 0 = no shared expert)
    n_ctx: int = 512
    dtype: str = "f32"  # "f32" or "f16" for the 2-D/3-D weights
    seed: int = 0


def _kv_heads(spec: SyntheticSpec) -> int:
    # OLMoE normalises k over the full width (attn_k_norm is {n_embd}): no GQA there.
    return spec.n_head if spec.arch == "olmoe" else spec.n_head_kv


def _weights(spec: SyntheticSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    wdt = np.float16 if spec.dtype == "f16" else np.float32
    vocab = len(byte_tokenizer().tokens)
    d, hd = spec.n_embd, spec.n_embd // spec.n_head
    dkv = hd * _kv_heads(spec)

    def w(*shape: int, scale: float | None = None) -> np.ndarray:
        s = scale if scale is not None else 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape, dtype=np.float32) * s).astype(wdt)

    def ones(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t: dict[str, np.ndarray] = {
        "token_embd.weight": w(vocab, d, scale=1.0),
        "output_norm.weight": ones(d),
        "output.weight": w(vocab, d),
    }
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = ones(d)
        t[p + "attn_q.weight"] = w(d, d)
        t[p + "attn_k.weight"] = w(dkv, d)
        t[p + "attn_v.weight"] = w(dkv, d)
        t[p + "attn_output.weight"] = w(d, d)
        if spec.arch == "qwen2moe":
            t[p + "attn_q.bias"] = w(d, scale=0.02).astype(np.float32)
            t[p + "attn_k.bias"] = w(dkv, scale=0.02).astype(np.float32)
            t[p + "attn_v.bias"] = w(dkv, scale=0.02).astype(np.float32)
        if spec.arch == "qwen3moe":
            t[p + "attn_q_norm.weight"] = ones(hd)
            t[p + "attn_k_norm.weight"] = ones(hd)
        if spec.arch == "olmoe":
            t[p + "attn_q_norm.weight"] = ones(d)
            t[p + "attn_k_norm.weight"] = ones(dkv)
        t[p + "ffn_norm.weight"] = ones(d)
        if spec.n_expert == 0:
            t[p + "ffn_gate.weight"] = w(spec.n_ff, d)
            t[p + "ffn_up.weight"] = w(spec.n_ff, d)
            t[p + "ffn_down.weight"] = w(d, spec.n_ff)
            continue
        e, f = spec.n_expert, spec.n_ff
        t[p + "ffn_gate_inp.weight"] = w(e, d, scale=1.0 / np.sqrt(d) * 3).astype(np.float32)
        t[p + "ffn_gate_exps.weight"] = w(e, f, d)
        t[p + "ffn_up_exps.weight"] = w(e, f, d)
        t[p + "ffn_down_exps.weight"] = w(e, d, f)
        if spec.arch == "qwen2moe" and spec.n_ff_shexp:
            fs = spec.n_ff_shexp
            t[p + "ffn_gate_inp_shexp.weight"] = w(d).astype(np.float32)
            t[p + "ffn_gate_shexp.weight"] = w(fs, d)
            t[p + "ffn_up_shexp.weight"] = w(fs, d)
            t[p + "ffn_down_shexp.weight"] = w(d, fs)
    return t


def _hparams(spec: SyntheticSpec) -> dict[str, int | float | str | bool]:
    h: dict[str, int | float | str | bool] = {
        "context_length": spec.n_ctx,
        "embedding_length": spec.n_embd,
        "block_count": spec.n_layer,
        "feed_forward_length": spec.n_ff,
        "attention.head_count": spec.n_head,
        "attention.head_count_kv": _kv_heads(spec),
        "attention.layer_norm_rms_epsilon": 1e-5,
        "rope.freq_base": 10000.0,
        "rope.dimension_count": spec.n_embd // spec.n_head,
    }
    if spec.n_expert:
        h["expert_count"] = spec.n_expert
        h["expert_used_count"] = spec.n_expert_used
        if spec.arch in ("qwen2moe", "qwen3moe"):
            h["expert_feed_forward_length"] = spec.n_ff
        if spec.arch == "qwen2moe" and spec.n_ff_shexp:
            h["expert_shared_feed_forward_length"] = spec.n_ff_shexp
    return h


def write_random_moe(path: Path, spec: SyntheticSpec = SyntheticSpec()) -> Path:
    """Write a random-weight model of ``spec`` to ``path`` (atomically) and return the path."""
    if spec.arch not in SUPPORTED_ARCHS:
        raise ValueError(f"arch {spec.arch!r}: expected one of {', '.join(SUPPORTED_ARCHS)}")
    if spec.n_expert == 0 and spec.arch != "llama":
        raise ValueError("a dense (n_expert=0) synthetic model must use arch 'llama'")
    name = f"random-{spec.arch}-{spec.n_expert}x{spec.n_expert_used}"
    return write_gguf(Path(path), spec.arch, name, _hparams(spec), _weights(spec), byte_tokenizer())
