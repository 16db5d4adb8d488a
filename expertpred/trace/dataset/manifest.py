"""The dataset manifest: what was traced, with what, and which shards are finished.

The manifest is ``_manifest.json``: the leading underscore is the Hive/Spark convention for
metadata files, so ``pd.read_parquet(dir)``, ``pyarrow.dataset`` and polars read the
directory's shards and skip it. Datasets written before that change name it
``manifest.json``; readers still find it there, and a writer that resumes such a dataset
moves it to the new name.

It is rewritten whole after every finished shard (tmp file + fsync + ``os.replace`` +
directory fsync), so it always names a subset of the shards that are on disk.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from ...model import ModelInfo
from ..validate import TraceDatasetError, check_manifest
from .schema import FORMAT_NAME, FORMAT_VERSION

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
# The name before the Hive convention; read, never written.
LEGACY_MANIFEST_NAME = "manifest.json"
TMP_SUFFIX = ".tmp"


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

    mode: str = "greedy"  # one of validate.DECODING_MODES
    temperature: float = 0.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 32  # decode tokens per prompt
    n_ctx: int = 512
    n_threads: int = 2
    exact: bool = False  # flash attention off + f32 KV cache (trace --exact): other logits

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

    from ... import __version__

    def ver(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"expertpred": __version__, "llama-cpp-python": ver("llama_cpp_python"),
            "numpy": np.__version__, "pyarrow": pa.__version__,
            "python": platform.python_version()}


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """``path.tmp`` open for writing; after the block it is fsynced, renamed to ``path`` and
    the directory fsynced (a crash leaves the old file or the new one, never part of one);
    on an error it is removed and the error goes on."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as f:
        f.write(data)


def manifest_json(m: dict[str, Any]) -> str:
    """Indented JSON, but one compact line per shard (seq_id lists stay readable)."""
    head = json.dumps({k: v for k, v in m.items() if k != "shards"}, indent=1,
                      ensure_ascii=False)
    shards = ",\n".join("  " + json.dumps(s, ensure_ascii=False) for s in m["shards"])
    return head[:-2] + ',\n "shards": [\n' + shards + "\n ]\n}\n"


def find_manifest(directory: Path) -> Path | None:
    """The manifest file of a dataset directory (new name first), or None."""
    for name in (MANIFEST_NAME, LEGACY_MANIFEST_NAME):
        if (directory / name).is_file():
            return directory / name
    return None


def read_manifest(directory: Path) -> dict[str, Any]:
    path = find_manifest(directory) or directory / MANIFEST_NAME
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


def write_manifest(directory: Path, m: dict[str, Any]) -> None:
    """Atomically write ``m`` as the manifest, then drop a legacy-named one it replaces.

    A kill between the two steps leaves both files; readers take the new name first."""
    atomic_write_bytes(directory / MANIFEST_NAME, manifest_json(m).encode())
    legacy = directory / LEGACY_MANIFEST_NAME
    if legacy.exists():
        legacy.unlink()
        fsync_dir(directory)
        log.info("%s: manifest renamed to %s", directory, MANIFEST_NAME)
