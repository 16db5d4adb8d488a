"""Saved predictors of the format before the one artifact (a ``__meta__`` JSON entry and
``state.<attr>`` arrays, written by ``Predictor.save`` until the predictors had one format):
converted on read, so ``expertpred train`` output of earlier versions still loads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureConfig, ModelInfo
from .base import get_predictor_class

if TYPE_CHECKING:
    from .artifact import Artifact

log = logging.getLogger(__name__)

META_VERSION = 1


def from_meta(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Artifact:
    """The one-offset artifact equal to the legacy saved predictor ``path``."""
    from .artifact import PredictorSet

    if not isinstance(meta, dict) or meta.get("format") != META_VERSION:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise ExpertPredError(f"{path}: predictor format {got}, expected {META_VERSION}")
    try:
        klass = get_predictor_class(str(meta["predictor"]))
        p = klass(**meta["params"])
        p.model_ = ModelInfo.from_manifest(meta["model"])
        p.feature_config_ = FeatureConfig(**meta["feature_config"])
        state = {**meta.get("values", {}),
                 **{k[len("state."):]: v for k, v in arrays.items() if k.startswith("state.")}}
        p._from_legacy(state)
        p._ready()
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ExpertPredError(f"{path}: legacy saved predictor lacks or mangles a field "
                              f"({type(exc).__name__}: {exc})") from None
    log.debug("%s: legacy saved %s predictor converted", path, p.name)
    art = PredictorSet.from_predictors({p.d: p}, source=str(path)).pack()
    return type(art)(path, art.header, art.arrays)
