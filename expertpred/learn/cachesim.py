"""Expert-granular cache simulation: how many expert loads a RAM budget of B bytes saves.

The cache holds whole experts (all parts of expert ``e`` of MoE layer ``l``); the access
stream is token-major, layer-minor — the order llama.cpp executes a decode: token ``t``
routes layer 0, loads its ``k`` experts, then layer 1, ... A layer's ``k`` experts are one
step: all of them are needed at once. ``lru``, ``lfu``, ``belady`` and ``learned`` are the
residency policies of :mod:`expertpred.learn.residency_policy`, the same objects the
plugin's residency manager runs inside llama.cpp. Policies:

- ``lru``: evict the least recently used expert;
- ``lfu``: evict the least frequently used (counts over the whole stream; ties → LRU);
- ``belady``: evict the expert whose next use is farthest, bypassing a just-used expert
  when that is it (MIN with bypass: the offline optimum for demand paging when experts have
  equal sizes, a near-optimum otherwise);
- ``learned``: evict the expert a next-use model rates least likely to be used soon
  (bypassing too);
- ``predictive``: LRU, and after each layer ``l`` routes, prefetch the predicted experts of
  the next layers (inserted as most recently used). Prefetches are assumed to arrive in time;
  the simulation counts bytes, not latency.

Hit rate = demand accesses served from cache / demand accesses. Bytes read per token
counts demand misses plus prefetch loads.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ExpertPredError
from .residency_policy import make_policy, simulate_steps

if TYPE_CHECKING:
    from ..predictors.nextuse import NextUseModel

log = logging.getLogger(__name__)


class Policy(StrEnum):
    LRU = "lru"
    LFU = "lfu"
    BELADY = "belady"
    LEARNED = "learned"
    PREDICTIVE = "predictive"


@dataclass(frozen=True)
class CacheResult:
    """Counters of one simulated run."""

    policy: str
    capacity_bytes: int
    n_tokens: int
    accesses: int  # demand accesses (token × layer × k)
    hits: int
    demand_bytes: int  # read on demand misses
    prefetch_bytes: int  # read by prefetches

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else float("nan")

    @property
    def bytes_per_token(self) -> float:
        return (self.demand_bytes + self.prefetch_bytes) / max(self.n_tokens, 1)

    def to_dict(self) -> dict[str, float | int | str]:
        return {"policy": self.policy, "capacity_bytes": self.capacity_bytes,
                "n_tokens": self.n_tokens, "accesses": self.accesses, "hits": self.hits,
                "hit_rate": self.hit_rate, "demand_bytes": self.demand_bytes,
                "prefetch_bytes": self.prefetch_bytes, "bytes_per_token": self.bytes_per_token}


def _sizes(expert_bytes: int | np.ndarray, n_layer: int) -> np.ndarray:
    s = np.broadcast_to(np.asarray(expert_bytes, dtype=np.int64), (n_layer,)).copy()
    if (s <= 0).any():
        raise ExpertPredError(f"expert_bytes {s.tolist()}: expected positive sizes")
    return s


def simulate(experts: np.ndarray, policy: str | Policy, capacity_bytes: int,
             expert_bytes: int | np.ndarray = 1, n_expert: int | None = None,
             prefetch: np.ndarray | None = None, model: NextUseModel | None = None,
             tokens: np.ndarray | None = None) -> CacheResult:
    """Run ``policy`` over the accesses ``experts`` (int (T, L, k), -1 = none).

    ``expert_bytes``: size of one expert, scalar or per layer (L,). ``lru``, ``lfu``,
    ``belady`` and ``learned`` (which needs a next-use ``model``) run the residency policies
    of :mod:`expertpred.learn.residency_policy`, the ones the plugin runs. ``prefetch``
    (predictive only): int (T, L, P) flat keys ``layer * n_expert + expert`` to load after
    layer ``l`` of token ``t`` routes (-1 = none); build it with :func:`prefetch_plan`.

    >>> acc = np.array([[[0], [0]], [[1], [0]], [[0], [0]]])  # T=3, L=2, k=1
    >>> [simulate(acc, "lru", capacity_bytes=c, n_expert=2).hits for c in (1, 2, 3)]
    [0, 2, 3]
    """
    experts = np.asarray(experts)
    if experts.ndim != 3:
        raise ExpertPredError(f"accesses of shape {experts.shape}: expected (T, L, k)")
    t_len, n_l, _ = experts.shape
    n_e = int(n_expert if n_expert is not None else experts.max(initial=0) + 1)
    sizes = _sizes(expert_bytes, n_l)
    try:
        policy = Policy(policy)
    except ValueError:
        raise ExpertPredError(f"cache policy {policy!r}: expected one of "
                              f"{', '.join(p.value for p in Policy)}") from None
    if policy is not Policy.PREDICTIVE:
        pol = make_policy(policy.value, future=experts, model=model)
        c = simulate_steps(experts, pol, capacity_bytes, sizes, n_e, tokens).counters
        return CacheResult(policy.value, capacity_bytes, t_len, c.accesses, c.hits,
                           c.miss_bytes, 0)
    if prefetch is None:
        raise ExpertPredError("predictive cache policy needs a prefetch plan")
    pf = np.asarray(prefetch)
    if pf.shape[:2] != (t_len, n_l):
        raise ExpertPredError(f"prefetch plan shape {pf.shape}, expected ({t_len}, {n_l}, P)")
    lru = PrefetchLRU(capacity_bytes, sizes, n_e)
    lru.feed(experts, pf)
    return lru.result(policy.value)


class PrefetchLRU:
    """The ``predictive`` policy's cache: LRU with prefetch inserts, one access at a time
    (the replay benchmark's order), fed the access stream in pieces in stream order."""

    def __init__(self, capacity_bytes: int, sizes: np.ndarray, n_expert: int) -> None:
        self.capacity_bytes, self.sizes, self.n_expert = capacity_bytes, sizes, n_expert
        self.cache: OrderedDict[int, int] = OrderedDict()  # key -> bytes, LRU first
        self.used = self.hits = self.demand = self.pre = self.accesses = self.n_tokens = 0

    def _load(self, key: int, size: int) -> None:
        while self.cache and self.used + size > self.capacity_bytes:
            _, s = self.cache.popitem(last=False)
            self.used -= s
        if size <= self.capacity_bytes:
            self.cache[key] = size
            self.used += size

    def feed(self, experts: np.ndarray, plan: np.ndarray) -> None:
        """The next tokens' accesses int (T, L, k) and their prefetch plan (T, L, P)."""
        t_len, n_l, _ = experts.shape
        n_e, sizes, cache = self.n_expert, self.sizes, self.cache
        keys = np.where(experts >= 0, np.arange(n_l)[None, :, None] * n_e + experts, -1)
        self.accesses += int((keys >= 0).sum())
        self.n_tokens += t_len
        for t in range(t_len):
            for li in range(n_l):
                for key in keys[t, li].tolist():
                    if key < 0:
                        continue
                    if key in cache:
                        self.hits += 1
                        cache.move_to_end(key)
                    else:
                        self.demand += int(sizes[li])
                        self._load(key, int(sizes[li]))
                for key in plan[t, li].tolist():
                    if key < 0:
                        continue
                    if key in cache:
                        cache.move_to_end(key)
                    else:
                        s = int(sizes[key // n_e])
                        self.pre += s
                        self._load(key, s)

    def result(self, policy: str) -> CacheResult:
        return CacheResult(policy, self.capacity_bytes, self.n_tokens, self.accesses,
                           self.hits, self.demand, self.pre)


def prefetch_plan(predicted: dict[int, np.ndarray], n_expert: int,
                  experts: np.ndarray | None = None, wrap: int = 0) -> np.ndarray:
    """int64 (T, L, P) flat keys to prefetch after each (token, layer).

    ``predicted[d]`` is int (T, L, k_d): at (t, l), the experts predicted for layer
    ``l + d`` (rows with ``l + d >= L`` are ignored; -1 = none). With ``wrap = w > 0`` and
    the true ``experts`` (T, L, k), the last ``w`` layers of token ``t`` also prefetch the
    first layers of token ``t + 1`` guessed as token ``t``'s own choices there (the
    previous-token rule; known online at that point).

    >>> p = prefetch_plan({1: np.array([[[1], [0]]])}, n_expert=2)  # T=1, L=2
    >>> p.tolist()
    [[[3], [-1]]]
    """
    if not predicted:
        raise ExpertPredError("prefetch plan: no predictions")
    arrs = [np.asarray(predicted[d]) for d in sorted(predicted)]
    t_len, n_l = arrs[0].shape[:2]
    parts = []
    for d, a in zip(sorted(predicted), arrs):
        tgt = np.arange(n_l)[None, :, None] + d
        key = np.where((a >= 0) & (tgt < n_l), tgt * n_expert + a, -1)
        parts.append(key)
    if wrap > 0:
        if experts is None:
            raise ExpertPredError("prefetch plan: wrap needs the true experts")
        ex = np.asarray(experts)
        extra = np.full((t_len, n_l, ex.shape[2]), -1, dtype=np.int64)
        for li in range(max(n_l - wrap, 0), n_l):
            j = li + wrap - n_l  # next token's layer guessed from this token's layer j
            if 0 <= j < n_l:
                e = ex[:, j]
                extra[:, li] = np.where(e >= 0, j * n_expert + e, -1)
        parts.append(extra)
    return np.concatenate(parts, axis=2).astype(np.int64)
