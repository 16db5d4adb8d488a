"""Training time and peak memory of every predictor on the shipped sample trace datasets.

For each dataset (default: every ``datasets/traces/<model>/``; synthetic traces if there is
none) and offset, the train split's features are built once, then each predictor is fitted
in turn. Per fit: wall time, the peak of Python/numpy allocations (``tracemalloc``) and the
growth of the process's peak RSS (``VmHWM``, reset before each fit through
``/proc/self/clear_refs``) — the second also sees LightGBM's and torch's native memory.
torch and lightgbm are imported before measuring so their import is not counted.

    python benchmarks/predictors.py [--dataset datasets/traces/tiny-mixtral] [--offsets 1]
                                    [--json runs/bench/predictors.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from expertpred.features import FeatureConfig, build_features
from expertpred.learn.train import (
    LADDER,
    PredictorsConfig,
    open_source,
    phase_value,
    predictor_params,
)
from expertpred.predictors import make_predictor

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    """A VmXXX field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def bench_dataset(cfg: PredictorsConfig, names: list[str], offsets: list[int]) -> list[dict]:
    import lightgbm  # noqa: F401  (imported before measuring)
    import torch  # noqa: F401

    source = open_source(cfg)
    rows = []
    for d in offsets:
        fc = FeatureConfig(d=d, history_decay=cfg.history_decay)
        data = build_features(source.sequences(source.select("train")), source.model, fc,
                              max_rows=cfg.max_train_rows, seed=cfg.seed,
                              phase=phase_value(cfg.train_phase))
        for name in names:
            p = make_predictor(name, **predictor_params(cfg, name, source.gguf_path))
            if (p.needs_hidden and data.hidden is None) or (
                    name == "gate-lookahead" and not source.gguf_path):
                continue
            rss0 = _status("VmRSS")
            exact = _reset_peak_rss()
            tracemalloc.start()
            t0 = time.perf_counter()
            p.fit(data)
            secs = time.perf_counter() - t0
            _, py_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            rss_peak = _status("VmHWM") - rss0
            rows.append({"dataset": source.description, "predictor": name, "d": d,
                         "train_rows": len(data), "fit_seconds": secs,
                         "tracemalloc_peak_bytes": py_peak,
                         "rss_peak_growth_bytes": rss_peak if exact else None})
            log.info("%s d=%d: %.2fs", name, d, secs)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", action="append", type=Path,
                    help="trace dataset directory (repeatable); default: the shipped ones")
    ap.add_argument("--offsets", type=int, nargs="+", default=[1])
    ap.add_argument("--predictors", nargs="+", default=list(LADDER))
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "predictors.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    datasets = args.dataset or sorted(p.parent for p in
                                      (ROOT / "datasets" / "traces").glob("*/_manifest.json"))
    base = PredictorsConfig()
    cfgs = [replace(base, dataset=str(d)) for d in datasets] or [base]  # base = synthetic
    rows = []
    for cfg in cfgs:
        rows += bench_dataset(cfg, args.predictors, args.offsets)

    t = Table(title="predictor training cost")
    for c in ("dataset", "predictor", "d", "rows", "fit s", "tracemalloc peak",
              "RSS peak growth"):
        t.add_column(c, justify="left" if c in ("dataset", "predictor") else "right")
    for r in rows:
        rss = r["rss_peak_growth_bytes"]
        t.add_row(r["dataset"].split(" (")[0], r["predictor"], str(r["d"]),
                  str(r["train_rows"]), f"{r['fit_seconds']:.2f}",
                  f"{r['tracemalloc_peak_bytes'] / 2**20:.1f} MiB",
                  "?" if rss is None else f"{rss / 2**20:.1f} MiB")
    Console(width=160).print(t)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
