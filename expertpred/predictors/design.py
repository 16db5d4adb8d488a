"""The input of the learned rungs: dense feature parts, plus gate look-ahead columns.

One :class:`Design` is fitted with a rung (which parts, layer one-hot or integer, the
router weights when gate look-ahead scores are inputs too), travels in its artifact spec,
and builds the design matrix the same way for a batch and for the online one-row case
(:class:`~expertpred.features.DenseRow`, bit for bit equal).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from ..features import (
    PARTS,
    DenseRow,
    FeatureBatch,
    ModelInfo,
    dense_features,
    design_width,
)
from .checks import ArtifactCheck
from .gate import gate_scores, load_gate

log = logging.getLogger(__name__)


class Design:
    """Which columns a learned rung reads, and how to build them."""

    def __init__(self, model: ModelInfo, parts: tuple[str, ...], layer_onehot: bool,
                 n_features: int, gate_routers: np.ndarray, gate_norms: np.ndarray,
                 owner: str = "") -> None:
        self.model = model
        self.parts = tuple(parts)
        self.layer_onehot = layer_onehot
        self.n_features = int(n_features)  # columns at fit time (hidden included or not)
        self.gate_routers = np.ascontiguousarray(gate_routers, dtype=np.float32)
        self.gate_norms = np.ascontiguousarray(gate_norms, dtype=np.float32)
        self.owner = owner  # the rung's name, for messages
        self.uses_gate = self.gate_routers.size > 0
        gate_w = model.n_expert if self.uses_gate else 0
        self.n_features_without_hidden = design_width(model, self.parts, layer_onehot) + gate_w
        self.uses_hidden = ("hidden" in self.parts
                            and self.n_features > self.n_features_without_hidden)
        self._rows: dict[int, DenseRow] = {}  # one-row encoders by hidden width

    @classmethod
    def fit(cls, data: FeatureBatch, parts: tuple[str, ...], layer_onehot: bool,
            gguf_path: str, owner: str) -> Design:
        """Gate columns when ``gguf_path`` is set and the data has hidden states."""
        if gguf_path and data.hidden is not None:
            routers, norms = load_gate(gguf_path, data)
        else:
            routers, norms = np.zeros((0, 0, 0), np.float32), np.zeros((0, 0), np.float32)
        n_h = data.hidden.shape[1] if data.hidden is not None and "hidden" in parts else 0
        width = design_width(data.model, parts, layer_onehot, n_h)
        width += data.model.n_expert if routers.size else 0
        return cls(data.model, parts, layer_onehot, width, routers, norms, owner)

    @property
    def needs_hidden(self) -> bool:
        return self.uses_hidden or self.uses_gate

    def spec(self) -> dict[str, Any]:
        return {"parts": list(self.parts), "layer_onehot": self.layer_onehot,
                "gate": self.uses_gate, "n_features": self.n_features,
                "uses_hidden": self.uses_hidden, "builder": "expertpred.features.dense_features"}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"gate_routers": self.gate_routers, "gate_norms": self.gate_norms}

    @staticmethod
    def check_artifact(c: ArtifactCheck, m: ModelInfo, spec: Mapping[str, Any],
                       a: Mapping[str, np.ndarray]) -> int:
        """Check a learned rung's design spec and gate arrays; return its input width."""
        parts = c.typed(spec, "parts", list, "spec")
        if not parts or not all(isinstance(p, str) and p in PARTS for p in parts):
            raise c.fail(f"spec.parts {parts!r}, expected names from {sorted(PARTS)}")
        for key in ("layer_onehot", "gate", "uses_hidden"):
            c.typed(spec, key, bool, "spec")
        n_features = c.typed(spec, "n_features", int, "spec")
        if not 0 < n_features <= 1 << 24:
            raise c.fail(f"spec.n_features {n_features}, expected 1..{1 << 24}")
        if spec["gate"]:
            c.array(a, "gate_routers", "f", (m.n_moe, m.n_expert, m.n_embd))
            c.array(a, "gate_norms", "f", (m.n_moe, m.n_embd))
        else:
            c.array(a, "gate_routers", "f", (0, 0, 0))
            c.array(a, "gate_norms", "f", (0, 0))
        return n_features

    @classmethod
    def from_artifact(cls, model: ModelInfo, spec: dict[str, Any],
                      arrays: dict[str, np.ndarray], owner: str) -> Design:
        return cls(model, tuple(spec["parts"]), bool(spec["layer_onehot"]),
                   int(spec["n_features"]), arrays["gate_routers"], arrays["gate_norms"],
                   owner)

    def matrix(self, x: FeatureBatch) -> np.ndarray:
        """float32 (n, F); for one row a reused buffer (valid until the next call)."""
        if len(x) == 1 and not self.uses_gate:  # online: one preallocated row, same values
            n_h = 0 if x.hidden is None or "hidden" not in self.parts else x.hidden.shape[1]
            enc = self._rows.get(n_h)
            if enc is None:
                enc = self._rows[n_h] = DenseRow(self.model, self.parts, self.layer_onehot,
                                                 n_hidden=n_h)
            if enc.width == self.n_features:
                return enc.row(x)
        cols = [dense_features(x, self.parts, layer_onehot=self.layer_onehot)]
        if self.uses_gate:
            if x.hidden is None:
                raise ExpertPredError(f"{self.owner}: trained with gate look-ahead features, "
                                      "but these features have no hidden states")
            cols.append(gate_scores(x, self.gate_routers, self.gate_norms))
        z = np.concatenate(cols, axis=1) if len(cols) > 1 else cols[0]
        if z.shape[1] != self.n_features:
            raise ExpertPredError(f"{self.owner}: {z.shape[1]} input features, trained with "
                                  f"{self.n_features} (hidden states present in one and not "
                                  "the other?)")
        return z
