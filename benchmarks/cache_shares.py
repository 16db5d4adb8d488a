"""Expert-cache hit rate and bytes per token at the cache shares the published anchors use.

Two ways to hand a cache the same share of the experts:

- *global*: one cache of ``share`` x all expert bytes over every layer (what
  ``expertpred evaluate`` simulates; a layer may hold more or fewer experts than another);
- *per layer*: each MoE layer gets its own cache of ``round(share x n_expert)`` experts
  (colibri's setting: 32 of 64 experts per layer is the 50 % row).

Policies are the existing :func:`expertpred.cachesim.simulate` ones (LRU, LFU, Belady-MIN)
and, with ``--learned``, the learned residency policy: its next-use model is fitted on the
dataset's train split (``expertpred train``'s recipe, ``fit_nextuse``), and its per-layer
caches are one residency set with a budget per layer.
The access stream is the one ``evaluate`` uses: the test split's sequences one after the
other, decode tokens only (``--phase all`` adds the prompt tokens). "no cache" reads every
selected expert of every token: k x sum(expert bytes) per token.

    python benchmarks/cache_shares.py --dataset datasets/traces/tiny-olmoe \
        --shares 0.05,0.10,0.25,0.50 [--learned] [--json out.json]
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
from expertpred.learn.residency_policy import make_policy, simulate_steps  # noqa: E402
from expertpred.predictors.nextuse import NextUseModel  # noqa: E402
from expertpred.trace.dataset import TraceDataset  # noqa: E402
from expertpred.trace.record import Phase  # noqa: E402

log = logging.getLogger("cache_shares")
POLICIES = ("lru", "lfu", "belady")


def access_stream(dataset: Path, split: str, phase: str) -> tuple[np.ndarray, np.ndarray]:
    """int64 (T, L, k) experts and (T,) token ids: the split's sequences in order, the
    chosen phase's tokens."""
    chunks, ids = [], []
    for seq in TraceDataset(dataset).sequences(split=split):
        keep = np.ones(len(seq.phase), bool) if phase == "all" else seq.phase == Phase.DECODE
        chunks.append(seq.experts[keep])
        ids.append(seq.tokens[keep])
    if not chunks:
        raise ExpertPredError(f"{dataset}: no {split} sequences")
    return np.concatenate(chunks).astype(np.int64), np.concatenate(ids).astype(np.int64)


def fit_learned(dataset: Path) -> NextUseModel:
    """The learned policy's next-use model, fitted as ``expertpred train`` fits it."""
    from expertpred.learn.train import PredictorsConfig, fit_nextuse, open_source

    cfg = PredictorsConfig(dataset=str(dataset))
    src = open_source(cfg)
    return fit_nextuse(cfg, src, src.select(split="train"))


def learned(experts: np.ndarray, tokens: np.ndarray, model: NextUseModel, sizes: np.ndarray,
            n_expert: int, share: float, slots: int) -> tuple[CacheResult, CacheResult]:
    """(global, per layer) results of the learned policy at ``share``."""
    out = []
    for layer_budgets in (None, slots * sizes):
        c = simulate_steps(experts, make_policy("learned", model=model),
                           int(share * sizes.sum() * n_expert), sizes, n_expert, tokens,
                           layer_budgets).counters
        cap = int(share * sizes.sum() * n_expert) if layer_budgets is None else int(
            layer_budgets.sum())
        out.append(CacheResult("learned", cap, len(experts), c.accesses, c.hits,
                               c.miss_bytes, 0))
    return out[0], out[1]


def per_layer(experts: np.ndarray, policy: str, slots: int, sizes: np.ndarray,
              n_expert: int) -> CacheResult:
    """One cache of ``slots`` experts per layer: the layers' counters summed."""
    parts = [simulate(experts[:, li : li + 1], policy, int(slots * sizes[li]),
                      sizes[li : li + 1], n_expert) for li in range(experts.shape[1])]
    return CacheResult(policy, sum(p.capacity_bytes for p in parts), len(experts),
                       sum(p.accesses for p in parts), sum(p.hits for p in parts),
                       sum(p.demand_bytes for p in parts), 0)


def run(dataset: Path, shares: list[float], split: str, phase: str,
        with_learned: bool = False) -> dict:
    ds = TraceDataset(dataset)
    gguf = Path(ds.manifest["model"]["path"])
    if not gguf.is_absolute():
        gguf = Path(__file__).resolve().parents[1] / gguf
    sizes = read_layout(gguf).nbytes.sum(axis=2)[:, 0].astype(np.int64)  # bytes per expert
    n_expert = ds.model.n_expert
    experts, tokens = access_stream(dataset, split, phase)
    t_len, n_l, k = experts.shape
    model = fit_learned(dataset) if with_learned else None
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
        if model is not None:
            g, p = learned(experts, tokens, model, sizes, n_expert, share, slots)
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
    ap.add_argument("--learned", action="store_true",
                    help="also the learned residency policy (fits its next-use model on the "
                         "train split first)")
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
        res = run(args.dataset, shares, args.split, args.phase, args.learned)
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
