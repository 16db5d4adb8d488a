"""Learning curve on real traces: does more traced data close the recall gap?

Per shipped model, traces made with router inputs (``expertpred trace --hidden``, commands in
docs/learning-curve.md) under ``<runs>/<model>/``:

- ``test``: the fixed held-out set (test-split prompts, greedy, 32 tokens), the same for
  every size so the points compare;
- ``train-s*``: the training pool (train-split prompts, sampled decoding, one seed per run);
- ``test-exact`` (optional): the test set traced again with ``--exact``; the script then
  prints how often the two numerics select the same experts (label noise).

A size is a multiple of the shipped trace's tokens (``datasets/traces/<model>``). It takes
the first pool sequences up to that many tokens (each run shuffled once with a fixed seed,
runs in name order, so smaller sizes are prefixes of bigger ones), fits the learned rungs
with the model's predictor recipe (``training/configs/predictors-<model>.toml``, row caps
raised so every row is used) and scores recall@k (k = n_expert_used) at each d on the test
decode tokens, and on decode tokens of the first training sequences (train recall: the gap
between the two says whether more data can still help).

    nice -n 19 python benchmarks/learning_curve.py --sizes 1,4,16 \\
        [--models tiny-mixtral,tiny-qwen3moe] [--tag lgb-200] [--set lgb_rounds=200] \\
        [--no-hidden] [--json docs/learning-curve/curve.json] [--plot docs/learning-curve/curve.png]

Points are merged into ``--json`` (key: model, tag, size, predictor, d), so sizes and
attempts can run separately; ``--sizes ''`` only prints the table and redraws the plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from expertpred.features import FeatureConfig, ModelInfo, build_features
from expertpred.learn.metrics import recall_at_k
from expertpred.learn.train import (
    PredictorsConfig,
    SeqMeta,
    TraceSource,
    fit_all,
    load_config,
    phase_value,
)
from expertpred.trace.dataset import TraceDataset
from expertpred.trace.record import SequenceTrace

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
# every row is used: the caps exist for memory, and the point is to see more data
NO_CAP = ("--max_train_rows=100000000", "--lgb_max_rows=100000000",
          "--mlp_max_rows=100000000")
COLORS = {"lightgbm": "tab:blue", "mlp": "tab:red"}  # one color per rung in every panel
TRAIN_SCORED_SEQS = 74  # training sequences scored for train recall (= the test set's size)


class _Pool:
    """Several trace datasets read as one: global seq id = dataset base + local seq id."""

    def __init__(self, parts: Sequence[tuple[TraceDataset, int]], hidden: bool) -> None:
        self.parts = list(parts)  # (dataset, base)
        self.hidden = hidden  # False: drop router inputs, as in traces made without --hidden

    def sequences(self, seq_ids: Sequence[int]) -> Iterator[SequenceTrace]:
        want = sorted(int(i) for i in seq_ids)
        for ds, base in self.parts:
            local = [i - base for i in want if base <= i < base + (1 << 20)]
            for t in ds.sequences(seq_ids=local) if local else ():
                yield replace(t, seq_id=t.seq_id + base,
                              hidden=t.hidden if self.hidden else None)


@dataclass(frozen=True)
class Selection:
    """One size's sequences: the source to fit / score on and what it holds."""

    source: TraceSource  # train split = the pool prefix, test split = the fixed test set
    train_ids: list[int]  # global seq ids, in pool order
    train_tokens: int  # traced tokens (prompt + generated) of the training sequences
    test_ids: list[int]


def select(runs: Path, model: str, tokens: int, hidden: bool = True) -> Selection:
    """The first pool sequences of ``model`` up to ``tokens`` tokens, plus the test set."""
    test = TraceDataset(runs / model / "test")
    pools = sorted(p for p in (runs / model).glob("train-s*") if (p / "_manifest.json").exists())
    parts, meta, order = [(test, 0)], [], []
    for r in test.sequence_info():
        meta.append(SeqMeta(int(r["seq_id"]), str(r["prompt_id"]), str(r["domain"]), "test"))
    test_ids = [m.seq_id for m in meta]
    for i, path in enumerate(pools):
        ds, base = TraceDataset(path), (i + 1) << 20
        parts.append((ds, base))
        info = ds.sequence_info()
        for j in np.random.default_rng(i).permutation(len(info)):  # domain mix of any prefix
            order.append((base + int(info[j]["seq_id"]), info[j]))
    train_ids, n = [], 0
    for sid, r in order:
        if n >= tokens:
            break
        train_ids.append(sid)
        n += int(r["n_tokens"])
        meta.append(SeqMeta(sid, str(r["prompt_id"]), str(r["domain"]), "train"))
    src = TraceSource(model=ModelInfo.from_manifest(test.manifest["model"]), meta=meta,
                      gguf_path=str(ROOT / "models" / model / "model.gguf"),
                      description=f"{runs / model} ({len(train_ids)} train sequences)",
                      _dataset=_Pool(parts, hidden))
    return Selection(src, train_ids, n, test_ids)


def tie_margins(sel: Selection, x: Any, ids: list[int]) -> np.ndarray:
    """Per example of ``x``: router logit of the k-th minus the (k+1)-th expert at the target
    layer. Near 0 the selection is a near-tie that the trace's numerics decide."""
    k = sel.source.model.n_expert_used
    logits = {t.seq_id: t.logits for t in sel.source.sequences(ids)}
    out = np.empty(len(x), np.float32)
    for i, (s, p, tl) in enumerate(zip(x.seq.tolist(), x.position.tolist(),
                                       x.target_layer.tolist())):
        top = np.sort(logits[s][p, tl])[::-1]
        out[i] = top[k - 1] - top[k]
    return out


def recall(cfg: PredictorsConfig, sel: Selection, fitted: Any, ids: list[int], d: int,
           ties: bool = False) -> dict[str, dict[str, float]]:
    """recall@n_expert_used per fitted predictor on the decode tokens of ``ids``; with
    ``ties``, also the recall on the 10 % of examples nearest to a tie and their share of
    all misses."""
    x = build_features(sel.source.sequences(ids), sel.source.model,
                       FeatureConfig(d=d, history_decay=cfg.history_decay),
                       phase=phase_value(cfg.eval_phase))
    k = sel.source.model.n_expert_used
    near = None
    if ties:
        m = tie_margins(sel, x, ids)
        near = m <= np.quantile(m, 0.10)
    out = {}
    for name, by_d in fitted.predictors.items():
        if d not in by_d:
            continue
        per_row = recall_at_k(by_d[d].predict_topk(x, k), x.targets, k)
        r = {"recall": float(np.nanmean(per_row))}
        if near is not None:
            miss = 1.0 - np.nan_to_num(per_row, nan=1.0)
            r["recall_near_tie"] = float(np.nanmean(per_row[near]))
            r["misses_near_tie"] = float(miss[near].sum() / max(miss.sum(), 1e-9))
        out[name] = r
    return out


def run_point(cfg: PredictorsConfig, sel: Selection) -> list[dict[str, Any]]:
    """Fit the configured rungs on ``sel``'s training sequences; score test and train."""
    t0 = time.perf_counter()
    fitted = fit_all(cfg, sel.source, sel.train_ids)
    log.info("fitted in %.0f s", time.perf_counter() - t0)
    rows = []
    for d in cfg.offsets:
        test = recall(cfg, sel, fitted, sel.test_ids, d, ties=True)
        train = recall(cfg, sel, fitted, sel.train_ids[:TRAIN_SCORED_SEQS], d)
        for name in test:
            rows.append({"predictor": name, "d": d, **test[name],
                         "train_recall": train[name]["recall"],
                         "train_rows": fitted.train_rows[d],
                         "fit_s": round(fitted.fit_seconds[name][d], 1)})
    return rows


def numerics_agreement(default: Path, exact: Path) -> dict[str, float]:
    """Share of the experts selected under the default numerics that ``--exact`` numerics
    (no flash attention, f32 KV) also select, per phase, over the tokens before the two
    greedy runs first differ: the noise the trace's numerics put into the labels."""
    a = {t.seq_id: t for t in TraceDataset(default).sequences()}
    hits, n = np.zeros(2), np.zeros(2)
    diverged = 0
    for t in TraceDataset(exact).sequences():
        u = a[t.seq_id]
        m = min(u.n_tokens, t.n_tokens)
        diff = np.flatnonzero(u.tokens[:m] != t.tokens[:m])
        diverged += len(diff) > 0
        end = int(diff[0]) if len(diff) else m
        same = (u.experts[:end, :, :, None] == t.experts[:end, :, None, :]).any(-1).sum(-1)
        for ph in (0, 1):
            rows = u.phase[:end] == ph
            hits[ph] += same[rows].sum()
            n[ph] += rows.sum() * u.experts.shape[1] * u.experts.shape[2]
    return {"prompt": float(hits[0] / n[0]), "decode": float(hits[1] / n[1]),
            "diverged": diverged, "sequences": len(a)}


def shipped_tokens(model: str) -> int:
    return int(json.loads((ROOT / "datasets" / "traces" / model / "_manifest.json")
                          .read_text())["totals"]["rows"])


def measure(args: argparse.Namespace, points: dict[str, dict[str, Any]]) -> None:
    """Run every (model, size) point and merge its rows into ``points`` (saved each time)."""
    for model in args.models:
        toml = ROOT / "training" / "configs" / f"predictors-{model}.toml"
        cfg = load_config(toml, [*NO_CAP, "--predictors=" + args.predictors,
                                 "--offsets=" + args.offsets, "--cross_domain=false",
                                 *(f"--{s}" for s in args.set)])
        base, done = shipped_tokens(model), set()
        for size in args.sizes:
            sel = select(args.runs, model, int(size * base), hidden=not args.no_hidden)
            if len(sel.train_ids) in done:
                log.warning("%s: the pool holds only %d tokens; size %gx skipped", model,
                            sel.train_tokens, size)
                continue
            done.add(len(sel.train_ids))
            log.info("%s %gx: %d sequences, %d tokens", model, size, len(sel.train_ids),
                     sel.train_tokens)
            for r in run_point(cfg, sel):
                r.update(model=model, tag=args.tag, size=round(sel.train_tokens / base, 2),
                         tokens=sel.train_tokens, sequences=len(sel.train_ids),
                         test_sequences=len(sel.test_ids), overrides=list(args.set))
                points[f"{model}|{args.tag}|{size:g}|{r['predictor']}|{r['d']}"] = r
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(points, indent=1, sort_keys=True))


def table(points: dict[str, dict[str, Any]]) -> Table:
    t = Table(title="learning curve: recall@k_used on the fixed test set (decode tokens)")
    for c in ("model", "tag", "size", "tokens", "seqs", "rung", "d=1", "d=2", "train d=1",
              "near-tie d=1", "misses at ties", "rows d=1", "fit s d=1"):
        t.add_column(c, justify="left" if c in ("model", "tag", "rung") else "right")
    by: dict[tuple, dict[int, dict[str, Any]]] = {}
    for r in points.values():
        key = (r["model"], r["tag"], r["tokens"], r["predictor"])
        by.setdefault(key, {})[r["d"]] = r
    for (model, tag, tokens, name), ds in sorted(by.items()):
        one = ds.get(1, next(iter(ds.values())))

        def f(d: int, k: str) -> str:
            return f"{ds[d][k]:.3f}" if d in ds and ds[d].get(k) is not None else "–"
        t.add_row(model, tag, f"{one['size']:g}x", str(tokens), str(one["sequences"]), name,
                  f(1, "recall"), f(2, "recall"), f(1, "train_recall"),
                  f(1, "recall_near_tie"), f(1, "misses_near_tie"),
                  str(ds[1]["train_rows"]) if 1 in ds else "–",
                  str(ds[1]["fit_s"]) if 1 in ds else "–")
    return t


def markdown(points: dict[str, dict[str, Any]]) -> str:
    """The table as Markdown (docs/learning-curve.md)."""
    by: dict[tuple, dict[int, dict[str, Any]]] = {}
    for r in points.values():
        by.setdefault((r["model"], r["tag"] != "base", r["tag"], r["tokens"], r["predictor"]),
                      {})[r["d"]] = r
    lines = ["| model | recipe | size | tokens | seqs | rung | d=1 | d=2 | train d=1 | "
             "near-tie d=1 | misses at ties | rows d=1 | fit s d=1 |", "|---" * 13 + "|"]

    def f(ds: dict[int, dict[str, Any]], d: int, k: str) -> str:
        return f"{ds[d][k]:.3f}" if d in ds and ds[d].get(k) is not None else "–"
    for (model, _, tag, tokens, name), ds in sorted(by.items()):
        o = ds.get(1, next(iter(ds.values())))
        lines.append(f"| {model} | {tag} | {o['size']:g}x | {tokens:,} | {o['sequences']} | "
                     f"{name} | {f(ds, 1, 'recall')} | {f(ds, 2, 'recall')} | "
                     f"{f(ds, 1, 'train_recall')} | {f(ds, 1, 'recall_near_tie')} | "
                     f"{f(ds, 1, 'misses_near_tie')} | {o['train_rows']:,} | {o['fit_s']:.0f} |")
    return "\n".join(lines)


def plot(points: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in points.values()})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        curves: dict[tuple, list[tuple[int, float, float]]] = {}
        for r in points.values():
            if r["model"] == model and r["recall"] is not None:
                curves.setdefault((r["predictor"], r["tag"], r["d"]), []).append(
                    (r["tokens"], r["recall"], r["train_recall"]))
        for (name, tag, d), pts in sorted(curves.items()):
            pts.sort()
            x = [p[0] for p in pts]
            color = COLORS.get(name, "grey")
            base = tag == "base"
            ax.plot(x, [p[1] for p in pts], marker="o" if base else "x", color=color,
                    linestyle="-" if d == 1 else ":", alpha=1.0 if d == 1 else 0.6,
                    label=f"{name} d={d}" + ("" if base else f" [{tag}]"))
            if d == 1 and base:
                ax.plot(x, [p[2] for p in pts], marker=".", linestyle="--", alpha=0.5,
                        color=color, label=f"{name} d=1 train")
        ax.axhline(0.95, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("traced training tokens")
        ax.set_ylabel("recall@k_used (test decode tokens)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("/work/runs/learncurve"))
    ap.add_argument("--models", default="tiny-mixtral,tiny-qwen3moe")
    ap.add_argument("--sizes", default="1,4,16",
                    help="multiples of the shipped trace's tokens ('' = table and plot only)")
    ap.add_argument("--predictors", default="lightgbm,mlp")
    ap.add_argument("--offsets", default="1,2")
    ap.add_argument("--tag", default="base", help="name of this attempt's recipe")
    ap.add_argument("--no-hidden", action="store_true",
                    help="drop the router inputs (the shipped traces have none)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a predictor-config override (repeatable), e.g. lgb_rounds=200")
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    ap.add_argument("--merge", type=Path, action="append", default=[],
                    help="another run's --json whose points join this one (repeatable)")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "learning-curve" /
                    "curve.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "learning-curve" /
                    "curve.png")
    args = ap.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.sizes = [float(s) for s in args.sizes.split(",") if s]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    points = json.loads(args.json.read_text()) if args.json.exists() else {}
    for other in args.merge:  # points measured by other runs (e.g. in parallel)
        points.update(json.loads(other.read_text()))
    measure(args, points)
    if args.merge:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(points, indent=1, sort_keys=True))
    console = Console(width=160)
    console.print(table(points))
    if args.markdown:
        print(markdown(points))
    for model in args.models:
        exact = args.runs / model / "test-exact"
        if (exact / "_manifest.json").exists() and TraceDataset(exact).complete:
            agree = numerics_agreement(args.runs / model / "test", exact)
            console.print(f"{model}: --exact numerics select the same experts on "
                          f"{agree['decode']:.4f} of decode and {agree['prompt']:.4f} of "
                          f"prompt selections ({agree['diverged']} of {agree['sequences']} "
                          "greedy test sequences diverge; compared up to the divergence)")
    if points:
        plot(points, args.plot)
        print(f"wrote {args.json}, {args.plot}")


if __name__ == "__main__":
    main()
