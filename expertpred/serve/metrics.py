"""``/metrics`` of ``expertpred serve``: Prometheus text read from the live statistics.

Nothing is counted twice: :class:`ServeCollector` is a prometheus-client custom collector
that, at scrape time, reads the serving counters (:class:`ServeStats`, kept by the served
model), the plugin's and the engine's statistics (``PrefetchPlugin.stats()``), the trace
sink's counters, the residency statistics when the plugin has them, and the process's
I/O counters (``/proc/self/io``). Names start with ``expertpred_``; counters end in
``_total`` as the exposition format wants.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "expertpred"
# Engine counters under the names people look for; the other engine counters keep theirs.
# ("used" is the older name of "hits": either engine version exports prefetch_hits)
_ENGINE_NAMES = {"hits": "prefetch_hits", "used": "prefetch_hits", "late": "prefetch_late",
                 "misses": "prefetch_misses", "bytes_read": "prefetch_bytes",
                 "evicted": "prefetch_evicted"}
_ENGINE_HELP = {
    "hits": "expert uses served by a prefetch that completed in time",
    "used": "expert uses served by a prefetch that completed in time",
    "late": "expert uses whose prefetch was still queued or in flight",
    "misses": "expert uses never requested for prefetch",
    "bytes_read": "bytes prefetched (read, or advised for fadvise/madvise)",
    "evicted": "resident prefetches evicted by the buffer manager",
}


@dataclass(frozen=True)
class ServeSnapshot:
    """The serving counters at one instant."""

    admitted: int  # completion requests that passed the checks (queued or served since)
    requests: int  # completions finished (streamed or not, cut short or not)
    in_flight: int  # requests being generated now (0 or 1: one context)
    queued: int  # admitted completion requests waiting for the context
    prompt_tokens: int  # prompt tokens of finished requests
    generated_tokens: int  # tokens sampled
    decode_seconds: float  # first to last sampled token, summed over requests
    last_tokens_per_second: float  # decode rate of the last request with >= 2 tokens


class ServeStats:
    """Serving counters updated by the served model (inference thread), read by scrapes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests = self._in_flight = self._prompt = self._generated = 0
        self._admitted = 0  # checked completion requests not yet answered in full
        self._admitted_total = 0
        self._decode_s = 0.0
        self._last_tps = 0.0

    def admitted(self, delta: int) -> None:
        """A completion request passed the checks (+1) or its response ended (-1)."""
        with self._lock:
            self._admitted += delta
            self._admitted_total += max(0, delta)

    def started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def token(self) -> None:
        with self._lock:
            self._generated += 1

    def finished(self, n_prompt: int, n_generated: int, decode_seconds: float) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - 1)
            self._requests += 1
            self._prompt += n_prompt
            self._decode_s += decode_seconds
            if n_generated >= 2 and decode_seconds > 0:
                self._last_tps = (n_generated - 1) / decode_seconds

    def snapshot(self) -> ServeSnapshot:
        with self._lock:
            queued = max(0, self._admitted - self._in_flight)
            return ServeSnapshot(self._admitted_total, self._requests, self._in_flight, queued,
                                 self._prompt, self._generated, self._decode_s,
                                 self._last_tps)


def process_io() -> dict[str, int]:
    """This process's I/O counters (``/proc/self/io``: rchar, read_bytes, ...); {} if absent.
    ``read_bytes`` counts bytes this process caused to be read from storage, page faults on
    llama.cpp's mapping of the model and the prefetch engine's reads included."""
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f if ":" in line)}
    except (OSError, ValueError):
        return {}


def _numeric_fields(obj: Any) -> Iterator[tuple[str, float]]:
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f.name, float(v)


def _residency_is_gauge(name: str) -> bool:
    """Residency fields that are levels, not event counts."""
    return any(w in name for w in ("resident", "budget", "capacity", "bytes_now", "limit"))


class ServeCollector:
    """prometheus-client collector over the served model's statistics (see module doc)."""

    def __init__(self, serve_stats: ServeStats, plugin_stats: Callable[[], Any],
                 sink_counters: Callable[[], Any] | None = None) -> None:
        self.serve_stats = serve_stats
        self.plugin_stats = plugin_stats
        self.sink_counters = sink_counters

    def describe(self) -> list:
        return []  # dynamic: residency fields appear when the plugin has them

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        s = self.serve_stats.snapshot()
        yield counter("requests_admitted", "completion requests that passed the checks",
                      s.admitted)
        yield counter("requests", "completion requests finished", s.requests)
        yield gauge("requests_in_flight", "requests being generated", s.in_flight)
        yield gauge("requests_queued", "requests waiting for the context", s.queued)
        yield counter("prompt_tokens", "prompt tokens of finished requests", s.prompt_tokens)
        yield counter("generated_tokens", "tokens generated (sampled)", s.generated_tokens)
        yield counter("decode_seconds", "seconds from first to last sampled token, summed",
                      s.decode_seconds)
        yield gauge("tokens_per_second", "decode tokens/s of the last request",
                    s.last_tokens_per_second)
        io = process_io()
        if io:
            yield counter("process_read_bytes", "bytes this process read from storage "
                          "(/proc/self/io read_bytes: model faults and prefetch reads)",
                          io.get("read_bytes", 0))
            yield counter("process_rchar", "bytes this process read through syscalls "
                          "(/proc/self/io rchar)", io.get("rchar", 0))
        yield from self._plugin_metrics(counter, gauge)
        if self.sink_counters is not None:
            for name, v in _numeric_fields(self.sink_counters()):
                yield counter(f"trace_{name}", f"served trace sink: {name}", v)

    def _plugin_metrics(self, counter: Callable, gauge: Callable) -> Iterator[Any]:
        t0 = time.perf_counter()
        st = self.plugin_stats()
        log.debug("plugin stats read in %.1f ms", 1e3 * (time.perf_counter() - t0))
        for name, v in _numeric_fields(st.counters):
            yield counter(f"plugin_{name}", f"PrefetchPlugin counter {name}", v)
        eng = st.engine
        if eng is not None:
            for name, v in _numeric_fields(eng.counters):
                yield counter(_ENGINE_NAMES.get(name, f"engine_{name}"),
                              _ENGINE_HELP.get(name, f"PrefetchEngine counter {name}"), v)
            yield gauge("prefetch_enabled", "1 while the prefetch engine is enabled",
                        float(eng.enabled))
            yield gauge("prefetch_hit_rate", "share of expert uses that were prefetch hits",
                        eng.hit_rate)
        residency = getattr(st, "residency", None) or getattr(eng, "residency", None)
        fields = [*_numeric_fields(residency),
                  *_numeric_fields(getattr(residency, "counters", None))]
        for name, v in fields:
            if _residency_is_gauge(name):
                yield gauge(f"residency_{name}", f"residency {name}", v)
            else:
                yield counter(f"residency_{name}", f"residency {name}", v)
