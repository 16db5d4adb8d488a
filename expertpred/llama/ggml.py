"""Minimal ctypes access to ``struct ggml_tensor`` and libggml-base for the eval callback.

Field offsets are those of ggml as vendored by llama-cpp-python 0.3.36 on x86-64/aarch64
(``ggml/include/ggml.h``: GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
GGML_MAX_NAME 64). :func:`check_layout` verifies them against a live tensor once per
process through the exported ``ggml_get_name`` / ``ggml_nbytes``, so a ggml with a
different struct layout fails loudly instead of producing garbage traces.
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import lru_cache

from .nodes import BASE_NAMES, Want

log = logging.getLogger(__name__)

# struct ggml_tensor field offsets (bytes)
OFF_TYPE = 0
OFF_BUFFER = 8
OFF_NE = 16  # int64 ne[4]
OFF_NB = 48  # size_t nb[4]
OFF_OP = 80
OFF_FLAGS = 148
OFF_SRC = 152
OFF_DATA = 248
OFF_NAME = 256
NAME_LEN = 64

# enum ggml_type values used here
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_I32 = 26

_TYPE_SIZE = {GGML_TYPE_F32: 4, GGML_TYPE_F16: 2, GGML_TYPE_I32: 4}  # bytes per element


class GGMLLib:
    """The few libggml-base functions the tracer calls (bound once, argtypes set)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.tensor_get = lib.ggml_backend_tensor_get
        self.tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                    ctypes.c_size_t]
        self.tensor_get.restype = None
        self.get_name = lib.ggml_get_name
        self.get_name.argtypes = [ctypes.c_void_p]
        self.get_name.restype = ctypes.c_char_p
        self.nbytes = lib.ggml_nbytes
        self.nbytes.argtypes = [ctypes.c_void_p]
        self.nbytes.restype = ctypes.c_size_t
        self.is_contiguous = lib.ggml_is_contiguous
        self.is_contiguous.argtypes = [ctypes.c_void_p]
        self.is_contiguous.restype = ctypes.c_bool


@lru_cache(maxsize=1)
def ggml_lib() -> GGMLLib:
    """libggml-base from llama-cpp-python's package directory (already loaded by libllama)."""
    import llama_cpp

    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        path = os.path.join(libdir, name)
        if os.path.exists(path):
            return GGMLLib(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
    raise OSError(f"{libdir}: no libggml-base shared library (llama-cpp-python install broken?)")


def tensor_name(t: int) -> bytes:
    return ctypes.string_at(t + OFF_NAME)


def tensor_type(t: int) -> int:
    return ctypes.c_int32.from_address(t + OFF_TYPE).value


def tensor_ne(t: int) -> tuple[int, int, int, int]:
    a = (ctypes.c_int64 * 4).from_address(t + OFF_NE)
    return (a[0], a[1], a[2], a[3])


def check_layout(t: int) -> None:
    """Raise if our struct offsets disagree with the loaded ggml on tensor ``t``."""
    lib = ggml_lib()
    name = lib.get_name(t)
    if name != tensor_name(t):
        raise RuntimeError(
            f"ggml_tensor layout mismatch: name at offset {OFF_NAME} is {tensor_name(t)!r}, "
            f"ggml_get_name says {name!r} (llama-cpp-python other than 0.3.36?)"
        )
    ne = tensor_ne(t)
    ttype = tensor_type(t)
    if ttype in _TYPE_SIZE and lib.is_contiguous(t):
        n = ne[0] * ne[1] * ne[2] * ne[3] * _TYPE_SIZE[ttype]
        if n != lib.nbytes(t):
            raise RuntimeError(
                f"ggml_tensor layout mismatch on {name!r}: ne {ne} type {ttype} gives {n} bytes, "
                f"ggml_nbytes says {lib.nbytes(t)}"
            )


class Threadpool:
    """A persistent ggml CPU threadpool to attach to llama.cpp contexts.

    Without one, ggml creates and joins a disposable pool of ``n_threads - 1`` worker threads
    on *every* graph compute — and the eval callback turns one compute per token into
    ``2·n_moe_layers + 1`` of them. Attaching one pool to both the traced and the untraced
    context removes that cost from both, so the comparison stays fair.
    """

    def __init__(self, n_threads: int) -> None:
        import llama_cpp

        libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
        cpu = ctypes.CDLL(os.path.join(libdir, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        base = ggml_lib().lib
        base.ggml_threadpool_params_init.argtypes = [ctypes.c_void_p, ctypes.c_int]
        base.ggml_threadpool_params_init.restype = None
        cpu.ggml_threadpool_new.argtypes = [ctypes.c_void_p]
        cpu.ggml_threadpool_new.restype = ctypes.c_void_p
        cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
        cpu.ggml_threadpool_free.restype = None
        self._free = cpu.ggml_threadpool_free
        # struct ggml_threadpool_params: bool cpumask[512]; int n_threads; int prio;
        # uint32 poll; bool strict_cpu; bool paused  -> 528 bytes; over-allocate.
        params = ctypes.create_string_buffer(1024)
        base.ggml_threadpool_params_init(params, n_threads)
        self.ptr: int | None = cpu.ggml_threadpool_new(params)
        if not self.ptr:
            raise RuntimeError(f"ggml_threadpool_new({n_threads} threads) failed")
        self.n_threads = n_threads

    def attach(self, ctx: object) -> None:
        import llama_cpp

        fn = llama_cpp.llama_cpp._lib.llama_attach_threadpool
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = None
        fn(ctx, self.ptr, self.ptr)

    def close(self) -> None:
        """Free the pool (idempotent); free the contexts that use it first."""
        if self.ptr:
            self._free(self.ptr)
            self.ptr = None

    def __enter__(self) -> Threadpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the capture callback in C -----------------------------------------------------------
# A Python eval callback costs ~0.7 µs per graph node (the scheduler asks about every node,
# ~50 per layer) plus the copies; on small models that is more than the model's own compute.
# This C version of ``hook.RoutingHook``'s callback is compiled once per machine with the
# system C compiler (one is always present: llama-cpp-python builds from source) and cached;
# when no compiler works, the hook falls back to its Python twin. Python code runs only in
# ``notify``, once per MoE layer and ubatch, when the hook's owner asks for it (the plugin).

NOTIFY_FN = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)

_CAPTURE_C = r"""
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

typedef void (*tensor_get_fn)(const void *t, void *data, size_t offset, size_t size);
typedef void (*to_fp16_fn)(const float *x, uint16_t *y, int64_t n);
typedef void (*notify_fn)(int64_t li, int64_t row, int64_t n);

enum { @FLAGS@ };
#define N_BASE @N_BASE@
static const char *BASE[N_BASE] = { @BASES@ };

typedef struct {
    int64_t n_layer, n_expert, k, n_embd, cap, scratch_rows;
    tensor_get_fn tensor_get;
    to_fp16_fn to_fp16;
    int32_t flags[N_BASE];
    int32_t *layer_li;                    /* [n_layer] block index -> MoE row, -1 = dense */
    float *scores; int32_t *experts; float *weights; uint16_t *hidden;  /* (L, cap, .) */
    int32_t *scratch_i32; float *scratch_f32;
    int64_t *rows;                        /* [L] tokens captured so far per MoE layer */
    void **argsort_ptr; void **router_in_ptr;  /* [L] remembered in the ask phase */
    int64_t error;                        /* 0 ok; else 1 + reason code */
    int64_t stop_after;                   /* MoE row after whose commit to stop, -1 never */
    notify_fn notify;                     /* called after a layer's rows are committed */
    int64_t ring;                         /* 1: every ubatch writes rows from 0 (streaming) */
} ep_state;

/* record the reason; stop the compute unless streaming (ring): the plugin must never break
   the inference it rides along with, the tracer must not write a wrong trace */
#define FAIL(code) { s->error = (code); return s->ring != 0; }
#define OFF_NE 16
#define OFF_SRC 152
#define OFF_NAME 256

static int parse(const char *name, int *layer) {
    /* "ffn_moe_<base>-<digits>" exactly (views have " (reshaped)" etc. and do not match) */
    if (memcmp(name, "ffn_moe_", 8) != 0) return -1;
    const char *b = name + 8;
    const char *dash = strrchr(b, '-');
    if (!dash || !dash[1]) return -1;
    int l = 0;
    for (const char *p = dash + 1; *p; p++) {
        if (*p < '0' || *p > '9') return -1;
        l = l * 10 + (*p - '0');
    }
    size_t n = (size_t)(dash - b);
    for (int i = 0; i < N_BASE; i++) {
        if (strlen(BASE[i]) == n && memcmp(BASE[i], b, n) == 0) { *layer = l; return i; }
    }
    return -1;
}

/* first k of each of n argsort rows (row stride E) -> experts (row stride k) */
static void copy_experts(ep_state *s, void *a, int32_t *dst, int64_t n) {
    const int64_t E = s->n_expert, k = s->k;
    if (n == 1) { s->tensor_get(a, dst, 0, (size_t)(k * 4)); return; }
    s->tensor_get(a, s->scratch_i32, 0, (size_t)(n * E * 4));
    for (int64_t i = 0; i < n; i++)
        memcpy(dst + i * k, s->scratch_i32 + i * E, (size_t)(k * 4));
}

static bool commit(ep_state *s, int64_t li, int64_t r, int64_t n) {
    s->rows[li] = r + n;
    if (s->notify) s->notify(li, r, n);
    return li != s->stop_after;  /* false stops the compute: the rest is not needed */
}

bool ep_callback(void *t, bool ask, void *user_data) {
    ep_state *s = (ep_state *)user_data;
    int layer = 0;
    int base = parse((const char *)t + OFF_NAME, &layer);
    if (base < 0 || layer >= s->n_layer) return !ask;
    int32_t flags = s->flags[base];
    int64_t li = s->layer_li[layer];
    if (!flags || li < 0) return !ask;
    if (ask) {
        if (flags & ARGSORT_PTR) s->argsort_ptr[li] = t;
        if (flags & ROUTER_IN) s->router_in_ptr[li] = *(void **)((char *)t + OFF_SRC + 8);
        return (flags & (SCORE | WEIGHTS | EXPERTS)) != 0;
    }
    const int64_t *ne = (const int64_t *)((char *)t + OFF_NE);
    const int64_t E = s->n_expert, k = s->k, D = s->n_embd;
    int64_t r = s->ring ? 0 : s->rows[li];
    if (flags & SCORE) {
        int64_t n = ne[1];
        if (r + n > s->cap) FAIL(2)
        s->tensor_get(t, s->scores + (li * s->cap + r) * E, 0, (size_t)(n * E * 4));
    }
    if (flags & EXPERTS) {
        int64_t n = ne[1];
        if (r + n > s->cap) FAIL(2)
        if (n > s->scratch_rows) FAIL(3)
        copy_experts(s, t, s->experts + (li * s->cap + r) * k, n);
        return commit(s, li, r, n);
    }
    if (flags & WEIGHTS) {
        int64_t n = ne[0] * ne[1] * ne[2] * ne[3] / k;
        if (r + n > s->cap) FAIL(2)
        if (n > s->scratch_rows) FAIL(3)
        int64_t off = (li * s->cap + r) * k;
        s->tensor_get(t, s->weights + off, 0, (size_t)(n * k * 4));
        void *a = s->argsort_ptr[li];
        if (!a) FAIL(4)
        copy_experts(s, a, s->experts + off, n);
        if (s->hidden) {
            void *h = s->router_in_ptr[li];
            if (!h) FAIL(5)
            s->tensor_get(h, s->scratch_f32, 0, (size_t)(n * D * 4));
            s->to_fp16(s->scratch_f32, s->hidden + (li * s->cap + r) * D, n * D);
        }
        return commit(s, li, r, n);
    }
    return true;
}
"""

# The C source with the node table and flag values of ``nodes`` filled in (defined once).
CAPTURE_C = (
    _CAPTURE_C.replace("@FLAGS@", ", ".join(f"{w.name} = {int(w)}" for w in Want))
    .replace("@N_BASE@", str(len(BASE_NAMES)))
    .replace("@BASES@", ", ".join(f'"{b}"' for b in BASE_NAMES))
)

CAPTURE_ERRORS = {
    2: "more token rows than the capture buffer holds",
    3: "a ubatch larger than n_batch",
    4: "weights node reached before its argsort node",
    5: "weights node reached before the router matmul (router input unknown)",
}

class CaptureState(ctypes.Structure):
    _fields_ = [
        ("n_layer", ctypes.c_int64), ("n_expert", ctypes.c_int64), ("k", ctypes.c_int64),
        ("n_embd", ctypes.c_int64), ("cap", ctypes.c_int64), ("scratch_rows", ctypes.c_int64),
        ("tensor_get", ctypes.c_void_p), ("to_fp16", ctypes.c_void_p),
        ("flags", ctypes.c_int32 * len(BASE_NAMES)),
        ("layer_li", ctypes.c_void_p),
        ("scores", ctypes.c_void_p), ("experts", ctypes.c_void_p), ("weights", ctypes.c_void_p),
        ("hidden", ctypes.c_void_p),
        ("scratch_i32", ctypes.c_void_p), ("scratch_f32", ctypes.c_void_p),
        ("rows", ctypes.c_void_p),
        ("argsort_ptr", ctypes.c_void_p), ("router_in_ptr", ctypes.c_void_p),
        ("error", ctypes.c_int64), ("stop_after", ctypes.c_int64),
        ("notify", ctypes.c_void_p), ("ring", ctypes.c_int64),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.stop_after = -1  # the C callback never stops unless told to


def _cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "expertpred")


@lru_cache(maxsize=1)
def capture_lib() -> ctypes.CDLL | None:
    """Compile (once, cached by source hash) and load the C capture callback; None if no
    C compiler works or ``EXPERTPRED_PY_CALLBACK=1`` forces the Python callback."""
    import hashlib
    import subprocess
    import tempfile

    if os.environ.get("EXPERTPRED_PY_CALLBACK") == "1":
        return None
    digest = hashlib.sha256(CAPTURE_C.encode()).hexdigest()[:16]
    out = os.path.join(_cache_dir(), f"capture-{digest}.so")
    if not os.path.exists(out):
        cc = os.environ.get("CC", "cc")
        try:
            os.makedirs(_cache_dir(), exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "capture.c")
                with open(src, "w") as f:
                    f.write(CAPTURE_C)
                so = os.path.join(tmp, "capture.so")
                subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", so, src], check=True,
                               capture_output=True, timeout=120)
                os.replace(so, out)  # atomic: concurrent first uses race harmlessly
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("no C capture callback (%s: %s); using the slower Python callback",
                        type(exc).__name__, exc)
            return None
    lib = ctypes.CDLL(out)
    lib.ep_callback.restype = ctypes.c_bool
    lib.ep_callback.argtypes = [ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p]
    return lib


def fn_address(fn: object) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value or 0
