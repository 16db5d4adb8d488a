"""Where every expert's weights live inside a GGUF file: the one module that knows GGUF layout.

llama.cpp stacks the experts of a layer into 3-D tensors (``blk.L.ffn_gate_exps.weight``
with ggml ne = {n_embd, n_ff, n_expert}); the expert index is the outermost dimension, so
expert ``e`` of such a tensor is the contiguous byte range
``data_offset + e * n_bytes / n_expert`` — quantized block formats included. Everything
else in expertpred (prefetch engine, buffer manager, I/O trace analysis, widen) asks this
module for byte ranges instead of parsing GGUF itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import GGUFError
from ..model import ModelInfo
from .header import (
    INTEGER_TYPES,
    GGUFHeader,
    SkippedArray,
    TensorInfo,
    read_header,
    tensor_data,
)

log = logging.getLogger(__name__)

# Bounds far above any real model, low enough that arrays sized by them stay small.
MAX_EXPERTS = 1 << 16
MAX_LAYERS = 1 << 12
_ARCH = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_BLOCK = re.compile(r"^blk\.(\d+)\.")
# blk.<layer>.<role>.<weight|bias|...>: stacked per-expert tensors end in "_exps";
# some archs merge gate and up ("ffn_gate_up_exps").
_EXPS = re.compile(r"^blk\.(\d+)\.(ffn_\w+_exps)\.(\w+)$")
_SHEXP = re.compile(r"^blk\.(\d+)\.(ffn_\w+_shexp)\.(\w+)$")
_ROUTER = re.compile(r"^blk\.(\d+)\.(ffn_gate_inp|exp_probs_b)\.(\w+)$")


class TensorRange(NamedTuple):
    """One tensor's bytes in the file (absolute offset)."""

    name: str
    offset: int
    nbytes: int


class ExpertSlice(NamedTuple):
    """One expert's share of one stacked tensor: a contiguous byte range of the file."""

    layer: int
    expert: int
    tensor: str  # e.g. "ffn_gate_exps.weight"
    offset: int
    nbytes: int


@dataclass(frozen=True)
class MoELayout:
    """The expert geometry of one GGUF file.

    ``offsets[l, e, p]`` / ``nbytes[l, e, p]`` give the byte range of part ``p`` (one of
    ``parts``) of expert ``e`` in MoE layer ``moe_layers[l]`` — arrays, so the prefetch hot
    path never walks Python objects.
    """

    path: Path
    arch: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    n_embd: int
    file_size: int
    moe_layers: tuple[int, ...]  # block indices that have routed experts
    parts: tuple[str, ...]  # stacked tensor roles, e.g. ("ffn_down_exps.weight", ...)
    offsets: np.ndarray  # int64 (n_moe_layer, n_expert, n_parts)
    nbytes: np.ndarray  # int64 (n_moe_layer, n_expert, n_parts)
    routers: dict[int, tuple[TensorRange, ...]]  # layer -> router weight (+ bias / selection bias)
    shared: dict[int, tuple[TensorRange, ...]]  # layer -> shared-expert tensors
    metadata: dict[str, object] = field(default_factory=dict, repr=False)
    # where the last tensor ends: the least size the file must keep while llama.cpp maps it
    tensor_end: int = 0

    # --- lookups -------------------------------------------------------------------
    def layer_index(self, layer: int) -> int:
        """Row of ``offsets`` for block ``layer``; raises for a layer without experts."""
        try:
            return self.moe_layers.index(layer)
        except ValueError:
            raise KeyError(f"layer {layer} has no routed experts in {self.path}") from None

    def expert_slices(self, layer: int, expert: int) -> list[ExpertSlice]:
        """The byte ranges holding expert ``expert`` of block ``layer``."""
        if not 0 <= expert < self.n_expert:
            raise KeyError(f"expert {expert} out of range 0..{self.n_expert - 1}")
        li = self.layer_index(layer)
        return [
            ExpertSlice(layer, expert, part, int(self.offsets[li, expert, p]),
                        int(self.nbytes[li, expert, p]))
            for p, part in enumerate(self.parts)
        ]

    def bytes_per_expert(self, layer: int | None = None) -> int:
        """Bytes of one expert (all its parts) in ``layer`` (default: the first MoE layer)."""
        li = 0 if layer is None else self.layer_index(layer)
        return int(self.nbytes[li, 0].sum())

    @property
    def expert_bytes(self) -> int:
        """Bytes of all routed-expert weights in the file."""
        return int(self.nbytes.sum())

    @property
    def shared_bytes(self) -> int:
        return sum(t.nbytes for ts in self.shared.values() for t in ts)

    def summary(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "arch": self.arch,
            "n_layer": self.n_layer,
            "moe_layers": len(self.moe_layers),
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "n_embd": self.n_embd,
            "parts": list(self.parts),
            "bytes_per_expert": self.bytes_per_expert(),
            "expert_bytes": self.expert_bytes,
            "shared_expert_bytes": self.shared_bytes,
            "file_size": self.file_size,
            "expert_share": self.expert_bytes / self.file_size,
        }


def _int_field(hdr: GGUFHeader, key: str, lo: int, hi: int | None = None,
               default: int | None = None) -> int:
    """An integer hparam, checked for type and range (``default`` when absent; required when
    ``default`` is None)."""
    if key not in hdr.fields:
        if default is None:
            raise GGUFError(f"{hdr.path}: GGUF without {key}; expected an integer")
        return default
    value, vt = hdr.fields[key], hdr.field_types[key]
    if vt not in INTEGER_TYPES:
        raise GGUFError(f"{hdr.path}: {key} is {value!r} ({vt.name}), expected an integer")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        want = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise GGUFError(f"{hdr.path}: {key} is {value}, expected {want}")
    return value


def _arch(hdr: GGUFHeader) -> str:
    arch = hdr.fields.get("general.architecture")
    if arch is None:
        raise GGUFError(f"{hdr.path}: GGUF without general.architecture")
    if not isinstance(arch, str) or not _ARCH.match(arch):
        raise GGUFError(f"{hdr.path}: general.architecture is {arch!r}, expected a name "
                        "like 'llama' or 'qwen3moe'")
    return arch


def _check_shape(path: Path, t: TensorInfo, want: tuple[int | None, ...], why: str) -> None:
    """``want`` in ggml order; None = any size."""
    if len(t.shape) != len(want) or any(w is not None and s != w
                                        for s, w in zip(t.shape, want)):
        shown = ["*" if w is None else w for w in want]
        raise GGUFError(f"{path}: tensor {t.name} has ggml shape {list(t.shape)}, expected "
                        f"{shown} ({why})")


def _check_expert_tensor(path: Path, t: TensorInfo, role: str, kind: str, n_embd: int,
                         n_expert: int) -> None:
    why = f"embedding_length={n_embd}, expert_count={n_expert}"
    if role == "ffn_down_exps" and kind == "weight":
        _check_shape(path, t, (None, n_embd, n_expert), why)
    elif role in ("ffn_gate_exps", "ffn_up_exps", "ffn_gate_up_exps") and kind == "weight":
        _check_shape(path, t, (n_embd, None, n_expert), why)
    else:  # biases, scales, arch-specific stacked tensors: only the expert dim is known
        if t.shape[-1] != n_expert:
            raise GGUFError(f"{path}: tensor {t.name} has outer dim {t.shape[-1]}, "
                            f"expected expert_count={n_expert}")


def _check_router(path: Path, t: TensorInfo, role: str, kind: str, n_embd: int,
                  n_expert: int) -> None:
    why = f"embedding_length={n_embd}, expert_count={n_expert}"
    if role == "ffn_gate_inp" and kind == "weight":
        _check_shape(path, t, (n_embd, n_expert), why)
    elif t.shape[-1] != n_expert and t.shape[0] != n_expert:
        raise GGUFError(f"{path}: tensor {t.name} has shape {list(t.shape)}, expected a "
                        f"dimension of expert_count={n_expert}")


def read_layout(path: str | os.PathLike[str]) -> MoELayout:
    """Parse ``path`` and return its expert layout.

    Raises :class:`GGUFError` (one line, names the file and value) for a missing path, a
    file that is not GGUF, a truncated or damaged GGUF, a dense model without routed
    experts, or hparams that disagree with each other or with the tensor shapes.
    """
    path = Path(path)
    hdr = read_header(path)
    arch = _arch(hdr)
    n_expert = _int_field(hdr, f"{arch}.expert_count", lo=0, hi=MAX_EXPERTS, default=0)
    if n_expert <= 0:
        raise GGUFError(
            f"{path}: dense model (arch {arch!r} has no {arch}.expert_count); "
            "expected a Mixture-of-Experts GGUF"
        )
    n_layer = _int_field(hdr, f"{arch}.block_count", lo=1, hi=MAX_LAYERS)
    n_used = _int_field(hdr, f"{arch}.expert_used_count", lo=1, hi=n_expert)
    n_embd = _int_field(hdr, f"{arch}.embedding_length", lo=1, hi=1 << 20)

    stacked: dict[int, dict[str, TensorRange]] = {}
    routers: dict[int, list[TensorRange]] = {}
    shared: dict[int, list[TensorRange]] = {}
    for t in hdr.tensors:
        tr = TensorRange(t.name, t.offset, t.nbytes)
        if (m := _BLOCK.match(t.name)) and int(m[1]) >= n_layer:
            raise GGUFError(f"{path}: tensor {t.name} belongs to block {int(m[1])}, but "
                            f"{arch}.block_count is {n_layer}; expected blocks 0..{n_layer - 1}")
        if m := _EXPS.match(t.name):
            _check_expert_tensor(path, t, m[2], m[3], n_embd, n_expert)
            stacked.setdefault(int(m[1]), {})[f"{m[2]}.{m[3]}"] = tr
        elif m := _SHEXP.match(t.name):
            shared.setdefault(int(m[1]), []).append(tr)
        elif m := _ROUTER.match(t.name):
            _check_router(path, t, m[2], m[3], n_embd, n_expert)
            routers.setdefault(int(m[1]), []).append(tr)
    if not stacked:
        raise GGUFError(
            f"{path}: arch {arch!r} declares {n_expert} experts but has no *_exps tensors"
        )

    moe_layers = tuple(sorted(stacked))
    parts = tuple(sorted(stacked[moe_layers[0]]))
    offsets = np.zeros((len(moe_layers), n_expert, len(parts)), dtype=np.int64)
    nbytes = np.zeros_like(offsets)
    for li, layer in enumerate(moe_layers):
        if tuple(sorted(stacked[layer])) != parts:
            raise GGUFError(f"{path}: layer {layer} has expert tensors {sorted(stacked[layer])}, "
                            f"expected {list(parts)} like layer {moe_layers[0]}")
        if not any(r.name == f"blk.{layer}.ffn_gate_inp.weight" for r in routers.get(layer, ())):
            raise GGUFError(f"{path}: layer {layer} has expert tensors but no "
                            f"blk.{layer}.ffn_gate_inp.weight router; expected one")
        for p, part in enumerate(parts):
            tr = stacked[layer][part]
            if tr.nbytes % n_expert:
                raise GGUFError(f"{path}: {tr.name} has {tr.nbytes} bytes, "
                                f"not divisible by {n_expert} experts")
            per = tr.nbytes // n_expert
            offsets[li, :, p] = tr.offset + per * np.arange(n_expert, dtype=np.int64)
            nbytes[li, :, p] = per

    meta = {k: v for k, v in hdr.fields.items()
            if (k.startswith(f"{arch}.") or k.startswith("general."))
            and not isinstance(v, SkippedArray)}
    return MoELayout(
        path=path, arch=arch, n_layer=n_layer, n_expert=n_expert, n_expert_used=n_used,
        n_embd=n_embd, file_size=hdr.file_size, moe_layers=moe_layers, parts=parts,
        offsets=offsets, nbytes=nbytes,
        routers={k: tuple(v) for k, v in routers.items()},
        shared={k: tuple(v) for k, v in shared.items()},
        metadata=meta, tensor_end=hdr.tensor_end,
    )


def check_file_complete(path: str | os.PathLike[str], layout: MoELayout) -> None:
    """Refuse a file that is now shorter than its tensors reach (it was truncated or replaced
    after ``layout`` was read): llama.cpp maps the file, and touching a mapped page past the
    end of the file kills the whole process with SIGBUS."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise GGUFError(f"{path}: cannot stat ({exc.strerror})") from None
    if size < layout.tensor_end:
        raise GGUFError(f"{path}: truncated GGUF ({size} bytes, its tensors reach byte "
                        f"{layout.tensor_end}); expected the whole file")


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """sha256 of a file, streamed (model files can be many GB): the one file hash of
    expertpred (model identity, trace shards, prompt files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def routing_fingerprint(path: str | os.PathLike[str], layout: MoELayout | None = None) -> str:
    """sha256 over every tensor that is not a stacked expert tensor (name, type, shape,
    bytes): everything routing depends on. A widened copy (``expertpred widen``) has the
    fingerprint of its source; reading it costs the non-expert bytes only."""
    lay = layout or read_layout(path)
    experts = {f"blk.{b}.{part}" for b in lay.moe_layers for part in lay.parts}
    h = hashlib.sha256()
    hdr = read_header(path)
    with open(path, "rb") as f:
        for t in hdr.tensors:
            if t.name in experts:
                continue
            h.update(f"{t.name}|{t.ggml_type}|{t.shape}|".encode())
            f.seek(t.offset)
            h.update(f.read(t.nbytes))
    return h.hexdigest()


def model_info(path: str | os.PathLike[str], layout: MoELayout | None = None) -> ModelInfo:
    """The :class:`~expertpred.model.ModelInfo` of a GGUF file, hashed (reads the whole file;
    raises GGUFError for a dense / bad model)."""
    lay = layout or read_layout(path)
    return ModelInfo.from_layout(lay, sha256=file_sha256(path), path=str(path))


class GGUFFile:
    """A GGUF file as :func:`expertpred.model.check_identity` asks about it; the hash and the
    fingerprint are computed on first use and kept (each reads the file)."""

    def __init__(self, path: str | os.PathLike[str], layout: MoELayout | None = None) -> None:
        self.path = str(path)
        self.layout = layout or read_layout(path)
        self.info = ModelInfo.from_layout(self.layout, path=self.path)
        self._sha256 = ""
        self._fingerprint = ""

    def sha256(self) -> str:
        if not self._sha256:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def routing_fingerprint(self) -> str:
        if not self._fingerprint:
            self._fingerprint = routing_fingerprint(self.path, self.layout)
        return self._fingerprint


def read_tensors(path: str | os.PathLike[str], names: list[str]) -> dict[str, np.ndarray]:
    """The named tensors that exist in ``path``, dequantized to float32 in numpy (row-major)
    shape — one pass over the GGUF header however many names are asked for."""
    import gguf

    hdr = read_header(path)
    want = set(names)
    out: dict[str, np.ndarray] = {}
    for t in hdr.tensors:
        if t.name in want:
            qtype = gguf.GGMLQuantizationType(t.ggml_type)
            data = np.asarray(gguf.dequantize(tensor_data(hdr, t), qtype), dtype=np.float32)
            out[t.name] = data.reshape([int(x) for x in reversed(t.shape)])
    return out


def router_weight(path: str | os.PathLike[str], layer: int) -> np.ndarray:
    """Router matrix of ``layer`` as float32 numpy, shape (n_expert, n_embd)."""
    name = f"blk.{layer}.ffn_gate_inp.weight"
    found = read_tensors(path, [name])
    if name not in found:
        raise GGUFError(f"{path}: no tensor {name}")
    return found[name]
