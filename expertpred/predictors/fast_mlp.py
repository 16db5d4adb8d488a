"""An MLP sized and shaped for the inference thread: the default learned predictor.

Trained like :class:`~expertpred.predictors.mlp.MLPPredictor` (torch, multi-label BCE,
per-source-layer heads), with three differences that make one online layer-step cost a
few matrix-vector products:

1. its inputs add ``layer_logits`` — this token's router logits at every layer <= l, the
   residual stream seen through every router so far, which the routed experts alone
   summarise poorly (tiny-qwen3moe, 32 experts: +2 points recall@4 in a 64-wide MLP);
2. the input standardisation is folded into the first layer after training
   (``W0 / std``, ``b0 - (W0 / std) @ mean``), so a row goes into the first product raw;
3. the one-row kernel never builds the design row: the first layer is a gemv over the
   real-valued inputs (logits, history, layer_logits, position, hidden) plus the sum of the
   first-layer columns of the multi-hot inputs that are 1 (a gather of ~L·k rows instead
   of a product with mostly zeros); later layers are gemvs (``W @ a`` on 1-D vectors: a
   (1, F) @ (F, H) matmul is a slower matrix-matrix call).

The batch kernel (evaluation) computes the same function on many rows.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ExpertPredError
from ..features import DenseRow, FeatureBatch, ModelInfo, design_parts
from .base import Arrays, Spec
from .checks import ArtifactCheck
from .design import Design
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
        self._acts = [np.empty(w.shape[0], dtype=np.float32) for w, _ in self._hidden]
        self._row_kernel: dict[int, _SplitFirstLayer] = {}  # by hidden width of the rows

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        if len(x) == 1 and not self.design_.uses_gate:
            return self._scores_row(x)
        a = self.design_.matrix(x)
        for w, b in self._hidden:
            a = np.maximum(a @ w.T + b, 0.0)
        lay = x.layer.astype(np.int64)
        return np.einsum("nh,neh->ne", a, self._heads[lay]) + self._head_bias[lay]

    def _scores_row(self, x: FeatureBatch) -> np.ndarray:
        """One row: the split first layer, then a gemv per layer into preallocated
        activations, then its source layer's head."""
        n_h = 0 if x.hidden is None or "hidden" not in self.design_.parts else x.hidden.shape[1]
        first = self._row_kernel.get(n_h)
        if first is None:
            first = self._row_kernel[n_h] = _SplitFirstLayer(self.design_, self._hidden[0],
                                                             n_h)
        a = first(x, self._acts[0])
        for (w, b), out in zip(self._hidden[1:], self._acts[1:]):
            np.dot(w, a, out=out)
            out += b
            np.maximum(out, 0.0, out=out)
            a = out
        li = int(x.layer[0])
        s = np.dot(self._heads[li], a)
        s += self._head_bias[li]
        return s[None]

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


class _SplitFirstLayer:
    """``relu(W0 x + b0)`` for one design row ``x`` without building it: a gemv over the
    real-valued columns plus a gather-sum of the columns whose multi-hot input is 1 (the
    layer one-hot folded into a per-layer bias). Same function as the dense product, summed
    in another order (float32 rounding differs in the last bits)."""

    REAL = ("logits", "history", "layer_logits", "position", "hidden")

    def __init__(self, design: Design, first: tuple[np.ndarray, np.ndarray], n_hidden: int):
        w0, b0 = first
        self.enc = DenseRow(design.model, design.parts, design.layer_onehot, n_hidden)
        if self.enc.width != design.n_features:
            raise ExpertPredError(f"{design.owner}: {self.enc.width} input features, trained "
                                  f"with {design.n_features} (hidden states present in one "
                                  "and not the other?)")
        spans = self.enc.spans
        self.real = [p for p in self.REAL if p in spans and spans[p][1] > spans[p][0]]
        cols = np.concatenate([np.arange(*spans[p]) for p in self.real]) if self.real \
            else np.zeros(0, np.intp)
        self.w_real = np.ascontiguousarray(w0[:, cols])
        # rows = input columns, plus a zero row for padding ids (the DenseRow trash slot)
        self.w_cols = np.zeros((w0.shape[1] + 1, w0.shape[0]), dtype=np.float32)
        self.w_cols[:-1] = w0.T
        lo = spans["layer"][0] if "layer" in spans and design.layer_onehot else None
        n_l = design.model.n_moe
        self.bias = [b0 + (w0[:, lo + li] if lo is not None else 0.0) for li in range(n_l)]
        self.bias = [np.ascontiguousarray(b, dtype=np.float32) for b in self.bias]
        self.layer_int = spans["layer"][0] if "layer" in spans and not design.layer_onehot \
            else None
        self._log1p: dict[int, np.ndarray] = {}
        self._ones = np.ones(n_l * design.model.n_expert_used * 4 + 8, dtype=np.float32)

    def _real(self, x: FeatureBatch) -> np.ndarray:
        vals = []
        for p in self.real:
            if p == "logits":
                vals.append(x.logits[0])
            elif p == "history":
                vals.append(x.history[0])
            elif p == "layer_logits":
                vals.append(x.layer_logits[0].reshape(-1))
            elif p == "hidden":
                vals.append(x.hidden[0])
            else:  # position: the same float32 log1p as the batch encoder
                t = int(x.position[0])
                v = self._log1p.get(t)
                if v is None:
                    v = self._log1p[t] = np.log1p(x.position[:1].astype(np.float32))
                vals.append(v)
        return np.concatenate(vals).astype(np.float32, copy=False)

    def __call__(self, x: FeatureBatch, out: np.ndarray) -> np.ndarray:
        li = int(x.layer[0])
        pos_a, off, _ = self.enc._plans.get((li, x.config.d)) or self.enc.plan(li, x.config.d)
        if self.real:
            np.dot(self.w_real, self._real(x), out=out)
        else:
            out.fill(0.0)
        if len(pos_a):
            ids = np.concatenate((x.experts[0].ravel(), x.prev_experts[0].ravel()))[pos_a]
            rows = self.w_cols.take(np.where(ids >= 0, off + ids, self.enc.width), axis=0)
            out += np.dot(self._ones[:len(rows)], rows)  # a gemv: faster than .sum(axis=0)
        if self.layer_int is not None:
            out += self.w_cols[self.layer_int] * np.float32(li)
        out += self.bias[li]
        np.maximum(out, 0.0, out=out)
        return out
