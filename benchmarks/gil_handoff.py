"""What a numpy call costs on a thread that must share the GIL with a busy Python thread.

The plugin's eval callback runs on llama.cpp's thread; the prefetch engine and the
residency manager run Python threads beside it. A numpy call that releases the GIL (ufunc
loops over a few hundred elements, sorts, ``np.unique``) lets another thread take it, and
the caller then waits until that thread is made to give it back, up to
``sys.getswitchinterval()``. This prints wall and CPU time per call alone and beside one
busy thread, per switch interval:

    python benchmarks/gil_handoff.py --intervals 0.005,0.0005,0.0001
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

A, M, V = np.random.default_rng(0).random(1024), np.eye(32), np.linspace(0, 1, 32)
OPS: dict[str, Callable[[], object]] = {
    "matmul 32x32 @ 32": lambda: M @ V,
    "argpartition 32": lambda: np.argpartition(V, 4),
    "sum of 1024": lambda: A.sum(),
    "add 1024 + 1024": lambda: A + A,
    "unique of 8": lambda: np.unique(V[:8]),
    "pure Python": lambda: sum(range(50)),
}


def measure(calls: int) -> None:
    stop = threading.Event()

    def busy() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    for contended in (False, True):
        if contended:
            threading.Thread(target=busy, daemon=True).start()
            time.sleep(0.05)
        for name, op in OPS.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                op()
            wall = (time.perf_counter() - t0) / calls * 1e6
            cpu = (time.thread_time() - c0) / calls * 1e6
            print(f"  {'busy thread' if contended else 'alone':11s} {name:18s} wall "
                  f"{wall:8.1f} µs  cpu {cpu:6.1f} µs")
    stop.set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--intervals", default="0.005,0.0005,0.0001",
                    help="GIL switch intervals in seconds, one process each")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--child", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        sys.setswitchinterval(a.child)
        measure(a.calls)
        return
    for s in a.intervals.split(","):
        print(f"switch interval {float(s) * 1e3:g} ms", flush=True)
        subprocess.run([sys.executable, __file__, "--child", s, "--calls", str(a.calls)],
                       check=True)


if __name__ == "__main__":
    main()
