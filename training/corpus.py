"""The training corpus: text every Python 3.11 installation carries, so nothing is downloaded.

Two domains:

- ``code``: the standard library's own ``.py`` files (minus tests, IDLE, lib2to3, pydoc_data,
  site-packages and the generated codec tables in ``encodings/``).
- ``prose``: the English reference text of ``pydoc_data.topics.topics`` (79 topics).

Splits are whole documents chosen by a hash of the document name, so they are the same on
every machine with the same Python version, independent of file-system order:

- code: ~10 % held out (test), ~5 % validation, rest train;
- prose: ~15 % held out, ~10 % validation, rest train.

``load_corpus("heldout")`` is what the tracing work uses to make prompts the models never saw.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import sysconfig
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

log = logging.getLogger(__name__)

# Directories (any path component) that are not ordinary library source.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "test", "tests", "idlelib", "lib2to3", "pydoc_data", "encodings",
     "__pycache__"}
)
# (held-out fraction, validation fraction) per domain; the rest is training text.
SPLIT_FRACTIONS = {"code": (0.10, 0.05), "prose": (0.15, 0.10)}


class Split(str, Enum):
    TRAIN = "train"
    VALID = "valid"
    HELDOUT = "heldout"


@dataclass(frozen=True)
class Document:
    """One whole file (code) or one whole topic (prose)."""

    domain: str  # "code" | "prose"
    name: str  # stdlib-relative path ("json/decoder.py") or topic name ("assert")
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(domain: str, name: str) -> Split:
    """Deterministic split of one document, from sha256 of ``"{domain}:{name}"``.

    >>> split_of("code", "json/decoder.py") in set(Split)
    True
    """
    digest = hashlib.sha256(f"{domain}:{name}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    heldout, valid = SPLIT_FRACTIONS[domain]
    if u < heldout:
        return Split.HELDOUT
    if u < heldout + valid:
        return Split.VALID
    return Split.TRAIN


def _code_documents() -> list[Document]:
    root = stdlib_dir()
    docs = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts[:-1]):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document("code", rel.as_posix(), text))
    return docs


def _prose_documents() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document("prose", name, topics[name]) for name in sorted(topics)]


def all_documents() -> list[Document]:
    """Every document of both domains, code first, each sorted by name."""
    return _code_documents() + _prose_documents()


def load_corpus(split: str, domain: str | None = None) -> list[Document]:
    """Documents of one split ("train", "valid", "heldout"), optionally of one domain."""
    want = Split(split)
    return [
        d
        for d in all_documents()
        if split_of(d.domain, d.name) is want and (domain is None or d.domain == domain)
    ]


def describe_corpus() -> dict:
    """Summary for the model card: sources, sizes per split, the held-out and valid names."""
    docs = all_documents()
    by_split: dict[str, dict[str, dict[str, int]]] = {}
    names: dict[str, dict[str, list[str]]] = {"heldout": {}, "valid": {}}
    for d in docs:
        s = split_of(d.domain, d.name).value
        stats = by_split.setdefault(s, {}).setdefault(d.domain, {"documents": 0, "bytes": 0})
        stats["documents"] += 1
        stats["bytes"] += len(d.text.encode())
        if s in names:
            names[s].setdefault(d.domain, []).append(d.name)
    return {
        "sources": {
            "code": f"Python {platform.python_version()} standard library .py files under "
            f"<stdlib>, excluding directories {sorted(EXCLUDED_DIRS)}",
            "prose": "pydoc_data.topics.topics (Python reference-manual topics)",
        },
        "python_version": platform.python_version(),
        "split_rule": "sha256('{domain}:{name}') as uniform u; heldout if u < h, valid if "
        f"u < h + v; fractions (h, v) = {SPLIT_FRACTIONS}",
        "splits": by_split,
        "heldout_documents": names["heldout"],
        "valid_documents": names["valid"],
    }
