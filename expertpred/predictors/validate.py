"""Structural validation of a loaded predictor artifact, so that what loads cannot fail later.

:func:`validate_artifact` checks the header (every key and its type) and, per offset
``d`` and scorer kind, every array: present, its dtype and shape derived from the model
(n_moe layers L, n_expert E, n_embd) and the spec, indices in range, values finite, and
tree structure that a fixed-depth walk can follow. :func:`artifact_checksum` is a sha256
over the header fields that decide predictions and over every array (name, dtype, shape,
bytes), written at export time: a swapped or edited array with the right shape, or an
edited spec weight, is refused instead of predicting something else.

Errors are one-line :class:`ExpertPredError` naming the file, the array and what was
expected. This module knows the artifact layout; the scorers stay free of checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tokenize
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from ..features import PARTS, ModelInfo

log = logging.getLogger(__name__)

CHECKSUM_KEY = "checksum"
# header fields that decide what an artifact predicts (the checksum covers them)
_CHECKED_FIELDS = ("predictor", "params", "model", "features", "needs_hidden", "offsets")
_DESIGN_PARTS = frozenset(PARTS)  # the one feature-part table


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


class _Check:
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


# --- per scorer kind: (check, model, spec, arrays of this d with the "d<d>." prefix cut) ---

Rule = Callable[[_Check, ModelInfo, Mapping[str, Any], Mapping[str, np.ndarray]], None]
RULES: dict[str, Rule] = {}


def _rule(*kinds: str) -> Callable[[Rule], Rule]:
    def reg(fn: Rule) -> Rule:
        for k in kinds:
            RULES[k] = fn
        return fn
    return reg


@_rule("random")
def _random(c: _Check, m: ModelInfo, spec: Mapping[str, Any], a: Mapping[str, np.ndarray]) -> None:
    c.typed(spec, "seed", int, "spec")


@_rule("oracle")
def _oracle(c: _Check, m: ModelInfo, spec: Mapping[str, Any], a: Mapping[str, np.ndarray]) -> None:
    pass


@_rule("popularity", "previous-token")
def _freq(c: _Check, m: ModelInfo, spec: Mapping[str, Any], a: Mapping[str, np.ndarray]) -> None:
    c.array(a, "freq", "f", (m.n_moe, m.n_expert))


@_rule("transition")
def _transition(c: _Check, m: ModelInfo, spec: Mapping[str, Any],
                a: Mapping[str, np.ndarray]) -> None:
    if c.typed(spec, "source", str, "spec") not in ("experts", "probs"):
        raise c.fail(f"spec.source {spec['source']!r}, expected 'experts' or 'probs'")
    c.array(a, "table", "f", (m.n_moe, m.n_expert, m.n_expert))


@_rule("previous-token+transition")
def _prev_transition(c: _Check, m: ModelInfo, spec: Mapping[str, Any],
                     a: Mapping[str, np.ndarray]) -> None:
    w = c.typed(spec, "weight", (int, float), "spec")
    if not 0.0 <= w <= 1.0:
        raise c.fail(f"spec.weight {w!r}, expected 0..1")
    c.array(a, "table", "f", (m.n_moe, m.n_expert, m.n_expert))
    c.array(a, "freq", "f", (m.n_moe, m.n_expert))


@_rule("gate-lookahead")
def _gate(c: _Check, m: ModelInfo, spec: Mapping[str, Any], a: Mapping[str, np.ndarray]) -> None:
    c.array(a, "routers", "f", (m.n_moe, m.n_expert, m.n_embd))
    c.array(a, "norms", "f", (m.n_moe, m.n_embd))


def _design(c: _Check, m: ModelInfo, spec: Mapping[str, Any],
            a: Mapping[str, np.ndarray]) -> int:
    parts = c.typed(spec, "parts", list, "spec")
    if not parts or not all(isinstance(p, str) and p in _DESIGN_PARTS for p in parts):
        raise c.fail(f"spec.parts {parts!r}, expected names from {sorted(_DESIGN_PARTS)}")
    for key in ("layer_onehot", "gate", "uses_hidden"):
        c.typed(spec, key, bool, "spec")
    n_features = c.typed(spec, "n_features", int, "spec")
    if not 0 < n_features <= 1 << 24:
        raise c.fail(f"spec.n_features {n_features}, expected 1..{1 << 24}")
    if spec["gate"]:
        c.array(a, "gate_routers", "f", (m.n_moe, m.n_expert, m.n_embd))
        c.array(a, "gate_norms", "f", (m.n_moe, m.n_embd))
    else:
        c.array(a, "gate_routers", "f", (0, 0, 0))
        c.array(a, "gate_norms", "f", (0, 0))
    return n_features


@_rule("mlp")
def _mlp(c: _Check, m: ModelInfo, spec: Mapping[str, Any], a: Mapping[str, np.ndarray]) -> None:
    f = _design(c, m, spec, a)
    if c.typed(spec, "activations", list, "spec") != ["relu", "relu", "linear"]:
        raise c.fail(f"spec.activations {spec['activations']!r}, expected relu, relu, linear")
    c.array(a, "mean", "f", (f,))
    std = c.array(a, "std", "f", (f,))
    if std.size and not (std > 0).all():
        raise c.fail("array 'std' has values <= 0, expected positive scales")
    _layers(c, m, a, f, 2)


def _layers(c: _Check, m: ModelInfo, a: Mapping[str, np.ndarray], f: int, n: int) -> None:
    """``n`` hidden Linear layers w0/b0 .. from ``f`` inputs, then the per-layer heads."""
    width = f
    for i in range(n):
        width_next = c.array(a, f"w{i}", "f", (None, width)).shape[0]
        c.array(a, f"b{i}", "f", (width_next,))
        width = width_next
    c.array(a, f"w{n}", "f", (m.n_moe * m.n_expert, width))
    c.array(a, f"b{n}", "f", (m.n_moe * m.n_expert,))


@_rule("fast-mlp")
def _fast_mlp(c: _Check, m: ModelInfo, spec: Mapping[str, Any],
              a: Mapping[str, np.ndarray]) -> None:
    f = _design(c, m, spec, a)
    acts = c.typed(spec, "activations", list, "spec")
    n = len(acts) - 1
    if n not in (1, 2) or acts != ["relu"] * n + ["linear"]:
        raise c.fail(f"spec.activations {acts!r}, expected relu (once or twice), linear")
    _layers(c, m, a, f, n)


@_rule("lightgbm")
def _lightgbm(c: _Check, m: ModelInfo, spec: Mapping[str, Any],
              a: Mapping[str, np.ndarray]) -> None:
    f = _design(c, m, spec, a)
    shared = c.typed(spec, "shared", bool, "spec")
    # shared: one group, -1; else one group per MoE layer seen in training
    groups = c.array(a, "groups", "i", (1,) if shared else (None,), lo=-1 if shared else 0,
                     hi=-1 if shared else m.n_moe - 1)
    g = len(groups)
    if g == 0 or len(np.unique(groups)) != g:
        raise c.fail(f"array '{c.prefix}groups' {groups.tolist()[:8]}, expected distinct "
                     "layers")
    depth = c.typed(spec, "depth", list, "spec")
    if len(depth) != g or not all(isinstance(x, int) and 0 <= x <= 4096 for x in depth):
        raise c.fail(f"spec.depth {depth!r:.80}, expected {g} tree depths")
    consts = c.array(a, "constants", "f", (g, m.n_expert), finite=False)
    has_trees = c.array(a, "has_trees", "b", (g, m.n_expert))
    if not np.isfinite(consts[~has_trees]).all():  # NaN where a booster decides: unused
        raise c.fail(f"array '{c.prefix}constants' is not finite for an expert without trees")
    bounds = c.array(a, "group_nodes", "i", (g, 2), lo=0)
    n = c.array(a, "node_feature", "i", (None,), lo=0, hi=max(f - 1, 0)).shape[0]
    if len(bounds) and (bounds[0, 0] != 0 or bounds[-1, 1] != n
                        or (bounds[:, 0] > bounds[:, 1]).any()
                        or (bounds[1:, 0] != bounds[:-1, 1]).any()):
        raise c.fail(f"array 'group_nodes' does not split 0..{n} into consecutive ranges")
    c.array(a, "node_threshold", "f", (n,), finite=False)
    if np.isnan(a["node_threshold"]).any():
        raise c.fail("array 'node_threshold' has NaN, expected numbers")
    left = c.array(a, "node_left", "i", (n,), lo=0, hi=n - 1)
    right = c.array(a, "node_right", "i", (n,), lo=0, hi=n - 1)
    c.array(a, "node_value", "f", (n,))
    c.array(a, "node_default_left", "b", (n,))
    c.array(a, "node_missing", "i", (n,), lo=0, hi=2)
    c.array(a, "node_is_cat", "b", (n,))
    c.array(a, "node_cat_bits", "u", (n, None))
    tree_group = c.array(a, "tree_group", "i", (None,), lo=0, hi=g - 1)
    t = len(tree_group)
    roots = c.array(a, "tree_root", "i", (t,), lo=0, hi=max(n - 1, 0))
    experts = c.array(a, "tree_expert", "i", (t,), lo=0, hi=m.n_expert - 1)
    if t and not has_trees[tree_group, experts].all():
        raise c.fail(f"array '{c.prefix}tree_expert': a tree for an expert 'has_trees' says "
                     "has none")
    _check_trees(c, bounds, left, right, roots, tree_group, depth)


def _check_trees(c: _Check, bounds: np.ndarray, left: np.ndarray, right: np.ndarray,
                 roots: np.ndarray, tree_group: np.ndarray, depth: list[int]) -> None:
    """Nodes are preorder: a split's children come after it and inside its group's range; a
    leaf points at itself; no node is deeper than its group's walk depth."""
    n = len(left)
    if n == 0:
        if len(roots):
            raise c.fail("trees without nodes")
        return
    idx = np.arange(n)
    group_of = np.searchsorted(bounds[:, 1], idx, side="right")
    leaf = (left == idx) & (right == idx)
    split = ~leaf
    lo, hi = bounds[group_of, 0], bounds[group_of, 1]
    for name, child in (("node_left", left), ("node_right", right)):
        bad = split & ((child <= idx) | (child < lo) | (child >= hi))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise c.fail(f"array {name!r}: node {i} points at {int(child[i])}, expected a later "
                         f"node of its group ({int(lo[i])}..{int(hi[i]) - 1}) or itself (leaf)")
    if (roots < bounds[tree_group, 0]).any() or (roots >= bounds[tree_group, 1]).any():
        raise c.fail("array 'tree_root': a root outside its group's nodes")
    node_depth = np.zeros(n, dtype=np.int64)
    for i in np.flatnonzero(split):  # preorder: a parent is final before its children
        node_depth[left[i]] = max(node_depth[left[i]], node_depth[i] + 1)
        node_depth[right[i]] = max(node_depth[right[i]], node_depth[i] + 1)
    allowed = np.asarray(depth, dtype=np.int64)[group_of]
    if (node_depth > allowed).any():
        i = int(np.flatnonzero(node_depth > allowed)[0])
        raise c.fail(f"node {i} is at depth {int(node_depth[i])}, spec.depth allows "
                     f"{int(allowed[i])}")


# --- the entry point ---------------------------------------------------------------------------

def validate_artifact(path: str | Path, header: Mapping[str, Any],
                      arrays: Mapping[str, np.ndarray], known_kinds: set[str] | None = None
                      ) -> ModelInfo:
    """Check a loaded artifact completely; return its :class:`ModelInfo`.

    ``known_kinds``: scorer kinds the loader can build (default: every kind with a rule).
    """
    c = _Check(Path(path))
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
    kinds = set(RULES) if known_kinds is None else known_kinds & set(RULES)
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
        RULES[kind](c, model, spec, own)
        c.prefix = ""
        expected |= {f"d{key}.{name}" for name in declared}
    extra = sorted(set(arrays) - expected)
    if extra:
        raise c.fail(f"arrays {extra[:4]} are not declared in the header")
    # last: a structural error says more than "checksum differs"
    _check_checksum(c, header, arrays)
    return model


def _check_checksum(c: _Check, header: Mapping[str, Any],
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
