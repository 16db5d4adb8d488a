"""Gate look-ahead: score layer l + d's experts with its own router applied to layer l's input.

The traced hidden state is ``ffn_norm-l`` — the RMS-normed residual with layer l's norm
weight applied, i.e. exactly what layer l's router reads. The residual stream changes
slowly, so ``hidden_l @ W_router(l + d)ᵀ`` approximates layer l + d's router logits without
any training (the weights come from the GGUF).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch
from .base import Predictor

log = logging.getLogger(__name__)


class GateLookaheadPredictor(Predictor, name="gate-lookahead"):
    """Router of layer l + d (read from ``gguf_path``) applied to the hidden state at l."""

    needs_hidden = True

    def __init__(self, gguf_path: str = "") -> None:
        self.gguf_path = gguf_path  # the model the traces came from

    def _fit(self, data: FeatureBatch) -> None:
        from ..layout import router_weight

        if not self.gguf_path:
            raise ExpertPredError("gate-lookahead: gguf_path is empty; expected the model's "
                                  ".gguf file (router weights are read from it)")
        path = Path(self.gguf_path)
        if not path.is_file():
            raise ExpertPredError(f"gate-lookahead: {path}: no such model file")
        m = data.model
        ws = [router_weight(path, blk) for blk in m.moe_layers]
        w = np.stack(ws).astype(np.float32)
        dim = data.hidden.shape[1]
        if w.shape[1:] != (m.n_expert, dim):
            raise ExpertPredError(f"gate-lookahead: {path}: router shape {w.shape[1:]}, "
                                  f"expected ({m.n_expert}, {dim}) from the trace")
        self.routers_ = w

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        h = x.hidden.astype(np.float32)
        tl = x.target_layer
        out = np.empty((len(x), self.routers_.shape[1]), dtype=np.float32)
        for layer in np.unique(tl):
            rows = tl == layer
            out[rows] = h[rows] @ self.routers_[layer].T
        return out
