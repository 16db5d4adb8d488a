"""Latency of one online prediction per exported predictor, through the plugin's path.

One *prediction* = one token, one layer-step: after MoE layer ``l`` routes, the plugin asks
for the experts of layers ``l+1 .. l+D`` — for each ``d``: ``OnlineFeatures.features(d)``
then ``topk(d, x, k)`` on the loaded artifact (exactly what
:meth:`expertpred.prefetch.plugin.PrefetchPlugin._predictor_step` does). Reported per predictor:
median and p99 (µs) of the whole step, and of its two parts measured separately (feature
building for all d; the model's top-k for all d on prebuilt features). Steps counted are
the full ones (``l + D < L``: all D targets exist); rows come from replaying real
sequences of a trace through :class:`~expertpred.features.OnlineFeatures`.

    python benchmarks/predict_latency.py --models runs/predictors/tiny-mixtral/models \
        --dataset datasets/traces/tiny-mixtral --gguf models/tiny-mixtral/model.gguf

Without ``--models`` it first trains the tiny-mixtral recipe into a temporary directory
(``expertpred train --config training/configs/predictors-tiny-mixtral.toml``, ~2 min).
``--in-memory`` also times the saved (non-exported) predictors for comparison. Rounds
(``--rounds``, default 3) alternate the predictors; the table gives the median of the round
medians and their range. ``--min-rel-share`` (default 0.5, the plugin's default gating) times
``topk_shares`` as the gated plugin calls it; ``--min-rel-share 0`` plain ``topk``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expertpred.features import ModelInfo, OnlineFeatures  # noqa: E402
from expertpred.predictors.export import PredictorSet, export_saved, load_artifact  # noqa: E402
from expertpred.trace.record import Phase  # noqa: E402

log = logging.getLogger("predict_latency")

LADDER = ("random", "popularity", "transition", "previous-token", "previous-token+transition",
          "gate-lookahead", "lightgbm", "mlp")  # the oracle has no model to time


def _sequences(dataset: str, n_seq: int) -> list[Any]:
    from expertpred.trace.dataset import TraceDataset

    ds = TraceDataset(dataset)
    info = [r for r in ds.sequence_info() if r.get("split", "test") == "test"]
    ids = [int(r["seq_id"]) for r in info][:n_seq]
    return list(ds.sequences(seq_ids=ids))


def _pct(ns: list[int]) -> tuple[float, float]:
    a = np.asarray(ns, dtype=np.float64) / 1e3
    return float(np.median(a)), float(np.percentile(a, 99))


def time_predictor(pset: Any, model: ModelInfo, seqs: list[Any], depth: int, k: int,
                   min_calls: int, min_rel_share: float = 0.0) -> dict[str, Any]:
    """Replay ``seqs`` token by token; time every full layer-step (all d = 1..depth).
    ``min_rel_share > 0``: the plugin's gated call (``topk_shares`` and the share mask)."""
    min_share = min_rel_share / k
    if min_share > 0:
        def ask(d: int, x: Any) -> Any:
            top, share = pset.topk_shares(d, x, k)
            return top[share >= min_share]
    else:
        def ask(d: int, x: Any) -> Any:
            return pset.topk(d, x, k)
    n_l = model.n_moe
    offsets = range(1, depth + 1)
    step_ns: list[int] = []
    feat_ns: list[int] = []
    model_ns: list[int] = []
    clock = time.perf_counter_ns
    gc.disable()
    try:
        while len(step_ns) < min_calls:
            for seq in seqs:
                f = OnlineFeatures(model, history_decay=pset.history_decay)
                hid = seq.hidden
                for t in range(seq.n_tokens):
                    f.next_token(int(seq.tokens[t]), Phase(int(seq.phase[t])))
                    for li in range(n_l):
                        f.update(li, seq.logits[t, li], seq.experts[t, li],
                                 None if hid is None else hid[t, li])
                        if li + depth >= n_l:
                            continue
                        # 1. the whole step, as the plugin runs it
                        t0 = clock()
                        for d in offsets:
                            ask(d, f.features(d))
                        t1 = clock()
                        # 2. its parts, separately
                        xs = [f.features(d) for d in offsets]
                        t2 = clock()
                        for d, x in zip(offsets, xs):
                            ask(d, x)
                        t3 = clock()
                        step_ns.append(t1 - t0)
                        feat_ns.append(t2 - t1)
                        model_ns.append(t3 - t2)
    finally:
        gc.enable()
    med, p99 = _pct(step_ns)
    fmed, fp99 = _pct(feat_ns)
    mmed, mp99 = _pct(model_ns)
    return {"calls": len(step_ns), "median_us": med, "p99_us": p99, "features_median_us": fmed,
            "features_p99_us": fp99, "model_median_us": mmed, "model_p99_us": mp99}


def _in_memory(models: Path, name: str, model: ModelInfo, offsets: tuple[int, ...]) -> Any:
    from expertpred.learn.train import load_all
    from expertpred.prefetch.plugin import PredictorSet

    by = load_all(models, model, [name], offsets).get(name)
    return None if by is None else PredictorSet.from_predictors(by, source=str(models))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="expertpred train's <out>/models (default: train now)")
    ap.add_argument("--dataset", default="datasets/traces/tiny-mixtral")
    ap.add_argument("--gguf", default="models/tiny-mixtral/model.gguf")
    ap.add_argument("--config", default="training/configs/predictors-tiny-mixtral.toml")
    ap.add_argument("--predictors", default=",".join(LADDER))
    ap.add_argument("--depth", type=int, default=4, help="D: lookahead targets d = 1..D")
    ap.add_argument("--calls", type=int, default=5000, help="timed layer-steps per predictor")
    ap.add_argument("--seqs", type=int, default=8, help="test sequences replayed")
    ap.add_argument("--in-memory", action="store_true",
                    help="also time the saved predictors as loaded by expertpred train's "
                         "load_all (the same classes and kernels as the artifact)")
    ap.add_argument("--min-rel-share", type=float, default=0.5,
                    help="the plugin's confidence gating (its DEFAULT_MIN_REL_SHARE): time "
                         "topk_shares + the share mask; 0: plain topk")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all predictors")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    tmp = tempfile.TemporaryDirectory(prefix="predict-latency-")
    models = Path(args.models) if args.models else None
    if models is None:
        from expertpred.learn.train import load_config, train

        cfg = load_config(args.config, [f"--out={tmp.name}/run", f"--dataset={args.dataset}"])
        print(f"training {args.config} into {tmp.name} ...", flush=True)
        train(cfg)
        models = Path(tmp.name) / "run" / "models"
    seqs = _sequences(args.dataset, args.seqs)
    sets: dict[str, Any] = {}
    for name in [p for p in args.predictors.split(",") if p]:
        art_path = Path(tmp.name) / f"{name}.artifact"
        try:
            export_saved(models, art_path, name=name,
                         offsets=list(range(1, args.depth + 1)))
        except Exception as exc:  # noqa: BLE001 - a missing rung is reported, not fatal
            print(f"{name}: skipped ({exc})", flush=True)
            continue
        art: PredictorSet = load_artifact(art_path, gguf_path=args.gguf)
        if art.needs_hidden and seqs[0].hidden is None:
            print(f"{name}: skipped (needs hidden states; the trace has none)", flush=True)
            continue
        sets[name] = art
        if args.in_memory:
            sets[f"{name} (in-memory)"] = _in_memory(models, name, art.model, art.offsets)
    # rounds alternate the predictors, so that a noisy minute hits all of them
    rows: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        for name, pset in sets.items():
            k = pset.model.n_expert_used
            r = {"predictor": name, "round": rnd,
                 **time_predictor(pset, pset.model, seqs, args.depth, k, args.calls,
                                  args.min_rel_share)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\none online prediction: 1 token, 1 layer-step, d = 1..{args.depth} "
          f"(µs; {args.dataset}; {args.rounds} rounds, median of the round medians "
          "and their range)")
    print("| predictor | median | range | round medians | p99 (median) | features | model |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for name in sets:
        mine = [r for r in rows if r["predictor"] == name]
        meds = [r["median_us"] for r in mine]

        def med(key: str) -> float:
            return float(np.median([r[key] for r in mine]))
        print(f"| {name} | {np.median(meds):.1f} | {min(meds):.1f}–{max(meds):.1f} | "
              f"{', '.join(f'{v:.1f}' for v in meds)} | {med('p99_us'):.1f} | "
              f"{med('features_median_us'):.1f} | {med('model_median_us'):.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    tmp.cleanup()


if __name__ == "__main__":
    main()
