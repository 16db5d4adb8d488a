"""Routing statistics of a traced MoE model: popularity, temporal locality, reuse distance,
cross-layer affinity and domain dependence. Pure numpy: arrays in, arrays out, no I/O.

Shapes: ``N`` tokens (rows of a trace, ordered by sequence then position), ``L`` MoE
layers, ``k`` experts per token, ``E`` experts. ``experts`` is an int array ``(N, L, k)``
of the selected experts, best first. A *pair* is two consecutive tokens of one sequence;
``pairs`` is a bool ``(N,)`` mask that is True at row ``t`` when row ``t - 1`` is the
previous token of the same sequence (:func:`consecutive_pairs`), so no statistic ever
spans two sequences.

Every keep rate comes with three baselines:

- *uniform*: independent tokens, every expert equally likely (``1/E`` to keep the first
  choice; ``1 - C(E-k, k) / C(E, k)`` for two top-k sets to share an expert);
- *independent*: independent tokens that use experts as often as the whole trace does
  (what shuffling all tokens of the trace would show). Above *uniform* but at
  *independent* is skewed popularity and nothing else;
- *shuffled*: the tokens of each sequence in random order (each sequence keeps its own
  expert usage). Between *independent* and *shuffled* is a per-sequence working set;
  above *shuffled* is the order of tokens itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ...trace.record import SequenceTrace

# the statistics' building blocks, re-exported: callers and tests reach them through here
from .baselines import (  # noqa: F401
    independent_any_baseline,
    independent_first_baseline,
    independent_overlap_baseline,
    shuffled_any_baseline,
    shuffled_first_baseline,
    uniform_any_baseline,
    uniform_first_baseline,
)
from .popularity import (  # noqa: F401
    dead_experts,
    expert_counts,
    gini,
    hot_experts,
    topn_coverage,
    usage_shares,
    zipf_slope,
)
from .records import (
    DomainDivergence,
    HeldoutRecall,
    LocalitySummary,
    RoutingReport,
    RoutingSummary,
)

log = logging.getLogger(__name__)


# --- the data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingData:
    """The routing columns of a trace that the statistics need, rows sorted by (seq, pos)."""

    experts: np.ndarray  # int (N, L, k), selected experts best first
    seq_id: np.ndarray  # int (N,), sequence of each row
    pos: np.ndarray  # int (N,), token position in its sequence
    phase: np.ndarray  # int8 (N,), Phase values (0 prompt, 1 decode)
    domain: np.ndarray  # str (N,), the sequence's domain label
    n_expert: int  # E: expert ids are 0..E-1

    def __post_init__(self) -> None:
        x = self.experts
        if x.ndim != 3:
            raise ValueError(f"experts has shape {x.shape}, expected (N, L, k)")
        n = len(x)
        for name in ("seq_id", "pos", "phase", "domain"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows, expected {n}")
        if n and (int(x.min()) < 0 or int(x.max()) >= self.n_expert):
            bad = int(x.min()) if int(x.min()) < 0 else int(x.max())
            raise ValueError(f"expert id {bad} out of range, expected 0..{self.n_expert - 1}")
        if n > 1:
            same = self.seq_id[1:] == self.seq_id[:-1]
            ordered = (self.seq_id[1:] > self.seq_id[:-1]) | (same & (self.pos[1:] > self.pos[:-1]))
            if not ordered.all():
                i = int(np.flatnonzero(~ordered)[0]) + 1
                raise ValueError(f"row {i} (seq {self.seq_id[i]}, pos {self.pos[i]}) out of order "
                                 "or duplicated; expected rows sorted by (seq_id, pos)")

    @classmethod
    def from_arrays(cls, experts: np.ndarray, seq_id: np.ndarray, pos: np.ndarray,
                    phase: np.ndarray, domain: np.ndarray, n_expert: int) -> RoutingData:
        """Sort rows by (seq_id, pos) and build the record."""
        seq_id = np.asarray(seq_id, dtype=np.int64)
        pos = np.asarray(pos, dtype=np.int64)
        order = np.lexsort((pos, seq_id))
        return cls(experts=np.asarray(experts)[order], seq_id=seq_id[order], pos=pos[order],
                   phase=np.asarray(phase, dtype=np.int8)[order],
                   domain=np.asarray(domain, dtype=object)[order], n_expert=int(n_expert))

    @classmethod
    def from_sequences(cls, seqs: Iterable[SequenceTrace], n_expert: int) -> RoutingData:
        """Concatenate SequenceTraces (positions 0..T-1 each)."""
        seqs = list(seqs)
        if not seqs:
            raise ValueError("no sequences")
        return cls.from_arrays(
            experts=np.concatenate([s.experts for s in seqs]),
            seq_id=np.concatenate([np.full(s.n_tokens, s.seq_id) for s in seqs]),
            pos=np.concatenate([np.arange(s.n_tokens) for s in seqs]),
            phase=np.concatenate([s.phase for s in seqs]),
            domain=np.concatenate([np.full(s.n_tokens, s.domain, dtype=object) for s in seqs]),
            n_expert=n_expert)

    @property
    def n_tokens(self) -> int:
        return int(len(self.experts))

    @property
    def n_layer(self) -> int:
        return int(self.experts.shape[1])

    @property
    def k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def n_sequences(self) -> int:
        return int(len(np.unique(self.seq_id)))

    @property
    def pairs(self) -> np.ndarray:
        return consecutive_pairs(self.seq_id, self.pos)

    @property
    def domains(self) -> list[str]:
        return sorted({str(d) for d in self.domain})

    def select(self, mask: np.ndarray) -> RoutingData:
        """The rows where ``mask`` is True (keeps order; use whole sequences)."""
        return RoutingData(experts=self.experts[mask], seq_id=self.seq_id[mask],
                           pos=self.pos[mask], phase=self.phase[mask],
                           domain=self.domain[mask], n_expert=self.n_expert)


def consecutive_pairs(seq_id: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """True at row t when row t-1 is the previous token of the same sequence.

    >>> consecutive_pairs(np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 1]))
    array([False,  True,  True, False,  True])
    """
    out = np.zeros(len(seq_id), dtype=bool)
    out[1:] = (seq_id[1:] == seq_id[:-1]) & (pos[1:] == pos[:-1] + 1)
    return out


# --- popularity ----------------------------------------------------------------------


# --- temporal locality ---------------------------------------------------------------


class Locality(NamedTuple):
    """Per-layer rates over consecutive token pairs (Mixtral paper, Table 5)."""

    first: np.ndarray  # (L,) P(token t's first choice == token t-1's first choice)
    any: np.ndarray  # (L,) P(top-k sets of t and t-1 share at least one expert)
    overlap: np.ndarray  # (L,) mean |S_t & S_t-1| / k: top-k recall of "same as last token"
    n_pairs: int


def overlap_counts(a: np.ndarray, b: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """(P, L) int: |a_i & b_i| of top-k sets (P, L, k) without repeats inside a set.

    >>> overlap_counts(np.array([[[0, 1]], [[2, 3]]]), np.array([[[1, 0]], [[3, 5]]]))
    array([[2],
           [1]])
    """
    out = np.empty(a.shape[:2], dtype=np.int64)
    for i in range(0, len(a), chunk):
        x, y = a[i:i + chunk], b[i:i + chunk]
        out[i:i + chunk] = (x[..., :, None] == y[..., None, :]).sum(axis=(-1, -2))
    return out


def temporal_locality(experts: np.ndarray, pairs: np.ndarray) -> Locality:
    """Keep rates of consecutive tokens per layer (NaN when there are no pairs).

    >>> x = np.array([[[0, 1]], [[0, 2]], [[2, 3]], [[3, 1]]])  # one layer, k=2
    >>> loc = temporal_locality(x, np.array([False, True, True, True]))
    >>> loc.first.round(4), loc.any, loc.overlap, loc.n_pairs
    (array([0.3333]), array([1.]), array([0.5]), 3)
    """
    idx = np.flatnonzero(pairs)
    n_layer, k = experts.shape[1], experts.shape[2]
    if len(idx) == 0:
        nan = np.full(n_layer, np.nan)
        return Locality(nan, nan.copy(), nan.copy(), 0)
    prev, cur = experts[idx - 1], experts[idx]
    first = (prev[:, :, 0] == cur[:, :, 0]).mean(axis=0)
    ov = overlap_counts(prev, cur)
    return Locality(first=first, any=(ov > 0).mean(axis=0), overlap=ov.mean(axis=0) / k,
                    n_pairs=int(len(idx)))


# --- reuse distance ------------------------------------------------------------------


def reuse_histogram(experts: np.ndarray, seq_id: np.ndarray, pos: np.ndarray,
                    max_distance: int = 64) -> np.ndarray:
    """(L, max_distance + 2) int: tokens since each selected expert was last selected.

    Column 0 counts first uses in a sequence (no earlier use: a cold miss); column d,
    1 <= d <= max_distance, reuses d tokens after the previous use; the last column
    reuses more than max_distance tokens later.

    >>> x = np.array([[[0]], [[1]], [[0]], [[0]]])  # one layer, k=1: experts 0, 1, 0, 0
    >>> reuse_histogram(x, np.zeros(4, int), np.arange(4), max_distance=2)
    array([[2, 1, 1, 0]])
    """
    n, n_layer, k = experts.shape
    width = max_distance + 2
    if n == 0:
        return np.zeros((n_layer, width), dtype=np.int64)
    # one stable sort by (layer, sequence, expert) keeps each group in row (= pos) order
    _, seq_rank = np.unique(seq_id, return_inverse=True)
    n_seq = int(seq_rank.max()) + 1
    row = np.repeat(np.arange(n), n_layer * k)
    layer = np.tile(np.repeat(np.arange(n_layer, dtype=np.int64), k), n)
    width_e = int(experts.max()) + 1
    group = (layer * n_seq + seq_rank[row]) * width_e + experts.reshape(-1)
    order = np.argsort(group, kind="stable")
    group, layer, p = group[order], layer[order], np.asarray(pos)[row[order]]
    same = np.zeros(len(order), dtype=bool)
    same[1:] = group[1:] == group[:-1]
    dist = np.zeros(len(order), dtype=np.int64)
    dist[1:] = p[1:] - p[:-1]
    bucket = np.where(same, np.minimum(dist, max_distance + 1), 0)
    return np.bincount(layer * width + bucket, minlength=n_layer * width).reshape(n_layer, width)


def reuse_cdf(hist: np.ndarray) -> np.ndarray:
    """(L, max_distance) P(reuse distance <= d | the expert was used before in the sequence).

    >>> reuse_cdf(np.array([[5, 2, 1, 1]]))  # 2 at d=1, 1 at d=2, 1 beyond
    array([[0.5 , 0.75]])
    """
    reused = np.asarray(hist, dtype=np.float64)[:, 1:]
    tot = reused.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(reused[:, :-1], axis=-1)
    return np.divide(cdf, tot, out=np.full_like(cdf, np.nan), where=tot > 0)


def geometric_reuse_cdf(p: float, max_distance: int) -> np.ndarray:
    """(max_distance,) reuse-distance CDF when an expert is picked with probability p per
    token independently (uniform routing: p = k/E): 1 - (1 - p)^d.

    >>> geometric_reuse_cdf(0.5, 3)
    array([0.5  , 0.75 , 0.875])
    """
    d = np.arange(1, max_distance + 1)
    return 1.0 - (1.0 - p) ** d


def median_reuse_distance(hist: np.ndarray) -> np.ndarray:
    """(L,) median reuse distance in tokens (inf when beyond max_distance, NaN if no reuse).

    >>> median_reuse_distance(np.array([[5, 2, 1, 1], [1, 0, 0, 3], [4, 0, 0, 0]]))
    array([ 1., inf, nan])
    """
    cdf = reuse_cdf(hist)
    out = np.full(len(cdf), np.nan)
    for i, row in enumerate(cdf):
        if np.isnan(row).all():
            continue
        hit = np.flatnonzero(row >= 0.5)
        out[i] = hit[0] + 1 if len(hit) else np.inf
    return out


# --- cross-layer affinity ------------------------------------------------------------


def transition_counts(experts: np.ndarray, n_expert: int) -> np.ndarray:
    """(L-1, E, E) int: [l, i, j] = tokens choosing i first at layer l and j first at l+1.

    >>> transition_counts(np.array([[[0], [1]], [[0], [1]], [[1], [0]]]), 2)
    array([[[0, 2],
            [1, 0]]])
    """
    n_layer = experts.shape[1]
    first = experts[:, :, 0].astype(np.int64)
    out = np.zeros((max(n_layer - 1, 0), n_expert, n_expert), dtype=np.int64)
    for layer in range(n_layer - 1):
        flat = first[:, layer] * n_expert + first[:, layer + 1]
        out[layer] = np.bincount(flat, minlength=n_expert * n_expert).reshape(n_expert, n_expert)
    return out


def first_to_set_counts(experts: np.ndarray, n_expert: int) -> np.ndarray:
    """(L-1, E, E) int: [l, i, j] = tokens choosing i first at l with j in the top-k at l+1.

    >>> first_to_set_counts(np.array([[[0, 1], [1, 2]], [[0, 2], [2, 0]]]), 3)
    array([[[1, 1, 2],
            [0, 0, 0],
            [0, 0, 0]]])
    """
    n_layer = experts.shape[1]
    x = experts.astype(np.int64)
    out = np.zeros((max(n_layer - 1, 0), n_expert, n_expert), dtype=np.int64)
    for layer in range(n_layer - 1):
        flat = (x[:, layer, :1] * n_expert + x[:, layer + 1, :]).ravel()
        out[layer] = np.bincount(flat, minlength=n_expert * n_expert).reshape(n_expert, n_expert)
    return out


def transition_matrix(counts: np.ndarray) -> np.ndarray:
    """Row-normalised counts: P(expert j at l+1 | expert i at l); NaN rows for unused i.

    >>> transition_matrix(np.array([[0, 2], [1, 1]]))
    array([[0. , 1. ],
           [0.5, 0.5]])
    """
    return usage_shares(counts)


def entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of the distribution(s) along the last axis.

    >>> entropy_bits(np.array([[1, 1, 1, 1], [4, 0, 0, 0]]))
    array([2., 0.])
    """
    p = usage_shares(np.asarray(counts))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(axis=-1) + 0.0


def mutual_information(joint: np.ndarray) -> np.ndarray:
    """Plug-in mutual information in bits of joint count table(s) (..., X, Y).

    >>> float(mutual_information(np.array([[5, 0], [0, 5]])))
    1.0
    >>> mutual_information(np.array([[[5, 5], [5, 5]], [[9, 0], [1, 0]]]))
    array([0., 0.])
    """
    j = np.asarray(joint, dtype=np.float64)
    hx = entropy_bits(j.sum(axis=-1))
    hy = entropy_bits(j.sum(axis=-2))
    hxy = entropy_bits(j.reshape(*j.shape[:-2], -1))
    return np.maximum(hx + hy - hxy, 0.0)


def mi_independence_baseline(joint: np.ndarray) -> np.ndarray:
    """Expected plug-in MI (bits) of *independent* variables with the same sample size and
    support: the Miller-Madow bias (r - 1)(c - 1) / (2 N ln 2).

    >>> round(float(mi_independence_baseline(np.full((8, 8), 10))), 4)  # 640 samples, 8 x 8
    0.0552
    """
    j = np.asarray(joint, dtype=np.float64)
    r = (j.sum(axis=-1) > 0).sum(axis=-1)
    c = (j.sum(axis=-2) > 0).sum(axis=-1)
    n = j.sum(axis=(-1, -2))
    return np.divide((r - 1) * (c - 1), 2 * n * math.log(2), out=np.zeros(np.shape(n)),
                     where=n > 0)


def conditional_topn_recall(joint: np.ndarray, n: int) -> np.ndarray:
    """Recall of predicting, for each row value i, the n columns seen most often with it.

    For :func:`first_to_set_counts` and n = k: the share of layer l+1's selected experts
    caught by a lookup table keyed on layer l's first choice (in-sample, optimistic).

    >>> float(conditional_topn_recall(np.array([[3, 1, 0], [0, 1, 3]]), 1))
    0.75
    """
    j = np.asarray(joint, dtype=np.float64)
    top = np.sort(j, axis=-1)[..., ::-1][..., :n].sum(axis=(-1, -2))
    tot = j.sum(axis=(-1, -2))
    return np.divide(top, tot, out=np.full(np.shape(tot), np.nan), where=tot > 0)


def lookup_topn_recall(train: np.ndarray, test: np.ndarray, n: int) -> np.ndarray:
    """Held-out recall of a lookup table: for each row value i, predict the n columns seen
    most often with i in ``train`` (the n most frequent columns overall when i was never
    seen) and score on the counts of ``test``. Arrays (..., X, Y).

    >>> train = np.array([[3, 1, 0], [0, 0, 0]])  # row 1 unseen in training
    >>> float(lookup_topn_recall(train, np.array([[2, 2, 0], [0, 1, 3]]), 1))
    0.25
    """
    tr = np.asarray(train, dtype=np.float64)
    te = np.asarray(test, dtype=np.float64)
    fallback = np.broadcast_to(tr.sum(axis=-2, keepdims=True), tr.shape)
    seen = tr.sum(axis=-1, keepdims=True) > 0
    table = np.where(seen, tr, fallback)
    # stable ranking: ties go to the lower column id, identical in every run
    top = np.argsort(-table, axis=-1, kind="stable")[..., :n]
    hit = np.take_along_axis(te, top, axis=-1).sum(axis=(-1, -2))
    tot = te.sum(axis=(-1, -2))
    return np.divide(hit, tot, out=np.full(np.shape(tot), np.nan), where=tot > 0)


def heldout_recall(data: RoutingData) -> HeldoutRecall:
    """Top-k recall of the two fitted lookup predictors on sequences they were not fitted
    on: 2-fold over alternate sequences of each domain, hits and totals summed over both
    folds.

    ``popularity``: the layer's k most used experts; ``previous_layer``: a table keyed on
    the previous layer's first choice (NaN at layer 0). NaN with fewer than 2 sequences.
    """
    from .summary import counts_of, heldout_from_counts

    return heldout_from_counts(counts_of(data))


# --- domains -------------------------------------------------------------------------


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits (0 same .. 1 disjoint) of count or probability
    vectors along the last axis.

    >>> float(js_divergence(np.array([1, 0]), np.array([0, 1])))
    1.0
    >>> js_divergence(np.array([[1, 1], [1, 3]]), np.array([[2, 2], [1, 3]]))
    array([0., 0.])
    """
    pp, qq = usage_shares(np.asarray(p)), usage_shares(np.asarray(q))
    m = 0.5 * (pp + qq)
    return np.maximum(entropy_bits(m) - 0.5 * (entropy_bits(pp) + entropy_bits(qq)), 0.0)


# --- everything at once --------------------------------------------------------------


def routing_summary(data: RoutingData, max_distance: int = 64) -> RoutingSummary:
    """All statistics of one set of tokens, as numpy arrays and numbers (no I/O): assembled
    from additive counts (:mod:`.summary`), as the streaming analysis assembles them."""
    from .summary import counts_of, summary_from_counts

    return summary_from_counts(counts_of(data, max_distance))


def locality_summary(data: RoutingData) -> LocalitySummary:
    """Keep rates of the consecutive tokens of ``data`` per layer, and their baselines."""
    from .summary import locality_counts, locality_from_counts

    return locality_from_counts(locality_counts(data), data.n_expert, data.k)


def domain_halves(seq_id: np.ndarray, domain: np.ndarray,
                  doms: Sequence[str]) -> dict[str, np.ndarray]:
    """Per domain with at least two sequences: the ids of its first half (alternate
    sequences), the noise floor of :func:`domain_divergence`."""
    out = {}
    for d in doms:
        ids = np.unique(seq_id[domain == d])
        if len(ids) >= 2:
            out[d] = ids[::2]
    return out


def domain_divergence(data: RoutingData) -> DomainDivergence:
    """Per-layer JS divergence of expert usage between every two domains, and a noise floor:
    the divergence between two halves (alternate sequences) of the same domain."""
    from .summary import divergence_from_counts

    doms = data.domains
    counts = {d: expert_counts(data.experts[data.domain == d], data.n_expert) for d in doms}
    halves = {}
    for d, first in domain_halves(data.seq_id, data.domain, doms).items():
        rows = data.domain == d
        half = np.isin(data.seq_id, first)
        halves[d] = (expert_counts(data.experts[rows & half], data.n_expert),
                     expert_counts(data.experts[rows & ~half], data.n_expert))
    return divergence_from_counts(doms, counts, halves, data.n_layer)


def summarize(data: RoutingData, max_distance: int = 64,
              domains: Sequence[str] | None = None) -> RoutingReport:
    """Overall statistics, the same per domain, and the domain divergence."""
    doms = list(domains) if domains is not None else data.domains
    return RoutingReport(
        overall=routing_summary(data, max_distance),
        by_domain={d: routing_summary(data.select(data.domain == d), max_distance)
                   for d in doms},
        divergence=domain_divergence(data),
    )
