"""Export: every offset of one rung as one artifact file (:mod:`.artifact`), numpy only.

``expertpred export --predictor DIR_OR_FILE --out P.artifact`` (or :func:`export_saved`)
merges a trained predictor's saved offsets into one artifact; :func:`load_artifact` reads it
back **without torch, lightgbm or sklearn** and predicts exactly what the fitted predictor
predicts — it is the same class running the same numpy kernel (``tests/test_export.py``)::

    from expertpred.predictors.export import load_artifact

    art = load_artifact("lgbm.artifact", gguf_path="model.gguf")  # checks the identity
    art.offsets                     # (1, 2, 3, 4)
    art.by_d[1].predict_topk(x, 2)  # x: FeatureBatch, e.g. OnlineFeatures(...).features(1)
    art.topk(1, x, 2)               # the plugin's interface; art.topk_shares for gating
    # art.model / art.history_decay / art.needs_hidden: build OnlineFeatures with these

The oracle's artifact is a marker without weights: offline it scores the labels of a labelled
:class:`FeatureBatch`; online the plugin resolves it from a recorded trace
(``expertpred run --mode oracle --oracle-trace``).

Identity: with ``gguf_path`` the artifact's model must have the GGUF's shapes (always
enforced) and sha256 (``allow_sha_mismatch=True`` / ``--allow-sha-mismatch`` accepts another
file of the same shapes; the loaded set then reports the GGUF's identity as ``model`` and
the original as ``trained_model``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import ExpertPredError
from .artifact import FORMAT, FORMAT_VERSION, SUFFIX, PredictorSet, load_artifact, read_header
from .base import Predictor

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "FORMAT_VERSION", "SUFFIX", "PredictorSet", "export_predictors",
           "export_saved", "load_artifact", "read_header"]


def export_predictors(by_d: Mapping[int, Predictor], out: str | os.PathLike[str],
                      source: str = "") -> Path:
    """Write fitted predictors of one name (one per offset ``d``) as one artifact."""
    if not by_d:
        raise ExpertPredError(f"{source or 'export'}: no predictor for any offset d")
    by_d = {p.d: p for p in by_d.values()}
    return PredictorSet.from_predictors(by_d, source=source).save(out)


def export_saved(predictor: str | os.PathLike[str], out: str | os.PathLike[str],
                 name: str | None = None, offsets: Sequence[int] | None = None) -> Path:
    """Export from disk: a saved predictor ``.npz`` (one offset) or a directory of them
    (``expertpred train``'s ``<out>/models``, files ``<name>-d<d>.npz``; every offset of
    ``name``, which may be omitted when the directory holds only one predictor)."""
    src = Path(predictor)
    if src.is_file():
        p = Predictor.load(src)
        if name is not None and p.name != name:
            raise ExpertPredError(f"{src}: holds a {p.name!r} predictor, expected {name!r}")
        return export_predictors({p.d: p}, out, source=str(src))
    if not src.is_dir():
        raise ExpertPredError(f"{src}: no such saved predictor file or directory")
    files = sorted(src.glob("*-d*.npz"))
    stems: dict[str, list[tuple[int, Path]]] = {}
    for f in files:
        stem, _, d = f.stem.rpartition("-d")
        if d.isdigit():
            stems.setdefault(stem.replace("_plus_", "+"), []).append((int(d), f))
    if name is None:
        if len(stems) != 1:
            raise ExpertPredError(f"{src}: holds predictors {sorted(stems) or 'none'}; "
                                  "choose one with --name")
        name = next(iter(stems))
    if name not in stems:
        raise ExpertPredError(f"{src}: no saved {name!r} predictor (files {name}-d<d>.npz); "
                              f"has {sorted(stems) or 'none'}")
    want = None if offsets is None else set(offsets)
    by_d = {}
    for d, f in sorted(stems[name]):
        if want is None or d in want:
            p = Predictor.load(f)
            by_d[p.d] = p
    if want is not None and want - set(by_d):
        raise ExpertPredError(f"{src}: no saved {name!r} for d={sorted(want - set(by_d))}")
    return export_predictors(by_d, out, source=str(src))
