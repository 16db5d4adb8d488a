"""Widen a MoE GGUF's experts with zeros: same routing and outputs, realistic bytes per expert.

The shipped models are tiny (a few KiB per expert), so every expert fits in the page cache
and an SSD prefetcher has nothing to do. ``widen`` writes a copy whose experts are as large
as a real model's (e.g. 4-8 GB in total) without changing what the model computes:

    y = down @ (act(gate @ x) * (up @ x))

Each expert's FFN width ``ff`` grows to ``new_ff``; the new rows of gate/up and the new
columns of down are zero, so the extra hidden units contribute ``down[:, j] * h_j = 0``
whatever the activation (SiLU(0) * 0 = 0 in any case). The router is copied unchanged, so
routing is identical. Only arithmetic order can differ slightly (longer dot products), so
llama.cpp's greedy tokens match exactly and logits match to float rounding — compare a
widened model against the original *converted to the same dtype* (``ff=original`` gives
exactly that conversion, with no padding).

Writing streams one expert (in chunks of at most ``CHUNK_BYTES``) at a time: RAM use is
bounded by the chunk size, not the model size. ``gguf.GGUFWriter`` writes the header, the
key/values and the tensor infos; the tensor data is then streamed into its file object at
the offsets GGUFWriter computed (cumulative ``ggml_pad(nbytes, alignment)``), and the result
is re-read with :func:`expertpred.gguf.layout.read_layout` before it is renamed into place.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from ..errors import ExpertPredError
from .layout import MoELayout, read_layout
from .writer import atomic_writer

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20  # largest buffer built in RAM while streaming one expert
ProgressFn = Callable[[int, int], None]  # (bytes written so far, total bytes)

_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.(weight|bias)$")
_ANY_EXPS = re.compile(r"^blk\.\d+\.ffn_\w+_exps\.\w+$")
_DENSE_FFN = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)\.weight$")


@dataclass(frozen=True)
class TargetDType:
    """A dtype the widened expert weights can be written in."""

    name: str
    qtype: QT
    file_type: gguf.LlamaFileType  # value for general.file_type

    @property
    def block(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.qtype][0]

    def row_bytes(self, n: int) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return n // block * size

    def encode(self, rows: np.ndarray) -> np.ndarray:
        """float32 (r, c) -> uint8 (r, row_bytes(c)). Zero bytes decode to zeros in every
        registered dtype (in the block types a zero scale makes the whole block zero), which
        is what lets the padding be written as plain zero bytes."""
        out = gguf.quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), self.qtype)
        return out.view(np.uint8).reshape(rows.shape[0], -1)


# Registry: name -> dtype. q8_0 / q4_0 rows must be a multiple of 32 elements (checked in
# plan). q4_0: what users run, and where compute per byte read is highest.
DTYPES: dict[str, TargetDType] = {
    "f32": TargetDType("f32", QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": TargetDType("f16", QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": TargetDType("q8_0", QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": TargetDType("q4_0", QT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
_F32 = DTYPES["f32"]  # expert biases stay f32 whatever the weight dtype


@dataclass(frozen=True)
class _OutTensor:
    """One tensor of the output file: its header record and how to produce its bytes."""

    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), elements
    qtype: QT
    nbytes: int
    source: gguf.ReaderTensor
    role: str | None  # None = copy bytes unchanged; else "gate", "up", "down", "gate_up"
    kind: str  # "weight" / "bias"


@dataclass(frozen=True)
class WidenPlan:
    """What :func:`widen` will write; :func:`plan_widen` computes it without writing."""

    source: Path
    arch: str
    dtype: str
    old_ff: int  # expert FFN width of the source
    new_ff: int  # expert FFN width of the output
    n_expert: int
    n_moe_layer: int
    old_bytes_per_expert: int
    bytes_per_expert: int  # one expert, all parts, in the output
    data_bytes: int  # tensor data of the output (padding between tensors included)
    metadata_updates: dict[str, int | list[int]]  # ff keys set in the output
    tensors: tuple[_OutTensor, ...]

    @property
    def expert_bytes(self) -> int:
        return self.bytes_per_expert * self.n_expert * self.n_moe_layer


@dataclass(frozen=True)
class WidenResult:
    plan: WidenPlan
    path: Path
    file_size: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.file_size / 1e6 / max(self.seconds, 1e-9)


# --- planning ---------------------------------------------------------------------------


def _np_shape(t: gguf.ReaderTensor) -> tuple[int, ...]:
    return tuple(int(x) for x in reversed(t.shape))


def _tensor_bytes(shape: tuple[int, ...], qtype: QT) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block * size)


def _source_ff(lay: MoELayout, reader: gguf.GGUFReader) -> int:
    """The expert FFN width, from the down projections (ggml ne0 = ff); must be uniform."""
    widths = {int(t.shape[0]) for t in reader.tensors
              if (m := _EXPS.match(t.name)) and m[2] == "down" and m[3] == "weight"}
    if len(widths) != 1:
        raise ExpertPredError(f"{lay.path}: expert widths {sorted(widths)} across layers; "
                              "expected one ffn_down_exps width for all MoE layers")
    return widths.pop()


def _out_shape(role: str, kind: str, shape: tuple[int, ...], new_ff: int) -> tuple[int, ...]:
    """Numpy shape of an expert tensor after widening (expert index outermost)."""
    e = shape[0]
    if kind == "weight":
        if role in ("gate", "up"):  # (E, ff, d): new rows
            return (e, new_ff, shape[2])
        if role == "down":  # (E, d, ff): new columns
            return (e, shape[1], new_ff)
        return (e, 2 * new_ff, shape[2])  # gate_up: (E, 2ff, d), gate rows then up rows
    if role in ("gate", "up"):
        return (e, new_ff)
    if role == "gate_up":
        return (e, 2 * new_ff)
    return shape  # down bias (E, d) does not depend on ff


def _check_ff_shape(role: str, kind: str, shape: tuple[int, ...], ff: int, path: Path,
                    name: str) -> None:
    ff_axis = {("gate", "weight"): 1, ("up", "weight"): 1, ("down", "weight"): 2,
               ("gate_up", "weight"): 1, ("gate", "bias"): 1, ("up", "bias"): 1,
               ("gate_up", "bias"): 1}.get((role, kind))
    if ff_axis is None:
        return
    want = 2 * ff if role == "gate_up" else ff
    if len(shape) <= ff_axis or shape[ff_axis] != want:
        raise ExpertPredError(f"{path}: tensor {name} has shape {shape}, expected width {want} "
                              f"on axis {ff_axis} (expert FFN width {ff})")


def _ff_metadata(lay: MoELayout, reader: gguf.GGUFReader, ff: int,
                 new_ff: int) -> dict[str, int | list[int]]:
    """Which hparam keys carry the expert width in llama.cpp, and their new values.

    Archs differ: llama (Mixtral) sizes its experts by ``{arch}.feed_forward_length`` and
    ignores ``expert_feed_forward_length``; qwen*moe / deepseek2 / ... read
    ``expert_feed_forward_length`` (qwen3moe falls back to ``n_ff / n_expert_used``). So:

    1. ``expert_feed_forward_length``, when present, must equal the expert width: updated;
    2. ``feed_forward_length`` is updated where it equals the expert width (per layer if it
       is an array) — unless dense FFN tensors share a scalar value with the experts, where
       it must stay (refused when it is the only key that could carry the new width);
    3. when neither key applies, ``expert_feed_forward_length`` is added.
    """
    arch, moe = lay.arch, set(lay.moe_layers)

    def updated(key: str) -> int | list[int] | None:
        f = reader.fields.get(key)
        if f is None:
            return None
        v = f.contents()
        if isinstance(v, list):  # per-layer array
            hits = [i for i, x in enumerate(v) if i in moe and int(x) == ff]
            return [new_ff if i in hits else int(x) for i, x in enumerate(v)] if hits else None
        return new_ff if int(v) == ff else None

    key_exp, key_ff = f"{arch}.expert_feed_forward_length", f"{arch}.feed_forward_length"
    updates: dict[str, int | list[int]] = {}
    if key_exp in reader.fields:
        v = updated(key_exp)
        if v is None:
            raise ExpertPredError(f"{lay.path}: {key_exp}={reader.fields[key_exp].contents()} "
                                  f"but the expert tensors are {ff} wide; expected them equal")
        updates[key_exp] = v
    v = updated(key_ff)
    if v is not None:
        dense = [t.name for t in reader.tensors if _DENSE_FFN.match(t.name)]
        if not dense or isinstance(v, list):
            updates[key_ff] = v
        elif key_exp not in updates:
            raise ExpertPredError(f"{lay.path}: dense FFN tensors ({dense[0]}, ...) share "
                                  f"{key_ff}={ff} with the experts; cannot widen experts alone")
    if not updates:
        log.warning("%s: no hparam equals the expert width %d; adding %s", lay.path, ff,
                    key_exp)
        updates[key_exp] = new_ff
    return updates


def plan_widen(model: str | os.PathLike[str], *, ff: int | None = None,
               expert_mib: float | None = None, total_gib: float | None = None,
               dtype: str = "f16", out: str | os.PathLike[str] | None = None) -> WidenPlan:
    """Check the inputs and compute the output geometry. Exactly one of ``ff`` (new expert
    FFN width), ``expert_mib`` (MiB per expert, all its parts) or ``total_gib`` (size of the
    output file) must be given; sizes round up to the next multiple of 32 in width. With
    ``out``, also check that it is not the input and that its disk has room."""
    path = Path(model)
    if dtype not in DTYPES:
        raise ExpertPredError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    given = [k for k, v in (("--ff", ff), ("--expert-mib", expert_mib),
                            ("--total-gib", total_gib)) if v is not None]
    if len(given) != 1:
        raise ExpertPredError(f"give exactly one of --ff, --expert-mib, --total-gib "
                              f"(got {', '.join(given) or 'none'})")
    lay = read_layout(path)  # refuses non-GGUF and dense models in one line
    reader = gguf.GGUFReader(str(path), "r")
    old_ff = _source_ff(lay, reader)
    classified = _classify(reader, path, old_ff)

    def sizes(new_ff: int) -> tuple[int, int, tuple[_OutTensor, ...]]:
        return _sizes(classified, target, f"blk.{lay.moe_layers[0]}.", new_ff)

    if ff is not None:
        new_ff = int(ff)
    else:
        want = (expert_mib * (1 << 20)) if expert_mib is not None else (total_gib * (1 << 30))
        new_ff = _smallest_width(lambda w: sizes(w)[0 if expert_mib is not None else 1],
                                 want, given[0])
    old_bpe = lay.bytes_per_expert()
    if new_ff < old_ff:
        what = f"--ff {new_ff}" if ff is not None else f"{given[0]} (width {new_ff})"
        raise ExpertPredError(f"{path}: {what} is smaller than the original expert width "
                              f"{old_ff} ({old_bpe} bytes per expert); expected a larger target")
    if target.block > 1:
        widths = {"n_embd": lay.n_embd, "original ff": old_ff, "new ff": new_ff}
        bad = ", ".join(f"{k}={v}" for k, v in widths.items() if v % target.block)
        if bad:
            raise ExpertPredError(f"{path}: dtype {dtype} needs widths that are multiples of "
                                  f"{target.block}; got {bad}")
    per_expert, data, tensors = sizes(new_ff)
    if out is not None:
        _check_out(path, Path(out), data)
    return WidenPlan(
        source=path, arch=lay.arch, dtype=dtype, old_ff=old_ff, new_ff=new_ff,
        n_expert=lay.n_expert, n_moe_layer=len(lay.moe_layers),
        old_bytes_per_expert=old_bpe, bytes_per_expert=per_expert, data_bytes=data,
        metadata_updates=_ff_metadata(lay, reader, old_ff, new_ff), tensors=tensors,
    )


# tensor, expert role (None: copied as is), kind ("weight" or "bias")
_Classified = list[tuple[gguf.ReaderTensor, "str | None", str]]


def _classify(reader: gguf.GGUFReader, path: Path, old_ff: int) -> _Classified:
    """Every source tensor with its expert role (None: copied as is); unknown per-expert
    tensors are refused, not guessed."""
    classified: _Classified = []
    for t in reader.tensors:
        if m := _EXPS.match(t.name):
            _check_ff_shape(m[2], m[3], _np_shape(t), old_ff, path, t.name)
            classified.append((t, m[2], m[3]))
        elif _ANY_EXPS.match(t.name):
            raise ExpertPredError(f"{path}: expert tensor {t.name} is not one of ffn_gate/up/"
                                  "down/gate_up_exps.weight|bias; cannot widen it")
        else:
            classified.append((t, None, ""))
    return classified


def _sizes(classified: _Classified, target: TargetDType, first_moe_prefix: str,
           new_ff: int) -> tuple[int, int, tuple[_OutTensor, ...]]:
    """(bytes per expert of the first MoE layer, padded data bytes, output tensors) at
    width ``new_ff``; expert weights take the target dtype, expert biases stay F32."""
    ts = []
    for t, role, kind in classified:
        shape = _np_shape(t)
        if role is None:
            ts.append(_OutTensor(t.name, shape, QT(t.tensor_type), int(t.n_bytes), t, None, ""))
            continue
        oshape = _out_shape(role, kind, shape, new_ff)
        qt = target.qtype if kind == "weight" else QT.F32
        ts.append(_OutTensor(t.name, oshape, qt, _tensor_bytes(oshape, qt), t, role, kind))
    per_expert = sum(o.nbytes // o.shape[0] for o in ts
                     if o.role is not None and o.name.startswith(first_moe_prefix))
    data = sum(gguf.GGUFWriter.ggml_pad(o.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT) for o in ts)
    return per_expert, data, tuple(ts)


def _smallest_width(size_at: Callable[[int], int], want: float, flag: str) -> int:
    """The smallest multiple of 32 whose size reaches ``want`` (size grows with width):
    exponential then binary search over multiples of 32."""
    lo, hi = 1, 32
    while size_at(hi * 32) < want:
        lo, hi = hi, hi * 2
        if hi > 1 << 26:
            raise ExpertPredError(f"target {flag}={want / (1 << 30):.1f} GiB is absurd")
    while lo < hi:
        mid = (lo + hi) // 2
        if size_at(mid * 32) >= want:
            hi = mid
        else:
            lo = mid + 1
    return hi * 32


def _check_out(source: Path, out: Path, nbytes: int) -> None:
    if out.exists() and out.resolve() == source.resolve():
        raise ExpertPredError(f"{out}: output is the input model; expected a new path")
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < nbytes + (64 << 20):
        raise ExpertPredError(f"{out.parent}: {free / 2**30:.1f} GiB free, the widened model "
                              f"needs {nbytes / 2**30:.1f} GiB")


# --- streaming the bytes ------------------------------------------------------------------


def _expert_f32(t: gguf.ReaderTensor, e: int) -> np.ndarray:
    """Expert ``e`` of a stacked tensor as float32, numpy shape without the expert axis."""
    qt = QT(t.tensor_type)
    raw = np.asarray(t.data[e])
    if qt not in (QT.F32, QT.F16):
        raw = raw.view(np.uint8)
    x = gguf.quants.dequantize(raw, qt)
    return np.asarray(x, dtype=np.float32).reshape(_np_shape(t)[1:])


def _zeros(n: int) -> Iterator[memoryview]:
    buf = memoryview(bytes(min(n, CHUNK_BYTES)))
    while n > 0:
        k = min(n, len(buf))
        yield buf[:k]
        n -= k


def _rows_padded(src: np.ndarray, new_rows: int, dt: TargetDType) -> Iterator[memoryview]:
    """(rows, cols) -> new_rows rows: the encoded source rows, then zero rows."""
    rows, cols = src.shape
    rb = dt.row_bytes(cols)
    step = max(1, CHUNK_BYTES // max(rb, 1))
    for r in range(0, rows, step):
        yield memoryview(dt.encode(src[r:r + step])).cast("B")
    yield from _zeros((new_rows - rows) * rb)


def _cols_padded(src: np.ndarray, new_cols: int, dt: TargetDType) -> Iterator[memoryview]:
    """(rows, cols) -> (rows, new_cols): each row is its encoded values, then zeros.

    Only the first ``ceil(cols / block) * block`` columns are encoded (q8_0 / q4_0 blocks);
    the rest of each row is zero bytes, which decode to zeros."""
    rows, cols = src.shape
    enc_cols = -(-cols // dt.block) * dt.block
    rb_new, rb_enc = dt.row_bytes(new_cols), dt.row_bytes(enc_cols)
    step = max(1, CHUNK_BYTES // max(rb_new, 1))
    for r in range(0, rows, step):
        part = src[r:r + step]
        if enc_cols != cols:
            part = np.pad(part, ((0, 0), (0, enc_cols - cols)))
        out = np.zeros((part.shape[0], rb_new), dtype=np.uint8)
        out[:, :rb_enc] = dt.encode(part)
        yield memoryview(out).cast("B")


def _expert_chunks(o: _OutTensor, e: int, old_ff: int, new_ff: int,
                   target: TargetDType) -> Iterator[memoryview]:
    """The output bytes of expert ``e`` of expert tensor ``o``."""
    src = _expert_f32(o.source, e)
    if o.kind == "weight":
        if o.role in ("gate", "up"):
            yield from _rows_padded(src, new_ff, target)
        elif o.role == "down":
            yield from _cols_padded(src, new_ff, target)
        else:  # gate_up: gate rows then up rows, each padded
            yield from _rows_padded(src[:old_ff], new_ff, target)
            yield from _rows_padded(src[old_ff:], new_ff, target)
        return
    row = src.reshape(1, -1)  # biases: one f32 row per expert
    if o.role in ("gate", "up"):
        yield from _cols_padded(row, new_ff, _F32)
    elif o.role == "gate_up":
        yield from _cols_padded(row[:, :old_ff], new_ff, _F32)
        yield from _cols_padded(row[:, old_ff:], new_ff, _F32)
    else:
        yield from _rows_padded(row, 1, _F32)


def _tensor_chunks(o: _OutTensor, plan: WidenPlan) -> Iterator[memoryview]:
    if o.role is None:  # copy unchanged, straight from the source mapping
        raw = memoryview(np.ascontiguousarray(o.source.data).view(np.uint8).reshape(-1))
        for i in range(0, len(raw), CHUNK_BYTES):
            yield raw[i:i + CHUNK_BYTES]
        return
    target = DTYPES[plan.dtype]
    for e in range(o.shape[0]):
        yield from _expert_chunks(o, e, plan.old_ff, plan.new_ff, target)


def _copy_metadata(reader: gguf.GGUFReader, w: gguf.GGUFWriter, plan: WidenPlan) -> None:
    skip = {"general.architecture", "general.alignment", "general.file_type"}
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name in skip:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = plan.metadata_updates.get(f.name, f.contents())
        if f.name == "general.name":
            value = f"{value} (widened ff={plan.new_ff} {plan.dtype})"
        w.add_key_value(f.name, value, vtype, sub_type=sub)
    for key, value in plan.metadata_updates.items():
        if key not in reader.fields:
            w.add_uint32(key, int(value))  # type: ignore[arg-type]
    w.add_file_type(int(DTYPES[plan.dtype].file_type))
    w.add_uint32("expertpred.widen.source_ff", plan.old_ff)
    w.add_string("expertpred.widen.source", plan.source.name)


def widen(model: str | os.PathLike[str], out: str | os.PathLike[str], *, ff: int | None = None,
          expert_mib: float | None = None, total_gib: float | None = None, dtype: str = "f16",
          progress: ProgressFn | None = None) -> WidenResult:
    """Write ``out``: ``model`` with every expert zero-padded to the requested size.

    Streams (RAM bounded by ``CHUNK_BYTES``), writes ``out.tmp`` and renames it when the
    re-read layout checks out. ``progress(done, total)`` is called after every chunk.
    """
    t0 = time.perf_counter()
    out = Path(out)
    plan = plan_widen(model, ff=ff, expert_mib=expert_mib, total_gib=total_gib, dtype=dtype,
                      out=out)
    log.info("widen %s -> %s: ff %d -> %d, %s, %d bytes per expert", plan.source, out,
             plan.old_ff, plan.new_ff, plan.dtype, plan.bytes_per_expert)

    reader = gguf.GGUFReader(str(plan.source), "r")
    with atomic_writer(out, plan.arch) as (w, tmp):
        _copy_metadata(reader, w, plan)
        for o in plan.tensors:
            w.add_tensor_info(o.name, o.shape, np.dtype(np.float32), o.nbytes, raw_dtype=o.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        assert w.fout is not None and len(w.fout) == 1
        f = w.fout[0]
        align = w.data_alignment
        w.write_padding(f, f.tell())
        done = 0
        for o in plan.tensors:
            n = 0
            for chunk in _tensor_chunks(o, plan):
                f.write(chunk)
                n += len(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, plan.data_bytes)
            if n != o.nbytes:  # a bug, not a user error: never rename a wrong file into place
                raise RuntimeError(f"{o.name}: wrote {n} bytes, expected {o.nbytes}")
            w.write_padding(f, n, align)
            done += gguf.GGUFWriter.ggml_pad(n, align) - n
        f.flush()
        os.fsync(f.fileno())
        w.close()
        got = read_layout(tmp)
        if got.bytes_per_expert() != plan.bytes_per_expert:
            raise RuntimeError(f"{tmp}: {got.bytes_per_expert()} bytes per expert after "
                               f"writing, planned {plan.bytes_per_expert}")
    if progress is not None:
        progress(plan.data_bytes, plan.data_bytes)
    dt = time.perf_counter() - t0
    size = out.stat().st_size
    log.info("wrote %s: %d bytes in %.1f s", out, size, dt)
    return WidenResult(plan=plan, path=out, file_size=size, seconds=dt)
