"""The reuse head's per-id mean distance tables (``predictors/reuse.py``).

1. On a corpus whose ids follow each other deterministically, but whose runs are too short
   to repeat themselves (no copy anchor), the tables lower the head's held-out error.
2. The training rows read out-of-fold tables: an id seen only in one fold has no evidence
   in that fold's table. 3. Online equals offline with the tables. 4. Save / load
   round-trips them; a file fitted without them loads with the feature off; a damaged
   table is one ``ExpertPredError``.
"""

from __future__ import annotations

import numpy as np
import pytest

from expertpred.errors import ExpertPredError
from expertpred.predictors.nextuse import NextUseConfig, NextUseModel
from expertpred.predictors.reuse import CAP, FAR, fit_dist_tables, next_use_distance, out_of_fold

from .conftest import assert_reuse_online_equals_offline

N_L, N_E, K = 3, 8, 2
N_ID = 40  # ids follow a fixed cycle of this length; a run covers less than one cycle


def corpus(n_seq: int, seed: int, length: int = 30) -> list[tuple[np.ndarray, np.ndarray]]:
    """Runs of a fixed id cycle from random starts; each id routes to its own experts."""
    rng = np.random.default_rng(0)  # the language (cycle, routing) is the same for all
    cycle = rng.permutation(N_ID)
    table = np.stack([[rng.choice(N_E, K, replace=False) for _ in range(N_L)]
                      for _ in range(N_ID)])
    starts = np.random.default_rng(seed).integers(0, N_ID, n_seq)
    out = []
    for s in starts:
        ids = cycle[(s + np.arange(length)) % N_ID]
        out.append((table[ids], ids))
    return out


def fit(dist_tables: bool) -> NextUseModel:
    data = corpus(40, seed=1)
    cfg = NextUseConfig(horizon=1, dist_tables=dist_tables)
    return NextUseModel(N_L, N_E, cfg).fit([e for e, _ in data], [t for _, t in data])


@pytest.fixture(scope="module")
def model() -> NextUseModel:
    return fit(True)


def held_out_error(m: NextUseModel) -> float:
    err, n = 0.0, 0
    for ex, ids in corpus(10, seed=99):
        u = np.zeros((*ex.shape[:2], N_E), bool)
        t, j, k = np.nonzero(ex >= 0)
        u[t, j, ex[t, j, k]] = True
        dist = next_use_distance(u)
        routed, _ = m.predict_reuse(ex, ids)
        ok = dist < FAR
        err += float(((routed[ok] - np.log2(np.minimum(dist[ok], CAP))) ** 2).sum())
        n += int(ok.sum())
    return err / n


def test_tables_lower_the_error_where_the_run_cannot_copy(model) -> None:
    without = fit(False)
    assert model.has_dist_tables and not without.has_dist_tables
    assert len(model.reuse_.coef) == len(without.reuse_.coef) + 4
    assert held_out_error(model) < 0.8 * held_out_error(without)


def test_training_rows_read_out_of_fold_tables(model) -> None:
    seqs = [np.concatenate([e for e, _ in corpus(4, seed=5)])]
    ids = np.concatenate([t for _, t in corpus(4, seed=5)])
    fold_of, tables = out_of_fold(model, seqs, [ids], prior=4.0)
    assert fold_of[0].tolist() == sorted(fold_of[0].tolist()) and set(fold_of[0]) == set(
        range(5))
    full = fit_dist_tables(model, seqs, [ids], 4.0)
    checked = 0
    for f in range(4):  # the last fold's distances run past the stream's end: unknown
        only_here = set(ids[fold_of[0] == f]) - set(ids[fold_of[0] != f])
        for v in only_here:  # the fold's own ids: no evidence in its table, some in all
            i = int(np.searchsorted(model.tok_ids_, v))
            assert not tables[f][0][i].any()
            assert full[0][i].any()
            checked += 1
    assert checked


def test_online_equals_offline_with_tables(model) -> None:
    ex, ids = corpus(1, seed=7)[0]
    assert_reuse_online_equals_offline(model, ex, ids)


def test_tables_round_trip_and_damage_is_one_error(model, tmp_path) -> None:
    ex, ids = corpus(1, seed=3)[0]
    again = NextUseModel.load(model.save(tmp_path / "m.npz"))
    assert again.has_dist_tables
    np.testing.assert_array_equal(again.dist_nxt_, model.dist_nxt_)
    np.testing.assert_array_equal(again.predict_reuse(ex, ids)[0],
                                  model.predict_reuse(ex, ids)[0])
    old = NextUseModel.load(fit(False).save(tmp_path / "old.npz"))
    assert not old.has_dist_tables and old.online().reuse.dist is None
    with np.load(tmp_path / "m.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for name, bad in (("short", arrays["dist_cur"][:-1]),
                      ("int", arrays["dist_nxt"].astype(np.int64))):
        key = "dist_cur" if name == "short" else "dist_nxt"
        with open(tmp_path / f"{name}.npz", "wb") as f:
            np.savez(f, **{**arrays, key: bad})
        with pytest.raises(ExpertPredError, match=f"{name}.npz") as e:
            NextUseModel.load(tmp_path / f"{name}.npz")
        assert "\n" not in str(e.value)
