"""Predictors of the experts layer l + d will select: protocol, registry and the ladder.

>>> from expertpred.predictors import available
>>> available()[:3]
['gate-lookahead', 'lightgbm', 'mlp']
"""

from __future__ import annotations

from .base import (
    REGISTRY,
    NotFittedError,
    Predictor,
    available,
    get_predictor_class,
    make_predictor,
)


def _load_all() -> None:
    """Import every predictor module so that the registry is complete."""
    from . import baselines, gate, lgbm, mlp  # noqa: F401


__all__ = ["REGISTRY", "NotFittedError", "Predictor", "available", "get_predictor_class",
           "make_predictor"]
