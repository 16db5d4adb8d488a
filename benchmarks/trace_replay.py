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

Recorded traces (``--trace DIR``): the test split of a trace dataset, decode tokens only
(``--phase all`` for every token), replayed against ``--file`` (a model with the trace's
routing, e.g. a widened copy of the traced model). Modes: ``none`` (LRU, no prefetch), one
per exported predictor (``--predictors``: artifacts ``.npz`` and / or ``expertpred train``
model directories, each predictor name in them exported with ``export_saved``), and
``oracle`` (the true experts of layers l+1..l+depth). Each mode's prefetch *plan* (the
experts requested after every (token, layer), from batch features — the same plan
``evaluate.cache_report`` builds) drives both the replay and ``cachesim.simulate``, so the
table shows the replay's hit rate (BufferManager bookkeeping: a used expert the buffer
holds when it is used) next to the cache simulation's for the same policy, budget and plan.
With ``--await-prefetch`` every prefetch is awaited before the replay goes on, which makes
the bookkeeping follow cachesim's order exactly (the agreement test); without it, a
prefetch admitted late, or dropped as stale, can make the two differ.

    python benchmarks/trace_replay.py --trace datasets/traces/tiny-mixtral \
        --file /tmp/widened.gguf --predictors /tmp/replay-preds/models --budget 0.25
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pagecache import evict

from expertpred.features import FeatureConfig, ModelInfo, OnlineFeatures, build_features
from expertpred.gguf.layout import MoELayout, read_layout
from expertpred.learn.cachesim import prefetch_plan, simulate
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
from io_bandwidth import BENCH_FILE  # noqa: E402

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
            "hit rate": st.hit_rate, "used": c.hits, "late": c.late, "wasted": c.spec_unused,
            "misses": c.misses, "prefetch GB": c.bytes_read / 1e9,
            "demand GB": reader.bytes / 1e9}


# --- recorded traces: one access stream, one prefetch plan per mode ------------------------------

def replay_stream(path: Path, layout: MoELayout, experts: np.ndarray, plan: np.ndarray | None,
                  budget_bytes: int, *, compute_ms: float = 0.0, await_prefetch: bool = False,
                  method: str = "pread", queue_depth: int = 8) -> dict[str, float]:
    """Replay ``experts`` (int (T, L, k), L = MoE layer index, -1 = none) token-major,
    layer-minor — cachesim's order — with the prefetch ``plan`` (int (T, L, P) flat keys
    ``layer * n_expert + expert`` requested after each (token, layer), or None).

    Per (token, layer): ``advance``; for each used expert in order: a bookkeeping hit if the
    buffer holds it, ``on_use`` (touches it), a demand read of its non-resident pages (the
    stall), ``admit`` on a miss (LRU eviction, like cachesim's demand load); then each
    planned key in order: ``touch`` if the buffer holds it (cachesim refreshes a cached
    prefetch), ``request`` (the engine's worker admits it when the read starts; keys of a
    layer already passed are for the next token); ``--await-prefetch`` waits for each;
    then ``compute_ms`` of simulated compute.
    """
    evict(path)
    layers = layout.moe_layers
    n_e = layout.n_expert
    t_len, n_l, _ = experts.shape
    reader = DemandReader(path, layout)
    stall = 0.0
    hits = accesses = 0
    with BufferManager(path, layout, budget_bytes) as buf, PrefetchEngine(
            path, layout, method=method, queue_depth=queue_depth, buffer=buf) as eng:
        t0 = time.perf_counter()
        for t in range(t_len):
            for li in range(n_l):
                layer = layers[li]
                eng.advance(layer)
                for e in experts[t, li].tolist():
                    if e < 0:
                        continue
                    accesses += 1
                    hit = (layer, e) in buf.resident()
                    hits += hit
                    eng.on_use(layer, (e,))
                    s0 = time.perf_counter()
                    if not reader.resident(layer, e):
                        reader.read(layer, e)
                    stall += time.perf_counter() - s0
                    if not hit:
                        for ev in buf.admit(layer, e):
                            eng.forget(*ev)
                if plan is not None:
                    for key in plan[t, li].tolist():
                        if key < 0:
                            continue
                        pli, e = divmod(key, n_e)
                        if (layers[pli], e) in buf.resident():
                            buf.touch(layers[pli], e)
                        eng.request(layers[pli], (e,), next_token=pli <= li)
                        if await_prefetch:
                            eng.wait_idle()
                if compute_ms:  # the layer's expert FFNs run while the prefetch reads
                    time.sleep(compute_ms / 1e3)
        wall = time.perf_counter() - t0
        st = eng.stats()
    reader.close()
    c = st.counters
    return {"replay hit": hits / max(accesses, 1), "accesses": accesses, "hits": hits,
            "timely hit": st.hit_rate, "stall ms/tok": 1e3 * stall / max(t_len, 1),
            "tok/s": t_len / wall, "late": c.late, "wasted": c.spec_unused,
            "dropped": c.dropped_stale + c.dropped_full,
            "prefetch GB": c.bytes_read / 1e9, "demand GB": reader.bytes / 1e9}


def load_predictor_sets(spec: str, tmp: Path) -> dict:
    """``spec``: comma-separated artifacts (``.npz`` from ``expertpred export``) and / or
    ``expertpred train`` model directories (every predictor name in them is exported)."""
    from expertpred.predictors.export import export_saved, load_artifact

    sets = {}
    for item in filter(None, spec.split(",")):
        src = Path(item)
        if src.is_dir() and (src / "models").is_dir():
            src = src / "models"
        if src.is_dir():
            names = sorted({f.stem.rpartition("-d")[0].replace("_plus_", "+")
                            for f in src.glob("*-d*.npz")})
            for name in names:
                art = export_saved(src, tmp / f"{name.replace('+', '_plus_')}.npz", name=name)
                sets[name] = load_artifact(art)
        else:
            a = load_artifact(src)
            sets[a.name] = a
    return sets


def trace_stream(trace_dir: Path, phase: str) -> tuple[list, ModelInfo, np.ndarray, dict]:
    """Test sequences of ``trace_dir``, their access stream (T, L, k) and (seq, pos) → row."""
    from expertpred.trace.dataset import TraceDataset

    ds = TraceDataset(trace_dir)
    model = ModelInfo.from_manifest(ds.manifest["model"])
    seqs = list(ds.sequences(split="test"))
    index: dict[tuple[int, int], int] = {}
    chunks = []
    for t in seqs:
        pos = (np.arange(t.n_tokens) if phase == "all"
               else np.flatnonzero(t.phase == Phase.DECODE))
        for p in pos.tolist():
            index[(t.seq_id, p)] = len(index)
        chunks.append(t.experts[pos])
    return seqs, model, np.concatenate(chunks).astype(np.int64), index


def trace_plan(seqs: list, model: ModelInfo, experts: np.ndarray, index: dict, pset,
               k: int, depth: int, phase: str) -> np.ndarray:
    """The prefetch plan of ``evaluate.cache_report``: top-``k`` of layers l+1..l+depth at
    every (token, layer) (``pset`` None = oracle), plus the previous-token wrap."""
    t_len, n_l, _ = experts.shape
    keep = None if phase == "all" else int(Phase.DECODE)
    predicted = {}
    for d in range(1, depth + 1):
        arr = np.full((t_len, n_l, k), -1, dtype=np.int64)
        if pset is None:
            w = min(k, experts.shape[2])
            arr[:, :n_l - d, :w] = experts[:, d:, :w]
        else:
            x = build_features(seqs, model, FeatureConfig(d=d, history_decay=pset.history_decay),
                               phase=keep)
            top = pset[d].predict_topk(x, k)
            g = np.array([index[(s, p)] for s, p in zip(x.seq.tolist(), x.position.tolist())])
            arr[g, x.layer.astype(np.int64)] = top
        predicted[d] = arr
    return prefetch_plan(predicted, model.n_expert, experts=experts, wrap=depth)


def main_trace(args: argparse.Namespace) -> int:
    path = args.file
    layout = read_layout(path)
    seqs, model, experts, index = trace_stream(args.trace, args.phase)
    n_tok = args.tokens or len(experts)  # replay (and simulate) the first n_tok tokens
    if (len(layout.moe_layers), layout.n_expert) != (model.n_moe, model.n_expert):
        raise SystemExit(f"{path}: {len(layout.moe_layers)} MoE layers x {layout.n_expert} "
                         f"experts, trace has {model.n_moe} x {model.n_expert}")
    k = args.prefetch_k or model.n_expert_used
    sizes = layout.nbytes.sum(axis=2)[:, 0].astype(np.int64)
    total = int(layout.nbytes.sum())
    budget = int(args.budget * total)
    with tempfile.TemporaryDirectory() as tmp:
        sets = load_predictor_sets(args.predictors, Path(tmp))
    modes: dict[str, np.ndarray | None] = {"none": None}
    for name, pset in sets.items():
        missing = set(range(1, args.depth + 1)) - set(pset.offsets)
        if missing:
            log.warning("%s: no offsets %s, skipped", name, sorted(missing))
            continue
        modes[name] = trace_plan(seqs, model, experts, index, pset, k, args.depth, args.phase)
    modes["oracle"] = trace_plan(seqs, model, experts, index, None, k, args.depth, args.phase)
    experts = experts[:n_tok]
    modes = {m: None if p is None else p[:n_tok] for m, p in modes.items()}
    print(f"file {path}: {len(layout.moe_layers)} layers x {layout.n_expert} experts x "
          f"{layout.bytes_per_expert() / 2**20:.1f} MiB; trace {args.trace}: "
          f"{len(seqs)} test sequences, {experts.shape[0]} {args.phase} tokens, "
          f"{int((experts >= 0).sum())} accesses; budget {args.budget:.0%} of expert bytes "
          f"({budget / 2**20:.0f} MiB); {args.compute_ms:g} ms compute/layer; "
          f"{args.method} qd {args.queue_depth}; prefetch top-{k} of l+1..l+{args.depth}"
          f"{'; prefetches awaited' if args.await_prefetch else ''}", flush=True)
    rows = {}
    for name, plan in modes.items():
        pol = "lru" if plan is None else "predictive"
        sim = simulate(experts, pol, budget, sizes, model.n_expert, prefetch=plan)
        r = replay_stream(path, layout, experts, plan, budget, compute_ms=args.compute_ms,
                          await_prefetch=args.await_prefetch, method=args.method,
                          queue_depth=args.queue_depth)
        rows[name] = {"policy": pol, "replay hit": r["replay hit"], "cachesim hit": sim.hit_rate,
                      **{c: v for c, v in r.items() if c not in ("replay hit", "hits")}}
        print(name, {c: (round(v, 4) if isinstance(v, float) else v)
                     for c, v in rows[name].items()}, flush=True)
    cols = list(next(iter(rows.values())))
    print()
    print("| mode | " + " | ".join(cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(
            f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=BENCH_FILE)
    ap.add_argument("--predictors", default=None,
                    help="synthetic: registry names (default none,popularity,transition,"
                    "previous-token+transition,oracle); --trace: artifacts / model dirs")
    ap.add_argument("--trace", type=Path, help="replay the test split of this trace dataset")
    ap.add_argument("--phase", default="decode", choices=("decode", "all"),
                    help="--trace: tokens replayed")
    ap.add_argument("--budget", type=float, default=0.25,
                    help="--trace: RAM budget / expert bytes")
    ap.add_argument("--depth", type=int, default=1, help="--trace: prefetch l+1..l+depth")
    ap.add_argument("--await-prefetch", action="store_true",
                    help="--trace: wait for each prefetch (bookkeeping in cachesim order)")
    ap.add_argument("--method", default="pread")
    ap.add_argument("--queue-depth", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=None,
                    help="tokens replayed (synthetic: 24 decode; --trace: the first N of the "
                    "stream, default all)")
    ap.add_argument("--compute-ms", type=float, default=2.0, help="simulated compute per layer")
    ap.add_argument("--budget-frac", type=float, default=0.5, help="RAM budget / expert bytes")
    ap.add_argument("--prefetch-k", type=int, default=0,
                    help="experts requested per layer (0 = n_expert_used)")
    ap.add_argument("--d", type=int, default=1, help="predict layer l + d")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.trace is not None:
        args.predictors = args.predictors or ""
        return main_trace(args)
    from io_bandwidth import ensure_file

    args.predictors = args.predictors or ("none,popularity,transition,"
                                          "previous-token+transition,oracle")
    args.prefetch_k = args.prefetch_k or 2
    args.tokens = args.tokens or 24

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
