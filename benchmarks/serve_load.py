"""Load on ``expertpred serve``: N requests from K concurrent clients, on 127.0.0.1 only.

Part 1, under memory pressure: the widened tiny-mixtral of ``benchmarks/e2e_prefetch.py``
(same helpers: ``build_model``, ``build_predictor``), served inside a memory cgroup of
size / ``--size-over-limit`` with the file evicted before each server starts, once per
mode and round (alternating order):

    off        ``expertpred serve --mode off``: stock llama.cpp behind the same server
    predictor  ``expertpred serve --predictor P --residency learned``: the default prefetch
               configuration with the learned residency, i.e. e2e_prefetch.py's mode (c)

Each client streams its requests (SSE) and times the first token and the end; the report
gives p50 / p95 time to first token and total latency, throughput (generated tokens /
wall time of the load) and the median per-request decode rate, medians over rounds with
their spread, and the speedup predictor / off.

Part 2, serving overhead without the memory limit (file in the page cache): one client,
the same prompts, ``expertpred serve`` against ``PrefetchLlama.create_completion`` called
directly in a child process with the same options, alternating; decode tokens/s per
request as the client sees it.

    python benchmarks/serve_load.py                                  # 3 GiB, 3 rounds
    python benchmarks/serve_load.py --total-gib 0.25 --requests 4 --clients 2 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_prefetch as e2e  # noqa: E402 - the widened model and predictor are built there

from expertpred.lab.cgroup import MemoryCgroup, evict_file, why_unavailable  # noqa: E402
from expertpred.prefetch.plugin import DEFAULT_PREDICTOR  # noqa: E402

ROOT = e2e.ROOT
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
N_CTX = 1024


@dataclass(frozen=True)
class Req:
    """One streamed request as the client saw it."""

    ttft: float  # send -> first token chunk, s (queueing behind other clients included)
    total: float  # send -> [DONE], s
    tokens: int  # token chunks received
    decode_tps: float  # (tokens - 1) / (last chunk - first chunk); 0 with < 2 tokens
    error: str = ""


def prompts(n: int) -> list[str]:
    """``n`` distinct held-out test prompts (distinct: no prompt-cache reuse between them)."""
    rows = [json.loads(line) for line in open(ROOT / "datasets" / "prompts" / "heldout.jsonl")]
    texts = [r["text"][:160] for r in rows if r["split"] == "test"]
    return texts[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(a: argparse.Namespace, model: Path, mode: str, predictor: Path,
               port: int) -> list[str]:
    cmd = [sys.executable, "-m", "expertpred.cli", "serve", "--model", str(model), "--port",
           str(port), "--n-ctx", str(N_CTX), "--threads", str(a.threads)]
    if mode == "predictor":
        cmd += ["--predictor", str(predictor), "--source-model", str(a.source),
                "--predictor-name", a.predictor_name, "--residency", a.residency]
        if a.budget:
            cmd += ["--budget", str(a.budget)]
    else:
        cmd += ["--mode", mode]
    return cmd


def wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"server not ready in {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def stream_one(client: httpx.Client, base: str, prompt: str, tokens: int) -> Req:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.0,
            "repeat_penalty": 1.0, "stream": True}
    t0 = time.perf_counter()
    times: list[float] = []
    try:
        with client.stream("POST", base + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Req(0, time.perf_counter() - t0, 0, 0, f"HTTP {r.status_code}")
            for line in r.iter_lines():
                # a token per chunk; the last chunk only carries finish_reason
                if line.startswith("data: {") and '"finish_reason": null' in line:
                    times.append(time.perf_counter())
    except httpx.HTTPError as exc:
        return Req(0, time.perf_counter() - t0, len(times), 0, repr(exc))
    total = time.perf_counter() - t0
    tps = (len(times) - 1) / (times[-1] - times[0]) if len(times) >= 2 else 0.0
    return Req(times[0] - t0 if times else total, total, len(times), tps)


def load(base: str, texts: list[str], clients: int, tokens: int,
         deadline: float) -> tuple[list[Req], float]:
    """Every prompt once, ``clients`` at a time; (results, wall seconds)."""
    todo: queue.Queue[str] = queue.Queue()
    for t in texts:
        todo.put(t)
    out: list[Req] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=httpx.Timeout(600, connect=10)) as c:
            while time.monotonic() < deadline:
                try:
                    p = todo.get_nowait()
                except queue.Empty:
                    return
                r = stream_one(c, base, p, tokens)
                with lock:
                    out.append(r)

    t0 = time.perf_counter()
    ths = [threading.Thread(target=worker) for _ in range(clients)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return out, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


def summarize_run(reqs: list[Req], wall: float) -> dict[str, float]:
    ok = [r for r in reqs if not r.error]
    n_tok = sum(r.tokens for r in ok)
    return {"requests": len(ok), "errors": len(reqs) - len(ok), "tokens": n_tok,
            "wall_s": wall, "throughput_tps": n_tok / wall if wall > 0 else 0.0,
            "ttft_p50": pct([r.ttft for r in ok], 50), "ttft_p95": pct([r.ttft for r in ok], 95),
            "total_p50": pct([r.total for r in ok], 50),
            "total_p95": pct([r.total for r in ok], 95),
            "decode_tps_p50": pct([r.decode_tps for r in ok if r.decode_tps > 0], 50)}


# --- part 1: under the memory limit ----------------------------------------------------------


def limited_run(a: argparse.Namespace, model: Path, mode: str, predictor: Path, limit: int,
                texts: list[str]) -> dict[str, Any]:
    evict_file(model)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with MemoryCgroup(f"serve-{mode}", limit) as cg:
        log = open(Path("/tmp") / f"serve_load-{mode}-{port}.log", "w")
        proc = cg.popen(server_cmd(a, model, mode, predictor, port), env=ENV, cwd=ROOT,
                        stdout=log, stderr=subprocess.STDOUT)
        try:
            ready = wait_ready(base, proc, a.timeout)
            reqs, wall = load(base, texts, a.clients, a.tokens,
                              time.monotonic() + a.timeout)
            metrics = httpx.get(base + "/metrics", timeout=30).text
        finally:
            stop(proc)
            log.close()
        peak = cg.counters().max_usage
    row = {"mode": mode, "ready_s": ready, "peak": peak, **summarize_run(reqs, wall),
           "prefetch_hit_rate": _metric(metrics, "expertpred_prefetch_hit_rate"),
           "read_bytes": _metric(metrics, "expertpred_process_read_bytes_total"),
           "errors_seen": sorted({r.error for r in reqs if r.error})}
    return row


def _metric(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return float(s.value)
    return float("nan")


# --- part 2: overhead without the limit ------------------------------------------------------


def direct_child(a: argparse.Namespace) -> None:
    """PrefetchLlama called directly, the options ``expertpred serve`` uses by default."""
    from expertpred.prefetch.plugin import PrefetchLlama, load_predictors
    from expertpred.prefetch.residency import make_config

    preds = load_predictors(a.predictor, a.model, name=a.predictor_name, source_model=a.source)
    res = make_config(a.residency, a.budget or None, None, a.predictor)
    texts = prompts(a.requests)
    with PrefetchLlama(a.model, mode="predictor", predictor=preds, residency=res, n_ctx=N_CTX,
                       n_batch=512, n_threads=a.threads, seed=0) as llm:
        for p in texts:
            t0 = time.perf_counter()
            times = [time.perf_counter() for c in llm.create_completion(
                p, max_tokens=a.tokens, temperature=0.0, repeat_penalty=1.0, stream=True)
                if c["choices"][0]["finish_reason"] is None]
            tps = (len(times) - 1) / (times[-1] - times[0]) if len(times) >= 2 else 0.0
            r = Req(times[0] - t0 if times else 0.0, time.perf_counter() - t0, len(times), tps)
            print(json.dumps(asdict(r)), flush=True)


def overhead_run(a: argparse.Namespace, model: Path, how: str, predictor: Path,
                 texts: list[str]) -> dict[str, Any]:
    e2e.warm(model)
    if how == "direct":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-direct", "--model",
               str(model), "--source", str(a.source), "--predictor", str(predictor),
               "--predictor-name", a.predictor_name, "--requests", str(a.requests),
               "--tokens", str(a.tokens), "--threads", str(a.threads),
               "--residency", a.residency, "--budget", str(a.budget)]
        p = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True,
                           timeout=a.timeout)
        reqs = [Req(**json.loads(ln)) for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0:
            raise RuntimeError(f"direct child failed: {p.stderr[-800:]}")
        return {"how": how, **summarize_run(reqs, sum(r.total for r in reqs))}  # sequential
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(server_cmd(a, model, "predictor", predictor, port), env=ENV,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(base, proc, a.timeout)
        reqs, wall = load(base, texts, 1, a.tokens, time.monotonic() + a.timeout)
    finally:
        stop(proc)
    return {"how": how, **summarize_run(reqs, wall)}


# --- report ----------------------------------------------------------------------------------


def med_spread(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "–"
    return f"{statistics.median(xs):.3g} ({min(xs):.3g}–{max(xs):.3g})"


def report(rows: list[dict[str, Any]], key: str, keys: list[str]) -> str:
    groups = sorted({r[key] for r in rows}, key=[r[key] for r in rows].index)
    lines = [f"| {key} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for g in groups:
        rs = [r for r in rows if r[key] == g]
        lines.append(f"| {g} | " + " | ".join(med_spread([r[k] for r in rs]) for k in keys)
                     + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child-direct", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help="Use this widened GGUF as it is.")
    ap.add_argument("--source", type=Path, default=e2e.ROOT / "models" / "tiny-mixtral" /
                    "model.gguf", help="Model to widen (f32: it is also the reference).")
    ap.add_argument("--predictor", type=Path, help="Saved predictors (default: train).")
    ap.add_argument("--predictor-name", default=DEFAULT_PREDICTOR)
    ap.add_argument("--total-gib", type=float, default=3.0)
    ap.add_argument("--size-over-limit", type=float, default=2.5)
    ap.add_argument("--requests", type=int, default=8, help="N requests per run.")
    ap.add_argument("--clients", type=int, default=4, help="K concurrent clients.")
    ap.add_argument("--tokens", type=int, default=16, help="max_tokens per request.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="off,predictor")
    ap.add_argument("--residency", default="learned",
                    help="Residency policy of the predictor server: learned makes it "
                         "e2e_prefetch.py's mode (c); kernel is the prefetch alone.")
    ap.add_argument("--budget", type=int, default=0,
                    help="Expert byte budget of the residency manager (0: its default, "
                         "derived from the cgroup limit).")
    ap.add_argument("--overhead-rounds", type=int, default=3, help="0 skips part 2.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-prompts", type=int, default=80)
    ap.add_argument("--timeout", type=float, default=900.0, help="Seconds per run, at most.")
    ap.add_argument("--json", type=Path, help="Write every row here.")
    a = ap.parse_args()
    if a.child_direct:
        direct_child(a)
        return
    if reason := why_unavailable():
        sys.exit(f"error: {reason}")
    model = a.model or e2e.build_models(a.source, a.total_gib, "f32")[0]
    predictor = a.predictor or e2e.build_predictor(a.source, a.source.parent.name,
                                                   a.train_prompts, a.predictor_name)
    texts = prompts(a.requests)
    size = model.stat().st_size
    limit = int(size / a.size_over_limit)
    print(f"model {model}: {size / 2**30:.2f} GiB, cgroup limit {limit / 2**30:.2f} GiB; "
          f"{len(texts)} requests x {a.tokens} tokens from {a.clients} clients", flush=True)
    modes = [m for m in a.modes.split(",") if m]
    rows: list[dict[str, Any]] = []
    for r in range(a.rounds):
        for m in modes if r % 2 == 0 else modes[::-1]:
            row = {"round": r, **limited_run(a, model, m, predictor, limit, texts)}
            rows.append(row)
            print(f"round {r} {m:9} {row['throughput_tps']:.3f} tok/s  ttft p50 "
                  f"{row['ttft_p50']:.1f} s p95 {row['ttft_p95']:.1f} s  total p50 "
                  f"{row['total_p50']:.1f} s p95 {row['total_p95']:.1f} s  errors "
                  f"{row['errors']} {row['errors_seen']}", flush=True)
    over: list[dict[str, Any]] = []
    for r in range(a.overhead_rounds):
        for how in ("direct", "served") if r % 2 == 0 else ("served", "direct"):
            row = {"round": r, **overhead_run(a, model, how, predictor, texts)}
            over.append(row)
            print(f"overhead round {r} {how:7} {row['throughput_tps']:.3f} tok/s end to end, "
                  f"decode p50 {row['decode_tps_p50']:.3f} tok/s, ttft p50 "
                  f"{row['ttft_p50']:.3f} s", flush=True)
    keys = ["throughput_tps", "decode_tps_p50", "ttft_p50", "ttft_p95", "total_p50",
            "total_p95", "prefetch_hit_rate"]
    if rows:
        print("\nunder the memory limit: median (min–max) over rounds")
        print(report(rows, "mode", keys))
        for key, what in (("throughput_tps", "throughput: prompts, queueing and decode"),
                          ("decode_tps_p50", "decode rate: e2e_prefetch's tok/s")):
            by = {m: [x[key] for x in rows if x["mode"] == m] for m in modes}
            if "off" in by and "predictor" in by:
                ratios = [p / o for p, o in zip(by["predictor"], by["off"]) if o > 0]
                print(f"speedup predictor / off ({what}; per round): {med_spread(ratios)}")
    if over:
        print("\noverhead without the limit: median (min–max) over rounds")
        print(report(over, "how", ["throughput_tps", "decode_tps_p50", "ttft_p50",
                                    "total_p50"]))
        for key, what in (("throughput_tps", "end to end"), ("decode_tps_p50", "decode")):
            d = [x[key] for x in over if x["how"] == "direct"]
            s = [x[key] for x in over if x["how"] == "served"]
            ratios = [sv / dv for sv, dv in zip(s, d) if dv > 0]
            print(f"served / direct tok/s, {what}, one client (per round): "
                  f"{med_spread(ratios)}")
    if a.json:
        a.json.write_text(json.dumps({"limited": rows, "overhead": over}, indent=1,
                                     default=str))


if __name__ == "__main__":
    main()
