"""End-to-end: does online expert prefetching make llama.cpp faster on a model bigger than RAM?

Builds (or reuses, under /tmp/expertpred-bench/) a widened copy of the shipped tiny-mixtral
(``expertpred widen``, f32 like the source so routing is bit-identical and the source's
traces / predictors apply), a trained predictor (``--predictor-name``, default
plugin.DEFAULT_PREDICTOR, trained on a trace of the source model)
and an oracle trace of the same greedy run; then runs, in alternating rounds, each in a
fresh child process:

    stock      memory cgroup (limit = size / --size-over-limit), file evicted, llama.cpp as is
    d0         same, plugin prefetching only the experts layer l selected
    predictor  same, d0 + the trained predictor's experts for layers l+1..l+D
    oracle     same, d0 + the true experts of l+1..l+D from the recorded trace
    cached     no limit, file in the page cache (upper bound)
    nommap     (extra) the limit with use_mmap=False: can the weights be loaded at all?

and prints tokens/s, bytes read from storage per token, major faults per token, prefetch
hit rate, whether every run generated the same tokens, and the ratios predictor/stock and
predictor/oracle (medians over rounds; the CPU and the virtual disk are shared and noisy,
compare within one run only).

    python benchmarks/e2e_prefetch.py                       # 3 GiB model, 2 rounds, ~10 min
    python benchmarks/e2e_prefetch.py --total-gib 0.25 --tokens 4 --rounds 1   # CI-sized
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from expertpred.gguf.layout import file_sha256, read_layout
from expertpred.lab.cgroup import MemoryCgroup, evict_file, proc_io, residency, why_unavailable
from expertpred.learn.train import model_path as saved_path
from expertpred.prefetch.plugin import DEFAULT_PREDICTOR

log = logging.getLogger("e2e_prefetch")

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path("/tmp/expertpred-bench")
SOURCE = ROOT / "models" / "tiny-mixtral" / "model.gguf"
PROMPT = "def read_config(path):\n    with open(path) as f:\n"
MODES = ("stock", "d0", "predictor", "oracle", "cached")
PLUGIN_MODE = {"stock": "off", "cached": "off", "nommap": "off", "d0": "d0",
               "predictor": "predictor", "oracle": "oracle"}


# --- child: one generation, inside the cgroup -------------------------------------------------


def child(a: argparse.Namespace) -> None:
    from expertpred.prefetch.plugin import (
        OracleTrace,
        PrefetchLlama,
        generate_greedy,
        load_predictors,
    )

    mode = PLUGIN_MODE[a.mode]
    preds = oracle = None
    if mode == "predictor":
        preds = load_predictors(a.predictor, a.model, name=a.predictor_name,
                                source_model=a.source)
    if mode == "oracle":
        oracle = OracleTrace.load(a.oracle)
    io0, t0 = proc_io(), time.perf_counter()
    llm = PrefetchLlama(a.model, mode=mode, predictor=preds, oracle=oracle,
                        lookahead=a.lookahead if mode in ("predictor", "oracle") else None,
                        method=a.method, queue_depth=a.queue_depth,
                        madvise_random=a.madvise_random, min_share=a.min_share,
                        async_requests=not a.sync_requests, n_ctx=256, n_threads=a.threads,
                        use_mmap=a.mode != "nommap", seed=0)
    io1, t1 = proc_io(), time.perf_counter()
    marks: list[Any] = []

    def on_token(tok: int) -> None:  # first token sampled: the prompt is done
        if not marks:
            marks.append((proc_io(), time.perf_counter()))

    toks, n_prompt, t_prompt, t_decode = generate_greedy(llm, PROMPT, a.tokens, on_token)
    io3, t3 = proc_io(), time.perf_counter()
    st = llm.prefetch_stats()
    llm.close()
    io2, t2 = marks[0] if marks else (io3, t3)
    gen = io3 - io2
    steps = max(1, len(toks) - 1)  # decode steps after the first sampled token
    print(json.dumps({
        "load_s": t1 - t0, "load_read": (io1 - io0).read_bytes,
        "prompt_tokens": n_prompt, "prompt_s": t2 - t1, "prompt_read": (io2 - io1).read_bytes,
        "steps": steps, "decode_s": t3 - t2, "decode_read": gen.read_bytes,
        "decode_majflt": gen.majflt, "tokens": toks, "stats": st.as_dict(),
    }, default=str), flush=True)


# --- parent -------------------------------------------------------------------------------------


def sh(*cmd: str) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def build_model(source: Path, total_gib: float) -> Path:
    """Widened f32 copy of ``source`` (f32 like the shipped model: bit-identical routing)."""
    from expertpred.gguf.widen import widen

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    sha = file_sha256(source)[:12]
    out = BENCH_DIR / f"{source.parent.name}-{sha}-widened-{total_gib:g}gib-f32.gguf"
    if not out.exists():
        res = widen(source, out, total_gib=total_gib, dtype="f32")
        print(f"widened {source} -> {out}: {res.file_size / 2**30:.2f} GiB in "
              f"{res.seconds:.1f} s, {res.plan.bytes_per_expert / 2**20:.1f} MiB per expert",
              flush=True)
    return out


def build_predictor(source: Path, n_prompts: int, name: str) -> Path:
    """``name`` predictors trained on a trace of ``source`` (the shipped trace when it was
    made from this very file, else a fresh trace of ``n_prompts`` prompts)."""
    sha = file_sha256(source)
    d = BENCH_DIR / "predictors" / sha[:12]
    models = d / "models"
    if saved_path(models, name, 1).exists():
        return models
    shipped = ROOT / "datasets" / "traces" / source.parent.name
    cfg = ROOT / "training" / "configs" / f"predictors-{source.parent.name}.toml"
    manifest = shipped / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["model"]["sha256"] == sha:
        dataset = shipped
    else:
        dataset = BENCH_DIR / "traces" / sha[:12]
        if not (dataset / "manifest.json").exists():
            sh(sys.executable, "-m", "expertpred.cli", "trace", "--model", str(source),
               "--prompts", str(ROOT / "datasets" / "prompts" / "heldout.jsonl"),
               "--split", "train", "--limit", str(n_prompts), "--max-tokens", "32",
               "--out", str(dataset))
    sh(sys.executable, "-m", "expertpred.cli", "train", "--config", str(cfg),
       f"--dataset={dataset}", f"--predictors={name}", "--cross_domain=false",
       "--plots=false", f"--out={d}")
    return models


def build_oracle(source: Path, tokens: int) -> Path:
    """The true routing of the benchmark's greedy run, traced on ``source``."""
    from expertpred.prefetch.plugin import OracleTrace, prompt_tokens
    from expertpred.trace.llama_tracer import LlamaTracer

    sha = file_sha256(source)[:12]
    out = BENCH_DIR / f"oracle-{sha}-{tokens}.npz"
    if not out.exists():
        ids = prompt_tokens(source, PROMPT)
        with LlamaTracer(source, n_ctx=256, n_threads=2) as tr:
            OracleTrace.from_sequence(tr.trace(ids, tokens)).save(out)
    return out


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def run_one(a: argparse.Namespace, mode: str, model: Path, limit: int, predictor: Path,
            oracle: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--mode", mode,
           "--model", str(model), "--source", str(a.source), "--predictor", str(predictor),
           "--oracle", str(oracle), "--tokens", str(a.tokens), "--lookahead",
           str(a.lookahead), "--method", a.method, "--queue-depth", str(a.queue_depth),
           "--threads", str(a.threads), "--predictor-name", a.predictor_name]
    if a.madvise_random:
        cmd.append("--madvise-random")
    if a.min_share is not None:
        cmd += ["--min-share", str(a.min_share)]
    if a.sync_requests:
        cmd.append("--sync-requests")
    row: dict[str, Any] = {"mode": mode}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if mode == "cached":
        warm(model)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        row.update(returncode=p.returncode, wall_s=time.perf_counter() - t0, oom=False,
                   stderr=p.stderr[-600:])
        out = p.stdout
    else:
        evict_file(model)
        row["resident_before"] = residency(model).fraction
        with MemoryCgroup(f"e2e-{mode}", limit) as cg:
            res = cg.run(cmd, env=env, cwd=ROOT, timeout=a.timeout)
        row.update(returncode=res.returncode, wall_s=res.seconds, oom=res.oom_killed,
                   peak=res.after.max_usage, stderr=res.stderr[-600:])
        out = res.stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if lines:
        row.update(json.loads(lines[-1]))
    return row


def summarize(rows: list[dict[str, Any]], modes: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for m in modes:
        ok = [r for r in rows if r["mode"] == m and "decode_s" in r]
        if not ok:
            continue
        s = {
            "tok_s": statistics.median(r["steps"] / r["decode_s"] for r in ok),
            "read_per_tok": statistics.median(r["decode_read"] / r["steps"] for r in ok),
            "majflt_per_tok": statistics.median(r["decode_majflt"] / r["steps"] for r in ok),
            "load_s": statistics.median(r["load_s"] for r in ok),
            "load_read": statistics.median(r["load_read"] for r in ok),
            "runs": len(ok),
        }
        hits = [r["stats"].get("engine_hit_rate") for r in ok]
        if all(h is not None for h in hits):
            s["hit_rate"] = statistics.median(hits)
            s["prefetch_read_per_tok"] = statistics.median(
                r["stats"]["engine_bytes_read"] / r["steps"] for r in ok)
            s["callback_s_per_tok"] = statistics.median(
                r["stats"]["callback_seconds"] / r["steps"] for r in ok)
        out[m] = s
    return out


def table(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| run | tok/s | GiB read / token | major faults / token | prefetch hit rate | "
             "prefetch GiB / token | callback s / token | load s (GiB read) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m, s in summary.items():
        hr = f"{100 * s['hit_rate']:.0f}%" if "hit_rate" in s else "–"
        pf = f"{s['prefetch_read_per_tok'] / 2**30:.2f}" if "prefetch_read_per_tok" in s else "–"
        cb = f"{s['callback_s_per_tok']:.3f}" if "callback_s_per_tok" in s else "–"
        lines.append(f"| {m} | {s['tok_s']:.3f} | {s['read_per_tok'] / 2**30:.2f} | "
                     f"{s['majflt_per_tok']:.0f} | {hr} | {pf} | {cb} | "
                     f"{s['load_s']:.1f} ({s['load_read'] / 2**30:.2f}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="stock", help=argparse.SUPPRESS)
    ap.add_argument("--oracle", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help="Use this widened GGUF as it is.")
    ap.add_argument("--source", type=Path, default=SOURCE, help="Model to widen.")
    ap.add_argument("--predictor", type=Path, help="Saved predictors (default: train).")
    ap.add_argument("--predictor-name", default=DEFAULT_PREDICTOR,
                    help="Which saved predictor (files <name>-d<d>.npz).")
    ap.add_argument("--total-gib", type=float, default=3.0, help="Size of the widened model.")
    ap.add_argument("--size-over-limit", type=float, default=2.5,
                    help="Model size / cgroup limit.")
    ap.add_argument("--tokens", type=int, default=16, help="Greedy tokens per run.")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--extra", default="nommap", help="One-off scenarios ('' for none).")
    ap.add_argument("--lookahead", type=int, default=1)
    ap.add_argument("--method", default="fadvise")
    ap.add_argument("--queue-depth", type=int, default=8)
    ap.add_argument("--madvise-random", action="store_true")
    ap.add_argument("--min-share", type=float, default=None,
                    help="Confidence gating of predicted experts (default: the plugin's).")
    ap.add_argument("--sync-requests", action="store_true",
                    help="Engine calls on the inference thread (the old path).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-prompts", type=int, default=80)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", type=Path, help="Write rows and summary here.")
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    logging.basicConfig(level=logging.WARNING)
    if reason := why_unavailable():
        sys.exit(f"error: {reason}")
    model = a.model or build_model(a.source, a.total_gib)
    predictor = a.predictor or build_predictor(a.source, a.train_prompts, a.predictor_name)
    oracle = build_oracle(a.source, a.tokens)
    lay = read_layout(model)
    size = model.stat().st_size
    limit = int(size / a.size_over_limit)
    per_tok = lay.bytes_per_expert() * lay.n_expert_used * len(lay.moe_layers)
    print(f"model {model}: {size / 2**30:.2f} GiB, {lay.bytes_per_expert() / 2**20:.1f} MiB "
          f"per expert, {per_tok / 2**30:.2f} GiB of experts per token; cgroup limit "
          f"{limit / 2**30:.2f} GiB; {a.tokens} tokens, lookahead {a.lookahead}, "
          f"{a.method} qd {a.queue_depth}, madvise_random={a.madvise_random}, "
          f"min_share={a.min_share}, sync_requests={a.sync_requests}", flush=True)
    modes = [m for m in a.modes.split(",") if m]
    rows: list[dict[str, Any]] = []
    for r in range(a.rounds):
        order = modes if r % 2 == 0 else modes[::-1]  # alternate: no mode always goes first
        for m in order:
            row = run_one(a, m, model, limit, predictor, oracle)
            row["round"] = r
            rows.append(row)
            tps = row["steps"] / row["decode_s"] if "decode_s" in row else float("nan")
            print(f"round {r} {m:9} rc={row['returncode']} {tps:7.3f} tok/s "
                  f"read/tok {row.get('decode_read', 0) / max(1, row.get('steps', 1)) / 2**30:.2f}"
                  f" GiB  hit {row.get('stats', {}).get('engine_hit_rate', '-')}", flush=True)
            if row["returncode"] != 0:
                print("  stderr: " + row["stderr"].replace("\n", "\n  "), flush=True)
    for m in [x for x in a.extra.split(",") if x]:
        row = run_one(a, m, model, limit, predictor, oracle)
        rows.append(row)
        print(f"extra {m}: rc={row['returncode']} oom_killed={row.get('oom')} "
              f"peak={row.get('peak', 0) / 2**30:.2f} GiB", flush=True)
    summary = summarize(rows, modes)
    print(table(summary))
    toks = {tuple(r["tokens"]) for r in rows if "tokens" in r}
    print(f"greedy tokens identical across all runs: {len(toks) == 1}")
    s = summary
    if "predictor" in s and "stock" in s:
        print(f"(c)/(a) predictor / stock tok/s: "
              f"{s['predictor']['tok_s'] / s['stock']['tok_s']:.2f}")
    if "predictor" in s and "oracle" in s:
        print(f"(c)/(d) predictor / oracle tok/s: "
              f"{s['predictor']['tok_s'] / s['oracle']['tok_s']:.2f}")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "summary": summary,
                                      "identical": len(toks) == 1}, indent=1, default=str))


if __name__ == "__main__":
    main()
