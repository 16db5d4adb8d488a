"""A small MLP (torch for training, numpy for inference) with one output head per layer.

Inputs are :func:`~expertpred.features.dense_features` (standardised); two ReLU layers are
shared by all source layers and the output has ``L × E`` units, of which a row reads the
``E`` of its own source layer — a per-layer linear head on a shared trunk. Loss: multi-label
BCE (``loss="bce"``) or softmax cross-entropy against the normalised expert set
(``loss="softmax"``, a listwise ranking loss). Inference is plain numpy, so the prefetch
plugin needs no torch and save → load predicts bit-identically.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch, ModelInfo, design_parts, multihot
from .base import Arrays, Predictor, Spec
from .checks import ArtifactCheck
from .design import Design

log = logging.getLogger(__name__)


class MLPPredictor(Predictor, name="mlp"):
    """Two hidden layers, per-layer heads; seeded, CPU, a few seconds to train."""

    min_rows = 50

    def __init__(self, hidden_size: int = 128, epochs: int = 8, lr: float = 2e-3,
                 batch_size: int = 512, weight_decay: float = 1e-5, loss: str = "bce",
                 use_hidden: bool = True, all_layers: bool = True, max_rows: int = 200000,
                 gguf_path: str = "", seed: int = 0) -> None:
        self.hidden_size = hidden_size
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.loss = loss  # "bce" (multi-label) or "softmax" (listwise)
        self.use_hidden = use_hidden  # include the hidden state at l when traced
        self.all_layers = all_layers  # every layer's experts, this and the previous token
        self.max_rows = max_rows
        self.gguf_path = gguf_path  # model file: gate look-ahead scores become inputs too
        self.seed = seed

    @property
    def uses_hidden(self) -> bool:
        return self.design_.needs_hidden

    def _fit(self, data: FeatureBatch) -> None:
        import torch

        if self.loss not in ("bce", "softmax"):
            raise ExpertPredError(f"{self.name} loss={self.loss!r}: expected bce or softmax")
        rng = np.random.default_rng(self.seed)
        if len(data) > self.max_rows:
            data = data.take(np.sort(rng.permutation(len(data))[: self.max_rows]))
        n_l, e = data.model.n_moe, data.model.n_expert
        self.design_ = Design.fit(data, self._parts(), True, self.gguf_path, self.name)
        x = self.design_.matrix(data)
        self.mean_ = x.mean(axis=0).astype(np.float32)
        self.std_ = (x.std(axis=0) + 1e-3).astype(np.float32)
        xs = torch.from_numpy((x - self.mean_) / self.std_)
        ys = torch.from_numpy(self.labels(data.targets, e))
        head = torch.from_numpy(data.layer.astype(np.int64))

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small matrices: one thread is fastest, and deterministic
        try:
            self._train(torch, xs, ys, head, n_l, e)
        finally:
            torch.set_num_threads(threads)

    def _parts(self) -> tuple[str, ...]:
        return design_parts(self.use_hidden, self.all_layers)

    def _widths(self) -> tuple[int, ...]:
        """Hidden layer widths (each Linear + ReLU), before the per-layer heads."""
        return (self.hidden_size, self.hidden_size)

    def _train(self, torch: Any, xs: Any, ys: Any, head: Any, n_l: int, e: int) -> None:
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        net = self.make_net(torch, xs.shape[1], n_l, e)
        steps = self.epochs * ((len(xs) + self.batch_size - 1) // self.batch_size)
        opt, sched = self.make_optimizer(torch, net, steps)
        for epoch in range(self.epochs):
            perm = torch.randperm(len(xs), generator=gen)
            total = 0.0
            for i in range(0, len(xs), self.batch_size):
                idx = perm[i: i + self.batch_size]
                loss = self.batch_loss(torch, net, xs[idx], ys[idx], head[idx], n_l, e)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            log.debug("%s epoch %d loss %.4f", self.name, epoch, total / len(xs))
        self.weights_ = [p.detach().numpy().astype(np.float32).copy()
                         for p in net.parameters()]

    # --- the training pieces, shared with the data-parallel fit (learn/ddp.py) -------------
    def make_net(self, torch: Any, n_in: int, n_l: int, e: int) -> Any:
        """The network (seed torch first): hidden Linear + ReLU layers, then L·E outputs."""
        layers, w = [], n_in
        for h in self._widths():
            layers += [torch.nn.Linear(w, h), torch.nn.ReLU()]
            w = h
        return torch.nn.Sequential(*layers, torch.nn.Linear(w, n_l * e))

    def make_optimizer(self, torch: Any, net: Any, steps: int) -> tuple[Any, Any]:
        """AdamW with a one-cycle learning rate over ``steps`` optimizer steps."""
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps)
        return opt, sched

    def batch_loss(self, torch: Any, net: Any, x: Any, y: Any, head: Any, n_l: int,
                   e: int) -> Any:
        """The loss of one batch: each row's logits are its source layer's head."""
        out = net(x).view(len(x), n_l, e)
        logit = out[torch.arange(len(x)), head]
        if self.loss == "bce":
            return torch.nn.functional.binary_cross_entropy_with_logits(logit, y)
        return -(y * torch.log_softmax(logit, dim=1)).sum(dim=1).mean()

    def labels(self, targets: np.ndarray, e: int) -> np.ndarray:
        """float32 (n, E) training labels: the target set, normalised for ``softmax``."""
        y = multihot(targets, e)
        if self.loss == "softmax":
            y = y / np.maximum(y.sum(axis=1, keepdims=True), 1.0)
        return y

    def set_weights(self, design: Design, mean: np.ndarray, std: np.ndarray,
                    weights: list[np.ndarray]) -> None:
        """The learned state from a network trained elsewhere (the data-parallel fit)."""
        self.design_, self.mean_, self.std_, self.weights_ = design, mean, std, weights

    # --- scoring: numpy only, one kernel for batches and the online row ---------------------
    def _ready(self) -> None:
        super()._ready()
        e = self.model_.n_expert
        w0, b0, w1, b1, w2, b2 = self.weights_
        self._w2l = w2.reshape(-1, e, w2.shape[1])  # (L, E, H): one head per source layer
        self._b2l = b2.reshape(-1, e)
        # one-row path: transposed weights made contiguous once, preallocated activations
        self._w0t = np.ascontiguousarray(w0.T)
        self._w1t = np.ascontiguousarray(w1.T)
        self._w2t = np.ascontiguousarray(self._w2l.transpose(0, 2, 1))  # (L, H, E)
        self._z = np.empty((1, w0.shape[1]), dtype=np.float32)
        self._a0 = np.empty((1, w0.shape[0]), dtype=np.float32)
        self._a1 = np.empty((1, w1.shape[0]), dtype=np.float32)

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        """Standardise, ``relu(W0 z + b0)``, ``relu(W1 a + b1)``, the source layer's head."""
        if len(x) == 1:
            return self._scores_row(x)
        w0, b0, w1, b1, _, _ = self.weights_
        z = (self.design_.matrix(x) - self.mean_) / self.std_
        a = np.maximum(z @ w0.T + b0, 0.0)
        a = np.maximum(a @ w1.T + b1, 0.0)
        lay = x.layer.astype(np.int64)
        return (np.einsum("nh,neh->ne", a, self._w2l[lay]) + self._b2l[lay]).astype(np.float32)

    def _scores_row(self, x: FeatureBatch) -> np.ndarray:
        """The same operations on one row, into preallocated buffers (no temporaries)."""
        z = self.design_.matrix(x)
        _, b0, _, b1, _, _ = self.weights_
        np.subtract(z, self.mean_, out=self._z)
        np.divide(self._z, self.std_, out=self._z)
        a0, a1 = self._a0, self._a1
        np.matmul(self._z, self._w0t, out=a0)
        np.add(a0, b0, out=a0)
        np.maximum(a0, 0.0, out=a0)
        np.matmul(a0, self._w1t, out=a1)
        np.add(a1, b1, out=a1)
        np.maximum(a1, 0.0, out=a1)
        li = int(x.layer[0])
        out = a1 @ self._w2t[li]
        out += self._b2l[li]
        return out

    # --- the artifact ------------------------------------------------------------------------
    @classmethod
    def check_artifact(cls, c: ArtifactCheck, m: ModelInfo, spec: Spec, a: Arrays) -> None:
        f = Design.check_artifact(c, m, spec, a)
        if c.typed(spec, "activations", list, "spec") != ["relu", "relu", "linear"]:
            raise c.fail(f"spec.activations {spec['activations']!r}, expected relu, relu, linear")
        c.array(a, "mean", "f", (f,))
        std = c.array(a, "std", "f", (f,))
        if std.size and not (std > 0).all():
            raise c.fail("array 'std' has values <= 0, expected positive scales")
        check_layers(c, m, a, f, 2)

    def _to_artifact(self) -> tuple[Spec, Arrays]:
        spec = {**self.design_.spec(), "activations": ["relu", "relu", "linear"],
                "head": "per source layer: rows l*E..(l+1)*E of the last Linear"}
        arrays = {**self.design_.arrays(), "mean": self.mean_, "std": self.std_}
        for i, w in enumerate(self.weights_):
            arrays[f"{'wb'[i % 2]}{i // 2}"] = w
        return spec, arrays

    def _from_artifact(self, spec: Spec, arrays: Arrays) -> None:
        acts = tuple(spec["activations"])
        if acts != ("relu", "relu", "linear"):
            raise ExpertPredError(f"mlp artifact: activations {list(acts)}, this loader "
                                  "knows relu, relu, linear")
        self.design_ = Design.from_artifact(self.model_, spec, arrays, "mlp")
        self.mean_, self.std_ = arrays["mean"], arrays["std"]
        self.weights_ = [arrays[f"{'wb'[i % 2]}{i // 2}"] for i in range(6)]

    def _from_legacy(self, state: dict[str, Any]) -> None:
        spec = {"parts": design_parts(self.use_hidden, self.all_layers), "layer_onehot": True,
                "n_features": int(state["n_features_"]),
                "activations": ["relu", "relu", "linear"]}
        arrays = {"gate_routers": state["gate_routers_"], "gate_norms": state["gate_norms_"],
                  "mean": state["mean_"], "std": state["std_"],
                  **{f"{'wb'[i % 2]}{i // 2}": state[f"w{i}_"] for i in range(6)}}
        self._from_artifact(spec, arrays)


def check_layers(c: ArtifactCheck, m: ModelInfo, a: Arrays, f: int, n: int) -> None:
    """``n`` hidden Linear layers w0/b0 .. from ``f`` inputs, then the per-layer heads."""
    width = f
    for i in range(n):
        width_next = c.array(a, f"w{i}", "f", (None, width)).shape[0]
        c.array(a, f"b{i}", "f", (width_next,))
        width = width_next
    c.array(a, f"w{n}", "f", (m.n_moe * m.n_expert, width))
    c.array(a, f"b{n}", "f", (m.n_moe * m.n_expert,))
