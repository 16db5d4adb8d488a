"""The oracle of the prefetch plugin: the true routing of one recorded greedy run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ExpertPredError
from ..trace.record import SequenceTrace


@dataclass(frozen=True)
class OracleTrace:
    """True routing of one greedy run: ``experts[t, l]`` = the k experts of MoE layer l at
    position t; ``tokens[t]`` the token at position t (prompt then generated)."""

    tokens: np.ndarray  # int32 (T,)
    experts: np.ndarray  # int16 (T, L, k)

    @classmethod
    def from_sequence(cls, seq: SequenceTrace) -> OracleTrace:
        return cls(np.asarray(seq.tokens, np.int32), np.asarray(seq.experts, np.int16))

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        with open(path, "wb") as f:
            np.savez(f, tokens=self.tokens, experts=self.experts)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], prompt_tokens: Sequence[int] | None = None,
             ) -> OracleTrace:
        """From an ``.npz`` written by :meth:`save`, or a trace dataset directory (the
        sequence whose tokens start with ``prompt_tokens``; the first one without)."""
        p = Path(path)
        if p.is_file():
            try:
                with np.load(p, allow_pickle=False) as z:
                    return cls(z["tokens"].astype(np.int32), z["experts"].astype(np.int16))
            except (OSError, ValueError, KeyError) as exc:
                raise ExpertPredError(f"{p}: not an oracle trace .npz ({exc})") from None
        from ..trace.dataset import TraceDataset

        want = list(prompt_tokens or [])
        for seq in TraceDataset(p).sequences():
            if list(seq.tokens[:len(want)]) == want:
                return cls.from_sequence(seq)
        raise ExpertPredError(f"{p}: no traced sequence starts with the prompt's "
                              f"{len(want)} tokens (trace the same prompt, greedy)")
