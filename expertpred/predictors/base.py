"""The predictor protocol and its one name → class registry.

A predictor is fitted for one target offset ``d`` over every source layer at once: rows of a
:class:`~expertpred.features.FeatureBatch` carry their source layer, so per-layer models
(tables, boosters, output heads) live inside one object. Its contract, as in scikit-learn:

- the constructor only stores its arguments under the same names (``get_params``);
- ``fit(batch) -> self`` learns; learned state ends in ``_``;
- ``predict_scores(batch) -> (n, E) float32``, higher = more likely; ``predict_topk(batch, k)``
  ranks by score, ties broken by the lower expert id;
- predicting before ``fit`` raises :class:`NotFittedError`;
- ``to_artifact()`` / ``from_artifact()`` turn the learned state into arrays + a JSON spec and
  back; ``save(path)`` / ``Predictor.load(path)`` write and read them as the one artifact
  format of :mod:`expertpred.predictors.artifact`.

Scoring is numpy only and written once per rung (``_scores``): evaluation, the exported
artifact and the online plugin all call it. Rows whose scores depend on discrete inputs only
(``_row_key``) are answered from a bounded cache on the one-row online path.

Subclasses register with ``class Foo(Predictor, name="foo")``.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch, FeatureConfig, ModelInfo
from .checks import ArtifactCheck

log = logging.getLogger(__name__)

REGISTRY: dict[str, type[Predictor]] = {}
CACHE_ROWS = 1 << 16  # one-row answers cached per predictor (lookup rungs), then reset

Spec = dict[str, Any]  # JSON-able description of a rung's arrays (the artifact's "spec")
Arrays = dict[str, np.ndarray]


class NotFittedError(ExpertPredError):
    """A predictor was asked to predict (or save) before ``fit``."""


class Predictor:
    """Base class: subclasses implement ``_fit``, ``_scores`` and the artifact hooks."""

    name: ClassVar[str] = ""
    min_rows: ClassVar[int] = 1  # fewer training rows than this → ExpertPredError
    needs_hidden: ClassVar[bool] = False  # the rung cannot work without hidden states

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        if name in REGISTRY:
            raise TypeError(f"predictor name {name!r} registered twice "
                            f"({REGISTRY[name].__qualname__}, {cls.__qualname__})")
        cls.name = name
        REGISTRY[name] = cls

    # --- parameters ----------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, read back from the attributes of the same names."""
        sig = inspect.signature(type(self).__init__)
        return {p: getattr(self, p) for p in sig.parameters if p != "self"}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # --- protocol ------------------------------------------------------------------------
    def fit(self, data: FeatureBatch) -> Self:
        """Learn from labelled examples of one offset ``d``; returns ``self``."""
        if data.targets is None:
            raise ExpertPredError(f"{self.name}: fit needs labelled examples (targets is None)")
        if len(data) < self.min_rows:
            raise ExpertPredError(f"too few examples to train {self.name!r}: {len(data)} rows "
                                  f"for d={data.d}, need at least {self.min_rows}")
        if self.needs_hidden and data.hidden is None:
            raise ExpertPredError(f"{self.name}: needs hidden states; trace the dataset with "
                                  "hidden (ffn_norm) capture")
        self.model_ = data.model
        self.feature_config_ = data.config
        self._fit(data)
        self._ready()
        log.debug("fitted %s on %d rows (d=%d)", self, len(data), data.d)
        return self

    def predict_scores(self, x: FeatureBatch) -> np.ndarray:
        """float32 (n, E) scores for the experts of layer ``l + d`` of each row."""
        self._check(x)
        if len(x) == 0:
            return np.zeros((0, self.model_.n_expert), dtype=np.float32)
        if len(x) != 1:
            return self._scores32(x)
        return self._row(x, self._row_key(x))[None].copy()

    def predict_topk(self, x: FeatureBatch, k: int) -> np.ndarray:
        """int64 (n, k) expert ids, best first (ties: lower id first)."""
        if not 1 <= k <= getattr(self, "model_", x.model).n_expert:
            raise ExpertPredError(f"k={k}: expected 1..{x.model.n_expert}")
        if len(x) != 1:
            s = self.predict_scores(x)
            return np.argsort(-s, axis=1, kind="stable")[:, :k].astype(np.int64)
        self._check(x)  # the online case: one row, a 1-D sort, cached when discrete
        key = self._row_key(x)
        got = None if key is None else self._row_topk.get((key, k))
        if got is None:
            s = self._row(x, key)
            got = np.argsort(-s, kind="stable")[None, :k].astype(np.int64, copy=False)
            if key is not None:
                if len(self._row_topk) > CACHE_ROWS:
                    self._row_topk.clear()
                self._row_topk[(key, k)] = got
        return got.copy()

    def predict_row(self, x: FeatureBatch) -> np.ndarray:
        """float32 (E,) scores of the one row of ``x`` (the online path: one check, one
        cache lookup); a fresh array the caller may modify."""
        if len(x) != 1:
            raise ExpertPredError(f"{self.name}: predict_row takes one row, got {len(x)}")
        self._check(x)
        return self._row(x, self._row_key(x)).copy()

    def predict_topk_shares(self, x: FeatureBatch, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The plugin's gated call on one row: :func:`top_shares` of :meth:`predict_row`."""
        return top_shares(self.predict_row(x), k)

    def _row(self, x: FeatureBatch, key: Hashable | None) -> np.ndarray:
        """1-D scores of one checked row: from the cache when ``key`` is set (not a copy)."""
        if key is None:
            return self._scores32(x)[0]
        got = self._row_scores.get(key)
        if got is None:
            got = self._row_scores[key] = self._scores32(x)
            if len(self._row_scores) > CACHE_ROWS:
                self._row_scores.clear()
        return got[0]

    @property
    def d(self) -> int:
        self._check_fitted()
        return self.feature_config_.d

    @property
    def uses_hidden(self) -> bool:
        """Whether this fitted predictor reads hidden states (the router input) at all."""
        return self.needs_hidden

    # --- hooks ---------------------------------------------------------------------------
    def _fit(self, data: FeatureBatch) -> None:
        raise NotImplementedError

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        """The scoring kernel (numpy only): float (n, E) for n >= 1 rows."""
        raise NotImplementedError

    def _row_key(self, x: FeatureBatch) -> Hashable | None:
        """For a one-row batch: a key that determines its scores (discrete inputs only), so
        that repeated inputs are answered from a cache; None = not cacheable."""
        return None

    @classmethod
    def check_artifact(cls, c: ArtifactCheck, m: ModelInfo, spec: Spec, a: Arrays) -> None:
        """Check one offset's spec and arrays of a loaded artifact (hostile input), with
        ``a`` keyed without the ``d<d>.`` prefix; the walker (:mod:`.validate`) has already
        checked the header and that each array has the dtype and shape the header declares.
        Default: nothing rung-specific (a rung with arrays or spec values overrides it)."""

    def _to_artifact(self) -> tuple[Spec, Arrays]:
        raise NotImplementedError

    def _from_artifact(self, spec: Spec, arrays: Arrays) -> None:
        raise NotImplementedError

    def _from_legacy(self, state: dict[str, Any]) -> None:
        """Learned state of a file written by ``save`` before the one artifact format
        (``__meta__``: every ``*_`` attribute); default: set them as they are."""
        for k, v in state.items():
            setattr(self, k, v)

    def _ready(self) -> None:
        """After fit or load: derived, non-learned buffers (caches, one-row workspaces)."""
        self._row_scores: dict[Hashable, np.ndarray] = {}
        self._row_topk: dict[tuple[Hashable, int], np.ndarray] = {}
        self._seen: tuple[Any, Any] = (None, None)
        # set by load_artifact(gguf_path=...): the identity (sha256) was checked against the
        # model file at load, so features need only the same routing shape
        self._identity_checked = False

    # --- checks ----------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(f"{self.name} predictor is not fitted: call fit() before "
                                 "predict_scores / predict_topk / save")

    def _check(self, x: FeatureBatch) -> None:
        """Features of this model, offset and decay (cheap when the objects repeat, as the
        online features' model and per-d config do)."""
        self._check_fitted()
        if x.model is self._seen[0] and x.config is self._seen[1]:
            return
        m, o = self.model_, x.model
        if not (self._identity_checked and (m.moe_layers, m.n_expert, m.n_expert_used)
                == (o.moe_layers, o.n_expert, o.n_expert_used)):
            m.check_same(o, f"{self.name} predictor")
        fc = self.feature_config_
        if x.d != fc.d:
            raise ExpertPredError(f"{self.name}: features built for d={x.d}, predictor trained "
                                  f"for d={fc.d}")
        if x.config.history_decay != fc.history_decay:
            raise ExpertPredError(f"{self.name}: features built with history_decay="
                                  f"{x.config.history_decay}, predictor trained with "
                                  f"{fc.history_decay}")
        if self.uses_hidden and x.hidden is None:
            raise ExpertPredError(f"{self.name}: needs hidden states, the features have none")
        if x.hidden is not None or not self.uses_hidden:
            self._seen = (x.model, x.config)

    def _scores32(self, x: FeatureBatch) -> np.ndarray:
        s = self._scores(x)
        if s.dtype != np.float32 or not s.flags.c_contiguous:
            s = np.ascontiguousarray(s, dtype=np.float32)
        return s

    # --- the artifact ------------------------------------------------------------------------
    def to_artifact(self) -> tuple[Spec, Arrays]:
        """(spec, arrays): the learned state as a JSON-able spec and numpy arrays."""
        self._check_fitted()
        return self._to_artifact()

    @classmethod
    def from_artifact(cls, params: dict[str, Any], model: ModelInfo, config: FeatureConfig,
                      spec: Spec, arrays: Arrays) -> Self:
        """A fitted predictor from :meth:`to_artifact`'s output (numpy only)."""
        obj = cls(**params)
        obj.model_, obj.feature_config_ = model, config
        obj._from_artifact(spec, arrays)
        obj._ready()
        return obj

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write this predictor (one offset) as an artifact file (atomically)."""
        from .artifact import PredictorSet

        self._check_fitted()
        return PredictorSet.from_predictors({self.d: self}).save(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Predictor:
        """Read one predictor (a one-offset artifact, or a legacy saved ``.npz``)."""
        from .artifact import load_artifact

        try:
            pset = load_artifact(path)
        except ExpertPredError as exc:
            raise ExpertPredError(f"not a saved expertpred predictor: {exc}") from None
        if len(pset.by_d) != 1:
            raise ExpertPredError(f"{path}: holds offsets {list(pset.offsets)}, expected one "
                                  "(use load_artifact for a set)")
        p = next(iter(pset.by_d.values()))
        if not isinstance(p, cls):
            raise ExpertPredError(f"{path}: holds a {p.name!r} predictor, expected {cls.name!r}")
        return p


def get_predictor_class(name: str) -> type[Predictor]:
    """Registry lookup; an unknown name lists the known ones."""
    from . import _load_all

    _load_all()
    try:
        return REGISTRY[name]
    except KeyError:
        raise ExpertPredError(f"unknown predictor {name!r}; known: "
                              f"{', '.join(sorted(REGISTRY))}") from None


def make_predictor(name: str, **params: Any) -> Predictor:
    """Instantiate a registered predictor; unknown parameters are a one-line error."""
    klass = get_predictor_class(name)
    sig = inspect.signature(klass.__init__)
    bad = [p for p in params if p not in sig.parameters or p == "self"]
    if bad:
        known = [p for p in sig.parameters if p != "self"]
        raise ExpertPredError(f"predictor {name!r}: unknown parameter(s) {', '.join(bad)}; "
                              f"known: {', '.join(known) or 'none'}")
    return klass(**params)


def available() -> list[str]:
    """Names of all registered predictors, sorted."""
    from . import _load_all

    _load_all()
    return sorted(REGISTRY)


def model_path(models_dir: str | os.PathLike[str], name: str, d: int) -> Path:
    """Where ``expertpred train`` saves predictor ``name`` for offset ``d``."""
    return Path(models_dir) / f"{name.replace('+', '_plus_')}-d{d}.npz"


def load_all(models_dir: str | os.PathLike[str], model: ModelInfo,
             names: Sequence[str], offsets: Sequence[int]) -> dict[str, dict[int, Predictor]]:
    """Load saved predictors; a predictor trained on another model is a one-line error."""
    out: dict[str, dict[int, Predictor]] = {}
    for name in names:
        for d in offsets:
            path = model_path(models_dir, name, d)
            if not path.is_file():
                log.warning("no saved %s for d=%d in %s", name, d, models_dir)
                continue
            p = Predictor.load(path)
            p.model_.check_same(model, str(path))
            out.setdefault(name, {})[d] = p
    return out


def top_shares(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(experts, shares) of the 1-D scores ``s`` (overwritten): the top ``k`` by score as
    ``predict_topk`` ranks them (stable: ties to the lower id) and each one's share of the
    non-negative score mass, in [0, 1] (all 1 when no score is positive)."""
    top = np.argsort(-s, kind="stable")[:k]
    pos = np.maximum(s, 0.0, out=s)
    tot = pos.sum()
    if tot > 0:
        return top, pos[top] / tot
    return top, np.ones(len(top), np.float32)
