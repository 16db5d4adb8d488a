"""Peak RSS and wall time of ``analyze`` and ``evaluate`` as the trace grows: streamed vs in memory.

    nice -n 19 python benchmarks/scale_outofcore.py                  # 1x 4x 16x, 3 rounds
    nice -n 19 python benchmarks/scale_outofcore.py --sizes 1,4 --rounds 1

Traces: the synthetic generator (:mod:`expertpred.predictors.synthetic`, tiny-qwen3moe's
shape: 8 MoE layers, 32 experts, top-4) writes 150 sequences of 119 tokens (17,850 tokens,
the size of the shipped tiny-mixtral trace: 17,902); the 4x and 16x datasets repeat them
with new seq ids and the expert ids rotated per copy, written through the trace writer in
shards of 4096 rows. Predictors (popularity, transition, previous-token+transition, oracle)
and the next-use model are trained once on the 1x set; ``evaluate`` then scores them with
``--models`` at every size (offsets 1, 2, no cross-domain refits), so what grows is what
evaluate reads, not what it fits.

Every (command, path, size, round) runs in a fresh process; its peak RSS is the process'
VmHWM. "in memory" is the earlier path (analyze: all routing columns in one RoutingData;
evaluate: every test example of an offset in one FeatureBatch), kept as ``in_memory=True``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

N_SEQ, SEQ_LEN, PROMPT_LEN = 150, 119, 87
LADDER = "popularity,transition,previous-token+transition,oracle"


def build(root: Path, sizes: list[int]) -> dict[int, Path]:
    """The synthetic datasets, one directory per size."""
    from expertpred.predictors.synthetic import (
        SyntheticTraceSpec,
        split_of,
        synthetic_model,
        synthetic_traces,
    )
    from expertpred.trace.dataset import ManifestInfo, TraceWriter

    spec = SyntheticTraceSpec(n_layer=8, n_expert=32, n_expert_used=4, n_embd=32,
                              n_seq=N_SEQ, seq_len=SEQ_LEN, prompt_len=PROMPT_LEN,
                              with_hidden=False, seed=0)
    base = synthetic_traces(spec)
    # a made-up sha256: the manifest requires one, and no GGUF backs synthetic traces
    info = ManifestInfo(model=replace(synthetic_model(spec), sha256="5" * 64))
    out = {}
    for size in sizes:
        d = root / f"x{size}"
        with TraceWriter(d, info, shard_rows=4096) as w:
            for c in range(size):
                for t in base:
                    sid = c * N_SEQ + t.seq_id
                    w.write(replace(t, seq_id=sid, prompt_id=f"{t.prompt_id}-c{c}",
                                    experts=((t.experts + c) % spec.n_expert).astype(np.int16),
                                    logits=np.roll(t.logits, c, axis=-1)), split=split_of(sid))
        out[size] = d
    return out


def config(dataset: Path, out: Path) -> list[str]:
    return [f"--dataset={dataset}", f"--predictors={LADDER}", "--offsets=1,2",
            "--cross_domain=false", "--plots=false", "--cache_predictor=previous-token+transition",
            f"--out={out}"]


def child(cmd: str, path: str, dataset: Path, work: Path) -> None:
    """One measured run, in this (fresh) process; prints its JSON result line."""
    t0 = time.perf_counter()
    in_memory = path == "in-memory"
    if cmd == "analyze":
        from expertpred.lab.analysis.report import analyze_trace

        analyze_trace(dataset, work / "report", in_memory=in_memory)
    else:
        from expertpred.learn.evaluate import evaluate
        from expertpred.learn.train import load_config

        evaluate(load_config(None, config(dataset, work / "eval")), models_dir=work / "models",
                 in_memory=in_memory)
    seconds = time.perf_counter() - t0
    hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status")
               if ln.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mib": hwm / 1024, "seconds": seconds}))


def measure(cmd: str, path: str, dataset: Path, work: Path) -> dict[str, float]:
    res = subprocess.run([sys.executable, __file__, "--child", cmd, path, str(dataset),
                          str(work)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{cmd} {path} {dataset}: failed\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,4,16", help="multiples of the 1x trace")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--commands", default="analyze,evaluate")
    ap.add_argument("--paths", default="streamed,in-memory", help="which paths to run")
    ap.add_argument("--data", type=Path, help="reuse (or keep) the datasets and models here")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        cmd, path, dataset, work = a.child
        child(cmd, path, Path(dataset), Path(work))
        return
    sizes = [int(s) for s in a.sizes.split(",")]
    root = a.data or Path(tempfile.mkdtemp(prefix="scale-outofcore-"))
    try:
        from expertpred.learn.train import load_config, train
        from expertpred.trace.dataset import TraceDataset

        t0 = time.perf_counter()
        todo = [s for s in sizes if not (root / f"x{s}" / "_manifest.json").is_file()]
        data = {**build(root, todo), **{s: root / f"x{s}" for s in sizes if s not in todo}}
        if not (root / "models").is_dir():
            train(load_config(None, config(build(root, [1])[1] if 1 not in data else data[1],
                                           root)))  # -> root/models, fitted on 1x
        print(f"datasets and models ready in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = []
        for cmd in a.commands.split(","):
            for size in sizes:
                ds = TraceDataset(data[size])
                for path in a.paths.split(","):
                    runs = []
                    for r in range(a.rounds):
                        runs.append(measure(cmd, path, data[size], root))
                        print(f"{cmd:8s} {path:9s} {size:3d}x round {r}: "
                              f"{runs[-1]['peak_rss_mib']:7.1f} MiB "
                              f"{runs[-1]['seconds']:6.1f} s", flush=True)
                    rows.append((cmd, size, ds.n_rows, ds.n_bytes, path, runs))
        report(rows, sizes)
    finally:
        if a.data is None:
            shutil.rmtree(root, ignore_errors=True)


def report(rows: list, sizes: list[int]) -> None:
    print(f"\n{'command':8s} {'size':>4s} {'tokens':>7s} {'MiB on disk':>11s} {'path':9s} "
          f"{'peak RSS MiB med [min-max]':>27s} {'wall s med [min-max]':>21s} {'RSS / 1x':>8s}")
    first: dict[tuple[str, str], float] = {}
    for cmd, size, n_rows, n_bytes, path, runs in rows:
        rss = [r["peak_rss_mib"] for r in runs]
        sec = [r["seconds"] for r in runs]
        med = statistics.median(rss)
        first.setdefault((cmd, path), med)
        print(f"{cmd:8s} {size:3d}x {n_rows:7d} {n_bytes / 2**20:11.1f} {path:9s} "
              f"{med:9.1f} [{min(rss):.1f}-{max(rss):.1f}] "
              f"{statistics.median(sec):8.1f} [{min(sec):.1f}-{max(sec):.1f}] "
              f"{med / first[(cmd, path)]:8.2f}")


if __name__ == "__main__":
    main()
