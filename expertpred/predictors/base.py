"""The predictor protocol, its name → class registry, and the shared save/load format.

A predictor is fitted for one target offset ``d`` over every source layer at once: rows of a
:class:`~expertpred.features.FeatureBatch` carry their source layer, so per-layer models
(tables, boosters, output heads) live inside one object. Its contract, as in scikit-learn:

- the constructor only stores its arguments under the same names (``get_params``);
- ``fit(batch) -> self`` learns; learned state ends in ``_``;
- ``predict_scores(batch) -> (n, E) float32``, higher = more likely; ``predict_topk(batch, k)``
  ranks by score, ties broken by the lower expert id;
- predicting before ``fit`` raises :class:`NotFittedError`;
- ``save(path)`` / ``Predictor.load(path)`` round-trip to identical predictions. The file
  is one ``.npz`` (no pickle): arrays plus a JSON ``__meta__`` entry naming the class.

Subclasses register with ``class Foo(Predictor, name="foo")``.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from ..errors import ExpertPredError
from ..features import FeatureBatch, FeatureConfig, ModelInfo

log = logging.getLogger(__name__)

REGISTRY: dict[str, type[Predictor]] = {}
FORMAT_VERSION = 1


class NotFittedError(ExpertPredError):
    """A predictor was asked to predict (or save) before ``fit``."""


class Predictor:
    """Base class: subclasses implement ``_fit`` and ``_scores`` (and state hooks if needed)."""

    name: ClassVar[str] = ""
    min_rows: ClassVar[int] = 1  # fewer training rows than this → ExpertPredError
    needs_hidden: ClassVar[bool] = False

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
        log.debug("fitted %s on %d rows (d=%d)", self, len(data), data.d)
        return self

    def predict_scores(self, x: FeatureBatch) -> np.ndarray:
        """float32 (n, E) scores for the experts of layer ``l + d`` of each row."""
        self._check_fitted()
        self.model_.check_same(x.model, f"{self.name} predictor")
        if x.d != self.feature_config_.d:
            raise ExpertPredError(f"{self.name}: features built for d={x.d}, predictor trained "
                                  f"for d={self.feature_config_.d}")
        if x.config.history_decay != self.feature_config_.history_decay:
            raise ExpertPredError(f"{self.name}: features built with history_decay="
                                  f"{x.config.history_decay}, predictor trained with "
                                  f"{self.feature_config_.history_decay}")
        if self.needs_hidden and x.hidden is None:
            raise ExpertPredError(f"{self.name}: needs hidden states, the features have none")
        if len(x) == 0:
            return np.zeros((0, self.model_.n_expert), dtype=np.float32)
        s = np.asarray(self._scores(x), dtype=np.float32)
        return np.ascontiguousarray(s)

    def predict_topk(self, x: FeatureBatch, k: int) -> np.ndarray:
        """int64 (n, k) expert ids, best first (ties: lower id first)."""
        if not 1 <= k <= getattr(self, "model_", x.model).n_expert:
            raise ExpertPredError(f"k={k}: expected 1..{x.model.n_expert}")
        s = self.predict_scores(x)
        return np.argsort(-s, axis=1, kind="stable")[:, :k].astype(np.int64)

    @property
    def d(self) -> int:
        self._check_fitted()
        return self.feature_config_.d

    # --- hooks ---------------------------------------------------------------------------
    def _fit(self, data: FeatureBatch) -> None:
        raise NotImplementedError

    def _scores(self, x: FeatureBatch) -> np.ndarray:
        raise NotImplementedError

    def _get_state(self) -> dict[str, Any]:
        """Learned state: numpy arrays and JSON-able values (default: every ``*_`` attribute)."""
        return {k: v for k, v in vars(self).items()
                if k.endswith("_") and not k.startswith("_")
                and k not in ("model_", "feature_config_")}

    def _set_state(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(f"{self.name} predictor is not fitted: call fit() before "
                                 "predict_scores / predict_topk / save")

    # --- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one ``.npz`` file (atomically); returns its path."""
        self._check_fitted()
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        values: dict[str, Any] = {}
        for k, v in self._get_state().items():
            if isinstance(v, np.ndarray):
                arrays[f"state.{k}"] = v
            else:
                values[k] = v
        meta = {
            "format": FORMAT_VERSION, "predictor": self.name, "params": self.get_params(),
            "model": self.model_.to_dict(),
            "feature_config": {"d": self.feature_config_.d,
                               "history_decay": self.feature_config_.history_decay},
            "values": values,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, __meta__=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Predictor:
        """Read a file written by :meth:`save`; the class comes from the file."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["__meta__"]))
                arrays = {k[len("state."):]: z[k] for k in z.files if k.startswith("state.")}
        except (OSError, ValueError, KeyError) as exc:
            raise ExpertPredError(f"{path}: not a saved expertpred predictor ({exc})") from None
        if meta.get("format") != FORMAT_VERSION:
            raise ExpertPredError(f"{path}: predictor format {meta.get('format')}, "
                                  f"expected {FORMAT_VERSION}")
        klass = get_predictor_class(meta["predictor"])
        if not issubclass(klass, cls):
            raise ExpertPredError(f"{path}: holds a {klass.name!r} predictor, "
                                  f"expected {cls.name!r}")
        obj = klass(**meta["params"])
        obj.model_ = ModelInfo.from_manifest(meta["model"])
        obj.feature_config_ = FeatureConfig(**meta["feature_config"])
        obj._set_state({**meta["values"], **arrays})
        return obj


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
