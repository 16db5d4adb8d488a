"""Cost of the prefetch plugin's hook: decode tokens/s with ``PrefetchLlama`` in mode ``d0``
÷ the same model with the plugin off (stock llama.cpp context, no callback).

Every round opens one instance at a time (two ``Llama`` objects in one process crashed
llama.cpp here), alternating which mode goes first, and times greedy decodes of a few short
prompts. Prints the median ratio over rounds with its range. The tiny models are page-cache
resident, so d0's reads are nearly free and the ratio is the hook's own cost on the
inference thread. On a loaded machine (load above the core count) the ratio measures the
machine: compare only runs made side by side.

    python benchmarks/plugin_overhead.py [--model M.gguf ...] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from expertpred.prefetch.plugin import PrefetchLlama, generate_greedy

PROMPTS = ["def read_config(path):\n", "import os\nimport sys\n", "class Cache:\n    def "]


def decode_tps(path: Path, mode: str, threads: int, tokens: int, repeats: int) -> float:
    """Decode tokens/s of greedy runs over :data:`PROMPTS` (one warm-up run first)."""
    kw = dict(n_ctx=512, n_threads=threads, n_threads_batch=threads, seed=0)
    with PrefetchLlama(path, mode=mode, **kw) as llm:
        generate_greedy(llm, PROMPTS[0], 8)
        n, secs = 0, 0.0
        for _ in range(repeats):
            for p in PROMPTS:
                toks, _, _, decode_s = generate_greedy(llm, p, tokens)
                n += len(toks) - 1  # the last token is sampled, not decoded
                secs += decode_s
    return n / secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, nargs="*",
                    default=[Path("models/tiny-mixtral/model.gguf"),
                             Path("models/tiny-qwen3moe/model.gguf")])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    for path in args.model:
        tps: dict[str, list[float]] = {"off": [], "d0": []}
        for r in range(args.rounds):
            for mode in (("off", "d0") if r % 2 == 0 else ("d0", "off")):
                tps[mode].append(decode_tps(path, mode, args.threads, args.tokens, args.repeats))
        ratios = [a / b for a, b in zip(tps["d0"], tps["off"])]
        print(f"{path}: d0 / off decode tok/s median {statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}, {max(ratios):.3f}] over {args.rounds} rounds "
              f"(off {statistics.median(tps['off']):.0f} tok/s, "
              f"d0 {statistics.median(tps['d0']):.0f} tok/s)")


if __name__ == "__main__":
    main()
