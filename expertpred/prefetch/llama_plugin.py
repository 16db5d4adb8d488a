"""The prefetch plugin inside llama-cpp-python's high-level ``Llama``.

The high-level ``Llama`` takes no eval callback, so :class:`PrefetchLlama` re-creates the
``Llama``'s context with the plugin's callback installed, right after ``Llama.__init__``,
and feeds the plugin each batch's tokens from ``eval`` (see :mod:`.plugin`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from llama_cpp import Llama

from ..errors import ExpertPredError
from ..gguf.layout import check_file_complete
from ..llama import ggml, runtime
from ..llama.nodes import CapturePlan, trace_plan
from .plugin import PrefetchPlugin
from .plugin_config import PluginConfig
from .plugin_stats import PluginStats

# the keywords PrefetchLlama hands to the plugin (the rest go to Llama)
_PLUGIN_FIELDS = frozenset(f.name for f in fields(PluginConfig))


class PrefetchLlama(Llama):  # type: ignore[misc]
    """A ``llama_cpp.Llama`` whose context runs the prefetch plugin's eval callback.

    ``PrefetchLlama(model_path, config=PluginConfig(...), **llama_kwargs)``: ``config`` goes
    to :class:`PrefetchPlugin`, the rest to ``Llama`` (``verbose`` defaults to False). The
    fields of :class:`PluginConfig` may also be given as keywords (``mode="d0"``); they
    replace the config's.
    ``Llama.__init__`` creates a context without a callback; this class frees it and creates
    the same context (same ``context_params``) with ``cb_eval`` set, attached to a
    persistent ggml threadpool (the callback splits each token's graph into one compute per
    MoE layer; the pool avoids respawning threads for each). ``eval`` tells the plugin which
    tokens each batch holds. ``close()`` frees the context before the plugin.
    With the plugin on, quantized weights stay in the file mapping (no repacked copy; see
    ``llama.runtime.weights_in_file_mapping``) unless ``repack=True``.
    """

    def __init__(self, model_path: str | os.PathLike[str], config: PluginConfig | None = None,
                 *, repack: bool = False, **kwargs: Any) -> None:
        runtime.quiet_logs()
        plugin_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in _PLUGIN_FIELDS}
        llama_kwargs = kwargs
        self.plugin = PrefetchPlugin(model_path, config, **plugin_kw)
        self._pool: ggml.Threadpool | None = None
        self._closed = False
        self.plugin.start()
        try:
            # llama.cpp maps the file: a page past a shortened file's end is a SIGBUS
            check_file_complete(model_path, self.plugin.layout_)
            llama_kwargs.setdefault("verbose", False)
            errors = runtime._LoadErrors()
            try:
                # the plugin reads and evicts weights in the file mapping: no repacked copy
                mapped = (runtime.weights_in_file_mapping() if self.plugin.enabled
                          and not repack else contextlib.nullcontext())
                with errors, mapped:
                    super().__init__(model_path=str(model_path), **llama_kwargs)
            except ValueError as exc:  # llama-cpp-python: "Failed to load model from file"
                why = errors.lines[0] if errors.lines else str(exc)
                raise ExpertPredError(f"{model_path}: llama.cpp failed to load the model "
                                      f"({why})") from None
            if self.plugin.enabled:
                self._swap_context()
                self.plugin.advise_mapping()
                self.plugin.attach_residency()
        except BaseException:
            self.plugin.close()
            raise

    def _swap_context(self) -> None:
        plan = self._probe_plan() if self.plugin.recorder is not None else None
        self._pool = runtime.hook_llama(self, lambda params: self.plugin.install(params, plan))

    def _probe_plan(self) -> CapturePlan:
        """The tracer's plan (the arch's score and weight nodes) from a one-token probe of
        this model's graph: what a recorder needs to record what the tracer would."""
        lay = self.plugin.layout_
        what = f"{self.model_path}: arch {lay.arch!r}"
        params = runtime.context_params(64, 1, int(self.n_threads))
        token = int(self.token_bos()) if 0 <= int(self.token_bos()) < self.n_vocab() else 0
        with ggml.Threadpool(int(self.n_threads)) as pool, runtime.probe_nodes(
                self._model.model, params, pool, token, what) as found:
            return trace_plan(found, lay.moe_layers[0], False, what)

    def eval(self, tokens: Sequence[int]) -> None:
        self.plugin.begin(tokens, self.n_tokens)
        return super().eval(tokens)

    def prefetch_stats(self) -> PluginStats:
        """The plugin's counters and the engine's statistics so far."""
        return self.plugin.stats()

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        super().close()  # frees the context (and the callback's last user) first
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self.plugin.close()

    def __enter__(self) -> PrefetchLlama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        """No work here (``Llama.__del__`` would close): the one lifecycle is ``with`` /
        :meth:`close`; a forgotten instance's llama.cpp objects free themselves."""
