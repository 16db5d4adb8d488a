"""Train one shipped tiny MoE model end to end.

    python -m training.train_lm --config training/configs/tiny-mixtral.toml [--key=value ...]

Steps: (1) corpus splits, (2) byte-level BPE on the training split, (3) token streams,
(4) AdamW with linear warmup + cosine decay on LM loss + router load-balancing loss,
(5) validation / unigram / routing statistics, (6) ``models/<name>/``: ``hf/``,
``model.gguf`` (f32), ``card.json`` and ``README.md``.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from expertpred.gguf.convert import hf_to_gguf
from expertpred.gguf.layout import file_sha256

from .card import write_readme
from .config import ConfigError, TrainConfig, config_dict, load_config
from .corpus import describe_corpus, load_corpus
from .data import (
    DOMAINS,
    BatchSampler,
    cap_documents,
    empirical_entropy,
    fixed_windows,
    token_stream,
    unigram_cross_entropy,
)
from .model import build_model
from .route_stats import heldout_windows, routing_stats
from .tokenizer import hf_fast_tokenizer, train_tokenizer

log = logging.getLogger("training.train_lm")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to ``cfg.lr * cfg.min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * min(t, 1.0)))


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, computed per layer and averaged (1.0 = balanced).

    transformers' ``load_balancing_loss_func`` concatenates all layers' router logits before
    computing ``E * sum_e f_e * P_e``, so one layer may starve an expert while another
    compensates; measured on a first run: dead experts and 1st-choice shares up to 3.9x
    uniform. Per layer, every router is pushed towards balance.
    """
    per_layer = []
    for logits in router_logits:  # (n_tokens, n_expert)
        probs = logits.float().softmax(-1)
        n_expert = probs.shape[-1]
        chosen = F.one_hot(probs.topk(k, dim=-1).indices, n_expert).float()  # (N, k, E)
        f = chosen.sum(1).mean(0) / k  # fraction of assignments per expert, sums to 1
        p = probs.mean(0)  # mean router probability per expert
        per_layer.append(n_expert * (f * p).sum())
    return torch.stack(per_layer).mean()


def lm_loss(model, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token cross-entropy, per-layer load-balancing loss) of windows (B, T+1)."""
    out = model(input_ids=windows[:, :-1], output_router_logits=True)
    ce = F.cross_entropy(out.logits.flatten(0, 1), windows[:, 1:].flatten())
    return ce, load_balancing_loss(out.router_logits, model.config.num_experts_per_tok)


@torch.no_grad()
def eval_loss(model, windows: np.ndarray, batch: int = 16) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch):
        w = torch.as_tensor(windows[i : i + batch])
        ce, _ = lm_loss(model, w)
        total += ce.item() * len(w)
    model.train()
    return total / len(windows)


def train(cfg: TrainConfig, command: str) -> dict:
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_root) / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. corpus: training code capped (hash order), prose whole
    train_docs = {d: load_corpus("train", d) for d in DOMAINS}
    train_docs["code"] = cap_documents(train_docs["code"], cfg.code_max_bytes)
    valid_docs = {d: load_corpus("valid", d) for d in DOMAINS}

    # 2. tokenizer on the training split only
    tok = train_tokenizer([doc.text for d in DOMAINS for doc in train_docs[d]], cfg.vocab_size)
    vocab = tok.get_vocab_size()

    # 3. token streams and fixed validation windows
    train_streams = {d: token_stream(tok, train_docs[d]) for d in DOMAINS}
    valid_windows = {d: fixed_windows(token_stream(tok, valid_docs[d]), cfg.seq_len,
                                      cfg.eval_tokens) for d in DOMAINS}
    train_windows = {d: fixed_windows(train_streams[d], cfg.seq_len, cfg.eval_tokens)
                     for d in DOMAINS}
    log.info("tokens: train %s, valid windows %s (vocab %d, %.1fs)",
             {d: len(s) for d, s in train_streams.items()},
             {d: len(w) for d, w in valid_windows.items()}, vocab, time.time() - t0)

    # 4. model + optimiser
    model = build_model(cfg, vocab)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, cfg.beta2),
    )
    sampler = BatchSampler(train_streams, cfg.seq_len, cfg.batch_size, cfg.prose_fraction,
                           cfg.seed)
    log.info("model %s: %.2f M params, %d steps x %d tokens", cfg.arch, n_params / 1e6,
             cfg.max_steps, cfg.batch_size * cfg.seq_len)

    history, recent = [], []
    t_train = time.time()
    for step in range(cfg.max_steps):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = torch.as_tensor(sampler.next())
        ce, aux = lm_loss(model, batch)
        loss = ce + cfg.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        recent.append(ce.item())
        recent = recent[-50:]
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            el = time.time() - t_train
            log.info("step %d/%d lr %.2e loss %.4f aux %.4f | %.2f steps/s, eta %.0fs",
                     done, cfg.max_steps, lr, ce.item(), aux.item(), done / el,
                     (cfg.max_steps - done) * el / done)
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            v = {d: eval_loss(model, valid_windows[d]) for d in DOMAINS}
            history.append({"step": done, "train_loss_avg50": float(np.mean(recent)),
                            **{f"valid_{d}": round(x, 4) for d, x in v.items()}})
            log.info("eval step %d: %s", done, history[-1])
    train_wall = time.time() - t_train

    # 5. final losses, unigram baseline, routing statistics on held-out text
    weights = {"code": 1.0 - cfg.prose_fraction, "prose": cfg.prose_fraction}
    losses = {}
    for d in DOMAINS:
        targets = valid_windows[d][:, 1:].ravel()
        losses[d] = {
            "train": round(eval_loss(model, train_windows[d]), 4),
            "valid": round(eval_loss(model, valid_windows[d]), 4),
            "valid_unigram": round(unigram_cross_entropy(train_streams, weights, targets,
                                                         vocab), 4),
            "valid_unigram_oracle": round(empirical_entropy(targets), 4),
        }
    mix = {k: round(sum(weights[d] * losses[d][k] for d in DOMAINS), 4)
           for k in losses["code"]}
    losses["mixture"] = mix
    log.info("losses (nats/token): %s", losses)
    model.eval()
    stats = routing_stats(model, heldout_windows(tok, cfg.seq_len, cfg.stats_tokens))
    for row in stats:
        log.info("layer %d keep %.3f (random %.3f, marginal %.3f) entropy %.3f dead %d",
                 row["layer"], row["keep_rate"], row["random_baseline"],
                 row["marginal_baseline"], row["usage_entropy"], row["dead_experts"])

    # 6. save: HF checkpoint, GGUF, card
    hf_dir = out_dir / "hf"
    model.config.output_router_logits = False  # inference default for users of the checkpoint
    model.save_pretrained(hf_dir, safe_serialization=True)
    hf_fast_tokenizer(tok).save_pretrained(hf_dir)
    gguf_path = hf_to_gguf(hf_dir, out_dir / "model.gguf", name=cfg.name)
    card = {
        "name": cfg.name,
        "hf_architecture": type(model).__name__,
        "gguf_architecture": "llama" if cfg.arch == "mixtral" else cfg.arch,
        "config": config_dict(cfg),
        "n_params": n_params,
        "vocab_size": vocab,
        "corpus": describe_corpus(),
        "code_train_bytes_used": sum(len(d.text.encode()) for d in train_docs["code"]),
        "tokens_seen": cfg.max_steps * cfg.batch_size * cfg.seq_len,
        "train_stream_tokens": {d: int(len(s)) for d, s in train_streams.items()},
        "aux_loss": "per-layer Switch load-balancing loss (training.train_lm.load_balancing_loss)"
                    f" x {cfg.router_aux_loss_coef}",
        "loss": losses,
        "loss_history": history,
        "routing_stats_heldout": stats,
        "gguf": {"file": "model.gguf", "bytes": gguf_path.stat().st_size,
                 "sha256": file_sha256(gguf_path), "dtype": "f32"},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": __import__("transformers").__version__,
                        "tokenizers": __import__("tokenizers").__version__},
        "command": command,
        "train_wall_seconds": round(train_wall, 1),
        "total_wall_seconds": round(time.time() - t0, 1),
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    write_readme(out_dir / "README.md", card)
    log.info("wrote %s in %.0fs", out_dir, time.time() - t0)
    return card


def parse_args(argv: list[str]) -> tuple[Path | None, list[str]]:
    """Split ``--config PATH`` / ``--config=PATH`` from the ``--key=value`` overrides."""
    config, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config: expected a path to a TOML file")
            config, i = Path(argv[i + 1]), i + 2
            continue
        if arg.startswith("--config="):
            config = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return config, rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        path, overrides = parse_args(argv)
        cfg = load_config(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    command = "python -m training.train_lm " + " ".join(shlex.quote(a) for a in argv)
    train(cfg, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
