"""The router-trace dataset: an open Parquet format, a crash-safe streaming writer, a reader.

A dataset is a directory::

    manifest.json           what was traced, with what, and which shards are finished
    shard-00000.parquet     one row per (sequence, token position); whole sequences only
    shard-00001.parquet
    ...

Row schema (``L`` = MoE layers, ``k`` = experts used per token, ``E`` = experts, ``D`` =
hidden size)::

    seq_id    int32                 index of the prompt in its prompt file (the resume key)
    prompt_id string                id from the prompt file
    domain    dictionary<string>    "code", "prose", or the user's label
    split     dictionary<string>    "train" / "validation" / "test", or null
    pos       int32                 token position in the sequence, 0..T-1
    token     int32                 token id
    phase     int8                  0 prompt (prefill), 1 decode
    experts   fixed_size_list<fixed_size_list<int16, k>, L>     selected experts, best first
    weights   fixed_size_list<fixed_size_list<float32, k>, L>   their mixing weights
    logits    fixed_size_list<fixed_size_list<float32, E>, L>   router scores
    hidden    fixed_size_list<fixed_size_list<float16, D>, L>   router input (optional)

Nested fixed-size lists keep one value per MoE layer in one column; pandas, duckdb, polars
and HF ``datasets`` all read them (as arrays of arrays, ``SMALLINT[][]``, ``Array(Int16,
(L, k))`` and ``List(List(int16, k), L)``), and numpy gets them back without copies by
flattening twice. Layer ``l`` of the nested lists is block ``manifest["model"]
["moe_layers"][l]`` of the model.

Each shard also carries, in its Parquet key-value metadata, the model sha256 (so a shard
copied in from another run is caught) and one JSON record per sequence (prompt id, token
counts, generated text) — small per-sequence facts that would be wasteful as columns.

Crash safety: a shard is written to ``shard-NNNNN.parquet.tmp``, fsynced, renamed, the
directory fsynced, and only then is ``manifest.json`` rewritten (tmp + fsync +
``os.replace``). A SIGKILL at any point leaves every finished shard intact and the manifest
naming a subset of them; ``resume=True`` removes ``*.tmp`` files, adopts a finished shard
the manifest did not yet name, and skips the sequences already written.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import platform
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ExpertPredError
from .record import SequenceTrace
from .validate import ShardBytes, TraceDatasetError, check_manifest, check_shard_rows

log = logging.getLogger(__name__)

FORMAT_NAME = "expertpred.trace"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TMP_SUFFIX = ".tmp"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.parquet$")

# Parquet key-value metadata keys of a shard.
META_FORMAT = b"expertpred.format"
META_MODEL_SHA = b"expertpred.model_sha256"
META_SEQUENCES = b"expertpred.sequences"

NESTED_COLUMNS = ("experts", "weights", "logits", "hidden")
# float32 columns are stored BYTE_STREAM_SPLIT (exponent bytes together): ~10% smaller with
# zstd on router logits; pyarrow, duckdb, polars and HF datasets all read it. Not float16
# ("hidden"): duckdb reads BYTE_STREAM_SPLIT only for FLOAT/DOUBLE/INT32/INT64.
FLOAT_COLUMNS = ("weights", "logits")
SCALAR_COLUMNS = ("seq_id", "prompt_id", "domain", "split", "pos", "token", "phase")
ALL_COLUMNS = SCALAR_COLUMNS + NESTED_COLUMNS
_NUMPY_DTYPES = {
    "seq_id": np.int32, "pos": np.int32, "token": np.int32, "phase": np.int8,
    "experts": np.int16, "weights": np.float32, "logits": np.float32, "hidden": np.float16,
}


class TraceWriteError(ExpertPredError):
    """Writing a trace dataset failed (disk full, permission, wrong directory)."""


# --- manifest records ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """The traced model: identity (sha256) and the routing geometry the columns depend on."""

    path: str
    sha256: str
    arch: str
    n_layer: int
    moe_layers: tuple[int, ...]  # block index of each of the L layers in the nested columns
    n_expert: int
    n_expert_used: int
    n_embd: int

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> ModelInfo:
        """Read the layout and hash the file (raises GGUFError for a dense / bad model)."""
        from ..gguf.layout import file_sha256, read_layout

        lay = read_layout(path)
        return cls(path=str(path), sha256=file_sha256(path), arch=lay.arch,
                   n_layer=lay.n_layer, moe_layers=tuple(lay.moe_layers),
                   n_expert=lay.n_expert, n_expert_used=lay.n_expert_used, n_embd=lay.n_embd)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        return cls(path=str(d["path"]), sha256=str(d["sha256"]), arch=str(d["arch"]),
                   n_layer=int(d["n_layer"]), moe_layers=tuple(int(x) for x in d["moe_layers"]),
                   n_expert=int(d["n_expert"]), n_expert_used=int(d["n_expert_used"]),
                   n_embd=int(d["n_embd"]))


@dataclass(frozen=True)
class PromptSetInfo:
    """The prompt file and the selection of it that this run traces."""

    path: str
    sha256: str
    n_prompts: int  # prompts in the whole file
    split: str | None = None  # selection filters (None = all)
    domain: str | None = None
    limit: int | None = None
    n_selected: int | None = None  # prompts left after the filters


@dataclass(frozen=True)
class DecodingInfo:
    """How tokens after the prompt were produced; everything but n_threads must match on resume."""

    mode: str = "greedy"  # "greedy" or "sampled"
    temperature: float = 0.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 32  # decode tokens per prompt
    n_ctx: int = 512
    n_threads: int = 2

    def comparable(self) -> dict[str, Any]:
        """The fields that change the traced data (thread count does not)."""
        d = asdict(self)
        d.pop("n_threads")
        return d


@dataclass(frozen=True)
class ManifestInfo:
    """Everything the caller knows about a run before the first sequence is traced."""

    model: ModelInfo
    decoding: DecodingInfo = field(default_factory=DecodingInfo)
    prompts: PromptSetInfo | None = None
    capture_hidden: bool = False
    hidden_dim: int | None = None  # D of the hidden column; default model.n_embd

    @property
    def hidden_size(self) -> int | None:
        if not self.capture_hidden:
            return None
        return self.hidden_dim or self.model.n_embd


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard as listed in the manifest."""

    name: str
    rows: int
    seq_ids: tuple[int, ...]
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.rows, "n_sequences": len(self.seq_ids),
                "seq_ids": list(self.seq_ids), "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardInfo:
        return cls(name=str(d["name"]), rows=int(d["rows"]),
                   seq_ids=tuple(int(s) for s in d["seq_ids"]), bytes=int(d["bytes"]),
                   sha256=str(d["sha256"]))


def software_versions() -> dict[str, str | None]:
    """Versions of the packages that produce a trace (None = not installed)."""
    from importlib import metadata

    from .. import __version__

    def ver(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"expertpred": __version__, "llama-cpp-python": ver("llama_cpp_python"),
            "numpy": np.__version__, "pyarrow": pa.__version__,
            "python": platform.python_version()}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- schema --------------------------------------------------------------------------


def _nested(inner: pa.DataType, n_layer: int, width: int) -> pa.DataType:
    return pa.list_(pa.list_(inner, width), n_layer)


def trace_schema(n_moe_layer: int, n_expert_used: int, n_expert: int,
                 hidden_dim: int | None = None) -> pa.Schema:
    """The Arrow schema of a shard (without key-value metadata)."""
    dict_str = pa.dictionary(pa.int32(), pa.string())
    fields = [
        pa.field("seq_id", pa.int32(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("domain", dict_str, nullable=False),
        pa.field("split", dict_str),
        pa.field("pos", pa.int32(), nullable=False),
        pa.field("token", pa.int32(), nullable=False),
        pa.field("phase", pa.int8(), nullable=False),
        pa.field("experts", _nested(pa.int16(), n_moe_layer, n_expert_used), nullable=False),
        pa.field("weights", _nested(pa.float32(), n_moe_layer, n_expert_used), nullable=False),
        pa.field("logits", _nested(pa.float32(), n_moe_layer, n_expert), nullable=False),
    ]
    if hidden_dim:
        fields.append(pa.field("hidden", _nested(pa.float16(), n_moe_layer, hidden_dim),
                               nullable=False))
    return pa.schema(fields)


def _leaf(name: str) -> str:
    """Parquet leaf path of a nested column (what per-column writer options name)."""
    return f"{name}.list.element.list.element"


def _nested_array(arr: np.ndarray, typ: pa.DataType) -> pa.FixedSizeListArray:
    """(N, L, W) numpy -> fixed_size_list<fixed_size_list<., W>, L> without copying."""
    n, n_layer, width = arr.shape
    flat = pa.array(np.ascontiguousarray(arr).reshape(-1), type=typ.value_type.value_type)
    inner = pa.FixedSizeListArray.from_arrays(flat, width)
    return pa.FixedSizeListArray.from_arrays(inner, n_layer)


def _nested_to_numpy(col: pa.Array | pa.ChunkedArray, dtype: np.dtype) -> np.ndarray:
    """fixed_size_list<fixed_size_list<., W>, L> -> (N, L, W) numpy."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n_layer = col.type.list_size
    width = col.type.value_type.list_size
    flat = col.flatten().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=dtype).reshape(len(col), n_layer, width)


def _column_to_numpy(name: str, col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if name in NESTED_COLUMNS:
        return _nested_to_numpy(col, np.dtype(_NUMPY_DTYPES[name]))
    if pa.types.is_dictionary(col.type):
        col = col.cast(pa.string())
    if name in _NUMPY_DTYPES:
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=_NUMPY_DTYPES[name])
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)


# --- low-level file helpers ----------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through (one pass, no re-read)."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        mv = memoryview(b).cast("B")
        n = self._f.write(mv)
        self.sha.update(mv[:n])
        self.nbytes += n
        return n

    def tell(self) -> int:
        return self.nbytes

    def close(self) -> None:  # the caller owns the underlying file
        super().close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via ``path.tmp`` + fsync + os.replace; tmp removed on error."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _manifest_json(m: dict[str, Any]) -> str:
    """Indented JSON, but one compact line per shard (seq_id lists stay readable)."""
    head = json.dumps({k: v for k, v in m.items() if k != "shards"}, indent=1,
                      ensure_ascii=False)
    shards = ",\n".join("  " + json.dumps(s, ensure_ascii=False) for s in m["shards"])
    return head[:-2] + ',\n "shards": [\n' + shards + "\n ]\n}\n"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def _describe_oserror(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "disk full (ENOSPC)"
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    try:
        m = json.loads(path.read_bytes())
    except (UnicodeDecodeError, RecursionError) as exc:
        raise TraceDatasetError(f"{path}: not a JSON text ({type(exc).__name__}); expected an "
                                "expertpred trace manifest") from None
    except json.JSONDecodeError as exc:
        raise TraceDatasetError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                                "expected an expertpred trace manifest") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise TraceDatasetError(f"{path}: not an expertpred trace manifest "
                                f"(format {m.get('format') if isinstance(m, dict) else None!r}, "
                                f"expected {FORMAT_NAME!r})")
    ver = m.get("format_version")
    if ver != FORMAT_VERSION:
        raise TraceDatasetError(f"{path}: format_version {ver!r}, this expertpred reads "
                                f"version {FORMAT_VERSION}")
    check_manifest(path, m)
    return m


# --- writer --------------------------------------------------------------------------


class WriterState(Enum):
    OPEN = "open"
    FAILED = "failed"  # a write failed; finished shards are intact, nothing more is written
    CLOSED = "closed"


class TraceWriter:
    """Stream SequenceTraces into a dataset directory, one finished shard at a time.

    Sequences are buffered until ``shard_rows`` rows (or ``shard_bytes`` bytes) are held,
    then written as one shard; memory is bounded by one shard however long the run. Use as
    a context manager, or call :meth:`close`. With ``resume=True`` an existing dataset of
    the same model and settings is continued: :attr:`done_seq_ids` lists what to skip.
    """

    def __init__(self, out_dir: str | os.PathLike[str], info: ManifestInfo, *,
                 shard_rows: int = 32768, shard_bytes: int = 128 << 20,
                 resume: bool = False, compression: str = "zstd") -> None:
        if shard_rows < 1:
            raise ValueError(f"shard_rows={shard_rows}, expected >= 1")
        self.out_dir = Path(out_dir)
        self.info = info
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes
        self.resume = resume
        self.compression = compression

        m = info.model
        self._n_layer = len(m.moe_layers)
        self._schema = trace_schema(self._n_layer, m.n_expert_used, m.n_expert,
                                    info.hidden_size)
        self._buffer: list[tuple[SequenceTrace, str | None]] = []
        self._buffer_rows = 0
        self._buffer_bytes = 0
        self._shards: list[ShardInfo] = []
        self._done: set[int] = set()
        self._pending: set[int] = set()
        self._lock_fd: int | None = None
        self.rows_written = 0  # by this writer (not counting resumed shards)
        self.bytes_written = 0
        self.shards_written = 0
        self.state = WriterState.OPEN
        self._open()

    # -- setup ----------------------------------------------------------------------
    def _fail(self, msg: str) -> TraceWriteError:
        self.state = WriterState.FAILED
        return TraceWriteError(msg)

    def _open(self) -> None:
        d = self.out_dir
        if d.exists() and not d.is_dir():
            raise TraceWriteError(f"{d}: exists and is not a directory; expected a dataset "
                                  "directory")
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TraceWriteError(f"{d}: cannot create directory ({_describe_oserror(exc)})")
        self._take_lock()
        try:
            if (d / MANIFEST_NAME).exists():
                self._open_existing()
            else:
                others = [p.name for p in d.iterdir() if not p.name.endswith(TMP_SUFFIX)]
                if others:
                    raise TraceWriteError(
                        f"{d}: directory is not empty and holds no trace dataset (found "
                        f"{sorted(others)[0]!r}, no {MANIFEST_NAME}); expected a new or empty "
                        "directory")
                self._remove_tmp()
                self._manifest = self._new_manifest()
                self._write_manifest()
        except BaseException:
            self._release_lock()
            raise

    def _take_lock(self) -> None:
        """flock the directory itself: nothing left behind, released when the process dies."""
        fd = os.open(self.out_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TraceWriteError(f"{self.out_dir}: another trace run is writing here (directory "
                                  "locked); expected one run per directory") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _new_manifest(self) -> dict[str, Any]:
        info = self.info
        now = _now()
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": now,
            "updated": now,
            "complete": False,
            "model": {**asdict(info.model), "moe_layers": list(info.model.moe_layers)},
            "prompts": asdict(info.prompts) if info.prompts else None,
            "decoding": asdict(info.decoding),
            "capture_hidden": info.capture_hidden,
            "columns": {
                "n_moe_layer": self._n_layer,
                "n_expert_used": info.model.n_expert_used,
                "n_expert": info.model.n_expert,
                "hidden_dim": info.hidden_size,
                "names": [f.name for f in self._schema],
            },
            "software": software_versions(),
            "runs": [self._run_record(resumed=False)],
            "shards": [],
            "totals": {"rows": 0, "sequences": 0, "bytes": 0},
        }

    def _run_record(self, resumed: bool) -> dict[str, Any]:
        p = self.info.prompts
        return {"started": _now(), "resumed": resumed, "n_threads": self.info.decoding.n_threads,
                "selection": ({"split": p.split, "domain": p.domain, "limit": p.limit}
                              if p else None),
                "software": software_versions()}

    def _open_existing(self) -> None:
        d = self.out_dir
        try:
            m = _read_manifest(d)
        except TraceDatasetError as exc:
            raise TraceWriteError(str(exc)) from None
        others = [p.name for p in d.iterdir()
                  if p.name != MANIFEST_NAME and not p.name.endswith(TMP_SUFFIX)]
        if not m["shards"] and not m["complete"] and not others:
            # a run that failed before its first shard (llama.cpp refused the model, Ctrl-C
            # while loading): nothing to keep, and it must not block a corrected rerun
            log.info("%s: replacing an empty, unfinished dataset", d)
            self._remove_tmp()
            self._manifest = self._new_manifest()
            self._write_manifest()
            return
        old_sha = m["model"]["sha256"]
        new = self.info.model
        if old_sha != new.sha256:
            raise TraceWriteError(
                f"{d}: holds a trace dataset of another model ({m['model']['path']}, sha256 "
                f"{old_sha[:12]}…), not {new.path} (sha256 {new.sha256[:12]}…); expected a "
                "new directory")
        if not self.resume:
            raise TraceWriteError(
                f"{d}: already holds a trace dataset of this model ({len(m['shards'])} "
                "shards); pass --resume to continue it, or choose a new directory")
        self._check_same_settings(m)
        self._manifest = m
        self._shards = [ShardInfo.from_dict(s) for s in m["shards"]]
        for s in self._shards:
            if not (d / s.name).is_file():
                raise TraceWriteError(f"{d / s.name}: listed in {MANIFEST_NAME} but missing; "
                                      "the dataset is damaged, expected every listed shard")
            self._done.update(s.seq_ids)
        self._remove_tmp()
        self._adopt_orphans()
        m["complete"] = False
        m["software"] = software_versions()
        m.setdefault("runs", []).append(self._run_record(resumed=True))
        if self.info.prompts:  # the latest selection; earlier ones stay in "runs"
            m["prompts"] = asdict(self.info.prompts)
        m["decoding"] = asdict(self.info.decoding)
        self._write_manifest()
        log.info("%s: resuming, %d shards, %d sequences done", d, len(self._shards),
                 len(self._done))

    def _check_same_settings(self, m: dict[str, Any]) -> None:
        d = self.out_dir
        info = self.info
        if bool(m["capture_hidden"]) != info.capture_hidden:
            raise TraceWriteError(
                f"{d}: dataset was traced with capture_hidden={m['capture_hidden']}, this run "
                f"has {info.capture_hidden}; expected the same --hidden setting to resume")
        old = DecodingInfo(**m["decoding"]).comparable()
        new = info.decoding.comparable()
        diff = [k for k in new if old.get(k) != new[k]]
        if diff:
            k = diff[0]
            raise TraceWriteError(f"{d}: dataset was traced with {k}={old.get(k)!r}, this run "
                                  f"has {k}={new[k]!r}; expected the same decoding to resume")
        oldp = m.get("prompts")
        if oldp and info.prompts and oldp["sha256"] != info.prompts.sha256:
            raise TraceWriteError(
                f"{d}: dataset was traced from prompts {oldp['path']} (sha256 "
                f"{oldp['sha256'][:12]}…), not {info.prompts.path}; expected the same prompt "
                "file to resume (seq_ids index it)")

    def _remove_tmp(self) -> None:
        for p in self.out_dir.iterdir():
            if p.name.endswith(TMP_SUFFIX):
                log.info("removing stale %s", p)
                p.unlink(missing_ok=True)

    def _adopt_orphans(self) -> None:
        """Finished shards renamed into place before a kill hit the manifest update."""
        listed = {s.name for s in self._shards}
        for p in sorted(self.out_dir.iterdir()):
            if not SHARD_RE.match(p.name) or p.name in listed:
                continue
            try:
                pf = pq.ParquetFile(p)
                meta = pf.schema_arrow.metadata or {}
                seq = pf.read(columns=["seq_id"]).column("seq_id").to_numpy()
            except Exception as exc:  # unreadable: it cannot be a finished shard
                log.warning("%s: unreadable orphan shard removed (%s)", p, exc)
                p.unlink()
                continue
            ids = tuple(int(s) for s in np.unique(seq))
            if (meta.get(META_MODEL_SHA, b"").decode() != self.info.model.sha256
                    or self._done.intersection(ids)
                    or not pf.schema_arrow.remove_metadata().equals(self._schema)):
                log.warning("%s: orphan shard does not belong to this run; removed", p)
                p.unlink()
                continue
            info = ShardInfo(p.name, int(pf.metadata.num_rows), ids, p.stat().st_size,
                             _sha256_file(p))
            log.info("%s: adopting finished shard not yet in the manifest", p)
            self._shards.append(info)
            self._done.update(ids)
        self._shards.sort(key=lambda s: s.name)

    # -- public API -----------------------------------------------------------------
    @property
    def done_seq_ids(self) -> frozenset[int]:
        """seq_ids already in finished shards (resume skips them)."""
        return frozenset(self._done)

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        return tuple(self._shards)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # Interrupted (Ctrl-C, a tracer error): the buffered sequences are whole, keep them
        # in a finished shard; the manifest stays "complete": false.
        try:
            if self.state is WriterState.OPEN:
                self.close(complete=False)
        except ExpertPredError as err:
            log.warning("%s", err)
        finally:
            self._release_lock()

    def _check_state(self) -> None:
        if self.state is not WriterState.OPEN:
            raise RuntimeError(f"TraceWriter({self.out_dir}) is {self.state.value}; "
                               "expected open")

    def _check_sequence(self, seq: SequenceTrace) -> None:
        m = self.info.model
        t = seq.n_tokens
        want = {"experts": (t, self._n_layer, m.n_expert_used),
                "weights": (t, self._n_layer, m.n_expert_used),
                "logits": (t, self._n_layer, m.n_expert)}
        if self.info.capture_hidden:
            want["hidden"] = (t, self._n_layer, self.info.hidden_size)
        for name, shape in want.items():
            arr = getattr(seq, name)
            if arr is None or tuple(arr.shape) != shape:
                got = None if arr is None else tuple(arr.shape)
                raise ValueError(f"sequence {seq.seq_id}: {name} shape {got}, expected {shape}")
        if t == 0:
            raise ValueError(f"sequence {seq.seq_id}: no tokens")
        if not 0 <= seq.seq_id < 2**31:
            raise ValueError(f"sequence {seq.seq_id}: seq_id out of int32 range")

    def write(self, seq: SequenceTrace, split: str | None = None) -> bool:
        """Buffer one sequence (written with its shard). False if it was already written."""
        self._check_state()
        if seq.seq_id in self._done:
            log.debug("seq %d already in a finished shard; skipped", seq.seq_id)
            return False
        if seq.seq_id in self._pending:
            raise ValueError(f"sequence {seq.seq_id} written twice in one run")
        self._check_sequence(seq)
        nbytes = sum(getattr(seq, n).nbytes for n in ("tokens", "experts", "weights", "logits"))
        if self.info.capture_hidden:
            nbytes += seq.hidden.nbytes  # type: ignore[union-attr]
        if self._buffer and (self._buffer_rows + seq.n_tokens > self.shard_rows
                             or self._buffer_bytes + nbytes > self.shard_bytes):
            self.flush()
        self._buffer.append((seq, split))
        self._pending.add(seq.seq_id)
        self._buffer_rows += seq.n_tokens
        self._buffer_bytes += nbytes
        if self._buffer_rows >= self.shard_rows or self._buffer_bytes >= self.shard_bytes:
            self.flush()
        return True

    def flush(self) -> ShardInfo | None:
        """Write the buffered sequences as one finished shard (no-op when empty)."""
        self._check_state()
        if not self._buffer:
            return None
        table = self._build_table()
        shard = self._write_shard(table)
        del table
        ids = shard.seq_ids
        self._buffer.clear()
        self._pending.clear()
        self._buffer_rows = self._buffer_bytes = 0
        self._shards.append(shard)
        self._done.update(ids)
        self.rows_written += shard.rows
        self.bytes_written += shard.bytes
        self.shards_written += 1
        self._write_manifest()
        return shard

    def close(self, complete: bool = True) -> None:
        """Flush, mark the manifest complete (unless told otherwise), release the directory."""
        if self.state is WriterState.CLOSED:
            return
        try:
            if self.state is WriterState.OPEN:
                self.flush()
                self._manifest["complete"] = complete
                self._write_manifest()
                self.state = WriterState.CLOSED
        finally:
            self._release_lock()

    # -- writing ----------------------------------------------------------------------
    def _build_table(self) -> pa.Table:
        seqs = [s for s, _ in self._buffer]
        n = [s.n_tokens for s in seqs]
        total = sum(n)

        def rep(values: Sequence[Any]) -> np.ndarray:
            return np.repeat(np.asarray(values, dtype=object), n)

        cols: dict[str, pa.Array] = {
            "seq_id": pa.array(np.repeat(np.array([s.seq_id for s in seqs], np.int32), n)),
            "prompt_id": pa.array(rep([s.prompt_id for s in seqs]), type=pa.string()),
            "domain": pa.array(rep([s.domain for s in seqs]),
                               type=pa.string()).dictionary_encode(),
            "split": pa.array(rep([sp for _, sp in self._buffer]),
                              type=pa.string()).dictionary_encode(),
            "pos": pa.array(np.concatenate([np.arange(k, dtype=np.int32) for k in n])),
            "token": pa.array(np.concatenate([s.tokens for s in seqs]).astype(np.int32)),
            "phase": pa.array(np.concatenate([s.phase for s in seqs]).astype(np.int8)),
        }
        for name in NESTED_COLUMNS:
            if name == "hidden" and not self.info.capture_hidden:
                continue
            typ = self._schema.field(name).type
            arr = np.concatenate([getattr(s, name) for s in seqs]).astype(
                _NUMPY_DTYPES[name], copy=False)
            cols[name] = _nested_array(arr, typ)
        seq_meta = [{"seq_id": s.seq_id, "prompt_id": s.prompt_id, "domain": s.domain,
                     "split": sp, "n_tokens": s.n_tokens,
                     "n_prompt": int((s.phase == 0).sum()), "text": s.text}
                    for s, sp in self._buffer]
        meta = {META_FORMAT: f"{FORMAT_NAME}/{FORMAT_VERSION}".encode(),
                META_MODEL_SHA: self.info.model.sha256.encode(),
                META_SEQUENCES: json.dumps(seq_meta, ensure_ascii=False).encode()}
        table = pa.Table.from_arrays([cols[f.name] for f in self._schema],
                                     schema=self._schema.with_metadata(meta))
        assert table.num_rows == total
        return table

    def _next_name(self) -> str:
        used = [int(m[1]) for p in self.out_dir.iterdir() if (m := SHARD_RE.match(p.name))]
        used += [int(SHARD_RE.match(s.name)[1]) for s in self._shards]  # type: ignore[index]
        return f"shard-{(max(used) + 1 if used else 0):05d}.parquet"

    def _row_group_rows(self, table: pa.Table) -> int:
        per_row = max(1, table.nbytes // max(1, table.num_rows))
        return max(1024, min(table.num_rows, (32 << 20) // per_row))

    def _write_shard(self, table: pa.Table) -> ShardInfo:
        name = self._next_name()
        final = self.out_dir / name
        tmp = self.out_dir / (name + TMP_SUFFIX)
        try:
            with open(tmp, "wb") as f:
                hw = _HashingWriter(f)
                pq.write_table(table, hw, compression=self.compression,
                               row_group_size=self._row_group_rows(table),
                               use_dictionary=["prompt_id", "domain", "split"],
                               use_byte_stream_split=[_leaf(n) for n in FLOAT_COLUMNS
                                                      if n in table.column_names])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.out_dir)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._fail(
                f"{self.out_dir}: {_describe_oserror(exc)} while writing {name}; it was removed, "
                f"{len(self._shards)} finished shards are kept (rerun with --resume once there "
                "is room)") from None
        seq_ids = tuple(int(s) for s in dict.fromkeys(s.seq_id for s, _ in self._buffer))
        log.debug("%s: %d rows, %d bytes", final, table.num_rows, hw.nbytes)
        return ShardInfo(name, table.num_rows, seq_ids, hw.nbytes, hw.sha.hexdigest())

    def _write_manifest(self) -> None:
        m = self._manifest
        m["updated"] = _now()
        m["shards"] = [s.to_dict() for s in self._shards]
        m["totals"] = {"rows": sum(s.rows for s in self._shards),
                       "sequences": sum(len(s.seq_ids) for s in self._shards),
                       "bytes": sum(s.bytes for s in self._shards)}
        data = _manifest_json(m).encode()
        try:
            _atomic_write_bytes(self.out_dir / MANIFEST_NAME, data)
        except OSError as exc:
            raise self._fail(
                f"{self.out_dir}: {_describe_oserror(exc)} while writing {MANIFEST_NAME}; the "
                "previous manifest is intact (rerun with --resume once there is room)") from None


# --- reader --------------------------------------------------------------------------


class TraceDataset:
    """Read a trace dataset directory: manifest, shard files, numpy / Arrow / SequenceTrace.

    Opening checks the manifest, that every listed shard exists with the listed size, and
    that every shard was written for the manifest's model (``verify()`` also checks sha256).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        d = self.path
        if not d.exists():
            raise TraceDatasetError(f"{d}: no such directory; expected a trace dataset")
        if not d.is_dir():
            raise TraceDatasetError(f"{d}: not a directory; expected a trace dataset directory")
        if not (d / MANIFEST_NAME).is_file():
            raise TraceDatasetError(f"{d}: not a trace dataset (no {MANIFEST_NAME})")
        self.manifest = _read_manifest(d)
        self.model = ModelInfo.from_dict(self.manifest["model"])
        self.shards = tuple(ShardInfo.from_dict(s) for s in self.manifest["shards"])
        cols = self.manifest["columns"]
        self.n_moe_layer = int(cols["n_moe_layer"])
        self.n_expert = int(cols["n_expert"])
        self.n_expert_used = int(cols["n_expert_used"])
        self.hidden_dim: int | None = cols.get("hidden_dim")
        self._schema = trace_schema(self.n_moe_layer, self.n_expert_used, self.n_expert,
                                    self.hidden_dim)
        for s in self.shards:
            self._check_shard(s)
        self._check_model_file()

    def _check_model_file(self) -> None:
        """If the manifest's model.path names a file here, it must be the traced model's
        shape and arch (a manifest edited to name another model would size caches from the
        wrong layout). Hashing it is left to the commands that use the file."""
        from ..gguf.layout import read_layout

        p = Path(self.model.path)
        if not p.is_file():
            return  # datasets move between machines: the path is a record, not a promise
        lay = read_layout(p)
        m = self.model
        got = (lay.arch, lay.n_layer, tuple(lay.moe_layers), lay.n_expert, lay.n_expert_used,
               lay.n_embd)
        want = (m.arch, m.n_layer, tuple(m.moe_layers), m.n_expert, m.n_expert_used, m.n_embd)
        if got != want:
            keys = ("arch", "n_layer", "moe_layers", "n_expert", "n_expert_used", "n_embd")
            diff = ", ".join(f"{k} {a} vs {b}" for k, a, b in zip(keys, want, got) if a != b)
            raise TraceDatasetError(f"{self.path / MANIFEST_NAME}: model.path {p} is another "
                                    f"model (manifest vs file: {diff})")

    def _open_shard(self, s: ShardInfo) -> pq.ParquetFile:
        """The shard's bytes, read once: sha256 and size checked against the manifest, its
        seq_id column against the listed sequences."""
        p = self.path / s.name
        data = ShardBytes.read(p, s.bytes, s.sha256)
        try:
            pf = pq.ParquetFile(pa.BufferReader(data))
            seq_id = pf.read(columns=["seq_id"]).column(0).to_numpy()
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            raise TraceDatasetError(f"{p}: not a readable Parquet shard "
                                    f"({type(exc).__name__}: {exc})"[:300]) from None
        check_shard_rows(p, seq_id, s.seq_ids, s.rows)
        return pf

    def _read(self, s: ShardInfo, columns: Sequence[str] | None,
              pf: pq.ParquetFile | None = None) -> pa.Table:
        try:
            return (pf or self._open_shard(s)).read(columns=columns)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise TraceDatasetError(f"{self.path / s.name}: not a readable Parquet shard "
                                    f"({type(exc).__name__}: {exc})"[:300]) from None

    def _check_shard(self, s: ShardInfo) -> None:
        p = self.path / s.name
        if not p.is_file():
            raise TraceDatasetError(f"{p}: listed in {MANIFEST_NAME} but missing; expected every "
                                    "listed shard")
        size = p.stat().st_size
        if size != s.bytes:
            raise TraceDatasetError(f"{p}: {size} bytes, {MANIFEST_NAME} lists {s.bytes}")
        try:
            schema = pq.read_schema(p)
        except Exception as exc:
            raise TraceDatasetError(f"{p}: not a readable Parquet file ({exc})") from None
        sha = (schema.metadata or {}).get(META_MODEL_SHA, b"").decode()
        if sha != self.model.sha256:
            raise TraceDatasetError(
                f"{p}: written for model sha256 {sha[:12] or '?'}…, {MANIFEST_NAME} names "
                f"{self.model.sha256[:12]}… (mixed models in one dataset)")
        if not schema.remove_metadata().equals(self._schema):
            raise TraceDatasetError(f"{p}: schema differs from the one {MANIFEST_NAME} describes")

    # -- facts ------------------------------------------------------------------------
    @property
    def files(self) -> list[Path]:
        return [self.path / s.name for s in self.shards]

    @property
    def n_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def n_sequences(self) -> int:
        return sum(len(s.seq_ids) for s in self.shards)

    @property
    def n_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def seq_ids(self) -> np.ndarray:
        ids = [i for s in self.shards for i in s.seq_ids]
        return np.asarray(sorted(ids), dtype=np.int32)

    @property
    def has_hidden(self) -> bool:
        return bool(self.hidden_dim)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return (f"TraceDataset({str(self.path)!r}, model={self.model.arch}, "
                f"sequences={self.n_sequences}, rows={self.n_rows}, shards={len(self.shards)})")

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads all bytes)."""
        for s in self.shards:
            got = _sha256_file(self.path / s.name)
            if got != s.sha256:
                raise TraceDatasetError(f"{self.path / s.name}: sha256 {got[:12]}…, "
                                        f"{MANIFEST_NAME} lists {s.sha256[:12]}… (corrupt shard)")

    def sequence_info(self) -> list[dict[str, Any]]:
        """Per-sequence facts (seq_id, prompt_id, domain, split, n_tokens, n_prompt, text)."""
        out: list[dict[str, Any]] = []
        for s in self.shards:
            out.extend(self._sequence_records(s, self._open_shard(s)))
        return out

    def _sequence_records(self, s: ShardInfo, pf: pq.ParquetFile) -> list[dict[str, Any]]:
        meta = pf.schema_arrow.metadata or {}
        try:
            recs = json.loads(meta.get(META_SEQUENCES, b"[]"))
        except (ValueError, RecursionError):
            recs = None
        if not isinstance(recs, list) or not all(
                isinstance(r, dict) and isinstance(r.get("seq_id"), int) for r in recs):
            raise TraceDatasetError(f"{self.path / s.name}: sequence records in its metadata "
                                    "are not a JSON list of objects with a seq_id")
        return recs

    # -- bulk reads -------------------------------------------------------------------
    def _columns(self, columns: Sequence[str] | None) -> list[str]:
        names = [f.name for f in self._schema]
        if columns is None:
            return names
        bad = [c for c in columns if c not in names]
        if bad:
            raise TraceDatasetError(f"{self.path}: no column {bad[0]!r}; expected one of "
                                    f"{', '.join(names)}")
        return list(columns)

    def iter_batches(self, columns: Sequence[str] | None = None,
                     batch_rows: int = 16384) -> Iterator[pa.RecordBatch]:
        """Record batches of at most ``batch_rows`` rows, shard by shard (bounded memory)."""
        cols = self._columns(columns)
        for s in self.shards:
            pf = self._open_shard(s)
            try:
                yield from pf.iter_batches(batch_size=batch_rows, columns=cols)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise TraceDatasetError(f"{self.path / s.name}: not a readable Parquet shard "
                                        f"({type(exc).__name__}: {exc})"[:300]) from None

    def _mask(self, batch: pa.RecordBatch, split: str | None, domain: str | None,
              seq_ids: set[int] | None) -> np.ndarray | None:
        mask: np.ndarray | None = None
        for name, want in (("split", split), ("domain", domain)):
            if want is None:
                continue
            m = _column_to_numpy(name, batch.column(name)) == want
            mask = m if mask is None else mask & m
        if seq_ids is not None:
            ids = np.fromiter(seq_ids, dtype=np.int32, count=len(seq_ids))
            m = np.isin(batch.column("seq_id").to_numpy(), ids)
            mask = m if mask is None else mask & m
        return mask

    def to_numpy(self, columns: Sequence[str] | None = None, *, split: str | None = None,
                 domain: str | None = None, seq_ids: Sequence[int] | None = None,
                 batch_rows: int = 16384) -> dict[str, np.ndarray]:
        """Columns as numpy arrays (nested ones shaped (N, L, k|E|D)), optionally filtered.

        Memory: the result plus one batch — the output is preallocated and filled batch by
        batch, so nothing is held twice.
        """
        cols = self._columns(columns)
        ids = set(int(i) for i in seq_ids) if seq_ids is not None else None
        filt = [c for c, v in (("split", split), ("domain", domain), ("seq_id", ids))
                if v is not None]
        # Pass 1: count rows that pass the filters (reads only the small filter columns).
        if filt:
            total = 0
            for b in self.iter_batches(filt, batch_rows):
                mask = self._mask(b, split, domain, ids)
                total += int(mask.sum()) if mask is not None else b.num_rows
        else:
            total = self.n_rows
        out: dict[str, np.ndarray] = {}
        for c in cols:
            shape: tuple[int, ...] = (total,)
            if c in NESTED_COLUMNS:
                t = self._schema.field(c).type
                shape = (total, t.list_size, t.value_type.list_size)
            out[c] = np.empty(shape, dtype=_NUMPY_DTYPES.get(c, object))
        # Pass 2: fill.
        at = 0
        read = list(dict.fromkeys(cols + filt))
        for b in self.iter_batches(read, batch_rows):
            mask = self._mask(b, split, domain, ids)
            n = int(mask.sum()) if mask is not None else b.num_rows
            if n == 0:
                continue
            for c in cols:
                arr = _column_to_numpy(c, b.column(c))
                out[c][at:at + n] = arr[mask] if mask is not None else arr
            at += n
        assert at == total
        return out

    def table(self, columns: Sequence[str] | None = None,
              max_bytes: int = 4 << 30) -> pa.Table:
        """The whole dataset as one Arrow table — for small sets (refuses above max_bytes)."""
        cols = self._columns(columns)
        est = self.n_rows * sum(_row_bytes(self._schema.field(c).type) for c in cols)
        if est > max_bytes:
            raise TraceDatasetError(
                f"{self.path}: ~{est / 2**30:.1f} GiB in memory, above max_bytes="
                f"{max_bytes / 2**30:.1f} GiB; use iter_batches() or to_numpy(columns=...)")
        if not self.shards:
            return self._schema.empty_table().select(cols)
        tables = [self._read(s, cols).replace_schema_metadata(None) for s in self.shards]
        return pa.concat_tables(tables, promote_options="permissive")

    def sequences(self, *, split: str | None = None, domain: str | None = None,
                  seq_ids: Sequence[int] | None = None) -> Iterator[SequenceTrace]:
        """Yield SequenceTraces in (shard, seq_id) order; one shard in memory at a time."""
        want = set(int(i) for i in seq_ids) if seq_ids is not None else None
        for s in self.shards:
            if want is not None and not want.intersection(s.seq_ids):
                continue
            pf = self._open_shard(s)
            info = {r["seq_id"]: r for r in self._sequence_records(s, pf)}
            t = self._read(s, None, pf)
            sid = t.column("seq_id").to_numpy()
            bounds = np.flatnonzero(np.diff(sid)) + 1
            starts = np.concatenate([[0], bounds])
            ends = np.concatenate([bounds, [len(sid)]])
            for a, b in zip(starts.tolist(), ends.tolist()):
                seq_id = int(sid[a])
                if want is not None and seq_id not in want:
                    continue
                r = info.get(seq_id, {})
                if split is not None and r.get("split") != split:
                    continue
                part = t.slice(a, b - a)
                dom = str(part.column("domain")[0].as_py())
                if domain is not None and dom != domain:
                    continue
                yield SequenceTrace(
                    seq_id=seq_id,
                    prompt_id=str(part.column("prompt_id")[0].as_py()),
                    domain=dom,
                    tokens=_column_to_numpy("token", part.column("token")),
                    phase=_column_to_numpy("phase", part.column("phase")),
                    experts=_column_to_numpy("experts", part.column("experts")),
                    weights=_column_to_numpy("weights", part.column("weights")),
                    logits=_column_to_numpy("logits", part.column("logits")),
                    hidden=(_column_to_numpy("hidden", part.column("hidden"))
                            if self.has_hidden else None),
                    text=str(r.get("text", "")),
                )
            del t


def _row_bytes(t: pa.DataType) -> int:
    if pa.types.is_fixed_size_list(t):
        return t.list_size * _row_bytes(t.value_type)
    if pa.types.is_dictionary(t):
        return 4
    if pa.types.is_string(t):
        return 24
    return max(1, t.bit_width // 8)
