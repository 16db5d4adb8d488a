"""The worded answers of a routing report: per-layer evidence from the numbers, verdicts
by :class:`Thresholds`, and the sentences that quote both."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ...trace.dataset import ModelInfo
from .records import RoutingReport


@dataclass(frozen=True)
class Thresholds:
    """When a number counts as evidence; every answer in the report quotes the ones it used."""

    # temporal locality at a layer: first-choice keep rate >= lift x uniform (1/E) AND at
    # least `margin` above the rate of independent tokens with the same usage (so skewed
    # popularity alone does not count as locality)
    locality_lift: float = 1.5
    locality_margin: float = 0.05
    # non-uniform access at a layer: Gini above this, or the most used expert at >= ratio x
    # its uniform share, or a dead expert
    skew_gini: float = 0.2
    skew_ratio: float = 2.0
    # "same experts repeatedly": the k most used experts take >= lift x k/E of selections,
    # or an expert used at t-1 is used again at t >= lift x k/E of the time
    repeat_lift: float = 1.5
    # a predictor is feasible at a layer when a simple in-sample predictor's top-k recall
    # is >= lift x that of guessing (k/E)
    predictor_lift: float = 1.5
    # cross-layer affinity: normalised MI (MI / H(next)) above this and MI > 2 x baseline
    nmi: float = 0.1
    # domain-dependent usage at a layer: JSD >= factor x split-half floor and >= min bits
    domain_floor_factor: float = 2.0
    domain_jsd_min: float = 0.01
    # the model-level answer is "yes" when a property holds on more than this share of
    # layers, "partly" when on some, "no" when on none
    majority: float = 0.5


def _verdict(hits: np.ndarray, th: Thresholds) -> str:
    n = len(hits)
    if n == 0:
        return "undetermined"
    share = float(np.sum(hits)) / n
    if share > th.majority:
        return "yes"
    return "partly" if share > 0 else "no"


def _layers(hits: np.ndarray, blocks: Sequence[int]) -> str:
    idx = [str(blocks[i]) for i in np.flatnonzero(hits)]
    return ", ".join(idx) if idx else "none"


def pct(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.1f}%"


def num(x: float, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{nd}f}"


def span(a: np.ndarray, fmt: Any = pct) -> str:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    if len(a) == 0:
        return "–"
    lo, hi = float(a.min()), float(a.max())
    return fmt(lo) if np.isclose(lo, hi) else f"{fmt(lo)} to {fmt(hi)}"


@dataclass(frozen=True)
class Evidence:
    """Per-layer criteria (boolean arrays over MoE layers) and the numbers they rest on."""

    blocks: list[int]  # GGUF block of each MoE layer
    k: int  # experts used per token
    rand: float  # k/E: the recall or share of guessing
    concentrated: np.ndarray  # the k most used experts take >= repeat_lift x k/E
    reused: np.ndarray  # an expert used at t-1 is used again at t >= repeat_lift x k/E
    repeated: np.ndarray  # concentrated | reused
    local: np.ndarray  # first-choice locality beyond uniform and independent tokens
    ordered: np.ndarray  # ... and beyond the shuffled-within-sequence baseline
    local_any: np.ndarray  # top-k overlap beyond uniform and independent tokens
    cands: dict[str, np.ndarray]  # recall of each simple predictor per layer
    pop_rec: np.ndarray  # popularity predictor's recall (held out when possible)
    prev_rec: np.ndarray  # previous-layer lookup's recall (index 0 = no previous layer)
    heldout: bool  # the two fitted predictors were scored on held-out sequences
    best: np.ndarray  # best recall per layer
    best_names: list[str]  # which predictor reached it
    predictable: np.ndarray  # best >= predictor_lift x k/E
    dead: np.ndarray  # never-used experts per layer
    skewed: np.ndarray  # non-uniform usage
    affine: np.ndarray  # cross-layer affinity per adjacent pair
    dom_hits: dict[str, np.ndarray]  # domain-dependent usage per domain pair

    def layer_word(self, hits: np.ndarray) -> str:
        return f"{int(np.sum(hits))} of {len(hits)} layers (blocks {_layers(hits, self.blocks)})"


def gather_evidence(summary: RoutingReport, model: ModelInfo, th: Thresholds) -> Evidence:
    """Apply the thresholds to the numbers, layer by layer."""
    o = summary.overall
    pop, loc, reuse, cross = o.popularity, o.locality, o.reuse, o.cross_layer
    e, k = model.n_expert, model.n_expert_used
    blocks = list(model.moe_layers)
    rand = k / e

    # same experts repeatedly (concentrated popularity or short-range reuse)
    concentrated = pop.top_k_coverage >= th.repeat_lift * rand
    reused = np.nan_to_num(reuse.within_1) >= th.repeat_lift * rand
    repeated = concentrated | reused
    # temporal locality beyond popularity
    first = np.nan_to_num(loc.first)
    local = ((first >= th.locality_lift * loc.first_uniform)
             & (first - loc.first_independent >= th.locality_margin))
    ordered = first - np.nan_to_num(loc.first_shuffled) >= th.locality_margin
    any_ = np.nan_to_num(loc.any)
    local_any = (any_ > loc.any_uniform) & (any_ - loc.any_independent >= th.locality_margin)
    # a simple predictor's top-k recall per layer
    held = o.heldout_recall
    heldout = bool(np.isfinite(held.popularity).any())
    if heldout:
        pop_rec, prev_rec = held.popularity, held.previous_layer
    else:  # one sequence: nothing to hold out
        pop_rec = pop.top_k_coverage
        prev_rec = np.concatenate([[np.nan], np.asarray(cross.topk_recall, dtype=float)])
    cands = {"previous token": np.nan_to_num(loc.overlap),
             "popularity": np.nan_to_num(pop_rec),
             "previous layer": np.nan_to_num(prev_rec)}
    names = list(cands)
    stack = np.stack([cands[n] for n in names])
    best_idx = stack.argmax(axis=0)
    best = stack.max(axis=0)
    predictable = best >= th.predictor_lift * rand
    best_names = [names[i] for i in best_idx]
    # uniform access
    dead = pop.dead.sum(axis=-1)
    skewed = (pop.gini > th.skew_gini) | (pop.max_share_ratio >= th.skew_ratio) | (dead > 0)
    # cross-layer affinity
    affine = ((cross.nmi > th.nmi) & (cross.mi_bits > 2 * cross.mi_baseline_bits)
              if len(cross.nmi) else np.zeros(0, dtype=bool))
    # domains
    div = summary.divergence
    floor = np.nan_to_num(div.floor, nan=0.0)
    dom_hits = {f"{p.a} vs {p.b}": (p.jsd >= np.maximum(th.domain_floor_factor * floor,
                                                                   th.domain_jsd_min))
                for p in div.pairs}

    return Evidence(blocks=blocks, k=k, rand=rand, concentrated=concentrated, reused=reused,
                    repeated=repeated, local=local, ordered=ordered, local_any=local_any,
                    cands=cands, pop_rec=pop_rec, prev_rec=prev_rec, heldout=heldout, best=best,
                    best_names=best_names, predictable=predictable, dead=dead, skewed=skewed,
                    affine=affine, dom_hits=dom_hits)


def _predictability_text(summary: RoutingReport, ev: Evidence, th: Thresholds,
              v_rep: str, v_loc: str, v_pred: str) -> list[str]:
    o = summary.overall
    pop, loc, reuse, cross = o.popularity, o.locality, o.reuse, o.cross_layer
    k, rand, blocks, layer_word = ev.k, ev.rand, ev.blocks, ev.layer_word
    repeated, local, ordered, local_any = ev.repeated, ev.local, ev.ordered, ev.local_any
    best, best_names, cands, pop_rec, prev_rec = (ev.best, ev.best_names, ev.cands, ev.pop_rec,
                                                  ev.prev_rec)
    predictable, heldout, affine, n_layer = ev.predictable, ev.heldout, ev.affine, len(blocks)
    lines = [
        f"**Same experts repeatedly: {v_rep}.** The k={k} most used experts of a layer take "
        f"{span(pop.top_k_coverage)} of its selections (uniform: {pct(rand)}); an expert "
        f"selected for a token is selected again for the next token {span(reuse.within_1)}"
        f" of the time (uniform: {pct(rand)}) and within 8 tokens "
        f"{span(reuse.within_8)} (uniform: {pct(reuse.uniform_within_8)}). "
        f"Criterion (either ≥ {th.repeat_lift}× k/E) met on {layer_word(repeated)}.",
        f"**Temporal locality: {v_loc}.** Consecutive tokens keep their first-choice expert "
        f"{span(loc.first)} of the time against {pct(loc.first_uniform)} for uniform "
        f"routing and {span(loc.first_independent)} for independent tokens with the "
        f"observed popularity; their top-{k} sets share an expert {span(loc.any)} of the "
        f"time (uniform {pct(loc.any_uniform)}, independent "
        f"{span(loc.any_independent)}). Criterion (first-choice keep rate ≥ "
        f"{th.locality_lift}× 1/E and ≥ {100 * th.locality_margin:g} percentage points above "
        f"the independent baseline) met on {layer_word(local)}; the top-{k} overlap is above "
        f"uniform and ≥ {100 * th.locality_margin:g} points above independent on "
        f"{layer_word(local_any)}. Shuffling the tokens inside each sequence (keeping each "
        f"sequence's own experts) gives a first-choice keep rate of "
        f"{span(loc.first_shuffled)}: the part of the excess over independent tokens "
        f"that a per-sequence working set explains; the order of tokens adds ≥ "
        f"{100 * th.locality_margin:g} points beyond it on {layer_word(ordered)}.",
        f"**A predictor can be built: {v_pred}.** The best of three simple predictors of a "
        f"layer's top-{k} set reaches a recall of {span(best)} against {pct(rand)} for "
        f"guessing (the previous token's set: {span(cands['previous token'])}; the "
        f"layer's {k} most popular experts: {span(pop_rec)}; a table keyed on the previous "
        f"layer's first choice: {span(prev_rec[1:])}; best per layer: "
        + ", ".join(f"{blocks[i]}: {best_names[i]}" for i in range(n_layer))
        + f"). Criterion (recall ≥ {th.predictor_lift}× k/E) met on "
        f"{layer_word(predictable)}. "
        + ("The two fitted predictors are scored on held-out sequences (fitted on alternate "
           "sequences of each domain, 2-fold)." if heldout else
           "With one sequence the fitted predictors are scored in-sample (optimistic).")
        + " A learned predictor has to beat these numbers to be worth its cost.",
    ]
    if len(affine):
        lines.append(
            f"**Cross-layer affinity:** the first choice at one layer carries "
            f"{span(cross.mi_bits, lambda x: f'{x:.3f}')} bits about the next layer's "
            f"(independence baseline {span(cross.mi_baseline_bits, lambda x: f'{x:.3f}')}"
            f" bits; {span(cross.nmi)} of the next layer's entropy); a lookup on it "
            f"predicts the next first choice {span(cross.first_accuracy)} of the time "
            f"(most popular expert: {span(cross.first_accuracy_baseline)}). Criterion "
            f"(NMI > {th.nmi} and MI > 2× baseline) met on {int(affine.sum())} of "
            f"{len(affine)} adjacent layer pairs.")
    return lines


def _uniform_access_text(summary: RoutingReport, ev: Evidence, th: Thresholds,
              uniform_holds: str) -> list[str]:
    pop = summary.overall.popularity
    skewed, dead, local, layer_word = ev.skewed, ev.dead, ev.local, ev.layer_word
    lines = [
        f"**Uniform access holds: {uniform_holds}.** Per layer the Gini coefficient of expert "
        f"usage is {span(pop.gini, lambda x: f'{x:.3f}')} (0 = uniform), the most used "
        f"expert gets {span(pop.max_share_ratio, lambda x: f'{x:.2f}×')} and the least "
        f"used {span(pop.min_share_ratio, lambda x: f'{x:.2f}×')} its uniform share "
        f"(1/E), Zipf slope {span(pop.zipf_slope, lambda x: f'{x:.2f}')}; "
        f"{int(dead.sum())} expert slots are never used and {int(pop.hot.sum())} are hot "
        f"(≥ 2× uniform share). Criterion for non-uniform (Gini > {th.skew_gini}, or max "
        f"share ≥ {th.skew_ratio}× uniform, or a dead expert) met on {layer_word(skewed)}. "
        f"Sampling noise of a share is about ±{pct(pop.share_noise)} relative.",
    ]
    if local.any():
        lines.append(f"Access is also not uniform in time: {layer_word(local)} keep their "
                   "first-choice expert across consecutive tokens more often than "
                   "independent tokens would.")
    return lines


def _domain_text(summary: RoutingReport, ev: Evidence, th: Thresholds) -> list[str]:
    div, dom_hits, layer_word = summary.divergence, ev.dom_hits, ev.layer_word
    if dom_hits:
        dom = [f"**Domain dependence ({name}): {_verdict(hits, th)}.** Jensen–Shannon "
               f"divergence of per-layer usage {span(p.jsd, lambda x: f'{x:.4f}')} bits "
               f"against a split-half floor of {span(div.floor, lambda x: f'{x:.4f}')} "
               f"bits; criterion (≥ {th.domain_floor_factor}× floor and ≥ {th.domain_jsd_min}"
               f" bits) met on {layer_word(hits)}."
               for (name, hits), p in zip(dom_hits.items(), div.pairs)]
    else:
        dom = [f"**Domain dependence: undetermined** — the trace has one domain "
               f"({', '.join(div.domains)})."]
    return dom


@dataclass(frozen=True)
class PredictabilityAnswer:
    """Whether the same experts come back, in time, and whether a simple predictor sees it
    (report.json key ``rq3``, kept so old reports read the same)."""

    same_experts_repeatedly: str  # "yes" / "partly" / "no" / "undetermined", see _verdict
    temporal_locality: str  # same scale; first-choice keep rate beyond uniform and independent
    predictor_feasible: str  # same scale; best simple predictor beats guessing by the lift
    text: list[str]  # the sentences report.md prints, quoting numbers and thresholds


@dataclass(frozen=True)
class UniformAccessAnswer:
    """Whether every expert is read about equally often (report.json key ``rq4``)."""

    uniform_access_holds: str  # "yes" / "partly" / "no" / "undetermined"
    text: list[str]  # the sentences report.md prints


@dataclass(frozen=True)
class DomainAnswer:
    """Whether expert usage depends on the prompt's domain (report.json key ``domains``)."""

    verdicts: dict[str, str]  # "code vs prose" -> verdict; empty with one domain
    text: list[str]  # the sentences report.md prints


@dataclass(frozen=True)
class Answers:
    """The worded answers of a report and the per-layer evidence behind them."""

    predictability: PredictabilityAnswer  # repeated experts, locality, predictor feasibility
    uniform_access: UniformAccessAnswer  # does uniform access hold
    domains: DomainAnswer  # domain dependence
    # per-layer criteria (numpy arrays over MoE layers) under report.json's names
    per_layer: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """report.json's ``answers`` object (numpy arrays left for ``to_jsonable``)."""
        return {"rq3": asdict(self.predictability), "rq4": asdict(self.uniform_access),
                "domains": asdict(self.domains), "per_layer": self.per_layer}


def derive_answers(summary: RoutingReport, model: ModelInfo, th: Thresholds) -> Answers:
    """Per-layer evidence and worded answers: repeated experts, temporal locality and
    predictability, uniform access, domain dependence."""
    ev = gather_evidence(summary, model, th)
    repeated, local, predictable, skewed = ev.repeated, ev.local, ev.predictable, ev.skewed
    v_rep, v_loc, v_pred = _verdict(repeated, th), _verdict(local, th), _verdict(predictable, th)
    v_skew = _verdict(skewed, th)
    uniform_holds = {"yes": "no", "partly": "partly", "no": "yes"}[v_skew] \
        if v_skew != "undetermined" else "undetermined"
    if uniform_holds == "yes" and local.any():
        uniform_holds = "partly"  # uniform in aggregate but not in time

    return Answers(
        predictability=PredictabilityAnswer(
            same_experts_repeatedly=v_rep, temporal_locality=v_loc, predictor_feasible=v_pred,
            text=_predictability_text(summary, ev, th, v_rep, v_loc, v_pred)),
        uniform_access=UniformAccessAnswer(
            uniform_access_holds=uniform_holds,
            text=_uniform_access_text(summary, ev, th, uniform_holds)),
        domains=DomainAnswer(verdicts={n: _verdict(h, th) for n, h in ev.dom_hits.items()},
                             text=_domain_text(summary, ev, th)),
        per_layer={"block": ev.blocks, "repeated": repeated,
                   "concentrated": ev.concentrated, "reused": ev.reused,
                   "temporal_locality": local, "topk_locality": ev.local_any,
                   "order_locality": ev.ordered,
                   "predictable": predictable, "best_predictor": ev.best_names,
                   "predictor_recall": ev.cands, "predictor_recall_heldout": ev.heldout,
                   "best_recall": ev.best, "non_uniform": skewed, "dead": ev.dead,
                   "cross_layer_affine": ev.affine,
                   "domain_dependent": ev.dom_hits},
    )
