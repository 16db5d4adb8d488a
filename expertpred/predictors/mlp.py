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
from ..features import DENSE_PARTS, EXTRA_PARTS, FeatureBatch, dense_features, multihot
from .base import Predictor
from .gate import GateFeatures

log = logging.getLogger(__name__)


class MLPPredictor(GateFeatures, Predictor, name="mlp"):
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

    def _design(self, x: FeatureBatch) -> np.ndarray:
        parts = tuple(p for p in DENSE_PARTS if self.use_hidden or p != "hidden")
        parts += EXTRA_PARTS if self.all_layers else ()
        return np.concatenate([dense_features(x, parts, layer_onehot=True),
                               *self._gate_columns(x)], axis=1)

    def _fit(self, data: FeatureBatch) -> None:
        import torch

        if self.loss not in ("bce", "softmax"):
            raise ExpertPredError(f"mlp loss={self.loss!r}: expected bce or softmax")
        rng = np.random.default_rng(self.seed)
        if len(data) > self.max_rows:
            data = data.take(np.sort(rng.permutation(len(data))[: self.max_rows]))
        n_l, e = data.model.n_moe, data.model.n_expert
        self._fit_gate(data)
        x = self._design(data)
        self.mean_ = x.mean(axis=0).astype(np.float32)
        self.std_ = (x.std(axis=0) + 1e-3).astype(np.float32)
        self.n_features_ = int(x.shape[1])
        xs = torch.from_numpy((x - self.mean_) / self.std_)
        y = multihot(data.targets, e)
        if self.loss == "softmax":
            y = y / np.maximum(y.sum(axis=1, keepdims=True), 1.0)
        ys = torch.from_numpy(y)
        head = torch.from_numpy(data.layer.astype(np.int64))

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small matrices: one thread is fastest, and deterministic
        try:
            self._train(torch, xs, ys, head, n_l, e)
        finally:
            torch.set_num_threads(threads)

    def _train(self, torch: Any, xs: Any, ys: Any, head: Any, n_l: int, e: int) -> None:
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        h = self.hidden_size
        net = torch.nn.Sequential(
            torch.nn.Linear(xs.shape[1], h), torch.nn.ReLU(),
            torch.nn.Linear(h, h), torch.nn.ReLU(),
            torch.nn.Linear(h, n_l * e),
        )
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps = self.epochs * ((len(xs) + self.batch_size - 1) // self.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps)
        for epoch in range(self.epochs):
            perm = torch.randperm(len(xs), generator=gen)
            total = 0.0
            for i in range(0, len(xs), self.batch_size):
                idx = perm[i: i + self.batch_size]
                out = net(xs[idx]).view(len(idx), n_l, e)
                logit = out[torch.arange(len(idx)), head[idx]]
                if self.loss == "bce":
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, ys[idx])
                else:
                    loss = -(ys[idx] * torch.log_softmax(logit, dim=1)).sum(dim=1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            log.debug("mlp epoch %d loss %.4f", epoch, total / len(xs))
        self.weights_ = [p.detach().numpy().astype(np.float32).copy()
                         for p in net.parameters()]

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        z = (self._design(x) - self.mean_) / self.std_
        if z.shape[1] != self.n_features_:
            raise ExpertPredError(f"mlp: {z.shape[1]} input features, trained with "
                                  f"{self.n_features_} (hidden states present in one and "
                                  "not the other?)")
        w0, b0, w1, b1, w2, b2 = self.weights_
        a = np.maximum(z @ w0.T + b0, 0.0)
        a = np.maximum(a @ w1.T + b1, 0.0)
        e = self.model_.n_expert
        lay = x.layer.astype(np.int64)
        w2l = w2.reshape(-1, e, w2.shape[1])[lay]  # (n, E, H)
        b2l = b2.reshape(-1, e)[lay]
        return (np.einsum("nh,neh->ne", a, w2l) + b2l).astype(np.float32)

    def _get_state(self) -> dict[str, Any]:
        st: dict[str, Any] = {"mean_": self.mean_, "std_": self.std_,
                              "n_features_": self.n_features_, **self._gate_state()}
        for i, w in enumerate(self.weights_):
            st[f"w{i}_"] = w
        return st

    def _set_state(self, state: dict[str, Any]) -> None:
        self.mean_, self.std_ = state["mean_"], state["std_"]
        self.n_features_ = int(state["n_features_"])
        self.gate_routers_, self.gate_norms_ = state["gate_routers_"], state["gate_norms_"]
        self.weights_ = [state[f"w{i}_"] for i in range(6)]
