"""Routing analysis: what traced MoE routing looks like, and what it means for prefetching.

:mod:`.routing` holds the statistics (pure numpy, no I/O); :mod:`.report` loads a trace
dataset, computes them and writes figures, ``report.md`` and ``report.json``.
"""

from __future__ import annotations
