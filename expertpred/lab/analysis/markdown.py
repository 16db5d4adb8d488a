"""``report.md``: the sections of a routing report as Markdown, figures referenced relatively."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ...trace.dataset import ModelInfo
from .answers import Answers, Thresholds, num, pct
from .records import RoutingReport, RoutingSummary


def locality_table(summary: RoutingReport, blocks: Sequence[int],
                   decode: bool = False) -> tuple[list[str], list[list[str]]]:
    """Mixtral-paper Table 5 layout: rows layers; first-choice and any-of-top-k keep rates
    (all tokens, then per domain) next to their uniform and independent baselines."""
    key = "locality_decode" if decode else "locality"
    o = getattr(summary.overall, key)
    doms = list(summary.by_domain) if len(summary.by_domain) > 1 else []
    by = {d: getattr(summary.by_domain[d], key) for d in doms}
    headers = (["layer", "1st: all"] + [f"1st: {d}" for d in doms]
               + ["1st: uniform", "1st: indep.", "1st: shuffled", "top-k: all"]
               + [f"top-k: {d}" for d in doms]
               + ["top-k: uniform", "top-k: indep.", "top-k: shuffled"])
    rows = []
    for i, b in enumerate(blocks):
        rows.append([str(b), pct(o.first[i])] + [pct(by[d].first[i]) for d in doms]
                    + [pct(o.first_uniform), pct(o.first_independent[i]),
                       pct(o.first_shuffled[i]), pct(o.any[i])]
                    + [pct(by[d].any[i]) for d in doms]
                    + [pct(o.any_uniform), pct(o.any_independent[i]),
                       pct(o.any_shuffled[i])])
    return headers, rows


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


@dataclass(frozen=True)
class _Doc:
    """Everything a section of report.md may quote."""

    summary: RoutingReport  # routing.summarize output (numpy arrays)
    answers: Answers  # answers.derive_answers output
    model: ModelInfo
    th: Thresholds  # quoted next to the answers
    figures: dict[str, str]  # figure name -> relative path
    trace_dir: Path
    n_prompt: int  # prompt tokens of the trace (the rest were generated)
    command: str | None  # the command that produced the report, if known

    @property
    def overall(self) -> RoutingSummary:
        return self.summary.overall

    @property
    def blocks(self) -> list[int]:
        return list(self.model.moe_layers)


def _head(doc: _Doc, add: Callable[[str], None]) -> None:
    """Title, trace facts and the worded answers."""
    o = doc.overall
    blocks, k, e = doc.blocks, doc.model.n_expert_used, doc.model.n_expert
    doms = doc.summary.by_domain
    add(f"# Routing analysis: {doc.model.arch}, {e} experts, top-{k}, {len(blocks)} MoE layers")
    add("")
    add(f"- trace: `{doc.trace_dir}` — {o.n_sequences} sequences, {o.n_tokens} tokens "
        f"({doc.n_prompt} prompt, {o.n_tokens - doc.n_prompt} generated), "
        f"{o.locality.n_pairs} consecutive-token pairs")
    add("- domains: " + ", ".join(f"{d} ({b.n_sequences} sequences, {b.n_tokens} tokens)"
                                  for d, b in doms.items()))
    m = doc.model
    add(f"- model: `{Path(m.path).name}` sha256 `{m.sha256[:16]}…`, MoE blocks "
        f"{blocks[0]}–{blocks[-1]}" if blocks else "- model: no MoE layers")
    if doc.command:
        add(f"- produced by: `{doc.command}`")
    add("- all numbers: `report.json`; layer = GGUF block index")
    add("")
    add("## Answers")
    add("")
    add("### Are the same experts activated repeatedly? Is there temporal locality? "
        "Can a predictor be built?")
    add("")
    for t in doc.answers.predictability.text:
        add(f"- {t}")
    add("")
    add("### Does the assumption that parameters are accessed uniformly hold?")
    add("")
    for t in doc.answers.uniform_access.text:
        add(f"- {t}")
    add("")
    add("### Domain dependence")
    add("")
    for t in doc.answers.domains.text:
        add(f"- {t}")
    add("")
    add("Thresholds (`Thresholds` in `expertpred/lab/analysis/answers.py`): " + ", ".join(
        f"`{n}={v}`" for n, v in asdict(doc.th).items()) + ". A verdict is *yes* when the "
        f"criterion holds on more than {doc.th.majority:.0%} of layers, *partly* on some, *no* on "
        "none.")
    add("")


def _popularity(doc: _Doc, add: Callable[[str], None]) -> None:
    """## 1: usage per expert."""
    pop = doc.overall.popularity
    blocks, k, e = doc.blocks, doc.model.n_expert_used, doc.model.n_expert
    add("## 1. Expert popularity")
    add("")
    add(f"Share of a layer's selections per expert relative to uniform (1/E = {1 / e:.4f}); "
        f"top-k coverage = share taken by the {k} most used experts (uniform {k / e:.1%}).")
    add("")
    rows = [[str(b), f"{pop.gini[i]:.3f}", num(pop.zipf_slope[i], 2),
             pct(pop.top_k_coverage[i]), f"{pop.max_share_ratio[i]:.2f}×",
             f"{pop.min_share_ratio[i]:.2f}×",
             _ids(pop.dead[i]), _ids(pop.hot[i])] for i, b in enumerate(blocks)]
    add(md_table(["layer", "Gini", "Zipf slope", "top-k coverage", "max share", "min share",
                   "dead experts", "hot experts (≥2×)"], rows))
    add("")
    add(f"![expert popularity]({doc.figures['popularity.png']})")
    add("")


def _locality(doc: _Doc, add: Callable[[str], None]) -> None:
    """## 2: temporal locality tables (Mixtral paper, Table 5)."""
    o = doc.overall
    blocks = doc.blocks
    k = doc.model.n_expert_used
    add("## 2. Temporal locality (layout of Mixtral paper, Table 5)")
    add("")
    add("Share of consecutive-token pairs that keep the first-choice expert (*1st*) or whose "
        f"top-{k} sets share at least one expert (*top-k*). *uniform*: independent tokens, "
        f"uniform routing (1/E; 1 − C(E−k,k)/C(E,k)); *indep.*: independent tokens with the "
        "observed popularity (all tokens of the trace shuffled); *shuffled*: the tokens of "
        "each sequence in random order (each sequence keeps its own expert usage, so the gap "
        "to it is due to token order).")
    add("")
    add(md_table(*locality_table(doc.summary, blocks)))
    add("")
    if o.locality_decode.n_pairs:
        add(f"Generated tokens only ({o.locality_decode.n_pairs} pairs, the phase a "
            "prefetcher serves):")
        add("")
        add(md_table(*locality_table(doc.summary, blocks, decode=True)))
        add("")
    add(f"![temporal locality]({doc.figures['locality.png']})")
    add("")


def _reuse(doc: _Doc, add: Callable[[str], None]) -> None:
    """## 3: reuse distance."""
    reuse = doc.overall.reuse
    blocks, k, e = doc.blocks, doc.model.n_expert_used, doc.model.n_expert
    add("## 3. Reuse distance")
    add("")
    add("Tokens since a selected expert was last selected in the same sequence. *cold* = "
        f"first use in the sequence. Uniform routing gives a geometric distribution with "
        f"p = k/E: P(d ≤ 1) = {pct(reuse.uniform_within_1)}, "
        f"P(d ≤ 8) = {pct(reuse.uniform_within_8)}, median "
        f"{_geo_median(k / e)}.")
    add("")
    rows = [[str(b), pct(reuse.cold_share[i]), pct(reuse.within_1[i]),
             pct(reuse.within_8[i]), num(reuse.median[i], 0)]
            for i, b in enumerate(blocks)]
    add(md_table(["layer", "cold", "P(d ≤ 1)", "P(d ≤ 8)", "median d"], rows))
    add("")
    add(f"![reuse distance]({doc.figures['reuse_distance.png']})")
    add("")


def _cross_layer(doc: _Doc, add: Callable[[str], None]) -> None:
    """## 4: cross-layer affinity."""
    o = doc.overall
    cross = doc.overall.cross_layer
    blocks = doc.blocks
    k = doc.model.n_expert_used
    add("## 4. Cross-layer affinity")
    add("")
    if len(cross.mi_bits):
        add("Mutual information between the first choices of adjacent layers; baseline = "
            "expected plug-in MI of independent layers with this sample size (Miller–Madow). "
            "*lookup*: predict the next layer from a table keyed on this layer's first choice "
            "(in-sample; *held-out*: table fitted on the other half of the sequences); "
            "*popular*: always predict the next layer's most used experts (in-sample).")
        add("")
        rows = [[f"{blocks[i]}→{blocks[i + 1]}", f"{cross.mi_bits[i]:.3f}",
                 f"{cross.mi_baseline_bits[i]:.3f}", f"{cross.h_next_bits[i]:.3f}",
                 pct(cross.nmi[i]), pct(cross.first_accuracy[i]),
                 pct(cross.first_accuracy_baseline[i]), pct(cross.topk_recall[i]),
                 pct(o.heldout_recall.previous_layer[i + 1]),
                 pct(cross.topk_recall_baseline[i])] for i in range(len(cross.mi_bits))]
        add(md_table(["pair", "MI (bits)", "baseline", "H(next)", "MI / H(next)",
                       "1st acc. lookup", "1st acc. popular", f"top-{k} recall lookup",
                       "… held-out", f"top-{k} recall popular"], rows))
        add("")
        add(f"![transition matrices]({doc.figures['transitions.png']})")
        add("")
        add(f"![mutual information]({doc.figures['mutual_information.png']})")
    else:
        add("One MoE layer: no layer pairs.")
    add("")


def _domains(doc: _Doc, add: Callable[[str], None]) -> None:
    """## 5: domain dependence."""
    blocks = doc.blocks
    doms = doc.summary.by_domain
    add("## 5. Domain dependence")
    add("")
    div = doc.summary.divergence
    if div.pairs:
        add("Jensen–Shannon divergence (bits, 0 = same usage, 1 = disjoint) of per-layer "
            "expert usage between domains; floor = divergence between two halves "
            "(alternate sequences) of the same domain, i.e. sampling noise.")
        add("")
        headers = ["layer"] + [f"{p.a} vs {p.b}" for p in div.pairs] + ["floor"]
        rows = [[str(b)] + [f"{p.jsd[i]:.4f}" for p in div.pairs]
                + [num(div.floor[i], 4)] for i, b in enumerate(blocks)]
        add(md_table(headers, rows))
        add("")
        add("Per domain (mean over layers):")
        add("")
        rows = []
        for d, b in doms.items():
            bl = b.locality
            rows.append([d, str(b.n_tokens), f"{np.nanmean(b.popularity.gini):.3f}",
                         pct(np.nanmean(b.popularity.top_k_coverage)),
                         pct(_nanmean(bl.first)), pct(np.nanmean(bl.first_independent)),
                         pct(_nanmean(bl.any)), pct(np.nanmean(bl.any_independent)),
                         pct(_nanmean(b.reuse.within_8))])
        add(md_table(["domain", "tokens", "Gini", "top-k coverage", "1st kept", "1st indep.",
                       "top-k shared", "top-k indep.", "P(d ≤ 8)"], rows))
        add("")
        add(f"![domains]({doc.figures['domains.png']})")
    else:
        add(f"The trace has one domain ({', '.join(div.domains)}); nothing to compare.")
    add("")


_SECTIONS = (_head, _popularity, _locality, _reuse, _cross_layer, _domains)


def render_markdown(summary: RoutingReport, answers: Answers, model: ModelInfo,
                    th: Thresholds, *, trace_dir: Path, n_prompt: int,
                    figures: dict[str, str], command: str | None = None) -> str:
    doc = _Doc(summary, answers, model, th, figures, trace_dir, n_prompt, command)
    lines: list[str] = []
    for section in _SECTIONS:
        section(doc, lines.append)
    return "\n".join(lines)


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")


def _ids(mask: np.ndarray, limit: int = 12) -> str:
    idx = np.flatnonzero(mask).tolist()
    if not idx:
        return "–"
    s = ", ".join(map(str, idx[:limit]))
    return s + (f" (+{len(idx) - limit})" if len(idx) > limit else "")


def _geo_median(p: float) -> str:
    return f"{math.ceil(math.log(0.5) / math.log(1 - p))}" if 0 < p < 1 else "1"

