"""Reading a trace dataset: manifest, shard files, numpy / Arrow / SequenceTrace."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ...gguf.layout import file_sha256
from ..record import SequenceTrace
from ..validate import ShardBytes, TraceDatasetError, check_shard_rows, one_line
from .manifest import (
    MANIFEST_NAME,
    ModelInfo,
    ShardInfo,
    find_manifest,
    read_manifest,
)
from .schema import (
    META_MODEL_SHA,
    META_SEQUENCES,
    NESTED_COLUMNS,
    NUMPY_DTYPES,
    column_to_numpy,
    row_bytes,
    trace_schema,
)

log = logging.getLogger(__name__)


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
        manifest_path = find_manifest(d)
        if manifest_path is None:
            raise TraceDatasetError(f"{d}: not a trace dataset (no {MANIFEST_NAME})")
        self.manifest_path = manifest_path  # the legacy name in datasets written before 0.2
        self.manifest = read_manifest(d)
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
        from ...gguf.layout import read_layout

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
            raise TraceDatasetError(f"{self.manifest_path}: model.path {p} is another "
                                    f"model (manifest vs file: {diff})")

    def _open_shard(self, s: ShardInfo) -> tuple[pq.ParquetFile, ShardBytes]:
        """The shard's bytes, read once (their sha256 is computed alongside: call
        ``check()`` on the second value before returning anything decoded), its seq_id
        column checked against the listed sequences."""
        p = self.path / s.name
        data = ShardBytes(p, s.bytes, s.sha256)
        try:
            # single-threaded decode, page CRCs verified where the writer stored them: bytes
            # with a valid sha256 can still be hostile (a re-signed manifest)
            pf = pq.ParquetFile(pa.BufferReader(pa.py_buffer(data.data)), pre_buffer=False,
                                page_checksum_verification=True)
            seq_id = pf.read(columns=["seq_id"], use_threads=False).column(0).to_numpy()
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            raise _unreadable(p, data, exc) from None
        check_shard_rows(p, seq_id, s.seq_ids, s.rows)
        return pf, data

    def _read(self, s: ShardInfo,
              columns: Sequence[str] | None) -> tuple[pa.Table, pq.ParquetFile]:
        """A whole shard (these columns), sha256-checked before it is returned."""
        pf, data = self._open_shard(s)
        try:
            table = pf.read(columns=columns, use_threads=False)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise _unreadable(self.path / s.name, data, exc) from None
        data.check()
        return table, pf

    def _check_experts(self, experts: np.ndarray) -> None:
        """Expert ids index tables downstream: an id outside 0..n_expert-1 is damage."""
        if experts.size and (int(experts.min()) < 0 or int(experts.max()) >= self.n_expert):
            raise TraceDatasetError(f"{self.path}: expert ids {int(experts.min())}.."
                                    f"{int(experts.max())} in the experts column, expected "
                                    f"0..{self.n_expert - 1}")

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
            raise TraceDatasetError(f"{p}: not a readable Parquet file ({one_line(exc)})") from None
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
            got = file_sha256(self.path / s.name)
            if got != s.sha256:
                raise TraceDatasetError(f"{self.path / s.name}: sha256 {got[:12]}…, "
                                        f"{MANIFEST_NAME} lists {s.sha256[:12]}… (corrupt shard)")

    def sequence_info(self) -> list[dict[str, Any]]:
        """Per-sequence facts (seq_id, prompt_id, domain, split, n_tokens, n_prompt, text)."""
        out: list[dict[str, Any]] = []
        for s in self.shards:
            pf, data = self._open_shard(s)
            data.check()
            out.extend(self._sequence_records(s, pf))
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
            pf, data = self._open_shard(s)
            try:
                yield from pf.iter_batches(batch_size=batch_rows, columns=cols,
                                           use_threads=False)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise _unreadable(self.path / s.name, data, exc) from None
            # streaming keeps memory at one batch, so a damaged shard is reported at its
            # end: to_numpy() and the other bulk reads then return nothing
            data.check()

    def iter_shards(self, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """One whole shard at a time (these columns), sha256-checked: every table holds
        whole sequences, so per-sequence statistics can be added up shard by shard with
        memory bounded by one shard (its bytes and the columns read)."""
        cols = self._columns(columns)
        for s in self.shards:
            yield self._read(s, cols)[0]

    def _mask(self, batch: pa.RecordBatch, split: str | None, domain: str | None,
              seq_ids: set[int] | None) -> np.ndarray | None:
        mask: np.ndarray | None = None
        for name, want in (("split", split), ("domain", domain)):
            if want is None:
                continue
            m = column_to_numpy(name, batch.column(name)) == want
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
            out[c] = np.empty(shape, dtype=NUMPY_DTYPES.get(c, object))
        # Pass 2: fill.
        at = 0
        read = list(dict.fromkeys(cols + filt))
        for b in self.iter_batches(read, batch_rows):
            mask = self._mask(b, split, domain, ids)
            n = int(mask.sum()) if mask is not None else b.num_rows
            if n == 0:
                continue
            for c in cols:
                arr = column_to_numpy(c, b.column(c))
                if c == "experts":
                    self._check_experts(arr)
                out[c][at:at + n] = arr[mask] if mask is not None else arr
            at += n
        assert at == total
        return out

    def table(self, columns: Sequence[str] | None = None,
              max_bytes: int = 4 << 30) -> pa.Table:
        """The whole dataset as one Arrow table — for small sets (refuses above max_bytes)."""
        cols = self._columns(columns)
        est = self.n_rows * sum(row_bytes(self._schema.field(c).type) for c in cols)
        if est > max_bytes:
            raise TraceDatasetError(
                f"{self.path}: ~{est / 2**30:.1f} GiB in memory, above max_bytes="
                f"{max_bytes / 2**30:.1f} GiB; use iter_batches() or to_numpy(columns=...)")
        if not self.shards:
            return self._schema.empty_table().select(cols)
        tables = [self._read(s, cols)[0].replace_schema_metadata(None) for s in self.shards]
        return pa.concat_tables(tables, promote_options="permissive")

    def sequences(self, *, split: str | None = None, domain: str | None = None,
                  seq_ids: Sequence[int] | None = None) -> Iterator[SequenceTrace]:
        """Yield SequenceTraces in (shard, seq_id) order; one shard in memory at a time."""
        want = set(int(i) for i in seq_ids) if seq_ids is not None else None
        for s in self.shards:
            if want is not None and not want.intersection(s.seq_ids):
                continue
            t, pf = self._read(s, None)
            info = {r["seq_id"]: r for r in self._sequence_records(s, pf)}
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
                experts = column_to_numpy("experts", part.column("experts"))
                self._check_experts(experts)
                yield SequenceTrace(
                    seq_id=seq_id,
                    prompt_id=str(part.column("prompt_id")[0].as_py()),
                    domain=dom,
                    tokens=column_to_numpy("token", part.column("token")),
                    phase=column_to_numpy("phase", part.column("phase")),
                    experts=experts,
                    weights=column_to_numpy("weights", part.column("weights")),
                    logits=column_to_numpy("logits", part.column("logits")),
                    hidden=(column_to_numpy("hidden", part.column("hidden"))
                            if self.has_hidden else None),
                    text=str(r.get("text", "")),
                )
            del t


def _unreadable(path: Path, data: ShardBytes, exc: BaseException) -> TraceDatasetError:
    """The error for a shard Arrow cannot decode; damaged bytes say so instead
    (``data.check()`` raises first) rather than what Arrow tripped over."""
    data.check()
    return TraceDatasetError(f"{path}: not a readable Parquet shard "
                             f"({type(exc).__name__}: {one_line(exc)})"[:300])
