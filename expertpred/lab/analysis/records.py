"""The records :func:`routing.summarize` returns: one frozen dataclass per section.

Arrays are per MoE layer (index i = ``model.moe_layers[i]``) unless a comment says
otherwise; cross-layer arrays index adjacent pairs (i, i+1). ``dataclasses.asdict`` of a
:class:`RoutingReport` is the report.json document, so field names and order are that
file's keys and must not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PopularitySummary:
    """How often each expert is selected (``report.json``: ``popularity``)."""

    counts: np.ndarray  # (L, E) int selections per expert, any rank
    first_counts: np.ndarray  # (L, E) int selections as first choice
    share: np.ndarray  # (L, E) share of the layer's selections
    share_vs_uniform: np.ndarray  # (L, E) share x E: 1 = exactly uniform
    zipf_slope: np.ndarray  # (L,) slope of log share vs log rank (Zipf's law: -1)
    gini: np.ndarray  # (L,) 0 = uniform usage
    dead: np.ndarray  # (L, E) bool: never selected
    hot: np.ndarray  # (L, E) bool: >= 2x the uniform share
    top_k_coverage: np.ndarray  # (L,) share taken by the k most used (uniform: k/E)
    max_share_ratio: np.ndarray  # (L,) most used expert's share x E
    min_share_ratio: np.ndarray  # (L,) least used expert's share x E
    share_noise: float  # relative standard error of a share under uniform routing


@dataclass(frozen=True)
class LocalitySummary:
    """Keep rates of consecutive tokens and the three baselines they are read against."""

    n_pairs: int  # consecutive-token pairs the rates rest on
    first: np.ndarray  # (L,) first choice kept by the next token
    any: np.ndarray  # (L,) top-k sets of consecutive tokens share an expert
    overlap: np.ndarray  # (L,) mean shared experts / k (recall of "same as last token")
    first_uniform: float  # uniform routing: 1/E
    any_uniform: float  # uniform routing: 1 - C(E-k, k) / C(E, k)
    overlap_uniform: float  # uniform routing: k/E
    first_independent: np.ndarray  # (L,) independent tokens with the observed popularity
    any_independent: np.ndarray  # (L,) same, for the top-k overlap
    overlap_independent: np.ndarray  # (L,) same, for the mean overlap
    first_shuffled: np.ndarray  # (L,) tokens of each sequence in random order
    any_shuffled: np.ndarray  # (L,) same, for the top-k overlap


@dataclass(frozen=True)
class ReuseSummary:
    """Tokens since a selected expert was last selected in the same sequence."""

    max_distance: int  # longest distance binned on its own
    hist: np.ndarray  # (L, max_distance + 2): cold, d = 1..max_distance, beyond
    cold_share: np.ndarray  # (L,) share of uses that are the first in their sequence
    cdf: np.ndarray  # (L, max_distance) P(d <= x | reused)
    within_1: np.ndarray  # (L,) P(d <= 1 | reused)
    within_8: np.ndarray  # (L,) P(d <= 8 | reused)
    median: np.ndarray  # (L,) median d (inf beyond max_distance, NaN without reuse)
    uniform_cdf: np.ndarray  # (max_distance,) the geometric CDF of uniform routing
    uniform_within_1: float  # its P(d <= 1)
    uniform_within_8: float  # its P(d <= 8)


@dataclass(frozen=True)
class CrossLayerSummary:
    """How much one layer's choice tells about the next layer's (arrays over pairs)."""

    transition_counts: np.ndarray  # (L-1, E, E) first choice at l -> first choice at l+1
    first_to_set_counts: np.ndarray  # (L-1, E, E) first choice at l -> each of top-k at l+1
    mi_bits: np.ndarray  # (L-1,) mutual information of the first choices
    mi_baseline_bits: np.ndarray  # (L-1,) expected MI of independent layers (Miller-Madow)
    h_next_bits: np.ndarray  # (L-1,) entropy of the next layer's first choice
    nmi: np.ndarray  # (L-1,) mi_bits / h_next_bits
    first_accuracy: np.ndarray  # (L-1,) in-sample lookup predicts the next first choice
    first_accuracy_baseline: np.ndarray  # (L-1,) always the next layer's most used expert
    topk_recall: np.ndarray  # (L-1,) in-sample lookup's recall of the next top-k set
    topk_recall_baseline: np.ndarray  # (L-1,) the next layer's k most used experts


@dataclass(frozen=True)
class HeldoutRecall:
    """Top-k recall of the two fitted lookups on sequences they were not fitted on."""

    popularity: np.ndarray  # (L,) the layer's k most used experts; NaN with < 2 sequences
    previous_layer: np.ndarray  # (L,) table on the previous layer's first choice; [0] NaN


@dataclass(frozen=True)
class RoutingSummary:
    """Every statistic of one set of tokens (the whole trace or one domain)."""

    n_tokens: int  # rows analysed
    n_sequences: int  # sequences they belong to
    popularity: PopularitySummary
    locality: LocalitySummary  # all consecutive pairs
    # generated tokens only (the phase a prefetcher serves), with their own baselines
    locality_decode: LocalitySummary
    reuse: ReuseSummary
    cross_layer: CrossLayerSummary
    heldout_recall: HeldoutRecall  # fitted predictors scored on the other half (2-fold)


@dataclass(frozen=True)
class DomainPair:
    """Usage divergence between two domains."""

    a: str  # first domain (sorted order)
    b: str  # second domain
    jsd: np.ndarray  # (L,) Jensen-Shannon divergence in bits (0 same .. 1 disjoint)


@dataclass(frozen=True)
class DomainDivergence:
    """Every two domains' divergence and the noise floor it is read against."""

    domains: list[str]  # sorted domain labels
    pairs: list[DomainPair]  # every two domains, in sorted order
    floor: np.ndarray  # (L,) divergence between two halves of one domain: sampling noise


@dataclass(frozen=True)
class RoutingReport:
    """What :func:`routing.summarize` returns: the report.json numbers."""

    overall: RoutingSummary  # all tokens
    by_domain: dict[str, RoutingSummary]  # the same per domain label
    divergence: DomainDivergence
