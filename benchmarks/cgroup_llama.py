"""What llama.cpp does when the model does not fit: load and decode inside a memory cgroup.

Builds (once, cached under /tmp/expertpred-bench/) a widened MoE model of ~1.5 GiB, then
runs llama.cpp in a child process for each scenario and prints load time, bytes read from
storage, major faults, peak cgroup memory, whether the OOM killer fired, and greedy decode
tokens/s:

    unlimited-warm   no cgroup, file in the page cache       (compute-only reference)
    unlimited-cold   no cgroup, file evicted first
    limit-cold       cgroup at --limit-frac of the file, file evicted first, mmap (default)
    limit-cached     same limit, file left in the page cache (charged to another group)
    limit-nommap     same limit, evicted, use_mmap=False (weights read into anonymous memory)
    limit-random     limit-cold, then madvise(MADV_RANDOM) on llama.cpp's mapping after the
                     load: page faults read only the faulting page (no 2 x read_ahead_kb
                     read-around), to size the readahead share of limit-cold's reads

    python benchmarks/cgroup_llama.py                          # ~1.5 GiB model, 25% limit
    python benchmarks/cgroup_llama.py --total-gib 1 --tokens 16 --scenarios limit-cold

The disk is virtual and may be cached by the host, and the CPU is shared: compare
scenarios of one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from pagecache import warm

from expertpred.gguf.layout import read_layout
from expertpred.gguf.random_models import SyntheticSpec, write_random_moe
from expertpred.gguf.widen import widen
from expertpred.lab.cgroup import MemoryCgroup, evict_file, proc_io, residency, why_unavailable
from expertpred.prefetch.sysmem import madvise_file_mappings

log = logging.getLogger("cgroup_llama")

BENCH_DIR = Path("/tmp/expertpred-bench")
PROMPT = "def read_config(path):\n    with open(path) as f:\n"
SCENARIOS = ("unlimited-warm", "unlimited-cold", "limit-cold", "limit-cached", "limit-nommap",
             "limit-random")
MADV_RANDOM = 1


# --- child: runs inside the cgroup ---------------------------------------------------------


def child(model: str, use_mmap: bool, tokens: int, advice: int | None) -> None:
    """Load, decode ``tokens`` greedy tokens, print one JSON line with phase counters."""
    from llama_cpp import Llama

    io0, t0 = proc_io(), time.perf_counter()
    llm = Llama(model_path=model, n_ctx=256, n_threads=2, use_mmap=use_mmap, verbose=False,
                seed=0)
    if advice is not None and madvise_file_mappings(model, advice) == 0:
        raise RuntimeError(f"{model} is not mapped in this process")
    io1, t1 = proc_io(), time.perf_counter()
    ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    llm.eval(ids)
    io2, t2, c2 = proc_io(), time.perf_counter(), os.times()
    out = []
    for _ in range(tokens):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval([out[-1]])
    io3, t3, c3 = proc_io(), time.perf_counter(), os.times()
    print(json.dumps({
        "load_s": t1 - t0, "load_read": (io1 - io0).read_bytes, "load_majflt": (io1 - io0).majflt,
        "prompt_tokens": len(ids), "prompt_s": t2 - t1, "prompt_read": (io2 - io1).read_bytes,
        "gen_tokens": tokens, "gen_s": t3 - t2,
        "gen_cpu_s": c3.user + c3.system - c2.user - c2.system, "gen_sys_s": c3.system - c2.system,
        "gen_read": (io3 - io2).read_bytes,
        "gen_majflt": (io3 - io2).majflt, "tokens": out,
    }), flush=True)
    llm.close()


# --- parent ---------------------------------------------------------------------------------


def bench_model(total_gib: float, source: Path | None) -> Path:
    """A widened f16 model of ``total_gib``: from ``source`` or a random 8-expert top-2 llama
    (n_embd 512, 4 layers) — Mixtral-class experts of ~45 MiB."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    if source is None:
        source = BENCH_DIR / "random-llama-512x8.gguf"
        if not source.exists():
            write_random_moe(source, SyntheticSpec(arch="llama", n_layer=4, n_embd=512,
                                                   n_head=8, n_head_kv=4, n_expert=8,
                                                   n_expert_used=2, n_ff=256))
    stem = source.parent.name if source.stem == "model" else source.stem  # models/<name>/
    out = BENCH_DIR / f"{stem}-widened-{total_gib:g}gib-f16.gguf"
    if not out.exists():
        res = widen(source, out, total_gib=total_gib, dtype="f16")
        print(f"widened {source} -> {out}: {res.file_size / 2**30:.2f} GiB in "
              f"{res.seconds:.1f} s ({res.mb_per_s:.0f} MB/s), "
              f"{res.plan.bytes_per_expert / 2**20:.1f} MiB per expert", flush=True)
    return out


def run_scenario(name: str, model: Path, limit: int, tokens: int) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", str(model), "--tokens", str(tokens)]
    if name == "limit-nommap":
        cmd.append("--no-mmap")
    if name == "limit-random":
        cmd.append("--madv-random")
    if name in ("unlimited-warm", "limit-cached"):
        warm(model)  # cached and charged to this process's group, not to a new one
    else:
        evict_file(model)
    resident = residency(model).fraction
    row: dict[str, object] = {"scenario": name, "resident_before": resident}
    if name.startswith("unlimited"):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        row.update(returncode=p.returncode, wall_s=time.perf_counter() - t0, oom_killed=False,
                   peak=None, stderr=p.stderr[-400:])
        out = p.stdout
    else:
        with MemoryCgroup(f"llama-{name}", limit) as cg:
            res = cg.run(cmd)
        row.update(returncode=res.returncode, wall_s=res.seconds, oom_killed=res.oom_killed,
                   peak=res.after.max_usage, child_read=res.io.read_bytes,
                   cg_pgmajfault=res.after["pgmajfault"], stderr=res.stderr[-400:])
        out = res.stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if lines:
        row.update(json.loads(lines[-1]))
    return row


def fmt(row: dict[str, object]) -> str:
    def gib(key: str) -> str:
        v = row.get(key)
        return f"{v / 2**30:6.2f}" if isinstance(v, int) else "     -"

    tps = (f"{row['gen_tokens'] / row['gen_s']:6.2f}" if "gen_s" in row else "     -")
    cpu = (f"{row['gen_cpu_s'] / row['gen_tokens']:6.2f}" if "gen_cpu_s" in row else "     -")
    load = f"{row['load_s']:6.1f}" if "load_s" in row else "     -"
    status = ("OOM-killed" if row["oom_killed"] else
              "ok" if row["returncode"] == 0 else f"rc={row['returncode']}")
    return (f"{row['scenario']:15} {status:10} {row['resident_before']:5.0%} {load} "
            f"{gib('load_read')} {gib('gen_read')} {gib('peak')} {tps} {cpu} {row['wall_s']:6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--no-mmap", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--madv-random", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help="Use this (widened) GGUF as it is.")
    ap.add_argument("--source", type=Path, help="Widen this GGUF (default: a random llama).")
    ap.add_argument("--total-gib", type=float, default=1.5, help="Size of the widened model.")
    ap.add_argument("--limit-frac", type=float, default=0.25, help="cgroup limit / file size.")
    ap.add_argument("--tokens", type=int, default=24, help="Greedy tokens to decode.")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--json", type=Path, help="Also write the rows here.")
    a = ap.parse_args()
    if a.child:
        child(a.child, not a.no_mmap, a.tokens, MADV_RANDOM if a.madv_random else None)
        return
    logging.basicConfig(level=logging.WARNING)
    if reason := why_unavailable():
        sys.exit(f"error: {reason}")
    model = a.model or bench_model(a.total_gib, a.source)
    lay = read_layout(model)
    size = model.stat().st_size
    limit = int(size * a.limit_frac)
    print(f"model {model}: {size / 2**30:.2f} GiB, {lay.n_expert} experts top-"
          f"{lay.n_expert_used}, {len(lay.moe_layers)} MoE layers, "
          f"{lay.bytes_per_expert() / 2**20:.1f} MiB per expert; cgroup limit "
          f"{limit / 2**30:.2f} GiB ({a.limit_frac:.0%})", flush=True)
    print(f"{'scenario':15} {'status':10} {'cache':>5} {'load_s':>6} {'rd_GiB':>6} "
          f"{'gen_rd':>6} {'peak':>6} {'tok/s':>6} {'cpu/tk':>6} {'wall':>6}", flush=True)
    rows = []
    for name in a.scenarios.split(","):
        row = run_scenario(name, model, limit, a.tokens)
        rows.append(row)
        print(fmt(row), flush=True)
        if row["returncode"] != 0 and not row["oom_killed"]:
            print(f"  stderr: {row['stderr']}", flush=True)
    toks = {tuple(r["tokens"]) for r in rows if "tokens" in r}  # type: ignore[arg-type]
    print(f"greedy tokens identical across scenarios: {len(toks) <= 1}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
