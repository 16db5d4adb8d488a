"""The one feature builder shared by training, evaluation and the online prefetch plugin.

One example is (token ``t``, source MoE layer ``l``) for a fixed target offset ``d``: when
layer ``l`` of token ``t`` has routed, predict the set of experts layer ``l + d`` will select
for the same token. Everything in an example is known at that moment in a token-by-token
decode (nothing from layers above ``l`` of token ``t``, nothing from later tokens):

- this token's router logits at ``l`` and its chosen experts at layers ``<= l``;
- the previous token's chosen experts at every layer;
- a decayed history of earlier tokens' experts at the target layer ``l + d``;
- token id, position, phase, and (when traced) the router input (hidden) at ``l``.

:func:`iter_feature_batches` builds examples from :class:`SequenceTrace` records in bounded
chunks; :class:`OnlineFeatures` builds the very same rows one layer at a time inside
llama.cpp. ``tests/test_features.py`` checks that both agree bit for bit and that perturbing
the future never changes a feature.

Layer indices here are MoE-layer indices ``0..L-1`` (rows of the trace), not GGUF block
numbers; :attr:`ModelInfo.moe_layers` maps one to the other.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from ..model import ModelInfo
from ..trace.record import Phase, SequenceTrace

log = logging.getLogger(__name__)

NO_EXPERT = -1  # padding in expert-id arrays (layer not routed yet / no previous token)


@dataclass(frozen=True)
class FeatureConfig:
    """How features are built. Stored with every predictor so online == training."""

    d: int = 1  # target offset: predict layer l + d from what is known at layer l
    history_decay: float = 0.5  # h_t = decay·h_{t-1} + (1-decay)·onehot(experts of t-1)

    def __post_init__(self) -> None:
        if self.d < 1:
            raise ExpertPredError(f"feature offset d={self.d}: expected d >= 1")
        if not 0.0 <= self.history_decay < 1.0:
            raise ExpertPredError(f"history_decay={self.history_decay}: expected 0 <= x < 1")


@dataclass(frozen=True)
class FeatureBatch:
    """Columnar examples for one target offset ``d``; rows are token-major, layer-minor.

    ``targets`` are labels (the experts layer ``l + d`` selected), present only when built
    offline from a trace; no feature column is derived from them.
    """

    model: ModelInfo
    config: FeatureConfig
    seq: np.ndarray  # int64 (n,) seq_id: grouping only, never a model input
    position: np.ndarray  # int32 (n,) index of the token in its sequence
    token: np.ndarray  # int32 (n,)
    phase: np.ndarray  # int8 (n,) Phase values
    layer: np.ndarray  # int16 (n,) source MoE layer l; the target is l + d
    logits: np.ndarray  # float32 (n, E) router logits of this token at l
    experts: np.ndarray  # int16 (n, L, k) this token's experts at layers <= l, -1 above
    prev_experts: np.ndarray  # int16 (n, L, k) previous token's experts, -1 for the first
    history: np.ndarray  # float32 (n, E) decayed history of earlier tokens at layer l + d
    hidden: np.ndarray | None = None  # float16 (n, D) router input at l, when traced
    targets: np.ndarray | None = None  # int16 (n, k) experts chosen at l + d (labels)
    # float16 (n, L, E) this token's router logits at every layer <= l, 0 above: the
    # residual stream seen through every router so far (half precision: a feature, not a
    # score); None in batches built by hand before it existed
    layer_logits: np.ndarray | None = None

    FEATURE_FIELDS = ("position", "token", "phase", "layer", "logits", "experts",
                      "prev_experts", "history", "hidden", "layer_logits")

    def __len__(self) -> int:
        return int(len(self.layer))

    @property
    def d(self) -> int:
        return self.config.d

    @property
    def target_layer(self) -> np.ndarray:
        return self.layer.astype(np.int64) + self.config.d

    def take(self, idx: np.ndarray | slice) -> FeatureBatch:
        """Rows ``idx`` as a new batch (arrays are copied by fancy indexing)."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                kw[f.name] = v[idx]
        return replace(self, **kw)

    def current_multihot(self) -> np.ndarray:
        """float32 (n, E): this token's experts at the source layer ``l``, as 0/1."""
        rows = np.arange(len(self))
        return multihot(self.experts[rows, self.layer.astype(np.int64)], self.model.n_expert)

    def prev_multihot(self, offset: int) -> np.ndarray:
        """float32 (n, E): previous token's experts at layer ``l + offset`` (0 if none)."""
        rows = np.arange(len(self))
        lay = np.clip(self.layer.astype(np.int64) + offset, 0, self.model.n_moe - 1)
        return multihot(self.prev_experts[rows, lay], self.model.n_expert)


def multihot(ids: np.ndarray, n: int) -> np.ndarray:
    """0/1 float32 (rows, n) from int ids (rows, k); negative ids are padding.

    >>> multihot(np.array([[0, 2], [1, -1]]), 3).tolist()
    [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    """
    ids = np.asarray(ids)
    out = np.zeros((ids.shape[0], n + 1), dtype=np.float32)
    np.put_along_axis(out, np.where(ids >= 0, ids, n).astype(np.int64), 1.0, axis=1)
    return out[:, :n]


def concat(batches: list[FeatureBatch]) -> FeatureBatch:
    """Stack batches of the same model and config."""
    if not batches:
        raise ExpertPredError("no examples: the trace selection is empty")
    first = batches[0]
    kw: dict[str, Any] = {}
    for f in fields(first):
        v = getattr(first, f.name)
        if isinstance(v, np.ndarray):
            kw[f.name] = np.concatenate([getattr(b, f.name) for b in batches])
        elif f.name in ("hidden", "targets", "layer_logits"):
            vals = [getattr(b, f.name) for b in batches]
            kw[f.name] = None if any(x is None for x in vals) else np.concatenate(vals)
    return replace(first, **kw)


# --- batch builder ---------------------------------------------------------------------------

def _history(experts: np.ndarray, n_expert: int, decay: float,
             h0: np.ndarray | None = None) -> np.ndarray:
    """float32 (T, L, E): h[t] = decay·h[t-1] + (1-decay)·onehot(experts[t-1]), h[0] = h0
    (0 by default; a stream cut in pieces passes the state its previous piece ended in).

    Same float32 operations in the same order as :meth:`OnlineFeatures.next_token`.
    """
    t_len, n_l, _ = experts.shape
    out = np.zeros((t_len, n_l, n_expert), dtype=np.float32)
    h = np.zeros((n_l, n_expert), dtype=np.float32) if h0 is None else h0.astype(np.float32)
    if t_len:
        out[0] = h
    dec, inc = np.float32(decay), np.float32(1.0 - decay)
    for t in range(1, t_len):
        h = dec * h + inc * multihot(experts[t - 1], n_expert)
        out[t] = h
    return out


def sequence_features(trace: SequenceTrace, model: ModelInfo, config: FeatureConfig,
                      with_targets: bool = True) -> FeatureBatch | None:
    """All examples of one sequence for offset ``config.d`` (None if it has none)."""
    n_l, d = model.n_moe, config.d
    t_len = trace.n_tokens
    if trace.experts.ndim != 3 or trace.experts.shape[1:] != (n_l, model.n_expert_used):
        raise ExpertPredError(
            f"sequence {trace.prompt_id!r}: experts shape {trace.experts.shape}, expected "
            f"(T, {n_l}, {model.n_expert_used}) for model {model.arch} {model.sha256[:12]}")
    if trace.logits.shape[1:] != (n_l, model.n_expert):
        raise ExpertPredError(f"sequence {trace.prompt_id!r}: logits shape "
                              f"{trace.logits.shape}, expected (T, {n_l}, {model.n_expert})")
    n_src = n_l - d
    if n_src <= 0 or t_len == 0:
        return None
    # 1. row index: token-major, layer-minor (the order llama.cpp executes)
    t_idx = np.repeat(np.arange(t_len), n_src)
    l_idx = np.tile(np.arange(n_src), t_len)
    ex = trace.experts.astype(np.int16, copy=False)
    # 2. this token's experts at layers <= l (mask the layers not routed yet)
    visible = np.arange(n_l)[None, :, None] <= l_idx[:, None, None]
    cur = np.where(visible, ex[t_idx], np.int16(NO_EXPERT)).astype(np.int16)
    # 3. previous token's experts at every layer
    prev_all = np.full_like(ex, NO_EXPERT)
    prev_all[1:] = ex[:-1]
    # 4. decayed history of earlier tokens, at the target layer
    hist = _history(ex, model.n_expert, config.history_decay)[t_idx, l_idx + d]
    hidden = None
    if trace.hidden is not None:
        hidden = trace.hidden[t_idx, l_idx].astype(np.float16, copy=False)
    targets = ex[t_idx, l_idx + d].copy() if with_targets else None
    # 5. this token's router logits at layers <= l (same mask as the experts)
    layer_logits = np.where(visible, trace.logits[t_idx], 0).astype(np.float16)
    return FeatureBatch(
        model=model, config=config,
        seq=np.full(len(t_idx), trace.seq_id, dtype=np.int64),
        position=t_idx.astype(np.int32), token=trace.tokens[t_idx].astype(np.int32),
        phase=trace.phase[t_idx].astype(np.int8), layer=l_idx.astype(np.int16),
        logits=trace.logits[t_idx, l_idx].astype(np.float32, copy=False),
        experts=cur, prev_experts=prev_all[t_idx], history=hist,
        hidden=hidden, targets=targets, layer_logits=layer_logits,
    )


def iter_feature_batches(sequences: Iterable[SequenceTrace], model: ModelInfo,
                         config: FeatureConfig, max_rows: int = 1 << 16,
                         with_targets: bool = True,
                         phase: int | None = None) -> Iterator[FeatureBatch]:
    """Stream examples in batches of about ``max_rows`` rows (whole sequences per batch).

    ``phase``: keep only the rows of tokens in that :class:`Phase` (features still see the
    whole sequence, e.g. the prompt's last token as the first decode token's previous one).
    """
    pending: list[FeatureBatch] = []
    n = 0
    for trace in sequences:
        b = sequence_features(trace, model, config, with_targets=with_targets)
        if b is not None and phase is not None:
            b = b.take(np.flatnonzero(b.phase == phase))
        if b is None or len(b) == 0:
            continue
        pending.append(b)
        n += len(b)
        if n >= max_rows:
            yield concat(pending)
            pending, n = [], 0
    if pending:
        yield concat(pending)


def build_features(sequences: Iterable[SequenceTrace], model: ModelInfo,
                   config: FeatureConfig, max_rows: int | None = None, seed: int = 0,
                   with_targets: bool = True, phase: int | None = None) -> FeatureBatch:
    """All examples in memory, or a uniform sample of ``max_rows`` of them.

    Sampling is bottom-k over random keys, so memory stays near ``2·max_rows`` rows however
    long the stream is; kept rows stay in stream order.
    """
    rng = np.random.default_rng(seed)
    kept: list[FeatureBatch] = []
    keys: list[np.ndarray] = []
    n = 0
    for b in iter_feature_batches(sequences, model, config, with_targets=with_targets,
                                  phase=phase):
        kept.append(b)
        keys.append(rng.random(len(b)))
        n += len(b)
        if max_rows is not None and n > 2 * max_rows:
            kept, keys = _bottom_k(kept, keys, max_rows)
            n = max_rows
    if not kept:
        raise ExpertPredError("no examples: the trace selection is empty (or every sequence "
                              f"is shorter than needed for d={config.d})")
    if max_rows is not None and n > max_rows:
        kept, keys = _bottom_k(kept, keys, max_rows)
    return concat(kept)


def _bottom_k(batches: list[FeatureBatch], keys: list[np.ndarray],
              k: int) -> tuple[list[FeatureBatch], list[np.ndarray]]:
    b = concat(batches)
    key = np.concatenate(keys)
    idx = np.sort(np.argpartition(key, k - 1)[:k])
    return [b.take(idx)], [key[idx]]


# --- online builder ---------------------------------------------------------------------------

class OnlineFeatures:
    """Incremental features inside a running decode: same rows as :func:`sequence_features`.

    Call :meth:`next_token` when a token starts, :meth:`update` after each MoE layer routes,
    then :meth:`features` for each offset to predict. One object per sequence (or
    :meth:`reset`).
    """

    def __init__(self, model: ModelInfo, history_decay: float = 0.5) -> None:
        self.model = model
        self.history_decay = history_decay
        # one FeatureConfig per d, made once: building it per call was ~1 µs of the row
        self._configs: dict[int, FeatureConfig] = {}
        self.reset()

    def reset(self) -> None:
        n_l, k, e = self.model.n_moe, self.model.n_expert_used, self.model.n_expert
        self._cur = np.full((n_l, k), NO_EXPERT, dtype=np.int16)
        self._prev = np.full((n_l, k), NO_EXPERT, dtype=np.int16)
        self._hist = np.zeros((n_l, e), dtype=np.float32)
        self._logits = np.zeros((n_l, e), dtype=np.float32)
        self._logits16 = np.zeros((n_l, e), dtype=np.float16)  # layer_logits' source
        self._hidden: list[np.ndarray | None] = [None] * n_l
        self._position = -1
        self._token = 0
        self._phase = int(Phase.DECODE)
        self._layer = -1
        self._top = -1  # highest layer updated for the current token (above it: unset rows)
        self._step: dict[str, Any] | None = None  # shared columns of the current layer-step
        # read-only one-element columns shared by the rows of a token (or of a layer): they
        # never change once made, and making them per step was ~2 µs of the step
        self._layers = [_frozen(np.array([li], dtype=np.int16)) for li in range(n_l)]
        self._token_cols: dict[str, np.ndarray] = {}
        self._seq_col: tuple[int, np.ndarray] | None = None
        self.seq_id = 0

    def next_token(self, token: int, phase: int = Phase.DECODE) -> None:
        """Start a new token: the current one becomes the previous one."""
        if self._position >= 0:
            dec = np.float32(self.history_decay)
            inc = np.float32(1.0 - self.history_decay)
            # new arrays (never in place): rows handed out earlier keep their values
            self._hist = dec * self._hist + inc * multihot(self._cur, self.model.n_expert)
            self._prev = self._cur.copy()
        self._cur = np.full_like(self._cur, NO_EXPERT)
        self._logits16.fill(0)  # rows handed out are copies: filling in place is safe
        self._hidden = [None] * self.model.n_moe
        self._position += 1
        self._token, self._phase, self._layer, self._top = int(token), int(phase), -1, -1
        self._token_cols = {
            "position": _frozen(np.array([self._position], dtype=np.int32)),
            "token": _frozen(np.array([self._token], dtype=np.int32)),
            "phase": _frozen(np.array([self._phase], dtype=np.int8))}
        self._step = None

    def update(self, layer: int, logits: np.ndarray, experts: np.ndarray,
               hidden: np.ndarray | None = None) -> None:
        """Layer ``layer`` (MoE index) of the current token has routed."""
        if self._position < 0:
            raise ExpertPredError("OnlineFeatures.update before next_token(): no current token")
        if not 0 <= layer < self.model.n_moe:
            raise ExpertPredError(f"layer {layer}: expected 0..{self.model.n_moe - 1}")
        self._logits[layer] = np.asarray(logits, dtype=np.float32).reshape(-1)
        self._logits16[layer] = self._logits[layer]
        self._cur[layer] = np.asarray(experts, dtype=np.int16).reshape(-1)
        self._hidden[layer] = None if hidden is None else np.asarray(hidden, np.float16)
        self._layer = layer
        self._top = max(self._top, layer)
        self._step = None

    def _step_columns(self) -> dict[str, Any]:
        """The columns every offset ``d`` of this layer-step shares, built once per step.

        Fresh copies of the state where it changes within a token (experts, layer logits,
        logits, hidden), read-only shared arrays where it does not (position, token, phase,
        layer, seq), so rows handed out stay valid after the next :meth:`update`; only
        ``history`` differs between offsets.
        """
        l_ = self._layer
        cur = self._cur.copy()
        lg = self._logits16.copy()
        if self._top > l_:  # a layer above l_ was updated: mask it as the batch does
            cur[l_ + 1:] = NO_EXPERT
            lg[l_ + 1:] = 0
        if self._seq_col is None or self._seq_col[0] != self.seq_id:
            self._seq_col = (self.seq_id, _frozen(np.array([self.seq_id], dtype=np.int64)))
        h = self._hidden[l_]
        self._step = {
            "model": self.model, "seq": self._seq_col[1], **self._token_cols,
            "layer": self._layers[l_], "logits": self._logits[l_:l_ + 1].copy(),
            "experts": cur[None], "prev_experts": self._prev[None],
            "hidden": None if h is None else h[None].copy(), "targets": None,
            "layer_logits": lg[None],
        }
        return self._step

    def features(self, d: int) -> FeatureBatch | None:
        """One-row batch predicting layer ``l + d`` from the last updated layer ``l``.

        The fast one-row path: the columns shared by all offsets are built once per
        layer-step; per ``d`` only the history row (a view of a never-mutated array) and
        the cached config change. Equal bit for bit to :func:`sequence_features`' row.
        """
        l_ = self._layer
        if l_ < 0 or l_ + d >= self.model.n_moe:
            return None
        cols = self._step if self._step is not None else self._step_columns()
        cfg = self._configs.get(d)
        if cfg is None:
            cfg = self._configs[d] = FeatureConfig(d=d, history_decay=self.history_decay)
        # bypass the frozen dataclass __init__ (13 object.__setattr__ calls): same fields
        x = object.__new__(FeatureBatch)
        x.__dict__.update(cols, config=cfg, history=self._hist[l_ + d:l_ + d + 1])
        return x


def _frozen(a: np.ndarray) -> np.ndarray:
    """``a`` made read-only (a column shared by several rows must not be written)."""
    a.flags.writeable = False
    return a


from .dense import (  # noqa: E402  (dense.py builds on the records above)
    DENSE_PARTS,
    EXTRA_PARTS,
    PARTS,
    DenseRow,
    Part,
    dense_features,
    design_parts,
    design_width,
)

__all__ = [
    "DENSE_PARTS", "EXTRA_PARTS", "NO_EXPERT", "PARTS", "DenseRow", "FeatureBatch",
    "FeatureConfig", "ModelInfo", "OnlineFeatures", "Part", "build_features", "concat",
    "dense_features", "design_parts", "design_width", "iter_feature_batches", "multihot",
    "sequence_features",
]
