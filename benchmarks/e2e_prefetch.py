"""End-to-end: does online expert prefetching make llama.cpp faster on a model bigger than RAM?

Builds (or reuses, under /tmp/expertpred-bench/) a widened copy of a shipped model
(``--model-name``; ``expertpred widen``, ``--dtype`` f32 like the source so routing is
bit-identical, or q4_0, for which a q4_0 copy at the original width is the reference the
trace, predictor and oracle come from), a trained predictor (``--predictor-name``) and an
oracle trace of the same greedy run; then runs, in alternating rounds, each in a fresh
child process under a memory cgroup (limit = size / --size-over-limit, file evicted):

    stock      (a) llama.cpp as is
    d0         (b) plugin prefetching the experts layer l selected + residency ``kernel``
    predictor  (c) d0 + the predictor's experts for l+1..l+D + residency ``learned``
    oracle     (d) d0 + the true experts of l+1..l+D + residency ``belady``
    cached     (e) no limit, file in the page cache (upper bound)

The residency policy of each plugin mode is ``--residency`` (``kernel`` = leave it to the
kernel's reclaim, today's behaviour, needs nothing; the others need the plugin's
residency manager, else the run stops with one error line; ``--residency none`` runs the
plugin modes without one). A mode may carry a variant: ``d0@pread:8`` (I/O method and
queue depth), ``d0^/work/main`` (the plugin of another checkout: before / after).

Per mode: tok/s and GiB read per token (median, min-max over rounds), the effective read
rate during decode (GB/s, and with the cached run's compute time taken out), prefetch hit
rate, wasted speculative GiB per token, peak cgroup usage. In every round, next to the
modes: ``io_bandwidth``'s methods on this model's experts (cold) and ``dd`` O_DIRECT. At the
end: cachesim's LRU and Belady bytes per token for the same greedy run at the effective
expert budget, the ratios (c)/(b), (c)/(a), (c)/(d), and whether every run generated the
same tokens (medians; the CPU and the virtual disk are shared and noisy, compare within
one run only).

    python benchmarks/e2e_prefetch.py --model-name tiny-qwen3moe --rounds 3
    python benchmarks/e2e_prefetch.py --total-gib 0.25 --tokens 4 --rounds 1   # CI-sized
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from pagecache import warm

from expertpred.gguf.layout import MoELayout, file_sha256, read_layout
from expertpred.lab.cgroup import MemoryCgroup, evict_file, proc_io, residency, why_unavailable
from expertpred.learn.residency_policy import POLICIES
from expertpred.learn.train import model_path as saved_path
from expertpred.prefetch.plugin import DEFAULT_PREDICTOR

log = logging.getLogger("e2e_prefetch")

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path("/tmp/expertpred-bench")
PROMPT = "def read_config(path):\n    with open(path) as f:\n"
MODES = ("stock", "d0", "predictor", "oracle", "cached")
LETTER = {"stock": "a", "d0": "b", "predictor": "c", "oracle": "d", "cached": "e"}
PLUGIN_MODE = {"stock": "off", "cached": "off", "nommap": "off", "d0": "d0",
               "predictor": "predictor", "oracle": "oracle"}
RESIDENCY = "d0=kernel,predictor=learned,oracle=belady"


@dataclass(frozen=True)
class ModeSpec:
    """One column of the benchmark: a mode and its variant,
    ``mode[~predictor][@method[:qd[:chunk_mib]]][+random][+queued|+inline][+thread]
    [+norandom][+pyswitch][+t1][+dontneed|+cold][+nowrap][%policy][^checkout]``;
    ``%policy`` overrides
    ``--residency`` for this column (e.g. ``d0%learned``); ``~NAME`` runs another saved
    predictor than
    ``--predictor-name`` (e.g. ``predictor~fast-mlp+thread``), ``+thread`` runs it off the
    inference thread, ``+pyswitch`` keeps Python's 5 ms GIL switch interval (the plugin's
    default is ``DEFAULT_SWITCH_INTERVAL``), ``+t1`` runs llama.cpp on one thread instead of
    ``--threads``, ``+dontneed`` evicts with ``MADV_DONTNEED`` instead of the manager's
    default advice, ``+cold`` only marks the evicted experts ``MADV_COLD`` (the cgroup's
    reclaim frees them when it needs room)."""

    label: str  # as given in --modes, e.g. "d0@pread:8"
    mode: str  # key of PLUGIN_MODE
    method: str | None  # I/O method override
    queue_depth: int | None  # queue depth override
    chunk_mib: float | None  # engine chunk size override
    # madvise(MADV_RANDOM) llama.cpp's mapping (no fault read-around): +random True,
    # +norandom False, neither None (the plugin's default: by expert size)
    random: bool | None
    inline: bool | None  # demand hints on the callback's thread (None: engine default)
    root: Path  # checkout whose expertpred the child imports
    predictor_name: str | None = None  # None: --predictor-name
    thread: bool = False  # PluginConfig.predict_thread
    # PluginConfig.switch_interval=None: Python's 5 ms instead of the plugin's default
    pyswitch: bool = False
    # llama.cpp on 1 thread: on 2 cores its second thread spins at every barrier, also while
    # the eval callback runs, and leaves the callback and our threads one core
    t1: bool = False
    dontneed: bool = False  # ResidencyConfig.evict_advice = MADV_DONTNEED
    cold: bool = False  # ResidencyConfig.evict_advice = MADV_COLD
    # PluginConfig.wrap=False: no guess of the next token's first layers (the last layers'
    # offsets past the end; previous-token experts, never gated by min_rel_share)
    nowrap: bool = False
    # residency policy of this column (None: --residency's for its mode): separates what
    # the residency policy and what the prefetch predictor add, side by side in one run
    policy: str | None = None

    FLAGS = frozenset({"random", "norandom", "queued", "inline", "thread", "pyswitch", "t1",
                       "dontneed", "cold", "nowrap"})

    @classmethod
    def parse(cls, label: str) -> ModeSpec:
        rest, _, root = label.partition("^")
        rest, _, policy = rest.partition("%")
        parts = rest.split("+")  # a predictor name may hold "+": flags are the known tails
        flags: list[str] = []
        while len(parts) > 1 and parts[-1] in cls.FLAGS:
            flags.insert(0, parts.pop())
        rest, _, io = "+".join(parts).partition("@")
        mode, _, pname = rest.partition("~")
        method, _, io = io.partition(":")
        qd, _, chunk = io.partition(":")
        if policy and policy not in POLICIES:
            sys.exit(f"error: --modes {label!r}: residency policy {policy!r}, expected one of "
                     f"{', '.join(sorted(POLICIES))} (flags go before %policy: d0+cold%learned)")
        if mode not in PLUGIN_MODE or (pname and mode != "predictor"):
            sys.exit(f"error: --modes {label!r}: expected mode[~predictor][@method[:qd["
                     f":chunk_mib]]][+random|+norandom][+queued|+inline][+thread][+pyswitch][+t1][+dontneed|+cold][+nowrap][%policy][^checkout]"
                     f", mode one of {', '.join(PLUGIN_MODE)} (~predictor only with mode "
                     "predictor)")
        return cls(label, mode, method or None, int(qd) if qd else None,
                   float(chunk) if chunk else None,
                   True if "random" in flags else False if "norandom" in flags else None,
                   True if "inline" in flags else False if "queued" in flags else None,
                   Path(root) if root else ROOT, pname or None, "thread" in flags,
                   "pyswitch" in flags, "t1" in flags,
                   "dontneed" in flags, "cold" in flags, "nowrap" in flags, policy or None)


# --- child: one generation, inside the cgroup -------------------------------------------------


def residency_kwargs(policy: str, budget: int | None, nextuse: Path | None) -> dict[str, Any]:
    """Plugin keywords selecting ``policy`` (a ``ResidencyConfig``); exits with one line if
    this checkout's plugin has no residency manager."""
    if policy in ("", "none", "kernel"):
        return {}  # kernel: no manager at all, today's behaviour (no bookkeeping thread)
    from expertpred.prefetch import plugin

    options = set(inspect.signature(plugin.PrefetchPlugin.__init__).parameters)
    if hasattr(plugin, "PluginConfig"):  # the plugin's options are PluginConfig's fields
        options |= {f.name for f in fields(plugin.PluginConfig)}
    if "residency" not in options:
        sys.exit(f"error: residency policy {policy!r} needs the plugin's residency manager "
                 "(expertpred/prefetch/residency.py), not in this checkout; run with "
                 "--residency none")
    from expertpred.prefetch.residency import ResidencyConfig

    path = str(nextuse) if policy == "learned" and nextuse is not None else ""
    return {"residency": ResidencyConfig(policy=policy, budget_bytes=budget or None,
                                         nextuse_path=path)}


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def no_repack() -> None:
    """llama.cpp's CPU backend repacks q4_0 weights into anonymous buffers ("extra buffer
    types"): 3 GiB of anonymous memory under a 1.2 GiB limit is an OOM kill. Weights must
    stay in the file mapping, so turn the extra buffer types off (llama-cpp-python does not
    expose use_extra_bufts)."""
    import llama_cpp.llama_cpp as low  # what llama_cpp.Llama calls

    default = low.llama_model_default_params

    def params():  # type: ignore[no-untyped-def]
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params


RES_MARK: dict[str, float] = {}  # the residency manager's counters at the first token


def generate_marked(llm: Any, n_tokens: int) -> tuple[list[int], int, tuple[Any, float],
                                                       tuple[Any, float]]:
    """Greedy generation of PROMPT with process I/O and time marked when the first token is
    sampled (the prompt is done) and at the end: (tokens, prompt tokens, mark, end)."""
    from expertpred.prefetch.plugin import generate_greedy

    marks: list[tuple[Any, float]] = []

    def on_token(tok: int) -> None:
        if not marks:
            marks.append((proc_io(), time.perf_counter()))
            res = getattr(getattr(llm, "plugin", None), "residency_", None)
            if res is not None:  # its own stats(), not the plugin's: no flush, no wait
                mark = res.stats()
                RES_MARK.update(cpu=mark.cpu_seconds, steps=mark.counters.steps)

    toks, n_prompt, _, _ = generate_greedy(llm, PROMPT, n_tokens, on_token)
    end = (proc_io(), time.perf_counter())
    return toks, n_prompt, (marks[0] if marks else end), end


def child(a: argparse.Namespace) -> None:
    from expertpred.prefetch.plugin import OracleTrace, PrefetchLlama, load_predictors

    if a.no_repack:
        no_repack()
    mode = PLUGIN_MODE[a.mode]
    preds = oracle = None
    if mode == "predictor":
        preds = load_predictors(a.predictor, a.model, name=a.predictor_name,
                                source_model=a.source)
    if mode == "oracle":
        oracle = OracleTrace.load(a.oracle)
    nextuse = a.predictor / "nextuse.npz" if a.predictor else None
    extra = residency_kwargs(a.residency, a.budget, nextuse) if mode != "off" else {}
    if (a.dontneed or a.cold) and "residency" in extra:
        from expertpred.prefetch.sysmem import Madvice

        advice = Madvice.COLD if a.cold else Madvice.DONTNEED
        extra["residency"] = replace(extra["residency"], evict_advice=int(advice))
    if a.min_rel_share is not None:
        extra["min_rel_share"] = a.min_rel_share
    if a.no_wrap:
        extra["wrap"] = False
    if a.py_switch:
        extra["switch_interval"] = None
    engine_kwargs: dict[str, Any] = {}
    if a.chunk_mib:
        engine_kwargs["chunk_bytes"] = int(a.chunk_mib * 2**20)
    if a.inline_demand >= 0:
        engine_kwargs["inline_demand"] = bool(a.inline_demand)
    if engine_kwargs:
        extra["engine_kwargs"] = engine_kwargs
    io0, t0 = proc_io(), time.perf_counter()
    llm = PrefetchLlama(a.model, mode=mode, predictor=preds, oracle=oracle,
                        lookahead=a.lookahead if mode in ("predictor", "oracle") else None,
                        method=a.method, queue_depth=a.queue_depth,
                        madvise_random=a.madvise_random or (False if a.no_madvise_random
                                                            else None),
                        async_requests=not a.sync_requests, predict_thread=a.predict_thread,
                        n_ctx=256, n_threads=a.threads,
                        use_mmap=a.mode != "nommap", seed=0, **extra)
    io1, t1 = proc_io(), time.perf_counter()
    toks, n_prompt, (io2, t2), (io3, t3) = generate_marked(llm, a.tokens)
    st = llm.prefetch_stats()
    anon = rss_anon()
    llm.close()
    gen = io3 - io2
    steps = max(1, len(toks) - 1)  # decode steps after the first sampled token
    eng = st.engine
    print(json.dumps({
        "load_s": t1 - t0, "load_read": (io1 - io0).read_bytes,
        "prompt_tokens": n_prompt, "prompt_s": t2 - t1, "prompt_read": (io2 - io1).read_bytes,
        "steps": steps, "decode_s": t3 - t2, "decode_read": gen.read_bytes,
        "decode_majflt": gen.majflt, "tokens": toks, "rss_anon": anon,
        "decode_residency_cpu": (st.residency.cpu_seconds - RES_MARK["cpu"]
                                 if st.residency is not None and RES_MARK else None),
        "decode_residency_steps": (st.residency.counters.steps - RES_MARK["steps"]
                                   if st.residency is not None and RES_MARK else None),
        "stats": st.as_dict(),
        "unbalanced": getattr(eng, "unbalanced", lambda: {})() if eng is not None else {},
    }, default=str), flush=True)


# --- parent: inputs -------------------------------------------------------------------------------


def sh(*cmd: str) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def widened(source: Path, out: Path, **kw: Any) -> Path:
    from expertpred.gguf.widen import widen

    if not out.exists():
        res = widen(source, out, **kw)
        print(f"widened {source} -> {out}: {res.file_size / 2**30:.2f} GiB in "
              f"{res.seconds:.1f} s, {res.plan.bytes_per_expert / 2**20:.1f} MiB per expert",
              flush=True)
    return out


def build_models(source: Path, total_gib: float, dtype: str) -> tuple[Path, Path]:
    """(widened model, reference): the reference is what traces and predictors come from —
    the source itself for f32, else the source converted to ``dtype`` at its own width
    (same routing as the widened copy)."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    tag = f"{source.parent.name}-{file_sha256(source)[:12]}"
    model = widened(source, BENCH_DIR / f"{tag}-widened-{total_gib:g}gib-{dtype}.gguf",
                    total_gib=total_gib, dtype=dtype)
    if dtype == "f32":
        return model, source
    from expertpred.gguf.widen import plan_widen

    old_ff = plan_widen(source, total_gib=total_gib, dtype=dtype).old_ff
    ref = widened(source, BENCH_DIR / f"{tag}-ref-{dtype}.gguf", ff=old_ff, dtype=dtype)
    return model, ref


def build_predictor(ref: Path, model_name: str, n_prompts: int, name: str) -> Path:
    """``name`` predictors trained on a trace of ``ref`` (the shipped trace when it was made
    from this very file, else a fresh trace of ``n_prompts`` prompts)."""
    sha = file_sha256(ref)
    d = BENCH_DIR / "predictors" / sha[:12]
    models = d / "models"
    if saved_path(models, name, 1).exists() and (models / "nextuse.npz").exists():
        return models  # train also writes the learned residency's next-use model
    shipped = ROOT / "datasets" / "traces" / model_name
    cfg = ROOT / "training" / "configs" / f"predictors-{model_name}.toml"
    manifest = shipped / "_manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["model"]["sha256"] == sha:
        dataset = shipped
    else:
        dataset = BENCH_DIR / "traces" / sha[:12]
        if not (dataset / "_manifest.json").exists():
            sh(sys.executable, "-m", "expertpred.cli", "trace", "--model", str(ref),
               "--prompts", str(ROOT / "datasets" / "prompts" / "heldout.jsonl"),
               "--split", "train", "--limit", str(n_prompts), "--max-tokens", "32",
               "--out", str(dataset))
    sh(sys.executable, "-m", "expertpred.cli", "train", "--config", str(cfg),
       f"--dataset={dataset}", f"--predictors={name}", "--cross_domain=false",
       "--plots=false", f"--out={d}")
    return models


def build_oracle(ref: Path, tokens: int) -> Path:
    """The true routing of the benchmark's greedy run, traced on ``ref``."""
    from expertpred.prefetch.plugin import OracleTrace, prompt_tokens
    from expertpred.trace.llama_tracer import LlamaTracer

    out = BENCH_DIR / f"oracle-{file_sha256(ref)[:12]}-{tokens}.npz"
    if not out.exists():
        ids = prompt_tokens(ref, PROMPT)
        with LlamaTracer(ref, n_ctx=256, n_threads=2) as tr:
            OracleTrace.from_sequence(tr.trace(ids, tokens)).save(out)
    return out


def load_avg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- parent: runs ---------------------------------------------------------------------------------


def run_one(a: argparse.Namespace, spec: ModeSpec, model: Path, limit: int,
            predictors: dict[str, Path], oracle: Path) -> dict[str, Any]:
    policy = spec.policy or a.residency_map.get(spec.mode, "none")
    pname = spec.predictor_name or a.predictor_name
    predictor = predictors[pname]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--mode", spec.mode,
           "--model", str(model), "--source", str(a.ref), "--predictor", str(predictor),
           "--oracle", str(oracle), "--tokens", str(a.tokens), "--lookahead",
           str(a.lookahead), "--method", spec.method or a.method, "--queue-depth",
           str(spec.queue_depth or a.queue_depth), "--threads", str(1 if spec.t1 else a.threads),
           "--predictor-name", pname, "--residency", policy,
           "--budget", str(a.budget or 0)]
    if a.no_repack:
        cmd.append("--no-repack")
    if a.madvise_random or spec.random:
        cmd.append("--madvise-random")
    elif spec.random is False:
        cmd.append("--no-madvise-random")
    if spec.chunk_mib:
        cmd += ["--chunk-mib", str(spec.chunk_mib)]
    if spec.inline is not None:
        cmd += ["--inline-demand", str(int(spec.inline))]
    if a.min_rel_share is not None:
        cmd += ["--min-rel-share", str(a.min_rel_share)]
    if a.sync_requests:
        cmd.append("--sync-requests")
    if spec.pyswitch:
        cmd.append("--py-switch")
    if spec.dontneed:
        cmd.append("--dontneed")
    if spec.cold:
        cmd.append("--cold")
    if spec.nowrap:
        cmd.append("--no-wrap")
    if spec.thread:
        cmd.append("--predict-thread")
    row: dict[str, Any] = {"mode": spec.label, "residency": policy}
    env = {**os.environ, "PYTHONPATH": str(spec.root)}
    if spec.mode == "cached":
        warm(model)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        row.update(returncode=p.returncode, wall_s=time.perf_counter() - t0, oom=False,
                   stderr=p.stderr[-600:])
        out = p.stdout
    else:
        evict_file(model)
        row["resident_before"] = residency(model).fraction
        with MemoryCgroup(f"e2e-{spec.mode}", limit) as cg:
            res = cg.run(cmd, env=env, cwd=ROOT, timeout=a.timeout)
        row.update(returncode=res.returncode, wall_s=res.seconds, oom=res.oom_killed,
                   peak=res.after.max_usage, stderr=res.stderr[-600:])
        out = res.stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if lines:
        row.update(json.loads(lines[-1]))
    return row


def io_reference(model: Path, lay: MoELayout, gb: float, methods: list[str],
                 seed: int) -> dict[str, float]:
    """GB/s of io_bandwidth's methods on this model's experts (cold) and dd O_DIRECT."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import io_bandwidth as iob

    from expertpred.prefetch.sysmem import FileMapping

    budget = int(min(gb * 1e9, lay.expert_bytes * 0.8))
    keys = iob.workload(lay, budget, seed=seed, k=lay.n_expert_used)
    out: dict[str, float] = {}
    first = int(lay.offsets.min()) // (4 << 20) * (4 << 20)
    span = max(1, int(lay.expert_bytes) - budget)
    off = first + (seed * budget) % span // (4 << 20) * (4 << 20)
    out["dd O_DIRECT"] = iob.o_direct_dd(model, off, budget)
    with FileMapping(model) as fm:
        for m in methods:
            name, _, qd = m.partition(":")
            gbps, _ = iob.run_method(model, lay, fm, name, int(qd or 1), keys, 2 << 20,
                                     False, False)
            out[m] = gbps
    return out


# --- parent: summary ------------------------------------------------------------------------------


def med_range(xs: list[float], fmt: str = "{:.3f}") -> str:
    if not xs:
        return "–"
    m = statistics.median(xs)
    return f"{fmt.format(m)} [{fmt.format(min(xs))}–{fmt.format(max(xs))}]"


def summarize(rows: list[dict[str, Any]], specs: list[ModeSpec]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    cached = [r["decode_s"] / r["steps"] for r in rows
              if r["mode"] == "cached" and "decode_s" in r]
    compute_s = statistics.median(cached) if cached else 0.0
    for spec in specs:
        ok = [r for r in rows if r["mode"] == spec.label and "decode_s" in r]
        if not ok:
            continue
        s: dict[str, Any] = {
            "tok_s": [r["steps"] / r["decode_s"] for r in ok],
            "gib_tok": [r["decode_read"] / r["steps"] / 2**30 for r in ok],
            "gbps": [r["decode_read"] / r["decode_s"] / 1e9 for r in ok],
            # nan when compute is most of the decode (then the difference is noise)
            "gbps_io": [r["decode_read"] / (r["decode_s"] - compute_s * r["steps"]) / 1e9
                        if r["decode_s"] > 1.25 * compute_s * r["steps"] else float("nan")
                        for r in ok],
            "peak_gib": [r.get("peak", 0) / 2**30 for r in ok],
            "oom": sum(bool(r.get("oom")) for r in ok),
            "rss_anon": [r.get("rss_anon", 0) for r in ok],
            "runs": len(ok),
        }
        st = [r["stats"] for r in ok]
        if all("engine_hit_rate" in x for x in st):
            s["hit"] = [x["engine_hit_rate"] for x in st]
            # .get: a checkout from before the ledgers (mode^checkout) has no wasted_bytes
            s["waste_gib_tok"] = [x.get("engine_wasted_bytes", float("nan")) / r["steps"]
                                  / 2**30 for x, r in zip(st, ok)]
            s["unbalanced"] = sum(bool(r.get("unbalanced")) for r in ok)
            s["demand_p50_ms"] = [x.get("engine_demand_latency_p50_ms", float("nan"))
                                  for x in st]
        out[spec.label] = s
    return out


def table(summary: dict[str, dict[str, Any]], limit: int) -> str:
    lines = ["| run | tok/s median [min–max] | GiB read / token | read GB/s during decode | "
             "… without compute | hit rate | wasted spec. GiB / token | demand read p50 ms | "
             "peak / limit | OOM |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m, s in summary.items():
        base = m.split("@")[0].split("^")[0]
        name = f"({LETTER[base]}) {m}" if base in LETTER else m
        hit = med_range([100 * h for h in s["hit"]], "{:.0f}%") if "hit" in s else "–"
        waste = med_range(s["waste_gib_tok"], "{:.2f}") if "waste_gib_tok" in s else "–"
        lat = med_range(s["demand_p50_ms"], "{:.1f}") if "demand_p50_ms" in s else "–"
        peak = f"{max(s['peak_gib']) * 2**30 / limit:.2f}" if max(s["peak_gib"]) else "–"
        lines.append(f"| {name} | {med_range(s['tok_s'])} | {med_range(s['gib_tok'], '{:.2f}')}"
                     f" | {med_range(s['gbps'], '{:.2f}')} | {med_range(s['gbps_io'], '{:.2f}')}"
                     f" | {hit} | {waste} | {lat} | {peak} | {s['oom']} |")
    return "\n".join(lines)


def cachesim_floor(oracle: Path, lay: MoELayout, n_prompt: int, steps: int,
                   budget: int, nextuse: Path | None = None) -> dict[str, float]:
    """cachesim's bytes per decode token of this greedy run at ``budget`` bytes of experts:
    the prompt (token-major, as the simulator orders it) warms the cache, then the
    decode tokens' bytes are the difference. With ``nextuse`` also ``learned``, the
    policy (c) runs, on the same stream: what (c) would read if nothing but its policy's
    misses were read."""
    from expertpred.learn.cachesim import simulate
    from expertpred.predictors.nextuse import NextUseModel

    z = np.load(oracle)
    experts, tokens = z["experts"].astype(np.int64), z["tokens"].astype(np.int64)
    bpe = lay.bytes_per_expert()
    out = {"budget_experts": budget // bpe}
    model = NextUseModel.load(nextuse) if nextuse is not None and nextuse.exists() else None
    for pol in ("lru", "belady") + (("learned",) if model is not None else ()):
        kw = {"model": model} if pol == "learned" else {}
        full = simulate(experts[:n_prompt + steps], pol, budget, bpe, lay.n_expert,
                        tokens=tokens[:n_prompt + steps], **kw)
        warmup = simulate(experts[:n_prompt], pol, budget, bpe, lay.n_expert,
                          tokens=tokens[:n_prompt], **kw)
        total = full.demand_bytes + full.prefetch_bytes
        pre = warmup.demand_bytes + warmup.prefetch_bytes
        out[pol] = (total - pre) / steps / 2**30
    return out


def ratios(summary: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    out = []
    pairs: list[tuple[str, str, float | None]] = [
        ("predictor", "d0", 1.5), ("predictor", "stock", 3.0), ("predictor", "oracle", 0.85)]
    # variants of (c) (another predictor, off-thread): against (c) itself and (b)
    pairs += [(m, den, None) for m in summary if m.startswith("predictor") and m != "predictor"
              for den in ("predictor", "d0")]
    for num, den, goal in pairs:
        if num not in summary or den not in summary:
            continue
        r = statistics.median(summary[num]["tok_s"]) / statistics.median(summary[den]["tok_s"])
        per_round = []
        for rnd in sorted({x["round"] for x in rows if "round" in x}):
            a = [x for x in rows if x.get("round") == rnd and x["mode"] == num and "steps" in x]
            b = [x for x in rows if x.get("round") == rnd and x["mode"] == den and "steps" in x]
            if a and b:
                per_round.append((a[0]["steps"] / a[0]["decode_s"])
                                 / (b[0]["steps"] / b[0]["decode_s"]))
        tag = f"({LETTER[num]})/({LETTER[den]}) " if num in LETTER else ""
        want = f"goal >= {goal}; " if goal is not None else ""
        out.append(f"{tag}{num} / {den} tok/s: {r:.2f} "
                   f"({want}per round {', '.join(f'{x:.2f}' for x in per_round)})")
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="stock", help=argparse.SUPPRESS)
    ap.add_argument("--oracle", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--source", type=Path,
                    help="Model to widen (default: models/<--model-name>/model.gguf).")
    ap.add_argument("--model", type=Path, help="Use this widened GGUF as it is.")
    ap.add_argument("--model-name", default="tiny-mixtral",
                    help="Shipped model (models/<name>/model.gguf) to widen.")
    ap.add_argument("--dtype", default="f32", help="Widened expert dtype (f32, q4_0, ...).")
    ap.add_argument("--predictor", type=Path, help="Saved predictors (default: train).")
    ap.add_argument("--predictor-name", default=DEFAULT_PREDICTOR,
                    help="Which saved predictor (files <name>-d<d>.npz).")
    ap.add_argument("--total-gib", type=float, default=3.0, help="Size of the widened model.")
    ap.add_argument("--size-over-limit", type=float, default=2.5,
                    help="Model size / cgroup limit.")
    ap.add_argument("--tokens", type=int, default=16, help="Greedy tokens per run.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--residency", default=RESIDENCY,
                    help="mode=policy,... for the plugin modes, or 'none'.")
    ap.add_argument("--budget", type=int, default=0,
                    help="Expert byte budget for the residency manager (0: its default).")
    ap.add_argument("--extra", default="", help="One-off scenarios, e.g. nommap.")
    ap.add_argument("--io-ref", default="fadvise:8,madvise:1,pread:8",
                    help="io_bandwidth methods measured each round ('' for none).")
    ap.add_argument("--io-gb", type=float, default=1.0)
    ap.add_argument("--lookahead", type=int, default=1)
    ap.add_argument("--method", default="fadvise")
    ap.add_argument("--queue-depth", type=int, default=8)
    ap.add_argument("--madvise-random", action="store_true",
                    help="MADV_RANDOM in every mode (default: the plugin's, by expert size)")
    ap.add_argument("--no-madvise-random", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--chunk-mib", type=float, default=0.0,
                    help="Engine chunk size (0: the engine's default).")
    ap.add_argument("--inline-demand", type=int, default=-1,
                    help="EngineConfig.inline_demand 1/0 (-1: the engine's default).")
    ap.add_argument("--min-rel-share", type=float, default=None,
                    help="Confidence gating of predicted experts, in units of 1/k (default: "
                         "the plugin's).")
    ap.add_argument("--sync-requests", action="store_true",
                    help="Engine calls on the inference thread (the old path).")
    ap.add_argument("--predict-thread", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--py-switch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dontneed", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-wrap", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--train-prompts", type=int, default=80)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", type=Path, help="Write rows and summary here.")
    ap.add_argument("--no-repack", action="store_true",
                    help="use_extra_bufts=False (q4_0: keep weights in the mapping).")
    ap.add_argument("--bench-dir", type=Path, default=BENCH_DIR,
                    help="Where widened models, traces and predictors are kept (a private "
                         "one keeps other jobs from evicting or reading the same file).")
    return ap.parse_args()


def main() -> None:
    global BENCH_DIR
    a = parse_args()
    BENCH_DIR = a.bench_dir
    if a.child:
        a.budget = a.budget or None
        child(a)
        return
    logging.basicConfig(level=logging.WARNING)
    if reason := why_unavailable():
        sys.exit(f"error: {reason}")
    specs = [ModeSpec.parse(m) for m in a.modes.split(",") if m]
    a.residency_map = ({} if a.residency in ("", "none") else
                       dict(kv.split("=", 1) for kv in a.residency.split(",")))
    for policy in {s.policy or a.residency_map.get(s.mode) for s in specs} - {None, "kernel"}:
        residency_kwargs(policy, None, None)  # one error line now, not one per child
    source = a.source or ROOT / "models" / a.model_name / "model.gguf"
    if a.source:
        a.model_name = a.source.parent.name
    if a.model:
        model, a.ref = a.model, source
    else:
        model, a.ref = build_models(source, a.total_gib, a.dtype)
    names = {a.predictor_name} | {s.predictor_name for s in specs if s.predictor_name}
    predictors = {n: a.predictor or build_predictor(a.ref, a.model_name, a.train_prompts, n)
                  for n in sorted(names)}
    oracle = build_oracle(a.ref, a.tokens)
    lay = read_layout(model)
    size = model.stat().st_size
    limit = int(size / a.size_over_limit)
    per_tok = lay.bytes_per_expert() * lay.n_expert_used * len(lay.moe_layers)
    print(f"model {model}: {size / 2**30:.2f} GiB, {lay.bytes_per_expert() / 2**20:.1f} MiB "
          f"per expert, {per_tok / 2**30:.2f} GiB of experts per token; cgroup limit "
          f"{limit / 2**30:.2f} GiB; {a.tokens} tokens, lookahead {a.lookahead}, "
          f"{a.method} qd {a.queue_depth}, residency {a.residency_map or 'none'}, "
          f"predictor {a.predictor_name}, min_rel_share={a.min_rel_share}; load average "
          f"{load_avg()}",
          flush=True)
    rows: list[dict[str, Any]] = []
    io_rows: list[dict[str, float]] = []
    io_methods = [m for m in a.io_ref.split(",") if m]
    for r in range(a.rounds):
        order = specs if r % 2 == 0 else specs[::-1]  # alternate: no mode always goes first
        if io_methods:
            io_rows.append(io_reference(model, lay, a.io_gb, io_methods, r))
            print(f"round {r} io reference GB/s: " + ", ".join(
                f"{k} {v:.2f}" for k, v in io_rows[-1].items()), flush=True)
        for spec in order:
            row = run_one(a, spec, model, limit, predictors, oracle)
            row["round"] = r
            rows.append(row)
            tps = row["steps"] / row["decode_s"] if "decode_s" in row else float("nan")
            st = row.get("stats", {})
            print(f"round {r} {spec.label:12} rc={row['returncode']} {tps:7.3f} tok/s "
                  f"read/tok {row.get('decode_read', 0) / max(1, row.get('steps', 1)) / 2**30:.2f}"
                  f" GiB  hit {st.get('engine_hit_rate', '-')}  peak "
                  f"{row.get('peak', 0) / 2**30:.2f} GiB  load {load_avg()}", flush=True)
            if row["returncode"] != 0:
                print("  stderr: " + row["stderr"].replace("\n", "\n  "), flush=True)
    for m in [x for x in a.extra.split(",") if x]:
        row = run_one(a, ModeSpec.parse(m), model, limit, predictors, oracle)
        rows.append(row)
        print(f"extra {m}: rc={row['returncode']} oom_killed={row.get('oom')} "
              f"peak={row.get('peak', 0) / 2**30:.2f} GiB", flush=True)
    if a.json:  # the rows first: a failing summary must not lose the runs
        a.json.write_text(json.dumps({"rows": rows, "io": io_rows}, indent=1, default=str))
    a.nextuse = predictors[a.predictor_name] / "nextuse.npz"  # (c)'s policy, simulated
    report(a, rows, io_rows, specs, lay, limit, size, oracle, model)


def report(a: argparse.Namespace, rows: list[dict[str, Any]], io_rows: list[dict[str, float]],
           specs: list[ModeSpec], lay: MoELayout, limit: int, size: int, oracle: Path,
           model: Path) -> None:
    summary = summarize(rows, specs)
    print()
    print(table(summary, limit))
    if io_rows:
        print("io reference GB/s, median [min–max] over rounds: " + ", ".join(
            f"{k} {med_range([x[k] for x in io_rows], '{:.2f}')}" for k in io_rows[0]))
    toks = {tuple(r["tokens"]) for r in rows if "tokens" in r}
    print(f"greedy tokens identical across all runs: {len(toks) == 1} "
          f"({len([r for r in rows if 'tokens' in r])} runs)")
    ok = [r for r in rows if "steps" in r]
    floor = {}
    if ok:
        anon = statistics.median(r.get("rss_anon", 0) for r in ok if r["mode"] == "stock") \
            if any(r["mode"] == "stock" for r in ok) else 0
        budget = max(0, limit - int(size - lay.expert_bytes) - int(anon))
        derived = [r["stats"]["residency_budget_bytes"] for r in ok
                   if r.get("stats", {}).get("residency_budget_bytes")]
        src = ("--budget" if a.budget else
               f"limit - non-expert bytes - stock RssAnon {anon / 2**20:.0f} MiB")
        if derived and not a.budget:  # the managers derived theirs: simulate at that one
            budget = int(statistics.median(derived))
            src = "the managers' own derived budget, median"
        floor = cachesim_floor(oracle, lay, ok[0]["prompt_tokens"], ok[0]["steps"],
                               a.budget or budget,
                               a.nextuse)
        learned = f", learned {floor['learned']:.3f}" if "learned" in floor else ""
        print(f"cachesim at the effective expert budget {(a.budget or budget) / 2**30:.2f} GiB "
              f"({floor['budget_experts']} of {lay.n_expert * len(lay.moe_layers)} experts; "
              f"{src}): GiB read / "
              f"token LRU {floor['lru']:.3f}, Belady {floor['belady']:.3f}{learned}")
        if "predictor" in summary:
            c = statistics.median(summary["predictor"]["gib_tok"])
            print(f"(c) GiB read / token over Belady: {c / floor['belady']:.2f} (goal <= 1.3)"
                  if floor["belady"] > 0 else "(c) Belady floor is 0")
            if floor.get("learned", 0) > 0 and floor["belady"] > 0:
                # the gap in two parts: the policy's own misses (simulated on this run's
                # stream), and what the run read beyond them (prefetch waste, reclaim, faults)
                print(f"(c) split: policy (simulated learned / Belady) "
                      f"{floor['learned'] / floor['belady']:.2f} x execution (measured / "
                      f"simulated learned) {c / floor['learned']:.2f}")
        if "oracle" in summary and floor["belady"] > 0:
            d = statistics.median(summary["oracle"]["gib_tok"])
            print(f"(d) GiB read / token over Belady: {d / floor['belady']:.2f} (its "
                  "execution overhead: same policy, same stream)")
    for line in ratios(summary, rows):
        print(line)
    for m in summary:  # the manager's thread takes CPU from llama.cpp's compute
        st = [r["stats"] for r in rows if r["mode"] == m and "stats" in r]
        cpu = [x["residency_cpu_seconds"] / max(1, x.get("residency_steps", 1)) * 1e3
               for x in st if "residency_cpu_seconds" in x]
        dec = [r["decode_residency_cpu"] / max(1, r["decode_residency_steps"]) * 1e3
               for r in rows if r["mode"] == m and r.get("decode_residency_cpu") is not None]
        tok = [r["decode_residency_cpu"] / r["steps"] * 1e3 for r in rows
               if r["mode"] == m and r.get("decode_residency_cpu") is not None]
        if cpu and any(cpu):
            print(f"{m}: residency manager CPU {med_range(cpu, '{:.2f}')} ms per layer step "
                  f"over the run" + (f", {med_range(dec, '{:.2f}')} in decode "
                                     f"({med_range(tok, '{:.1f}')} ms per decode token)"
                                     if dec else ""))
    for m in summary:  # every plugin mode: what the callback costs the inference thread
        st = [r["stats"] for r in rows if r["mode"] == m and r.get("stats", {}).get(
            "layer_events")]
        if not st:
            continue
        cb = [x.get("callback_seconds", 0.0) / x["layer_events"] * 1e6 for x in st]
        n = [x.get("predictions", 0) for x in st]
        pred = ""
        if sum(n):
            us = sum(x.get("predict_seconds", 0.0) for x in st) / sum(n) * 1e6
            late = sum(x.get("late_predictions", 0) for x in st)
            pred = f"{sum(n)} predictions, {us:.1f} µs each, {late} late " \
                   f"({100 * late / sum(n):.1f} %); "
        print(f"{m}: {pred}inference thread in the callback {med_range(cb, '{:.1f}')} µs "
              "per layer")
    bad = [r["mode"] for r in rows if r.get("unbalanced")]
    print(f"engine ledgers balanced in every run: {not bad} {bad or ''}")
    print(f"load average at the end: {load_avg()}")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "summary": summary, "io": io_rows,
                                      "cachesim": floor, "identical": len(toks) == 1},
                                     indent=1, default=str))


if __name__ == "__main__":
    main()
