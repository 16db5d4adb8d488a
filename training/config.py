"""The training configuration: one frozen dataclass, TOML files that change defaults, and
``--key=value`` overrides checked against the dataclass.

Loading is :func:`expertpred.learn.config.load_config`, the loader the predictor recipe
uses too: an unknown key or a value of the wrong type is a ``ConfigError`` whose one-line
message names the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from expertpred.learn.config import ConfigError
from expertpred.learn.config import load_config as load_dataclass_config

ARCHS = ("mixtral", "qwen3moe", "olmoe")


@dataclass(frozen=True)
class TrainConfig:
    # --- identity / output -------------------------------------------------------------
    name: str = "tiny-mixtral"  # output dir models/<name>/ and GGUF general.name
    arch: str = "mixtral"  # HF family: "mixtral" (GGUF arch llama), "qwen3moe" or "olmoe"
    out_root: str = "models"  # parent of the output dir; tests point it at a tmp dir

    # --- corpus / tokenizer ------------------------------------------------------------
    vocab_size: int = 3072  # small BPE: big enough for code idioms, keeps embeddings cheap
    code_max_bytes: int = 3_000_000  # cap on training code: ~1 M tokens, more than one run
    # reads, and keeps tokenizer training + tokenization to a few seconds
    prose_fraction: float = 0.35  # share of batch rows drawn from prose (~5 % of bytes):
    # upsampling so the prose domain is learned, not drowned by code

    # --- model shape -------------------------------------------------------------------
    n_layer: int = 8  # >= 8 so there are "early", "middle" and "late" layers to study
    n_embd: int = 160  # hidden size; with the FFN width this keeps the f32 GGUF < 40 MB
    n_head: int = 4  # attention heads (head_dim below times n_head may differ from n_embd)
    n_kv_head: int = 2  # grouped-query attention like the real models (GGUF head_count_kv)
    head_dim: int = 40  # per-head width; rope.dimension_count in the GGUF
    n_expert: int = 8  # experts per MoE layer (GGUF expert_count)
    n_expert_used: int = 2  # top-k routing (GGUF expert_used_count)
    expert_ff: int = 160  # expert FFN width (GGUF expert_feed_forward_length)
    rope_theta: float = 10000.0  # short contexts: the classic base is plenty
    rms_eps: float = 1e-5  # RMSNorm epsilon, written to the GGUF as-is
    router_aux_loss_coef: float = 0.02  # per-layer load-balancing loss weight: no dead experts
    context_length: int = 1024  # GGUF context_length; > seq_len so traces can be longer

    # --- optimisation ------------------------------------------------------------------
    seq_len: int = 256  # training window in tokens
    batch_size: int = 8  # windows per step: 2k tokens per step fits the 2-core budget
    max_steps: int = 700  # sized from measured steps/s so a run takes ~10-12 min
    lr: float = 3e-3  # peak AdamW LR; tiny models tolerate (and need) a high LR
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 40  # linear warmup, then cosine decay
    weight_decay: float = 0.1  # on matrices only (not norms / router-free vectors)
    beta2: float = 0.95  # AdamW beta2: the usual LM choice for short noisy runs
    grad_clip: float = 1.0  # global grad-norm clip: stabilises early routing
    seed: int = 1234  # torch + numpy seed: the same command gives the same model
    threads: int = 1  # torch threads. The 2-core box is shared: with 2, torch's OpenMP
    # workers spin-wait whenever another process holds a core (measured 0.18 vs 0.73 steps/s)
    experts_impl: str = "eager"  # transformers experts kernel; eager is fastest on CPU here

    # --- evaluation / logging ----------------------------------------------------------
    eval_every: int = 200  # steps between validation-loss evaluations (each costs ~10 s)
    eval_tokens: int = 32768  # validation tokens per domain (fixed windows, same each time)
    stats_tokens: int = 32768  # held-out tokens per domain for the routing statistics
    log_every: int = 10  # steps between progress log lines

    def validate(self) -> TrainConfig:
        """Check cross-field constraints; returns self so it can be chained."""
        checks = [
            (self.arch in ARCHS, f"arch: expected one of {ARCHS}, got {self.arch!r}"),
            (0 < self.n_expert_used <= self.n_expert,
             f"n_expert_used: expected 1..n_expert={self.n_expert}, got {self.n_expert_used}"),
            (self.n_head % self.n_kv_head == 0,
             f"n_kv_head: expected a divisor of n_head={self.n_head}, got {self.n_kv_head}"),
            (self.head_dim % 2 == 0, f"head_dim: expected an even int, got {self.head_dim}"),
            (0.0 <= self.prose_fraction <= 1.0,
             f"prose_fraction: expected a float in [0, 1], got {self.prose_fraction}"),
            (self.warmup_steps < self.max_steps,
             f"warmup_steps: expected < max_steps={self.max_steps}, got {self.warmup_steps}"),
        ]
        if self.arch == "olmoe":
            # llama.cpp's olmoe loader makes attn_q/attn_output {n_embd, n_embd} and
            # attn_k_norm {n_embd}: the heads must tile n_embd exactly and there is no GQA.
            checks += [
                (self.n_head * self.head_dim == self.n_embd,
                 f"head_dim: olmoe needs n_head * head_dim == n_embd={self.n_embd}, got "
                 f"{self.n_head} * {self.head_dim}"),
                (self.n_kv_head == self.n_head,
                 f"n_kv_head: olmoe has no GQA, expected n_head={self.n_head}, "
                 f"got {self.n_kv_head}"),
            ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self


def load_config(path: Path | None = None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the TOML file (if any), then ``--key=value`` overrides."""
    return load_dataclass_config(TrainConfig, path, overrides).validate()


def config_dict(cfg: TrainConfig) -> dict[str, object]:
    return dataclasses.asdict(cfg)
