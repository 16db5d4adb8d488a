"""The next-use model's fit in pieces: the sums and per-piece state that let one process fit
it on the whole training stream, or a Dask cluster fit it one shard per task, to the same
model (:mod:`expertpred.learn.dask_nextuse`).

Every count is a whole number in float64 and every other sum (the Newton step's gradient
and Hessian) is summed over rows, so a piece's sums add; what crosses a piece's boundary
(ages, the decayed history, the distance head's tracker, the next tokens) is handed over
explicitly (:class:`StreamStart`, the continuation tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .nextuse import _Rows


@dataclass(frozen=True)
class StreamStart:
    """What the tokens before a piece of the training stream left behind: a piece fitted on
    its own (one Dask task per shard) starts from it and gets the whole stream's rows."""

    age: np.ndarray  # int64 (L, E) ages after the previous token
    history: np.ndarray  # float32 (L, E) decayed history after it


@dataclass(frozen=True)
class TableSums:
    """The counts behind the transition, popularity and token tables over some rows: whole
    numbers, so the sums of a stream's pieces, in any order, are the whole stream's."""

    co: np.ndarray  # float64 (L, E', E) rows where e' was used and e returns in the horizon
    seen: np.ndarray  # float64 (L, E) rows where e was used
    hit: np.ndarray  # float64 (L, E) rows where e returns within the horizon
    n_rows: int  # valid tokens counted
    ids: np.ndarray  # int64 sorted token ids seen as a row's own or next token
    cnt: tuple[np.ndarray, np.ndarray]  # float64 (n_ids,) rows per id: own, next
    ysum: tuple[np.ndarray, np.ndarray]  # float64 (n_ids, L, E) targets per id: own, next
    tokens: bool  # the token ids were counted (the model gets the token tables)

    def __add__(self, o: TableSums) -> TableSums:
        ids = np.union1d(self.ids, o.ids)
        ia, ib = np.searchsorted(ids, self.ids), np.searchsorted(ids, o.ids)

        def merged(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            out = np.zeros((len(ids), *a.shape[1:]))
            out[ia] += a
            out[ib] += b
            return out

        return TableSums(self.co + o.co, self.seen + o.seen, self.hit + o.hit,
                         self.n_rows + o.n_rows, ids,
                         tuple(merged(a, b) for a, b in zip(self.cnt, o.cnt, strict=True)),
                         tuple(merged(a, b) for a, b in zip(self.ysum, o.ysum, strict=True)),
                         self.tokens and o.tokens)


def table_sums(rows: Sequence[_Rows], n_layer: int, n_expert: int,
               with_tokens: bool) -> TableSums:
    """The :class:`TableSums` of the valid rows of ``rows``."""
    co = np.zeros((n_layer, n_expert, n_expert))
    seen = np.zeros((n_layer, n_expert))
    hit = np.zeros((n_layer, n_expert))
    n_rows = 0
    for r in rows:
        u = r.used[r.valid].astype(np.float64)
        y = r.target[r.valid].astype(np.float64)
        co += np.einsum("tli,tle->lie", u, y)
        seen += u.sum(axis=0)
        hit += y.sum(axis=0)
        n_rows += len(u)
    ids = np.zeros(0, np.int64)
    cnt = [np.zeros(0)] * 2
    ysum = [np.zeros((0, n_layer, n_expert))] * 2
    if with_tokens:
        cur = np.concatenate([r.cur[r.valid] for r in rows])
        nxt = np.concatenate([r.nxt[r.valid] for r in rows])
        y = np.concatenate([r.target[r.valid] for r in rows]).astype(np.float64)
        ids = np.unique(np.concatenate([cur, nxt]))
        ids = ids[ids >= 0]
        for n, key in enumerate((cur, nxt)):
            ok = key >= 0
            i = np.searchsorted(ids, key[ok])
            cnt[n] = np.bincount(i, minlength=len(ids)).astype(np.float64)
            ysum[n] = np.zeros((len(ids), n_layer, n_expert))
            np.add.at(ysum[n], i, y[ok])
    return TableSums(co, seen, hit, n_rows, ids, (cnt[0], cnt[1]), (ysum[0], ysum[1]),
                     with_tokens)


def sample_keys(seed: int, n: int, offset: int = 0) -> np.ndarray:
    """float64 (n,): the sampling keys of the stream's valid (token, layer) rows ``offset ..
    offset + n``, the ``j``-th draw of ``default_rng(seed)`` for row ``j`` (a piece draws its
    own after ``bit_generator.advance(offset)``), so the rows kept (the smallest keys) are
    the same whether one process or a cluster samples."""
    rng = np.random.default_rng(seed)
    rng.bit_generator.advance(offset)
    return rng.random(n)


def grad_hess(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The log loss's gradient and Hessian at ``w``, summed over the rows of ``x``: sums,
    so a cluster adds its pieces' (x: (n, F), y in {0, 1})."""
    p = 1.0 / (1.0 + np.exp(-(x @ w)))
    return x.T @ (p - y), (x * (p * (1 - p))[:, None]).T @ x


def newton(sums: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], n: int, n_f: int,
           l2: float, steps: int) -> np.ndarray:
    """Ridge-regularized logistic regression by Newton's method over ``n`` rows of ``n_f``
    columns, given their :func:`grad_hess` sums at a point."""
    w = np.zeros(n_f)
    reg = l2 * n * np.eye(n_f)
    for _ in range(steps):
        g, h = sums(w)
        g = g + reg @ w
        h = h + reg
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-6:
            break
    return w
