"""Structural validation of a loaded predictor artifact, so that what loads cannot fail later.

:func:`validate_artifact` checks the header (every key and its type) and, per offset
``d`` and scorer kind, every array: present, its dtype and shape derived from the model
(n_moe layers L, n_expert E, n_embd) and the spec, indices in range, values finite, and
tree structure that a fixed-depth walk can follow. :func:`artifact_checksum` is a sha256
over the header fields that decide predictions and over every array (name, dtype, shape,
bytes), written at export time: a swapped or edited array with the right shape, or an
edited spec weight, is refused instead of predicting something else.

Errors are one-line :class:`ExpertPredError` naming the file, the array and what was
expected. This module walks the artifact layout (header, offsets, declared arrays,
checksum); each offset's own spec and arrays are checked by its rung's
``Predictor.check_artifact`` (looked up in the one ``REGISTRY``), so a rung's file holds its
fit, its scoring, its artifact and the checks of that artifact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tokenize
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from ..features import ModelInfo
from .base import REGISTRY, available
from .checks import ArtifactCheck

log = logging.getLogger(__name__)

CHECKSUM_KEY = "checksum"
# header fields that decide what an artifact predicts (the checksum covers them)
_CHECKED_FIELDS = ("predictor", "params", "model", "features", "needs_hidden", "offsets")


def artifact_checksum(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the prediction-deciding header fields and all arrays (sorted by name)."""
    h = hashlib.sha256()
    fields = {k: header.get(k) for k in _CHECKED_FIELDS}
    h.update(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"|{name}|{a.dtype.str}|{list(a.shape)}|".encode())
        h.update(a.view(np.uint8).reshape(-1).data if a.size else b"")
    return h.hexdigest()


# --- the entry point ---------------------------------------------------------------------------

def validate_artifact(path: str | Path, header: Mapping[str, Any],
                      arrays: Mapping[str, np.ndarray], known_kinds: set[str] | None = None
                      ) -> ModelInfo:
    """Check a loaded artifact completely; return its :class:`ModelInfo`.

    ``known_kinds``: scorer kinds the loader can build (default: every registered rung).
    Each offset's spec and arrays are checked by its rung's ``check_artifact``.
    """
    c = ArtifactCheck(Path(path))
    if not isinstance(header, Mapping):
        raise c.fail(f"artifact header is {type(header).__name__}, expected a JSON object")
    c.typed(header, "predictor", str, "header")
    c.typed(header, "params", dict, "header")
    raw_model = c.typed(header, "model", dict, "header")
    for key in ("n_layer", "n_expert", "n_expert_used", "n_embd"):
        c.typed(raw_model, key, int, "header.model")
    layers = c.typed(raw_model, "moe_layers", list, "header.model")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise c.fail(f"artifact header: model.moe_layers {layers!r:.80}, expected integers")
    try:
        model = ModelInfo.from_manifest(raw_model)
    except (KeyError, TypeError, ValueError, ExpertPredError) as exc:
        raise c.fail(f"artifact header: model is malformed ({exc})") from None
    layers = list(model.moe_layers)
    if not (model.n_moe > 0 and 0 < model.n_expert_used <= model.n_expert <= 1 << 16
            and model.n_embd > 0 and layers == sorted(set(layers))
            and 0 <= layers[0] and layers[-1] < model.n_layer):
        raise c.fail(f"artifact header: model of {model.n_layer} layers, MoE layers "
                     f"{layers[:4]}…, {model.n_expert} experts, top-{model.n_expert_used}, "
                     f"n_embd {model.n_embd}: expected a consistent MoE shape")
    decay = c.typed(c.typed(header, "features", dict, "header"), "history_decay",
                    (int, float), "header.features")
    if not (math.isfinite(decay) and 0.0 <= decay <= 1.0):
        raise c.fail(f"artifact header: features.history_decay {decay!r}, expected 0..1")
    c.typed(header, "needs_hidden", bool, "header")
    offsets = c.typed(header, "offsets", dict, "header")
    if not offsets:
        raise c.fail("artifact holds no offset d")
    registered = set(available())  # fills REGISTRY
    kinds = registered if known_kinds is None else known_kinds & registered
    expected: set[str] = set()
    for key, entry in offsets.items():
        if not (isinstance(key, str) and key.isdigit() and 1 <= int(key) <= model.n_moe):
            raise c.fail(f"offset {key!r}, expected d in 1..{model.n_moe}")
        kind = c.typed(entry, "kind", str, f"offsets[{key}]")
        if kind not in kinds:
            raise c.fail(f"d={key} scorer kind {kind!r}; known: {', '.join(sorted(kinds))}")
        spec = c.typed(entry, "spec", dict, f"offsets[{key}]")
        declared = c.typed(entry, "arrays", dict, f"offsets[{key}]")
        own = {name: arrays[f"d{key}.{name}"] for name in declared if f"d{key}.{name}" in arrays}
        for name, want in declared.items():
            if f"d{key}.{name}" not in arrays:
                raise c.fail(f"missing array 'd{key}.{name}' ({kind} d={key})")
            v = own[name]
            if not isinstance(want, dict) or want.get("dtype") != v.dtype.str \
                    or want.get("shape") != list(v.shape):
                raise c.fail(f"array 'd{key}.{name}' is {v.dtype.str} {list(v.shape)}, header "
                             f"declares {want!r:.80}")
        c.prefix = f"d{key}."
        REGISTRY[kind].check_artifact(c, model, spec, own)
        c.prefix = ""
        expected |= {f"d{key}.{name}" for name in declared}
    extra = sorted(set(arrays) - expected)
    if extra:
        raise c.fail(f"arrays {extra[:4]} are not declared in the header")
    # last: a structural error says more than "checksum differs"
    _check_checksum(c, header, arrays)
    return model


def _check_checksum(c: ArtifactCheck, header: Mapping[str, Any],
                    arrays: Mapping[str, np.ndarray]) -> None:
    want = header.get(CHECKSUM_KEY)
    if want is None:
        log.warning("%s: artifact without a checksum (exported before checksums); its arrays "
                    "are validated but an edit of a same-shape array cannot be detected",
                    c.path)
        return
    if not isinstance(want, str):
        raise c.fail(f"artifact header: checksum is {want!r}, expected a sha256 hex string")
    got = artifact_checksum(header, arrays)
    if got != want:
        raise c.fail(f"artifact checksum {got[:12]}… does not match the header's "
                     f"{want[:12]}…: the arrays or header were changed after export")


# --- reading the container -----------------------------------------------------------------

# An artifact member larger than this is damage (the largest real ones are MLP weights, MBs).
MAX_MEMBER_BYTES = 1 << 31
MAX_MEMBERS = 4096


def read_npz_bounded(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an uncompressed or deflated ``.npz`` without trusting its headers:
    every member's declared dtype and shape must account for exactly its bytes before any
    memory is allocated for it (``np.load`` allocates the declared shape first), object
    arrays are refused, and the zip CRC of every member is checked."""
    import zipfile

    from numpy.lib import format as npformat

    path = Path(path)
    bad = f"{path}: not a readable expertpred artifact"
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        if path.read_bytes()[:6] == b"\x93NUMPY":
            raise ExpertPredError(f"{bad} (a bare .npy, expected an .npz artifact)") from None
        raise ExpertPredError(f"{bad} (truncated or corrupt: not a zip archive: "
                              f"{exc})") from None
    out: dict[str, np.ndarray] = {}
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise ExpertPredError(f"{bad} ({len(infos)} members, expected at most {MAX_MEMBERS})")
        for zi in infos:
            name = zi.filename[:-4] if zi.filename.endswith(".npy") else zi.filename
            if name in out or zi.file_size > MAX_MEMBER_BYTES:
                raise ExpertPredError(f"{bad} (member {zi.filename!r}: duplicate or "
                                      f"{zi.file_size} bytes)")
            try:
                with zf.open(zi) as f:
                    version = npformat.read_magic(f)
                    read = (npformat.read_array_header_1_0 if version == (1, 0)
                            else npformat.read_array_header_2_0)
                    shape, fortran, dtype = read(f, max_header_size=10000)
                    if dtype.hasobject:
                        raise ExpertPredError(f"{bad} (member {name!r} holds Python objects)")
                    want = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    if want != zi.file_size - f.tell():
                        raise ExpertPredError(
                            f"{bad} (member {name!r} declares {dtype.str} {list(shape)} = "
                            f"{want} bytes, holds {zi.file_size - f.tell()})")
                    raw = f.read(want)
                    f.read(1)  # reach EOF: zipfile checks the member's CRC there
            except ExpertPredError:
                raise
            except (OSError, ValueError, EOFError, SyntaxError, TypeError, KeyError,
                    tokenize.TokenError,  # numpy parses a flipped .npy header with tokenize
                    zipfile.BadZipFile, NotImplementedError, OverflowError) as exc:
                raise ExpertPredError(f"{bad} (truncated or corrupt member {zi.filename!r}: "
                                      f"{type(exc).__name__}: {exc})"[:300]) from None
            arr = np.frombuffer(raw, dtype=dtype)
            out[name] = arr.reshape(shape, order="F" if fortran else "C")
    return out
