"""Cold-cache read bandwidth of each prefetch I/O method × queue depth vs. O_DIRECT.

Reads whole experts of a multi-GB random GGUF in a realistic order (per token, per layer,
the top-k of a random routing; each expert once per run) through ``PrefetchEngine`` and
times until every requested page is in the page cache (for the hint methods ``fadvise``
and ``madvise`` that means polling ``mincore``). The page cache is emptied before every run
(``POSIX_FADV_DONTNEED`` on the whole file, plus ``echo 1 > /proc/sys/vm/drop_caches`` with
``--drop-caches``) and checked cold with ``mincore``. The device's O_DIRECT sequential
bandwidth (``dd bs=4M iflag=direct``, and ``fio`` at iodepth 16 when installed) is measured
in the same run, between the method runs. The disk is virtual and the host may cache it,
so only ratios within one run mean anything; method order alternates across rounds.

    python benchmarks/io_bandwidth.py                      # default: 3 rounds, 2 GB per run
    python benchmarks/io_bandwidth.py --methods pread,io_uring --depths 4,8 --rounds 1
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from pagecache import evict

from expertpred.gguf.layout import MoELayout, read_layout
from expertpred.gguf.random_models import SyntheticSpec, write_random_moe
from expertpred.prefetch import METHODS, PrefetchEngine
from expertpred.prefetch.sysmem import FileMapping

log = logging.getLogger("io_bandwidth")

BENCH_FILE = Path("/tmp/expertpred-bench/moe-2048x4096x8x16-f16.gguf")
# ~6.8 GB, 16 layers x 8 experts x 50 MiB per expert (f16)
BENCH_SPEC = SyntheticSpec(arch="llama", n_layer=16, n_embd=2048, n_head=16, n_head_kv=4,
                           n_expert=8, n_expert_used=2, n_ff=4096, dtype="f16")


def ensure_file(path: Path) -> Path:
    if path.exists():
        return path
    free = shutil.disk_usage(path.parent if path.parent.exists() else "/").free
    if free < 10e9:
        sys.exit(f"{path.parent}: {free / 1e9:.1f} GB free, the benchmark file needs ~7 GB")
    print(f"writing {path} (~6.8 GB, a few minutes) ...", flush=True)
    return write_random_moe(path, BENCH_SPEC)


def workload(layout: MoELayout, budget: int, seed: int, k: int) -> list[tuple[int, int]]:
    """Whole experts in routing order: token by token, layer by layer, random top-k."""
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, int]] = set()
    keys, total = [], 0
    while total < budget and len(seen) < len(layout.moe_layers) * layout.n_expert:
        for layer in layout.moe_layers:
            for e in rng.permutation(layout.n_expert)[:k]:
                key = (layer, int(e))
                if key in seen:
                    continue
                seen.add(key)
                keys.append(key)
                total += layout.bytes_per_expert(layer)
                if total >= budget:
                    return keys
    return keys


def ranges_of(layout: MoELayout, keys: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(s.offset, s.nbytes) for layer, e in keys for s in layout.expert_slices(layer, e)]


def resident(fm: FileMapping, ranges: list[tuple[int, int]]) -> float:
    return fm.resident_fraction(ranges)


def run_method(path: Path, layout: MoELayout, fm: FileMapping, method: str, qd: int,
               keys: list[tuple[int, int]], chunk: int, readahead: bool,
               drop_caches: bool) -> tuple[float, float]:
    """GB/s until every requested byte is cached, and the resident share at the end."""
    ranges = ranges_of(layout, keys)
    nbytes = sum(n for _, n in ranges)
    evict(path, drop_caches)
    cold = resident(fm, ranges)
    if cold > 0.01:
        log.warning("%s qd=%d: %.1f%% of the workload still cached after eviction",
                    method, qd, 100 * cold)
    eng = PrefetchEngine(path, layout, method=method, queue_depth=qd,
                         max_queue=len(keys) + 1, chunk_bytes=chunk, readahead=readahead)
    with eng:
        t0 = time.perf_counter()
        for layer, e in keys:
            eng.request(layer, [e])
        eng.wait_idle(timeout=120)
        todo = list(ranges)
        deadline = time.monotonic() + 120
        while todo and time.monotonic() < deadline:  # hint methods: wait for the pages
            todo = [r for r in todo if fm.mincore(*r).mean() < 1.0]
            if todo:
                time.sleep(0.002)
        dt = time.perf_counter() - t0
        st = eng.stats()
    if st.counters.failed or not st.enabled:
        log.warning("%s qd=%d: %d errors, enabled=%s", method, qd, st.counters.failed,
                    st.enabled)
    return nbytes / dt / 1e9, resident(fm, ranges)


def o_direct_dd(path: Path, offset: int, nbytes: int) -> float:
    bs = 4 << 20
    cmd = ["dd", f"if={path}", "of=/dev/null", f"bs={bs}", "iflag=direct",
           f"skip={offset // bs}", f"count={nbytes // bs}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    if not m:
        raise RuntimeError(f"cannot parse dd output: {out!r}")
    return int(m[1]) / float(m[2]) / 1e9


def o_direct_fio(path: Path, offset: int, nbytes: int, depth: int = 16) -> float | None:
    if shutil.which("fio") is None:
        return None
    cmd = ["fio", "--name=seq", f"--filename={path}", "--rw=read", "--bs=4M", "--direct=1",
           "--ioengine=libaio", f"--iodepth={depth}", f"--offset={offset}",
           f"--size={nbytes}", "--readonly", "--output-format=terse", "--terse-version=3"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    fields = out.strip().splitlines()[-1].split(";")
    return int(fields[6]) * 1024 / 1e9  # terse v3: field 7 = read bandwidth in KiB/s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=BENCH_FILE)
    ap.add_argument("--methods", default=",".join(["pread", "fadvise", "madvise", "io_uring"]))
    ap.add_argument("--depths", default="1,2,4,8,16")
    ap.add_argument("--gb", type=float, default=2.0, help="GB of experts read per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk-mib", type=float, default=2.0)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--readahead", action="store_true",
                    help="leave kernel readahead on (default: POSIX_FADV_RANDOM on our fd)")
    ap.add_argument("--drop-caches", action="store_true",
                    help="also echo 1 > /proc/sys/vm/drop_caches before each run (root)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    path = ensure_file(args.file)
    layout = read_layout(path)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            sys.exit(f"unknown method {m!r}: expected one of {', '.join(METHODS)}")
    depths = [int(d) for d in args.depths.split(",")]
    budget = int(args.gb * 1e9)
    chunk = int(args.chunk_mib * (1 << 20))
    first = int(layout.offsets.min()) // (4 << 20) * (4 << 20)  # O_DIRECT needs alignment
    print(f"file {path} ({layout.file_size / 1e9:.2f} GB, {layout.expert_bytes / 1e9:.2f} GB "
          f"experts, {layout.bytes_per_expert() / 2**20:.0f} MiB per expert), "
          f"{args.gb:g} GB per run, chunk {args.chunk_mib:g} MiB, "
          f"readahead {'on' if args.readahead else 'off'}, kernel {os.uname().release}",
          flush=True)

    results: dict[tuple[str, int], list[float]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    dd: list[float] = []
    fio: list[float] = []
    cells = [(m, d) for m in methods for d in depths]
    span = int(layout.expert_bytes) - budget
    with FileMapping(path) as fm:
        for r in range(args.rounds):
            keys = workload(layout, budget, seed=r, k=args.top_k)
            order = cells if r % 2 == 0 else cells[::-1]
            if r % 3 == 2:
                order = cells[len(cells) // 2:] + cells[: len(cells) // 2]
            for m, d in order:
                # the O_DIRECT reference right before each run, at a rotating offset so it
                # is not always the same (host-cached) region
                off = first + (len(dd) * budget) % max(span, 1) // (4 << 20) * (4 << 20)
                ref = o_direct_dd(path, off, budget)
                dd.append(ref)
                gbps, res = run_method(path, layout, fm, m, d, keys, chunk, args.readahead,
                                       args.drop_caches)
                results.setdefault((m, d), []).append(gbps)
                ratios.setdefault((m, d), []).append(gbps / ref)
                print(f"round {r} {m:>8} qd={d:<2} {gbps:6.3f} GB/s  resident {res:.3f}  "
                      f"(O_DIRECT dd just before: {ref:.3f} GB/s)", flush=True)
            f = o_direct_fio(path, first, budget)
            if f is not None:
                fio.append(f)
                print(f"round {r} O_DIRECT fio iodepth=16: {f:.3f} GB/s", flush=True)

    ref = statistics.median(dd)
    print()
    print(f"O_DIRECT sequential, dd bs=4M iflag=direct (QD1): median {ref:.3f} GB/s over "
          f"{len(dd)} runs (min {min(dd):.3f}, max {max(dd):.3f})")
    if fio:
        f = statistics.median(fio)
        print(f"O_DIRECT sequential, fio bs=4M libaio iodepth=16: median {f:.3f} GB/s "
              f"over {len(fio)} runs")
    print()
    print("median GB/s over rounds (ratio to the median O_DIRECT dd); cold page cache, "
          "whole experts, random top-k order")
    print("| method | " + " | ".join(f"qd {d}" for d in depths) + " |")
    print("| --- |" + " --- |" * len(depths))
    best = (0.0, "")
    for m in methods:
        row = []
        for d in depths:
            v = statistics.median(results[(m, d)])
            row.append(f"{v:.3f} ({v / ref:.2f})")
            best = max(best, (v, f"{m} qd {d}"))
        print(f"| {m} | " + " | ".join(row) + " |")
    print()
    print("median of paired ratios (each run / the O_DIRECT dd run just before it)")
    print("| method | " + " | ".join(f"qd {d}" for d in depths) + " |")
    print("| --- |" + " --- |" * len(depths))
    for m in methods:
        row = [f"{statistics.median(ratios[(m, d)]):.2f}" for d in depths]
        print(f"| {m} | " + " | ".join(row) + " |")
    print()
    print(f"best: {best[1]}: {best[0]:.3f} GB/s = {best[0] / ref:.2f} of the median "
          "O_DIRECT dd")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
