"""Expert-cache hit rate and bytes per token at the cache shares the published anchors use.

Two ways to hand a cache the same share of the experts:

- *global*: one cache of ``share`` x all expert bytes over every layer (what
  ``expertpred evaluate`` simulates; a layer may hold more or fewer experts than another);
- *per layer*: each MoE layer gets its own cache of ``round(share x n_expert)`` experts
  (colibri's setting: 32 of 64 experts per layer is the 50 % row).

Policies are the existing :func:`expertpred.cachesim.simulate` ones (LRU, LFU, Belady-MIN).
The access stream is the one ``evaluate`` uses: the test split's sequences one after the
other, decode tokens only (``--phase all`` adds the prompt tokens). "no cache" reads every
selected expert of every token: k x sum(expert bytes) per token.

    python benchmarks/cache_shares.py --dataset datasets/traces/tiny-olmoe \
        --shares 0.05,0.10,0.25,0.50 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expertpred.errors import ExpertPredError  # noqa: E402
from expertpred.gguf.layout import read_layout  # noqa: E402
from expertpred.learn.cachesim import CacheResult, simulate  # noqa: E402
from expertpred.trace.dataset import TraceDataset  # noqa: E402
from expertpred.trace.record import Phase  # noqa: E402

log = logging.getLogger("cache_shares")
POLICIES = ("lru", "lfu", "belady")


def access_stream(dataset: Path, split: str, phase: str) -> np.ndarray:
    """int64 (T, L, k): the split's sequences in order, the chosen phase's tokens."""
    chunks = []
    for seq in TraceDataset(dataset).sequences(split=split):
        keep = np.ones(len(seq.phase), bool) if phase == "all" else seq.phase == Phase.DECODE
        chunks.append(seq.experts[keep])
    if not chunks:
        raise ExpertPredError(f"{dataset}: no {split} sequences")
    return np.concatenate(chunks).astype(np.int64)


def per_layer(experts: np.ndarray, policy: str, slots: int, sizes: np.ndarray,
              n_expert: int) -> CacheResult:
    """One cache of ``slots`` experts per layer: the layers' counters summed."""
    parts = [simulate(experts[:, li : li + 1], policy, int(slots * sizes[li]),
                      sizes[li : li + 1], n_expert) for li in range(experts.shape[1])]
    return CacheResult(policy, sum(p.capacity_bytes for p in parts), len(experts),
                       sum(p.accesses for p in parts), sum(p.hits for p in parts),
                       sum(p.demand_bytes for p in parts), 0)


def run(dataset: Path, shares: list[float], split: str, phase: str) -> dict:
    ds = TraceDataset(dataset)
    gguf = Path(ds.manifest["model"]["path"])
    if not gguf.is_absolute():
        gguf = Path(__file__).resolve().parents[1] / gguf
    sizes = read_layout(gguf).nbytes.sum(axis=2)[:, 0].astype(np.int64)  # bytes per expert
    n_expert = ds.model.n_expert
    experts = access_stream(dataset, split, phase)
    t_len, n_l, k = experts.shape
    no_cache = float(k * sizes.sum())
    rows = []
    for share in shares:
        slots = max(1, round(share * n_expert))
        for pol in POLICIES:
            g = simulate(experts, pol, int(share * sizes.sum() * n_expert), sizes, n_expert)
            p = per_layer(experts, pol, slots, sizes, n_expert)
            for scope, r in (("global", g), (f"per-layer {slots}/{n_expert}", p)):
                rows.append({"share": share, "scope": scope, **r.to_dict(),
                             "read_vs_no_cache": r.bytes_per_token / no_cache})
    return {"dataset": str(dataset), "gguf": str(gguf), "split": split, "phase": phase,
            "n_tokens": t_len, "n_layer": n_l, "k": k, "n_expert": n_expert,
            "expert_bytes": sizes.tolist(), "no_cache_bytes_per_token": no_cache,
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--shares", default="0.05,0.10,0.25,0.50")
    ap.add_argument("--split", default="test")
    ap.add_argument("--phase", choices=("decode", "all"), default="decode")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        shares = [float(s) for s in args.shares.split(",") if s.strip()]
        if not shares or not all(0 < s <= 1 for s in shares):
            raise ValueError
    except ValueError:
        print(f"error: --shares {args.shares!r}: expected shares in (0, 1], e.g. 0.05,0.5",
              file=sys.stderr)
        return 2
    try:
        res = run(args.dataset, shares, args.split, args.phase)
    except (ExpertPredError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{res['dataset']}: {res['n_tokens']} {args.split} {args.phase} tokens, "
          f"{res['n_layer']} layers, top-{res['k']} of {res['n_expert']}; no cache reads "
          f"{res['no_cache_bytes_per_token'] / 2**20:.3f} MiB/token")
    print(f"{'share':>6} {'scope':<18} {'policy':<7} {'hit rate':>8} {'MiB/token':>10} "
          f"{'vs none':>8}")
    for r in res["rows"]:
        print(f"{r['share']:>6.0%} {r['scope']:<18} {r['policy']:<7} {r['hit_rate']:>8.3f} "
              f"{r['bytes_per_token'] / 2**20:>10.4f} {r['read_vs_no_cache']:>8.3f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
