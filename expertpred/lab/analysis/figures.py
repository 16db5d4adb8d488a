"""The figures of a routing report (matplotlib without pyplot: no global backend state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...trace.dataset import ModelInfo
from .records import CrossLayerSummary, LocalitySummary, ReuseSummary, RoutingReport


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def fig_popularity(path: Path, share_vs_uniform: np.ndarray, blocks: Sequence[int]) -> None:
    fig = _figure(max(6.5, 0.25 * share_vs_uniform.shape[1] + 2), 0.4 * len(blocks) + 1.8)
    ax = fig.add_subplot()
    ratio = np.log2(np.clip(np.nan_to_num(share_vs_uniform), 1 / 8, 8))
    im = ax.imshow(ratio, aspect="auto", cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer (block)")
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_title("expert usage / uniform share (log2; blue = rare, red = hot)")
    cb = fig.colorbar(im, ax=ax)
    cb.set_ticks([-3, -2, -1, 0, 1, 2, 3], labels=["≤1/8", "1/4", "1/2", "1", "2", "4", "≥8"])
    fig.savefig(path)


def fig_locality(path: Path, loc: LocalitySummary, blocks: Sequence[int], k: int) -> None:
    fig = _figure(9, 3.6)
    x = np.arange(len(blocks))
    for j, (key, title) in enumerate((("first", "first choice kept"),
                                      ("any", f"top-{k} sets share an expert"))):
        ax = fig.add_subplot(1, 2, j + 1)
        ax.bar(x, getattr(loc, key), color="tab:blue", label="observed")
        ax.plot(x, getattr(loc, f"{key}_independent"), "o-", color="tab:orange",
                label="independent (same popularity)")
        ax.plot(x, getattr(loc, f"{key}_shuffled"), "s-", color="tab:green",
                label="each sequence shuffled")
        ax.axhline(getattr(loc, f"{key}_uniform"), color="k", ls="--", label="uniform")
        ax.set_xticks(x, [str(b) for b in blocks])
        ax.set_xlabel("layer (block)")
        ax.set_ylim(0, 1)
        ax.set_title(title)
        if j == 0:
            ax.set_ylabel("P(consecutive tokens)")
            ax.legend(fontsize=7)
    fig.savefig(path)


def fig_reuse(path: Path, reuse: ReuseSummary, blocks: Sequence[int]) -> None:
    fig = _figure(9, 3.6)
    hist = np.asarray(reuse.hist, dtype=np.float64)[:, 1:-1]
    tot = np.asarray(reuse.hist, dtype=np.float64)[:, 1:].sum(axis=1, keepdims=True)
    pmf = np.divide(hist, tot, out=np.zeros_like(hist), where=tot > 0)
    pmf[pmf == 0] = np.nan  # log axis: leave gaps, not drops to zero
    d = np.arange(1, hist.shape[1] + 1)
    geo_cdf = np.asarray(reuse.uniform_cdf)
    geo_pmf = np.diff(np.concatenate([[0.0], geo_cdf]))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    cmap = _cmap("viridis")
    for i, b in enumerate(blocks):
        c = cmap(i / max(len(blocks) - 1, 1))
        ax1.plot(d, pmf[i], color=c, lw=1, label=str(b))
        ax2.plot(d, reuse.cdf[i], color=c, lw=1)
    ax1.plot(d, geo_pmf, "k--", lw=1.5, label="uniform")
    ax2.plot(d, geo_cdf, "k--", lw=1.5)
    ax1.set_yscale("log")
    if np.isfinite(pmf).any():
        ax1.set_ylim(bottom=0.5 * float(np.nanmin(pmf)))
    ax1.set_xlabel("tokens since the expert was last used")
    ax1.set_ylabel("share of reuses")
    ax1.set_title("reuse distance")
    ax1.legend(fontsize=6, ncol=2, title="block", title_fontsize=6)
    ax2.set_xscale("log")
    ax2.set_xlabel("reuse distance d")
    ax2.set_ylabel("P(distance ≤ d)")
    ax2.set_title("reuse distance CDF")
    fig.savefig(path)


def _cmap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name]


def _shown_pairs(n_pairs: int) -> list[int]:
    return sorted({0, n_pairs // 2, n_pairs - 1}) if n_pairs > 0 else []


def fig_transitions(path: Path, trans: np.ndarray, blocks: Sequence[int]) -> None:
    shown = _shown_pairs(len(trans))
    fig = _figure(3.6 * len(shown) + 0.8, 3.6)
    for j, p in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), j + 1)
        c = trans[p].astype(np.float64)
        tot = c.sum(axis=1, keepdims=True)
        m = np.divide(c, tot, out=np.full_like(c, np.nan), where=tot > 0)
        im = ax.imshow(m, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"block {blocks[p]} → {blocks[p + 1]}", fontsize=9)
        ax.set_xlabel(f"1st choice at {blocks[p + 1]}")
        ax.set_ylabel(f"1st choice at {blocks[p]}")
    if shown:
        fig.colorbar(im, ax=fig.axes, label="P(next | this)")
    fig.savefig(path)


def fig_mi(path: Path, cross: CrossLayerSummary, blocks: Sequence[int]) -> None:
    fig = _figure(7, 3.4)
    ax = fig.add_subplot()
    n = len(cross.mi_bits)
    x = np.arange(n)
    ax.bar(x - 0.2, cross.mi_bits, 0.4, label="MI (first choices)")
    ax.bar(x + 0.2, cross.mi_baseline_bits, 0.4, color="gray", label="independence baseline")
    ax.plot(x, cross.h_next_bits, "k_", ms=18, label="H(next layer)")
    ax.set_xticks(x, [f"{blocks[i]}→{blocks[i + 1]}" for i in range(n)])
    ax.set_xlabel("adjacent layer pair (blocks)")
    ax.set_ylabel("bits")
    ax.set_title("cross-layer mutual information")
    ax.legend(fontsize=7)
    fig.savefig(path)


def fig_domains(path: Path, summary: RoutingReport, blocks: Sequence[int]) -> None:
    div = summary.divergence
    fig = _figure(9, 3.6)
    x = np.arange(len(blocks))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for p in div.pairs:
        ax1.plot(x, p.jsd, "o-", label=f"{p.a} vs {p.b}")
    ax1.plot(x, div.floor, "k--", label="split-half floor")
    ax1.set_xticks(x, [str(b) for b in blocks])
    ax1.set_xlabel("layer (block)")
    ax1.set_ylabel("JSD (bits)")
    ax1.set_title("usage divergence between domains")
    ax1.legend(fontsize=7)
    doms = list(summary.by_domain)
    w = 0.8 / max(len(doms), 1)
    for j, d in enumerate(doms):
        ax2.bar(x + (j - (len(doms) - 1) / 2) * w, summary.by_domain[d].locality.first,
                w, label=d)
    ax2.axhline(summary.overall.locality.first_uniform, color="k", ls="--",
                label="uniform")
    ax2.set_xticks(x, [str(b) for b in blocks])
    ax2.set_xlabel("layer (block)")
    ax2.set_ylabel("first choice kept")
    ax2.set_title("temporal locality per domain")
    ax2.legend(fontsize=7)
    fig.savefig(path)


def write_figures(out: Path, summary: RoutingReport, model: ModelInfo) -> dict[str, str]:
    """Draw every figure the summary supports into ``out``; name -> relative path."""
    o = summary.overall
    blocks = list(model.moe_layers)
    figs: dict[str, str] = {}

    def fig(name: str, fn: Any, *args: Any) -> None:
        fn(out / name, *args)
        figs[name] = name

    fig("popularity.png", fig_popularity, o.popularity.share_vs_uniform, blocks)
    fig("locality.png", fig_locality, o.locality, blocks, model.n_expert_used)
    fig("reuse_distance.png", fig_reuse, o.reuse, blocks)
    if len(o.cross_layer.mi_bits):
        fig("transitions.png", fig_transitions, o.cross_layer.transition_counts, blocks)
        fig("mutual_information.png", fig_mi, o.cross_layer, blocks)
    if len(summary.by_domain) > 1:
        fig("domains.png", fig_domains, summary, blocks)
    return figs
