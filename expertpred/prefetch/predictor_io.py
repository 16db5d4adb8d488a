"""Loading the plugin's predictors and checking they may run on a model."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import ExpertPredError
from ..gguf.layout import GGUFFile, MoELayout
from ..model import check_identity
from ..predictors.artifact import PredictorSet, load_artifact
from ..predictors.base import Predictor, load_all
from .plugin_config import DEFAULT_PREDICTOR, FALLBACK_PREDICTOR, PredictorProvider

log = logging.getLogger(__name__)


def load_predictors(path: str | os.PathLike[str], gguf_path: str | os.PathLike[str],
                    name: str | None = None, offsets: Sequence[int] = (1, 2, 3, 4),
                    source_model: str | os.PathLike[str] | None = None) -> PredictorSet:
    """Predictors for ``gguf_path`` from ``path``: a directory of saved predictors
    (``expertpred train``'s ``<out>/models``, files ``<name>-d<d>.npz``) or an exported
    artifact (``expertpred.predictors.export``), checked against the model by the one
    identity policy (:func:`expertpred.model.check_identity`; ``source_model``: the model
    ``gguf_path`` was widened from). ``name`` None: :data:`DEFAULT_PREDICTOR`, or, with a
    warning, :data:`FALLBACK_PREDICTOR` where the directory has no default the plugin can
    run."""
    p = Path(path)
    if not p.exists():
        raise ExpertPredError(f"{p}: no such predictor directory or artifact")
    if not (p.is_dir() and any(p.glob("*-d*.npz"))):
        return load_artifact(p, gguf_path=str(gguf_path), source_model=source_model)
    target = GGUFFile(gguf_path)
    names = [name] if name is not None else [DEFAULT_PREDICTOR, FALLBACK_PREDICTOR]
    try:
        by_name = load_all(p, target.info, names, offsets)
    except ExpertPredError as exc:
        raise ExpertPredError(f"predictor {p} does not fit {gguf_path}: {exc}") from None
    if name is None:
        name = _usable_default(by_name, p)
    if name not in by_name:
        raise ExpertPredError(f"{p}: no saved {name!r} predictor (expected files "
                              f"{name}-d<d>.npz for d in {list(offsets)})")
    pset = PredictorSet.from_predictors(by_name[name], source=str(p))
    check_predictor_model(pset, gguf_path, source_model=source_model, layout=target.layout)
    return pset


def _usable_default(by_name: dict[str, dict[int, Predictor]], where: Path) -> str:
    """The default predictor's name, or the fallback's where the default is missing or
    reads router inputs (the plugin refuses those online)."""
    got = by_name.get(DEFAULT_PREDICTOR)
    why = ("reads router inputs" if got and any(q.uses_hidden for q in got.values())
           else "" if got else "is not saved there")
    if not why or FALLBACK_PREDICTOR not in by_name:
        return DEFAULT_PREDICTOR  # usable, or the error names what was expected
    log.warning("%s: the default predictor %s %s; using %s", where, DEFAULT_PREDICTOR, why,
                FALLBACK_PREDICTOR)
    return FALLBACK_PREDICTOR


def check_predictor_model(pset: PredictorProvider, gguf_path: str | os.PathLike[str],
                          source_model: str | os.PathLike[str] | None = None,
                          layout: MoELayout | None = None) -> None:
    """Raise a one-line :class:`ExpertPredError` unless ``pset`` may run on ``gguf_path``:
    :func:`expertpred.model.check_identity` (exact sha256, or a widened copy of
    ``source_model`` with its routing fingerprint)."""
    what = f"predictor {getattr(pset, 'source', '') or ''} for {gguf_path}".replace("  ", " ")
    source = GGUFFile(source_model) if source_model is not None else None
    check_identity(pset.model, GGUFFile(gguf_path, layout), source=source, what=what)
