"""Next-use prediction for expert residency: will expert ``e`` of layer ``j`` be used again
within the next ``horizon`` tokens?

The ladder (``predictors``) predicts the experts of layer ``l + d`` of the *same* token. A
residency policy needs the other direction: after layer ``j`` of token ``t`` has routed, how
likely is each of its experts to be used by layer ``j`` of tokens ``t+1 .. t+horizon``? That
target crosses the token boundary, and it is what decides whether keeping an expert
resident saves a read.

Features of (token ``t``, layer ``j``, expert ``e``), all known once layer ``j`` of token
``t`` has routed (built with :mod:`expertpred.features`' ``multihot`` and decayed
``_history``, the same history feature the ladder uses):

- ``used``: ``e`` was selected at (t, j);
- ``age``: tokens since ``e`` was last selected at layer ``j`` (bucketed; "never" last);
- ``history``: the decayed history of layer ``j`` including token ``t``;
- ``transition``: P(e used within the horizon | e' selected at (t, j)), a per-layer table
  counted on the training tokens, averaged over the selected e';
- ``popularity``: P(e used within the horizon) at layer ``j``, counted likewise;
- ``token`` / ``next token`` (when fitted with token ids): log-odds of P(target | id of
  token ``t``) and of P(target | id of token ``t+1``) minus the popularity's, per-id tables
  smoothed towards popularity (0 for an unseen id, or while the id is unknown). Under greedy
  decoding the next id is the argmax of token ``t``'s logits: it is known at the token
  boundary, before token ``t+1``'s first router runs, and many MoEs route almost by token id.

The model is a logistic regression over those columns (plus a per-layer intercept), fitted
with a few Newton steps in numpy: small, exact to export (arrays in an ``.npz``), and
cheap online (:class:`NextUseState` updates one layer row per step, ~E multiply-adds).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Self

import numpy as np

from ..errors import ExpertPredError
from ..features import _history, multihot
from .base import NotFittedError
from .nextuse_parts import (
    StreamStart,
    TableSums,
    grad_hess,
    newton,
    sample_keys,
    table_sums,
)
from .reuse import (
    CAP,
    ReuseHead,
    ReuseTracker,
    fit_dist_tables,
    fit_reuse,
    n_reuse_features,
    reuse_rows,
)

log = logging.getLogger(__name__)

AGE_EDGES = (1, 2, 3, 5, 9, 17)  # bucket b holds ages in [edge[b-1], edge[b]); 0 = used now
NEVER_AGE = 1 << 30  # age of an expert never used at its layer so far
FORMAT = "expertpred-nextuse-1"


@dataclass(frozen=True)
class NextUseConfig:
    """How the next-use model is built; stored with it so online == training."""

    horizon: int = 4  # target: used within the next `horizon` tokens at its layer
    history_decay: float = 0.5  # the ladder's history feature decay
    alpha: float = 1.0  # additive smoothing of the transition / popularity counts
    l2: float = 1e-3  # ridge on the logistic weights (stabilizes Newton on rare buckets)
    max_rows: int = 1_000_000  # uniform sample of (token, layer, expert) rows to fit on
    newton_steps: int = 12
    seed: int = 0
    token_features: bool = True  # the current / next token id tables (needs token ids)
    token_prior: float = 4.0  # pseudo-rows of popularity per id: rare ids back off to it
    reuse: bool = True  # also fit the reuse-distance head (.reuse) the policy ranks by
    reuse_l2: float = 1e-3  # ridge of the distance head, per row
    reuse_hidden: int = 0  # hidden units of the distance head's MLP (0 = ridge only)
    reuse_epochs: int = 0  # epochs of that MLP
    dist_tables: bool = True  # the distance head also reads per-id mean distances (needs
    # token ids): +0.5 to +0.6 points of hit rate on tiny-olmoe at 32 of 64 per layer

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise ExpertPredError(f"next-use horizon {self.horizon}: expected >= 1 token")
        if not 0.0 <= self.history_decay < 1.0:
            raise ExpertPredError(f"history_decay={self.history_decay}: expected 0 <= x < 1")


def _age_buckets(age: np.ndarray) -> np.ndarray:
    """int bucket per age: 0 for 0 (used now), then by AGE_EDGES, last = never / very old.

    >>> _age_buckets(np.array([0, 1, 2, 4, 8, 16, 17, NEVER_AGE])).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
    """
    b = np.searchsorted(np.asarray(AGE_EDGES), age, side="right")
    return np.where(age >= NEVER_AGE, len(AGE_EDGES) + 1, b)


N_BUCKETS = len(AGE_EDGES) + 2


def _ages(used: np.ndarray, age0: np.ndarray | None = None) -> np.ndarray:
    """int64 (T, L, E): tokens since last use at or before each token (0 = used then);
    ``age0``: the ages the tokens before these left (a piece of a longer stream)."""
    out = np.empty(used.shape, np.int64)
    age = np.full(used.shape[1:], NEVER_AGE, np.int64) if age0 is None else age0.copy()
    for t in range(used.shape[0]):
        age = np.where(used[t], 0, np.minimum(age + 1, NEVER_AGE))
        out[t] = age
    return out


@dataclass(frozen=True)
class _Rows:
    """Per-(token, layer) state of one sequence: inputs of the features, and the target."""

    used: np.ndarray  # bool (T, L, E) selected at (t, j)
    age: np.ndarray  # int64 (T, L, E)
    history: np.ndarray  # float32 (T, L, E) decayed history including token t
    target: np.ndarray  # bool (T, L, E) used in t+1 .. t+horizon
    valid: np.ndarray  # bool (T,) the whole horizon lies inside the sequence
    cur: np.ndarray  # int64 (T,) id of token t (-1 = unknown)
    nxt: np.ndarray  # int64 (T,) id of token t+1 (-1 = unknown: the last token)


def sequence_rows(experts: np.ndarray, n_expert: int, config: NextUseConfig,
                  tokens: np.ndarray | None = None, start: StreamStart | None = None,
                  n_own: int | None = None) -> _Rows:
    """The state after each (token, layer) of one sequence's experts (T, L, k) and, when
    given, its token ids (T,). A piece of a longer stream passes the ``start`` state and
    its continuation after its ``n_own`` tokens (the targets and the next id read it)."""
    ex = np.asarray(experts)
    t_len, n_l, _ = ex.shape
    used = multihot(ex.reshape(t_len * n_l, -1), n_expert).reshape(t_len, n_l, n_expert) > 0
    pad = np.concatenate([ex, np.full((1, *ex.shape[1:]), -1, ex.dtype)])
    hist = _history(pad, n_expert, config.history_decay,  # h after token t
                    None if start is None else start.history)[1:]
    c = np.concatenate([np.zeros((1, n_l, n_expert), np.int32),
                        np.cumsum(used, axis=0, dtype=np.int32)])
    end = np.minimum(np.arange(t_len) + 1 + config.horizon, t_len)
    target = (c[end] - c[np.arange(t_len) + 1]) > 0
    valid = np.arange(t_len) + config.horizon < t_len
    cur = np.full(t_len, -1, np.int64) if tokens is None else np.asarray(tokens, np.int64)
    if len(cur) != t_len:
        raise ExpertPredError(f"{len(cur)} token ids for {t_len} tokens of experts")
    nxt = np.concatenate([cur[1:], [-1]])
    rows = _Rows(used, _ages(used, None if start is None else start.age), hist, target,
                 valid, cur, nxt)
    if n_own is None:
        return rows
    return _Rows(**{f.name: getattr(rows, f.name)[:n_own] for f in fields(_Rows)})


class NextUseModel:
    """P(expert used within ``horizon`` tokens at its layer), per (layer, expert).

    ``fit(sequences)`` takes int (T, L, k) expert arrays (one per sequence, token order).
    """

    def __init__(self, n_layer: int, n_expert: int, config: NextUseConfig | None = None,
                 ) -> None:
        self.n_layer = n_layer
        self.n_expert = n_expert
        self.config = config or NextUseConfig()

    # --- features ------------------------------------------------------------------------
    @property
    def uses_tokens(self) -> bool:
        """The model has the token id tables (old files and token-less fits do not)."""
        return self.config.token_features and hasattr(self, "tok_ids_")

    def _token_dev(self, table: np.ndarray, ids: np.ndarray | None, layer: np.ndarray,
                   n: int) -> np.ndarray:
        """float64 (n, E): ``table`` rows of ``ids`` at ``layer``; 0 for unknown / unseen."""
        if ids is None or not len(self.tok_ids_):
            return np.zeros((n, self.n_expert))
        ids = np.asarray(ids, np.int64)
        i = np.minimum(np.searchsorted(self.tok_ids_, ids), len(self.tok_ids_) - 1)
        found = (ids >= 0) & (self.tok_ids_[i] == ids)
        return np.where(found[:, None], table[i, layer], 0.0)

    def _columns(self, used: np.ndarray, age: np.ndarray, hist: np.ndarray,
                 layer: np.ndarray, cur: np.ndarray | None = None,
                 nxt: np.ndarray | None = None) -> np.ndarray:
        """float64 (n, E, F) design columns for n (token, layer) rows of one layer each;
        ``cur`` / ``nxt``: int (n,) ids of the row's token and of the next (-1 = unknown)."""
        n, e = used.shape
        u = used.astype(np.float64)
        tr = np.empty((n, e))
        for j in np.unique(layer).tolist():  # mean over the selected e' of trans[j, e', :]
            m = layer == j
            tr[m] = u[m] @ self.trans_[j]
        tr /= np.maximum(u.sum(axis=1, keepdims=True), 1.0)
        tr = np.where(u.any(axis=1, keepdims=True), tr, self.pop_[layer])
        cols = [u, np.log(tr), np.log(np.broadcast_to(self.pop_[layer], (n, e))),
                hist.astype(np.float64)]
        b = _age_buckets(age)
        cols += [(b == i).astype(np.float64) for i in range(1, N_BUCKETS)]
        cols += [np.broadcast_to((layer == j)[:, None], (n, e)).astype(np.float64)
                 for j in range(self.n_layer)]
        if self.uses_tokens:
            cols += [self._token_dev(self.tok_cur_, cur, layer, n),
                     self._token_dev(self.tok_nxt_, nxt, layer, n)]
        return np.stack(cols, axis=2)

    # --- fitting -------------------------------------------------------------------------
    def fit(self, sequences: Iterable[np.ndarray],
            tokens: Iterable[np.ndarray] | None = None) -> Self:
        """Count the tables, then fit the logistic weights on a sample of rows. ``tokens``:
        the sequences' token ids (T,), parallel to ``sequences``, for the token tables."""
        cfg = self.config
        seqs = [np.asarray(s) for s in sequences]
        toks = [None] * len(seqs) if tokens is None else list(tokens)
        rows = [sequence_rows(s, self.n_expert, cfg, tk) for s, tk in zip(seqs, toks, strict=True)]
        rows = [r for r in rows if r.valid.any()]
        if not rows:
            raise ExpertPredError(f"next-use model: no sequence longer than the horizon "
                                  f"({cfg.horizon} tokens)")
        # 1. transition, popularity and token tables: counts over valid (t, j) rows
        self.set_tables(table_sums(rows, self.n_layer, self.n_expert,
                                   cfg.token_features and tokens is not None))
        # 2. logistic weights on a uniform sample of (token, layer) rows
        n = sum(int(r.valid.sum()) for r in rows) * self.n_layer
        keys = sample_keys(cfg.seed, n)
        x, y = self.design(rows, keys <= self.sample_threshold(keys))
        self.coef_ = _logistic(x, y, cfg.l2, cfg.newton_steps)
        self.n_train_rows_ = int(len(x))
        if cfg.reuse:
            # 3. the distance head: every row state of every sequence, as online
            if self.uses_tokens and cfg.dist_tables:
                self.dist_cur_, self.dist_nxt_ = fit_dist_tables(self, seqs, toks,
                                                                 cfg.token_prior)
            self.reuse_ = fit_reuse(self, seqs, None if tokens is None else toks,
                                    cfg.reuse_l2, cfg.reuse_hidden, cfg.reuse_epochs, cfg.seed)
        return self

    def set_tables(self, s: TableSums) -> None:
        """The transition and popularity tables from their counts, and (when ``s`` counted
        token ids) per token id v and (layer, expert) the log-odds of P(target | v) for the
        row's own token and for the next one, smoothed with ``token_prior`` rows of
        popularity, minus the popularity's log-odds (so an unseen or unknown id adds 0)."""
        a = self.config.alpha
        self.trans_ = (s.co + a * (s.hit[:, None, :] + a) / (s.n_rows + 2 * a)) / (
            s.seen[:, :, None] + a)
        self.pop_ = (s.hit + a) / (s.n_rows + 2 * a)
        if not s.tokens:
            return
        self.tok_ids_ = s.ids
        m, pop = self.config.token_prior, self.pop_
        for name, cnt, ysum in zip(("tok_cur_", "tok_nxt_"), s.cnt, s.ysum, strict=True):
            p = (ysum + m * pop) / (cnt[:, None, None] + m)
            setattr(self, name, _logit(p) - _logit(pop)[None])

    @property
    def sample_size(self) -> int:
        """(token, layer) rows the logistic fits on at most (the token model doubles them)."""
        return max(1, self.config.max_rows // self.n_expert)

    def sample_threshold(self, keys: np.ndarray) -> float:
        """The largest key kept: the ``sample_size``-th smallest (every key if fewer)."""
        keep = self.sample_size
        return float(np.partition(keys, keep - 1)[keep - 1]) if len(keys) > keep else np.inf

    def design(self, rows: Sequence[_Rows], pick: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(columns (n, F), target (n,)) of the valid (token, layer) rows of ``rows`` where
        ``pick`` (bool, one per such row in stream order) is set."""
        l_n, e_n = self.n_layer, self.n_expert
        used = np.concatenate([r.used[r.valid] for r in rows]).reshape(-1, e_n)[pick]
        age = np.concatenate([r.age[r.valid] for r in rows]).reshape(-1, e_n)[pick]
        hist = np.concatenate([r.history[r.valid] for r in rows]).reshape(-1, e_n)[pick]
        y = np.concatenate([r.target[r.valid] for r in rows]).reshape(-1, e_n)[pick]
        cur = np.concatenate([np.repeat(r.cur[r.valid], l_n) for r in rows])[pick]
        nxt = np.concatenate([np.repeat(r.nxt[r.valid], l_n) for r in rows])[pick]
        layer = np.tile(np.arange(l_n), len(pick) // l_n)[pick]
        if self.uses_tokens:
            # each row twice: with the next id (after the token boundary) and without (from
            # its layer's routing to the boundary); online, both states make decisions
            used, age, hist, y, layer, cur = (np.concatenate([a, a]) for a in (
                used, age, hist, y, layer, cur))
            nxt = np.concatenate([nxt, np.full_like(nxt, -1)])
        x = self._columns(used, age, hist, layer, cur, nxt).reshape(-1, self._n_features())
        return x, y.reshape(-1).astype(np.float64)

    def _n_features(self) -> int:
        return 4 + (N_BUCKETS - 1) + self.n_layer + (2 if self.uses_tokens else 0)

    @property
    def has_dist_tables(self) -> bool:
        """The distance head reads the per-id mean distance tables (older files do not)."""
        return self.uses_tokens and hasattr(self, "dist_cur_")

    @property
    def has_reuse(self) -> bool:
        """The model has the reuse-distance head (older files do not)."""
        return hasattr(self, "reuse_")

    def predict_reuse(self, experts: np.ndarray, tokens: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray]:
        """float64 (T, L, E) predicted log2 reuse distance in tokens of one sequence, as
        online right after each routing and after the next id is told (NaN for the last
        token, or without ids)."""
        self._check_fitted()
        if not self.has_reuse:
            raise NotFittedError("NextUseModel: fitted without the reuse head (reuse=False)")
        shape = (len(experts), self.n_layer, self.n_expert)
        routed, told = np.zeros(shape), np.full(shape, np.nan)
        for t, j, known, x in reuse_rows(self, experts, tokens):
            (told if known else routed)[t, j] = self.reuse_.predict(x)
        return routed, told

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise NotFittedError("NextUseModel: call fit() (or load()) before predicting")

    # --- prediction ----------------------------------------------------------------------
    def predict_rows(self, used: np.ndarray, age: np.ndarray, hist: np.ndarray,
                     layer: np.ndarray, cur: np.ndarray | None = None,
                     nxt: np.ndarray | None = None) -> np.ndarray:
        """float64 (n, E) probabilities for n (token, layer) states (``cur`` / ``nxt``: the
        token ids, -1 = unknown; ignored by a model without token tables)."""
        self._check_fitted()
        z = self._columns(used, age, hist, np.asarray(layer, np.int64), cur, nxt) @ self.coef_
        return 1.0 / (1.0 + np.exp(-z))

    def predict_sequence(self, experts: np.ndarray, tokens: np.ndarray | None = None,
                         boundary: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prob, target, valid) of one sequence: float (T, L, E), bool (T, L, E), (T,).
        ``boundary``: row t knows the id of token t+1 (as online after ``begin_token``);
        False: as online right after layer j of token t routed."""
        r = sequence_rows(np.asarray(experts), self.n_expert, self.config, tokens)
        t_len = len(r.used)
        layer = np.tile(np.arange(self.n_layer), t_len)
        e, n_l = self.n_expert, self.n_layer
        nxt = r.nxt if boundary else np.full(t_len, -1, np.int64)
        p = self.predict_rows(r.used.reshape(-1, e), r.age.reshape(-1, e),
                              r.history.reshape(-1, e), layer, np.repeat(r.cur, n_l),
                              np.repeat(nxt, n_l))
        return p.reshape(t_len, self.n_layer, e), r.target, r.valid

    def online(self) -> NextUseState:
        """A fresh per-run state that updates one layer row per step."""
        self._check_fitted()
        return NextUseState(self)

    # --- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        self._check_fitted()
        path = Path(path)
        meta = {"format": FORMAT, "n_layer": self.n_layer, "n_expert": self.n_expert,
                "config": asdict(self.config), "n_train_rows": self.n_train_rows_}
        tok = ({"tok_ids": self.tok_ids_, "tok_cur": self.tok_cur_, "tok_nxt": self.tok_nxt_}
               if self.uses_tokens else {})
        if self.has_dist_tables:
            tok.update(dist_cur=self.dist_cur_, dist_nxt=self.dist_nxt_)
        if self.has_reuse:
            tok.update(self.reuse_.arrays())
        with open(path, "wb") as f:
            np.savez(f, trans=self.trans_, pop=self.pop_, coef=self.coef_,
                     __meta__=np.array(json.dumps(meta)), **tok)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NextUseModel:
        p = Path(path)
        try:
            with np.load(p, allow_pickle=False) as z:
                meta = json.loads(str(z["__meta__"]))
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
                # files from before the token tables: the feature is off
                has_tok = "tok_ids" in z.files
                cfg = {**meta["config"], "token_features": has_tok and meta["config"].get(
                    "token_features", False)}
                m = cls(int(meta["n_layer"]), int(meta["n_expert"]), NextUseConfig(**cfg))
                m.trans_, m.pop_, m.coef_ = z["trans"], z["pop"], z["coef"]
                if m.config.token_features:
                    m.tok_ids_, m.tok_cur_ = z["tok_ids"].astype(np.int64), z["tok_cur"]
                    m.tok_nxt_ = z["tok_nxt"]
                    want_tok = (len(m.tok_ids_), m.n_layer, m.n_expert)
                    if "dist_cur" in z.files:  # files from before them lack the tables
                        m.dist_cur_, m.dist_nxt_ = z["dist_cur"], z["dist_nxt"]
                    for name in ("tok_cur_", "tok_nxt_", "dist_cur_", "dist_nxt_"):
                        tab = getattr(m, name, None)
                        if tab is not None and (tab.shape != want_tok
                                                or tab.dtype != np.float64):
                            raise ValueError(f"{name[:-1]} table of shape {tab.shape} "
                                             f"{tab.dtype}, expected {want_tok} float64")
                m.n_train_rows_ = int(meta["n_train_rows"])
                if "reuse_coef" in z.files:  # files from before the distance head lack it
                    m.reuse_ = ReuseHead.from_arrays(
                        {k: z[k] for k in z.files if k.startswith("reuse_")},
                        n_reuse_features(m.n_layer, m.uses_tokens, m.has_dist_tables))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExpertPredError(f"{p}: not a next-use model .npz ({exc})") from None
        want = (m.n_layer, m.n_expert, m.n_expert)
        if m.trans_.shape != want or m.coef_.shape != (m._n_features(),):
            raise ExpertPredError(f"{p}: tables of shape {m.trans_.shape}, expected {want}")
        return m


class NextUseState:
    """The online side of :class:`NextUseModel`: ``observe(layer, experts)`` after each
    routing updates that layer's used / age / history row and its probabilities ``prob``
    (float64 (L, E)); layers not routed yet hold the popularity prior. ``begin_token(v)``
    at each token boundary (before the token's first layer routes) tells the id ``v`` of
    the token about to be evaluated: the rows routed so far re-predict with it as their
    next token, and rows routed from now on have it as their own token."""

    def __init__(self, model: NextUseModel) -> None:
        self.model = model
        l_n, e_n = model.n_layer, model.n_expert
        self.used = np.zeros((l_n, e_n), bool)
        self.age = np.full((l_n, e_n), NEVER_AGE, np.int64)
        self.history = np.zeros((l_n, e_n), np.float32)
        self._prob = model.pop_.astype(np.float64).copy()
        # the probabilities as the rows routed, before the next id was told: a row that
        # learns "not the next token" still returns later at about this rate
        self._prob_routed = self._prob.copy()
        # rows whose probabilities are due: computed when read, because a policy ranking by
        # the distance head never reads them (the logistic rows were ~30 % of its CPU per
        # step). A row's inputs only change when its layer routes again, which re-marks it,
        # so a late computation equals an immediate one. _due_nxt: the next id it knows
        self._due = np.zeros(model.n_layer, bool)
        self._due_nxt = np.full(model.n_layer, -1, np.int64)
        self._due_routed = np.zeros(model.n_layer, bool)
        d = model.config.history_decay
        self._dec, self._inc = np.float32(d), np.float32(1.0 - d)
        self.token = -1  # id of the token being evaluated (-1 = not told)
        self.row_token = np.full(l_n, -1, np.int64)  # id of the token each row routed at
        self.routed = np.zeros(l_n, bool)
        # the distance head: predicted log2 tokens to each expert's next use at its layer,
        # from the layer's latest row; layers not routed yet: popularity's mean gap
        self.reuse = ReuseTracker(model) if model.has_reuse else None
        self.log_dist = np.log2(np.clip(1.0 / model.pop_, 1.0, CAP)).astype(np.float64)

    def begin_token(self, token: int) -> None:
        self.token = int(token)
        if self.reuse is not None:
            self.reuse.begin_token(self.token)
            if self.model.uses_tokens:
                for j in np.flatnonzero(self.routed).tolist():
                    self.log_dist[j] = self.model.reuse_.predict(self.reuse.columns(j, True))
        if not self.model.uses_tokens or not self.routed.any():
            return
        self._due |= self.routed
        self._due_nxt[self.routed] = self.token

    def _rows(self, j: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        return self.model.predict_rows(self.used[j], self.age[j], self.history[j], j,
                                       self.row_token[j], nxt)

    @property
    def prob(self) -> np.ndarray:
        """float64 (L, E): P(used within the horizon) from each layer's latest row (and the
        next id, once told); layers not routed yet: popularity."""
        if self._due.any():
            j = np.flatnonzero(self._due)
            self._prob[j] = self._rows(j, self._due_nxt[j])
            self._due[j] = False
        return self._prob

    @property
    def prob_routed(self) -> np.ndarray:
        """float64 (L, E): the same rows' probabilities as they routed (next id unknown)."""
        if self._due_routed.any():
            j = np.flatnonzero(self._due_routed)
            self._prob_routed[j] = self._rows(j, np.full(len(j), -1, np.int64))
            self._due_routed[j] = False
        return self._prob_routed

    def observe(self, layer: int, experts: Sequence[int] | np.ndarray) -> None:
        ex = np.asarray(experts, np.int64)
        row = np.zeros(self.model.n_expert, bool)
        row[ex[ex >= 0]] = True
        self.used[layer] = row
        self.age[layer] = np.where(row, 0, np.minimum(self.age[layer] + 1, NEVER_AGE))
        # same float32 operations, same order as features._history
        self.history[layer] = self._dec * self.history[layer] + self._inc * row.astype(
            np.float32)
        self.routed[layer] = True
        self.row_token[layer] = self.token
        self._due[layer] = self._due_routed[layer] = True
        self._due_nxt[layer] = -1
        if self.reuse is not None:
            self.reuse.observe(layer, ex)
            self.log_dist[layer] = self.model.reuse_.predict(self.reuse.columns(layer, False))


def _logistic(x: np.ndarray, y: np.ndarray, l2: float, steps: int) -> np.ndarray:
    return newton(lambda w: grad_hess(x, y, w), len(x), x.shape[1], l2, steps)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy.

    >>> round(log_loss(np.array([0.5, 0.5]), np.array([1, 0])), 4)
    0.6931
    """
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
