"""Time to read a GGUF's layout: the bounded header walker vs gguf.GGUFReader, side by side.

    python benchmarks/gguf_header.py --rounds 5

``read_layout`` used to build ``gguf.GGUFReader`` (which makes a numpy view of every
metadata array item, the tokenizer included); it now walks the header itself and skips
array payloads. Per shipped model and round: both times, their ratio; then the median and
range of the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import gguf

from expertpred.gguf.layout import read_layout
from expertpred.shipped import SHIPPED_MODELS, model_gguf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    for name in SHIPPED_MODELS:
        path = model_gguf(name)
        read_layout(path), gguf.GGUFReader(str(path))  # warm: imports, page cache
        ratios = []
        for r in range(a.rounds):
            t0 = time.perf_counter()
            read_layout(path)
            t1 = time.perf_counter()
            gguf.GGUFReader(str(path))
            t2 = time.perf_counter()
            ratios.append((t2 - t1) / (t1 - t0))
            print(f"{name} round {r + 1}: read_layout {1e3 * (t1 - t0):.1f} ms, "
                  f"GGUFReader {1e3 * (t2 - t1):.1f} ms, ratio {ratios[-1]:.1f}x")
        print(f"{name}: GGUFReader / read_layout median {statistics.median(ratios):.1f}x "
              f"(range {min(ratios):.1f}-{max(ratios):.1f}) over {a.rounds} rounds")


if __name__ == "__main__":
    main()
