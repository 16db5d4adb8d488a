"""Replay routing traces through predictor → PrefetchEngine → BufferManager on a real file.

Synthetic routing traces (``expertpred.predictors.synthetic``) shaped like the benchmark
GGUF (16 MoE layers × 8 experts, k = 2) are replayed token by token, layer by layer, over
the multi-GB random model of ``benchmarks/io_bandwidth.py``:

1. ``advance(layer)``; the layer's true experts are used: ``on_use`` + a synchronous
   demand read (``pread``) of every used expert whose pages are not all resident — the
   stall a page fault would cost llama.cpp; demand-read experts are admitted to the buffer;
2. ``OnlineFeatures.update`` with the layer's routing, and the predictor's top-k for layer
   ``l + d`` are requested;
3. the layer's compute is simulated (``--compute-ms``, a sleep, so the prefetch threads
   get the CPU a real layer would leave them) while the prefetch reads.

The buffer manager bounds resident experts to ``--budget-frac`` of the expert bytes (LRU).
Each predictor starts from a cold page cache. One row per predictor: tokens/s, stall per
token, hit rate, used / late / wasted, and GB read by prefetch and by demand. ``none`` is no
prefetching; ``oracle`` requests the true next-layer experts (an upper bound).

    python benchmarks/trace_replay.py --tokens 24
    python benchmarks/trace_replay.py --predictors none,popularity,oracle --method io_uring
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from expertpred.features import FeatureConfig, OnlineFeatures, build_features
from expertpred.layout import MoELayout, read_layout
from expertpred.predictors import make_predictor
from expertpred.predictors.synthetic import (
    SyntheticTraceSpec,
    split_of,
    synthetic_model,
    synthetic_traces,
)
from expertpred.prefetch import BufferManager, PrefetchEngine
from expertpred.prefetch.sysmem import FileMapping
from expertpred.trace.record import Phase

sys.path.insert(0, str(Path(__file__).resolve().parent))
from io_bandwidth import BENCH_FILE, ensure_file  # noqa: E402

log = logging.getLogger("trace_replay")


class DemandReader:
    """What a page fault does when a used expert is not resident: read it, synchronously."""

    def __init__(self, path: Path, layout: MoELayout) -> None:
        self.layout = layout
        self.fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self.map = FileMapping(path)
        self.buf = bytearray(4 << 20)
        self.bytes = 0

    def resident(self, layer: int, expert: int) -> bool:
        return all(self.map.mincore(s.offset, s.nbytes).all()
                   for s in self.layout.expert_slices(layer, expert))

    def read(self, layer: int, expert: int) -> None:
        """Read the 4 MiB pieces that are not all cached (like faults on missing pages)."""
        mv = memoryview(self.buf)
        for s in self.layout.expert_slices(layer, expert):
            for off in range(s.offset, s.offset + s.nbytes, len(self.buf)):
                n = min(len(self.buf), s.offset + s.nbytes - off)
                if not self.map.mincore(off, n).all():
                    self.bytes += os.preadv(self.fd, [mv[:n]], off)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def replay(path: Path, layout: MoELayout, traces, model, predictor, name: str,
           args: argparse.Namespace) -> dict[str, float]:
    evict(path)
    budget = int(args.budget_frac * layout.expert_bytes)
    layers = layout.moe_layers
    k = args.prefetch_k
    d = args.d
    reader = DemandReader(path, layout)
    stall = 0.0
    tokens = 0
    with BufferManager(path, layout, budget) as buf, PrefetchEngine(
            path, layout, method=args.method, queue_depth=args.queue_depth,
            buffer=buf) as eng:
        t0 = time.perf_counter()
        for trace in traces:
            online = OnlineFeatures(model)
            online.seq_id = trace.seq_id
            for t in range(trace.n_tokens):
                decode = trace.phase[t] == Phase.DECODE
                online.next_token(int(trace.tokens[t]), int(trace.phase[t]))
                for li, layer in enumerate(layers):
                    used = [int(e) for e in trace.experts[t, li]]
                    if decode:
                        eng.advance(layer)
                        eng.on_use(layer, used)
                        s0 = time.perf_counter()
                        for e in used:
                            if not reader.resident(layer, e):
                                reader.read(layer, e)
                                for ev in buf.admit(layer, e):
                                    eng.forget(*ev)
                        stall += time.perf_counter() - s0
                    online.update(li, trace.logits[t, li], trace.experts[t, li],
                                  None if trace.hidden is None else trace.hidden[t, li])
                    if decode and li + d < len(layers) and name != "none":
                        if name == "oracle":
                            pred = trace.experts[t, li + d][:k]
                        else:
                            x = online.features(d)
                            pred = predictor.predict_topk(x, k)[0]
                        eng.request(layers[li + d], [int(e) for e in pred])
                    if decode:  # the layer's expert FFNs run while the prefetch reads
                        time.sleep(args.compute_ms / 1e3)
                tokens += int(decode)
                if tokens >= args.tokens:
                    break
            if tokens >= args.tokens:
                break
        wall = time.perf_counter() - t0
        st = eng.stats()
    reader.close()
    c = st.counters
    return {"tok/s": tokens / wall, "stall ms/tok": 1e3 * stall / max(tokens, 1),
            "hit rate": st.hit_rate, "used": c.used, "late": c.late, "wasted": c.wasted,
            "misses": c.misses, "prefetch GB": c.bytes_read / 1e9,
            "demand GB": reader.bytes / 1e9}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=BENCH_FILE)
    ap.add_argument("--predictors", default="none,popularity,transition,"
                    "previous-token+transition,oracle")
    ap.add_argument("--method", default="pread")
    ap.add_argument("--queue-depth", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=24, help="decode tokens replayed")
    ap.add_argument("--compute-ms", type=float, default=2.0, help="simulated compute per layer")
    ap.add_argument("--budget-frac", type=float, default=0.5, help="RAM budget / expert bytes")
    ap.add_argument("--prefetch-k", type=int, default=2, help="experts requested per layer")
    ap.add_argument("--d", type=int, default=1, help="predict layer l + d")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    path = ensure_file(args.file)
    layout = read_layout(path)
    spec = SyntheticTraceSpec(n_layer=len(layout.moe_layers), n_expert=layout.n_expert,
                              n_expert_used=layout.n_expert_used, n_seq=40)
    traces = synthetic_traces(spec)
    model = synthetic_model(spec)
    train = [t for t in traces if split_of(t.seq_id) == "train"]
    test = [t for t in traces if split_of(t.seq_id) == "test"]
    batch = build_features(train, model, FeatureConfig(d=args.d))
    print(f"file {path}: {len(layout.moe_layers)} layers x {layout.n_expert} experts x "
          f"{layout.bytes_per_expert() / 2**20:.0f} MiB; budget {args.budget_frac:.0%} of "
          f"experts; {args.tokens} decode tokens; {args.compute_ms:g} ms compute/layer; "
          f"{args.method} qd {args.queue_depth}; "
          f"prefetch top-{args.prefetch_k} of layer l+{args.d}",
          flush=True)
    rows = {}
    for name in args.predictors.split(","):
        pred = None
        if name not in ("none", "oracle"):
            pred = make_predictor(name).fit(batch)
        rows[name] = replay(path, layout, test, model, pred, name, args)
        print(name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)
    cols = list(next(iter(rows.values())))
    print()
    print("| predictor | " + " | ".join(cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3g}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
