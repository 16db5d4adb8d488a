"""Routing statistics of a transformers MoE model on held-out text.

Per layer:

- ``keep_rate``: how often token t keeps token t-1's 1st-choice expert (Mixtral paper,
  Sec. 5: ~14 % at layer 0 and 24-28 % in middle layers for 8 experts, vs 12.5 % random);
  ``random_baseline`` = 1 / n_expert, ``marginal_baseline`` = sum_e p_e^2, the keep rate of
  independent tokens with the observed 1st-choice usage p;
- ``topk_overlap``: mean |S_t & S_{t-1}| / k of the top-k sets (baseline k / n_expert);
- ``usage_entropy``: entropy of top-k assignment counts / log(n_expert) (1 = uniform);
  ``min_share`` / ``max_share``: least / most used expert's share times n_expert;
  ``dead_experts``: experts never selected.

``python -m training.route_stats models/tiny-mixtral`` prints them for a shipped model.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@torch.no_grad()
def router_topk(model: PreTrainedModel, windows: np.ndarray, batch: int = 8) -> np.ndarray:
    """Top-k expert ids, best first: int array (n_layer, n_windows, seq_len, k)."""
    model.eval()
    k = model.config.num_experts_per_tok
    per_batch = []
    for i in range(0, len(windows), batch):
        x = torch.as_tensor(windows[i : i + batch])
        out = model(input_ids=x, output_router_logits=True)
        layers = [
            torch.topk(r.float(), k, dim=-1).indices.reshape(x.shape[0], x.shape[1], k)
            for r in out.router_logits
        ]
        per_batch.append(torch.stack(layers).numpy())
    return np.concatenate(per_batch, axis=1)


def layer_stats(topk: np.ndarray, n_expert: int) -> dict[str, float]:
    """Statistics of one layer's choices ``topk`` (n_windows, seq_len, k).

    >>> t = np.array([[[0, 1], [0, 2], [3, 1], [3, 2]]])
    >>> s = layer_stats(t, 4); s["keep_rate"], s["dead_experts"]
    (0.6667, 0)
    """
    k = topk.shape[-1]
    first = topk[..., 0]
    keep = float((first[:, 1:] == first[:, :-1]).mean())
    p1 = np.bincount(first.ravel(), minlength=n_expert) / first.size
    prev, cur = topk[:, :-1, :], topk[:, 1:, :]
    overlap = float((cur[..., :, None] == prev[..., None, :]).any(-1).sum(-1).mean() / k)
    counts = np.bincount(topk.ravel(), minlength=n_expert).astype(np.float64)
    share = counts / counts.sum()
    nz = share[share > 0]
    entropy = float(-(nz * np.log(nz)).sum() / np.log(n_expert))
    return {
        "keep_rate": round(keep, 4),
        "random_baseline": round(1.0 / n_expert, 4),
        "marginal_baseline": round(float((p1**2).sum()), 4),
        "topk_overlap": round(overlap, 4),
        "topk_overlap_baseline": round(k / n_expert, 4),
        "usage_entropy": round(entropy, 4),
        "min_share": round(float(share.min() * n_expert), 4),
        "max_share": round(float(share.max() * n_expert), 4),
        "dead_experts": int((counts == 0).sum()),
    }


def routing_stats(model: PreTrainedModel, windows: dict[str, np.ndarray]) -> list[dict]:
    """Per-layer statistics over all domains' windows, plus the keep rate per domain."""
    n_expert = model.config.num_local_experts if hasattr(model.config, "num_local_experts") \
        else model.config.num_experts
    choices = {d: router_topk(model, w) for d, w in windows.items()}
    rows = []
    for layer in range(model.config.num_hidden_layers):
        everything = np.concatenate([c[layer] for c in choices.values()], axis=0)
        row = {"layer": layer, **layer_stats(everything, n_expert)}
        row["keep_rate_by_domain"] = {
            d: layer_stats(c[layer], n_expert)["keep_rate"] for d, c in choices.items()
        }
        rows.append(row)
    return rows


def heldout_windows(tokenizer, seq_len: int, max_tokens: int) -> dict[str, np.ndarray]:
    """Fixed windows (no training text) from the held-out documents of each domain."""
    from .corpus import load_corpus
    from .data import DOMAINS, fixed_windows, token_stream

    return {
        d: fixed_windows(token_stream(tokenizer, load_corpus("heldout", d)), seq_len, max_tokens)
        for d in DOMAINS
    }


def main(argv: list[str] | None = None) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path, help="models/<name> (with hf/)")
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens per domain")
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    hf = args.model_dir / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    stats = routing_stats(model, heldout_windows(tok, args.seq_len, args.tokens))
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
