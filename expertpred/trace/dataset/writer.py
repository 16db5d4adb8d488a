"""The crash-safe streaming writer of a trace dataset.

Crash safety: a shard is written to ``shard-NNNNN.parquet.tmp``, fsynced, renamed, the
directory fsynced, and only then is the manifest rewritten (tmp + fsync + ``os.replace``).
A SIGKILL at any point leaves every finished shard intact and the manifest naming a subset
of them; ``resume=True`` removes ``*.tmp`` files, adopts a finished shard the manifest did
not yet name, and skips the sequences already written.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...errors import ExpertPredError
from ...gguf.layout import file_sha256
from ..record import SequenceTrace
from ..validate import TraceDatasetError
from .manifest import (
    LEGACY_MANIFEST_NAME,
    MANIFEST_NAME,
    TMP_SUFFIX,
    DecodingInfo,
    ManifestInfo,
    ShardInfo,
    atomic_file,
    find_manifest,
    now_utc,
    read_manifest,
    software_versions,
    write_manifest,
)
from .schema import (
    FLOAT_COLUMNS,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FORMAT,
    META_MODEL_SHA,
    META_SEQUENCES,
    NESTED_COLUMNS,
    NUMPY_DTYPES,
    SHARD_RE,
    TraceWriteError,
    leaf_path,
    nested_array,
    trace_schema,
)

log = logging.getLogger(__name__)


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


def _describe_oserror(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "disk full (ENOSPC)"
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc}" + (f" ({name})" if name else "")


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
            if find_manifest(d):
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
        now = now_utc()
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
        return {"started": now_utc(), "resumed": resumed, "n_threads": self.info.decoding.n_threads,
                "selection": ({"split": p.split, "domain": p.domain, "limit": p.limit}
                              if p else None),
                "software": software_versions()}

    def _open_existing(self) -> None:
        d = self.out_dir
        try:
            m = read_manifest(d)
        except TraceDatasetError as exc:
            raise TraceWriteError(str(exc)) from None
        others = [p.name for p in d.iterdir()
                  if p.name not in (MANIFEST_NAME, LEGACY_MANIFEST_NAME)
                  and not p.name.endswith(TMP_SUFFIX)]
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
                             file_sha256(p))
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

    def add_shard(self, shard: ShardInfo) -> None:
        """List a finished shard another process wrote into this directory (parallel tracing:
        this writer is the one merger of the manifest). The shard must be on disk with its
        listed size and hold no sequence the dataset already has."""
        self._check_state()
        path = self.out_dir / shard.name
        if not SHARD_RE.match(shard.name) or not path.is_file():
            raise self._fail(f"{path}: reported as a finished shard but not on disk")
        dup = self._done.intersection(shard.seq_ids)
        if dup:
            raise self._fail(f"{path}: seq_id {min(dup)} is already in the dataset; expected "
                             "disjoint prompt chunks per worker")
        self._shards.append(shard)
        # name order = worker then shard number: with contiguous prompt chunks per worker
        # that is seq_id order, as a serial run writes it
        self._shards.sort(key=lambda s: s.name)
        self._done.update(shard.seq_ids)
        self._write_manifest()

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
                NUMPY_DTYPES[name], copy=False)
            cols[name] = nested_array(arr, typ)
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

    # file names of this writer's shards start so; parallel tracing workers use their own
    # prefix (shard-wNN-), so two writers never pick the same name
    shard_prefix = "shard-"

    def _next_name(self) -> str:
        own = re.compile(re.escape(self.shard_prefix) + r"(\d{5,})\.parquet$")
        names = [p.name for p in self.out_dir.iterdir()] + [s.name for s in self._shards]
        used = [int(m[1]) for n in names if (m := own.match(n))]
        return f"{self.shard_prefix}{(max(used) + 1 if used else 0):05d}.parquet"

    def _row_group_rows(self, table: pa.Table) -> int:
        per_row = max(1, table.nbytes // max(1, table.num_rows))
        return max(1024, min(table.num_rows, (32 << 20) // per_row))

    def _write_shard(self, table: pa.Table) -> ShardInfo:
        name = self._next_name()
        try:
            with atomic_file(self.out_dir / name) as f:
                hw = _HashingWriter(f)
                pq.write_table(table, hw, compression=self.compression,
                               row_group_size=self._row_group_rows(table),
                               use_dictionary=["prompt_id", "domain", "split"],
                               use_byte_stream_split=[leaf_path(n) for n in FLOAT_COLUMNS
                                                      if n in table.column_names],
                               # CRC32 per page: the reader rejects a damaged page before
                               # Arrow's decoders see it
                               write_page_checksum=True)
        except OSError as exc:
            raise self._fail(
                f"{self.out_dir}: {_describe_oserror(exc)} while writing {name}; it was removed, "
                f"{len(self._shards)} finished shards are kept (rerun with --resume once there "
                "is room)") from None
        seq_ids = tuple(int(s) for s in dict.fromkeys(s.seq_id for s, _ in self._buffer))
        log.debug("%s: %d rows, %d bytes", self.out_dir / name, table.num_rows, hw.nbytes)
        return ShardInfo(name, table.num_rows, seq_ids, hw.nbytes, hw.sha.hexdigest())

    def _write_manifest(self) -> None:
        m = self._manifest
        m["updated"] = now_utc()
        m["shards"] = [s.to_dict() for s in self._shards]
        m["totals"] = {"rows": sum(s.rows for s in self._shards),
                       "sequences": sum(len(s.seq_ids) for s in self._shards),
                       "bytes": sum(s.bytes for s in self._shards)}
        try:
            write_manifest(self.out_dir, m)
        except OSError as exc:
            raise self._fail(
                f"{self.out_dir}: {_describe_oserror(exc)} while writing {MANIFEST_NAME}; the "
                "previous manifest is intact (rerun with --resume once there is room)") from None

