"""Hand-made routing for the analysis tests: sequences with known statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from expertpred.trace.dataset import ManifestInfo, ModelInfo, TraceWriter
from expertpred.trace.record import Phase, SequenceTrace


def make_model(n_layer: int = 4, n_expert: int = 8, k: int = 2, sha: str = "a" * 64) -> ModelInfo:
    return ModelInfo(path="/models/synthetic.gguf", sha256=sha, arch="mixtral",
                     n_layer=n_layer, moe_layers=tuple(range(n_layer)), n_expert=n_expert,
                     n_expert_used=k, n_embd=16)


def make_sequence(experts: np.ndarray, seq_id: int = 0, domain: str = "code",
                  n_prompt: int | None = None, n_expert: int = 8) -> SequenceTrace:
    """A SequenceTrace around a given (T, L, k) expert array (weights, logits consistent)."""
    t, n_layer, k = experts.shape
    logits = np.zeros((t, n_layer, n_expert), dtype=np.float32)
    n_prompt = t // 2 if n_prompt is None else n_prompt
    return SequenceTrace(
        seq_id=seq_id, prompt_id=f"p{seq_id}", domain=domain,
        tokens=np.arange(t, dtype=np.int32) % 50,
        phase=np.where(np.arange(t) < n_prompt, Phase.PROMPT, Phase.DECODE).astype(np.int8),
        experts=experts.astype(np.int16),
        weights=np.full((t, n_layer, k), 1.0 / k, dtype=np.float32),
        logits=logits)


def random_sets(rng: np.random.Generator, n: int, n_layer: int, n_expert: int, k: int,
                p: np.ndarray | None = None) -> np.ndarray:
    """(n, L, k) independent top-k sets, experts drawn without replacement (weights p)."""
    out = np.empty((n, n_layer, k), dtype=np.int16)
    for i in range(n):
        for layer in range(n_layer):
            out[i, layer] = rng.choice(n_expert, k, replace=False, p=p)
    return out


def sticky_sets(rng: np.random.Generator, n: int, n_layer: int, n_expert: int, k: int,
                keep: float, p: np.ndarray | None = None) -> np.ndarray:
    """Like random_sets, but each token copies the previous token's set with prob. keep."""
    out = random_sets(rng, n, n_layer, n_expert, k, p)
    for i in range(1, n):
        copy = rng.random(n_layer) < keep
        out[i, copy] = out[i - 1, copy]
    return out


def write_dataset(path: Path, seqs: list[SequenceTrace], model: ModelInfo,
                  shard_rows: int = 1000) -> Path:
    with TraceWriter(path, ManifestInfo(model=model), shard_rows=shard_rows) as w:
        for s in seqs:
            w.write(s)
    return path


def structured_dataset(path: Path, n_seq: int = 12, t: int = 60, seed: int = 0) -> Path:
    """Code sequences are sticky and skewed; prose sequences are uniform and independent."""
    rng = np.random.default_rng(seed)
    model = make_model()
    skew = np.array([8, 4, 2, 2, 1, 1, 1, 1], dtype=np.float64)
    seqs = []
    for i in range(n_seq):
        if i % 2 == 0:
            x = sticky_sets(rng, t, 4, 8, 2, keep=0.7, p=skew / skew.sum())
            seqs.append(make_sequence(x, i, "code"))
        else:
            seqs.append(make_sequence(random_sets(rng, t, 4, 8, 2), i, "prose"))
    return write_dataset(path, seqs, model)
