"""The one llama.cpp eval callback: routing of every MoE layer into numpy buffers.

Both the tracer (``trace.llama_tracer``) and the prefetch plugin (``prefetch.plugin``) hook
llama.cpp through a :class:`RoutingHook`. It answers the scheduler's "do you want this
node?" (ask) and copies the routing of the nodes its :class:`~.nodes.CapturePlan` names when
they are ready (observe), with ``ggml_backend_tensor_get`` straight into buffers laid out
(layer, token, ·):

* the callback itself is C (``ggml.CAPTURE_C``; a Python twin is the fallback without a C
  compiler, or with ``EXPERTPRED_PY_CALLBACK=1``): the ~50 nodes asked per layer never enter
  Python;
* ``notify(li, row, n)`` — Python, once per MoE layer and ubatch — runs right after layer
  ``li``'s rows ``row .. row+n`` are in the buffers and before its expert matmuls: the
  plugin's entry point. The tracer passes none;
* ``ring=True`` writes every ubatch from row 0 (streaming, for unbounded generation: the
  plugin), and an error inside the callback lets the compute go on; else rows accumulate per
  layer until :meth:`reset` (a whole sequence: the tracer) and an error stops the compute;
* :meth:`stop_after` ends the compute after a layer's rows are committed (returning false
  from the callback aborts the graph; the KV cache is complete by then).

The score node must be read when ready (ggml's allocator lets the softmax overwrite the
logits in place); the argsort and the router input are read at the weights node through
pointers remembered when asked: both stay alive until the expert matmuls that use them.
Keep the hook alive as long as any context it is installed in.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import ExpertPredError
from . import ggml
from .nodes import CapturePlan, Want

log = logging.getLogger(__name__)

Notify = Callable[[int, int, int], None]  # (MoE row li, first token row, n rows)


class _Buffers:
    """Reused capture buffers, laid out (layer, token, ·) so one ubatch is one copy."""

    def __init__(self, n_moe: int, n_expert: int, k: int, n_embd: int, n_rows: int,
                 hidden: bool) -> None:
        self.shape = (n_moe, n_expert, k, n_embd)
        self.hidden_on = hidden
        self.cap = 0
        self.scratch_i32 = np.empty((n_rows, n_expert), dtype=np.int32)
        self.scratch_f32 = np.empty((n_rows, n_embd), dtype=np.float32) if hidden else None
        self.ensure(max(256, n_rows))

    def ensure(self, cap: int) -> None:
        if cap <= self.cap:
            return
        n_moe, n_expert, k, n_embd = self.shape
        self.cap = max(cap, 2 * self.cap)
        self.scores = np.zeros((n_moe, self.cap, n_expert), dtype=np.float32)
        self.experts = np.zeros((n_moe, self.cap, k), dtype=np.int32)
        self.weights = np.zeros((n_moe, self.cap, k), dtype=np.float32)
        self.hidden = (np.zeros((n_moe, self.cap, n_embd), dtype=np.float16)
                       if self.hidden_on else None)


class RoutingHook:
    """The eval callback and its buffers; see the module docstring.

    ``moe_layers``: GGUF block of each MoE layer; ``n_rows``: the largest ubatch (scratch
    rows; with ``ring`` also the buffer rows). After each ``llama_decode`` call
    :meth:`raise_errors`. Read ``scores`` / ``experts`` / ``weights`` / ``hidden``
    ((L, rows, ·) numpy arrays) and ``rows`` (tokens captured per layer).
    """

    def __init__(self, *, n_layer: int, moe_layers: Sequence[int], n_expert: int, k: int,
                 n_embd: int, n_rows: int, plan: CapturePlan, ring: bool = False,
                 notify: Notify | None = None) -> None:
        import llama_cpp

        self.moe_layers = tuple(moe_layers)
        self.n_expert, self.k, self.n_embd = n_expert, k, n_embd
        self.plan = plan
        self.ring = ring
        n_moe = len(self.moe_layers)
        hidden = any(f & Want.ROUTER_IN for f in plan.flags.values())
        self._buf = _Buffers(n_moe, n_expert, k, n_embd, n_rows, hidden)
        self.rows = np.zeros(n_moe, dtype=np.int64)  # tokens captured per MoE layer
        self._notify = notify
        self._stop_after = -1
        self._error: BaseException | None = None
        self._lib = ggml.ggml_lib()
        self._layer_li = np.full(max(n_layer, 1), -1, dtype=np.int32)
        self._layer_li[list(self.moe_layers)] = np.arange(n_moe)
        self._ptrs = np.zeros((2, n_moe), dtype=np.uint64)  # argsort, router input
        clib = ggml.capture_lib()
        # ctypes objects llama.cpp keeps pointers to: they live as long as this hook.
        self._notify_c = ggml.NOTIFY_FN(self._on_commit) if notify is not None else None
        self._state: ggml.CaptureState | None = None
        if clib is not None:
            self._state = self._c_state(n_layer, n_rows)
            self.cb = ctypes.cast(clib.ep_callback, llama_cpp.ggml_backend_sched_eval_callback)
            self.cb_data: Any = ctypes.cast(ctypes.pointer(self._state), ctypes.c_void_p)
        else:
            self._want = plan.by_name(self.moe_layers)
            self.cb = llama_cpp.ggml_backend_sched_eval_callback(self._callback)
            self.cb_data = None
        self.callback_ = "C" if self._state is not None else "python"

    # --- buffers --------------------------------------------------------------------------
    @property
    def scores(self) -> np.ndarray:
        return self._buf.scores

    @property
    def experts(self) -> np.ndarray:
        return self._buf.experts

    @property
    def weights(self) -> np.ndarray:
        return self._buf.weights

    @property
    def hidden(self) -> np.ndarray | None:
        return self._buf.hidden

    def reserve(self, n_tokens: int) -> None:
        """Room for ``n_tokens`` rows per layer (keeps captured rows only if none grew)."""
        self._buf.ensure(n_tokens)
        self._sync()

    def reset(self) -> None:
        """Start a new sequence: rows are written from 0 again."""
        self.rows[:] = 0

    def stop_after(self, li: int) -> None:
        """End the compute right after MoE row ``li`` is committed (-1: never)."""
        self._stop_after = li
        if self._state is not None:
            self._state.stop_after = li

    def install(self, params: Any) -> None:
        """Set ``cb_eval`` on ``llama_context_params`` (before the context is created)."""
        params.cb_eval = self.cb
        params.cb_eval_user_data = self.cb_data

    def raise_errors(self) -> None:
        """Raise what went wrong inside the callback during the last decode, if anything."""
        st = self._state
        if st is not None and st.error:
            code, st.error = int(st.error), 0
            raise RuntimeError(f"C capture callback failed: {ggml.CAPTURE_ERRORS.get(code, code)}")
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"eval callback failed: {err!r}") from err

    def close(self) -> None:
        """Nothing native to free (the buffers are numpy); kept for the one lifecycle."""
        self._notify = None

    def __enter__(self) -> RoutingHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the C callback's state ----------------------------------------------------------
    def _c_state(self, n_layer: int, n_rows: int) -> ggml.CaptureState:
        st = ggml.CaptureState()
        st.n_layer = n_layer
        st.n_expert, st.k, st.n_embd = self.n_expert, self.k, self.n_embd
        st.scratch_rows = n_rows
        st.tensor_get = ggml.fn_address(self._lib.tensor_get)
        st.to_fp16 = ggml.fn_address(self._lib.lib.ggml_fp32_to_fp16_row)
        for i, f in enumerate(self.plan.c_flags()):
            st.flags[i] = f
        st.layer_li = self._layer_li.ctypes.data
        st.rows = self.rows.ctypes.data
        st.argsort_ptr = self._ptrs[0].ctypes.data
        st.router_in_ptr = self._ptrs[1].ctypes.data
        b = self._buf
        st.scratch_i32 = b.scratch_i32.ctypes.data
        st.scratch_f32 = b.scratch_f32.ctypes.data if b.scratch_f32 is not None else None
        st.notify = ggml.fn_address(self._notify_c) if self._notify_c is not None else None
        st.ring = int(self.ring)
        self._c_sync(st)
        return st

    def _sync(self) -> None:
        if self._state is not None:
            self._c_sync(self._state)

    def _c_sync(self, st: ggml.CaptureState) -> None:
        b = self._buf
        st.cap = b.cap
        st.scores, st.experts = b.scores.ctypes.data, b.experts.ctypes.data
        st.weights = b.weights.ctypes.data
        st.hidden = b.hidden.ctypes.data if b.hidden is not None else None

    def _on_commit(self, li: int, row: int, n: int) -> None:
        """C -> Python: layer ``li`` committed. The owner's ``notify`` must not raise."""
        if self._notify is not None:
            self._notify(li, row, n)

    # --- the Python twin of ep_callback (hot path when no C compiler) ---------------------
    def _callback(self, t: int, ask: bool, user_data: int | None) -> bool:
        try:
            spec = self._want.get(ctypes.string_at(t + ggml.OFF_NAME))
            if spec is None:
                return not ask  # ask: no; a ready node we did not ask for: keep going
            flags, li = spec
            if ask:
                if flags & Want.ARGSORT_PTR:
                    self._ptrs[0, li] = t
                if flags & Want.ROUTER_IN:
                    self._ptrs[1, li] = ctypes.c_void_p.from_address(
                        t + ggml.OFF_SRC + 8).value or 0
                return bool(flags & (Want.SCORE | Want.WEIGHTS | Want.EXPERTS))
            r = 0 if self.ring else int(self.rows[li])
            if flags & (Want.SCORE | Want.EXPERTS):
                n = ctypes.c_int64.from_address(t + ggml.OFF_NE + 8).value
            else:
                ne = (ctypes.c_int64 * 4).from_address(t + ggml.OFF_NE)
                n = ne[0] * ne[1] * ne[2] * ne[3] // self.k
            if r + n > self._buf.cap or n > len(self._buf.scratch_i32):
                raise RuntimeError(f"{n} token rows at row {r}: more than the capture buffer "
                                   f"({self._buf.cap} rows, ubatch {len(self._buf.scratch_i32)})")
            b = self._buf
            if flags & Want.SCORE:
                self._lib.tensor_get(t, b.scores[li, r:].ctypes.data, 0, n * self.n_expert * 4)
            if flags & Want.EXPERTS:
                self._copy_experts(t, li, r, n)
                return self._commit(li, r, n)
            if flags & Want.WEIGHTS:
                self._lib.tensor_get(t, b.weights[li, r:].ctypes.data, 0, n * self.k * 4)
                self._copy_experts(int(self._ptrs[0, li]), li, r, n)
                if b.hidden is not None and b.scratch_f32 is not None:
                    f = b.scratch_f32
                    self._lib.tensor_get(int(self._ptrs[1, li]), f.ctypes.data, 0,
                                         n * self.n_embd * 4)
                    b.hidden[li, r:r + n] = f[:n]
                return self._commit(li, r, n)
            return True
        except BaseException as exc:  # an exception must not unwind through C
            self._error = exc
            return self.ring  # as FAIL in C: streaming goes on, a trace stops; re-raised later

    def _copy_experts(self, a: int, li: int, r: int, n: int) -> None:
        s = self._buf.scratch_i32
        self._lib.tensor_get(a, s.ctypes.data, 0, n * self.n_expert * 4)
        self._buf.experts[li, r:r + n] = s[:n, :self.k]

    def _commit(self, li: int, r: int, n: int) -> bool:
        self.rows[li] = r + n
        if self._notify is not None:
            self._notify(li, r, n)
        return li != self._stop_after


def check_node(name: str, t: int, flags: Want, *, n_expert: int, k: int, n_embd: int,
               what: str) -> None:
    """Probe-time check that a node has the type/shape/contiguity the copies assume."""
    g, lib = ggml, ggml.ggml_lib()
    ttype, ne = g.tensor_type(t), g.tensor_ne(t)
    i32 = flags & (Want.ARGSORT_PTR | Want.EXPERTS)
    expect = g.GGML_TYPE_I32 if i32 else g.GGML_TYPE_F32
    bad = ttype != expect or not lib.is_contiguous(t)
    if flags & (Want.SCORE | Want.ARGSORT_PTR | Want.EXPERTS):
        bad |= ne[0] != n_expert
    if flags & Want.WEIGHTS:
        bad |= ne[0] * ne[1] * ne[2] * ne[3] % k != 0
    if flags & Want.ROUTER_IN:
        src1 = ctypes.c_void_p.from_address(t + g.OFF_SRC + 8).value or 0
        bad |= (not src1 or g.tensor_type(src1) != g.GGML_TYPE_F32
                or g.tensor_ne(src1)[0] != n_embd or not lib.is_contiguous(src1))
    if bad:
        raise ExpertPredError(
            f"{what}: node {name!r} has ggml type {ttype}, ne {ne}: not the layout the "
            "routing hook expects (contiguous F32 scores/weights, I32 argsort)")
