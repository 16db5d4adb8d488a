"""How much ``expertpred trace --exact`` changes the traced routing, on the shipped models.

    python benchmarks/trace_exact.py --prompts 40

Traces the same prompts (teacher forcing: the prompt tokens only, so both runs see the same
tokens) with llama.cpp's defaults (flash attention on CPU, f16 KV cache) and with exact
numerics (flash attention off, f32 KV cache), and prints per model: the largest router
logit difference, and the share of (token, layer) rows whose top-k set or top-k order
differs. Also the wall time of each run (one run each: indicative only).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from expertpred.shipped import SHIPPED_MODELS, model_gguf, repo_root
from expertpred.trace.llama_tracer import EXACT_CONTEXT, LlamaTracer
from expertpred.trace.prompts import load_prompts


def _trace(model: str, texts: list[str], exact: bool) -> tuple[list, float]:
    t0 = time.perf_counter()
    with LlamaTracer(model_gguf(model), n_ctx=512, n_threads=2,
                     context_params=EXACT_CONTEXT if exact else None) as tr:
        out = [tr.trace(t, max_tokens=0, seq_id=i) for i, t in enumerate(texts)]
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=40)
    a = ap.parse_args()
    texts = [p.text for p in load_prompts(repo_root() / "datasets" / "prompts" / "heldout.jsonl")
             ][:a.prompts]
    for model in SHIPPED_MODELS:
        (dflt, t_d), (exact, t_e) = _trace(model, texts, False), _trace(model, texts, True)
        diff = max(float(np.abs(x.logits - y.logits).max()) for x, y in zip(dflt, exact))
        e_d = np.concatenate([x.experts for x in dflt])
        e_x = np.concatenate([y.experts for y in exact])
        order = float((e_d != e_x).any(axis=2).mean())
        sets = float((np.sort(e_d, axis=2) != np.sort(e_x, axis=2)).any(axis=2).mean())
        print(f"{model}: {len(e_d)} tokens x {e_d.shape[1]} layers; max |logit diff| "
              f"{diff:.2e}; top-k set differs in {100 * sets:.2f}% of rows, order in "
              f"{100 * order:.2f}%; wall {t_d:.1f} s default vs {t_e:.1f} s exact")


if __name__ == "__main__":
    main()
