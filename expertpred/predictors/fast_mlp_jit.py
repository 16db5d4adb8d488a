"""fast-mlp's per-step arithmetic, compiled with numba when it is installed, else numpy.

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

import logging
import os

import numpy as np

log = logging.getLogger(__name__)

try:  # optional: without it (or with EXPERTPRED_NO_JIT=1) the numpy twin runs
    if os.environ.get("EXPERTPRED_NO_JIT"):
        raise ImportError("EXPERTPRED_NO_JIT is set")
    import numba
except ImportError as exc:  # pragma: no cover - depends on the environment
    numba = None
    log.debug("fast-mlp: numba not available (%s), the numpy step runs", exc)

JIT = numba is not None


# --- numpy: the reference and the fallback ----------------------------------------------------

def advance_np(cur: np.ndarray, ids: np.ndarray, w_ll: np.ndarray, ll: np.ndarray,
               use_ll: bool, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(this layer's (2·H1,) gathered rows — [:H1] the step's ``current``, [H1:] the
    accumulator's ``current_all`` — and the accumulator with the layer added).
    ``cur``: (E+1, 2·H1) table (row E zero: padding ids -1 wrap onto it); ``w_ll``:
    (E, H1) the layer's logits' rows."""
    h1 = base.shape[0]
    t = np.add.reduce(cur.take(ids, axis=0, mode="wrap"), axis=0)
    after = base + np.add.reduce(w_ll * ll[:, None], axis=0) if use_ll else base.copy()
    after += t[h1:]
    return t, after


def step_np(cur: np.ndarray, ids: np.ndarray, w_ll: np.ndarray, ll: np.ndarray,
            use_ll: bool, base: np.ndarray, token: np.ndarray, w_step: np.ndarray,
            v: np.ndarray, later: np.ndarray, heads: np.ndarray, after: np.ndarray,
            s: np.ndarray, top: np.ndarray, shares: np.ndarray) -> None:
    """One step into the preallocated outputs: ``after`` (H1,) the accumulator with the
    layer added, ``s`` (E,) the scores, ``top`` / ``shares`` (k,) the top ``k = len(top)``
    experts (ties to the lower id) and their shares of the non-negative score mass (all 1
    when none is positive). ``later``: (0, 0, 0) or (1, H1, H2) input-major."""
    t, after[:] = advance_np(cur, ids, w_ll, ll, use_ll, base)
    h1 = base.shape[0]
    a = after + token
    a += t[:h1]
    if len(v):
        a += np.add.reduce(w_step * v[:, None], axis=0)
    np.maximum(a, 0.0, out=a)
    for w in later:
        a = np.add.reduce(w * a[:, None], axis=0)
        np.maximum(a, 0.0, out=a)
    s[:] = np.add.reduce(heads * a[:, None], axis=0)
    k = len(top)
    if k == 0:
        return
    top[:] = np.argsort(-s, kind="stable")[:k]
    pos = np.maximum(s, 0.0)
    tot = np.cumsum(pos)[-1]
    shares[:] = pos[top] / tot if tot > 0 else 1.0


# --- numba: the same operations, one call ---------------------------------------------------

def _advance(cur, ids, w_ll, ll, use_ll, base):  # pragma: no cover - compiled
    h1 = base.shape[0]
    n2 = cur.shape[1]
    e1 = cur.shape[0]
    t = np.zeros(n2, np.float32)
    for r in range(ids.shape[0]):
        row = ids[r] % e1  # -1 -> the zero row E, as mode="wrap"
        for i in range(n2):
            t[i] += cur[row, i]
    after = base.copy()
    if use_ll:
        acc = np.zeros(h1, np.float32)
        for j in range(ll.shape[0]):
            vj = ll[j]
            for i in range(h1):
                acc[i] += w_ll[j, i] * vj
        for i in range(h1):
            after[i] += acc[i]
    for i in range(h1):
        after[i] += t[h1 + i]
    return t, after


def _gemv(w, v):  # pragma: no cover - compiled
    # zero inputs are skipped: adding their ±0 products leaves every partial sum's value
    # unchanged (only the sign of an all-zero sum can differ), and after a ReLU about half
    # the inputs are zero
    out = np.zeros(w.shape[1], np.float32)
    for j in range(w.shape[0]):
        vj = v[j]
        if vj == 0:
            continue
        for i in range(w.shape[1]):
            out[i] += w[j, i] * vj
    return out


def _step(cur, ids, w_ll, ll, use_ll, base, token, w_step, v, later, heads, after, s,
          top, shares):  # pragma: no cover - compiled
    t, acc = _advance_jit(cur, ids, w_ll, ll, use_ll, base)
    h1 = base.shape[0]
    a = np.empty(h1, np.float32)
    for i in range(h1):
        after[i] = acc[i]
        a[i] = acc[i] + token[i]
        a[i] += t[i]
    if v.shape[0] > 0:
        g = _gemv_jit(w_step, v)
        for i in range(h1):
            a[i] += g[i]
    for i in range(h1):
        a[i] = max(a[i], np.float32(0.0))
    for n in range(later.shape[0]):
        a = _gemv_jit(later[n], a)
        for i in range(a.shape[0]):
            a[i] = max(a[i], np.float32(0.0))
    g = _gemv_jit(heads, a)
    e = g.shape[0]
    for i in range(e):
        s[i] = g[i]
    k = top.shape[0]
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
        shares[r] = max(s[top[r]], np.float32(0.0)) / tot if tot > 0 else np.float32(1.0)


if JIT:
    _jit = numba.njit(cache=True, nogil=True)
    _advance_jit = _jit(_advance)
    _gemv_jit = _jit(_gemv)
    advance = _advance_jit
    step = _jit(_step)
else:
    advance = advance_np
    step = step_np
