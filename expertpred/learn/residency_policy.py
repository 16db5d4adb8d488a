"""Which experts stay resident between uses: one policy implementation for the cache
simulator and for the residency manager inside llama.cpp.

The unit of work is a *step*: layer ``li`` of token ``t`` has routed and uses ``experts``
(all of them at once, as llama.cpp's ``ffn_moe_argsort`` node reveals them).
:meth:`ResidencySet.step` accounts hits and misses, admits the used experts, and, when the
resident bytes exceed the budget, evicts the experts the policy values least. Policies that
``bypass`` may pick one of the experts just used: it is dropped as soon as its matmul is
done (Belady with bypass: admitting is a decision too). ``cachesim`` replays a trace
through :func:`simulate_steps`, the plugin's :class:`~expertpred.prefetch.residency.
ResidencyManager` feeds the same :class:`ResidencySet` from the eval callback: both take
the same decisions for the same stream by construction.

Policies (registry :data:`POLICIES`, filled by ``__init_subclass__``):

- ``kernel``: decides nothing; the kernel's reclaim keeps what it keeps (cannot be
  simulated: it is the behaviour we measure against);
- ``lru``, ``lfu``: classic, never bypass;
- ``learned``: keeps the experts a :class:`~expertpred.predictors.nextuse.NextUseModel`
  rates most likely to be used within its horizon of tokens; bypasses. Two shadow sets
  replay the same steps under the learned ranking and under LRU; while LRU's has missed
  clearly fewer bytes lately (a repeating run whose working set fits), it follows LRU;
- ``belady``: keeps the experts whose next use in a recorded trace of the same greedy run
  is nearest (MIN with bypass; the offline bound); bypasses.

Sizes are bytes (experts of different layers may differ), the budget is bytes.
"""

from __future__ import annotations

import enum
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import numpy as np

from ..errors import ExpertPredError

if TYPE_CHECKING:
    from ..predictors.nextuse import NextUseModel

log = logging.getLogger(__name__)

NEVER = np.iinfo(np.int64).max  # next use of an expert the trace never uses again
# learned's guard: the shadow sets forget missed bytes over about this many tokens, and LRU's
# must have missed at most this share of learned's before the ranking follows LRU. On
# tiny-qwen3moe's greedy run (a loop from ~30 tokens on) at 1 GiB, learned alone read 0.053 /
# 0.033 GiB per token after 64 / 128 tokens and LRU 0.052 / 0.026, guarded 0.046 / 0.023; on
# the shipped test streams the guard changed learned's bytes by 0 to +0.6 % (8 and 0.9: a
# shorter memory or no margin switched on noise, +2-4 % on tiny-olmoe at 25 %; docs/
# residency.md, "A guard against loops")
GUARD_TOKENS = 8
GUARD_MARGIN = 0.9


class ResidencyPolicy(ABC):
    """Values resident experts; :class:`ResidencySet` evicts the lowest valued first.

    Keys are flat ``layer * n_expert + expert`` (MoE-layer index). ``observe`` sees every
    step after its hits were counted, ``prefetched`` every speculative admission.
    """

    name: ClassVar[str]
    registry: ClassVar[dict[str, type[ResidencyPolicy]]] = {}
    bypasses: ClassVar[bool] = False  # may evict an expert of the current step (bypass)
    manages: ClassVar[bool] = True  # False: evicts nothing (the kernel decides)

    def __init_subclass__(cls, *, policy_name: str | None = None, **kw: object) -> None:
        super().__init_subclass__(**kw)
        if policy_name is not None:  # None: a helper, not offered by name
            cls.name = policy_name
            ResidencyPolicy.registry[policy_name] = cls

    def bind(self, n_layer: int, n_expert: int) -> None:
        """Size the policy's state for ``n_layer`` MoE layers of ``n_expert`` experts."""
        self.n_layer_, self.n_expert_ = n_layer, n_expert

    def attach(self, owner: ResidencySet) -> None:
        """``owner`` is the set this policy steers (its sizes and budget); after bind."""

    def observe(self, t: int, li: int, experts: np.ndarray, clock: int) -> None:
        """Layer ``li`` of token ``t`` used ``experts`` (unique ids); ``clock`` = step no."""

    def prefetched(self, t: int, li: int, keys: np.ndarray, clock: int) -> None:
        """``keys`` were admitted speculatively at step ``clock`` (token ``t``, layer ``li``)."""

    def begin_token(self, t: int, token: int) -> None:
        """Token ``t``, of id ``token``, is evaluated next (its first layer has not routed)."""

    @abstractmethod
    def value(self) -> np.ndarray:
        """float64 (n_layer * n_expert,): how much keeping each expert is worth now."""


class KernelPolicy(ResidencyPolicy, policy_name="kernel"):
    """Decide nothing: the kernel's reclaim (about LRU within the memory cgroup) decides."""

    manages = False

    def value(self) -> np.ndarray:
        return np.zeros(self.n_layer_ * self.n_expert_)


class LRUPolicy(ResidencyPolicy, policy_name="lru"):
    """Evict the least recently used expert (ties cannot happen: one clock per step, and
    :class:`ResidencySet` breaks them by admission order within a step)."""

    def value(self) -> np.ndarray:
        return np.zeros(self.n_layer_ * self.n_expert_)  # ResidencySet's recency decides


class LFUPolicy(ResidencyPolicy, policy_name="lfu"):
    """Evict the least frequently used expert, counting every use over the whole run
    (perfect LFU: counts survive eviction); ties go to the least recently used."""

    def bind(self, n_layer: int, n_expert: int) -> None:
        super().bind(n_layer, n_expert)
        self.counts_ = np.zeros(n_layer * n_expert, np.float64)

    def observe(self, t: int, li: int, experts: np.ndarray, clock: int) -> None:
        self.counts_[li * self.n_expert_ + experts] += 1

    def value(self) -> np.ndarray:
        return self.counts_


@dataclass(frozen=True)
class UseIndex:
    """The recorded uses of tokens ``t0 ..`` of a run, by flat key, and what lies beyond."""

    uses: list[np.ndarray]  # per flat key: its use steps (t * n_layer + li), ascending
    later: np.ndarray  # int64 (n_keys,) each key's first use step after these tokens (NEVER)


def use_index(future: np.ndarray, n_layer: int, n_expert: int, t0: int = 0,
              later: np.ndarray | None = None) -> UseIndex:
    """The :class:`UseIndex` of ``future`` (int (T, L, k) experts of tokens ``t0 ..
    t0 + T``, -1 = none); ``later``: first use steps after them (None: never)."""
    f = np.asarray(future)
    if f.ndim != 3 or f.shape[1] != n_layer:
        raise ExpertPredError(f"belady: recorded experts of shape {f.shape}, expected "
                              f"(T, {n_layer}, k)")
    t_idx, l_idx, _ = np.nonzero(f >= 0)
    keys = l_idx.astype(np.int64) * n_expert + f[f >= 0].astype(np.int64)
    steps = (t_idx.astype(np.int64) + t0) * n_layer + l_idx  # step order: token-major
    order = np.lexsort((steps, keys))
    keys, steps = keys[order], steps[order]
    bounds = np.searchsorted(keys, np.arange(n_layer * n_expert + 1))
    if later is None:
        later = np.full(n_layer * n_expert, NEVER, np.int64)
    return UseIndex([steps[bounds[k]:bounds[k + 1]] for k in range(n_layer * n_expert)],
                    later)


class BeladyPolicy(ResidencyPolicy, policy_name="belady"):
    """Evict the expert whose next use is farthest in ``future`` (int (T, L, k) experts of
    the same greedy run by token position, -1 = none); bypass when that is an expert just
    used. Optimal for equal sizes (MIN); a near-optimum when sizes differ by layer.

    ``future=None``: the run arrives in windows (:meth:`window`, before the window's first
    step), each knowing its keys' first use after it, so no window needs the whole run."""

    bypasses = True

    def __init__(self, future: np.ndarray | None) -> None:
        self.future = future

    def bind(self, n_layer: int, n_expert: int) -> None:
        super().bind(n_layer, n_expert)
        self.next_use_ = np.full(n_layer * n_expert, NEVER, np.int64)
        if self.future is not None:
            self.window(use_index(self.future, n_layer, n_expert))

    def window(self, index: UseIndex) -> None:
        """Answer next uses from ``index`` from now on."""
        self._index = index

    def _after(self, keys: np.ndarray, step: int) -> None:
        uses, later = self._index.uses, self._index.later
        for k in keys.tolist():
            u = uses[k]
            i = int(np.searchsorted(u, step, side="right"))
            self.next_use_[k] = u[i] if i < len(u) else later[k]

    def observe(self, t: int, li: int, experts: np.ndarray, clock: int) -> None:
        self._after(li * self.n_expert_ + experts, t * self.n_layer_ + li)

    def prefetched(self, t: int, li: int, keys: np.ndarray, clock: int) -> None:
        self._after(keys, t * self.n_layer_ + li)

    def value(self) -> np.ndarray:
        return -self.next_use_.astype(np.float64)


class LearnedPolicy(ResidencyPolicy, policy_name="learned"):
    """Evict the expert with the lowest predicted probability of use within the model's
    horizon (a :class:`~expertpred.predictors.nextuse.NextUseModel`); bypass when that is
    an expert just used. A prefetched expert is valued 1 until its layer routes again (the
    prefetch predictor already bet on it).

    ``guard``: shadow sets under the same budget replay every step with this ranking and
    with LRU; while LRU's missed at most ``GUARD_MARGIN`` of the bytes over the last
    ``GUARD_TOKENS`` tokens, the ranking is LRU's. Without an owning set (a policy used
    on its own) there is no guard."""

    bypasses = True

    def __init__(self, model: NextUseModel, distance: bool = True, guard: bool = True) -> None:
        self.model = model
        self.distance = distance
        self.guard = guard

    def bind(self, n_layer: int, n_expert: int) -> None:
        super().bind(n_layer, n_expert)
        if (self.model.n_layer, self.model.n_expert) != (n_layer, n_expert):
            raise ExpertPredError(f"learned residency: next-use model for "
                                  f"{self.model.n_layer} x {self.model.n_expert} experts, "
                                  f"expected {n_layer} x {n_expert}")
        self.state_ = self.model.online()
        self.boost_ = np.zeros(n_layer * n_expert, np.float64)
        self.layer_ = n_layer - 1
        self.owner_: ResidencySet | None = None
        self.shadows_: tuple[ResidencySet, ResidencySet] | None = None
        self.missed_ = np.zeros(2)  # decayed bytes the shadows missed: (learned, LRU)

    def attach(self, owner: ResidencySet) -> None:
        self.owner_ = owner if self.guard else None

    def _shadow(self) -> tuple[ResidencySet, ResidencySet] | None:
        """The shadow sets, made at the first step: the owner's budget is final by then."""
        if self.shadows_ is None and self.owner_ is not None:
            o = self.owner_
            self.shadows_ = tuple(
                ResidencySet(pol, self.n_layer_, self.n_expert_,
                             o.sizes.reshape(self.n_layer_, self.n_expert_), o.budget_bytes,
                             layer_budgets=o.layer_budgets)
                for pol in (_Ranking(self), LRUPolicy()))
        return self.shadows_

    @property
    def follows_lru(self) -> bool:
        """Whether the ranking is LRU's now (the guard's decision)."""
        return bool(self.missed_[1] < GUARD_MARGIN * self.missed_[0])

    def observe(self, t: int, li: int, experts: np.ndarray, clock: int) -> None:
        self.state_.observe(li, experts)
        self.layer_ = li
        e = self.n_expert_
        self.boost_[li * e:(li + 1) * e] = 0.0
        if (shadows := self._shadow()) is not None:
            decay = 1.0 - 1.0 / (self.n_layer_ * GUARD_TOKENS)
            for i, rs in enumerate(shadows):
                before = rs.counters.miss_bytes
                rs.step(t, li, experts)
                self.missed_[i] = decay * self.missed_[i] + (rs.counters.miss_bytes - before)

    def prefetched(self, t: int, li: int, keys: np.ndarray, clock: int) -> None:
        self.boost_[keys] = 1.0
        for rs in self._shadow() or ():
            rs.prefetch(t, li, keys)

    def begin_token(self, t: int, token: int) -> None:
        self.state_.begin_token(token)

    def value(self) -> np.ndarray:
        if self.follows_lru:
            return np.zeros(self.n_layer_ * self.n_expert_)  # ResidencySet's recency decides
        return self.ranking()

    def ranking(self) -> np.ndarray:
        """The learned ranking itself (the guard's first shadow keeps by it)."""
        n_l = self.n_layer_
        steps = (np.arange(n_l) - self.layer_ - 1) % n_l + 1  # to each layer's next routing
        boost = self.boost_.reshape(n_l, self.n_expert_)
        if self.distance and self.model.has_reuse:
            # the regressed reuse distance in tokens (a prefetched expert: its next routing)
            d = np.where(boost > 0, 1.0, np.exp2(np.clip(self.state_.log_dist, 0.0, None)))
            return -(steps[:, None] + n_l * (d - 1.0)).reshape(-1)
        p = np.maximum(self.state_.prob, boost)
        if not self.distance:
            return p.reshape(-1)
        h = self.model.config.horizon
        q = 1.0 - np.power(np.clip(1.0 - p, 0.0, 1.0), 1.0 / h)  # per-token use probability
        if not self.model.uses_tokens:
            return -(steps[:, None] + n_l * (1.0 / np.maximum(q, 1e-9) - 1.0)).reshape(-1)
        # p knows the next token's id (after the boundary): used by it with q, else back
        # at the routed rate q0 per later token (expected 1/q0 more tokens)
        p0 = np.maximum(self.state_.prob_routed, self.boost_.reshape(p.shape))
        q0 = 1.0 - np.power(np.clip(1.0 - p0, 0.0, 1.0), 1.0 / h)
        return -(steps[:, None] + n_l * (1.0 - q) / np.maximum(q0, 1e-9)).reshape(-1)


class _Ranking(ResidencyPolicy):
    """The learned ranking of a :class:`LearnedPolicy` for its shadow set: that policy's
    state already saw every step."""

    bypasses = True

    def __init__(self, learned: LearnedPolicy) -> None:
        self.learned = learned

    def value(self) -> np.ndarray:
        return self.learned.ranking()


POLICIES: dict[str, type[ResidencyPolicy]] = ResidencyPolicy.registry


@dataclass(frozen=True)
class StepDecision:
    """What one step decided; the manager executes it on the model's mappings."""

    hits: int  # experts of this step resident before it
    misses: int  # experts of this step that had to be read
    miss_bytes: int  # their bytes
    evict: tuple[int, ...]  # keys to evict now (none of them is used by this step)
    bypass: tuple[int, ...]  # keys of this step to evict once their matmuls are done


@dataclass
class ResidencyCounters:
    """What a :class:`ResidencySet` decided so far (bookkeeping, not page-cache truth)."""

    steps: int = 0  # routed layer steps seen
    accesses: int = 0  # expert uses (unique per step)
    hits: int = 0  # uses of an expert resident by the bookkeeping
    miss_bytes: int = 0  # bytes of uses that were not (what the disk must deliver)
    prefetch_admits: int = 0  # experts admitted by a prefetch before their use
    prefetch_bytes: int = 0  # their bytes
    evictions: int = 0  # experts evicted (not counting bypasses)
    evicted_bytes: int = 0  # their bytes
    bypasses: int = 0  # just-used (or just-prefetched) experts dropped at once
    bypassed_bytes: int = 0  # their bytes
    resident_bytes: int = 0  # resident by the bookkeeping after the last step
    peak_resident_bytes: int = 0  # the most the bookkeeping ever held after a step
    lost: int = 0  # experts the page cache no longer held although kept (the kernel's reclaim)
    lost_bytes: int = 0  # their bytes


def expert_sizes(sizes: int | np.ndarray, n_layer: int, n_expert: int) -> np.ndarray:
    """int64 (n_layer * n_expert,) bytes per flat key from a scalar, (L,) or (L, E)."""
    s = np.asarray(sizes, dtype=np.int64)
    if s.ndim <= 1:
        s = np.broadcast_to(s.reshape(-1, 1) if s.ndim == 1 else s, (n_layer, n_expert))
    if s.shape != (n_layer, n_expert) or (s <= 0).any():
        raise ExpertPredError(f"expert sizes of shape {s.shape}: expected positive bytes, "
                              f"scalar, ({n_layer},) or ({n_layer}, {n_expert})")
    return np.ascontiguousarray(s, dtype=np.int64).reshape(-1)


class ResidencySet:
    """The resident experts under ``budget_bytes``, steered by ``policy``.

    Not thread-safe: one owner calls :meth:`step` / :meth:`prefetch` in execution order.
    """

    def __init__(self, policy: ResidencyPolicy, n_layer: int, n_expert: int,
                 sizes: int | np.ndarray, budget_bytes: int,
                 layer_budgets: np.ndarray | None = None) -> None:
        if budget_bytes < 0:
            raise ExpertPredError(f"residency budget {budget_bytes} bytes: expected >= 0")
        self.policy = policy
        self.n_layer, self.n_expert = n_layer, n_expert
        self.sizes = expert_sizes(sizes, n_layer, n_expert)
        self.budget_bytes = int(budget_bytes)
        # per-layer budgets (bytes, (L,)): each layer keeps at most its own share (colibri's
        # "32 of 64 experts per layer"); None = one budget shared by all layers
        self.layer_budgets = None
        if layer_budgets is not None:
            lb = np.asarray(layer_budgets, np.int64)
            if lb.shape != (n_layer,) or (lb < 0).any():
                raise ExpertPredError(f"per-layer budgets of shape {lb.shape}: expected "
                                      f"({n_layer},) bytes >= 0")
            self.layer_budgets = lb
            self.budget_bytes = int(lb.sum())
        self.layer_bytes = np.zeros(n_layer, np.int64)  # resident bytes per layer
        policy.bind(n_layer, n_expert)
        policy.attach(self)
        self.resident = np.zeros(n_layer * n_expert, bool)
        self.last_use = np.full(n_layer * n_expert, -1, np.int64)  # clock of last use/admit
        self.counters = ResidencyCounters()
        self.clock = 0  # one tick per step or prefetch; ties inside a tick: key order
        # keys of the latest step: their matmuls may still run while a prefetch for the next
        # layer is admitted, so a prefetch that evicts one defers it like a bypass
        self._inflight = np.zeros(0, np.int64)

    @property
    def used_bytes(self) -> int:
        return self.counters.resident_bytes

    def step(self, t: int, li: int, experts: Iterable[int]) -> StepDecision:
        """Layer ``li`` of token ``t`` uses ``experts``: count, admit, decide evictions."""
        ex = np.unique(np.asarray(list(experts) if not isinstance(experts, np.ndarray)
                                  else experts, dtype=np.int64))
        ex = ex[ex >= 0]
        keys = li * self.n_expert + ex
        c = self.counters
        hit = self.resident[keys]
        miss_bytes = int(self.sizes[keys[~hit]].sum())
        c.steps += 1
        c.accesses += len(keys)
        c.hits += int(hit.sum())
        c.miss_bytes += miss_bytes
        self.policy.observe(t, li, ex, self.clock)
        evict, bypass = self._admit(keys)
        self._inflight = keys
        return StepDecision(int(hit.sum()), int((~hit).sum()), miss_bytes, evict, bypass)

    def begin_token(self, t: int, token: int) -> None:
        """Token ``t`` of id ``token`` is evaluated next; it decides nothing by itself."""
        self.policy.begin_token(t, int(token))

    def prefetch(self, t: int, li: int, keys: Iterable[int]) -> StepDecision:
        """Speculatively admit flat ``keys`` at token ``t``, layer ``li`` (already routed).
        ``evict``: now (prefetched keys dropped at once among them); ``bypass``: keys of
        layer ``li``'s step, to evict after its matmuls (at the next step)."""
        k = np.unique(np.asarray(list(keys), dtype=np.int64))
        k = k[(k >= 0) & ~self.resident[k]] if k.size else k
        if not self.policy.manages or not k.size:
            return StepDecision(0, 0, 0, (), ())
        self.counters.prefetch_admits += len(k)
        self.counters.prefetch_bytes += int(self.sizes[k].sum())
        self.policy.prefetched(t, li, k, self.clock)
        evict, bypass = self._admit(k, self._inflight)
        return StepDecision(0, 0, 0, evict, bypass)

    def adopt(self, keys: Iterable[int]) -> tuple[int, ...]:
        """Account flat ``keys`` found resident (the page cache when the manager attaches);
        returns the keys evicted to get back within the budget."""
        k = np.unique(np.asarray(list(keys), dtype=np.int64))
        if not self.policy.manages or not k.size:
            return ()
        k = k[~self.resident[k]]
        self.resident[k] = True
        self.last_use[k] = self.clock
        self.clock += 1
        self.counters.resident_bytes += int(self.sizes[k].sum())
        np.add.at(self.layer_bytes, k // self.n_expert, self.sizes[k])
        evict, _ = self._trim(np.zeros_like(self.resident))
        return evict

    def lose(self, keys: Iterable[int]) -> None:
        """Flat ``keys`` kept resident are gone from the page cache all the same (the
        kernel's reclaim took them; the plugin's manager finds out with mincore): the
        bookkeeping stops counting them, so their room is the policy's again and their
        next use counts as the read it is."""
        k = np.unique(np.asarray(list(keys), dtype=np.int64))
        k = k[self.resident[k]] if k.size else k
        if not k.size:
            return
        self.resident[k] = False
        size = int(self.sizes[k].sum())
        self.counters.resident_bytes -= size
        np.subtract.at(self.layer_bytes, k // self.n_expert, self.sizes[k])
        self.counters.lost += len(k)
        self.counters.lost_bytes += size

    def _admit(self, keys: np.ndarray, inflight: np.ndarray | None = None,
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Admit ``keys`` and trim; victims among ``keys`` and ``inflight`` are bypasses,
        deferred (the second list) if in ``inflight``, else if ``inflight`` is None."""
        if not self.policy.manages:
            self.clock += 1
            return (), ()
        new = keys[~self.resident[keys]]
        self.resident[keys] = True
        self.last_use[keys] = self.clock
        self.clock += 1
        self.counters.resident_bytes += int(self.sizes[new].sum())
        np.add.at(self.layer_bytes, new // self.n_expert, self.sizes[new])
        current = np.zeros_like(self.resident)
        current[keys] = True
        if inflight is None:
            return self._trim(current, current)
        defer = np.zeros_like(self.resident)
        defer[inflight] = True
        return self._trim(current | defer, defer)

    def _trim(self, current: np.ndarray, defer: np.ndarray | None = None,
              ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Evict by policy until within the budget; ``current`` keys evicted are bypasses,
        returned second if in ``defer`` (evict after their matmuls), else first (now)."""
        c = self.counters
        evict: list[int] = []
        bypass: list[int] = []
        if self._over().any():
            for k in self._victims(current):
                over = self._over()
                if not over.any():
                    break
                if self.layer_budgets is not None and not over[k // self.n_expert]:
                    continue  # its layer is within its own budget
                self.resident[k] = False
                size = int(self.sizes[k])
                c.resident_bytes -= size
                self.layer_bytes[k // self.n_expert] -= size
                if current[k]:
                    (bypass if defer is not None and defer[k] else evict).append(k)
                    c.bypasses += 1
                    c.bypassed_bytes += size
                else:
                    evict.append(k)
                    c.evictions += 1
                    c.evicted_bytes += size
        c.peak_resident_bytes = max(c.peak_resident_bytes, c.resident_bytes)
        return tuple(evict), tuple(bypass)

    def _over(self) -> np.ndarray:
        """bool (L,) layers over their budget, or (1,) the set over the shared budget."""
        if self.layer_budgets is None:
            return np.array([self.counters.resident_bytes > self.budget_bytes])
        return self.layer_bytes > self.layer_budgets

    def _victims(self, current: np.ndarray) -> list[int]:
        """Resident keys in eviction order: lowest value first, then least recent, then
        lowest key. Policies that do not bypass offer this step's keys last."""
        cand = np.flatnonzero(self.resident)
        val = self.policy.value()[cand]
        rec = self.last_use[cand]
        if self.policy.bypasses:
            order = np.lexsort((cand, rec, val))
        else:
            order = np.lexsort((cand, rec, val, current[cand]))
        return cand[order].tolist()


def make_policy(name: str, *, future: np.ndarray | None = None,
                model: NextUseModel | None = None) -> ResidencyPolicy:
    """A policy by name; ``belady`` needs ``future`` (recorded experts), ``learned`` a
    next-use ``model``."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ExpertPredError(f"residency policy {name!r}: expected one of "
                              f"{', '.join(sorted(POLICIES))}")
    if cls is BeladyPolicy:
        if future is None:
            raise ExpertPredError("residency policy 'belady' needs a recorded trace of the "
                                  "same greedy run")
        return BeladyPolicy(future)
    if cls is LearnedPolicy:
        if model is None:
            raise ExpertPredError("residency policy 'learned' needs a next-use model")
        return LearnedPolicy(model)
    return cls()


class Event(enum.IntEnum):
    """Kinds of :class:`Record`."""

    STEP = 0  # layer `li` of token `t` used `experts` (expert ids)
    PREFETCH = 1  # flat keys read ahead of use while layer `li` of token `t` computed
    ADOPT = 2  # flat keys found resident when the manager attached
    TOKEN = 3  # token `t`, of id `experts[0]`, is evaluated next (before its first layer)
    LOST = 4  # flat keys kept resident that mincore found gone (the kernel reclaimed them)


class Record(NamedTuple):
    """One event of a residency run, as the plugin's manager applies it and a replay
    feeds it."""

    event: Event
    t: int  # token position (-1 for ADOPT)
    li: int  # MoE layer index of the step
    experts: tuple[int, ...]  # expert ids (STEP) or flat keys (PREFETCH, ADOPT)


def apply(rs: ResidencySet, r: Record) -> None:
    """Feed one record to ``rs`` (what the plugin's manager does with it)."""
    if r.event is Event.STEP:
        rs.step(r.t, r.li, r.experts)
    elif r.event is Event.PREFETCH:
        rs.prefetch(r.t, r.li, r.experts)
    elif r.event is Event.TOKEN:
        rs.begin_token(r.t, r.experts[0])
    elif r.event is Event.LOST:
        rs.lose(r.experts)
    else:
        rs.adopt(r.experts)


def replay(records: Iterable[Record], policy: ResidencyPolicy, budget_bytes: int,
           n_layer: int, n_expert: int, sizes: int | np.ndarray,
           layer_budgets: np.ndarray | None = None) -> ResidencySet:
    """Feed ``records`` in order to a fresh :class:`ResidencySet`; the plugin's manager
    feeds its own set the same way, so both decide alike by construction."""
    rs = ResidencySet(policy, n_layer, n_expert, sizes, budget_bytes, layer_budgets)
    for r in records:
        apply(rs, r)
    return rs


def step_records(experts: np.ndarray, tokens: np.ndarray | None = None,
                 t0: int = 0) -> Iterator[Record]:
    """Records of int (T, L, k) ``experts`` (-1 = none) as tokens ``t0 .. t0 + T``: each
    token's id first (when ``tokens`` (T,) are given, as the plugin tells them), then its
    layers' steps."""
    t_len, n_l, _ = experts.shape
    rows = experts.astype(np.int64).tolist()
    ids = None if tokens is None else np.asarray(tokens, np.int64).tolist()
    if ids is not None and len(ids) != t_len:
        raise ExpertPredError(f"{len(ids)} token ids for {t_len} tokens of accesses")
    for t in range(t_len):
        if ids is not None:
            yield Record(Event.TOKEN, t0 + t, -1, (ids[t],))
        for li in range(n_l):
            yield Record(Event.STEP, t0 + t, li, tuple(e for e in rows[t][li] if e >= 0))


def simulate_steps(experts: np.ndarray, policy: ResidencyPolicy, budget_bytes: int,
                   sizes: int | np.ndarray, n_expert: int,
                   tokens: np.ndarray | None = None,
                   layer_budgets: np.ndarray | None = None) -> ResidencySet:
    """Replay int (T, L, k) ``experts`` (-1 = none) step by step; returns the set (its
    ``counters`` hold the outcome). Token ``t`` of the replay is row ``t``; ``tokens``
    (T,), when given, are told to the policy at each token boundary, as the plugin does;
    ``layer_budgets`` (L,) bytes: one budget per layer instead of ``budget_bytes``."""
    experts = np.asarray(experts)
    if experts.ndim != 3:
        raise ExpertPredError(f"accesses of shape {experts.shape}: expected (T, L, k)")
    if not policy.manages:
        raise ExpertPredError(f"residency policy {policy.name!r} cannot be simulated: the "
                              "kernel's reclaim decides; measure it end to end")
    n_l = experts.shape[1]
    return replay(step_records(experts, tokens), policy, budget_bytes, n_l, n_expert, sizes,
                  layer_budgets)
