"""Which model a trace or a predictor belongs to: one record and one identity policy.

:class:`ModelInfo` is the model as traces, predictors and artifacts record it: the GGUF's
sha256 plus the routing geometry every column and feature depends on. It is built from a
GGUF layout in one place, :meth:`ModelInfo.from_layout` (``gguf.layout.model_info`` adds the
hash), and read from every on-disk record by :meth:`ModelInfo.from_dict`.

:func:`check_identity` is the one policy that decides whether a predictor trained on one
model may run on a given GGUF file. Every loader calls it (``predictors.export`` for
artifacts, ``prefetch.plugin`` for saved predictors). In order:

1. shapes (blocks, MoE layers, experts, k, embedding width) must match, always;
2. a predictor that records no sha256 (trained on synthetic traces) is accepted on shapes;
3. with ``source`` (the model the file was widened from, ``expertpred widen``): the source's
   sha256 must be the trained one and the file's routing fingerprint the source's;
4. else the file's sha256 must be the trained one, or ``allow_sha_mismatch`` accepts it.

This module reads no file: the facts come from a :class:`ModelFile` (``gguf.layout.GGUFFile``
reads them), so the records stay at the bottom of the import graph.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .errors import ExpertPredError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """Identity and routing shape of the model a trace (and a predictor) belongs to."""

    sha256: str  # of the GGUF file: identity; "" when unknown (synthetic data)
    arch: str  # GGUF general.architecture: names the routing rules (messages, reports)
    n_layer: int  # all blocks: dense blocks shift block numbers, so they are part of the shape
    moe_layers: tuple[int, ...]  # GGUF block index of each traced MoE layer (trace rows)
    n_expert: int  # experts per MoE layer: width of scores and targets
    n_expert_used: int  # k, experts selected per token and layer
    n_embd: int  # router input width (hidden features; 0 when a record predates it)
    # Where the file was when it was traced (trace manifests show it). Not identity: the
    # same file may sit anywhere, so equality ignores it.
    path: str = field(default="", compare=False)

    @property
    def n_moe(self) -> int:
        """L: number of MoE layers (rows of a trace)."""
        return len(self.moe_layers)

    @property
    def shape(self) -> tuple[int, tuple[int, ...], int, int, int]:
        """What must match for a predictor to fit a model at all (sha256 aside)."""
        return (self.n_layer, self.moe_layers, self.n_expert, self.n_expert_used, self.n_embd)

    @classmethod
    def from_layout(cls, layout: Any, sha256: str = "", path: str = "") -> ModelInfo:
        """From a ``gguf.layout.MoELayout`` (anything with its fields): the one place a
        layout becomes a ModelInfo."""
        return cls(sha256=sha256, arch=str(layout.arch), n_layer=int(layout.n_layer),
                   moe_layers=tuple(int(b) for b in layout.moe_layers),
                   n_expert=int(layout.n_expert), n_expert_used=int(layout.n_expert_used),
                   n_embd=int(layout.n_embd), path=str(path))

    @classmethod
    def from_dict(cls, model: Mapping[str, Any]) -> ModelInfo:
        """From the ``model`` object of a trace manifest, a saved predictor or an artifact
        header (old records without ``path``, ``arch`` or ``n_embd`` still load)."""
        try:
            return cls(
                sha256=str(model.get("sha256", "")),
                arch=str(model.get("arch", "")),
                n_layer=int(model["n_layer"]),
                moe_layers=tuple(int(x) for x in model["moe_layers"]),
                n_expert=int(model["n_expert"]),
                n_expert_used=int(model["n_expert_used"]),
                n_embd=int(model.get("n_embd", 0)),
                path=str(model.get("path", "")),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ExpertPredError(f"model record {model!r}: missing or bad field ({exc}); "
                                  "expected n_layer, moe_layers, n_expert, n_expert_used") \
                from None

    from_manifest = from_dict  # the name predictors and training use for the same reader

    def to_dict(self) -> dict[str, Any]:
        """The record predictors and artifacts store (without ``path``: not identity)."""
        return {"sha256": self.sha256, "arch": self.arch, "n_layer": self.n_layer,
                "moe_layers": list(self.moe_layers), "n_expert": self.n_expert,
                "n_expert_used": self.n_expert_used, "n_embd": self.n_embd}

    def check_same(self, other: ModelInfo, what: str) -> None:
        """Raise a one-line :class:`ExpertPredError` unless ``other`` is the same model
        (sha256 when both know it; MoE layers, experts and k always)."""
        if self.sha256 and other.sha256 and self.sha256 != other.sha256:
            raise ExpertPredError(f"{what}: model sha256 {other.sha256[:12]}…, expected "
                                  f"{self.sha256[:12]}… ({self.arch}); trained on another model")
        mine = (self.moe_layers, self.n_expert, self.n_expert_used)
        theirs = (other.moe_layers, other.n_expert, other.n_expert_used)
        if mine != theirs:
            raise ExpertPredError(
                f"{what}: model with {other.n_moe} MoE layers × {other.n_expert} experts "
                f"(k={other.n_expert_used}), expected {self.n_moe} × {self.n_expert} "
                f"(k={self.n_expert_used}); trained on another model")


# --- the identity policy ------------------------------------------------------------------------


class Match(enum.Enum):
    """How a model file was found to be the model a predictor was trained on."""

    EXACT = "exact"  # the file's sha256 is the trained model's
    WIDENED = "widened"  # a widened copy of the trained model: same routing fingerprint
    UNRECORDED = "unrecorded"  # the predictor records no sha256 (synthetic data): shapes only
    ALLOWED = "allowed"  # another sha256, accepted because the caller allowed a mismatch


class ModelFile(Protocol):
    """The facts :func:`check_identity` reads from a model file (``gguf.layout.GGUFFile``)."""

    @property
    def path(self) -> str: ...

    @property
    def info(self) -> ModelInfo: ...  # geometry, sha256 "" (hashing is the costly part)

    def sha256(self) -> str: ...  # of the whole file

    def routing_fingerprint(self) -> str: ...  # of everything but the stacked experts


@dataclass(frozen=True)
class Identity:
    """The verdict of :func:`check_identity`."""

    match: Match  # which rule accepted the file
    model: ModelInfo  # the model to run on: the trained one, the file's after ALLOWED


_SHAPE_KEYS = ("n_layer", "moe_layers", "n_expert", "n_expert_used", "n_embd")


def _same_shape(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Equal shapes; an n_embd of 0 (a record older than the field) matches any width."""
    if a[:4] != b[:4]:
        return False
    return a[4] == b[4] or not a[4] or not b[4]


def check_identity(trained: ModelInfo, file: ModelFile, *, source: ModelFile | None = None,
                   allow_sha_mismatch: bool = False, what: str = "predictor") -> Identity:
    """May a predictor trained on ``trained`` run on ``file``? (module docstring, rules 1-4)

    Raises a one-line :class:`ExpertPredError` naming ``what``, the file and both sha256
    prefixes. Reads as little as the rule needs: rule 3 hashes the (small) source and
    fingerprints both files' non-expert tensors, rule 4 hashes ``file``.
    """
    mine = file.info
    if not _same_shape(trained.shape, mine.shape):
        diff = ", ".join(f"{k} {a} vs {b}" for k, a, b in
                         zip(_SHAPE_KEYS, trained.shape, mine.shape) if a != b)
        raise ExpertPredError(f"{what}: trained on another model shape than {file.path} "
                              f"(trained vs file: {diff}); not overridable")
    if not trained.sha256:
        log.warning("%s: records no model sha256 (synthetic training data?); accepted for %s "
                    "on shapes alone", what, file.path)
        return Identity(Match.UNRECORDED, trained)
    if source is not None:
        src_sha = source.sha256()
        if src_sha != trained.sha256:
            raise ExpertPredError(f"{what}: source model {source.path} has sha256 "
                                  f"{src_sha[:12]}…, predictor trained on "
                                  f"{trained.sha256[:12]}… (trained on another model)")
        if source.routing_fingerprint() != file.routing_fingerprint():
            raise ExpertPredError(f"{file.path}: non-expert tensors differ from {source.path}: "
                                  "not a widened copy of it")
        return Identity(Match.WIDENED, trained)
    sha = file.sha256()
    if sha == trained.sha256:
        return Identity(Match.EXACT, trained)
    if not allow_sha_mismatch:
        raise ExpertPredError(f"{what}: trained on model sha256 {trained.sha256[:12]}…, "
                              f"{file.path} has sha256 {sha[:12]}… (another model; a widened "
                              "copy needs --source-model, the same shapes "
                              "--allow-sha-mismatch)")
    log.warning("%s: trained on sha256 %s…, used with %s (sha256 %s…): allowed", what,
                trained.sha256[:12], file.path, sha[:12])
    return Identity(Match.ALLOWED, replace(mine, sha256=sha, path=file.path))
