"""fast-mlp's per-step arithmetic, compiled with numba when it is installed, else numpy.

Which implementation runs is decided once per process by :func:`resolve`: by default the
step compiled ahead of time (:mod:`.fast_mlp_aot`), which keeps numba and LLVM out of the
serving process; numba's in-process JIT or the numpy twin on request or as fallbacks.

Why compiled: a step is ~20 small operations on vectors of a few hundred floats, and each
numpy call costs 0.3–0.7 µs of dispatch on this machine: the numpy step spent most of its
~15 µs in call overhead (``docs/export.md``, "A learned default?"). One compiled call does
the same arithmetic in ~2–4 µs.

Both implementations do the *same float32 operations in the same order* — every product
is a sum over the inputs in order (``out += W_T[j] * v[j]`` for j = 0, 1, ...), every
gather a sum over the rows in order, the shares' total a running sum — so their results
are bit-identical (``tests/predictors/test_fast_mlp_row.py`` checks it). numpy's
``add.reduce`` over axis 0 and ``cumsum`` are such running sums; numba compiles without
``fastmath``, so it neither reassociates nor fuses a multiply-add.

Weights are stored input-major (``W_T``: (inputs, outputs)), which makes the compiled
inner loop an independent multiply-add per output (vectorised) instead of a reduction.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np

log = logging.getLogger(__name__)

# numba is imported only when the in-process JIT is chosen (see resolve): importing it and
# compiling cost the serving process ~50 MB of anonymous memory and ~75 MB of library
# pages, which a memory-limited run takes from its expert budget (docs/export.md)
HAVE_NUMBA = importlib.util.find_spec("numba") is not None
KINDS = ("aot", "jit", "numpy")

# --- numpy: the reference and the fallback ----------------------------------------------------

def advance_np(cur: np.ndarray, experts: np.ndarray, li: int, w_ll: np.ndarray,
               vin: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(this layer's (2·H1,) gathered rows — [:H1] the step's ``current``, [H1:] the
    accumulator's ``current_all`` — and the accumulator with the layer added).

    ``cur``: (L, E+1, 2·H1) tables (row E zero: padding ids -1 wrap onto it); ``experts``
    the row's (1, L, k) ids; ``w_ll``: (L, E, H1) each layer's logits' rows (zeros
    without that part); ``vin``: the step inputs, its last E the layer's logits."""
    h1, e = base.shape[0], w_ll.shape[1]
    t = np.add.reduce(cur[li].take(experts[0, li], axis=0, mode="wrap"), axis=0)
    after = base + np.add.reduce(w_ll[li] * vin[-e:, None], axis=0)
    after += t[h1:]
    return t, after


def step_np(cur: np.ndarray, experts: np.ndarray, li: int, w_ll: np.ndarray,
            vin: np.ndarray, base: np.ndarray, token: np.ndarray, w_step: np.ndarray,
            later: np.ndarray, heads: np.ndarray, out: np.ndarray, top: np.ndarray) -> None:
    """One step into the preallocated outputs: ``out`` = [the accumulator with the layer
    added (H1), the scores (E), the shares (k)], ``top`` (k,) the top ``k`` experts (ties
    to the lower id); a share is the expert's part of the non-negative score mass (all 1
    when none is positive). ``vin`` = [logits, history, hidden (``w_step``'s rows), this
    layer's logits (E)]; ``later``: (0, 0, 0) or (1, H1, H2) input-major."""
    h1, e, k = base.shape[0], heads.shape[2], top.shape[0]
    t, after = advance_np(cur, experts, li, w_ll, vin, base)
    out[:h1] = after
    a = after + token[li]
    a += t[:h1]
    n = w_step.shape[0]
    a += np.add.reduce(w_step * vin[:n, None], axis=0)
    np.maximum(a, 0.0, out=a)
    for w in later:
        a = np.add.reduce(w * a[:, None], axis=0)
        np.maximum(a, 0.0, out=a)
    s = out[h1:h1 + e]
    s[:] = np.add.reduce(heads[li] * a[:, None], axis=0)
    if k == 0:
        return
    top[:] = np.argsort(-s, kind="stable")[:k]
    pos = np.maximum(s, 0.0)
    tot = np.cumsum(pos)[-1]
    out[h1 + e:] = pos[top] / tot if tot > 0 else 1.0


# --- numba: the same operations, one call ---------------------------------------------------

def _gemv(w, v, n):  # pragma: no cover - compiled
    # the first n inputs; zero inputs are skipped: adding their ±0 products leaves every
    # partial sum's value unchanged (only the sign of an all-zero sum can differ), and
    # after a ReLU about half the inputs are zero
    out = np.zeros(w.shape[1], np.float32)
    for j in range(n):
        vj = v[j]
        if vj == 0:
            continue
        for i in range(w.shape[1]):
            out[i] += w[j, i] * vj
    return out


def _advance(cur, experts, li, w_ll, vin, base):  # pragma: no cover - compiled
    h1, e, n2, e1 = base.shape[0], w_ll.shape[1], cur.shape[2], cur.shape[1]
    t = np.zeros(n2, np.float32)
    for r in range(experts.shape[2]):
        row = experts[0, li, r] % e1  # -1 -> the zero row E, as mode="wrap"
        for i in range(n2):
            t[i] += cur[li, row, i]
    acc = _gemv_jit(w_ll[li], vin[vin.shape[0] - e:], e)
    after = np.empty(h1, np.float32)
    for i in range(h1):
        after[i] = base[i] + acc[i]
        after[i] += t[h1 + i]
    return t, after


def _step(cur, experts, li, w_ll, vin, base, token, w_step, later, heads, out,
          top):  # pragma: no cover - compiled
    h1, e, k = base.shape[0], heads.shape[2], top.shape[0]
    t, after = _advance_jit(cur, experts, li, w_ll, vin, base)
    g = _gemv_jit(w_step, vin, w_step.shape[0])
    a = np.empty(h1, np.float32)
    for i in range(h1):
        out[i] = after[i]
        a[i] = after[i] + token[li, i]
        a[i] += t[i]
        a[i] += g[i]
        a[i] = max(a[i], np.float32(0.0))
    for n in range(later.shape[0]):
        a = _gemv_jit(later[n], a, a.shape[0])
        for i in range(a.shape[0]):
            a[i] = max(a[i], np.float32(0.0))
    s = _gemv_jit(heads[li], a, a.shape[0])
    out[h1:h1 + e] = s
    if k == 0:
        return
    used = np.zeros(e, np.bool_)
    for r in range(k):  # stable descending: ties go to the lower id
        best = -1
        for i in range(e):
            if not used[i] and (best < 0 or s[i] > s[best]):
                best = i
        top[r] = best
        used[best] = True
    tot = np.float32(0.0)
    for i in range(e):
        tot += max(s[i], np.float32(0.0))
    for r in range(k):
        out[h1 + e + r] = max(s[top[r]], np.float32(0.0)) / tot if tot > 0 else 1.0


def resolve() -> str:
    """Choose the step's implementation once per process and bind :data:`advance` /
    :data:`step` to it; returns its kind.

    - ``aot`` (default): the step compiled ahead of time by numba into a small extension
      module (:mod:`.fast_mlp_aot`, built once per machine in a subprocess and cached).
      Importing it loads neither numba nor LLVM into this process.
    - ``jit``: numba's JIT in this process (the AOT build failed, or
      ``EXPERTPRED_KERNEL=jit``).
    - ``numpy``: the twin (numba missing, ``EXPERTPRED_KERNEL=numpy`` or
      ``EXPERTPRED_NO_JIT=1``).
    """
    global KIND, advance, step, _gemv_jit, _advance_jit
    if KIND is not None:
        return KIND
    want = os.environ.get("EXPERTPRED_KERNEL", "aot").strip().lower() or "aot"
    if os.environ.get("EXPERTPRED_NO_JIT"):
        want = "numpy"
    if want not in KINDS:
        log.warning("EXPERTPRED_KERNEL=%s: expected one of %s; using aot", want,
                    ", ".join(KINDS))
        want = "aot"
    if want != "numpy" and not HAVE_NUMBA:
        log.debug("fast-mlp: numba not installed, the numpy step runs")
        want = "numpy"
    if want == "aot":
        from . import fast_mlp_aot
        mod, why = fast_mlp_aot.load()
        if mod is not None:
            try:  # a module built for other argument types fails here, not on the
                _call_once(mod.advance, mod.step)  # inference thread
            except (TypeError, ValueError) as exc:
                mod, why = None, f"{type(exc).__name__}: {exc}"
        if mod is not None:
            advance, step, KIND = mod.advance, mod.step, "aot"
            return KIND
        log.warning("fast-mlp: no ahead-of-time compiled step (%s); compiling it in this "
                    "process with numba's JIT, which keeps ~50 MB of LLVM and numba in "
                    "memory", why)
        want = "jit"
    if want == "jit":
        try:
            import numba
        except Exception as exc:  # noqa: BLE001 - a broken install must not stop serving
            log.warning("fast-mlp: numba does not import (%s); the numpy step runs", exc)
            advance, step, KIND = advance_np, step_np, "numpy"
            return KIND
        jit = numba.njit(cache=True, nogil=True)
        _gemv_jit = jit(_gemv)
        _advance_jit = jit(_advance)
        advance, step, KIND = _advance_jit, jit(_step), "jit"
        _call_once(advance, step)  # compiles (or loads numba's cache): seconds when cold
        return KIND
    advance, step, KIND = advance_np, step_np, "numpy"
    return KIND


def _call_once(advance, step) -> None:  # noqa: ANN001 - compiled callables
    """One call of each with the argument types the row kernel passes."""
    h1, e, n_l, k = 3, 2, 2, 1
    f32 = np.float32
    cur, w_ll = np.zeros((n_l, e + 1, 2 * h1), f32), np.zeros((n_l, e, h1), f32)
    experts, vin, base = np.zeros((1, n_l, k), np.int16), np.zeros(e + 1, f32), np.zeros(h1, f32)
    token, w_step = np.zeros((n_l, h1), f32), np.zeros((1, h1), f32)
    later, heads = np.zeros((0, 0, 0), f32), np.zeros((n_l, h1, e), f32)
    advance(cur, experts, 0, w_ll, vin, base)
    step(cur, experts, 0, w_ll, vin, base, token, w_step, later, heads,
         np.zeros(h1 + e + k, f32), np.zeros(k, np.int64))


KIND: str | None = None  # set by resolve()
# until resolve(): the twin (the compiled helpers are bound by resolve("jit"))
advance = advance_np
step = step_np
_gemv_jit = _advance_jit = None
