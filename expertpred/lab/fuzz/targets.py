"""The fuzz targets by format name, seeded with the files the repository ships."""

from __future__ import annotations

from ...shipped import repo_root
from .core import FuzzTarget

FORMATS = ("gguf", "manifest", "shard", "artifact")


def make_target(fmt: str) -> FuzzTarget:
    root = repo_root()
    if fmt == "gguf":
        from .gguf import GGUFTarget

        return GGUFTarget([root / "models" / m / "model.gguf"
                           for m in ("tiny-mixtral", "tiny-qwen3moe")])
    if fmt in ("manifest", "shard"):
        from .trace import ManifestTarget, ShardTarget

        return ManifestTarget() if fmt == "manifest" else ShardTarget()
    if fmt == "artifact":
        from .artifact import ArtifactTarget

        return ArtifactTarget()
    raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
