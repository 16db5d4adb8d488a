"""Reuse distance for expert residency: in how many tokens will expert ``e`` of layer ``j``
be used again?

Belady-MIN evicts the resident expert whose next use is farthest. Capping Belady's
knowledge shows how far ahead that has to be known: with exact distances up to 1 token
(which experts the next token uses, nothing more) the policy reads 1.8-2.1x Belady's bytes
at a 50 % budget on the shipped traces; up to 8 tokens, 1.0-1.2x (docs/residency.md). So
the learned policy needs a regression on the distance itself, not P(used by the next
token) stretched into a distance by a geometric guess. This module is that regression, a
relaxed Belady in the sense of LRB (Song et al., NSDI 2020): ridge least squares on
``log2 min(distance, CAP)`` per (row, expert), where a row is the state of layer ``j``
after it routed at token ``p`` (or after the next token's id is told at the boundary).

Features beyond :mod:`.nextuse`'s (routing now, age, per-layer transition and popularity,
per-token-id tables):

- exponentially decayed use counters at several decays (LRB's EDCs): how often the expert
  was used lately, at several time scales;
- the last gap between two uses (LRB's delta), bucketed;
- **copy**: greedy decoding of small models repeats itself, and routing follows the token.
  Align the current token with the last earlier occurrence of its id; the routing that
  followed that occurrence predicts the routing that follows now (prompt-lookup decoding's
  idea, applied to experts). Once the next token's id is known (the argmax, at the token
  boundary) the alignment uses it and also covers the next token itself.
- **per-id mean distances**: the training text's mean log2 distance after the row's own
  token id and after the next one (once told), i.e. the copy idea with the training text
  as the run to copy from; the training rows read them out of fold, and they get their own
  weights where the run has a copy anchor and where it has none.

:class:`ReuseTracker` owns the per-run state and builds the design columns of one layer
row; training (:func:`fit_reuse`), offline prediction and the online policy all run it
step by step, so online == offline by construction. Numpy only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ExpertPredError

if TYPE_CHECKING:
    from .nextuse import NextUseModel

log = logging.getLogger(__name__)

DistTables = tuple[np.ndarray, np.ndarray]  # per-id mean distance deviations: (cur, nxt)

DECAYS = (0.5, 0.8, 0.9, 0.97)  # EDC time scales: ~2, 5, 10, 33 tokens
CAP = 32  # distances are regressed up to this many tokens (Belady capped at 16-32 = Belady)
WINDOW = 256  # tokens of routing the copy feature may look back over
FAR = 1 << 30  # "no use known": age of a never used expert, copy distance without a match
DIST_FOLDS = 5  # folds of the out-of-fold distance tables the training rows read
AGE_EDGES = (1, 2, 3, 5, 9, 17)  # bucket b holds values in [edge[b-1], edge[b]); 0 = 0
N_BUCKETS = len(AGE_EDGES) + 2


def buckets(v: np.ndarray) -> np.ndarray:
    """int bucket per value: 0 for 0, then by AGE_EDGES, last = FAR (never / no match).

    >>> buckets(np.array([0, 1, 2, 4, 8, 16, 17, FAR])).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
    """
    b = np.searchsorted(np.asarray(AGE_EDGES), v, side="right")
    return np.where(v >= FAR, N_BUCKETS - 1, b)


def n_reuse_features(n_layer: int, uses_tokens: bool, dist_tables: bool = False) -> int:
    """Columns of :meth:`ReuseTracker.columns` (one weight each in the ``.npz``)."""
    return (1 + 2 * (N_BUCKETS - 1) + len(DECAYS) + 3 + n_layer + (2 if uses_tokens else 0)
            + 5 + 4 + (4 if dist_tables else 0))


class ReuseTracker:
    """Per-run feature state of :class:`~.nextuse.NextUseModel`'s distance head.

    ``begin_token(v)`` before a token's first layer routes (``v`` its id, -1 unknown);
    ``observe(j, experts)`` after layer ``j`` routed. Positions are counted per layer (every
    token routes every layer once), the ids in the order they are told.
    """

    def __init__(self, model: NextUseModel, window: int = WINDOW) -> None:
        self.model = model
        l_n, e_n = model.n_layer, model.n_expert
        self.window = window
        self.used = np.zeros((l_n, e_n), bool)
        self.age = np.full((l_n, e_n), FAR, np.int64)
        self.gap = np.full((l_n, e_n), FAR, np.int64)  # tokens between the last two uses
        self.edc = np.zeros((len(DECAYS), l_n, e_n))
        self.pos = np.full(l_n, -1, np.int64)  # position of each layer's latest row
        self.ring = np.zeros((window, l_n, e_n), bool)  # routing by position % window
        # the told positions ``base ..`` (older ones are dropped, see _forget): per position
        # its id (-1 = not told), the last earlier position of the same id (-1 = none) and
        # how many earlier positions have that id (the length of its chain of prev links)
        self.base = 0
        self.ids: list[int] = []
        self.prev: list[int] = []
        self.occ: list[int] = []
        self.last: dict[int, int] = {}  # id -> its latest position (bounded by the vocab)
        self.count: dict[int, int] = {}  # id -> how many positions had it
        self._decays = np.asarray(DECAYS)[:, None]
        self._n_f = n_reuse_features(l_n, model.uses_tokens, model.has_dist_tables)
        self._bucket_ids = np.arange(1, N_BUCKETS)
        # the per-id mean distance tables the columns read (training swaps in out-of-fold
        # ones, :func:`reuse_rows`)
        self.dist = (model.dist_cur_, model.dist_nxt_) if model.has_dist_tables else None

    @property
    def told(self) -> int:
        """Positions whose id was told so far."""
        return self.base + len(self.ids)

    def begin_token(self, token: int) -> None:
        v = int(token)
        p = self.told
        self.prev.append(self.last.get(v, -1) if v >= 0 else -1)
        self.occ.append(self.count.get(v, 0) if v >= 0 else 0)
        self.ids.append(v)
        if v >= 0:
            self.last[v] = p
            self.count[v] = self.count.get(v, 0) + 1
        self._forget()

    def _forget(self) -> None:
        """Drop the positions no row can tell apart any more, so the state is bounded by
        the window, not by the run (the cache simulation feeds one tracker the whole test
        stream). A row of position p reads the ids of p and p + 1 and follows prev links
        from there; an anchor ``a <= p - window - CAP`` gives a copy distance ``>= CAP``
        (its first use is searched in the last ``window`` positions only), which the
        columns see as CAP, the same for every such anchor. Positions below ``min(pos) -
        window - CAP`` are such anchors for every row from now on (positions only grow);
        dropped in steps of ``window`` so the list shifts stay amortised O(1)."""
        floor = int(self.pos.min()) - self.window - CAP + 1
        if floor - self.base >= self.window:
            n = floor - self.base
            del self.ids[:n], self.prev[:n], self.occ[:n]
            self.base = floor

    def token_id(self, p: int) -> int:
        """The id told for position ``p`` (-1: not told yet, or before the run)."""
        return self.ids[p - self.base] if 0 <= p < self.told else -1

    def observe(self, layer: int, experts: Iterable[int] | np.ndarray) -> None:
        ex = np.asarray(experts, np.int64)
        row = np.zeros(self.model.n_expert, bool)
        row[ex[ex >= 0]] = True
        self.gap[layer] = np.where(row, np.minimum(self.age[layer] + 1, FAR), self.gap[layer])
        self.age[layer] = np.where(row, 0, np.minimum(self.age[layer] + 1, FAR))
        self.edc[:, layer] = self._decays * self.edc[:, layer] + row
        self.used[layer] = row
        self.pos[layer] += 1
        self.ring[self.pos[layer] % self.window, layer] = row

    def _first_use(self, layer: int, lo: int, hi: int) -> np.ndarray:
        """int64 (E,): first position in [lo, hi] where ``layer`` used each expert (FAR
        if none, or if the range left the window)."""
        lo = max(lo, hi - self.window + 1, 0)
        if lo > hi:
            return np.full(self.model.n_expert, FAR, np.int64)
        idx = np.arange(lo, hi + 1) % self.window
        seg = self.ring[idx, layer]
        return np.where(seg.any(axis=0), lo + seg.argmax(axis=0), FAR)

    def _anchor(self, p: int, back: int) -> int:
        """The ``back``-th last earlier position with the id of position ``p`` (-1: none).
        Once the chain of prev links passes the dropped positions, the first dropped one
        stands for the answer: every row sees them alike (see :meth:`_forget`)."""
        if back <= 0:
            return p
        if not 0 <= p < self.told or self.occ[p - self.base] < back:
            return -1
        for _ in range(back):
            if p < self.base:
                return p
            p = self.prev[p - self.base]
        return p

    def copy_distance(self, layer: int, known_next: bool, back: int = 1) -> np.ndarray:
        """int64 (E,): the next use of each expert at ``layer`` as the ``back``-th last
        occurrence of the aligned token predicts it, in tokens from the row's position
        (FAR: no match)."""
        p = int(self.pos[layer])
        far = np.full(self.model.n_expert, FAR, np.int64)
        if known_next:  # position p + 1's id is told: align it, its own routing included
            a = self._anchor(p + 1, back)
            if a < 0:
                return far
            s = self._first_use(layer, a, p)
            return np.where(s < FAR, s - a + 1, FAR)
        a = self._anchor(p, back)
        if a < 0:
            return far
        s = self._first_use(layer, a + 1, p - 1)
        return np.where(s < FAR, s - a, FAR)

    def columns(self, layer: int, known_next: bool) -> np.ndarray:
        """float64 (E, F): design columns of ``layer``'s row (F = n_reuse_features).

        Filled into one array, block by block: the policy builds a row at every routing and
        at every boundary, and one numpy call per column was most of its CPU."""
        m = self.model
        n_b = N_BUCKETS - 1
        x = np.zeros((m.n_expert, self._n_f))
        u = self.used[layer]
        x[:, 0] = u
        x[:, 1:1 + n_b] = buckets(self.age[layer])[:, None] == self._bucket_ids
        x[:, 1 + n_b:1 + 2 * n_b] = buckets(self.gap[layer])[:, None] == self._bucket_ids
        c0 = 1 + 2 * n_b
        x[:, c0:c0 + len(DECAYS)] = np.log1p(self.edc[:, layer]).T
        c0 += len(DECAYS)
        x[:, c0] = np.log1p(np.minimum(self.age[layer], 64))
        x[:, c0 + 1] = np.log(m.pop_[layer])
        n_u = int(u.sum())
        x[:, c0 + 2] = np.log(u @ m.trans_[layer] / n_u if n_u else m.pop_[layer])
        c0 += 3
        x[:, c0 + layer] = 1.0
        c0 += m.n_layer
        p = int(self.pos[layer])
        if m.uses_tokens:
            cur = self.token_id(p)
            nxt = self.token_id(p + 1) if known_next else -1
            layer_arr = np.array([layer])
            x[:, c0] = m._token_dev(m.tok_cur_, np.array([cur]), layer_arr, 1)[0]
            x[:, c0 + 1] = m._token_dev(m.tok_nxt_, np.array([nxt]), layer_arr, 1)[0]
            c0 += 2
        c = self.copy_distance(layer, known_next)
        has = c < FAR
        if has.any():
            x[:, c0] = has
            x[:, c0 + 1] = np.log2(np.minimum(c, CAP)) * has
            x[:, c0 + 2] = 1.0
            x[:, c0 + 3] = c == 1
            x[:, c0 + 4] = (c >= 2) & (c <= 3)
        # the occurrence before: a second vote, and whether both agree on "soon"
        c2 = self.copy_distance(layer, known_next, back=2)
        has2 = c2 < FAR
        if has2.any():
            x[:, c0 + 5] = has2
            x[:, c0 + 6] = np.log2(np.minimum(c2, CAP)) * has2
            x[:, c0 + 7] = 1.0
            x[:, c0 + 8] = (c2 <= 3) & (c <= 3)
        if self.dist is not None:
            # the training text's mean distance after these ids, with its own weights where
            # this run has an earlier occurrence to copy (the run's own text is the better
            # guess there) and where it has none
            c0 += 9 if has.any() else 10
            for tab, v in zip(self.dist, (cur, nxt), strict=True):
                x[:, c0] = m._token_dev(tab, np.array([v]), layer_arr, 1)[0]
                c0 += 2
        return x


def next_use_distance(used: np.ndarray) -> np.ndarray:
    """int64 (T, L, E): tokens until each expert's next use at its layer (FAR: none).

    >>> next_use_distance(np.array([[[1]], [[0]], [[1]], [[0]]], bool))[:, 0, 0].tolist()
    [2, 1, 1073741824, 1073741824]
    """
    t_len = len(used)
    out = np.full(used.shape, FAR, np.int64)
    nxt = np.full(used.shape[1:], FAR, np.int64)
    for t in range(t_len - 1, -1, -1):
        out[t] = np.where(nxt < FAR, nxt - t, FAR)
        nxt = np.where(used[t], t, nxt)
    return out


def reuse_rows(model: NextUseModel, experts: np.ndarray, tokens: np.ndarray | None,
               fold_tables: Sequence[DistTables] | None = None,
               fold_of: np.ndarray | None = None, tracker: ReuseTracker | None = None,
               start: int = 0, stop: int | None = None,
               ) -> Iterable[tuple[int, int, bool, np.ndarray]]:
    """Replay one sequence through a fresh tracker as the online policy sees it; yields
    (token, layer, known_next, columns (E, F)) for every row state: after each routing,
    and (with token ids) again at each boundary for the rows of the previous token.
    ``fold_tables`` / ``fold_of`` (int (T,)): the rows of token t read the distance tables
    ``fold_tables[fold_of[t]]`` (training: tables counted without t's fold).

    A piece of a longer stream replays tokens ``start .. stop`` only, through the
    ``tracker`` the tokens before ``start`` left (token ``start - 1`` is the previous
    piece's last: its boundary rows are this piece's)."""
    ex = np.asarray(experts)
    t_len, n_l, _ = ex.shape
    tr = ReuseTracker(model) if tracker is None else tracker
    for t in range(start, t_len if stop is None else stop):
        if tokens is not None:
            tr.begin_token(int(tokens[t]))
            if t > 0 and model.uses_tokens:
                if fold_tables is not None:
                    tr.dist = fold_tables[fold_of[t - 1]]
                for j in range(n_l):
                    yield t - 1, j, True, tr.columns(j, True)
        if fold_tables is not None:
            tr.dist = fold_tables[fold_of[t]]
        for j in range(n_l):
            tr.observe(j, ex[t, j])
            yield t, j, False, tr.columns(j, False)


class ReuseHead:
    """The fitted regression: ``predict(x)`` -> log2 tokens to the next use, per row of x.

    A linear part (ridge) plus, when ``hidden`` > 0, a one-hidden-layer MLP on standardized
    columns fitted to the ridge's residual: the columns are mostly indicators, and what
    they mean together (a copy match *and* a recent use) is not additive.
    """

    ARRAYS = ("coef", "mu", "sd", "w1", "b1", "w2")  # the .npz arrays, prefixed reuse_

    def __init__(self, coef: np.ndarray, mu: np.ndarray | None = None,
                 sd: np.ndarray | None = None, w1: np.ndarray | None = None,
                 b1: np.ndarray | None = None, w2: np.ndarray | None = None) -> None:
        self.coef = coef
        n_f = len(coef)
        self.mu = np.zeros(n_f) if mu is None else mu
        self.sd = np.ones(n_f) if sd is None else sd
        self.w1 = np.zeros((n_f, 0)) if w1 is None else w1
        self.b1 = np.zeros(self.w1.shape[1]) if b1 is None else b1
        self.w2 = np.zeros(self.w1.shape[1]) if w2 is None else w2

    def predict(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.coef
        if self.w1.shape[1]:
            h = np.maximum((x - self.mu) / self.sd @ self.w1 + self.b1, 0.0)
            y = y + h @ self.w2
        return y

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"reuse_{k}": getattr(self, k) for k in self.ARRAYS}

    @classmethod
    def from_arrays(cls, z: dict[str, np.ndarray], n_f: int) -> ReuseHead:
        """From the ``.npz`` arrays; ValueError names a wrong shape / dtype / value."""
        a = {k: z[f"reuse_{k}"] for k in cls.ARRAYS if f"reuse_{k}" in z}
        if "coef" not in a and "reuse_coef" not in z:
            raise ValueError("reuse head without reuse_coef")
        n_h = a["w1"].shape[-1] if "w1" in a and a["w1"].ndim == 2 else 0
        want = {"coef": (n_f,), "mu": (n_f,), "sd": (n_f,), "w1": (n_f, n_h), "b1": (n_h,),
                "w2": (n_h,)}
        for k, v in a.items():
            if v.shape != want[k] or v.dtype != np.float64 or not np.isfinite(v).all():
                raise ValueError(f"reuse_{k} of shape {v.shape} {v.dtype}, expected "
                                 f"{want[k]} finite float64")
        if "sd" in a and (a["sd"] <= 0).any():
            raise ValueError("reuse_sd must be > 0")
        return cls(**a)


def reuse_labels(experts: np.ndarray, n_expert: int) -> tuple[np.ndarray, np.ndarray]:
    """(float64 (T, L, E) log2 min(distance, CAP), bool (T, L, E) known) of one sequence:
    a distance the sequence's end cuts off before CAP is unknown.

    >>> y, ok = reuse_labels(np.array([[[0]], [[1]], [[0]]]), 2)
    >>> y[:, 0, 0].tolist(), ok[:, 0, 0].tolist()
    ([1.0, 0.0, 5.0], [True, True, False])
    """
    s = np.asarray(experts)
    used = np.zeros((*s.shape[:2], n_expert), bool)
    t_idx, l_idx, k_idx = np.nonzero(s >= 0)
    used[t_idx, l_idx, s[t_idx, l_idx, k_idx]] = True
    dist = next_use_distance(used)
    rest = (len(s) - 1 - np.arange(len(s)))[:, None, None]
    return np.log2(np.minimum(dist, CAP).astype(np.float64)), (dist <= rest) | (rest >= CAP)


def fit_dist_tables(model: NextUseModel, sequences: list[np.ndarray],
                    tokens: list[np.ndarray], prior: float,
                    keep: list[np.ndarray] | None = None) -> DistTables:
    """float64 (n_ids, L, E) twice: the mean log2 reuse distance from the rows whose own
    token (``cur``) / next token (``nxt``) has id ``model.tok_ids_[i]``, smoothed with
    ``prior`` rows of the layer-expert mean and minus that mean (0 = no evidence).
    ``keep``: bool (T,) per sequence, the rows counted (None: all).

    The per-id probability tables know only the next token; greedy text after an id
    repeats itself for several tokens, so its mean distance also knows the tokens after."""
    return dist_tables(dist_sums(model, sequences, tokens, keep), prior)


@dataclass(frozen=True)
class DistSums:
    """The sums behind the distance tables: sums, so a stream's pieces add."""

    sums: DistTables  # float64 (n_ids, L, E) log2 distances per id: own, next
    cnts: DistTables  # float64 (n_ids, L, E) how many: own, next
    tot: np.ndarray  # float64 (L, E) all log2 distances
    n_tot: np.ndarray  # float64 (L, E) how many

    def __add__(self, o: DistSums) -> DistSums:
        return DistSums((self.sums[0] + o.sums[0], self.sums[1] + o.sums[1]),
                        (self.cnts[0] + o.cnts[0], self.cnts[1] + o.cnts[1]),
                        self.tot + o.tot, self.n_tot + o.n_tot)

    def zeros_like(self) -> DistSums:
        z = np.zeros_like
        return DistSums((z(self.sums[0]), z(self.sums[1])), (z(self.cnts[0]), z(self.cnts[1])),
                        z(self.tot), z(self.n_tot))


def dist_tables(s: DistSums, prior: float) -> DistTables:
    """:func:`fit_dist_tables` from the sums :func:`dist_sums` counted."""
    mu = s.tot / np.maximum(s.n_tot, 1.0)
    return tuple((s.sums[k] + prior * mu) / (s.cnts[k] + prior) - mu  # type: ignore[return-value]
                 for k in (0, 1))


def dist_sums(model: NextUseModel, sequences: list[np.ndarray], tokens: list[np.ndarray],
              keep: list[np.ndarray] | None = None) -> DistSums:
    """The sums behind :func:`fit_dist_tables`: per id (own, next) the log2 distances and
    their count, and per (layer, expert) all of them; sums, so pieces add."""
    ids = model.tok_ids_
    shape = (len(ids), model.n_layer, model.n_expert)
    sums = {k: np.zeros(shape) for k in ("cur", "nxt")}
    cnts = {k: np.zeros(shape) for k in ("cur", "nxt")}
    tot, n_tot = np.zeros(shape[1:]), np.zeros(shape[1:])
    for n, (s, tk) in enumerate(zip(sequences, tokens, strict=True)):
        y, ok = reuse_labels(s, model.n_expert)
        if keep is not None:
            ok = ok & keep[n][:, None, None]
        y = np.where(ok, y, 0.0)
        tot += y.sum(axis=0)
        n_tot += ok.sum(axis=0)
        tk = np.asarray(tk, np.int64)
        for key, v, rows in (("cur", tk, slice(None)), ("nxt", tk[1:], slice(0, -1))):
            i = np.minimum(np.searchsorted(ids, v), len(ids) - 1)
            found = ids[i] == v
            np.add.at(sums[key], i[found], y[rows][found])
            np.add.at(cnts[key], i[found], ok[rows][found])
    return DistSums((sums["cur"], sums["nxt"]), (cnts["cur"], cnts["nxt"]), tot, n_tot)


def out_of_fold(model: NextUseModel, sequences: list[np.ndarray], tokens: list[np.ndarray],
                prior: float, folds: int = DIST_FOLDS,
                ) -> tuple[list[np.ndarray], list[DistTables]]:
    """(fold of each token per sequence, the tables counted without each fold): the
    training rows read tables that did not see their own distances. Folds are contiguous
    ranges of the sequences' tokens in order."""
    lens = [len(s) for s in sequences]
    pos = np.arange(sum(lens))
    fold = np.minimum(pos * folds // max(len(pos), 1), folds - 1)
    fold_of = np.split(fold, np.cumsum(lens)[:-1])
    tables = [fit_dist_tables(model, sequences, tokens, prior, [f != k for f in fold_of])
              for k in range(folds)]
    return fold_of, tables


def _rows(model: NextUseModel, sequences: list[np.ndarray],
          tokens: list[np.ndarray] | None, prior: float,
          ) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(columns (n, F), label (n,)) of every row state with a known distance; the
    distance tables out of fold (in-sample ones let the ridge trust them too much: the
    learned policy then read 1.5x more than without them on a looping greedy run)."""
    fold_of, tables = (out_of_fold(model, sequences, tokens, prior)
                       if model.has_dist_tables and tokens is not None
                       else ([None] * len(sequences), None))
    for i, s in enumerate(sequences):
        yield from labelled_rows(model, s, None if tokens is None else tokens[i], tables,
                                 fold_of[i])


def labelled_rows(model: NextUseModel, experts: np.ndarray, tokens: np.ndarray | None,
                  tables: Sequence[DistTables] | None, fold_of: np.ndarray | None,
                  tracker: ReuseTracker | None = None, start: int = 0,
                  stop: int | None = None) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(columns (n, F), label (n,)) of the rows of one sequence (or of a piece of the
    stream, as :func:`reuse_rows`; its labels read the continuation after ``stop``) whose
    distance is known."""
    y_all, known = reuse_labels(experts, model.n_expert)
    for t, j, _, x in reuse_rows(model, np.asarray(experts), tokens, tables, fold_of,
                                 tracker, start, stop):
        ok = known[t, j]
        yield x[ok], y_all[t, j][ok]


RIDGE_BATCH = 16_384  # rows per XᵀX update: the rows of a whole run never sit in memory


def ridge_sums(rows: Iterable[tuple[np.ndarray, np.ndarray]], n_f: int,
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """(XᵀX, Xᵀy, n) over ``rows`` (columns (m, F), label (m,)), in batches: the distance
    head's design grows with the run (a 4x synthetic trace held 1.4 GiB of it at once)."""
    xtx, xty, n = np.zeros((n_f, n_f)), np.zeros(n_f), 0
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    held = 0

    def flush() -> None:
        nonlocal xtx, xty, held
        if xs:
            x, y = np.concatenate(xs), np.concatenate(ys)
            xtx += x.T @ x
            xty += x.T @ y
            xs.clear()
            ys.clear()
            held = 0

    for x, y in rows:
        xs.append(x)
        ys.append(y)
        held += len(x)
        n += len(x)
        if held >= RIDGE_BATCH:
            flush()
    flush()
    return xtx, xty, n


def ridge_solve(xtx: np.ndarray, xty: np.ndarray, n: int, l2: float) -> np.ndarray:
    """The ridge's weights from its normal equations (``l2`` per row)."""
    if not n:
        raise ExpertPredError("next-use model: no row with a known reuse distance")
    return np.linalg.solve(xtx + l2 * n * np.eye(len(xty)), xty)


def fit_reuse(model: NextUseModel, sequences: list[np.ndarray],
              tokens: list[np.ndarray] | None, l2: float, hidden: int = 0,
              epochs: int = 0, seed: int = 0) -> ReuseHead:
    """Ridge on log2 min(distance, CAP) over every row state of ``sequences``; then, with
    ``hidden`` > 0, the MLP on the ridge's residual (torch, CPU, ``epochs`` of Adam)."""
    n_f = n_reuse_features(model.n_layer, model.uses_tokens, model.has_dist_tables)
    rows = _rows(model, sequences, tokens, model.config.token_prior)
    if hidden <= 0 or epochs <= 0:  # the ridge alone: its normal equations, streamed
        return ReuseHead(ridge_solve(*ridge_sums(rows, n_f), l2))
    xs, ys = zip(*rows, strict=True) if sequences else ((), ())
    x = np.concatenate(xs) if xs else np.zeros((0, n_f))
    y = np.concatenate(ys) if ys else np.zeros(0)
    coef = ridge_solve(x.T @ x, x.T @ y, len(x), l2)
    import torch

    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(((x - mu) / sd).astype(np.float32))
    rt = torch.from_numpy((y - x @ coef).astype(np.float32))
    net = torch.nn.Sequential(torch.nn.Linear(n_f, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, 1, bias=False))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, weight_decay=1e-5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread, deterministic
    try:
        for _ in range(epochs):
            for idx in torch.randperm(len(xt), generator=gen).split(4096):
                opt.zero_grad()
                loss = torch.mean((net(xt[idx])[:, 0] - rt[idx]) ** 2)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    w1 = net[0].weight.detach().numpy().T.astype(np.float64)
    b1 = net[0].bias.detach().numpy().astype(np.float64)
    w2 = net[2].weight.detach().numpy()[0].astype(np.float64)
    return ReuseHead(coef, mu, sd, w1, b1, w2)
