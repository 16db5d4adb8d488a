"""The row schema of a trace shard, and Arrow <-> numpy for its columns.

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
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from ...errors import ExpertPredError

FORMAT_NAME = "expertpred.trace"

FORMAT_VERSION = 1

# shard-00000.parquet (one writer), shard-w01-00000.parquet (parallel tracing worker 1)
SHARD_RE = re.compile(r"^shard-(?:w\d+-)?(\d{5,})\.parquet$")


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

NUMPY_DTYPES = {
    "seq_id": np.int32, "pos": np.int32, "token": np.int32, "phase": np.int8,
    "experts": np.int16, "weights": np.float32, "logits": np.float32, "hidden": np.float16,
}



class TraceWriteError(ExpertPredError):
    """Writing a trace dataset failed (disk full, permission, wrong directory)."""



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



def leaf_path(name: str) -> str:
    """Parquet leaf path of a nested column (what per-column writer options name)."""
    return f"{name}.list.element.list.element"



def nested_array(arr: np.ndarray, typ: pa.DataType) -> pa.FixedSizeListArray:
    """(N, L, W) numpy -> fixed_size_list<fixed_size_list<., W>, L> without copying."""
    n, n_layer, width = arr.shape
    flat = pa.array(np.ascontiguousarray(arr).reshape(-1), type=typ.value_type.value_type)
    inner = pa.FixedSizeListArray.from_arrays(flat, width)
    return pa.FixedSizeListArray.from_arrays(inner, n_layer)



def nested_to_numpy(col: pa.Array | pa.ChunkedArray, dtype: np.dtype) -> np.ndarray:
    """fixed_size_list<fixed_size_list<., W>, L> -> (N, L, W) numpy."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n_layer = col.type.list_size
    width = col.type.value_type.list_size
    flat = col.flatten().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=dtype).reshape(len(col), n_layer, width)



def column_to_numpy(name: str, col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if name in NESTED_COLUMNS:
        return nested_to_numpy(col, np.dtype(NUMPY_DTYPES[name]))
    if pa.types.is_dictionary(col.type):
        col = col.cast(pa.string())
    if name in NUMPY_DTYPES:
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=NUMPY_DTYPES[name])
    return np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)



def row_bytes(t: pa.DataType) -> int:
    if pa.types.is_fixed_size_list(t):
        return t.list_size * row_bytes(t.value_type)
    if pa.types.is_dictionary(t):
        return 4
    if pa.types.is_string(t):
        return 24
    return max(1, t.bit_width // 8)

