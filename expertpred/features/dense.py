"""Dense encoding of feature rows for the learned models: ONE table of parts.

:data:`PARTS` maps each part name to its width and its encoders. :func:`dense_features`
(batches: training, evaluation), :class:`DenseRow` (one row: the online plugin) and the
predictors' artifact spec (:func:`design_parts`, :func:`design_width`) all read it, so a
part is added or changed in one place. ``tests/test_features.py`` checks that the batch and
the one-row encoders agree bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..errors import ExpertPredError

if TYPE_CHECKING:
    from . import FeatureBatch, ModelInfo

log = logging.getLogger(__name__)

# (source 0 = this token's experts | 1 = the previous token's, MoE layer, column of id 0)
IdRows = list[tuple[int, int, int]]


class Part(NamedTuple):
    """One block of columns of the design matrix."""

    # columns of the part for (model, layer_onehot, n_hidden)
    width: Callable[[ModelInfo, bool, int], int]
    # the batch encoder: float32 (n, width) columns, or None when the batch lacks the input
    encode: Callable[[FeatureBatch, bool], np.ndarray | None]
    # multi-hot parts only: which expert-id rows set a 1, for (source layer, d, model); the
    # one-row encoder precomputes these per (layer, d) instead of building multi-hots
    ids: Callable[[int, int, ModelInfo], IdRows] | None = None


def _layer(x: FeatureBatch, onehot: bool) -> np.ndarray:
    if onehot:
        return np.eye(x.model.n_moe, dtype=np.float32)[x.layer.astype(np.int64)]
    return x.layer.astype(np.float32)[:, None]


def _all_layers(which: str) -> Callable[[FeatureBatch, bool], np.ndarray]:
    def encode(x: FeatureBatch, onehot: bool) -> np.ndarray:
        from . import multihot

        ids = x.experts if which == "current" else x.prev_experts
        n, n_lay, k = ids.shape
        flat = multihot(ids.reshape(n * n_lay, k), x.model.n_expert)
        return flat.reshape(n, n_lay * x.model.n_expert)
    return encode


def _hidden(x: FeatureBatch, onehot: bool) -> np.ndarray | None:
    return None if x.hidden is None else x.hidden.astype(np.float32)


def _layer_logits(x: FeatureBatch, onehot: bool) -> np.ndarray | None:
    if x.layer_logits is None:
        return None
    return x.layer_logits.reshape(len(x), -1).astype(np.float32)


def _experts(m: ModelInfo, onehot: bool, n_hidden: int) -> int:
    return m.n_expert


def _every_layer(m: ModelInfo, onehot: bool, n_hidden: int) -> int:
    return m.n_moe * m.n_expert


PARTS: dict[str, Part] = {
    "layer": Part(lambda m, oh, nh: m.n_moe if oh else 1, _layer),
    "logits": Part(_experts, lambda x, oh: x.logits.astype(np.float32)),
    "current": Part(_experts, lambda x, oh: x.current_multihot(),
                    lambda li, d, m: [(0, li, 0)]),
    "prev_target": Part(_experts, lambda x, oh: x.prev_multihot(x.d),
                        lambda li, d, m: [(1, min(max(li + d, 0), m.n_moe - 1), 0)]),
    "prev_source": Part(_experts, lambda x, oh: x.prev_multihot(0),
                        lambda li, d, m: [(1, li, 0)]),
    "history": Part(_experts, lambda x, oh: x.history.astype(np.float32)),
    "position": Part(lambda m, oh, nh: 1,
                     lambda x, oh: np.log1p(x.position.astype(np.float32))[:, None]),
    "hidden": Part(lambda m, oh, nh: nh, _hidden),  # skipped when the batch has none
    # this token's router logits at every layer <= l (0 above): L·E columns
    "layer_logits": Part(_every_layer, _layer_logits),
    # every layer's experts, this and the previous token: L·E columns each
    "current_all": Part(_every_layer, _all_layers("current"),
                        lambda li, d, m: [(0, j, j * m.n_expert) for j in range(m.n_moe)]),
    "prev_all": Part(_every_layer, _all_layers("prev"),
                     lambda li, d, m: [(1, j, j * m.n_expert) for j in range(m.n_moe)]),
}
DENSE_PARTS = ("layer", "logits", "current", "prev_target", "prev_source", "history",
               "position", "hidden")
EXTRA_PARTS = ("current_all", "prev_all")


def design_parts(use_hidden: bool = True, all_layers: bool = True) -> tuple[str, ...]:
    """The parts a learned model reads: :data:`DENSE_PARTS` (without ``hidden`` unless
    ``use_hidden``), then :data:`EXTRA_PARTS` when ``all_layers``."""
    parts = tuple(p for p in DENSE_PARTS if use_hidden or p != "hidden")
    return parts + (EXTRA_PARTS if all_layers else ())


def _check_parts(parts: tuple[str, ...]) -> None:
    for p in parts:
        if p not in PARTS:
            raise ExpertPredError(f"feature part {p!r}: expected one of {', '.join(PARTS)}")


def design_width(model: ModelInfo, parts: tuple[str, ...], layer_onehot: bool,
                 n_hidden: int = 0) -> int:
    """Columns of :func:`dense_features` for ``parts`` (``n_hidden``: width of ``hidden``)."""
    _check_parts(parts)
    return sum(PARTS[p].width(model, layer_onehot, n_hidden) for p in parts)


def dense_features(x: FeatureBatch, parts: tuple[str, ...] = DENSE_PARTS,
                   layer_onehot: bool = True) -> np.ndarray:
    """float32 (n, F) design matrix for tree / neural predictors, columns in ``parts`` order.

    ``layer`` is one-hot over source layers (or one integer column with
    ``layer_onehot=False``, for LightGBM's categorical handling); ``hidden`` is skipped when
    the batch has no hidden states.
    """
    _check_parts(parts)
    cols = [c for c in (PARTS[p].encode(x, layer_onehot) for p in parts) if c is not None]
    return np.concatenate(cols, axis=1) if cols else np.zeros((len(x), 0), np.float32)


class DenseRow:
    """:func:`dense_features` for one-row batches, written into one preallocated vector.

    The learned models' online path: no per-part arrays, no concatenation; columns in the
    same order with the same float32 values as :func:`dense_features` (bit for bit,
    ``tests/test_features.py``). ``row(x)`` returns the buffer itself (overwritten by the
    next call); ``n_hidden``: width of the ``hidden`` part when present.

    Steps per row: 1. zero the buffer; 2. copy the real-valued parts (logits, history,
    hidden, log1p(position) — cached per position); 3. set every multi-hot / one-hot 1 with
    one fancy assignment, whose indices (per source layer and ``d``, from :data:`PARTS`'
    ``ids``) are precomputed; padding ids (-1) land in a trash slot past the end.
    """

    def __init__(self, model: ModelInfo, parts: tuple[str, ...] = DENSE_PARTS,
                 layer_onehot: bool = True, n_hidden: int = 0) -> None:
        _check_parts(parts)
        self.model, self.parts, self.layer_onehot = model, tuple(parts), layer_onehot
        self.n_hidden = n_hidden
        self.spans: dict[str, tuple[int, int]] = {}
        o = 0
        for p in self.parts:
            w = PARTS[p].width(model, layer_onehot, n_hidden)
            self.spans[p] = (o, o + w)
            o += w
        self.width = o
        self._buf = np.zeros(o + 1, dtype=np.float32)  # [o] = trash slot for padding ids
        self._row = self._buf[None, :o]
        self._plans: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._log1p: dict[int, np.float32] = {}
        self._one = np.zeros(1, dtype=np.float32)

    def plan(self, li: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For source layer ``li``: which flat expert ids of (this token's | the previous
        token's) (L·k) array feed the multi-hots, and the column offset each id adds to."""
        n_l, k = self.model.n_moe, self.model.n_expert_used
        pos: list[int] = []  # flat index into the concatenated (2, L, k) id array
        off: list[int] = []  # column of id 0
        for p, (lo, _) in self.spans.items():
            ids = PARTS[p].ids
            for src, lay, col in (ids(li, d, self.model) if ids is not None else ()):
                pos += [src * n_l * k + lay * k + j for j in range(k)]
                off += [lo + col] * k
        fixed = []  # layer one-hot: constant per li
        if "layer" in self.spans and self.layer_onehot:
            fixed.append(self.spans["layer"][0] + li)
        plan = (np.asarray(pos, dtype=np.intp), np.asarray(off, dtype=np.intp),
                np.asarray(fixed, dtype=np.intp))
        self._plans[(li, d)] = plan
        return plan

    def _position(self, x: FeatureBatch) -> np.float32:
        t = int(x.position[0])
        v = self._log1p.get(t)
        if v is None:  # the same ufunc on the same float32 value as the batch
            self._one[0] = x.position[0]
            v = self._log1p[t] = np.log1p(self._one)[0]
        return v

    def row(self, x: FeatureBatch) -> np.ndarray:
        """float32 (1, F): the design row of the one-row batch ``x`` (a reused buffer)."""
        buf, sp = self._buf, self.spans
        li, d = int(x.layer[0]), x.config.d
        pos_a, off, fixed = self._plans.get((li, d)) or self.plan(li, d)
        # 1. zero
        buf.fill(0.0)
        # 2. real-valued parts
        if "logits" in sp:
            lo, hi = sp["logits"]
            buf[lo:hi] = x.logits[0]
        if "history" in sp:
            lo, hi = sp["history"]
            buf[lo:hi] = x.history[0]
        if "position" in sp:
            buf[sp["position"][0]] = self._position(x)
        if "hidden" in sp:
            lo, hi = sp["hidden"]
            n_h = 0 if x.hidden is None else x.hidden.shape[1]
            if n_h != hi - lo:  # dense_features skips it without hidden states
                raise ExpertPredError(f"DenseRow built for {hi - lo} hidden columns, "
                                      f"the features have {n_h}")
            if n_h:
                buf[lo:hi] = x.hidden[0]
        if "layer_logits" in sp:
            lo, hi = sp["layer_logits"]
            if x.layer_logits is None:
                raise ExpertPredError("features without layer_logits: expected a batch of "
                                      "sequence_features / OnlineFeatures")
            buf[lo:hi] = x.layer_logits[0].reshape(-1)
        if "layer" in sp and not self.layer_onehot:
            buf[sp["layer"][0]] = li
        # 3. every 1 at once; padding (-1) goes to the trash slot
        if len(pos_a):
            ids = np.concatenate((x.experts[0].ravel(), x.prev_experts[0].ravel()))[pos_a]
            buf[np.where(ids >= 0, off + ids, self.width)] = 1.0
        if len(fixed):
            buf[fixed] = 1.0
        return self._row
