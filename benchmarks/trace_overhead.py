"""Tracing overhead of LlamaTracer: tokens/s traced ÷ untraced, measured alternately.

For each model, every round runs the same workloads once traced (``LlamaTracer.trace``) and
once untraced (``LlamaTracer.generate``, same model, settings, decode steps and sampler, on a
context without the eval callback), alternating which goes first. Reports the median ratio
over rounds per workload:

* ``prefill``: prompts of ``--prompt-tokens`` tokens, no generation (batched prompt
  processing; the traced run also computes vocab logits for every prompt token, which
  llama.cpp needs to run the last layer for every token);
* ``decode``: an 8-token prompt and ``--gen-tokens`` greedy tokens (one token per decode).

``ratio`` is the median over rounds of traced ÷ untraced wall-clock tokens/s (min and max
shown); ``cpu ratio`` the same with this process's CPU time, which is steadier on a shared
machine. On an oversubscribed machine (load above the core count) use ``--threads 1``:
with several llama.cpp threads every graph barrier can wait for a descheduled worker, both
runs slow down by an order of magnitude, and the traced run — two extra graph splits per
MoE layer — suffers more; the ratio then measures the machine, not the tracer.

Models: the shipped tiny models (those present) and a larger random MoE GGUF written to /tmp
(arch llama, n_embd 1024, 8 layers, 8 experts top-2, expert width 2048, f16), because the
per-token compute of the tiny models is so small that fixed per-node callback costs dominate.

    python benchmarks/trace_overhead.py [--model M.gguf ...] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from expertpred.gguf.layout import read_layout
from expertpred.gguf.random_models import SyntheticSpec, write_random_moe
from expertpred.trace.llama_tracer import LlamaTracer

log = logging.getLogger(__name__)

BIG_SPEC = SyntheticSpec(arch="llama", n_layer=8, n_embd=1024, n_head=16, n_head_kv=4,
                         n_expert=8, n_expert_used=2, n_ff=2048, n_ctx=1024, dtype="f16",
                         seed=1)


def _prompts(tracer: LlamaTracer, n_prompts: int, n_tokens: int, seed: int) -> list[list[int]]:
    """Random token ids (avoiding id 0 / specials is not needed: llama.cpp takes any id)."""
    rng = np.random.default_rng(seed)
    hi = min(tracer.n_vocab_, 256)
    return [rng.integers(1, hi, size=n_tokens).tolist() for _ in range(n_prompts)]


def _timed(fn, prompts: list[list[int]], max_tokens: int) -> tuple[int, float, float]:
    """(tokens, wall seconds, process CPU seconds) for running ``fn`` over ``prompts``."""
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for p in prompts:
        out = fn(p, max_tokens)
        n += len(out.tokens)
    return n, time.perf_counter() - t0, time.process_time() - c0


def bench_model(path: Path, rounds: int, threads: int, prompt_tokens: int, gen_tokens: int,
                n_prompts: int, min_seconds: float) -> list[dict[str, object]]:
    layout = read_layout(path)
    rows: list[dict[str, object]] = []
    with LlamaTracer(path, n_ctx=max(512, prompt_tokens + gen_tokens + 16), n_threads=threads,
                     n_batch=512) as tr:
        workloads = {
            "prefill": (_prompts(tr, n_prompts, prompt_tokens, 0), 0),
            "decode": (_prompts(tr, n_prompts, 8, 1), gen_tokens),
        }
        for name, (prompts, max_tokens) in workloads.items():
            # warm-up both contexts (first-touch of weights, graph allocation), then repeat
            # the prompt list so that one measurement takes >= min_seconds
            tr.trace(prompts[0], max_tokens)
            _, once, _ = _timed(tr.generate, prompts, max_tokens)
            prompts = prompts * max(1, int(np.ceil(min_seconds / max(once, 1e-6))))
            ratios, cpu_ratios, traced_tps, plain_tps = [], [], [], []
            for r in range(rounds):
                order = [("traced", tr.trace), ("plain", tr.generate)]
                if r % 2:
                    order.reverse()
                tps, cps = {}, {}
                for label, fn in order:
                    n, wall, cpu = _timed(fn, prompts, max_tokens)
                    tps[label], cps[label] = n / wall, n / cpu
                ratios.append(tps["traced"] / tps["plain"])
                cpu_ratios.append(cps["traced"] / cps["plain"])
                traced_tps.append(tps["traced"])
                plain_tps.append(tps["plain"])
            rows.append({
                "model": str(path),
                "arch": layout.arch, "layers": len(layout.moe_layers),
                "E": layout.n_expert, "k": layout.n_expert_used, "workload": name,
                "plain_tps": statistics.median(plain_tps),
                "traced_tps": statistics.median(traced_tps),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios),
                "cpu_ratio_median": statistics.median(cpu_ratios),
            })
    return rows


def bytes_per_token_layer(path: Path, n_embd_hidden: bool) -> tuple[int, int, int]:
    """(bytes copied out of ggml, bytes stored in SequenceTrace, + hidden f16) per token·layer.

    Copied: scores E·4 + argsort (k·4 at decode, E·4 per token at prefill) + weights k·4;
    stored: logits E·4 + experts k·2 + weights k·4; hidden adds n_embd·4 copied / ·2 stored.
    """
    lay = read_layout(path)
    e, k, d = lay.n_expert, lay.n_expert_used, lay.n_embd
    copied = e * 4 + k * 4 + k * 4
    stored = e * 4 + k * 2 + k * 4
    return copied, stored, d * 2 if n_embd_hidden else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, nargs="*",
                    default=[Path("models/tiny-mixtral/model.gguf"),
                             Path("models/tiny-qwen3moe/model.gguf")])
    ap.add_argument("--big", type=Path, default=Path("/tmp/expertpred-bench-big-moe.gguf"))
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=1.0,
                    help="repeat the prompts until one measurement takes about this long")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    models: list[Path] = []
    for m in args.model:
        if m.exists():
            models.append(m)
        else:
            print(f"# {m}: absent, skipped")
    if not args.skip_big:
        if not args.big.exists():
            t0 = time.perf_counter()
            write_random_moe(args.big, BIG_SPEC)
            print(f"# wrote {args.big} ({args.big.stat().st_size / 1e6:.0f} MB) "
                  f"in {time.perf_counter() - t0:.1f} s")
        models.append(args.big)

    rows = []
    for m in models:
        rows += bench_model(m, args.rounds, args.threads, args.prompt_tokens, args.gen_tokens,
                            args.prompts, args.min_seconds)

    hdr = (f"{'model':<40} {'arch':<8} {'L':>3} {'E':>3} {'k':>2} {'workload':<8} "
           f"{'plain tok/s':>11} {'traced tok/s':>12} {'ratio':>6} {'[min, max]':>14} "
           f"{'cpu ratio':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['model']:<40} {r['arch']:<8} {r['layers']:>3} {r['E']:>3} {r['k']:>2} "
              f"{r['workload']:<8} {r['plain_tps']:>11.1f} {r['traced_tps']:>12.1f} "
              f"{r['ratio_median']:>6.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}] "
              f"{r['cpu_ratio_median']:>9.3f}")
    print()
    print(f"{'model':<40} {'copied B/tok/layer':>19} {'stored B/tok/layer':>19} "
          f"{'+hidden f16':>12}")
    for m in models:
        c, s, h = bytes_per_token_layer(m, True)
        print(f"{str(m):<40} {c:>19} {s:>19} {h:>12}")


if __name__ == "__main__":
    main()
