"""The one artifact format of fitted predictors, and the one set class that holds them.

An artifact is one NumPy ``.npz`` (a zip of ``.npy`` members, read with
``allow_pickle=False``) holding one rung of the ladder for one or more offsets ``d``:

- ``__header__``: a JSON string — ``format`` (:data:`FORMAT`), ``format_version``,
  ``predictor`` (registry name), ``params`` (constructor arguments), ``model``
  (:class:`~expertpred.features.ModelInfo`: arch, n_layer, moe_layers, n_expert,
  n_expert_used, n_embd, GGUF sha256), ``features`` (``history_decay``), ``needs_hidden``,
  ``source``, and ``offsets``: for each ``d`` its ``kind`` (the registry name), ``spec``
  (the rung's JSON-able description) and the dtype / shape of every array it owns;
- ``d<d>.<array>``: those arrays (:meth:`Predictor.to_artifact`).

``Predictor.save`` writes a one-offset artifact, :func:`~expertpred.predictors.export.export_saved`
merges offsets into one file, :func:`load_artifact` reads either — numpy only: every rung
scores with numpy, so neither torch nor lightgbm is imported. Files of the two earlier
formats still load: ``__header__`` artifacts of ``expertpred export`` are this format, and
saved predictors with a ``__meta__`` entry are converted on load (a LightGBM one needs
lightgbm installed for that). Every loaded artifact passes :func:`validate` first.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch, FeatureConfig, ModelInfo
from ..model import check_identity
from .base import Predictor, available, get_predictor_class
from .validate import CHECKSUM_KEY, artifact_checksum, read_npz_bounded, validate_artifact

log = logging.getLogger(__name__)

FORMAT = "expertpred.predictor-artifact"
FORMAT_VERSION = 1
HEADER = "__header__"
LEGACY_META = "__meta__"  # saved predictors before the one format (``Predictor.save``)
SUFFIX = ".artifact"


@dataclass(frozen=True)
class Artifact:
    """A read artifact before it becomes predictors: what :func:`validate` checks."""

    path: Path  # where it was read from (for messages)
    header: dict[str, Any]  # the JSON header
    arrays: dict[str, np.ndarray]  # ``d<d>.<name>`` → array


def _check_params(path: Path, name: str, params: dict[str, Any]) -> None:
    """Constructor arguments must be the rung's own, each of its default's type: a retyped
    value (``seed='x'``) would otherwise load and fail only when the rung predicts."""
    import inspect

    try:
        sig = inspect.signature(get_predictor_class(name).__init__).parameters
    except (KeyError, ExpertPredError):
        return  # an unknown rung is refused by the offsets' kinds
    for key, value in params.items():
        p = sig.get(key)
        if p is None or p.default is inspect.Parameter.empty or p.default is None:
            if p is None:
                raise ExpertPredError(f"{path}: params.{key} is not a {name} argument")
            continue
        want = type(p.default)
        ok = (isinstance(value, bool) if want is bool
              else isinstance(value, (int, float)) and not isinstance(value, bool)
              if want is float else isinstance(value, want) and not isinstance(value, bool)
              if want is int else isinstance(value, want))
        if not ok:
            raise ExpertPredError(f"{path}: params.{key} = {value!r:.40}, expected "
                                  f"{want.__name__}")


def validate(art: Artifact) -> None:
    """Full structural checks of a read artifact (:mod:`.validate`); one-line
    :class:`ExpertPredError` on failure.

    Format and version, every header key and its type, every ``kind`` registered, every
    array present with the dtype and shape its rung and the model imply, indices in range,
    values finite, tree structure walkable, nothing undeclared, and the checksum: what
    loads cannot fail at predict time.
    """
    h, path = art.header, art.path
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        got = h.get("format") if isinstance(h, dict) else h
        raise ExpertPredError(f"{path}: header format {str(got)[:80]!r}, expected {FORMAT!r}")
    if h.get("format_version") != FORMAT_VERSION:
        raise ExpertPredError(f"{path}: artifact format_version "
                              f"{str(h.get('format_version'))[:20]}, this expertpred reads "
                              f"{FORMAT_VERSION}")
    validate_artifact(path, h, art.arrays, known_kinds=set(available()))


@dataclass
class PredictorSet:
    """Fitted predictors of one rung by offset ``d``: what the plugin asks (``topk``,
    ``topk_shares``), what evaluation scores and what :meth:`save` writes."""

    by_d: dict[int, Predictor]  # d → fitted predictor (registry class, numpy scoring)
    model: ModelInfo  # the model to run on (the GGUF's after an allowed sha mismatch)
    history_decay: float = 0.5  # feature config every offset was trained with
    needs_hidden: bool = False  # features must carry the router input
    source: str = ""  # where it was loaded from (for messages)
    name: str = ""  # registry name of the rung
    header: dict[str, Any] = field(default_factory=dict)  # the artifact header, if loaded
    trained_model: ModelInfo | None = None  # the model it was trained on

    @classmethod
    def from_predictors(cls, by_d: Mapping[int, Predictor], source: str = "") -> PredictorSet:
        """From fitted predictors of one name, model and history decay."""
        if not by_d:
            raise ExpertPredError(f"{source or 'predictors'}: no predictor for any offset d")
        first = by_d[min(by_d)]
        for d, p in by_d.items():
            p._check_fitted()
            if p.d != d:
                raise ExpertPredError(f"{source or p.name}: predictor for d={p.d} given as d={d}")
            if p.name != first.name:
                raise ExpertPredError(f"export: mixes predictors {first.name!r} and {p.name!r}")
            if p.model_ != first.model_:
                raise ExpertPredError(f"export: {p.name} d={p.d} was trained on another model")
            if p.feature_config_.history_decay != first.feature_config_.history_decay:
                raise ExpertPredError(f"export: {p.name} offsets use different history_decay")
        return cls(dict(sorted(by_d.items())), first.model_,
                   first.feature_config_.history_decay,
                   any(p.uses_hidden for p in by_d.values()), source, first.name,
                   trained_model=first.model_)

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(sorted(self.by_d))

    def __getitem__(self, d: int) -> Predictor:
        return self.by_d[d]

    def keys(self) -> Any:
        return self.by_d.keys()

    def topk(self, d: int, x: FeatureBatch, k: int) -> np.ndarray:
        """int64 (k,) experts of layer ``l + d`` for the one row of ``x``, best first."""
        return self.by_d[d].predict_topk(x, k).reshape(-1)[:k]

    def topk_shares(self, d: int, x: FeatureBatch, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(experts, shares): the top ``k`` experts as :meth:`topk` and each one's share of
        the row's non-negative score mass, in [0, 1] (all 1 when no score is positive)."""
        return self.by_d[d].predict_topk_shares(x, k)

    def pack(self) -> Artifact:
        """This set in the artifact format (header + arrays), not yet written."""
        arrays: dict[str, np.ndarray] = {}
        offsets: dict[str, Any] = {}
        first = self.by_d[min(self.by_d)]
        for d, p in sorted(self.by_d.items()):
            spec, arrs = p.to_artifact()
            arrs = {k: np.ascontiguousarray(v) for k, v in arrs.items()}
            offsets[str(d)] = {"kind": p.name, "spec": spec, "arrays": {
                k: {"dtype": v.dtype.str, "shape": list(v.shape)} for k, v in arrs.items()}}
            arrays.update({f"d{d}.{k}": v for k, v in arrs.items()})
        header = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "predictor": self.name,
            "params": first.get_params(), "model": first.model_.to_dict(),
            "features": {"history_decay": self.history_decay,
                         "builder": "expertpred.features.OnlineFeatures / iter_feature_batches"},
            "needs_hidden": self.needs_hidden, "offsets": offsets, "source": self.source,
        }
        header[CHECKSUM_KEY] = artifact_checksum(header, arrays)
        return Artifact(Path(self.source), header, arrays)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write every offset as one artifact (atomically); returns its path."""
        art = self.pack()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **{HEADER: np.array(json.dumps(art.header))}, **art.arrays)
        os.replace(tmp, out)
        log.info("wrote %s (d=%s) to %s", self.name, list(self.offsets), out)
        return out


# --- reading ------------------------------------------------------------------------------------

def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of an artifact (one-line error if it is not one)."""
    return read(Path(path)).header


def read(path: Path) -> Artifact:
    """Read and :func:`validate` an artifact (a legacy ``__meta__`` file is converted)."""
    bad = f"{path}: not a readable expertpred artifact"
    if not path.is_file():
        raise ExpertPredError(f"{path}: no such artifact file")
    arrays = read_npz_bounded(path)  # bounded: declared shapes must match the bytes
    key = HEADER if HEADER in arrays else LEGACY_META if LEGACY_META in arrays else None
    if key is None:
        raise ExpertPredError(f"{bad} (no {HEADER} entry)")
    raw = arrays.pop(key)
    if raw.dtype.kind != "U" or raw.shape != ():
        raise ExpertPredError(f"{path}: artifact {key} is {raw.dtype.str} {list(raw.shape)}, "
                              "expected a JSON string")
    try:
        header = json.loads(str(raw))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ExpertPredError(f"{path}: artifact header is not valid JSON ({exc})") from None
    if key == LEGACY_META:
        from .legacy import from_meta

        art = from_meta(path, header, arrays)
    else:
        art = Artifact(path, header, arrays)
    validate(art)
    return art


def load_artifact(path: str | os.PathLike[str], gguf_path: str | os.PathLike[str] | None = None,
                  allow_sha_mismatch: bool = False,
                  source_model: str | os.PathLike[str] | None = None) -> PredictorSet:
    """Load an artifact (numpy only); with ``gguf_path`` check it was trained for that model
    (the one identity policy, :func:`expertpred.model.check_identity`; ``source_model``: the
    model ``gguf_path`` was widened from).

    Errors are one-line :class:`ExpertPredError`: not a file / truncated / bad JSON / missing
    or malformed array / unknown kind / another model (shape: always; sha256: unless
    ``allow_sha_mismatch``).
    """
    art = read(Path(path))
    h = art.header
    try:
        trained = ModelInfo.from_manifest(h["model"])
        decay = float(h["features"]["history_decay"])
        offsets = {int(d): v for d, v in h["offsets"].items()}
        name, params = str(h["predictor"]), dict(h.get("params") or {})
    except (KeyError, TypeError, ValueError, AttributeError, ExpertPredError) as exc:
        raise ExpertPredError(f"{art.path}: artifact header lacks or mangles a field ({exc})") \
            from None
    model = trained
    if gguf_path is not None:
        from ..gguf.layout import GGUFFile

        source = GGUFFile(source_model) if source_model is not None else None
        model = check_identity(trained, GGUFFile(gguf_path), source=source, what=str(art.path),
                               allow_sha_mismatch=allow_sha_mismatch).model
    _check_params(art.path, name, params)
    by_d: dict[int, Predictor] = {}
    for d, entry in sorted(offsets.items()):
        kind = str(entry["kind"])
        own = {a: art.arrays[f"d{d}.{a}"] for a in entry.get("arrays", {})}
        try:
            by_d[d] = get_predictor_class(kind).from_artifact(
                params if kind == name else {}, model, FeatureConfig(d=d, history_decay=decay),
                entry.get("spec", {}), own)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ExpertPredError(f"{art.path}: d={d} {kind} spec or arrays inconsistent "
                                  f"({type(exc).__name__}: {exc})") from None
        by_d[d]._identity_checked = gguf_path is not None
    return PredictorSet(by_d=by_d, model=model, history_decay=decay,
                        needs_hidden=any(p.uses_hidden for p in by_d.values()), name=name,
                        source=str(art.path), header=h, trained_model=trained)
