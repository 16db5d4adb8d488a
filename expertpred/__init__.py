"""expertpred: learn which MoE experts the next layers need and prefetch them from the GGUF."""

from __future__ import annotations

__version__ = "0.1.0"
