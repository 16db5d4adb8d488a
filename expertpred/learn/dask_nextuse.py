"""The learned residency policy's next-use model on a Dask cluster, one task per training
shard: a worker holds its shard's piece of the stream, never the whole stream.

One process fits the model on one stream, the training tokens of every sequence one after
another (:func:`~expertpred.learn.train.nextuse_stream`). Cut in pieces, a piece's rows
need three things from outside it, all small and all handed over explicitly:

- the state the tokens before it left: the ages and decayed history of the logistic rows
  (:class:`~expertpred.predictors.nextuse_parts.StreamStart`) and the distance head's
  :class:`~expertpred.predictors.reuse.ReuseTracker` (bounded by its window). A serial
  chain of cheap tasks carries them from piece to piece (no design columns are built);
- the tokens after it, up to ``AHEAD`` of them: a row's target and reuse distance look up
  to 32 tokens ahead, and its next token id is the next piece's first;
- the previous piece's last token: its boundary rows (known next id) are built when this
  piece's first id is told.

Then every pass is a sum over pieces, reduced in a tree on the workers: the table counts
(whole numbers: exact), the per-fold distance sums (the out-of-fold tables are the sums of
the other folds), each Newton step's gradient and Hessian on the sampled rows (kept on
their workers between steps; rows chosen by the same per-row keys as one process), and the
distance ridge's ``XᵀX`` / ``Xᵀy``. The result equals the single-process model up to the
order of floating-point sums (tested within rtol 1e-8).
"""

from __future__ import annotations

import copy
import functools
import logging
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from ..features import ModelInfo
from ..predictors.nextuse import NextUseConfig, NextUseModel, sequence_rows
from ..predictors.nextuse_parts import (
    StreamStart,
    TableSums,
    grad_hess,
    newton,
    sample_keys,
    table_sums,
)
from ..predictors.reuse import (
    CAP,
    DIST_FOLDS,
    DistSums,
    ReuseHead,
    ReuseTracker,
    dist_sums,
    dist_tables,
    labelled_rows,
    n_reuse_features,
    ridge_solve,
    ridge_sums,
)
from .shards import (
    Guard,
    Progress,
    ShardInput,
    task_bottom_keys,
    task_merge_keys,
    task_sequences,
    tree_reduce,
)
from .train import PredictorsConfig, nextuse_config, nextuse_stream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """One shard's tokens of the training stream (on its worker)."""

    experts: np.ndarray  # int (T, L, k)
    tokens: np.ndarray  # int64 (T,)


@dataclass(frozen=True)
class Context:
    """What a piece needs from the rest of the stream (built by the driver, small)."""

    offset: int  # stream position of the piece's first token
    total: int  # tokens in the whole stream (the folds cut it in contiguous ranges)
    prev: Piece | None  # the previous piece's last token (None for the first piece)
    ahead: Piece  # the up to AHEAD tokens after the piece (fewer at the stream's end)

    def extended(self, own: Piece, with_prev: bool) -> tuple[Piece, int]:
        """(previous token if asked + own + ahead, index of the own first token)."""
        parts = ([self.prev] if with_prev and self.prev is not None else []) + [own, self.ahead]
        ext = Piece(np.concatenate([p.experts for p in parts]),
                    np.concatenate([p.tokens for p in parts]))
        return ext, int(with_prev and self.prev is not None)

    def folds(self, first: int, n: int) -> np.ndarray:
        """Fold of the stream positions ``first .. first + n`` (``out_of_fold``'s cut)."""
        pos = np.arange(first, first + n)
        return np.minimum(pos * DIST_FOLDS // max(self.total, 1), DIST_FOLDS - 1)


# --- worker tasks -------------------------------------------------------------------------

def task_piece(cfg: PredictorsConfig, inp: ShardInput) -> Piece:
    return Piece(*nextuse_stream(cfg, task_sequences([inp])))


def task_ends(p: Piece, n: int) -> tuple[Piece, Piece | None, int]:
    """(first ``n`` tokens, last token, length) of a piece: its neighbours' context."""
    last = Piece(p.experts[-1:], p.tokens[-1:]) if len(p.tokens) else None
    return Piece(p.experts[:n], p.tokens[:n]), last, len(p.tokens)


def task_table_sums(model: NextUseModel, p: Piece, ctx: Context) -> TableSums:
    ext, _ = ctx.extended(p, with_prev=False)
    rows = sequence_rows(ext.experts, model.n_expert, model.config, ext.tokens,
                         n_own=len(p.tokens))
    return table_sums([rows], model.n_layer, model.n_expert, model.config.token_features)


def task_add(a: Any, b: Any) -> Any:
    return a + b


def task_n_rows(s: TableSums) -> int:
    return s.n_rows


def task_len(xy: tuple[np.ndarray, np.ndarray]) -> int:
    return len(xy[0])


def task_dist_sums(model: NextUseModel, p: Piece, ctx: Context) -> dict[int, DistSums]:
    """Per fold the piece's tokens fall in: that fold's distance sums over them."""
    ext, _ = ctx.extended(p, with_prev=False)
    fold = ctx.folds(ctx.offset, len(p.tokens))
    pad = np.zeros(len(ext.tokens) - len(p.tokens), bool)  # the continuation is not counted
    return {int(f): dist_sums(model, [ext.experts], [ext.tokens],
                              [np.concatenate([fold == f, pad])])
            for f in np.unique(fold).tolist()}


def task_add_dist(a: dict[int, DistSums], b: dict[int, DistSums]) -> dict[int, DistSums]:
    out = dict(a)
    for f, s in b.items():
        out[f] = out[f] + s if f in out else s
    return out


@dataclass(frozen=True)
class Carry:
    """The state after a piece: the logistic rows' and the distance head's."""

    start: StreamStart
    tracker: ReuseTracker  # without its model (re-attached by the next task)


def _attach(tr: ReuseTracker, model: NextUseModel) -> ReuseTracker:
    """A copy of a carried tracker, with its model: a worker hands a task the very object
    another task of it returned, and the replay advances it."""
    tr = copy.deepcopy(tr)
    tr.model = model
    tr.dist = (model.dist_cur_, model.dist_nxt_) if model.has_dist_tables else None
    return tr


def task_carry(model: NextUseModel, p: Piece, before: Carry | None) -> Carry:
    """The state after piece ``p`` from the state before it: the chain's one serial step
    (routing bookkeeping only; no design columns)."""
    rows = sequence_rows(p.experts, model.n_expert, model.config, p.tokens,
                         None if before is None else before.start)
    tr = ReuseTracker(model) if before is None else _attach(before.tracker, model)
    for t in range(len(p.tokens)):
        tr.begin_token(int(p.tokens[t]))
        for j in range(model.n_layer):
            tr.observe(j, p.experts[t, j])
    tr.model, tr.dist = None, None  # type: ignore[assignment]  # shipped without the tables
    return Carry(StreamStart(rows.age[-1], rows.history[-1]), tr)


def task_design(model: NextUseModel, p: Piece, ctx: Context, before: Carry | None, seed: int,
                row_offset: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The piece's sampled logistic rows (x, y), kept on this worker for the Newton steps."""
    ext, _ = ctx.extended(p, with_prev=False)
    rows = sequence_rows(ext.experts, model.n_expert, model.config, ext.tokens,
                         None if before is None else before.start, n_own=len(p.tokens))
    n = int(rows.valid.sum()) * model.n_layer
    return model.design([rows], sample_keys(seed, n, row_offset) <= threshold)


def task_grad_hess(xy: tuple[np.ndarray, np.ndarray], w: np.ndarray,
                   ) -> tuple[np.ndarray, np.ndarray]:
    return grad_hess(xy[0], xy[1], w)


def task_add_pair(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> tuple[Any, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def task_ridge(model: NextUseModel, p: Piece, ctx: Context, before: Carry | None,
               tables: list[Any] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(XᵀX, Xᵀy, [rows]) of the distance head's rows of the piece: its tokens' rows, and
    the boundary rows of the previous piece's last token."""
    ext, first = ctx.extended(p, with_prev=True)
    fold = ctx.folds(ctx.offset - first, len(ext.tokens))
    tr = None if before is None else _attach(before.tracker, model)
    n_f = n_reuse_features(model.n_layer, model.uses_tokens, model.has_dist_tables)
    xtx, xty, n = ridge_sums(labelled_rows(model, ext.experts, ext.tokens, tables, fold, tr,
                                           first, first + len(p.tokens)), n_f)
    return xtx, xty, np.array([float(n)])


# --- driver -------------------------------------------------------------------------------

def check_config(cfg: PredictorsConfig) -> NextUseConfig:
    """The next-use config, refused before any training when it has no distributed fit."""
    nc = nextuse_config(cfg)
    if nc.reuse_hidden > 0 and nc.reuse_epochs > 0:
        raise ExpertPredError(f"config residency_reuse_hidden={nc.reuse_hidden}: the distance "
                              "head's MLP has no distributed fit; set it to 0 or train "
                              "without --cluster")
    return nc


def _contexts(ends: list[tuple[Piece, Piece | None, int]], ahead: int) -> list[Context]:
    """Each piece's offset, previous token and continuation, from every piece's ends."""
    total = sum(n for _, _, n in ends)
    none = Piece(ends[0][0].experts[:0], ends[0][0].tokens[:0])  # the stream's end
    out, offset = [], 0
    for k, (_, _, n) in enumerate(ends):
        nxt = [head for head, _, _ in ends[k + 1:]]
        heads, got = [], 0
        for h in nxt:  # pieces shorter than AHEAD: keep reading the next ones
            if got >= ahead:
                break
            heads.append(h)
            got += len(h.tokens)
        tail = ends[k - 1][1] if k else None
        cont = Piece(np.concatenate([h.experts for h in heads] or [none.experts])[:ahead],
                     np.concatenate([h.tokens for h in heads] or [none.tokens])[:ahead])
        out.append(Context(offset, total, tail, cont))
        offset += n
    return out


def fit_nextuse_distributed(cfg: PredictorsConfig, model_info: ModelInfo, client: Any,
                            guard: Guard, inputs: list[Any], progress: Progress,
                            ) -> NextUseModel:
    """:func:`~expertpred.learn.train.fit_nextuse` with one task per shard."""
    nc = check_config(cfg)
    model = NextUseModel(model_info.n_moe, model_info.n_expert, nc)
    progress.start("next-use model: 5 passes over the shards", 5)
    pieces = [client.submit(task_piece, cfg, inp, pure=False) for inp in inputs]
    ahead = max(CAP, nc.horizon) + 1
    ends = guard.gather([client.submit(task_ends, p, ahead, pure=False) for p in pieces],
                        "the next-use model's stream")
    keep = [k for k, e in enumerate(ends) if e[2]]
    pieces, ctxs = [pieces[k] for k in keep], _contexts([ends[k] for k in keep], ahead)
    if not pieces:
        raise ExpertPredError(f"next-use model: no training tokens in phase "
                              f"{cfg.residency_phase!r}")

    def reduce(futs: list[Any], add: Any, step: str) -> Any:
        return guard.gather(tree_reduce(client, futs, add), step)

    # 1. tables (and token tables): exact counts
    m = _everywhere(client, guard, model)
    per_piece = [client.submit(task_table_sums, m, p, c, pure=False)
                 for p, c in zip(pieces, ctxs, strict=True)]
    n_valid = guard.gather([client.submit(task_n_rows, s, pure=False) for s in per_piece],
                           "next-use row counts")
    sums = reduce(per_piece, task_add, "next-use tables")
    del per_piece
    if sums.n_rows == 0:
        raise ExpertPredError(f"next-use model: no sequence longer than the horizon "
                              f"({nc.horizon} tokens)")
    model.set_tables(sums)
    progress.advance()
    # 2. distance tables: per-fold sums; a fold's out-of-fold table sums the others
    folds = None
    if model.uses_tokens and nc.dist_tables and nc.reuse:
        m = _everywhere(client, guard, model)
        by_fold = reduce([client.submit(task_dist_sums, m, p, c, pure=False)
                          for p, c in zip(pieces, ctxs, strict=True)], task_add_dist,
                         "next-use distance tables")
        every = functools.reduce(operator.add, by_fold.values())
        model.dist_cur_, model.dist_nxt_ = dist_tables(every, nc.token_prior)
        # a fold's rows read the tables of the other folds (no other: no evidence, 0)
        folds = [dist_tables(functools.reduce(operator.add, [
            s for f, s in by_fold.items() if f != k], every.zeros_like()), nc.token_prior)
            for k in range(DIST_FOLDS)]
    progress.advance()
    # 3. the chain: each piece's start state (serial, cheap)
    m = _everywhere(client, guard, model)
    carries: list[Any] = [None]
    for p in pieces[:-1]:
        carries.append(client.submit(task_carry, m, p, carries[-1], pure=False))
    progress.advance()
    # 4. logistic weights: the sampled rows stay on their workers; Newton sums per step
    model.coef_, model.n_train_rows_ = _fit_logistic(
        model, client, guard, [pieces, ctxs, carries], n_valid, cfg.seed)
    progress.advance()
    # 5. the distance head's ridge
    if nc.reuse:
        m = _everywhere(client, guard, model)
        tables = _everywhere(client, guard, folds) if folds is not None else None
        xtx, xty, n = reduce([client.submit(task_ridge, m, p, c, b, tables, pure=False)
                              for p, c, b in zip(pieces, ctxs, carries, strict=True)],
                             task_add_pair, "next-use distance head")
        model.reuse_ = ReuseHead(ridge_solve(xtx, xty, int(n[0]), nc.reuse_l2))
    progress.advance()
    return model


def _everywhere(client: Any, guard: Guard, value: Any) -> Any:
    """``value`` on every worker under a fresh key, watched: a scatter to a worker that
    just died raises a connection error (or waits), which the guard names."""
    return guard.run(lambda: client.scatter(value, broadcast=True, hash=False),
                     "the next-use model's broadcast")


def _fit_logistic(model: NextUseModel, client: Any, guard: Guard, parts: list[list[Any]],
                  n_valid: list[int], seed: int) -> tuple[np.ndarray, int]:
    """Newton on the key-sampled rows; (weights, rows fitted on)."""
    pieces, ctxs, carries = parts
    n_rows = [n * model.n_layer for n in n_valid]
    offsets = np.concatenate([[0], np.cumsum(n_rows)[:-1]]).astype(int).tolist()
    keep = model.sample_size
    threshold = np.inf
    if sum(n_rows) > keep:
        bottom = [client.submit(task_bottom_keys, seed, o, n, keep, pure=False)
                  for o, n in zip(offsets, n_rows, strict=True) if n]
        threshold = float(guard.gather(tree_reduce(client, bottom, task_merge_keys, keep),
                                       "next-use row sample")[keep - 1])
    m = _everywhere(client, guard, model)
    xy = [client.submit(task_design, m, p, c, b, seed, o, threshold, pure=False)
          for p, c, b, o in zip(pieces, ctxs, carries, offsets, strict=True)]
    n = int(sum(guard.gather([client.submit(task_len, f, pure=False) for f in xy],
                             "next-use design rows")))
    if not n:
        raise ExpertPredError("next-use model: no training row")

    def sums(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = w.copy()
        return guard.gather(tree_reduce(client, [client.submit(task_grad_hess, f, w, pure=False)
                                                 for f in xy], task_add_pair),
                            "next-use Newton step")

    coef = newton(sums, n, model._n_features(), model.config.l2, model.config.newton_steps)
    for f in xy:
        f.release()
    return coef, n
