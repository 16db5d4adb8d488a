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

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

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


def _field(reader, key: str, default: object = None) -> object:
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def _check_header(path: Path) -> int:
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFError(f"{path}: not a regular file (expected a .gguf model file)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    return size


def read_layout(path: str | os.PathLike[str]) -> MoELayout:
    """Parse ``path`` and return its expert layout.

    Raises :class:`GGUFError` (one line, names the file) for a missing path, a file that is
    not GGUF, a truncated GGUF, or a dense model without routed experts.
    """
    import gguf  # local: keeps `import expertpred.gguf.layout` cheap for the prefetch thread

    path = Path(path)
    size = _check_header(path)
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # gguf raises ValueError/IndexError/... on damaged headers
        why = f"{type(exc).__name__}: {exc}"
        raise GGUFError(f"{path}: truncated or damaged GGUF ({why})") from None

    arch = str(_field(reader, "general.architecture", ""))
    if not arch:
        raise GGUFError(f"{path}: GGUF without general.architecture")
    n_layer = int(_field(reader, f"{arch}.block_count", 0) or 0)
    n_expert = int(_field(reader, f"{arch}.expert_count", 0) or 0)
    n_used = int(_field(reader, f"{arch}.expert_used_count", 0) or 0)
    n_embd = int(_field(reader, f"{arch}.embedding_length", 0) or 0)
    if n_expert <= 0:
        raise GGUFError(
            f"{path}: dense model (arch {arch!r} has no {arch}.expert_count); "
            "expected a Mixture-of-Experts GGUF"
        )

    stacked: dict[int, dict[str, TensorRange]] = {}
    routers: dict[int, list[TensorRange]] = {}
    shared: dict[int, list[TensorRange]] = {}
    for t in reader.tensors:
        tr = TensorRange(t.name, int(t.data_offset), int(t.n_bytes))
        if tr.offset + tr.nbytes > size:
            raise GGUFError(
                f"{path}: truncated GGUF (tensor {t.name} ends at byte {tr.offset + tr.nbytes}, "
                f"file has {size})"
            )
        if m := _EXPS.match(t.name):
            layer, role, kind = int(m[1]), m[2], m[3]
            if int(t.shape[-1]) != n_expert:
                raise GGUFError(
                    f"{path}: tensor {t.name} has outer dim {int(t.shape[-1])}, "
                    f"expected expert_count={n_expert}"
                )
            stacked.setdefault(layer, {})[f"{role}.{kind}"] = tr
        elif m := _SHEXP.match(t.name):
            shared.setdefault(int(m[1]), []).append(tr)
        elif m := _ROUTER.match(t.name):
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
        for p, part in enumerate(parts):
            tr = stacked[layer][part]
            if tr.nbytes % n_expert:
                raise GGUFError(f"{path}: {tr.name} has {tr.nbytes} bytes, "
                                f"not divisible by {n_expert} experts")
            per = tr.nbytes // n_expert
            offsets[li, :, p] = tr.offset + per * np.arange(n_expert, dtype=np.int64)
            nbytes[li, :, p] = per

    meta = {k: _field(reader, k) for k in reader.fields
            if k.startswith(f"{arch}.") or k.startswith("general.")}
    return MoELayout(
        path=path, arch=arch, n_layer=n_layer, n_expert=n_expert, n_expert_used=n_used,
        n_embd=n_embd, file_size=size, moe_layers=moe_layers, parts=parts,
        offsets=offsets, nbytes=nbytes,
        routers={k: tuple(v) for k, v in routers.items()},
        shared={k: tuple(v) for k, v in shared.items()},
        metadata=meta,
    )


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """sha256 of a file, streamed (model files can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def read_tensors(path: str | os.PathLike[str], names: list[str]) -> dict[str, np.ndarray]:
    """The named tensors that exist in ``path``, dequantized to float32 in numpy (row-major)
    shape — one pass over the GGUF header however many names are asked for."""
    import gguf

    want = set(names)
    out: dict[str, np.ndarray] = {}
    for t in gguf.GGUFReader(str(path), "r").tensors:
        if t.name in want:
            data = np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
            out[t.name] = data.reshape([int(x) for x in reversed(t.shape)])
    return out


def router_weight(path: str | os.PathLike[str], layer: int) -> np.ndarray:
    """Router matrix of ``layer`` as float32 numpy, shape (n_expert, n_embd)."""
    name = f"blk.{layer}.ffn_gate_inp.weight"
    found = read_tensors(path, [name])
    if name not in found:
        raise GGUFError(f"{path}: no tensor {name}")
    return found[name]
