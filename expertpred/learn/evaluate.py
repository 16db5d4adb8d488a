"""Evaluate the predictor ladder: accuracy per predictor × offset × layer, cache simulation.

Scenarios (splits by prompt, never by token):

- ``in-domain``: train split (all domains) → test split (all domains);
- ``code→prose`` / ``prose→code`` (``cross_domain``): train split of one domain → test split
  of the other.

For every scenario, offset ``d`` and predictor: recall@k, precision@k and exact-set hit rate
for ``k = n_expert_used`` and ``2·n_expert_used``, overall and per target layer. Then, on the
in-domain test tokens in execution order, an expert cache of 10/25/50% of all expert bytes
under LRU, LFU, Belady-MIN and predictive prefetch (LRU + the chosen predictor's top-k for
the next layers; the oracle as its ceiling).

:func:`evaluate` returns an :class:`EvaluationReport` (its ``to_json()`` is report.json);
:func:`write_report` writes ``report.json`` and the plots; :func:`report_tables` builds rich
tables for the CLI to print.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch, FeatureConfig, build_features
from ..predictors import Predictor
from ..predictors.nextuse import NextUseModel
from ..units import human_bytes
from .cachesim import CacheResult, prefetch_plan, simulate
from .cachestream import StreamSpec, simulate_stream
from .metrics import exact_set_hit, grouped_mean, nanmean, precision_at_k, recall_at_k
from .scoring import access_stream, feature_batches, score_offset
from .train import (
    NEXTUSE_FILE,
    FitResult,
    PredictorsConfig,
    TraceSource,
    config_dict,
    fit_all,
    fit_nextuse,
    load_all,
    open_source,
    phase_value,
)

log = logging.getLogger(__name__)

LEARNED = ("lightgbm", "mlp")
NOT_BASELINES = ("lightgbm", "mlp", "oracle")


@dataclass(frozen=True)
class ScoreRow:
    """Accuracy of one predictor at one offset and one k on a scenario's test tokens."""

    predictor: str  # registry name
    d: int  # target offset in layers
    k: int  # experts predicted
    n_rows: int  # (token, layer) examples scored
    recall: float | None  # None when no example (NaN is not JSON)
    precision: float | None
    exact: float | None  # share of examples whose whole top-k set was right
    recall_per_layer: list[float | None]  # by target layer; None below d


@dataclass(frozen=True)
class Scenario:
    """One train → test split and every predictor's scores on it."""

    name: str  # "in-domain", "code→prose", ...
    n_train_seqs: int
    n_test_seqs: int
    train_rows: dict[str, int]  # str(d) -> training examples (JSON keys are strings)
    fit_seconds: dict[str, dict[str, float]]  # predictor -> str(d) -> seconds
    skipped: dict[str, str]  # predictor -> why it was not fitted
    results: list[ScoreRow]


@dataclass(frozen=True)
class CacheRow:
    """One cache policy at one budget (:class:`~.cachesim.SimResult` plus the budget)."""

    budget: float  # share of all expert bytes the cache may hold
    policy: str  # "lru", "belady", "predictive:<predictor>", ...
    capacity_bytes: int
    n_tokens: int
    accesses: int
    hits: int
    hit_rate: float
    demand_bytes: int  # bytes read on misses
    prefetch_bytes: int  # bytes read ahead by the plan
    bytes_per_token: float


@dataclass(frozen=True)
class CacheReport:
    """The expert-cache simulation on the in-domain test tokens in execution order."""

    n_tokens: int
    expert_bytes_total: int  # all experts of all MoE layers
    prefetch_k: int  # experts prefetched per predicted layer
    depth: int  # layers predicted ahead
    results: list[CacheRow]


@dataclass(frozen=True)
class EvaluationReport:
    """What :func:`evaluate` measured; ``to_json()`` is report.json."""

    config: dict[str, Any]  # the PredictorsConfig as JSON (config_dict)
    source: str  # where the traces came from
    model: dict[str, Any]  # ModelInfo.to_dict() of the traced model
    scenarios: list[Scenario]
    cache: CacheReport
    # acceptance goal -> {"met": bool, numbers}; read by benchmarks/goals.py, not users
    goals: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _clean(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def score_predictions(top: np.ndarray, x: FeatureBatch, ks: Sequence[int],
                      predictor: str, d: int) -> list[ScoreRow]:
    """Metrics of ranked predictions ``top`` (n, >= max(ks)) against ``x.targets``."""
    out = []
    n_l = x.model.n_moe
    tl = x.target_layer
    for k in ks:
        rec = recall_at_k(top, x.targets, k)
        out.append(ScoreRow(
            predictor=predictor, d=d, k=int(k), n_rows=len(x),
            recall=_clean(nanmean(rec)),
            precision=_clean(nanmean(precision_at_k(top, x.targets, k))),
            exact=_clean(nanmean(exact_set_hit(top, x.targets, k))),
            recall_per_layer=[_clean(v) for v in grouped_mean(rec, tl, n_l)],
        ))
    return out


def _scenarios(cfg: PredictorsConfig, source: TraceSource) -> list[tuple[str, list, list]]:
    sc = [("in-domain", source.select(split="train"), source.select(split="test"))]
    if cfg.cross_domain:
        for a, b in (("code", "prose"), ("prose", "code")):
            tr, te = source.select("train", a), source.select("test", b)
            if tr and te:
                sc.append((f"{a}→{b}", tr, te))
            else:
                log.warning("cross-domain %s→%s skipped: no sequences of one domain", a, b)
    return sc


def _score(cfg: PredictorsConfig, source: TraceSource, fitted: FitResult,
           test_ids: Sequence[int], ks: Sequence[int], in_memory: bool) -> list[ScoreRow]:
    """Every fitted predictor at every offset on the test sequences: streamed in bounded
    batches (:mod:`.scoring`), or with all examples of an offset in memory."""
    model = source.model
    rows: list[ScoreRow] = []
    for d in cfg.offsets:
        fc = FeatureConfig(d=d, history_decay=cfg.history_decay)
        phase = phase_value(cfg.eval_phase)
        if in_memory:
            x = build_features(source.sequences(test_ids), model, fc, phase=phase)
            for pname, by_d in fitted.predictors.items():
                if d in by_d:
                    rows += score_predictions(by_d[d].predict_topk(x, max(ks)), x, ks, pname, d)
            continue
        sums = score_offset(feature_batches(source.sequences(test_ids), model, fc, phase),
                            fitted.predictors, d, ks, model.n_moe)
        if sums and not any(acc.n_rows for by_k in sums.values() for acc in by_k.values()):
            raise ExpertPredError("no examples: the trace selection is empty (or every "
                                  f"sequence is shorter than needed for d={d})")
        for pname, by_k in sums.items():
            rows += [ScoreRow(predictor=pname, d=d, k=int(k), n_rows=acc.n_rows,
                              recall=_clean(acc.mean("recall")),
                              precision=_clean(acc.mean("precision")),
                              exact=_clean(acc.mean("exact")),
                              recall_per_layer=[_clean(v) for v in acc.per_layer("recall")])
                     for k, acc in by_k.items()]
    return rows


def _nextuse(cfg: PredictorsConfig, source: TraceSource,
             models_dir: str | os.PathLike[str] | None) -> NextUseModel:
    """The learned residency policy's model: the one ``train`` saved next to the
    predictors when evaluating saved predictors, else fitted on the train split."""
    if models_dir is not None and (Path(models_dir) / NEXTUSE_FILE).is_file():
        return NextUseModel.load(Path(models_dir) / NEXTUSE_FILE)
    return fit_nextuse(cfg, source, source.select(split="train"))


def evaluate(cfg: PredictorsConfig, models_dir: str | os.PathLike[str] | None = None,
             source: TraceSource | None = None, in_memory: bool = False) -> EvaluationReport:
    """Run every scenario; with ``models_dir``, in-domain uses the saved predictors (and
    the saved next-use model). Test examples stream in bounded batches unless
    ``in_memory`` (the earlier path, kept to compare the two and measure the difference)."""
    source = source or open_source(cfg)
    model = source.model
    k = model.n_expert_used
    ks = (k, min(2 * k, model.n_expert))
    scenarios: list[Scenario] = []
    in_domain: FitResult | None = None
    for name, train_ids, test_ids in _scenarios(cfg, source):
        if not test_ids:
            raise ExpertPredError(f"{source.description}: no test sequences for {name}")
        if name == "in-domain" and models_dir is not None:
            fitted = FitResult(predictors=load_all(models_dir, model, cfg.predictors,
                                                   cfg.offsets))
            if not fitted.predictors:
                raise ExpertPredError(f"{models_dir}: no saved predictors of "
                                      f"{', '.join(cfg.predictors)}")
        else:
            fitted = fit_all(cfg, source, train_ids)
        if name == "in-domain":
            in_domain = fitted
        rows = _score(cfg, source, fitted, test_ids, ks, in_memory)
        scenarios.append(Scenario(
            name=name, n_train_seqs=len(train_ids), n_test_seqs=len(test_ids),
            train_rows={str(d): n for d, n in fitted.train_rows.items()},
            fit_seconds={p: {str(d): s for d, s in v.items()}
                         for p, v in fitted.fit_seconds.items()},
            skipped=fitted.skipped, results=rows,
        ))
    assert in_domain is not None
    cache = cache_report(cfg, source, in_domain, source.select(split="test"),
                         _nextuse(cfg, source, models_dir), in_memory=in_memory)
    return EvaluationReport(config=config_dict(cfg), source=source.description,
                            model=model.to_dict(), scenarios=scenarios, cache=cache,
                            goals=goals(scenarios, cache, model.n_expert_used, cfg))


def _expert_bytes(source: TraceSource) -> np.ndarray:
    """Bytes of one expert per MoE layer, from the GGUF (1 each without a model file)."""
    if source.gguf_path:
        from ..gguf.layout import read_layout

        lay = read_layout(source.gguf_path)
        return lay.nbytes.sum(axis=2)[:, 0].astype(np.int64)
    return np.ones(source.model.n_moe, dtype=np.int64)


def cache_report(cfg: PredictorsConfig, source: TraceSource, fitted: FitResult,
                 test_ids: Sequence[int], nextuse: NextUseModel | None = None,
                 in_memory: bool = False) -> CacheReport:
    """Hit rate and bytes per token of each cache policy on the test tokens, per budget;
    ``learned`` (the residency policy driven by the ``nextuse`` model) when given. The test
    tokens stream in chunks (:mod:`.cachestream`) unless ``in_memory`` (the earlier path:
    the whole access stream, plans and Belady index at once; kept to compare)."""
    model = source.model
    keep = phase_value(cfg.eval_phase)
    sizes = _expert_bytes(source)
    total = int(sizes.sum()) * model.n_expert
    k = model.n_expert_used
    pk = cfg.cache_prefetch_k or k
    policies = ("lru", "lfu", "belady") if nextuse is None else ("lru", "lfu", "learned",
                                                                  "belady")
    depths = range(1, cfg.cache_depth + 1)
    prefetchers = {p: fitted.predictors[p] for p in dict.fromkeys([cfg.cache_predictor,
                                                                   "oracle"])
                   if p in fitted.predictors and all(d in fitted.predictors[p] for d in depths)}
    caps = tuple(int(b * total) for b in cfg.cache_budgets)
    if in_memory:
        t_len, by_cap = _cache_in_memory(cfg, source, test_ids, sizes, caps, policies,
                                         prefetchers, nextuse)
    else:
        spec = StreamSpec(caps, policies, prefetchers, cfg.cache_depth, pk, cfg.history_decay,
                          keep)
        t_len, by_cap = simulate_stream(lambda: source.sequences(test_ids), model, sizes,
                                        spec, nextuse)
    results: list[CacheRow] = []
    for b, res in zip(cfg.cache_budgets, by_cap):
        names = [*policies, *(f"predictive:{p}" for p in prefetchers)]
        results += [CacheRow(budget=b, **{**r.to_dict(), "policy": name})
                    for name, r in zip(names, res)]
    return CacheReport(n_tokens=t_len, expert_bytes_total=total, prefetch_k=pk,
                       depth=cfg.cache_depth, results=results)


def _cache_in_memory(cfg: PredictorsConfig, source: TraceSource, test_ids: Sequence[int],
                     sizes: np.ndarray, caps: Sequence[int], policies: Sequence[str],
                     prefetchers: dict[str, dict[int, Predictor]],
                     nextuse: NextUseModel | None) -> tuple[int, list[list[CacheResult]]]:
    """:func:`cache_report`'s earlier path: every array of the whole test stream at once."""
    model = source.model
    keep = phase_value(cfg.eval_phase)
    # 1. the access stream: test sequences one after another, tokens in order
    experts, tokens, index = access_stream(source.sequences(test_ids), keep)
    t_len, n_l, k = experts.shape
    pk = cfg.cache_prefetch_k or k

    # 2. prefetch plans: predicted top-k for l+1..l+depth at every (token, layer)
    def plan_for(by_d: dict[int, Predictor]) -> np.ndarray:
        predicted = {}
        for d in range(1, cfg.cache_depth + 1):
            fc = FeatureConfig(d=d, history_decay=cfg.history_decay)
            x = build_features(source.sequences(test_ids), model, fc, phase=keep)
            arr = np.full((t_len, n_l, pk), -1, dtype=np.int64)
            arr[index.rows(x.seq, x.position), x.layer.astype(np.int64)] = \
                by_d[d].predict_topk(x, pk)
            predicted[d] = arr
        return prefetch_plan(predicted, model.n_expert, experts=experts, wrap=cfg.cache_depth)

    plans = {p: plan_for(by_d) for p, by_d in prefetchers.items()}
    out = []
    for cap in caps:
        out.append([simulate(experts, pol, cap, sizes, model.n_expert, model=nextuse,
                             tokens=tokens) for pol in policies]
                   + [simulate(experts, "predictive", cap, sizes, model.n_expert,
                               prefetch=plan) for plan in plans.values()])
    return t_len, out


def _recall_table(scenarios: Sequence[Scenario], scenario: str,
                  k: int) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for sc in scenarios:
        if sc.name != scenario:
            continue
        for r in sc.results:
            if r.k == k and r.recall is not None:
                out.setdefault(r.predictor, {})[r.d] = r.recall
    return out


def goals(scenarios: Sequence[Scenario], cache: CacheReport, k: int,
          cfg: PredictorsConfig) -> dict[str, dict[str, Any]]:
    """The acceptance goals, each with the numbers that decide it."""
    rec = _recall_table(scenarios, "in-domain", k)
    baselines = {p: v for p, v in rec.items() if p not in NOT_BASELINES}
    out: dict[str, Any] = {}
    for p in LEARNED:
        if p not in rec:
            continue
        margins = {}
        for d in cfg.offsets:
            best = max((v[d] for v in baselines.values() if d in v), default=float("nan"))
            margins[d] = rec[p].get(d, float("nan")) - best
        out[f"{p} beats every baseline at every d"] = {
            "met": all(m > 0 for m in margins.values()),
            "margin_by_d": {str(d): _clean(m) for d, m in margins.items()}}
    best1 = max(((p, rec[p][1]) for p in LEARNED if p in rec and 1 in rec[p]),
                key=lambda t: t[1], default=None)
    if best1 is not None:
        out["d=1 recall@k >= 0.95"] = {"met": best1[1] >= 0.95, "predictor": best1[0],
                                       "value": best1[1]}
    hit = {(r.policy, r.budget): r.hit_rate for r in cache.results}
    pred = hit.get((f"predictive:{cfg.cache_predictor}", 0.25))
    lru = hit.get(("lru", 0.25))
    if pred is not None and lru is not None:
        out["predictive hit rate at 25% >= 0.90 and >= LRU + 0.20"] = {
            "met": pred >= 0.90 and pred - lru >= 0.20, "predictive": pred, "lru": lru,
            "predictor": cfg.cache_predictor}
    bpt = {(r.policy, r.budget): r.bytes_per_token for r in cache.results}
    ratios = {str(b): bpt[("learned", b)] / bpt[("belady", b)]
              for (p, b) in bpt if p == "learned" and bpt.get(("belady", b))}
    if ratios:
        out["learned residency bytes/token <= 1.3x Belady at every budget"] = {
            "met": all(v <= 1.3 for v in ratios.values()), "ratio_by_budget": ratios}
    return out


# --- output -----------------------------------------------------------------------------------

def write_report(report: EvaluationReport, out_dir: str | os.PathLike[str],
                 plots: bool = True) -> list[Path]:
    """Write ``report.json`` (and the plots) into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False))
    written = [path]
    if plots:
        written += write_plots(report, out)
    return written


def write_plots(report: EvaluationReport, out: Path) -> list[Path]:
    """recall vs d per predictor; per-layer recall heatmaps; cache hit rate vs budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = report.model["n_expert_used"]
    paths = []
    # 1. recall@k vs d, one line per predictor, one panel per scenario
    scen = [s.name for s in report.scenarios]
    fig, axes = plt.subplots(1, len(scen), figsize=(5 * len(scen), 4), squeeze=False)
    for ax, name in zip(axes[0], scen):
        for p, by_d in sorted(_recall_table(report.scenarios, name, k).items()):
            ds = sorted(by_d)
            ax.plot(ds, [by_d[d] for d in ds], marker="o", label=p)
        ax.set(title=name, xlabel="target offset d", ylabel=f"recall@{k}", ylim=(0, 1.02))
        ax.set_xticks(sorted({r.d for sc in report.scenarios for r in sc.results}))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    paths.append(out / "recall_vs_d.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    # 2. per-layer recall heatmap (in-domain), one panel per d
    sc = report.scenarios[0]
    offsets = sorted({r.d for r in sc.results})
    order = {p: i for i, p in enumerate(report.config["predictors"])}
    preds = sorted({r.predictor for r in sc.results}, key=lambda p: (order.get(p, 99), p))
    n_l = len(report.model["moe_layers"])
    fig, axes = plt.subplots(1, len(offsets), figsize=(3.2 * len(offsets) + 1, 0.35 *
                             len(preds) + 1.5), squeeze=False)
    for ax, d in zip(axes[0], offsets):
        grid = np.full((len(preds), n_l), np.nan)
        for r in sc.results:
            if r.d == d and r.k == k:
                grid[preds.index(r.predictor)] = [np.nan if v is None else v
                                                  for v in r.recall_per_layer]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set(title=f"d={d}", xlabel="target layer")
        ax.set_yticks(range(len(preds)), preds if d == offsets[0] else [""] * len(preds),
                      fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), label=f"recall@{k}")
    paths.append(out / "recall_per_layer.png")
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    # 3. cache hit rate and bytes read per token vs budget
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    res = report.cache.results
    for pol in dict.fromkeys(r.policy for r in res):
        pts = sorted((r.budget, r.hit_rate, r.bytes_per_token) for r in res if r.policy == pol)
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=pol)
        ax2.plot([100 * p[0] for p in pts], [p[2] / 2**20 for p in pts], marker="o", label=pol)
    ax.set(xlabel="cache budget (% of expert bytes)", ylabel="hit rate", ylim=(0, 1.02),
           title="expert cache: demand hit rate")
    ax2.set(xlabel="cache budget (% of expert bytes)", ylabel="MiB read per token",
            title="bytes read (misses + prefetches)")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "cache_hit_rate.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def report_tables(report: EvaluationReport) -> list[Any]:
    """rich Tables: accuracy (predictor × d × metric) per scenario, then the cache.

    Predictor names never shrink: their column is as wide as the longest name and the
    number columns are narrow (short headers, three decimals), so a table fits a narrow
    terminal or a pipe (rich assumes 80 columns then) without cutting a name to "previou…".
    The acceptance goals stay in report.json; they are not a user's output."""
    from rich import box
    from rich.table import Table

    def table(title: str, first: str, names: list[str], caption: str | None = None) -> Table:
        t = Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False,
                  padding=(0, 1), collapse_padding=True)
        t.add_column(first, no_wrap=True, min_width=max(map(len, [first, *names])))
        return t

    k = report.model["n_expert_used"]
    tables = []
    for sc in report.scenarios:
        by: dict[tuple[str, int], dict[int, ScoreRow]] = {}
        for r in sc.results:
            by.setdefault((r.predictor, r.d), {})[r.k] = r
        t = table(f"{sc.name}: {sc.n_train_seqs} train → {sc.n_test_seqs} test "
                  "sequences", "predictor", [p for p, _ in by],
                  caption="R recall, P precision, E exact set, at k experts")
        t.add_column("d", justify="right")
        for kk in (k, 2 * k):
            for m in ("R", "P", "E"):
                t.add_column(f"{m}@{kk}", justify="right")
        order = {p: i for i, p in enumerate(report.config["predictors"])}
        for (p, d), rk in sorted(by.items(), key=lambda kv: (order.get(kv[0][0], 99),
                                                             kv[0][1])):
            cells = []
            for kk in sorted(rk):
                cells += [_fmt(getattr(rk[kk], m)) for m in ("recall", "precision", "exact")]
            t.add_row(p, str(d), *cells)
        tables.append(t)
    c = report.cache
    policies = list(dict.fromkeys(r.policy for r in c.results))
    t = table(f"expert cache on {c.n_tokens} test tokens (hit rate / bytes read per "
              "token)", "policy", policies)
    budgets = sorted({r.budget for r in c.results})
    for b in budgets:
        t.add_column(f"{100 * b:.0f}%", justify="right")
    cell = {(r.policy, r.budget): r for r in c.results}
    for pol in policies:
        t.add_row(pol, *[f"{cell[(pol, b)].hit_rate:.3f} / "
                         f"{human_bytes(cell[(pol, b)].bytes_per_token)}" for b in budgets])
    tables.append(t)
    return tables


def goals_table(goals: dict[str, dict[str, Any]]) -> Any:
    """The acceptance goals (report.json's ``goals``) as a rich Table (``benchmarks/goals.py``)."""
    from rich.table import Table

    g = Table(title="goals")
    g.add_column("goal")
    g.add_column("met")
    g.add_column("numbers")
    for name, v in goals.items():
        nums = {kk: vv for kk, vv in v.items() if kk != "met"}
        g.add_row(name, "yes" if v["met"] else "NO", json.dumps(_round(nums)))
    return g


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 3)
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
