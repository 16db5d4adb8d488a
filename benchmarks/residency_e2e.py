"""End to end: who decides which experts stay resident — the kernel's reclaim, or the plugin's
residency manager (LRU, learned next-use, Belady with the recorded run)?

Widens a shipped model (default tiny-qwen3moe, the fine-grained case) with ``expertpred
widen`` (f32 like the source: routing and tokens are the source's), fits the next-use model
on the shipped trace's train split, traces the benchmark's greedy run for ``belady``, then
runs in alternating rounds, each in a fresh child process inside a memory cgroup (limit =
size / --size-over-limit, the file evicted before each run), d0 prefetch in every mode:

    kernel   the manager only measures; the kernel's reclaim decides residency
    lru      the manager evicts the least recently used experts beyond its budget
    learned  ... the experts the next-use model rates least likely to be used soon
    belady   ... the experts whose next use in the recorded run is farthest (offline bound)

The budget is the manager's default (cgroup limit minus what the process holds outside the
experts minus one layer's headroom) unless --budget is given. Prints tok/s, GiB read from
storage per decode token (process I/O read_bytes), peak cgroup usage against the limit,
whether every run generated the same tokens, and next to them the cache simulator's bytes
per token for the same greedy run at the same budget (medians and ranges over rounds).

    python benchmarks/residency_e2e.py --total-gib 3 --tokens 16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from e2e_prefetch import PROMPT, generate_marked  # benchmarks/ is sys.path[0] for a script

from expertpred.gguf.layout import file_sha256, read_layout
from expertpred.lab.cgroup import MemoryCgroup, evict_file, proc_io, why_unavailable

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path("/tmp/residency-bench")
MODES = ("kernel", "lru", "learned", "belady")


# --- child: one generation, inside the cgroup ---------------------------------------------------


def child(a: argparse.Namespace) -> None:
    from expertpred.prefetch.plugin import OracleTrace, PrefetchLlama
    from expertpred.prefetch.residency import ResidencyConfig

    oracle = OracleTrace.load(a.oracle) if a.mode == "belady" else None
    cfg = ResidencyConfig(policy=a.mode, budget_bytes=a.budget or None,
                          nextuse_path=str(a.nextuse) if a.mode == "learned" else "")
    io0, t0 = proc_io(), time.perf_counter()
    llm = PrefetchLlama(a.model, mode="d0", oracle=oracle, residency=cfg, n_ctx=256,
                        n_threads=a.threads, seed=0)
    t1 = time.perf_counter()
    toks, n_prompt, (io2, t2), (io3, t3) = generate_marked(llm, a.tokens)
    st = llm.prefetch_stats()
    llm.close()
    print(json.dumps({
        "load_s": t1 - t0, "prompt_tokens": n_prompt, "steps": max(1, len(toks) - 1),
        "decode_s": t3 - t2, "decode_read": (io3 - io2).read_bytes,
        "load_read": (io2 - io0).read_bytes, "tokens": toks, "stats": st.as_dict(),
    }, default=str), flush=True)


# --- parent -------------------------------------------------------------------------------------


def build(a: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(widened model, next-use model, oracle trace of the greedy run)."""
    from expertpred.gguf.widen import widen
    from expertpred.learn.train import NEXTUSE_FILE, PredictorsConfig, fit_nextuse, open_source
    from expertpred.prefetch.plugin import OracleTrace, prompt_tokens
    from expertpred.trace.llama_tracer import LlamaTracer

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    src = ROOT / "models" / a.source / "model.gguf"
    sha = file_sha256(src)[:12]
    model = a.model or BENCH_DIR / f"{a.source}-{sha}-widened-{a.total_gib:g}gib-f32.gguf"
    if not model.exists():
        res = widen(src, model, total_gib=a.total_gib, dtype="f32")
        print(f"widened {src} -> {model} in {res.seconds:.0f} s", flush=True)
    nextuse = BENCH_DIR / f"{sha}-h{a.horizon}-{NEXTUSE_FILE}"
    if not nextuse.exists():
        cfg = PredictorsConfig(dataset=str(ROOT / "datasets" / "traces" / a.source),
                               residency_horizon=a.horizon)
        source = open_source(cfg)
        fit_nextuse(cfg, source, source.select(split="train")).save(nextuse)
    oracle = BENCH_DIR / f"oracle-{sha}-{a.tokens}.npz"
    if not oracle.exists():
        with LlamaTracer(src, n_ctx=256, n_threads=2) as tr:
            seq = tr.trace(prompt_tokens(src, PROMPT), a.tokens)
        OracleTrace.from_sequence(seq).save(oracle)
    return model, nextuse, oracle


def run_one(a: argparse.Namespace, mode: str, model: Path, nextuse: Path, oracle: Path,
            limit: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--mode", mode,
           "--model", str(model), "--nextuse", str(nextuse), "--oracle", str(oracle),
           "--tokens", str(a.tokens), "--threads", str(a.threads),
           "--budget", str(a.budget or 0)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    evict_file(model)
    with MemoryCgroup(f"residency-{mode}", limit) as cg:
        res = cg.run(cmd, env=env, cwd=ROOT, timeout=a.timeout)
    row: dict[str, Any] = {"mode": mode, "returncode": res.returncode, "oom": res.oom_killed,
                           "peak": res.after.max_usage, "limit": limit,
                           "stderr": res.stderr[-400:]}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if lines:
        row.update(json.loads(lines[-1]))
    return row


def simulated(a: argparse.Namespace, model: Path, nextuse: Path, oracle: Path,
              budget: int) -> dict[str, float]:
    """cachesim bytes per decode token for the same greedy run at ``budget``: the policies
    replay the prompt token by token (the plugin sees it as one batch), then count the
    bytes the decode tokens miss."""
    from expertpred.learn.residency_policy import ResidencySet, make_policy
    from expertpred.predictors.nextuse import NextUseModel
    from expertpred.prefetch.plugin import OracleTrace, prompt_tokens

    lay = read_layout(model)
    o = OracleTrace.load(oracle)
    n_prompt = len(prompt_tokens(model, PROMPT))
    ex = o.experts.astype(np.int64)
    nu = NextUseModel.load(nextuse)
    out = {}
    for pol in ("lru", "lfu", "learned", "belady"):
        rs = ResidencySet(make_policy(pol, future=ex, model=nu), len(lay.moe_layers),
                          lay.n_expert, lay.nbytes.sum(axis=2), budget)
        for t in range(len(ex)):
            if t == n_prompt:
                before = rs.counters.miss_bytes
            for li in range(ex.shape[1]):
                rs.step(t, li, ex[t, li])
        out[pol] = (rs.counters.miss_bytes - before) / max(len(ex) - n_prompt, 1)
    return out


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for m in dict.fromkeys(r["mode"] for r in rows):
        ok = [r for r in rows if r["mode"] == m and "decode_s" in r]
        if not ok:
            continue
        tps = [r["steps"] / r["decode_s"] for r in ok]
        gib = [r["decode_read"] / r["steps"] / 2**30 for r in ok]
        out[m] = {
            "tok_s": statistics.median(tps), "tok_s_range": (min(tps), max(tps)),
            "gib_per_tok": statistics.median(gib), "gib_range": (min(gib), max(gib)),
            "peak_gib": max(r["peak"] for r in ok) / 2**30,
            "limit_gib": ok[0]["limit"] / 2**30, "oom": any(r["oom"] for r in ok),
            "budget_gib": statistics.median(r["stats"].get("residency_budget_bytes", 0)
                                            for r in ok) / 2**30,
            "evictions": statistics.median(r["stats"].get("residency_evictions", 0)
                                           for r in ok),
            "bypasses": statistics.median(r["stats"].get("residency_bypasses", 0) for r in ok),
            "runs": len(ok),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="kernel", help=argparse.SUPPRESS)
    ap.add_argument("--nextuse", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--oracle", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help="Use this widened GGUF of --source as it is.")
    ap.add_argument("--source", default="tiny-qwen3moe", help="Shipped model to widen.")
    ap.add_argument("--total-gib", type=float, default=3.0)
    ap.add_argument("--size-over-limit", type=float, default=2.5)
    ap.add_argument("--budget", type=int, default=0, help="Bytes (0: the manager's default).")
    ap.add_argument("--horizon", type=int, default=1, help="Next-use model horizon (tokens).")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", type=Path, help="Write rows and summary here.")
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    why = why_unavailable()
    if why:
        sys.exit(f"error: memory cgroup unavailable: {why}")
    model, nextuse, oracle = build(a)
    limit = int(model.stat().st_size / a.size_over_limit)
    modes = a.modes.split(",")
    print(f"model {model} ({model.stat().st_size / 2**30:.2f} GiB), limit "
          f"{limit / 2**30:.2f} GiB, modes {modes}, {a.rounds} rounds", flush=True)
    rows = []
    for rnd in range(a.rounds):
        order = modes if rnd % 2 == 0 else modes[::-1]  # alternate: drift hits all modes
        for m in order:
            row = run_one(a, m, model, nextuse, oracle, limit)
            row["round"] = rnd
            rows.append(row)
            tps = row["steps"] / row["decode_s"] if "decode_s" in row else float("nan")
            gib = row.get("decode_read", 0) / row.get("steps", 1) / 2**30
            print(f"round {rnd} {m:8s} rc={row['returncode']} {tps:.3f} tok/s "
                  f"{gib:.3f} GiB/tok peak {row['peak'] / 2**30:.2f} GiB "
                  f"budget {row.get('stats', {}).get('residency_budget_bytes', 0) / 2**30:.2f}"
                  f" GiB", flush=True)
    summary = summarize(rows)
    toks = {json.dumps(r.get("tokens")) for r in rows}
    budget = int(np.median([r["stats"]["residency_budget_bytes"] for r in rows
                            if "stats" in r]))
    sim = simulated(a, model, nextuse, oracle, budget)
    print("\n| residency | tok/s (range) | GiB read / token (range) | peak / limit GiB | "
          "evictions | bypasses | OOM |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for m, s in summary.items():
        print(f"| {m} | {s['tok_s']:.3f} ({s['tok_s_range'][0]:.3f}–{s['tok_s_range'][1]:.3f})"
              f" | {s['gib_per_tok']:.3f} ({s['gib_range'][0]:.3f}–{s['gib_range'][1]:.3f}) | "
              f"{s['peak_gib']:.2f} / {s['limit_gib']:.2f} | {s['evictions']:.0f} | "
              f"{s['bypasses']:.0f} | {'yes' if s['oom'] else 'no'} |")
    print(f"\ncachesim, same greedy run (decode tokens), budget {budget / 2**30:.2f} GiB: "
          + ", ".join(f"{p} {v / 2**30:.3f} GiB/token" for p, v in sim.items()))
    for m in ("lru", "learned", "belady"):
        if m in summary and "kernel" in summary:
            print(f"{m}/kernel: tok/s x{summary[m]['tok_s'] / summary['kernel']['tok_s']:.2f}, "
                  f"GiB/token x{summary[m]['gib_per_tok'] / summary['kernel']['gib_per_tok']:.2f}")
    if "learned" in summary and "belady" in summary:
        print(f"learned/belady GiB/token: measured x"
              f"{summary['learned']['gib_per_tok'] / summary['belady']['gib_per_tok']:.2f}, "
              f"cachesim x{sim['learned'] / sim['belady']:.2f}")
    print(f"greedy tokens identical across all runs: {len(toks) == 1}")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "summary": summary, "sim": sim},
                                     default=str))


if __name__ == "__main__":
    main()
