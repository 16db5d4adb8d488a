"""Convert a small transformers MoE checkpoint (``save_pretrained`` dir) to an f32 GGUF.

Supported (registry ``HF_ARCHS``, keyed by ``config.json``'s ``architectures[0]``):

=====================  ============  ===========================================
transformers class     GGUF arch     notes
=====================  ============  ===========================================
MixtralForCausalLM     ``llama``     q/k rows permuted for interleaved RoPE
Qwen3MoeForCausalLM    ``qwen3moe``  NEOX RoPE (q/k as-is), per-head q/k RMSNorm
Qwen2MoeForCausalLM    ``qwen2moe``  q/k/v biases, one gated shared expert
OlmoeForCausalLM       ``olmoe``     q/k RMSNorm over the whole projection
=====================  ============  ===========================================

Experts are read either per expert (``experts.<e>.w1`` / ``gate_proj`` ..., the layout
``save_pretrained`` writes) or fused (``experts.gate_up_proj``, transformers >= 5 in memory)
and written stacked, expert index outermost: ``ffn_gate_exps`` (n_expert, n_ff, n_embd).
The tokenizer must be a byte-level BPE ``tokenizer.json`` (GGUF ``tokenizer.ggml.model``
"gpt2", pre-tokenizer "gpt-2").
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

from ..errors import ExpertPredError
from .writer import GGUFTokenizer, write_gguf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFArch:
    """How one transformers MoE family maps onto a llama.cpp architecture."""

    gguf_arch: str
    moe: str  # module name of the MoE block inside a layer
    expert_names: tuple[str, str, str]  # per-expert (gate, up, down) linear names
    permute_qk: bool  # llama arch: interleaved RoPE needs the head-wise q/k permutation
    shared_expert: bool = False


HF_ARCHS: dict[str, HFArch] = {
    "MixtralForCausalLM": HFArch("llama", "block_sparse_moe", ("w1", "w3", "w2"), True),
    "Qwen3MoeForCausalLM": HFArch("qwen3moe", "mlp", ("gate_proj", "up_proj", "down_proj"), False),
    "Qwen2MoeForCausalLM": HFArch("qwen2moe", "mlp", ("gate_proj", "up_proj", "down_proj"), False,
                                  shared_expert=True),
    "OlmoeForCausalLM": HFArch("olmoe", "mlp", ("gate_proj", "up_proj", "down_proj"), False),
}

# Per-layer tensors that map 1:1 (HF suffix after "model.layers.<L>." -> GGUF suffix).
_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "{moe}.gate.weight": "ffn_gate_inp.weight",
    "{moe}.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "{moe}.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "{moe}.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "{moe}.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation: HF's rotate-half (NEOX) row order -> interleaved.

    >>> permute_qk(np.arange(4.0).reshape(4, 1), 1).ravel().tolist()
    [0.0, 2.0, 1.0, 3.0]
    """
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tokenizer_from_json(path: Path) -> GGUFTokenizer:
    """The ``tokenizer.ggml.*`` fields of a byte-level BPE ``tokenizer.json``."""
    spec = json.loads(Path(path).read_text())
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex"):
        raise ExpertPredError(
            f"{path}: expected a byte-level BPE tokenizer (model BPE, pre_tokenizer ByteLevel "
            f"with use_regex), got model {model.get('type')!r}, pre_tokenizer {pre.get('type')!r}"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = spec.get("added_tokens", [])
    for a in added:
        vocab[a["content"]] = a["id"]
    tokens = [""] * len(vocab)
    for text, idx in vocab.items():
        tokens[idx] = text
    if not all(tokens):
        raise ExpertPredError(f"{path}: token ids are not contiguous 0..{len(vocab) - 1}")
    special = {a["id"] for a in added if a.get("special")}
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
             for i in range(len(tokens))]
    # tokenizers >= 0.20 stores merges as [a, b] pairs, older versions as "a b".
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    eot = next((a["id"] for a in added if a["content"] == "<|endoftext|>"), 0)
    return GGUFTokenizer("gpt2", tokens, merges, types, bos_id=eot, eos_id=eot, pre="gpt-2")


def _hparams(cfg: dict, arch: HFArch) -> dict[str, int | float | str | bool]:
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    n_expert = cfg.get("num_local_experts") or cfg["num_experts"]
    expert_ff = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    rope = cfg.get("rope_parameters") or {}
    hp: dict[str, int | float | str | bool] = {
        "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"],
        "block_count": cfg["num_hidden_layers"],
        "feed_forward_length": expert_ff,
        "expert_feed_forward_length": expert_ff,
        "attention.head_count": n_head,
        "attention.head_count_kv": cfg.get("num_key_value_heads") or n_head,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
        "rope.freq_base": float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        "rope.dimension_count": head_dim,
        "expert_count": n_expert,
        "expert_used_count": cfg["num_experts_per_tok"],
        "vocab_size": cfg["vocab_size"],
    }
    if arch.shared_expert:
        hp["expert_shared_feed_forward_length"] = cfg["shared_expert_intermediate_size"]
    return hp


def _stack_experts(sd: dict[str, np.ndarray], prefix: str, arch: HFArch,
                   n_expert: int) -> dict[str, np.ndarray]:
    """Return GGUF (gate, up, down) expert stacks for one layer from either HF layout."""
    fused = f"{prefix}.experts.gate_up_proj"
    if fused in sd:
        gate_up = sd.pop(fused)  # (E, 2 * ff, d): gate rows first, then up rows
        ff = gate_up.shape[1] // 2
        gate, up = gate_up[:, :ff], gate_up[:, ff:]
        down = sd.pop(f"{prefix}.experts.down_proj")  # (E, d, ff)
    else:
        g, u, dn = arch.expert_names
        pick = [[sd.pop(f"{prefix}.experts.{e}.{n}.weight") for e in range(n_expert)]
                for n in (g, u, dn)]
        gate, up, down = (np.stack(p) for p in pick)
    return {"ffn_gate_exps.weight": gate, "ffn_up_exps.weight": up,
            "ffn_down_exps.weight": down}


def hf_to_gguf(hf_dir: Path, out: Path, name: str | None = None) -> Path:
    """Convert ``hf_dir`` (config.json, model.safetensors, tokenizer.json) to f32 GGUF ``out``."""
    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cls = (cfg.get("architectures") or ["?"])[0]
    if cls not in HF_ARCHS:
        raise ExpertPredError(f"{hf_dir / 'config.json'}: architecture {cls!r} is not "
                              f"convertible; expected one of {', '.join(HF_ARCHS)}")
    arch = HF_ARCHS[cls]
    shards = sorted(hf_dir.glob("*.safetensors"))
    if not shards:
        raise ExpertPredError(f"{hf_dir}: no *.safetensors weights found")
    sd: dict[str, np.ndarray] = {}
    for shard in shards:
        sd.update(load_file(str(shard)))
    sd = {k: v.astype(np.float32) for k, v in sd.items()}
    hp = _hparams(cfg, arch)
    n_head, n_kv = hp["attention.head_count"], hp["attention.head_count_kv"]

    tensors: dict[str, np.ndarray] = {}
    for hf_name, gg_name in _GLOBAL_MAP.items():
        if hf_name in sd:
            tensors[gg_name] = sd.pop(hf_name)
    for layer in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        moe = f"{prefix}.{arch.moe}"
        for hf_suffix, gg_suffix in _LAYER_MAP.items():
            key = f"{prefix}.{hf_suffix.format(moe=arch.moe)}"
            if key not in sd:
                continue
            w = sd.pop(key)
            if arch.permute_qk and hf_suffix.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                w = permute_qk(w, n_head if ".q_proj" in hf_suffix else n_kv)
            tensors[f"blk.{layer}.{gg_suffix}"] = w
        for gg_suffix, w in _stack_experts(sd, moe, arch, hp["expert_count"]).items():
            tensors[f"blk.{layer}.{gg_suffix}"] = w
    leftover = [k for k in sd if not re.search(r"rotary_emb|inv_freq", k)]
    if leftover:
        raise ExpertPredError(f"{hf_dir}: {len(leftover)} weights have no GGUF name, "
                              f"e.g. {leftover[0]!r}")
    tok = gguf_tokenizer_from_json(hf_dir / "tokenizer.json")
    name = name or cfg.get("_name_or_path") or hf_dir.parent.name
    log.info("converting %s (%s -> %s, %d tensors)", hf_dir, cls, arch.gguf_arch, len(tensors))
    return write_gguf(out, arch.gguf_arch, name, hp, tensors, tok)
