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

_TYPE_SIZE = {GGML_TYPE_F32: 4, GGML_TYPE_F16: 2, GGML_TYPE_I32: 4}


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


def tensor_nb(t: int) -> tuple[int, int, int, int]:
    a = (ctypes.c_uint64 * 4).from_address(t + OFF_NB)
    return (a[0], a[1], a[2], a[3])


def type_size(ggml_type: int) -> int:
    try:
        return _TYPE_SIZE[ggml_type]
    except KeyError:
        raise ValueError(f"ggml type {ggml_type}: expected F32, F16 or I32") from None


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
