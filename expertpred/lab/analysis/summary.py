"""The routing summary from additive counts: one assembly for the in-memory and the
streaming analysis.

Every statistic of :func:`~.routing.routing_summary` is a function of integer counts that add
up over sequences (expert counts, transition tables, reuse histograms, keep-rate hits, fold
counts), of a few per-sequence values (the shuffled baselines) and of the subset counts
behind the independent baseline. :class:`RoutingCounts` holds them; :func:`counts_of` takes
them from a :class:`~.routing.RoutingData` in memory, :mod:`.streaming` adds them up shard
by shard; :func:`summary_from_counts` turns either into the report's numbers, so both paths
give the same report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...trace.record import Phase
from .baselines import (
    independent_any_baseline,
    independent_first_baseline,
    independent_overlap_baseline,
    shuffled_per_sequence,
    uniform_any_baseline,
    uniform_first_baseline,
)
from .popularity import (
    dead_experts,
    expert_counts,
    gini,
    hot_experts,
    topn_coverage,
    usage_shares,
    zipf_slope,
)
from .records import (
    CrossLayerSummary,
    DomainDivergence,
    DomainPair,
    HeldoutRecall,
    LocalitySummary,
    PopularitySummary,
    ReuseSummary,
    RoutingSummary,
)
from .routing import (
    RoutingData,
    conditional_topn_recall,
    entropy_bits,
    first_to_set_counts,
    geometric_reuse_cdf,
    js_divergence,
    lookup_topn_recall,
    median_reuse_distance,
    mi_independence_baseline,
    mutual_information,
    overlap_counts,
    reuse_cdf,
    reuse_histogram,
    transition_counts,
)


@dataclass(frozen=True)
class LocalityCounts:
    """Keep-rate counts of one set of tokens and its three baselines' ingredients."""

    n_tokens: int  # rows the baselines rest on
    n_pairs: int  # consecutive-token pairs
    first_hits: np.ndarray  # (L,) int: pairs keeping the first choice
    any_hits: np.ndarray  # (L,) int: pairs whose top-k sets meet
    overlap_sum: np.ndarray  # (L,) int: sum of |S_t & S_t-1| over pairs
    counts: np.ndarray  # (L, E) int selections per expert
    first_counts: np.ndarray  # (L, E) int first choices per expert
    any_independent: np.ndarray  # (L,) baseline value: needs every token's subsets
    first_shuffled: np.ndarray  # (L,) baseline value from per-sequence values
    any_shuffled: np.ndarray  # (L,)


@dataclass(frozen=True)
class RoutingCounts:
    """What one set of tokens contributes to a routing summary (see the module docstring)."""

    n_expert: int  # E
    k: int  # experts per token
    max_distance: int  # longest reuse distance binned separately
    n_tokens: int
    n_sequences: int
    counts: np.ndarray  # (L, E) int
    first_counts: np.ndarray  # (L, E) int
    hist: np.ndarray  # (L, max_distance + 2) int reuse histogram
    trans: np.ndarray  # (L-1, E, E) int first choice -> first choice
    f2s: np.ndarray  # (L-1, E, E) int first choice -> each of the next top-k
    fold_counts: tuple[np.ndarray, np.ndarray] | None  # heldout folds' counts; None: < 2 seqs
    fold_f2s: tuple[np.ndarray, np.ndarray] | None
    locality: LocalityCounts  # all tokens
    locality_decode: LocalityCounts  # generated tokens only


# --- from data in memory ---------------------------------------------------------------


def locality_counts(data: RoutingData) -> LocalityCounts:
    x, n_expert = data.experts, data.n_expert
    idx = np.flatnonzero(data.pairs)
    n_layer = data.n_layer
    if len(idx):
        prev, cur = x[idx - 1], x[idx]
        ov = overlap_counts(prev, cur)
        first = (prev[:, :, 0] == cur[:, :, 0]).sum(axis=0)
        any_, ovs = (ov > 0).sum(axis=0), ov.sum(axis=0)
    else:
        first = any_ = ovs = np.zeros(n_layer, dtype=np.int64)
    _, seq_rank, n_s = np.unique(data.seq_id, return_inverse=True, return_counts=True)
    first_v, any_v = shuffled_per_sequence(x, seq_rank.reshape(-1), n_s, n_expert)
    return LocalityCounts(
        n_tokens=data.n_tokens, n_pairs=int(len(idx)), first_hits=first, any_hits=any_,
        overlap_sum=ovs, counts=expert_counts(x, n_expert),
        first_counts=expert_counts(x, n_expert, first_only=True),
        any_independent=independent_any_baseline(x, n_expert),
        first_shuffled=shuffled_total(first_v, n_s, n_layer),
        any_shuffled=shuffled_total(any_v, n_s, n_layer))


def shuffled_total(per_seq: np.ndarray, n_s: np.ndarray, n_layer: int) -> np.ndarray:
    """(L,) a shuffled baseline from its (L, n_seq) per-sequence values in seq_id order."""
    n_pairs = float((np.asarray(n_s) - 1).sum())
    if len(n_s) == 0 or n_pairs == 0:
        return np.full(n_layer, np.nan)
    return np.array([per_seq[layer].sum() for layer in range(n_layer)]) / n_pairs


def heldout_folds(seq_id: np.ndarray, domain: np.ndarray) -> np.ndarray | None:
    """The sequence ids of fold 0 (alternate sequences within each domain); None with fewer
    than two sequences. Arguments: one entry per sequence, or per row."""
    ids = np.unique(seq_id)
    if len(ids) < 2:
        return None
    fold = []
    for d in sorted({str(v) for v in domain}):
        fold.append(np.unique(seq_id[domain == d])[::2])
    out = np.unique(np.concatenate(fold))
    if len(out) == len(ids):  # one sequence per domain
        out = ids[::2]
    return out


def counts_of(data: RoutingData, max_distance: int = 64) -> RoutingCounts:
    """The counts of a RoutingData in memory."""
    x, n_expert = data.experts, data.n_expert
    fold_ids = heldout_folds(data.seq_id, data.domain)
    fc = ff = None
    if fold_ids is not None:
        fold = np.isin(data.seq_id, fold_ids)
        parts = (x[fold], x[~fold])
        fc = tuple(expert_counts(p, n_expert) for p in parts)
        ff = tuple(first_to_set_counts(p, n_expert) for p in parts)
    return RoutingCounts(
        n_expert=n_expert, k=data.k, max_distance=max_distance, n_tokens=data.n_tokens,
        n_sequences=data.n_sequences, counts=expert_counts(x, n_expert),
        first_counts=expert_counts(x, n_expert, first_only=True),
        hist=reuse_histogram(x, data.seq_id, data.pos, max_distance),
        trans=transition_counts(x, n_expert), f2s=first_to_set_counts(x, n_expert),
        fold_counts=fc, fold_f2s=ff,  # type: ignore[arg-type]
        locality=locality_counts(data),
        locality_decode=locality_counts(data.select(data.phase == Phase.DECODE)))


# --- the numbers -------------------------------------------------------------------------


def locality_from_counts(c: LocalityCounts, n_expert: int, k: int) -> LocalitySummary:
    """Keep rates per layer and their baselines (the report's ``locality`` block)."""
    n_layer = len(c.counts)
    if c.n_pairs:
        first, any_ = c.first_hits / c.n_pairs, c.any_hits / c.n_pairs
        overlap = c.overlap_sum / c.n_pairs / k
    else:
        first, any_, overlap = (np.full(n_layer, np.nan) for _ in range(3))
    return LocalitySummary(
        n_pairs=c.n_pairs, first=first, any=any_, overlap=overlap,
        first_uniform=uniform_first_baseline(n_expert),
        any_uniform=uniform_any_baseline(n_expert, k),
        overlap_uniform=k / n_expert,
        first_independent=independent_first_baseline(c.first_counts),
        any_independent=c.any_independent,
        overlap_independent=independent_overlap_baseline(c.counts, c.n_tokens, k),
        first_shuffled=c.first_shuffled,
        any_shuffled=c.any_shuffled,
    )


def heldout_from_counts(c: RoutingCounts) -> HeldoutRecall:
    """Top-k recall of the popularity and previous-layer lookups, 2-fold (see
    :func:`~.routing.heldout_recall`)."""
    n_layer, k = len(c.counts), c.k
    nan = np.full(n_layer, np.nan)
    if c.fold_counts is None or c.fold_f2s is None:
        return HeldoutRecall(popularity=nan, previous_layer=nan.copy())
    counts, f2s = c.fold_counts, c.fold_f2s
    hits_pop = np.zeros(n_layer)
    hits_prev = np.zeros(max(n_layer - 1, 0))
    tot = np.zeros(n_layer)
    for a, b in ((0, 1), (1, 0)):  # fit on a, score on b
        t = counts[b].sum(axis=-1).astype(np.float64)
        hits_pop += np.nan_to_num(lookup_topn_recall(counts[a][:, None, :],
                                                     counts[b][:, None, :], k)) * t
        if n_layer > 1:
            hits_prev += np.nan_to_num(lookup_topn_recall(f2s[a], f2s[b], k)) * t[1:]
        tot += t
    prev = np.concatenate([[np.nan], hits_prev / np.maximum(tot[1:], 1)])
    return HeldoutRecall(popularity=hits_pop / np.maximum(tot, 1), previous_layer=prev)


def summary_from_counts(c: RoutingCounts) -> RoutingSummary:
    """All statistics of one set of tokens (:func:`~.routing.routing_summary`)."""
    n_expert, k, max_distance = c.n_expert, c.k, c.max_distance
    counts, first_counts, hist, trans, f2s = (c.counts, c.first_counts, c.hist, c.trans,
                                              c.f2s)
    shares = usage_shares(counts)
    cdf = reuse_cdf(hist)
    geo = geometric_reuse_cdf(k / n_expert, max_distance)
    h_next = entropy_bits(trans.sum(axis=-2)) if len(trans) else np.zeros(0)
    mi = mutual_information(trans) if len(trans) else np.zeros(0)
    popular_next = (topn_coverage(counts[1:], k) if len(trans) else np.zeros(0))
    return RoutingSummary(
        n_tokens=c.n_tokens,
        n_sequences=c.n_sequences,
        popularity=PopularitySummary(
            counts=counts,
            first_counts=first_counts,
            share=shares,
            share_vs_uniform=shares * n_expert,
            zipf_slope=zipf_slope(counts),
            gini=gini(counts),
            dead=dead_experts(counts),
            hot=hot_experts(counts),
            top_k_coverage=topn_coverage(counts, k),
            max_share_ratio=np.nanmax(shares, axis=-1) * n_expert,
            min_share_ratio=np.nanmin(shares, axis=-1) * n_expert,
            share_noise=math.sqrt(n_expert / max(c.n_tokens * k, 1)),
        ),
        locality=locality_from_counts(c.locality, n_expert, k),
        locality_decode=locality_from_counts(c.locality_decode, n_expert, k),
        reuse=ReuseSummary(
            max_distance=max_distance,
            hist=hist,
            cold_share=usage_shares(hist)[:, 0],
            cdf=cdf,
            within_1=cdf[:, 0],
            within_8=cdf[:, min(8, max_distance) - 1],
            median=median_reuse_distance(hist),
            uniform_cdf=geo,
            uniform_within_1=float(geo[0]),
            uniform_within_8=float(geo[min(8, max_distance) - 1]),
        ),
        cross_layer=CrossLayerSummary(
            transition_counts=trans,
            first_to_set_counts=f2s,
            mi_bits=mi,
            mi_baseline_bits=mi_independence_baseline(trans) if len(trans) else mi,
            h_next_bits=h_next,
            nmi=np.divide(mi, h_next, out=np.zeros_like(mi), where=h_next > 0),
            first_accuracy=conditional_topn_recall(trans, 1) if len(trans) else mi,
            first_accuracy_baseline=(topn_coverage(first_counts[1:], 1) if len(trans)
                                     else mi),
            topk_recall=conditional_topn_recall(f2s, k) if len(trans) else mi,
            topk_recall_baseline=popular_next,
        ),
        heldout_recall=heldout_from_counts(c),
    )


def divergence_from_counts(domains: list[str], counts: dict[str, np.ndarray],
                           halves: dict[str, tuple[np.ndarray, np.ndarray]],
                           n_layer: int) -> DomainDivergence:
    """Per-layer JS divergence between every two domains; the noise floor from the two
    halves (alternate sequences) of each domain that has at least two sequences."""
    pairs = [DomainPair(a=a, b=b, jsd=js_divergence(counts[a], counts[b]))
             for i, a in enumerate(domains) for b in domains[i + 1:]]
    floors = [js_divergence(h0, h1) for h0, h1 in halves.values()]
    floor = np.mean(floors, axis=0) if floors else np.full(n_layer, np.nan)
    return DomainDivergence(domains=domains, pairs=pairs, floor=floor)
