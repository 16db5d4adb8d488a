"""Scale-out benchmark: memory and wall time of ``expertpred train`` on one process vs a Dask
LocalCluster, on synthetic traces of 1x, 4x and 16x the shipped tiny-qwen3moe trace.

    python benchmarks/scale.py                       # sizes 1,4,16; LocalCluster(2)
    python benchmarks/scale.py --sizes 1,4 --workers 2 --rounds 3

For each size a synthetic trace dataset of the shipped trace's shape (8 MoE layers, 32
experts, top-4, no hidden states) and ``size`` times its tokens is written (sequences of
:func:`expertpred.predictors.synthetic.synthetic_traces`, a pool reused under new ids so
generating stays cheap), then trained twice, each run in a fresh child process:

- ``single``: :func:`expertpred.learn.train.train` (the driver is the only process);
- ``cluster``: :func:`expertpred.learn.distributed.train_distributed` on a LocalCluster of
  ``--workers`` processes (its scheduler lives in the driver).

Reported per run: wall seconds, the driver's peak RSS (VmHWM) and each worker's peak RSS,
and their growth from the smallest size; also the workers' peak when the ladder is done
(before the next-use model's passes, one task per shard since session 6). Rounds alternate
single / cluster so a noisy neighbour hits both. On a 2-core machine two workers cannot
beat one process on time; the point is memory (the driver stays flat, a worker holds its
shards) and that it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHIPPED = ROOT / "datasets/traces/tiny-qwen3moe"
POOL = 64  # distinct synthetic sequences; the rest are copies under new ids
SEQ_LEN = 64


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_dataset(out: Path, tokens: int, shard_rows: int) -> int:
    """A synthetic trace dataset of about ``tokens`` tokens; returns the tokens written."""
    from expertpred.predictors.synthetic import SyntheticTraceSpec, split_of, synthetic_traces
    from expertpred.trace.dataset import ManifestInfo, ModelInfo, TraceWriter

    spec = SyntheticTraceSpec(n_layer=8, n_expert=32, n_expert_used=4, n_embd=32,
                              n_seq=POOL, seq_len=SEQ_LEN, prompt_len=24, with_hidden=False)
    pool = synthetic_traces(spec)
    model = ModelInfo(path="synthetic:tiny-qwen3moe-shape", sha256="0" * 64, arch="synthetic",
                      n_layer=8, moe_layers=tuple(range(8)), n_expert=32, n_expert_used=4,
                      n_embd=32)
    done = 0
    with TraceWriter(out, ManifestInfo(model=model), shard_rows=shard_rows) as w:
        i = 0
        while done < tokens:
            t = dataclasses.replace(pool[i % POOL], seq_id=i, prompt_id=f"syn-{i}")
            w.write(t, split=split_of(i))
            done += t.n_tokens
            i += 1
    return done


def child(mode: str, dataset: str, out: str, workers: int, predictors: str,
          offsets: str, extra: list[str]) -> dict:
    """One training run in this (fresh) process; returns its measurements."""
    from expertpred.learn.train import load_config, train

    cfg = load_config(None, [f"--dataset={dataset}", f"--out={out}",
                             f"--predictors={predictors}", f"--offsets={offsets}",
                             "--mlp_epochs=2", "--plots=false", *extra])
    t0 = time.perf_counter()
    worker_peaks: list[float] = []
    ladder: list[float] = []
    if mode == "single":
        fitted, _ = train(cfg)
    else:
        from expertpred.learn.cluster import ClusterKind, ClusterSpec, open_cluster
        from expertpred.learn.distributed import train_distributed

        with open_cluster(ClusterSpec(ClusterKind.LOCAL, n_workers=workers)) as client:
            t0 = time.perf_counter()  # cluster start-up is not training
            marks = _PeakBeforeNextUse(client)
            fitted, _ = train_distributed(cfg, client, marks)
            worker_peaks, ladder = sorted(client.run(peak_rss_mib).values()), marks.ladder
    return {"mode": mode, "seconds": time.perf_counter() - t0, "driver_mib": peak_rss_mib(),
            "worker_mib": worker_peaks, "train_rows": fitted.train_rows,
            "worker_mib_ladder": ladder}


class _PeakBeforeNextUse:
    """Progress hook: the workers' peaks when the ladder is done and the next-use model
    (one task that reads every training trace) starts, to tell the two apart."""

    def __init__(self, client) -> None:
        self.client, self.ladder = client, []

    def start(self, step: str, total: int) -> None:
        if step.startswith("next-use"):
            self.ladder = sorted(self.client.run(peak_rss_mib).values())

    def advance(self, n: int = 1) -> None:
        pass


def run_child(args: argparse.Namespace, mode: str, dataset: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--dataset", str(dataset),
           "--out", str(out), "--workers", str(args.workers), "--predictors", args.predictors,
           "--offsets", args.offsets, *(f"--set={kv}" for kv in args.set)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,16", help="multiples of the shipped trace's tokens")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="runs per size and mode")
    ap.add_argument("--predictors", default="popularity,transition,previous-token,"
                                            "previous-token+transition,mlp")
    ap.add_argument("--offsets", default="1")
    ap.add_argument("--shard-rows", type=int, default=4096)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per training run")
    ap.add_argument("--dir", default=None, help="where the synthetic datasets go")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a training-config override (repeatable), e.g. max_train_rows=20000")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dataset, args.out, args.workers,
                               args.predictors, args.offsets,
                               [f"--{kv}" for kv in args.set])))
        return
    from expertpred.trace.dataset import TraceDataset

    base = TraceDataset(SHIPPED).n_rows
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale_", dir=args.dir) as tmp:
        for size in sizes:
            ds = Path(tmp) / f"x{size}"
            tokens = write_dataset(ds, size * base, args.shard_rows)
            n_shards = len(TraceDataset(ds).shards)
            for r in range(args.rounds):
                for mode in ("single", "cluster"):
                    m = run_child(args, mode, ds, Path(tmp) / f"out-{size}-{mode}-{r}")
                    m.update(size=size, tokens=tokens, shards=n_shards, round=r)
                    rows.append(m)
                    print(f"x{size:<3} {mode:8} round {r}: {m['seconds']:7.1f} s  driver "
                          f"{m['driver_mib']:7.0f} MiB  workers "
                          f"{', '.join(f'{w:.0f}' for w in m['worker_mib']) or '-'} MiB",
                          flush=True)
    table(rows, sizes)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def table(rows: list[dict], sizes: list[int]) -> None:
    """Medians per size and mode, growth from the smallest to the largest size."""
    def med(size: int, mode: str, key: str) -> tuple[float, float]:
        v = [max(r[key]) if isinstance(r[key], list) else r[key] for r in rows
             if r["size"] == size and r["mode"] == mode and r.get(key)]
        if not v:
            return float("nan"), float("nan")
        return statistics.median(v), (max(v) - min(v))

    print(f"\n{'size':>5} {'tokens':>8} {'shards':>6} | {'single s':>9} {'cluster s':>9} "
          f"{'c/s':>5} | {'single MiB':>10} {'driver MiB':>10} {'worker MiB':>10} "
          f"{'ladder MiB':>10}")
    first = sizes[0]
    for s in sizes:
        r0 = next(r for r in rows if r["size"] == s)
        ss, cs = med(s, "single", "seconds"), med(s, "cluster", "seconds")
        sm, dm = med(s, "single", "driver_mib"), med(s, "cluster", "driver_mib")
        wm, lm = med(s, "cluster", "worker_mib"), med(s, "cluster", "worker_mib_ladder")
        print(f"{s:>4}x {r0['tokens']:>8} {r0['shards']:>6} | {ss[0]:>9.1f} {cs[0]:>9.1f} "
              f"{cs[0] / ss[0]:>5.2f} | {sm[0]:>10.0f} {dm[0]:>10.0f} {wm[0]:>10.0f} "
              f"{lm[0]:>10.0f}")
    last = sizes[-1]
    for label, mode, key in (("single-process peak RSS", "single", "driver_mib"),
                             ("cluster driver peak RSS", "cluster", "driver_mib"),
                             ("cluster max worker peak RSS", "cluster", "worker_mib"),
                             ("  of it before the next-use task", "cluster",
                              "worker_mib_ladder"),
                             ("single-process wall time", "single", "seconds"),
                             ("cluster wall time", "cluster", "seconds")):
        a, b = med(first, mode, key)[0], med(last, mode, key)[0]
        print(f"{label}: {b / a:.2f}x from {first}x to {last}x")
    for s in sizes:
        for m in ("single", "cluster"):
            v, sp = med(s, m, "seconds")
            print(f"{s}x {m}: wall time median {v:.1f} s, spread {sp:.1f} s over "
                  f"{sum(r['size'] == s and r['mode'] == m for r in rows)} rounds")


if __name__ == "__main__":
    main()
