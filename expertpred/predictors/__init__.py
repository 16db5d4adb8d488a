"""Predictors of the experts layer l + d will select: protocol, registry and the ladder.

Each rung lives in its own module and owns its fit, its numpy scoring kernel and its
artifact arrays; :mod:`.artifact` is the one file format and :class:`PredictorSet` the one
set class (evaluation, export and the prefetch plugin use them).

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
    """Import every rung module so that the registry is complete (none imports torch or
    lightgbm at import time: they are imported inside ``fit``)."""
    from . import (  # noqa: F401
        fast_mlp,
        gate,
        lgbm,
        mlp,
        oracle,
        popularity,
        prev_transition,
        previous_token,
        transition,
        uniform,
    )


__all__ = ["REGISTRY", "NotFittedError", "Predictor", "available", "get_predictor_class",
           "make_predictor"]
