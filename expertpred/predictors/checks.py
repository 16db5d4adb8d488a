"""The checks one artifact's header and arrays go through; every failure is a one-line
:class:`ExpertPredError` naming the file, the array and what was expected.

:mod:`.validate` walks the artifact with one :class:`ArtifactCheck`; each rung checks its
own arrays with it in ``Predictor.check_artifact``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExpertPredError


class ArtifactCheck:
    """The checks of one artifact; every failure names the file and the value."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.prefix = ""  # "d<d>." while one offset's arrays are checked

    def fail(self, what: str) -> ExpertPredError:
        return ExpertPredError(f"{self.path}: {what}")

    def typed(self, obj: Mapping[str, Any], key: str, types: type | tuple[type, ...],
              where: str) -> Any:
        if not isinstance(obj, Mapping) or key not in obj:
            raise self.fail(f"artifact header: {where} has no {key!r}")
        v = obj[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in _tuple(types)):
            names = "/".join(t.__name__ for t in _tuple(types))
            raise self.fail(f"artifact header: {where}.{key} is {v!r:.80}, expected {names}")
        return v

    def array(self, arrays: Mapping[str, np.ndarray], key: str, kind: str,
              shape: tuple[int | None, ...], *, finite: bool = True, lo: int | None = None,
              hi: int | None = None) -> np.ndarray:
        """``kind``: numpy dtype kind(s), e.g. "f", "i", "b"; ``shape`` None = any size;
        ``lo``/``hi``: inclusive range of integer values."""
        name = self.prefix + key
        if key not in arrays:
            raise self.fail(f"missing array {name!r}")
        a = arrays[key]
        if a.dtype.kind not in kind or a.dtype.byteorder == ">":
            raise self.fail(f"array {name!r} has dtype {a.dtype.str}, expected kind {kind!r}")
        if a.ndim != len(shape) or any(w is not None and s != w for s, w in zip(a.shape, shape)):
            raise self.fail(f"array {name!r} has shape {list(a.shape)}, expected "
                            f"{['*' if w is None else w for w in shape]}")
        if finite and a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            raise self.fail(f"array {name!r} has {int((~np.isfinite(a)).sum())} non-finite "
                            "values, expected finite numbers")
        if a.size and (lo is not None or hi is not None):
            mn, mx = int(a.min()), int(a.max())
            if (lo is not None and mn < lo) or (hi is not None and mx > hi):
                raise self.fail(f"array {name!r} has values {mn}..{mx}, expected {lo}..{hi}")
        return a


def _tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)
