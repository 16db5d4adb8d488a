"""The router-trace dataset: an open Parquet format, a crash-safe streaming writer, a reader.

A dataset is a directory::

    _manifest.json          what was traced, with what, and which shards are finished
    shard-00000.parquet     one row per (sequence, token position); whole sequences only
    shard-00001.parquet
    ...

``pd.read_parquet(dir)``, ``pyarrow.dataset.dataset(dir)`` and ``pl.read_parquet(dir)``
read the shards directly (files starting with ``_`` are metadata by the Hive convention).

:mod:`.schema` is the row schema and the Arrow <-> numpy conversion, :mod:`.manifest` the
manifest records and its atomic file, :mod:`.writer` the streaming writer,
:mod:`.reader` the reader.
"""

from __future__ import annotations

from ..validate import TraceDatasetError
from .manifest import (
    LEGACY_MANIFEST_NAME,
    MANIFEST_NAME,
    TMP_SUFFIX,
    DecodingInfo,
    ManifestInfo,
    ModelInfo,
    PromptSetInfo,
    ShardInfo,
    find_manifest,
    software_versions,
)
from .reader import TraceDataset
from .schema import (
    ALL_COLUMNS,
    FLOAT_COLUMNS,
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FORMAT,
    META_MODEL_SHA,
    META_SEQUENCES,
    NESTED_COLUMNS,
    SCALAR_COLUMNS,
    SHARD_RE,
    TraceWriteError,
    trace_schema,
)
from .writer import TraceWriter, WriterState

__all__ = [
    "ALL_COLUMNS", "FLOAT_COLUMNS", "FORMAT_NAME", "FORMAT_VERSION", "LEGACY_MANIFEST_NAME",
    "MANIFEST_NAME", "META_FORMAT", "META_MODEL_SHA", "META_SEQUENCES", "NESTED_COLUMNS",
    "SCALAR_COLUMNS", "SHARD_RE", "TMP_SUFFIX", "DecodingInfo", "ManifestInfo", "ModelInfo",
    "PromptSetInfo", "ShardInfo", "TraceDataset", "TraceDatasetError", "TraceWriteError",
    "TraceWriter", "WriterState", "find_manifest", "software_versions", "trace_schema",
]
