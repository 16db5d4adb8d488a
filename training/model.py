"""Build the transformers model a ``TrainConfig`` describes (random init, float32)."""

from __future__ import annotations

import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from .config import TrainConfig

_CLASSES = {
    "mixtral": MixtralForCausalLM,
    "qwen3moe": Qwen3MoeForCausalLM,
    "olmoe": OlmoeForCausalLM,
}


def hf_config(cfg: TrainConfig,
              vocab_size: int) -> MixtralConfig | Qwen3MoeConfig | OlmoeConfig:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.context_length,
        rms_norm_eps=cfg.rms_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        output_router_logits=True,  # training adds the load-balancing loss
        tie_word_embeddings=False,  # llama.cpp gets an explicit output.weight
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    if cfg.arch == "mixtral":
        hf = MixtralConfig(
            intermediate_size=cfg.expert_ff,
            num_local_experts=cfg.n_expert,
            num_experts_per_tok=cfg.n_expert_used,
            **common,
        )
    elif cfg.arch == "olmoe":
        hf = OlmoeConfig(
            intermediate_size=cfg.expert_ff,
            num_experts=cfg.n_expert,
            num_experts_per_tok=cfg.n_expert_used,
            norm_topk_prob=False,  # OLMoE mixes with the raw softmax top-k weights, as
            # llama.cpp's olmoe graph does (build_moe_ffn with norm_w = false)
            clip_qkv=None,  # llama.cpp's olmoe graph has no q/k/v clamp
            **common,
        )
    else:
        hf = Qwen3MoeConfig(
            moe_intermediate_size=cfg.expert_ff,
            intermediate_size=cfg.expert_ff,  # dense-MLP width; unused (every layer is MoE)
            num_experts=cfg.n_expert,
            num_experts_per_tok=cfg.n_expert_used,
            norm_topk_prob=True,  # llama.cpp's qwen3moe graph always renormalises top-k
            decoder_sparse_step=1,
            mlp_only_layers=[],
            **common,
        )
    hf._experts_implementation = cfg.experts_impl
    return hf


def build_model(cfg: TrainConfig, vocab_size: int) -> PreTrainedModel:
    torch.manual_seed(cfg.seed)
    model = _CLASSES[cfg.arch](hf_config(cfg, vocab_size))
    return model.float()
