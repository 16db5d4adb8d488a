"""The in-memory record of one traced sequence, shared by both tracer backends and the writer."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Phase(IntEnum):
    """Whether a token was part of the prompt (batched prefill) or generated one at a time."""

    PROMPT = 0
    DECODE = 1


@dataclass
class SequenceTrace:
    """Routing of every token of one sequence at every MoE layer.

    ``L`` counts MoE layers only (their block indices are ``MoELayout.moe_layers`` and the
    dataset manifest's ``moe_layers``); ``k`` = n_expert_used; ``E`` = n_expert.
    """

    seq_id: int  # index of the prompt in its prompt set: the resume / split key
    prompt_id: str  # stable id from the prompt file
    domain: str  # "code", "prose", or the user's label
    tokens: np.ndarray  # int32 (T,)
    phase: np.ndarray  # int8 (T,), Phase values
    experts: np.ndarray  # int16 (T, L, k), selected experts in rank order (best first)
    weights: np.ndarray  # float32 (T, L, k), mixing weights of the selected experts
    logits: np.ndarray  # float32 (T, L, E), the router scores the arch selects on
    hidden: np.ndarray | None = None  # float16 (T, L, D), router input (ffn_norm-L), optional
    text: str = ""  # generated text (decode phase), for checks and provenance

    def __post_init__(self) -> None:
        t = len(self.tokens)
        for name in ("phase", "experts", "weights", "logits"):
            arr = getattr(self, name)
            if len(arr) != t:
                raise ValueError(f"SequenceTrace.{name}: {len(arr)} rows, expected {t} (tokens)")
        if self.experts.shape != self.weights.shape:
            raise ValueError(f"experts {self.experts.shape} != weights {self.weights.shape}")

    @property
    def n_tokens(self) -> int:
        return int(len(self.tokens))
