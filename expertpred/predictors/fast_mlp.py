"""An MLP sized and shaped for the inference thread: the default learned predictor.

Trained like :class:`~expertpred.predictors.mlp.MLPPredictor` (torch, multi-label BCE,
per-source-layer heads), with three differences that make one online layer-step cost a
few matrix-vector products:

1. its inputs add ``layer_logits`` — this token's router logits at every layer <= l, the
   residual stream seen through every router so far, which the routed experts alone
   summarise poorly (tiny-qwen3moe, 32 experts: +2 points recall@4 in a 64-wide MLP);
2. the input standardisation is folded into the first layer after training
   (``W0 / std``, ``b0 - (W0 / std) @ mean``), so a row goes into the first product raw;
3. the one-row kernel (:class:`~.fast_mlp_row.RowKernel`) never builds the design row and
   accumulates the first layer over a token's layers: the parts that only grow within a
   token (every layer's logits and experts so far, the previous token's experts) are a
   running sum, so a step adds one layer's worth and the per-step inputs; its arithmetic
   is one compiled call (:mod:`.fast_mlp_jit`: numba's code, compiled ahead of time so that
   numba stays out of the serving process (:mod:`.fast_mlp_aot`), with a numpy twin that
   gives the same values).

The batch kernel (evaluation) computes the same function on many rows.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch, ModelInfo, design_parts
from .base import Arrays, Spec
from .checks import ArtifactCheck
from .design import Design
from .fast_mlp_row import RowKernel
from .mlp import MLPPredictor, check_layers

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
        self._fold()

    def set_weights(self, design: Design, mean: np.ndarray, std: np.ndarray,
                    weights: list[np.ndarray]) -> None:
        super().set_weights(design, mean, std, weights)
        self._fold()

    def _fold(self) -> None:
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
        self._row_kernel: dict[int, RowKernel] = {}  # by hidden width of the rows
        if not self.design_.uses_gate and not self.design_.uses_hidden:
            # the plugin's kernel, built (and its step compiled) now: at load, not on the
            # first token
            self._row_kernel[0] = RowKernel(self.design_, self.weights_, 0)

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        if len(x) == 1 and not self.design_.uses_gate:
            return self._scores_row(x)[None]
        a = self.design_.matrix(x)
        for w, b in self._hidden:
            a = np.maximum(a @ w.T + b, 0.0)
        lay = x.layer.astype(np.int64)
        return np.einsum("nh,neh->ne", a, self._heads[lay]) + self._head_bias[lay]

    def _scores_row(self, x: FeatureBatch) -> np.ndarray:
        """(E,) scores of one row: :class:`~.fast_mlp_row.RowKernel` (the first layer
        accumulated over the token's layers, biases folded in)."""
        return self._kernel(x).scores(x)

    def _kernel(self, x: FeatureBatch) -> RowKernel:
        """The row kernel for the hidden width of ``x`` (built on first use)."""
        n_h = 0 if x.hidden is None or "hidden" not in self.design_.parts else x.hidden.shape[1]
        kernel = self._row_kernel.get(n_h)
        if kernel is None:
            kernel = self._row_kernel[n_h] = RowKernel(self.design_, self.weights_, n_h)
        return kernel

    def predict_topk(self, x: FeatureBatch, k: int) -> np.ndarray:
        """One row (the plugin's ungated call): the kernel's own top-k, no score copy."""
        if len(x) != 1 or self.design_.uses_gate or not 1 <= k <= self.model_.n_expert:
            return super().predict_topk(x, k)
        self._check(x)
        return self._kernel(x).topk_shares(x, k)[0][None]

    def predict_topk_shares(self, x: FeatureBatch, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The plugin's gated call in one pass over a fresh score row (no copy, no cache):
        the same operations and values as the generic one."""
        if len(x) != 1 or self.design_.uses_gate:
            return super().predict_topk_shares(x, k)
        self._check(x)
        return self._kernel(x).topk_shares(x, k)

    # --- the artifact ------------------------------------------------------------------------
    @classmethod
    def check_artifact(cls, c: ArtifactCheck, m: ModelInfo, spec: Spec, a: Arrays) -> None:
        f = Design.check_artifact(c, m, spec, a)
        acts = c.typed(spec, "activations", list, "spec")
        n = len(acts) - 1
        if n not in (1, 2) or acts != ["relu"] * n + ["linear"]:
            raise c.fail(f"spec.activations {acts!r}, expected relu (once or twice), linear")
        check_layers(c, m, a, f, n)

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
