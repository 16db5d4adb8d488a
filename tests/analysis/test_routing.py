"""Routing statistics on hand-made sequences whose answers are known."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from expertpred.lab.analysis import baselines
from expertpred.lab.analysis import routing as r
from expertpred.lab.analysis.routing import RoutingData

from .synth import make_sequence, random_sets, sticky_sets


def data_of(experts: np.ndarray, n_expert: int, seq_len: int | None = None,
            domain: str = "code") -> RoutingData:
    """RoutingData of (N, L, k) experts cut into sequences of seq_len tokens."""
    n = len(experts)
    seq_len = seq_len or n
    idx = np.arange(n)
    return RoutingData.from_arrays(experts, idx // seq_len, idx % seq_len,
                                   np.ones(n, np.int8), np.full(n, domain), n_expert)


# --- popularity ----------------------------------------------------------------------


@pytest.mark.parametrize("counts, slope, gini", [
    ([10, 10, 10, 10], 0.0, 0.0),
    ([12, 6, 4, 3], -1.0, None),  # Zipf's law
    ([0, 0, 0, 8], math.nan, 0.75),  # one expert takes everything
    ([60, 30, 20, 15, 12, 10], -1.0, None),
])
def test_zipf_and_gini(counts: list[int], slope: float, gini: float | None) -> None:
    c = np.array([counts])
    np.testing.assert_allclose(r.zipf_slope(c), [slope], atol=1e-9)
    g = r.gini(c)[0]
    assert 0 <= g < 1
    if gini is not None:
        assert g == pytest.approx(gini)


def test_counts_dead_hot_coverage() -> None:
    x = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 1]], [[0, 1], [2, 0]]])  # N=3, L=2, k=2
    c = r.expert_counts(x, 5)
    np.testing.assert_array_equal(c, [[3, 2, 1, 0, 0], [1, 1, 3, 1, 0]])
    np.testing.assert_array_equal(r.expert_counts(x, 5, first_only=True),
                                  [[3, 0, 0, 0, 0], [0, 0, 3, 0, 0]])
    np.testing.assert_array_equal(r.dead_experts(c)[:, 3:], [[True, True], [False, True]])
    assert r.hot_experts(c).sum(axis=1).tolist() == [1, 1]  # share >= 2/5
    np.testing.assert_allclose(r.topn_coverage(c, 2), [5 / 6, 4 / 6])


# --- temporal locality ---------------------------------------------------------------


def test_always_keeping_the_expert_gives_locality_one() -> None:
    x = np.tile(np.array([[[3, 1], [0, 2]]]), (50, 1, 1))  # same experts for 50 tokens
    loc = r.temporal_locality(x, data_of(x, 4).pairs)
    np.testing.assert_array_equal(loc.first, [1.0, 1.0])
    np.testing.assert_array_equal(loc.any, [1.0, 1.0])
    np.testing.assert_array_equal(loc.overlap, [1.0, 1.0])
    assert loc.n_pairs == 49


def test_swapped_rank_keeps_set_but_not_first_choice() -> None:
    x = np.array([[[0, 1]], [[1, 0]]] * 10)
    loc = r.temporal_locality(x, data_of(x, 4).pairs)
    assert loc.first[0] == 0.0 and loc.any[0] == 1.0 and loc.overlap[0] == 1.0


def test_pairs_never_cross_sequences() -> None:
    # each 10-token sequence keeps one expert, the next sequence uses another one
    x = np.repeat(np.arange(6), 10).reshape(60, 1, 1)
    d = data_of(x, 6, seq_len=10)
    assert d.pairs.sum() == 54
    assert r.temporal_locality(x, d.pairs).first[0] == 1.0
    gap = d.pos.copy()
    gap[5:10] += 1  # a missing position inside sequence 0 breaks one pair
    assert r.consecutive_pairs(d.seq_id, gap).sum() == 53


def test_uniform_random_routing_is_near_the_baselines() -> None:
    rng = np.random.default_rng(0)
    e, k = 8, 2
    x = random_sets(rng, 8000, 2, e, k)
    d = data_of(x, e, seq_len=100)
    s = r.routing_summary(d)
    loc = s.locality
    assert loc.first_uniform == 1 / 8
    assert loc.any_uniform == pytest.approx(1 - 15 / 28)
    np.testing.assert_allclose(loc.first, 1 / 8, atol=0.02)
    np.testing.assert_allclose(loc.any, 1 - 15 / 28, atol=0.03)
    np.testing.assert_allclose(loc.overlap, k / e, atol=0.02)
    for key in ("first", "any", "overlap"):  # same popularity as uniform: baselines agree
        np.testing.assert_allclose(getattr(loc, f"{key}_independent"),
                                   getattr(loc, f"{key}_uniform"), atol=0.01)
    np.testing.assert_allclose(s.reuse.within_1, k / e, atol=0.02)
    assert np.all(s.popularity.gini < 0.05)
    assert not s.popularity.dead.any()


def test_sticky_routing_beats_the_independent_baseline() -> None:
    rng = np.random.default_rng(1)
    x = sticky_sets(rng, 4000, 2, 8, 2, keep=0.5)
    loc = r.routing_summary(data_of(x, 8, seq_len=200)).locality
    # keep with p=0.5, otherwise a fresh uniform draw: 0.5 + 0.5/8
    np.testing.assert_allclose(loc.first, 0.5 + 0.5 / 8, atol=0.03)
    assert np.all(loc.first > loc.first_independent + 0.3)


@pytest.mark.parametrize("e, k", [(4, 1), (8, 2), (6, 3), (32, 4)])
def test_uniform_any_baseline_counts_disjoint_pairs(e: int, k: int) -> None:
    sets = [set(c) for c in itertools.combinations(range(e), k)]
    brute = np.mean([[bool(a & b) for b in sets] for a in sets]) if e <= 8 else None
    got = r.uniform_any_baseline(e, k)
    if brute is not None:
        assert got == pytest.approx(brute)
    assert k / e <= got <= 1  # at least the per-expert overlap probability


@pytest.mark.parametrize("k, skewed", [(1, False), (2, True), (3, True), (4, False)])
def test_independent_any_baseline_matches_brute_force(k: int, skewed: bool) -> None:
    rng = np.random.default_rng(k)
    e = 9
    p = np.arange(1, e + 1, dtype=np.float64) ** 2 if skewed else np.ones(e)
    x = random_sets(rng, 150, 2, e, k, p / p.sum())
    for layer in range(2):
        sets = [set(s.tolist()) for s in x[:, layer]]
        brute = np.mean([[bool(a & b) for b in sets] for a in sets])
        assert r.independent_any_baseline(x, e)[layer] == pytest.approx(brute)


def test_independent_first_and_overlap_baselines() -> None:
    x = np.array([[[0, 1]], [[0, 2]], [[0, 1]], [[3, 1]]])
    counts = r.expert_counts(x, 4)
    first = r.expert_counts(x, 4, first_only=True)
    assert r.independent_first_baseline(first)[0] == pytest.approx((3 / 4) ** 2 + (1 / 4) ** 2)
    brute = np.mean([[len(set(a) & set(b)) / 2 for b in x[:, 0]] for a in x[:, 0]])
    assert r.independent_overlap_baseline(counts, 4, 2)[0] == pytest.approx(brute)


def test_no_pairs_gives_nan_not_an_error() -> None:
    x = np.array([[[0, 1]], [[1, 2]], [[2, 3]]])
    d = data_of(x, 4, seq_len=1)  # three one-token sequences
    s = r.routing_summary(d)
    assert s.locality.n_pairs == 0
    assert np.isnan(s.locality.first).all()
    assert s.reuse.hist[:, 0].tolist() == [6]  # every use is cold
    assert np.isnan(s.reuse.median).all()


# --- reuse distance ------------------------------------------------------------------


def test_reuse_histogram_by_hand() -> None:
    # sequence 0: experts 0 0 1 0 ; sequence 1: 0 1 ; max_distance 2
    x = np.array([0, 0, 1, 0, 0, 1]).reshape(6, 1, 1)
    d = data_of(x, 2, seq_len=4)
    h = r.reuse_histogram(x, d.seq_id, d.pos, max_distance=2)
    # cold: seq0 t0 (0), t2 (1); seq1 t0 (0), t1 (1) -> 4; d=1: seq0 t1; d=2: seq0 t3
    np.testing.assert_array_equal(h, [[4, 1, 1, 0]])
    h1 = r.reuse_histogram(x, d.seq_id, d.pos, max_distance=1)
    np.testing.assert_array_equal(h1, [[4, 1, 1]])  # d=2 falls in "beyond"


def test_reuse_of_an_always_used_expert_is_distance_one() -> None:
    x = np.tile(np.array([[[2, 0]]]), (20, 1, 1))
    d = data_of(x, 3)
    s = r.routing_summary(d, max_distance=16)
    assert s.reuse.hist[0, 0] == 2 and s.reuse.hist[0, 1] == 38
    assert s.reuse.within_1[0] == 1.0 and s.reuse.median[0] == 1


def test_uniform_reuse_distance_is_geometric() -> None:
    rng = np.random.default_rng(2)
    x = random_sets(rng, 6000, 1, 8, 2)
    d = data_of(x, 8, seq_len=2000)
    h = r.reuse_histogram(x, d.seq_id, d.pos, max_distance=16)
    np.testing.assert_allclose(r.reuse_cdf(h)[0], r.geometric_reuse_cdf(0.25, 16), atol=0.02)


# --- cross-layer ---------------------------------------------------------------------


def test_deterministic_next_layer_has_full_mutual_information() -> None:
    rng = np.random.default_rng(3)
    first = rng.integers(0, 4, 2000)
    x = np.stack([first, (first + 1) % 4], axis=1)[:, :, None]  # layer 1 = layer 0 + 1
    t = r.transition_counts(x, 4)
    p = r.transition_matrix(t[0])
    np.testing.assert_allclose(p, np.roll(np.eye(4), 1, axis=1))
    mi = r.mutual_information(t)[0]
    assert mi == pytest.approx(r.entropy_bits(t[0].sum(axis=0)))
    assert mi == pytest.approx(2.0, abs=0.01)
    assert r.conditional_topn_recall(t, 1)[0] == 1.0


def test_independent_layers_have_mi_near_the_baseline() -> None:
    rng = np.random.default_rng(4)
    x = rng.integers(0, 8, (4000, 2, 1))
    t = r.transition_counts(x, 8)
    mi, base = r.mutual_information(t)[0], r.mi_independence_baseline(t)[0]
    assert base == pytest.approx(49 / (2 * 4000 * math.log(2)))
    assert 0 <= mi < 3 * base


def test_first_to_set_recall() -> None:
    # layer 1's set is always {layer-0 first, 3}: a lookup on layer 0 recalls everything
    first = np.array([0, 1, 2, 0, 1, 2])
    x = np.stack([np.stack([first, (first + 1) % 4], 1), np.stack([first, np.full(6, 3)], 1)],
                 axis=1)
    f2s = r.first_to_set_counts(x, 4)
    assert f2s[0].sum() == 12
    assert r.conditional_topn_recall(f2s, 2)[0] == 1.0


# --- domains -------------------------------------------------------------------------


def test_js_divergence_bounds() -> None:
    assert float(r.js_divergence(np.array([3, 0]), np.array([0, 5]))) == 1.0
    assert float(r.js_divergence(np.array([1, 2, 3]), np.array([2, 4, 6]))) == 0.0
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.1, 0.3, 0.6])
    assert float(r.js_divergence(p, q)) == pytest.approx(float(r.js_divergence(q, p)))
    assert 0 < float(r.js_divergence(p, q)) < 1


def test_domain_divergence_and_per_domain_summaries() -> None:
    rng = np.random.default_rng(5)
    code = [make_sequence(random_sets(rng, 40, 2, 8, 2, np.r_[np.ones(4), np.zeros(4)] / 4),
                          i, "code") for i in range(6)]
    prose = [make_sequence(random_sets(rng, 40, 2, 8, 2, np.r_[np.zeros(4), np.ones(4)] / 4),
                           i + 6, "prose") for i in range(6)]
    d = RoutingData.from_sequences(code + prose, 8)
    assert d.domains == ["code", "prose"] and d.n_sequences == 12
    s = r.summarize(d, max_distance=16)
    (pair,) = s.divergence.pairs
    np.testing.assert_allclose(pair.jsd, 1.0)  # disjoint experts
    assert np.all(s.divergence.floor < 0.05)
    assert s.by_domain["code"].popularity.dead[:, 4:].all()
    assert s.by_domain["code"].n_tokens == 240


# --- the record ----------------------------------------------------------------------


def test_routing_data_sorts_and_validates() -> None:
    x = np.array([[[1]], [[0]], [[2]]])
    d = RoutingData.from_arrays(x, np.array([1, 0, 0]), np.array([0, 1, 0]),
                                np.zeros(3), np.array(["a", "b", "b"]), 3)
    assert d.experts[:, 0, 0].tolist() == [2, 0, 1] and d.pairs.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="expert id 3 out of range"):
        RoutingData.from_arrays(x + 1, np.zeros(3), np.arange(3), np.zeros(3),
                                np.full(3, "a"), 3)
    with pytest.raises(ValueError, match="out of order or duplicated"):
        RoutingData.from_arrays(x, np.zeros(3), np.zeros(3), np.zeros(3), np.full(3, "a"), 3)
    with pytest.raises(ValueError, match="expected .N, L, k."):
        RoutingData(x[:, 0], np.zeros(3), np.arange(3), np.zeros(3), np.full(3, "a"), 3)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shuffled_baselines_match_brute_force(k: int) -> None:
    rng = np.random.default_rng(10 + k)
    lengths = [1, 2, 7, 30, 12]
    x = np.concatenate([sticky_sets(rng, t, 2, 6, k, keep=0.4) for t in lengths])
    seq = np.repeat(np.arange(len(lengths)), lengths)
    for layer in range(2):
        first_num = any_num = 0.0
        for s in range(len(lengths)):
            sets = [set(v.tolist()) for v in x[seq == s, layer]]
            firsts = x[seq == s, layer, 0]
            n = len(sets)
            if n < 2:
                continue
            pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
            # weight n - 1 (pairs in the sequence) x mean over distinct ordered pairs
            first_num += (n - 1) * np.mean([firsts[i] == firsts[j] for i, j in pairs])
            any_num += (n - 1) * np.mean([bool(sets[i] & sets[j]) for i, j in pairs])
        n_pairs = sum(t - 1 for t in lengths)
        assert r.shuffled_first_baseline(x, seq)[layer] == pytest.approx(first_num / n_pairs)
        assert r.shuffled_any_baseline(x, seq, 6)[layer] == pytest.approx(any_num / n_pairs)


def test_shuffled_any_baseline_is_exact_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(20)
    x = sticky_sets(rng, 400, 1, 8, 2, keep=0.5)
    seq = np.repeat(np.arange(8), 50)
    whole = r.shuffled_any_baseline(x, seq, 8)
    monkeypatch.setattr(baselines, "MAX_SUBSET_KEYS", 120)  # 40 tokens per chunk: one sequence each
    np.testing.assert_allclose(r.shuffled_any_baseline(x, seq, 8), whole)


def test_shuffled_baseline_separates_working_set_from_order() -> None:
    # each sequence uses its own two experts, in random order: working set, no order
    rng = np.random.default_rng(21)
    x = np.concatenate([rng.choice([2 * s, 2 * s + 1], 200) for s in range(4)]).reshape(-1, 1, 1)
    d = data_of(x, 8, seq_len=200)
    loc = r.routing_summary(d).locality
    assert loc.first_independent[0] == pytest.approx(1 / 8, abs=0.01)
    assert loc.first_shuffled[0] == pytest.approx(0.5, abs=0.03)
    assert loc.first[0] == pytest.approx(loc.first_shuffled[0], abs=0.05)


def test_heldout_recall() -> None:
    rng = np.random.default_rng(30)
    # layer 1's set is a fixed function of layer 0's first choice; popularity is skewed
    first = rng.choice(4, 600, p=[0.7, 0.1, 0.1, 0.1])
    x = np.stack([np.stack([first, (first + 1) % 4], 1),
                  np.stack([(first + 2) % 4, (first + 3) % 4], 1)], axis=1)
    held = r.heldout_recall(data_of(x, 4, seq_len=50))
    assert np.isnan(held.previous_layer[0]) and held.previous_layer[1] == 1.0
    counts = r.expert_counts(x, 4)
    np.testing.assert_allclose(held.popularity, r.topn_coverage(counts, 2), atol=0.05)
    one = r.heldout_recall(data_of(x, 4))  # a single sequence: nothing to hold out
    assert np.isnan(one.popularity).all() and np.isnan(one.previous_layer).all()


def test_heldout_lookup_falls_back_to_popularity_for_unseen_rows() -> None:
    train = np.array([[[5, 1, 0], [0, 0, 0], [0, 0, 0]]])
    test = np.array([[[0, 0, 0], [1, 3, 0], [0, 0, 2]]])  # rows 1, 2 unseen in training
    assert r.lookup_topn_recall(train, test, 1)[0] == pytest.approx(1 / 6)


def test_heldout_folds_alternate_within_each_domain() -> None:
    # domains alternate with seq_id: plain alternation would fit on code and score on prose
    seqs = [make_sequence(np.tile([[[0, 1]], [[2, 3]]][i % 2], (10, 1, 1)), i,
                          ("code", "prose")[i % 2], n_expert=4) for i in range(8)]
    held = r.heldout_recall(RoutingData.from_sequences(seqs, 4))
    assert held.popularity[0] == pytest.approx(0.5)
