"""The shard writer of one parallel tracing worker: a :class:`TraceWriter` without a manifest.

Parallel tracing (:mod:`expertpred.trace.parallel`) runs N llama.cpp processes into one
dataset directory. The parent process holds the directory's :class:`TraceWriter` (its lock,
its manifest) and is the one merger; every worker writes whole shards through this subclass,
which reuses the writer's buffering, table building and crash-safe shard file (tmp + fsync
+ rename + directory fsync) unchanged, and differs in three ways:

- its shard names carry the worker (``shard-w01-00000.parquet``), so no two writers ever
  pick the same name;
- it never touches the manifest: each finished shard is handed to ``on_shard`` (the worker
  sends it to the parent, which lists it with :meth:`TraceWriter.add_shard`);
- it takes no directory lock (the parent holds it for the whole run).

A worker killed between renaming a shard and reporting it leaves a finished shard the
manifest does not list; the next ``--resume`` adopts it like any serial run's orphan.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .manifest import ManifestInfo, ShardInfo
from .schema import TraceWriteError
from .writer import TraceWriter, WriterState

log = logging.getLogger(__name__)


class WorkerShardWriter(TraceWriter):
    """Write finished shards named ``shard-wNN-MMMMM.parquet``; report each to ``on_shard``."""

    def __init__(self, out_dir: str | os.PathLike[str], info: ManifestInfo, *, worker: int,
                 on_shard: Callable[[ShardInfo], None], shard_rows: int = 32768,
                 shard_bytes: int = 128 << 20, compression: str = "zstd") -> None:
        if worker < 0:
            raise ValueError(f"worker={worker}, expected >= 0")
        self.worker = worker
        self.shard_prefix = f"shard-w{worker:02d}-"
        self._on_shard = on_shard
        super().__init__(out_dir, info, shard_rows=shard_rows, shard_bytes=shard_bytes,
                         resume=False, compression=compression)

    def _open(self) -> None:
        # the parent created the directory and its manifest and holds its lock
        if not self.out_dir.is_dir():
            raise TraceWriteError(f"{self.out_dir}: no such dataset directory; expected the "
                                  "parent's trace run to have created it")

    def _write_manifest(self) -> None:
        """The parent owns the manifest; a worker's shards reach it through ``on_shard``."""

    def flush(self) -> ShardInfo | None:
        shard = super().flush()
        if shard is not None:
            self._on_shard(shard)
        return shard

    def close(self, complete: bool = True) -> None:
        """Write the buffered sequences as a last shard; ``complete`` is the parent's call."""
        if self.state is WriterState.OPEN:
            try:
                self.flush()
            finally:
                self.state = WriterState.CLOSED
