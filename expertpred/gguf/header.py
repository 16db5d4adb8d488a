"""A bounded reader of a GGUF file's header: metadata and tensor table, nothing else.

``gguf.GGUFReader`` builds a numpy view of every metadata array (a 150k-entry tokenizer
is 300k views) and trusts every count it reads, so one edited length in a tokenizer array
means minutes and gigabytes before it fails. The layout needs a few integers and the
tensor table, so this walker skips array payloads by computing their size, and checks every
count and size against the bytes left in the file *before* it reads or allocates.

Every problem is a :class:`GGUFError`: one line naming the file, the value and what was
expected. Only little-endian GGUF v2/v3 is read (what llama.cpp writes on x86-64).
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from ..errors import GGUFError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# ggml's GGML_MAX_DIMS: a tensor has at most 4 dimensions.
MAX_DIMS = 4
# llama.cpp's own guards; a key longer than this is damage, not a name.
MAX_KEY_BYTES = 65535
# ggml's GGML_MAX_NAME (64, with the terminating NUL): the longest tensor name.
MAX_TENSOR_NAME = 63
# A metadata string (chat templates are the longest, tens of KB): read into memory, so
# bounded well below what a damaged length could ask for.
MAX_STRING_BYTES = 16 << 20
# Numeric metadata arrays up to this many items are kept (per-layer hparams such as
# head_count lists); longer ones (token scores, token types) are skipped unread.
MAX_KEPT_ARRAY = 65536
# Bytes read at a time while skipping string arrays.
_CHUNK = 1 << 20
# One tensor's element count must fit ggml's int64 arithmetic.
MAX_ELEMENTS = 2**62


class ValueType(IntEnum):
    """GGUF metadata value types (gguf spec, ``gguf_type``)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct format of each fixed-size type (little-endian).
_FMT = {ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H",
        ValueType.INT16: "<h", ValueType.UINT32: "<I", ValueType.INT32: "<i",
        ValueType.FLOAT32: "<f", ValueType.BOOL: "<?", ValueType.UINT64: "<Q",
        ValueType.INT64: "<q", ValueType.FLOAT64: "<d"}
_SIZE = {t: struct.calcsize(f) for t, f in _FMT.items()}
_NP = {ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2",
       ValueType.INT16: "<i2", ValueType.UINT32: "<u4", ValueType.INT32: "<i4",
       ValueType.FLOAT32: "<f4", ValueType.BOOL: "<u1", ValueType.UINT64: "<u8",
       ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8"}
INTEGER_TYPES = frozenset({ValueType.UINT8, ValueType.INT8, ValueType.UINT16, ValueType.INT16,
                           ValueType.UINT32, ValueType.INT32, ValueType.UINT64,
                           ValueType.INT64})


class SkippedArray(NamedTuple):
    """A metadata array that was not read (strings, or too long to be an hparam)."""

    item_type: ValueType
    count: int


class TensorInfo(NamedTuple):
    """One entry of the tensor table, with its absolute byte range in the file."""

    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # ggml order: shape[0] is the innermost (contiguous) dimension
    offset: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF header says, checked for internal consistency and against the file size."""

    path: Path
    file_size: int  # bytes on disk when the header was read
    version: int  # 2 or 3
    alignment: int  # general.alignment (power of two), default 32
    data_offset: int  # absolute offset of the tensor data section
    fields: dict[str, object]  # key -> int | float | bool | str | np.ndarray | SkippedArray
    field_types: dict[str, ValueType]  # key -> its GGUF type (ARRAY for arrays)
    tensors: tuple[TensorInfo, ...]  # in file order

    def tensor(self, name: str) -> TensorInfo | None:
        for t in self.tensors:
            if t.name == name:
                return t
        return None

    @property
    def tensor_end(self) -> int:
        """Where the last tensor ends: a file shorter than this is truncated."""
        return max((t.end for t in self.tensors), default=self.data_offset)


class _Cursor:
    """Sequential reads that check every length against the bytes left in the file."""

    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size, self.pos = f, path, size, 0

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left():
            raise GGUFError(f"{self.path}: truncated or damaged GGUF ({what} needs {n} bytes at "
                            f"offset {self.pos}, the file has {self.left()} left)")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        b = self.f.read(n)
        if len(b) != n:  # the file shrank while we read it
            raise GGUFError(f"{self.path}: file changed while reading ({what} at {self.pos})")
        self.pos += n
        return b

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def scalar(self, vt: ValueType, what: str) -> int | float | bool:
        return struct.unpack(_FMT[vt], self.take(_SIZE[vt], what))[0]

    def u32(self, what: str) -> int:
        return int(self.scalar(ValueType.UINT32, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(ValueType.UINT64, what))

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            raise GGUFError(f"{self.path}: {what} is {n} bytes long, expected at most {limit}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = raw[exc.start:exc.start + 4]
            raise GGUFError(f"{self.path}: {what} is not UTF-8 (byte {exc.start} of {n}: "
                            f"{bad!r}); expected UTF-8 text") from None

    def skip_strings(self, count: int, what: str) -> None:
        """Skip ``count`` length-prefixed strings (a tokenizer array) without a read per
        string: walk lengths in chunks of the file, checking each against the file size."""
        unpack = struct.Struct("<Q").unpack_from
        start, p = self.pos, 0
        buf = self.f.read(min(_CHUNK, self.left()))
        for i in range(count):
            if p + 8 > len(buf):  # refill from the current string on
                start, p = start + p, 0
                self.f.seek(start)
                buf = self.f.read(min(_CHUNK, self.size - start))
                if len(buf) < 8:
                    self.pos = start
                    self.need(8, f"length of {what}[{i}]")
            n = unpack(buf, p)[0]
            if n > self.size - (start + p + 8):
                self.pos = start + p + 8
                self.need(n, f"{what}[{i}]")
            p += 8 + n
        self.pos = start + p
        self.f.seek(self.pos)


def _value_type(cur: _Cursor, key: str) -> ValueType:
    raw = cur.u32(f"type of {key!r}")
    try:
        return ValueType(raw)
    except ValueError:
        raise GGUFError(f"{cur.path}: metadata {key!r} has type {raw}, expected a GGUF value "
                        f"type 0..{max(ValueType)}") from None


def _read_array(cur: _Cursor, key: str) -> object:
    item = _value_type(cur, f"{key}[]")
    count = cur.u64(f"length of array {key!r}")
    if item == ValueType.ARRAY:
        raise GGUFError(f"{cur.path}: metadata {key!r} is an array of arrays; expected a flat "
                        "array (nested arrays are not used by any llama.cpp model)")
    # the smallest an item can be: a string is at least its 8-byte length
    least = 8 if item == ValueType.STRING else _SIZE[item]
    if count > cur.left() // least:
        raise GGUFError(f"{cur.path}: truncated or damaged GGUF (metadata array {key!r} claims "
                        f"{count} items of {item.name}, more than the {cur.left()} bytes left "
                        "in the file hold)")
    if item == ValueType.STRING:
        cur.skip_strings(count, key)
        return SkippedArray(item, count)
    if count > MAX_KEPT_ARRAY:
        cur.skip(count * least, f"array {key!r}")
        return SkippedArray(item, count)
    raw = cur.take(count * least, f"array {key!r}")
    values = np.frombuffer(raw, dtype=_NP[item]).copy()
    return values.astype(bool) if item == ValueType.BOOL else values


def _read_fields(cur: _Cursor, n_kv: int) -> tuple[dict[str, object], dict[str, ValueType]]:
    fields: dict[str, object] = {}
    types: dict[str, ValueType] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}", limit=MAX_KEY_BYTES)
        if key in fields:
            raise GGUFError(f"{cur.path}: metadata key {key!r} appears twice; expected unique keys")
        vt = _value_type(cur, key)
        if vt == ValueType.STRING:
            value: object = cur.string(f"metadata {key!r}", limit=MAX_STRING_BYTES)
        elif vt == ValueType.ARRAY:
            value = _read_array(cur, key)
        else:
            value = cur.scalar(vt, f"metadata {key!r}")
        fields[key], types[key] = value, vt
    return fields, types


def _alignment(path: Path, fields: dict[str, object], types: dict[str, ValueType]) -> int:
    if "general.alignment" not in fields:
        return DEFAULT_ALIGNMENT
    a = fields["general.alignment"]
    if types["general.alignment"] not in INTEGER_TYPES or not 0 < int(a) <= 1 << 30 \
            or int(a) & (int(a) - 1):
        raise GGUFError(f"{path}: general.alignment is {a!r}, expected a power of two")
    return int(a)


def _quant_sizes() -> dict[int, tuple[int, int]]:
    from gguf.constants import GGML_QUANT_SIZES  # local: gguf imports are slow-ish

    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


def _read_tensor_infos(cur: _Cursor, n_tensors: int) -> list[tuple[str, int, tuple[int, ...],
                                                                   int]]:
    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}", limit=MAX_TENSOR_NAME)
        if name in names:
            raise GGUFError(f"{cur.path}: tensor {name!r} appears twice; expected unique names")
        names.add(name)
        n_dims = cur.u32(f"n_dims of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{cur.path}: tensor {name!r} has {n_dims} dimensions, expected "
                            f"1..{MAX_DIMS}")
        shape = tuple(cur.u64(f"dims of {name!r}") for _ in range(n_dims))
        ggml_type = cur.u32(f"type of {name!r}")
        rel = cur.u64(f"offset of {name!r}")
        infos.append((name, ggml_type, shape, rel))
    return infos


def _tensor_table(path: Path, size: int, data_offset: int, alignment: int,
                  infos: list[tuple[str, int, tuple[int, ...], int]]) -> tuple[TensorInfo, ...]:
    sizes = _quant_sizes()
    out = []
    for name, ggml_type, shape, rel in infos:
        if ggml_type not in sizes:
            raise GGUFError(f"{path}: tensor {name!r} has ggml type {ggml_type}, expected one of "
                            "the types gguf knows")
        block, type_size = sizes[ggml_type]
        n = 1
        for d in shape:
            if d < 1 or n * d > MAX_ELEMENTS:
                raise GGUFError(f"{path}: tensor {name!r} has shape {list(shape)}, expected "
                                f"dimensions >= 1 with at most {MAX_ELEMENTS} elements")
            n *= d
        if shape[0] % block:
            raise GGUFError(f"{path}: tensor {name!r} has row length {shape[0]}, expected a "
                            f"multiple of its type's block size {block}")
        if rel % alignment:
            raise GGUFError(f"{path}: tensor {name!r} starts at data offset {rel}, expected a "
                            f"multiple of the alignment {alignment}")
        nbytes = n // block * type_size
        start = data_offset + rel
        if start + nbytes > size:
            raise GGUFError(f"{path}: truncated GGUF (tensor {name} ends at byte "
                            f"{start + nbytes}, file has {size})")
        out.append(TensorInfo(name, ggml_type, shape, start, nbytes))
    by_start = sorted(out, key=lambda t: t.offset)
    for a, b in zip(by_start, by_start[1:]):
        if a.end > b.offset:
            raise GGUFError(f"{path}: tensors {a.name} (bytes {a.offset}..{a.end}) and {b.name} "
                            f"(from {b.offset}) overlap; expected disjoint data ranges")
    return tuple(out)


def read_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Read and check the header of the GGUF file at ``path`` (metadata + tensor table).

    Reads only the header bytes; tokenizer arrays are skipped, never decoded.
    """
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if not path.is_file():
        raise GGUFError(f"{path}: not a regular file (expected a .gguf model file)")
    try:
        f = open(path, "rb", buffering=1 << 20)
    except OSError as exc:
        raise GGUFError(f"{path}: cannot open ({exc.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        cur = _Cursor(f, path, size)
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        cur.pos = 4
        version = cur.u32("version")
        if version not in SUPPORTED_VERSIONS:
            hint = " (big-endian file?)" if version > 0xFFFF else ""
            raise GGUFError(f"{path}: GGUF version {version}{hint}, expected one of "
                            f"{list(SUPPORTED_VERSIONS)} little-endian")
        n_tensors, n_kv = cur.u64("tensor count"), cur.u64("metadata count")
        # a metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor
        # entry at least 8 (name length) + 4 + 8 + 4 + 8 bytes
        if n_kv > cur.left() // 13 or n_tensors > cur.left() // 32:
            raise GGUFError(f"{path}: truncated or damaged GGUF (header claims {n_tensors} "
                            f"tensors and {n_kv} metadata entries, more than the {cur.left()} "
                            "bytes left in the file hold)")
        fields, types = _read_fields(cur, n_kv)
        alignment = _alignment(path, fields, types)
        infos = _read_tensor_infos(cur, n_tensors)
        data_offset = -(-cur.pos // alignment) * alignment
    if data_offset > size and infos:
        raise GGUFError(f"{path}: truncated GGUF (tensor data would start at byte "
                        f"{data_offset}, file has {size})")
    tensors = _tensor_table(path, size, data_offset, alignment, infos)
    return GGUFHeader(path=path, file_size=size, version=version, alignment=alignment,
                      data_offset=data_offset, fields=fields, field_types=types,
                      tensors=tensors)


def tensor_data(header: GGUFHeader, t: TensorInfo) -> np.ndarray:
    """The bytes of ``t`` as a read-only memmap in gguf.GGUFReader's convention: float types
    as their dtype with numpy shape ``reversed(t.shape)``; block-quantized types as uint8
    rows of ``shape[0] // block * type_size`` bytes (what ``gguf.dequantize`` takes)."""
    import gguf

    qtype = gguf.GGMLQuantizationType(t.ggml_type)
    dims = tuple(reversed(t.shape))
    plain = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
             gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
             gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
             gguf.GGMLQuantizationType.I64: np.int64}
    if qtype in plain:
        return np.memmap(header.path, dtype=plain[qtype], mode="r", offset=t.offset, shape=dims)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    row = t.shape[0] // block * type_size
    return np.memmap(header.path, dtype=np.uint8, mode="r", offset=t.offset,
                     shape=(*dims[:-1], row))
