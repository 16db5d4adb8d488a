"""Gate look-ahead: score layer l + d's experts with its own router applied to layer l's input.

The traced hidden state is ``ffn_norm-l`` — the RMS-normed residual with layer l's norm
weight applied, i.e. exactly what layer l's router reads. The residual stream changes
slowly, so ``hidden_l @ W_router(l + d)ᵀ`` approximates layer l + d's router logits without
any training (the weights come from the GGUF). With ``renorm=True`` layer l's norm weight is
swapped for layer l + d's first — ``hidden_l / g_l * g_(l+d)`` is the RMS-normed residual of
layer l as layer l + d's norm would present it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch, ModelInfo
from .base import Arrays, Predictor, Spec
from .checks import ArtifactCheck

log = logging.getLogger(__name__)


class GateLookaheadPredictor(Predictor, name="gate-lookahead"):
    """Router of layer l + d (read from ``gguf_path``) applied to the hidden state at l."""

    needs_hidden = True

    def __init__(self, gguf_path: str = "", renorm: bool = True) -> None:
        self.gguf_path = gguf_path  # the model the traces came from
        self.renorm = renorm  # swap ffn_norm weights of layer l for those of layer l + d

    def _fit(self, data: FeatureBatch) -> None:
        self.routers_, self.norms_ = load_gate(self.gguf_path, data, self.renorm)

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        return gate_scores(x, self.routers_, self.norms_)

    @classmethod
    def check_artifact(cls, c: ArtifactCheck, m: ModelInfo, spec: Spec, a: Arrays) -> None:
        c.array(a, "routers", "f", (m.n_moe, m.n_expert, m.n_embd))
        c.array(a, "norms", "f", (m.n_moe, m.n_embd))

    def _to_artifact(self) -> tuple[Spec, Arrays]:
        return {}, {"routers": self.routers_, "norms": self.norms_}

    def _from_artifact(self, spec: Spec, arrays: Arrays) -> None:
        self.routers_, self.norms_ = arrays["routers"], arrays["norms"]


def load_gate(gguf_path: str, data: FeatureBatch,
              renorm: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Routers (L, E, D) and ffn_norm weights (L, D) (ones without ``renorm``) of the model."""
    from ..gguf.layout import read_tensors

    if not gguf_path:
        raise ExpertPredError("gate-lookahead: gguf_path is empty; expected the model's "
                              ".gguf file (router weights are read from it)")
    path = Path(gguf_path)
    if not path.is_file():
        raise ExpertPredError(f"gate-lookahead: {path}: no such model file")
    if data.hidden is None:
        raise ExpertPredError("gate-lookahead: needs hidden states, the features have none")
    m = data.model
    routers = [f"blk.{b}.ffn_gate_inp.weight" for b in m.moe_layers]
    norm_names = [f"blk.{b}.ffn_norm.weight" for b in m.moe_layers]
    found = read_tensors(path, routers + (norm_names if renorm else []))  # one header pass
    missing = [n for n in routers if n not in found]
    if missing:
        raise ExpertPredError(f"gate-lookahead: {path}: no tensor {missing[0]}")
    w = np.stack([found[n] for n in routers])
    dim = data.hidden.shape[1]
    if w.shape[1:] != (m.n_expert, dim):
        raise ExpertPredError(f"gate-lookahead: {path}: router shape {w.shape[1:]}, "
                              f"expected ({m.n_expert}, {dim}) from the trace")
    norms = (np.stack([found[n].reshape(-1) for n in norm_names])
             if renorm and all(n in found for n in norm_names) else None)
    if norms is not None and norms.shape[1] != dim:
        norms = None
    if renorm and norms is None:
        log.warning("%s: no usable blk.N.ffn_norm.weight; gate look-ahead without renorm", path)
    return w, (np.ones((m.n_moe, dim), np.float32) if norms is None
               else norms.astype(np.float32))


def gate_scores(x: FeatureBatch, routers: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """float32 (n, E): ``(hidden_l / g_l * g_(l+d)) @ W_(l+d)ᵀ`` for every row."""
    if x.hidden is None:
        raise ExpertPredError("gate look-ahead: the features have no hidden states "
                              "(router input)")
    h = x.hidden.astype(np.float32)
    sl, tl = x.layer.astype(np.int64), x.target_layer
    out = np.empty((len(x), routers.shape[1]), dtype=np.float32)
    for src in np.unique(sl):
        for tgt in np.unique(tl[sl == src]):
            rows = (sl == src) & (tl == tgt)
            scale = norms[tgt] / np.where(norms[src] == 0, 1, norms[src])
            out[rows] = (h[rows] * scale) @ routers[tgt].T
    return out
