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
from typing import Any, NamedTuple

import numpy as np

from ...trace.record import Phase, SequenceTrace

log = logging.getLogger(__name__)

# independent_any_baseline counts every subset of every token's top-k set; above this many
# (token, subset) keys per layer it works on an evenly strided sample of tokens instead.
MAX_SUBSET_KEYS = 20_000_000


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


def expert_counts(experts: np.ndarray, n_expert: int, first_only: bool = False) -> np.ndarray:
    """(L, E) int: how often each expert was selected at each layer (or chosen first).

    >>> x = np.array([[[0, 1]], [[0, 2]], [[1, 0]]])  # N=3 tokens, L=1, k=2
    >>> expert_counts(x, 3)
    array([[3, 2, 1]])
    >>> expert_counts(x, 3, first_only=True)
    array([[2, 1, 0]])
    """
    x = experts[:, :, :1] if first_only else experts
    n_layer = x.shape[1]
    flat = (x.astype(np.int64) + (np.arange(n_layer) * n_expert)[None, :, None]).ravel()
    return np.bincount(flat, minlength=n_layer * n_expert).reshape(n_layer, n_expert)


def usage_shares(counts: np.ndarray) -> np.ndarray:
    """Counts normalised to shares along the last axis (NaN where a row is all zero).

    >>> usage_shares(np.array([[3, 1], [0, 0]]))
    array([[0.75, 0.25],
           [ nan,  nan]])
    """
    c = np.asarray(counts, dtype=np.float64)
    tot = c.sum(axis=-1, keepdims=True)
    return np.divide(c, tot, out=np.full_like(c, np.nan), where=tot > 0)


def zipf_slope(counts: np.ndarray) -> np.ndarray:
    """(L,) slope of log(count) against log(rank) over the used experts of each layer.

    0 is uniform; -1 is Zipf's law; NaN when fewer than two experts were used.

    >>> zipf_slope(np.array([[12, 6, 4, 3], [5, 5, 5, 5], [7, 0, 0, 0]])).round(6)
    array([-1.,  0., nan])
    """
    c = np.atleast_2d(counts)
    out = np.full(len(c), np.nan)
    for i, row in enumerate(c):
        used = np.sort(row[row > 0])[::-1].astype(np.float64)
        if len(used) >= 2:
            rank = np.arange(1, len(used) + 1, dtype=np.float64)
            out[i] = np.polyfit(np.log(rank), np.log(used), 1)[0]
    return out


def gini(counts: np.ndarray) -> np.ndarray:
    """(L,) Gini coefficient of expert usage: 0 uniform, (E-1)/E when one expert takes all.

    >>> gini(np.array([[1, 1, 1, 1], [0, 0, 0, 4]]))
    array([0.  , 0.75])
    """
    c = np.sort(np.atleast_2d(counts).astype(np.float64), axis=-1)
    n = c.shape[-1]
    weight = 2 * np.arange(1, n + 1) - n - 1
    tot = c.sum(axis=-1)
    return np.divide((c * weight).sum(axis=-1), n * tot, out=np.full(len(c), np.nan),
                     where=tot > 0)


def dead_experts(counts: np.ndarray) -> np.ndarray:
    """(L, E) bool: experts never selected at that layer.

    >>> dead_experts(np.array([[3, 0, 1]]))
    array([[False,  True, False]])
    """
    return np.asarray(counts) == 0


def hot_experts(counts: np.ndarray, factor: float = 2.0) -> np.ndarray:
    """(L, E) bool: experts whose share of a layer's selections is >= factor x uniform (1/E).

    >>> hot_experts(np.array([[6, 1, 1, 0]]))
    array([[ True, False, False, False]])
    """
    c = np.asarray(counts)
    return usage_shares(c) >= factor / c.shape[-1]


def topn_coverage(counts: np.ndarray, n: int) -> np.ndarray:
    """(L,) share of selections that went to the n most used experts of each layer.

    With n = k this is the top-k recall of always predicting the most popular experts.

    >>> topn_coverage(np.array([[6, 2, 1, 1]]), 2)
    array([0.8])
    """
    c = np.sort(np.atleast_2d(counts), axis=-1)[:, ::-1]
    return usage_shares(c)[:, :n].sum(axis=-1)


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


def uniform_first_baseline(n_expert: int) -> float:
    """P(two independent uniform tokens share their first choice) = 1/E.

    >>> uniform_first_baseline(8)
    0.125
    """
    return 1.0 / n_expert


def uniform_any_baseline(n_expert: int, k: int) -> float:
    """P(two independent uniform top-k sets share an expert) = 1 - C(E-k, k) / C(E, k).

    >>> round(uniform_any_baseline(8, 2), 4)  # Mixtral: 8 experts, top-2
    0.4643
    """
    return 1.0 - math.comb(n_expert - k, k) / math.comb(n_expert, k)


def independent_first_baseline(first_counts: np.ndarray) -> np.ndarray:
    """(L,) P(two independent tokens share the first choice) given first-choice counts: sum p^2.

    >>> independent_first_baseline(np.array([[1, 1], [3, 1]]))
    array([0.5  , 0.625])
    """
    p = usage_shares(np.atleast_2d(first_counts))
    return (p * p).sum(axis=-1)


def independent_overlap_baseline(counts: np.ndarray, n_tokens: int, k: int) -> np.ndarray:
    """(L,) mean |S & S'| / k of independent tokens with the observed per-expert usage.

    Expert e is in a token's set with probability counts_e / N, so E|S & S'| = sum_e q_e^2.

    >>> independent_overlap_baseline(np.array([[2, 2, 2, 2]]), 4, 2)  # uniform: k / E
    array([0.5])
    """
    q = np.atleast_2d(counts).astype(np.float64) / max(n_tokens, 1)
    return (q * q).sum(axis=-1) / k


def _subset_keys(sets: np.ndarray, cols: np.ndarray, base: int) -> np.ndarray:
    """Distinct int64 key per (sorted) subset: digits expert+1 in base E+1."""
    key = np.zeros(len(sets), dtype=np.int64)
    for j, c in enumerate(cols):
        key += (sets[:, c] + 1) * base ** j
    return key


def _containing(sets: np.ndarray, group: np.ndarray, n_expert: int) -> np.ndarray:
    """(2^k - 1, m) int: for each token and each non-empty subset A of its top-k set, how
    many tokens of the same group have a set that contains A, times (-1)^|A|.

    Summed over A this is the inclusion-exclusion count of tokens of the group whose set
    meets the token's set, negated: sum_A (-1)^|A| c(A) = -(tokens meeting it).
    """
    m, k = sets.shape
    base = n_expert + 1
    n_group = int(group.max()) + 1 if m else 1
    if k * math.log2(base) + math.log2(n_group) > 62:
        raise ValueError(f"E={n_expert}, k={k}, {n_group} groups: keys do not fit in int64")
    sets = np.sort(sets.astype(np.int64), axis=1)
    subsets = [np.array([j for j in range(k) if mask >> j & 1]) for mask in range(1, 2 ** k)]
    keys = np.stack([_subset_keys(sets, cols, base) * n_group + group for cols in subsets])
    _, inv, cnt = np.unique(keys.ravel(), return_inverse=True, return_counts=True)
    signs = np.array([(-1) ** len(c) for c in subsets], dtype=np.int64)[:, None]
    return signs * cnt[inv].reshape(keys.shape)


def independent_any_baseline(experts: np.ndarray, n_expert: int) -> np.ndarray:
    """(L,) P(two independent tokens' top-k sets share an expert), sets drawn from the trace.

    Exact by inclusion-exclusion: P(S' misses S) = sum over A subset of S of
    (-1)^|A| P(A subset of S'), where P(A subset of S') is the share of tokens whose set
    contains A. Pairs are drawn with replacement (a token may meet itself).

    >>> independent_any_baseline(np.array([[[0, 1]], [[2, 3]]]), 4)  # {0,1} vs {2,3}
    array([0.5])
    """
    n, n_layer, k = experts.shape
    if n == 0:
        return np.full(n_layer, np.nan)
    n_sub = 2 ** k - 1
    step = max(1, -(-n * n_sub // MAX_SUBSET_KEYS))
    if step > 1:
        log.info("independent_any_baseline: %d tokens x %d subsets; using every %d-th token",
                 n, n_sub, step)
    out = np.empty(n_layer)
    for layer in range(n_layer):
        sets = experts[::step, layer, :]
        signed = _containing(sets, np.zeros(len(sets), dtype=np.int64), n_expert)
        out[layer] = -signed.sum(axis=0).mean() / len(sets)  # mean share of tokens met
    return out


def shuffled_first_baseline(experts: np.ndarray, seq_id: np.ndarray) -> np.ndarray:
    """(L,) expected first-choice keep rate if every sequence's tokens were shuffled.

    A consecutive pair of a shuffled sequence is a random pair of two of its distinct
    tokens: P(keep) = sum_e c_e (c_e - 1) / (n (n - 1)) for a sequence of n tokens that
    chose e first c_e times, averaged over sequences with weight n - 1 (their pairs).
    The observed rate's excess over this baseline is due to token order; this baseline's
    excess over the independent one is due to each sequence's own working set.

    >>> x = np.array([[[0]], [[0]], [[1]], [[2]], [[2]], [[2]]])  # seq 0: 0 0 1, seq 1: 2 2 2
    >>> shuffled_first_baseline(x, np.array([0, 0, 0, 1, 1, 1])).round(4)  # (1/3*2 + 1*2) / 4
    array([0.6667])
    """
    n, n_layer = experts.shape[:2]
    if n == 0:
        return np.full(n_layer, np.nan)
    _, seq_rank, n_s = np.unique(seq_id, return_inverse=True, return_counts=True)
    n_pairs = float((n_s - 1).sum())
    if n_pairs == 0:
        return np.full(n_layer, np.nan)
    e = int(experts.max()) + 1
    out = np.empty(n_layer)
    for layer in range(n_layer):
        c = np.bincount(seq_rank * e + experts[:, layer, 0], minlength=len(n_s) * e)
        c = c.reshape(len(n_s), e).astype(np.float64)
        out[layer] = ((c * (c - 1)).sum(axis=1) / n_s).sum() / n_pairs
    return out


def shuffled_any_baseline(experts: np.ndarray, seq_id: np.ndarray,
                          n_expert: int) -> np.ndarray:
    """(L,) expected share of consecutive pairs whose top-k sets meet, if every sequence's
    tokens were shuffled: two distinct random tokens of the same sequence (exact, by
    inclusion-exclusion per sequence; weighted like :func:`shuffled_first_baseline`).

    >>> x = np.array([[[0, 1]], [[2, 3]], [[0, 2]]])  # pairs ab: no, ac: yes, bc: yes
    >>> shuffled_any_baseline(x, np.zeros(3, int), 4).round(4)
    array([0.6667])
    """
    n, n_layer, k = experts.shape
    _, seq_rank, n_s = np.unique(seq_id, return_inverse=True, return_counts=True)
    n_pairs = float((n_s - 1).sum())
    if n == 0 or n_pairs == 0:
        return np.full(n_layer, np.nan)
    # whole sequences per chunk keep every count exact and memory bounded
    per_chunk = max(1, MAX_SUBSET_KEYS // (2 ** k - 1))
    ends = np.cumsum(n_s)
    out = np.zeros(n_layer)
    start_seq = 0
    while start_seq < len(n_s):
        lo = int(ends[start_seq - 1]) if start_seq else 0
        stop_seq = max(start_seq + 1,
                       int(np.searchsorted(ends, lo + per_chunk, side="right")))
        hi = int(ends[stop_seq - 1])
        group = seq_rank[lo:hi] - start_seq
        n_tok = n_s[seq_rank[lo:hi]].astype(np.float64)  # length of each token's sequence
        for layer in range(n_layer):
            met = -_containing(experts[lo:hi, layer, :], group, n_expert).sum(axis=0)
            out[layer] += ((met - 1) / n_tok).sum()  # others met, weighted (n-1)/(n(n-1))
        start_seq = stop_seq
    return out / n_pairs


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


def heldout_recall(data: RoutingData) -> dict[str, np.ndarray]:
    """Top-k recall of the two fitted lookup predictors on sequences they were not fitted
    on: 2-fold over alternate sequences of each domain, hits and totals summed over both
    folds.

    ``popularity``: the layer's k most used experts; ``previous_layer``: a table keyed on
    the previous layer's first choice (NaN at layer 0). NaN with fewer than 2 sequences.
    """
    x, n_expert, k, n_layer = data.experts, data.n_expert, data.k, data.n_layer
    ids = np.unique(data.seq_id)
    nan = np.full(n_layer, np.nan)
    if len(ids) < 2:
        return {"popularity": nan, "previous_layer": nan.copy()}
    fold = np.zeros(data.n_tokens, dtype=bool)
    for d in data.domains:  # alternate sequences within each domain: both folds see both
        rows = data.domain == d
        fold |= rows & np.isin(data.seq_id, np.unique(data.seq_id[rows])[::2])
    if fold.all():  # one sequence per domain
        fold = np.isin(data.seq_id, ids[::2])
    parts = [x[fold], x[~fold]]
    counts = [expert_counts(p, n_expert) for p in parts]
    f2s = [first_to_set_counts(p, n_expert) for p in parts]
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
    return {"popularity": hits_pop / np.maximum(tot, 1), "previous_layer": prev}


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


def routing_summary(data: RoutingData, max_distance: int = 64) -> dict[str, Any]:
    """All statistics of one set of tokens, as numpy arrays and numbers (no I/O)."""
    x, n_expert, k = data.experts, data.n_expert, data.k
    counts = expert_counts(x, n_expert)
    first_counts = expert_counts(x, n_expert, first_only=True)
    shares = usage_shares(counts)
    hist = reuse_histogram(x, data.seq_id, data.pos, max_distance)
    cdf = reuse_cdf(hist)
    geo = geometric_reuse_cdf(k / n_expert, max_distance)
    trans = transition_counts(x, n_expert)
    f2s = first_to_set_counts(x, n_expert)
    h_next = entropy_bits(trans.sum(axis=-2)) if len(trans) else np.zeros(0)
    mi = mutual_information(trans) if len(trans) else np.zeros(0)
    popular_next = (topn_coverage(counts[1:], k) if len(trans) else np.zeros(0))
    return {
        "n_tokens": data.n_tokens,
        "n_sequences": data.n_sequences,
        "popularity": {
            "counts": counts,
            "first_counts": first_counts,
            "share": shares,
            "share_vs_uniform": shares * n_expert,  # 1 = exactly uniform
            "zipf_slope": zipf_slope(counts),
            "gini": gini(counts),
            "dead": dead_experts(counts),
            "hot": hot_experts(counts),
            "top_k_coverage": topn_coverage(counts, k),  # uniform: k / E
            "max_share_ratio": np.nanmax(shares, axis=-1) * n_expert,
            "min_share_ratio": np.nanmin(shares, axis=-1) * n_expert,
            # relative standard error of a share under uniform routing: sampling noise
            "share_noise": math.sqrt(n_expert / max(data.n_tokens * k, 1)),
        },
        "locality": locality_summary(data),
        # generated tokens only (the phase a prefetcher serves), with their own baselines
        "locality_decode": locality_summary(data.select(data.phase == Phase.DECODE)),
        "reuse": {
            "max_distance": max_distance,
            "hist": hist,  # columns: cold, d=1..max_distance, > max_distance
            "cold_share": usage_shares(hist)[:, 0],
            "cdf": cdf,
            "within_1": cdf[:, 0],
            "within_8": cdf[:, min(8, max_distance) - 1],
            "median": median_reuse_distance(hist),
            "uniform_cdf": geo,
            "uniform_within_1": float(geo[0]),
            "uniform_within_8": float(geo[min(8, max_distance) - 1]),
        },
        "cross_layer": {
            "transition_counts": trans,  # first choice at l -> first choice at l+1
            "first_to_set_counts": f2s,  # first choice at l -> each of the top-k at l+1
            "mi_bits": mi,
            "mi_baseline_bits": mi_independence_baseline(trans) if len(trans) else mi,
            "h_next_bits": h_next,
            "nmi": np.divide(mi, h_next, out=np.zeros_like(mi), where=h_next > 0),
            "first_accuracy": conditional_topn_recall(trans, 1) if len(trans) else mi,
            "first_accuracy_baseline": (topn_coverage(first_counts[1:], 1) if len(trans)
                                        else mi),
            "topk_recall": conditional_topn_recall(f2s, k) if len(trans) else mi,
            "topk_recall_baseline": popular_next,
        },
        # fitted predictors scored on the other half of the sequences (2-fold)
        "heldout_recall": heldout_recall(data),
    }


def locality_summary(data: RoutingData) -> dict[str, Any]:
    """Keep rates of the consecutive tokens of ``data`` per layer, and their baselines."""
    x, n_expert, k = data.experts, data.n_expert, data.k
    counts = expert_counts(x, n_expert)
    loc = temporal_locality(x, data.pairs)
    return {
        "n_pairs": loc.n_pairs, "first": loc.first, "any": loc.any, "overlap": loc.overlap,
        "first_uniform": uniform_first_baseline(n_expert),
        "any_uniform": uniform_any_baseline(n_expert, k),
        "overlap_uniform": k / n_expert,
        "first_independent": independent_first_baseline(expert_counts(x, n_expert, True)),
        "any_independent": independent_any_baseline(x, n_expert),
        "overlap_independent": independent_overlap_baseline(counts, data.n_tokens, k),
        "first_shuffled": shuffled_first_baseline(x, data.seq_id),
        "any_shuffled": shuffled_any_baseline(x, data.seq_id, n_expert),
    }


def domain_divergence(data: RoutingData) -> dict[str, Any]:
    """Per-layer JS divergence of expert usage between every two domains, and a noise floor:
    the divergence between two halves (alternate sequences) of the same domain."""
    doms = data.domains
    counts = {d: expert_counts(data.experts[data.domain == d], data.n_expert) for d in doms}
    pairs = [{"a": a, "b": b, "jsd": js_divergence(counts[a], counts[b])}
             for i, a in enumerate(doms) for b in doms[i + 1:]]
    floors = []
    for d in doms:
        rows = data.domain == d
        ids = np.unique(data.seq_id[rows])
        if len(ids) < 2:
            continue
        half = np.isin(data.seq_id, ids[::2])
        floors.append(js_divergence(expert_counts(data.experts[rows & half], data.n_expert),
                                    expert_counts(data.experts[rows & ~half], data.n_expert)))
    floor = np.mean(floors, axis=0) if floors else np.full(data.n_layer, np.nan)
    return {"domains": doms, "pairs": pairs, "floor": floor}


def summarize(data: RoutingData, max_distance: int = 64,
              domains: Sequence[str] | None = None) -> dict[str, Any]:
    """Overall statistics, the same per domain, and the domain divergence."""
    doms = list(domains) if domains is not None else data.domains
    return {
        "overall": routing_summary(data, max_distance),
        "by_domain": {d: routing_summary(data.select(data.domain == d), max_distance)
                      for d in doms},
        "divergence": domain_divergence(data),
    }
