"""Checks of a trace dataset at its boundary: the manifest's schema, shard names, and each
shard's bytes and sequence ids as they are read.

``check_manifest`` checks every key and type of the manifest (``_manifest.json``) and that
its parts agree (columns vs model, n_sequences vs seq_ids, totals vs shards, no shard or
seq_id twice).
``ShardBytes`` reads a shard's bytes once, hashing them as they come, so the sha256 the
manifest lists is checked on every read at the cost of one hash pass over bytes already in
memory (no second read of the file). ``check_shard_rows`` checks a shard's ``seq_id``
column against the manifest. Every failure is one :class:`TraceDatasetError` line naming
the file, the value and what was expected.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExpertPredError

# How the tokens after the prompt were produced: "served" = traffic recorded by `expertpred
# serve --trace-out`, where every request brings its own sampling settings.
DECODING_MODES = ("greedy", "sampled", "served")

log = logging.getLogger(__name__)

_SHA = re.compile(r"^[0-9a-f]{64}$")
# read and hash a shard this many bytes at a time: small enough that a chunk is still in L2
# when it is hashed, large enough that the per-call overhead is nothing
_HASH_CHUNK = 256 * 1024
# A shard is a plain file name inside the dataset directory: no separators, no "..", no
# hidden or absolute names — the manifest may come from anyone.
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.parquet$")


class TraceDatasetError(ExpertPredError):
    """A directory is not a readable trace dataset."""


def one_line(exc: BaseException) -> str:
    """An exception's text on one line (Arrow's messages span several)."""
    return " ".join(str(exc).split())


class _Schema:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, what: str) -> TraceDatasetError:
        return TraceDatasetError(f"{self.path}: {what}")

    def get(self, obj: Any, key: str, types: type | tuple[type, ...], where: str,
            optional: bool = False) -> Any:
        if not isinstance(obj, Mapping):
            raise self.fail(f"{where} is {type(obj).__name__}, expected an object")
        if key not in obj:
            if optional:
                return None
            raise self.fail(f"{where} has no {key!r}")
        v = obj[key]
        if v is None and optional:
            return None
        ts = types if isinstance(types, tuple) else (types,)
        if not isinstance(v, ts) or (isinstance(v, bool) and bool not in ts):
            names = "/".join(t.__name__ for t in ts) + (" or null" if optional else "")
            raise self.fail(f"{where}.{key} is {v!r:.60}, expected {names}")
        return v

    def int_(self, obj: Any, key: str, where: str, lo: int = 0, hi: int | None = None,
             optional: bool = False) -> int | None:
        v = self.get(obj, key, int, where, optional)
        if v is not None and (v < lo or (hi is not None and v > hi)):
            raise self.fail(f"{where}.{key} is {v}, expected {lo}..{'' if hi is None else hi}")
        return v

    def ints(self, obj: Any, key: str, where: str) -> list[int]:
        v = self.get(obj, key, list, where)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise self.fail(f"{where}.{key} is {v!r:.60}, expected a list of integers")
        return v


def _check_model(s: _Schema, m: Any) -> None:
    s.get(m, "path", str, "model")
    sha = s.get(m, "sha256", str, "model")
    if not _SHA.match(sha):
        raise s.fail(f"model.sha256 {sha!r:.70}, expected 64 hex digits")
    arch = s.get(m, "arch", str, "model")
    if not re.match(r"^[a-z][a-z0-9_]{0,63}$", arch):
        raise s.fail(f"model.arch {arch!r:.70}, expected a GGUF architecture name")
    n_layer = s.int_(m, "n_layer", "model", 1, 1 << 12)
    layers = s.ints(m, "moe_layers", "model")
    if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= n_layer:
        raise s.fail(f"model.moe_layers {layers!r:.60}, expected increasing blocks in "
                     f"0..{n_layer - 1}")
    n_expert = s.int_(m, "n_expert", "model", 1, 1 << 16)
    s.int_(m, "n_expert_used", "model", 1, n_expert)
    s.int_(m, "n_embd", "model", 1, 1 << 20)


def _check_sections(s: _Schema, m: Mapping[str, Any]) -> None:
    for key in ("created", "updated"):
        s.get(m, key, str, "manifest")
    s.get(m, "complete", bool, "manifest")
    hidden = s.get(m, "capture_hidden", bool, "manifest")
    p = s.get(m, "prompts", dict, "manifest", optional=True)
    if p is not None:
        s.get(p, "path", str, "prompts")
        s.get(p, "sha256", str, "prompts")
        s.int_(p, "n_prompts", "prompts")
        for key in ("split", "domain"):
            s.get(p, key, str, "prompts", optional=True)
        for key in ("limit", "n_selected"):
            s.int_(p, key, "prompts", optional=True)
    d = s.get(m, "decoding", dict, "manifest")
    if s.get(d, "mode", str, "decoding") not in DECODING_MODES:
        raise s.fail(f"decoding.mode {d['mode']!r:.40}, expected one of "
                     f"{', '.join(map(repr, DECODING_MODES))}")
    for key in ("temperature", "top_p"):
        s.get(d, key, (int, float), "decoding")
    for key in ("top_k", "seed", "max_tokens", "n_ctx", "n_threads"):
        s.get(d, key, int, "decoding")
    s.get(d, "exact", bool, "decoding", optional=True)  # absent before trace --exact
    unknown = set(d) - {"mode", "temperature", "top_p", "top_k", "seed", "max_tokens",
                        "n_ctx", "n_threads", "exact"}
    if unknown:
        raise s.fail(f"decoding has unknown keys {sorted(unknown)[:3]}")
    model = m["model"]
    c = s.get(m, "columns", dict, "manifest")
    s.int_(c, "n_moe_layer", "columns", len(model["moe_layers"]), len(model["moe_layers"]))
    s.int_(c, "n_expert", "columns", model["n_expert"], model["n_expert"])
    s.int_(c, "n_expert_used", "columns", model["n_expert_used"], model["n_expert_used"])
    dim = s.int_(c, "hidden_dim", "columns", 1, 1 << 20, optional=True)
    if (dim is not None) != hidden:
        raise s.fail(f"columns.hidden_dim {dim!r} with capture_hidden={hidden}; expected a "
                     "width exactly when hidden states were captured")
    names = s.get(c, "names", list, "columns")
    if not all(isinstance(n, str) for n in names):
        raise s.fail("columns.names: expected a list of column names")
    s.get(m, "software", dict, "manifest", optional=True)
    s.get(m, "runs", list, "manifest", optional=True)


def _check_shards(s: _Schema, m: Mapping[str, Any]) -> None:
    shards = s.get(m, "shards", list, "manifest")
    names: set[str] = set()
    seen: set[int] = set()
    for i, sh in enumerate(shards):
        where = f"shards[{i}]"
        name = s.get(sh, "name", str, where)
        if not _SHARD_NAME.match(name) or ".." in name:
            raise s.fail(f"{where}.name {name!r:.80}, expected a plain shard file name "
                         "(like shard-00000.parquet) inside the dataset directory")
        if name in names:
            raise s.fail(f"shard {name} is listed twice; expected each shard once")
        names.add(name)
        n_rows = s.int_(sh, "rows", where)
        ids = s.ints(sh, "seq_ids", where)
        s.int_(sh, "n_sequences", where, len(ids), len(ids))
        if n_rows < len(ids):
            raise s.fail(f"{where}: {n_rows} rows for {len(ids)} sequences; expected at least "
                         "one row per sequence")
        dup = seen.intersection(ids) or (len(set(ids)) != len(ids) and set(ids))
        if dup:
            raise s.fail(f"{where} ({name}): seq_id {min(dup)} appears twice in the dataset; "
                         "expected each sequence once")
        seen.update(ids)
        s.int_(sh, "bytes", where)
        sha = s.get(sh, "sha256", str, where)
        if not _SHA.match(sha):
            raise s.fail(f"{where}.sha256 {sha!r:.70}, expected 64 hex digits")
    # totals are a summary for people (readers sum the shards); a crash between a shard and
    # the manifest update may leave them behind, so only their types are checked
    t = s.get(m, "totals", dict, "manifest", optional=True)
    if t is not None:
        for key in ("rows", "sequences", "bytes"):
            s.int_(t, key, "totals")


def check_manifest(path: Path, m: Mapping[str, Any]) -> None:
    """Every key and type of a parsed manifest (format/version checked before)."""
    s = _Schema(path)
    _check_model(s, s.get(m, "model", dict, "manifest"))
    _check_sections(s, m)
    _check_shards(s, m)


class ShardBytes:
    """A shard's bytes, read once into memory and hashed chunk by chunk as they arrive, each
    chunk while it is still in cache. :meth:`check` compares the sha256; callers check
    before they return what they decoded.

    The hash runs inline, not on a second thread beside Arrow's decode: on the shared 2-core
    box no core is idle, so the overlap saved nothing measurable while a thread per shard
    added a start, a GIL hand-back and a thread left running when a caller abandons a
    streaming read (docs/hostile-inputs.md, *Costs*)."""

    def __init__(self, path: Path, nbytes: int, sha256: str) -> None:
        self.path, self.sha256 = path, sha256
        buf = bytearray(nbytes + 1)  # one byte more: a longer file shows as a short read
        view, h, n = memoryview(buf), hashlib.sha256(), 0
        try:
            with open(path, "rb", buffering=0) as f:
                while n <= nbytes and (k := f.readinto(view[n:n + _HASH_CHUNK])):
                    h.update(view[n:min(n + k, nbytes)])
                    n += k
        except OSError as exc:
            raise TraceDatasetError(f"{path}: cannot read ({exc.strerror})") from None
        if n != nbytes:
            raise TraceDatasetError(f"{path}: {n}{'+' if n > nbytes else ''} bytes, the "
                                    f"manifest lists {nbytes}")
        self.data = view[:nbytes]
        self._digest = h.hexdigest()

    def check(self) -> None:
        got = self._digest
        if got != self.sha256:
            raise TraceDatasetError(f"{self.path}: sha256 {got[:12]}…, the manifest lists "
                                    f"{self.sha256[:12]}… (corrupt or replaced shard)")


def check_shard_rows(path: Path, seq_id: np.ndarray, seq_ids: tuple[int, ...],
                     rows: int) -> None:
    """The shard's ``seq_id`` column: ``rows`` rows, one contiguous run per sequence, in the
    manifest's order (a duplicated or swapped seq_id would mix two sequences' tokens)."""
    if len(seq_id) != rows:
        raise TraceDatasetError(f"{path}: {len(seq_id)} rows, the manifest lists {rows}")
    if rows == 0:
        runs: list[int] = []
    else:
        starts = np.concatenate([[0], np.flatnonzero(np.diff(seq_id)) + 1])
        runs = seq_id[starts].tolist()
    if runs != list(seq_ids):
        raise TraceDatasetError(f"{path}: seq_id runs {runs[:6]}…, the manifest lists "
                                f"{list(seq_ids)[:6]}… (duplicated, swapped or split "
                                "sequences); expected one run per listed sequence, in order")
