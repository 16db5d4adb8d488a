"""The residency policies alone on the end-to-end benchmark's own greedy run, by length.

`benchmarks/e2e_prefetch.py` runs one prompt for a few tokens. This replays the same greedy
run (traced on the reference model, any number of tokens) through the cache simulator at
the benchmark's budget, and prints LRU, Belady and `learned` (with a next-use model)
bytes per decode token after 9, 16, 32, 64 and 128 tokens: how much of (c)'s gap to
Belady is the policy's, and how it changes as the run's own history grows.

    python benchmarks/e2e_stream_policy.py --model-name tiny-qwen3moe \
        --widened /tmp/bw-bench/tiny-qwen3moe-3c8f0eff3c73-widened-3gib-f32.gguf \
        --nextuse /tmp/bw-bench/predictors/3c8f0eff3c73/models/nextuse.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from expertpred.gguf.layout import read_layout
from expertpred.learn.cachesim import simulate
from expertpred.predictors.nextuse import NextUseModel
from expertpred.prefetch.plugin import OracleTrace, prompt_tokens
from expertpred.trace.llama_tracer import LlamaTracer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_prefetch import PROMPT  # noqa: E402 - the benchmark's prompt, not a copy

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-name", required=True, help="a shipped model: models/<name>")
    ap.add_argument("--widened", type=Path, required=True,
                    help="the widened GGUF the e2e benchmark ran (expert sizes)")
    ap.add_argument("--nextuse", type=Path, required=True, help="the (c) run's nextuse.npz")
    ap.add_argument("--budget", type=int, default=912680550, help="expert bytes")
    ap.add_argument("--tokens", type=int, default=128, help="greedy tokens to trace")
    ap.add_argument("--cache", type=Path, default=Path("/tmp"), help="where the trace is kept")
    a = ap.parse_args()
    ref = ROOT / "models" / a.model_name / "model.gguf"
    lay = read_layout(a.widened)
    bpe = lay.bytes_per_expert()
    ids = prompt_tokens(ref, PROMPT)
    trace = a.cache / f"e2e-stream-{a.model_name}-{a.tokens}.npz"
    if not trace.exists():
        with LlamaTracer(ref, n_ctx=512, n_threads=1) as tr:
            OracleTrace.from_sequence(tr.trace(ids, a.tokens)).save(trace)
    z = np.load(trace)
    ex, tk = z["experts"].astype(np.int64), z["tokens"].astype(np.int64)
    model = NextUseModel.load(a.nextuse)
    n_p = len(ids)
    print(f"{a.model_name}: {bpe / 2**20:.1f} MiB per expert, budget {a.budget // bpe} of "
          f"{lay.n_expert * len(lay.moe_layers)} experts, prompt {n_p} tokens; GiB read per "
          "decode token (the prompt warms the cache, token-major)")
    for steps in [s for s in (9, 16, 32, 64, 128) if n_p + s <= len(tk)]:
        row = {}
        for pol in ("lru", "belady", "learned"):
            kw = {"model": model} if pol == "learned" else {}
            full = simulate(ex[:n_p + steps], pol, a.budget, bpe, lay.n_expert,
                            tokens=tk[:n_p + steps], **kw)
            warm = simulate(ex[:n_p], pol, a.budget, bpe, lay.n_expert, tokens=tk[:n_p], **kw)
            row[pol] = (full.demand_bytes - warm.demand_bytes) / steps / 2**30
        print(f"  {steps:4d} tokens: LRU {row['lru']:.3f}  Belady {row['belady']:.3f}  "
              f"learned {row['learned']:.3f}  learned / Belady "
              f"{row['learned'] / row['belady']:.2f}  LRU / Belady "
              f"{row['lru'] / row['belady']:.2f}")


if __name__ == "__main__":
    main()
