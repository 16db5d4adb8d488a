"""An MLP sized and shaped for the inference thread: the default learned predictor.

Trained like :class:`~expertpred.predictors.mlp.MLPPredictor` (torch, multi-label BCE,
per-source-layer heads), with three differences that make one online layer-step cost a
few matrix-vector products:

1. its inputs add ``layer_logits`` — this token's router logits at every layer <= l, the
   residual stream seen through every router so far, which the routed experts alone
   summarise poorly (tiny-qwen3moe, 32 experts: +2 points recall@4 in a 64-wide MLP);
2. the input standardisation is folded into the first layer after training
   (``W0 / std``, ``b0 - (W0 / std) @ mean``), so a row goes into the first product raw;
3. the one-row kernel is ``W @ x`` on 1-D vectors (BLAS gemv) into preallocated buffers:
   for a (1, F) row times (F, H), numpy calls a matrix-matrix routine several times slower.

The batch kernel (evaluation) computes the same function on many rows.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch, design_parts
from .base import Arrays, Spec
from .design import Design
from .mlp import MLPPredictor

log = logging.getLogger(__name__)


class FastMLPPredictor(MLPPredictor, name="fast-mlp"):
    """``n_hidden`` ReLU layers of ``hidden_size``, per-layer heads, folded standardisation."""

    def __init__(self, hidden_size: int = 256, n_hidden: int = 1, epochs: int = 20,
                 lr: float = 3e-3, batch_size: int = 256, weight_decay: float = 1e-5,
                 loss: str = "bce", use_hidden: bool = True, all_layers: bool = True,
                 layer_logits: bool = True, max_rows: int = 200000, gguf_path: str = "",
                 seed: int = 0) -> None:
        super().__init__(hidden_size=hidden_size, epochs=epochs, lr=lr, batch_size=batch_size,
                         weight_decay=weight_decay, loss=loss, use_hidden=use_hidden,
                         all_layers=all_layers, max_rows=max_rows, gguf_path=gguf_path,
                         seed=seed)
        self.n_hidden = n_hidden  # 1 or 2 hidden layers
        self.layer_logits = layer_logits  # router logits of every layer <= l as inputs

    def _parts(self) -> tuple[str, ...]:
        extra = ("layer_logits",) if self.layer_logits else ()
        return design_parts(self.use_hidden, self.all_layers) + extra

    def _widths(self) -> tuple[int, ...]:
        if self.n_hidden not in (1, 2):
            raise ExpertPredError(f"fast-mlp n_hidden={self.n_hidden}: expected 1 or 2")
        return (self.hidden_size,) * self.n_hidden

    def _fit(self, data: FeatureBatch) -> None:
        self._widths()  # a bad n_hidden fails before training
        super()._fit(data)
        # fold the standardisation into the first layer: W0 ((x - m) / s) = (W0 / s) x - ...
        w0 = self.weights_[0] / self.std_[None, :]
        b0 = self.weights_[1] - w0 @ self.mean_
        self.weights_ = [np.ascontiguousarray(w0, dtype=np.float32), b0.astype(np.float32),
                         *self.weights_[2:]]
        del self.mean_, self.std_

    # --- scoring: numpy only --------------------------------------------------------------
    def _ready(self) -> None:
        super(MLPPredictor, self)._ready()
        e = self.model_.n_expert
        w_last, b_last = self.weights_[-2], self.weights_[-1]
        self._hidden = [(w, b) for w, b in zip(self.weights_[:-2:2], self.weights_[1:-2:2])]
        self._heads = np.ascontiguousarray(w_last.reshape(-1, e, w_last.shape[1]))  # (L, E, H)
        self._head_bias = b_last.reshape(-1, e)
        self._acts = [np.empty(w.shape[0], dtype=np.float32) for w, _ in self._hidden]

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        if len(x) == 1:
            return self._scores_row(x)
        a = self.design_.matrix(x)
        for w, b in self._hidden:
            a = np.maximum(a @ w.T + b, 0.0)
        lay = x.layer.astype(np.int64)
        return np.einsum("nh,neh->ne", a, self._heads[lay]) + self._head_bias[lay]

    def _scores_row(self, x: FeatureBatch) -> np.ndarray:
        """One row: gemv per layer into preallocated activations, then its layer's head."""
        a = self.design_.matrix(x)[0]
        for (w, b), out in zip(self._hidden, self._acts):
            np.dot(w, a, out=out)
            out += b
            np.maximum(out, 0.0, out=out)
            a = out
        li = int(x.layer[0])
        s = np.dot(self._heads[li], a)
        s += self._head_bias[li]
        return s[None]

    # --- the artifact ------------------------------------------------------------------------
    def _to_artifact(self) -> tuple[Spec, Arrays]:
        n = len(self._hidden)
        spec = {**self.design_.spec(), "activations": ["relu"] * n + ["linear"],
                "standardisation": "folded into w0 / b0",
                "head": "per source layer: rows l*E..(l+1)*E of the last Linear"}
        arrays = {**self.design_.arrays(),
                  **{f"{'wb'[i % 2]}{i // 2}": w for i, w in enumerate(self.weights_)}}
        return spec, arrays

    def _from_artifact(self, spec: Spec, arrays: Arrays) -> None:
        acts = list(spec["activations"])
        n = len(acts) - 1
        if n not in (1, 2) or acts != ["relu"] * n + ["linear"]:
            raise ExpertPredError(f"fast-mlp artifact: activations {acts}, this loader knows "
                                  "relu (1 or 2 times), linear")
        self.design_ = Design.from_artifact(self.model_, spec, arrays, self.name)
        self.weights_ = [arrays[f"{'wb'[i % 2]}{i // 2}"] for i in range(2 * n + 2)]
