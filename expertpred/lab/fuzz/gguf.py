"""Fuzz target: ``layout.read_layout`` on mutations of the shipped GGUF models.

Mutations know the header's structure (taken once from the pristine seed with
``gguf.GGUFReader``): integer slots (counts, lengths, types, hparams, dims, tensor offsets)
set to edge values, non-UTF-8 bytes in strings, byte flips, inserted/deleted bytes and
truncation. An accepted file is checked against the reference reader (``gguf.GGUFReader``
on the mutated file) for what the layout promises: hparams in range and consistent with
the tensor shapes, every tensor inside the file and disjoint, and identical byte ranges.
"""

from __future__ import annotations

import random
import re
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ...gguf.layout import MoELayout, read_layout
from .core import Edit, MutableFile, flip_bytes, insert_delete, interesting_ints, truncate

_HPARAMS = ("expert_count", "expert_used_count", "block_count", "embedding_length")


class Slot(NamedTuple):
    """An integer (or string) part of the header at a known offset."""

    offset: int
    width: int  # bytes
    value: int  # original value (0 for strings)
    label: str
    is_string: bool = False


def header_slots(path: Path) -> tuple[list[Slot], int]:
    """Every integer and string part of ``path``'s header, and where tensor data starts."""
    import gguf

    r = gguf.GGUFReader(str(path))
    base = r.data.__array_interface__["data"][0]
    slots: list[Slot] = []

    def add(parts: list[np.ndarray], names: list[str], label: str) -> None:
        for part, what in zip(parts, names):
            off = part.__array_interface__["data"][0] - base
            if part.dtype == np.uint8 and what in ("key", "str"):
                slots.append(Slot(off, part.nbytes, 0, f"{label} {what} bytes", True))
            elif part.size == 1 and part.dtype.kind in "ui":
                slots.append(Slot(off, part.nbytes, int(part[0]), f"{label} {what}"))

    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            add(f.parts, ["value"], key)
            continue
        names = ["key len", "key", "type"]
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            names += ["item type", "count"]
            item = f.types[-1]
            per = ["str len", "str"] if item == gguf.GGUFValueType.STRING else ["item"]
            names += per * ((len(f.parts) - 5) // len(per))
            # long arrays: keep the header slots and a sample of items
            parts = f.parts[:5] + f.parts[5:5 + 8 * len(per)]
            add(parts, names[:len(parts)], key)
        else:
            names += ["str len", "str"] if f.types[0] == gguf.GGUFValueType.STRING else ["value"]
            add(f.parts, names, key)
    for t in r.tensors:
        add(t.field.parts, ["name len", "str", "n_dims", "dims", "type", "offset"],
            f"tensor {t.name}")
        dims_part = t.field.parts[3]
        off = dims_part.__array_interface__["data"][0] - base
        for i, v in enumerate(dims_part):
            slots.append(Slot(off + 8 * i, 8, int(v), f"tensor {t.name} dim {i}"))
    return slots, int(r.data_offset)


def _value(rng: random.Random, s: Slot) -> int:
    if any(h in s.label for h in _HPARAMS) and rng.random() < 0.6:
        return rng.randrange(0, 2 * max(s.value, 1) + 2)  # near-plausible hparams
    return interesting_ints(s.width, s.value, rng)


class GGUFTarget:
    """Mutations of one or more GGUF seeds; the reader is :func:`read_layout`."""

    name = "gguf"

    def __init__(self, seeds: list[Path]) -> None:
        self.seeds = [Path(s) for s in seeds]

    def prepare(self, workdir: Path) -> None:
        self.files = [MutableFile(s, workdir / f"seed{i}.gguf") for i, s in enumerate(self.seeds)]
        self.slots = [header_slots(s) for s in self.seeds]
        self.current: MutableFile = self.files[0]
        for f in self.files:  # warm: first-use imports are not the reader's cost
            read_layout(f.path)

    def _edit(self, i: int, rng: random.Random) -> Edit:
        data, (slots, data_start) = self.files[i].original, self.slots[i]
        ints = [s for s in slots if not s.is_string]
        strings = [s for s in slots if s.is_string and s.width]
        kind = rng.choices(["int", "hparam", "string", "flip", "indel", "truncate", "data",
                            "swap-offsets"], weights=[30, 15, 8, 15, 8, 8, 8, 8])[0]
        if kind == "hparam":
            ints = [s for s in ints if s.label.endswith(" value")
                    and any(h in s.label for h in _HPARAMS)] or ints
            kind = "int"
        if kind == "int":
            s = rng.choice(ints)
            v = _value(rng, s)
            fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[s.width]
            return Edit(s.offset, s.offset + s.width, struct.pack(fmt, v),
                        f"set {s.label}={v} (was {s.value})")
        if kind == "string":
            s = rng.choice(strings)
            pos = s.offset + rng.randrange(s.width)
            b = bytes([rng.choice([0x80, 0xC3, 0xFF, 0xFE, 0xED])])
            return Edit(pos, pos + 1, b, f"non-UTF-8 byte {b!r} in {s.label}")
        if kind == "flip":
            return flip_bytes(data, 0, data_start, rng, "header")
        if kind == "indel":
            return insert_delete(4, data_start, rng, "header")
        if kind == "truncate":
            return truncate(len(data), 0 if rng.random() < 0.5 else data_start, rng, "file")
        if kind == "data":
            return flip_bytes(data, data_start, len(data), rng, "tensor data")
        offs = [s for s in ints if s.label.endswith(" offset") and s.label.startswith("tensor")]
        a, b = rng.sample(offs, 2)
        v = b.value + rng.choice([0, 32, -32]) if b.value >= 32 else b.value
        return Edit(a.offset, a.offset + 8, struct.pack("<Q", v),
                    f"tensor offset {a.label}={v} (overlaps {b.label})")

    def case(self, rng: random.Random) -> str:
        i = rng.randrange(len(self.files))
        self.current = self.files[i]
        edit = self._edit(i, rng)
        self.current.apply(edit)
        return f"{self.seeds[i].parent.name}: {edit.label}"

    def read(self) -> MoELayout:
        return read_layout(self.current.path)

    def restore(self) -> None:
        self.current.restore()

    def inconsistencies(self, lay: object) -> list[str]:
        return layout_inconsistencies(lay, self.current.path)


def layout_inconsistencies(lay: MoELayout, path: Path) -> list[str]:
    """What is wrong with an accepted layout, judged by the reference reader."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - the reference rejects what we accepted
        return [f"accepted, but gguf.GGUFReader fails: {type(exc).__name__}: {exc}"[:200]]
    out: list[str] = []
    size = path.stat().st_size

    def hp(key: str) -> int | None:
        f = r.fields.get(f"{lay.arch}.{key}")
        try:
            return int(f.contents()) if f is not None else None
        except (TypeError, ValueError):
            return None

    n_e, n_used, n_layer, n_embd = (hp(k) for k in _HPARAMS)
    if not (n_e and n_used and 1 <= n_used <= n_e):
        out.append(f"expert_used_count={n_used} with expert_count={n_e}")
    if (n_e, n_used, n_layer, n_embd) != (lay.n_expert, lay.n_expert_used, lay.n_layer,
                                          lay.n_embd):
        out.append("layout hparams differ from the file's")
    blocks = [int(m[1]) for t in r.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))]
    if n_layer is None or (blocks and max(blocks) >= n_layer):
        out.append(f"block_count={n_layer} but tensors up to blk.{max(blocks, default=-1)}")
    spans = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name)
                   for t in r.tensors)
    if spans and spans[-1][1] > size:
        out.append(f"tensor data past the end of the file ({spans[-1][1]} > {size})")
    for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:]):
        if a_end > b_start:
            out.append(f"tensors {a} and {b} overlap")
            break
    for t in r.tensors:
        m = re.match(r"blk\.(\d+)\.(ffn_(?:gate|up|down|gate_up)_exps)\.weight$", t.name)
        if not m:
            continue
        shape = [int(x) for x in t.shape]
        want_embd = shape[1] if m[2] == "ffn_down_exps" else shape[0]
        if len(shape) != 3 or shape[2] != n_e or want_embd != n_embd:
            out.append(f"{t.name} shape {shape} vs n_embd={n_embd}, n_expert={n_e}")
            break
        layer, part = int(m[1]), f"{m[2]}.weight"
        if layer in lay.moe_layers and part in lay.parts:
            li, p = lay.layer_index(layer), lay.parts.index(part)
            if int(lay.offsets[li, 0, p]) != int(t.data_offset) or \
                    int(lay.nbytes[li, :, p].sum()) != int(t.n_bytes):
                out.append(f"layout range of {t.name} differs from the reference reader")
                break
    return out
