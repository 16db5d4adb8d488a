"""fast-mlp's online one-row kernel: the first layer accumulated over a token's layers.

Within one token the plugin asks for layer ``l = 0, 1, 2, ...`` in order, and most of the
first layer's inputs only grow: the router logits of every layer ``<= l`` (``layer_logits``)
and this token's experts at every layer ``<= l`` (``current_all``) get one more layer per
step, and the previous token's experts (``prev_all``) and the position do not change. Their
part of ``W0 x`` is a running sum (the *accumulator*); a step adds one layer to it and
then the per-step inputs (this layer's logits, the target's history, the hidden state,
``current`` / ``prev_target`` / ``prev_source`` / the layer one-hot). A step's cost no
longer grows with the number of layers (the dense first layer read 937 inputs on
tiny-qwen3moe and 3409 on tiny-olmoe; a step now reads ~3·E inputs and k gathered rows;
the previous token's parts are summed once, at the token's first row).

Every bias is folded into the products by a constant input 1 (an extra last unit of each
layer, ``relu(1) = 1``). A step's arithmetic (gather, products, ReLUs, head, top-k and
shares) is one call of :func:`.fast_mlp_jit.step` (compiled, or its numpy twin); around it
a step makes ~6 numpy calls (the continuation check's bytes, one concatenation of the
step's inputs, the output buffers).

The result is a pure function of the row: the accumulator is reused only when the row
continues the one it was built from (same position, same previous token's experts, same
experts and layer logits at the layers below), checked on the rows' bytes; otherwise it
is rebuilt from the row by replaying the same per-layer additions (``advance``), so the
sums are done in the same order and the scores are bit-identical either way. Against the
batch kernel (one dense product) only the summation order differs: float32 rounding in
the last bits.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from ..errors import ExpertPredError
from ..features import DenseRow, FeatureBatch
from . import fast_mlp_jit
from .design import Design

log = logging.getLogger(__name__)

STEP_REAL = ("logits", "history", "hidden")  # real-valued inputs read once per step


class _Carry(NamedTuple):
    """The accumulator of one row, kept for the next row of the same token (a NamedTuple:
    made once per step, and a frozen dataclass's __init__ costs ~1 µs more)."""

    layer: int  # source layer of the row it was built for
    key: tuple[object, ...]  # (position, d, dtypes, the previous token's experts as bytes)
    experts: bytes  # the row's experts (L, k), as bytes: later rows must extend them
    logits: bytes  # the row's layer logits (L, E), as bytes (b"" without that part)
    token: np.ndarray  # (L, H+1) per source layer: the previous token's and layer parts
    before: np.ndarray  # (H+1,) accumulator over layers < layer (and the token constants)
    after: np.ndarray  # (H+1,) the same with the layer itself added


class RowKernel:
    """Scores (E,) of one online row: ``relu`` layers then the source layer's head."""

    def __init__(self, design: Design, weights: list[np.ndarray], n_hidden: int) -> None:
        m = design.model
        self.n_l, self.e, self.k = m.n_moe, m.n_expert, m.n_expert_used
        enc = DenseRow(m, design.parts, design.layer_onehot, n_hidden)
        if enc.width != design.n_features:
            raise ExpertPredError(f"{design.owner}: {enc.width} input features, trained "
                                  f"with {design.n_features} (hidden states present in one "
                                  "and not the other?)")
        sp = {p: s for p, s in enc.spans.items() if s[1] > s[0]}
        w0, b0 = weights[0], weights[1]
        self.h = h = w0.shape[0]
        # the later layers and the heads with the constant unit appended (bias folded in),
        # input-major (see fast_mlp_jit)
        later = [_extend(w, b).T for w, b in zip(weights[2:-2:2], weights[3:-2:2])]
        self.later = np.ascontiguousarray(np.stack(later) if later else
                                          np.zeros((0, 0, 0)), np.float32)
        w_last, b_last = weights[-2], weights[-1]
        heads = np.concatenate([w_last, b_last[:, None]], axis=1)  # (L·E, H'+1)
        heads = heads.reshape(self.n_l, self.e, -1).transpose(0, 2, 1)
        self.heads = np.ascontiguousarray(heads, np.float32)  # (L, H'+1, E)
        wt = np.zeros((w0.shape[1], h + 1), np.float32)  # rows = input columns
        wt[:, :h] = w0.T
        self._build_real(wt, b0, sp)
        self._build_tables(wt, sp, design.layer_onehot)
        self._carry: _Carry | None = None
        fast_mlp_jit.resolve()  # here, not on the inference thread: a build takes seconds

    def _build_real(self, wt: np.ndarray, b0: np.ndarray,
                    sp: dict[str, tuple[int, int]]) -> None:
        h, e, n_l = self.h, self.e, self.n_l
        self.b0 = np.zeros(h + 1, np.float32)  # bias and the constant unit
        self.b0[:h], self.b0[h] = b0, 1.0
        self.w_pos = wt[sp["position"][0]] if "position" in sp else None
        # per step: v = [logits, history, hidden] -> W_step v (the same for every layer)
        self.real = [p for p in STEP_REAL if p in sp]
        cols = np.concatenate([np.arange(*sp[p]) for p in self.real]) if self.real else \
            np.zeros(0, np.intp)
        self.w_step = np.ascontiguousarray(wt[cols])  # (|v|, H+1)
        # the step's inputs: [logits, history, hidden, this layer's logits (E)]
        self.vin = np.zeros((1, len(cols) + e), np.float32)
        self.vin_row = self.vin[0]
        self._no_ll = np.zeros((1, e), np.float32)  # the last E without that part
        # per layer: its router logits -> the accumulator, (L, E, H+1)
        self.ll = "layer_logits" in sp
        self.w_ll = np.zeros((n_l, e, h + 1), np.float32)
        if self.ll:
            lo = sp["layer_logits"][0]
            self.w_ll[:] = wt[lo:lo + n_l * e].reshape(n_l, e, h + 1)

    def _build_tables(self, wt: np.ndarray, sp: dict[str, tuple[int, int]],
                      layer_onehot: bool) -> None:
        """First-layer rows by expert id, the last row (E) zero so that a padding id (-1)
        read with ``mode="wrap"`` adds nothing."""
        h, e, n_l = self.h, self.e, self.n_l

        def table(part: str, block: int) -> np.ndarray:
            t = np.zeros((e + 1, h + 1), np.float32)
            if part in sp:
                lo = sp[part][0] + block * e
                t[:e] = wt[lo:lo + e]
            return t
        # this token at layer j: (current, current_all block j) -> (step, accumulator)
        self.cur = np.stack([np.concatenate([table("current", 0), table("current_all", j)],
                                            axis=1) for j in range(n_l)])  # (L, E+1, 2(H+1))
        # the previous token at layer j: (prev_all block j, prev_source, prev_target)
        self.prev = np.stack([np.concatenate([table("prev_all", j), table("prev_source", 0),
                                              table("prev_target", 0)], axis=1)
                              for j in range(n_l)]).reshape(n_l * (e + 1), 3 * (h + 1))
        self.layer = np.zeros((n_l, h + 1), np.float32)  # the layer input's part
        if "layer" in sp:
            lo = sp["layer"][0]
            self.layer[:] = wt[lo:lo + n_l] if layer_onehot else \
                wt[lo][None] * np.arange(n_l, dtype=np.float32)[:, None]
        self.prev_off = (np.arange(n_l) * (e + 1))[:, None]  # table block of each layer

    # --- one row -------------------------------------------------------------------------------
    def scores(self, x: FeatureBatch) -> np.ndarray:
        """float32 (E,) scores of the one row of ``x`` (a fresh array)."""
        return self._run(x, 0)[0]

    def topk_shares(self, x: FeatureBatch, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` experts (ties to the lower id) and their shares of the row's
        non-negative score mass (all 1 when none is positive)."""
        _, top, shares = self._run(x, k)
        return top, shares

    def _run(self, x: FeatureBatch, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        li, lgs = int(x.layer[0]), x.layer_logits
        if lgs is None and self.ll:
            raise ExpertPredError("features without layer_logits: expected a batch of "
                                  "sequence_features / OnlineFeatures")
        ex, pex = x.experts, x.prev_experts
        key = (int(x.position[0]), x.config.d, ex.dtype, pex.dtype,
               None if lgs is None else lgs.dtype, pex.tobytes())
        eb = ex.tobytes()
        lb = lgs.tobytes() if self.ll else b""
        c = self._continued(li, key, eb, lb)
        if c is not None:
            token, base = c
        else:  # a new token, or not the row after the last one: rebuild from this row
            token, base = self._start(x)
            for j in range(li):  # the same sums in the same order as the steps did
                if self.ll:
                    self.vin[0, -self.e:] = lgs[0, j]
                base = fast_mlp_jit.advance(self.cur, ex, j, self.w_ll, self.vin_row,
                                            base)[1]
        np.concatenate(self._inputs(x, li), axis=1, out=self.vin)
        h1, e = self.h + 1, self.e
        out, top = np.empty(h1 + e + k, np.float32), np.empty(k, np.int64)
        fast_mlp_jit.step(self.cur, ex, li, self.w_ll, self.vin_row, base, token,
                          self.w_step, self.later, self.heads, out, top)
        self._carry = _Carry(li, key, eb, lb, token, base, out[:h1])
        return out[h1:h1 + e], top, out[h1 + e:]

    def _continued(self, li: int, key: tuple[object, ...], eb: bytes,
                   lb: bytes) -> tuple[np.ndarray, np.ndarray] | None:
        """(token parts, accumulator over layers < li) if the last row is one this row
        continues (the same token, its layers below li unchanged), else None."""
        c = self._carry
        if c is None or c.key != key or li not in (c.layer, c.layer + 1):
            return None
        ne = len(eb) // self.n_l * li
        nl = len(lb) // self.n_l * li
        if eb[:ne] != c.experts[:ne] or lb[:nl] != c.logits[:nl]:
            return None
        return c.token, (c.after if li == c.layer + 1 else c.before)

    def _start(self, x: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
        """A token's constants: (L, H+1) per-layer parts of the previous token (its experts
        at l and at l + d) and of the layer input; the accumulator before layer 0 (biases,
        position, the previous token's experts at every layer)."""
        h1, n_l = self.h + 1, self.n_l
        acc = self.b0.copy()
        if self.w_pos is not None:  # the same float32 log1p as the batch encoder
            acc += self.w_pos * np.log1p(x.position[:1].astype(np.float32))[0]
        ids = x.prev_experts[0].astype(np.intp) % (self.e + 1) + self.prev_off  # -1 -> row E
        rows = self.prev.take(ids, axis=0).sum(axis=1)  # (L, 3(H+1)): summed over k
        acc += rows[:, :h1].sum(axis=0)
        tgt = np.minimum(np.arange(n_l) + x.config.d, n_l - 1)
        token = self.layer + rows[:, h1:2 * h1] + rows[tgt, 2 * h1:]
        return token, acc

    def _inputs(self, x: FeatureBatch, li: int) -> list[np.ndarray]:
        """(1, n) arrays of [logits, history, hidden] (``w_step``'s rows), then layer li's
        router logits (float16, cast by the concatenation)."""
        parts = [x.logits if p == "logits" else x.history if p == "history" else x.hidden
                 for p in self.real]
        parts.append(x.layer_logits[:, li] if self.ll else self._no_ll)
        return parts


def _extend(w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(H'+1, H+1): ``w`` with its bias as the last column and a constant unit."""
    out = np.zeros((w.shape[0] + 1, w.shape[1] + 1), np.float32)
    out[:-1, :-1], out[:-1, -1], out[-1, -1] = w, b, 1.0
    return out
