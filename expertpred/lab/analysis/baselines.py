"""What keep rates would be without locality: the uniform, independent and shuffled baselines.

- *uniform*: independent tokens, every expert equally likely;
- *independent*: independent tokens that use experts as often as the whole trace does;
- *shuffled*: the tokens of each sequence in random order (each keeps its own usage).

Pure numpy; shapes as in :mod:`.routing`.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from .popularity import usage_shares

log = logging.getLogger(__name__)

# independent_any_baseline counts every subset of every token's top-k set; above this many
# (token, subset) keys per layer it works on an evenly strided sample of tokens instead.
MAX_SUBSET_KEYS = 20_000_000


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
    return _shuffled(experts, seq_id, int(experts.max()) + 1 if len(experts) else 1)[0]


def shuffled_any_baseline(experts: np.ndarray, seq_id: np.ndarray,
                          n_expert: int) -> np.ndarray:
    """(L,) expected share of consecutive pairs whose top-k sets meet, if every sequence's
    tokens were shuffled: two distinct random tokens of the same sequence (exact, by
    inclusion-exclusion per sequence; weighted like :func:`shuffled_first_baseline`).

    >>> x = np.array([[[0, 1]], [[2, 3]], [[0, 2]]])  # pairs ab: no, ac: yes, bc: yes
    >>> shuffled_any_baseline(x, np.zeros(3, int), 4).round(4)
    array([0.6667])
    """
    return _shuffled(experts, seq_id, n_expert)[1]


def _shuffled(experts: np.ndarray, seq_id: np.ndarray,
              n_expert: int) -> tuple[np.ndarray, np.ndarray]:
    n_layer = experts.shape[1]
    _, seq_rank, n_s = np.unique(seq_id, return_inverse=True, return_counts=True)
    n_pairs = float((n_s - 1).sum())
    if len(experts) == 0 or n_pairs == 0:
        return np.full(n_layer, np.nan), np.full(n_layer, np.nan)
    first_v, any_v = shuffled_per_sequence(experts, seq_rank.reshape(-1), n_s, n_expert)
    return (np.array([first_v[i].sum() for i in range(n_layer)]) / n_pairs,
            np.array([any_v[i].sum() for i in range(n_layer)]) / n_pairs)


def shuffled_per_sequence(experts: np.ndarray, seq_rank: np.ndarray, n_s: np.ndarray,
                          n_expert: int) -> tuple[np.ndarray, np.ndarray]:
    """Each sequence's term of the two shuffled baselines, (L, n_seq) each, in seq order.

    Rows sorted by sequence; ``seq_rank`` (N,) is each row's sequence 0..n_seq-1 and
    ``n_s`` the rows per sequence. The baselines are the per-layer sums over sequences
    divided by the pairs, sum(n_s - 1); the terms of a sequence depend on it alone, so a
    streaming reader adds up the same terms shard by shard.
    """
    n, n_layer, k = experts.shape
    n_seq = len(n_s)
    first_v = np.zeros((n_layer, n_seq))
    any_v = np.zeros((n_layer, n_seq))
    if n == 0:
        return first_v, any_v
    for layer in range(n_layer):
        c = np.bincount(seq_rank * n_expert + experts[:, layer, 0], minlength=n_seq * n_expert)
        c = c.reshape(n_seq, n_expert).astype(np.float64)
        first_v[layer] = (c * (c - 1)).sum(axis=1) / n_s
    # whole sequences per chunk keep every count exact and memory bounded
    per_chunk = max(1, MAX_SUBSET_KEYS // (2 ** k - 1))
    ends = np.cumsum(n_s)
    start_seq = 0
    while start_seq < n_seq:
        lo = int(ends[start_seq - 1]) if start_seq else 0
        stop_seq = max(start_seq + 1,
                       int(np.searchsorted(ends, lo + per_chunk, side="right")))
        hi = int(ends[stop_seq - 1])
        group = seq_rank[lo:hi] - start_seq
        for layer in range(n_layer):
            met = -_containing(experts[lo:hi, layer, :], group, n_expert).sum(axis=0)
            # tokens of the sequence each token meets, itself included: sum - n_s others
            total = np.bincount(group, weights=met, minlength=stop_seq - start_seq)
            ns = n_s[start_seq:stop_seq]
            any_v[layer, start_seq:stop_seq] = (total - ns) / ns
        start_seq = stop_seq
    return first_v, any_v
