"""Token streams per domain, random training windows, fixed validation windows, unigram loss."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from .corpus import Document

DOMAINS = ("code", "prose")


def cap_documents(docs: list[Document], max_bytes: int) -> list[Document]:
    """Keep documents in a hash order (not alphabetical, which would favour a few packages)
    until ``max_bytes`` of text; the result is returned in name order."""
    order = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    kept, total = [], 0
    for d in order:
        if total >= max_bytes:
            break
        kept.append(d)
        total += len(d.text.encode())
    return sorted(kept, key=lambda d: d.name)


def token_stream(tok: Tokenizer, docs: list[Document], eot_id: int = 0) -> np.ndarray:
    """Concatenate the documents' token ids, each followed by ``<|endoftext|>``."""
    encs = tok.encode_batch([d.text for d in docs], add_special_tokens=False)
    parts = []
    for e in encs:
        parts.append(np.asarray(e.ids, dtype=np.int64))
        parts.append(np.asarray([eot_id], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens; each row's domain drawn with ``prose_fraction``."""

    streams: dict[str, np.ndarray]
    seq_len: int
    batch_size: int
    prose_fraction: float
    seed: int

    def __post_init__(self) -> None:
        self.rng_ = np.random.default_rng(self.seed)

    def next(self) -> np.ndarray:
        rows = []
        for _ in range(self.batch_size):
            domain = "prose" if self.rng_.random() < self.prose_fraction else "code"
            s = self.streams[domain]
            start = int(self.rng_.integers(0, len(s) - self.seq_len - 1))
            rows.append(s[start : start + self.seq_len + 1])
        return np.stack(rows)


def fixed_windows(stream: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """Non-overlapping windows of ``seq_len + 1`` tokens from the start of ``stream``."""
    n = min(len(stream) - 1, max_tokens) // seq_len
    return np.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])


def unigram_cross_entropy(train: dict[str, np.ndarray], weights: dict[str, float],
                          targets: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``targets`` under the training unigram distribution.

    The distribution mixes the domains' add-one-smoothed unigram frequencies with the same
    ``weights`` the training batches use.

    >>> tr = {"code": np.array([1, 1, 2]), "prose": np.array([2])}
    >>> round(unigram_cross_entropy(tr, {"code": 1.0, "prose": 0.0}, np.array([1]), 3), 4)
    0.6931
    """
    p = np.zeros(vocab_size)
    for domain, stream in train.items():
        counts = np.bincount(stream, minlength=vocab_size).astype(np.float64) + 1.0
        p += weights[domain] * counts / counts.sum()
    return float(-np.log(p[targets]).mean())


def empirical_entropy(targets: np.ndarray) -> float:
    """Entropy (nats) of the targets' own unigram distribution: a floor no unigram model beats.

    >>> round(empirical_entropy(np.array([0, 1])), 4) == round(float(np.log(2)), 4)
    True
    """
    counts = np.bincount(targets).astype(np.float64)
    q = counts[counts > 0] / counts.sum()
    return float(-(q * np.log(q)).sum())
