"""``python -m expertpred.cli``: the same as the ``expertpred`` console script."""

from __future__ import annotations

from . import main

main()
