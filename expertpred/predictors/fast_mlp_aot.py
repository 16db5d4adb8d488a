"""fast-mlp's step compiled ahead of time: numba's speed without numba in the process.

The JIT step (:mod:`.fast_mlp_jit`) makes a layer-step cost ~15 µs, but importing numba and
compiling keep LLVM and numba's type machinery in the serving process: ~50 MB of anonymous
memory and ~75 MB of library pages. Under a memory cgroup that is room the residency
manager's derived budget no longer has for experts (one 48 MiB expert of the widened
tiny-mixtral, ~6 of tiny-qwen3moe's 12 MiB ones; docs/export.md, "Session 8").

So the same Python functions are compiled once per machine by ``numba.pycc`` into a small
CPython extension (the kernel source, numba's version, Python's and the CPU decide the
cache key), in a **subprocess**, and the serving process imports only that module. The
build needs numba and a C compiler; without them :func:`.fast_mlp_jit.resolve` falls back
to the in-process JIT with one warning.

    python -m expertpred.predictors.fast_mlp_aot OUT_DIR   # what load() runs when missing

Cache: ``$EXPERTPRED_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/expertpred/kernels``, else
``~/.cache/expertpred/kernels``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

MODULE = "expertpred_fastmlp_step"
BUILD_TIMEOUT_S = 600.0  # a cold build takes ~10-30 s on this 2-core box
# argument types of the row kernel's calls (fast_mlp_row.RowKernel): weights and tables
# C-contiguous (built with np.stack / ascontiguousarray), the row's small arrays any layout
_F3C, _F2C = "f4[:, :, ::1]", "f4[:, ::1]"
ADVANCE_SIG = f"UniTuple(f4[::1], 2)({_F3C}, i2[:, :, :], i8, {_F3C}, f4[:], f4[:])"
STEP_SIG = (f"void({_F3C}, i2[:, :, :], i8, {_F3C}, f4[:], f4[:], f4[:, :], {_F2C}, {_F3C}, "
            f"{_F3C}, f4[:], i8[:])")


def cache_root() -> Path:
    env = os.environ.get("EXPERTPRED_KERNEL_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "expertpred" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def cache_key() -> str:
    """What the compiled module depends on: the kernel's source, this builder, numba's and
    Python's versions, and the CPU (the code is compiled for the host's instruction set)."""
    from importlib.metadata import version

    from . import fast_mlp_jit
    h = hashlib.sha256()
    for part in (Path(fast_mlp_jit.__file__).read_bytes(), Path(__file__).read_bytes(),
                 version("numba").encode(), sys.version.encode(),
                 str(sysconfig.get_config_var("EXT_SUFFIX")).encode(),
                 platform.machine().encode(), _cpu_flags().encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: not an extension module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _built(d: Path) -> Path | None:
    found = sorted(d.glob(MODULE + "*" + str(sysconfig.get_config_var("EXT_SUFFIX"))))
    return found[0] if found else None


def load() -> tuple[ModuleType | None, str]:
    """(the compiled module, "") — built first if this machine has none yet — or (None,
    why not)."""
    try:
        d = cache_root() / f"fastmlp-{cache_key()}"
        so = _built(d) if d.is_dir() else None
        if so is None:
            why = build(d)
            if why:
                return None, why
            so = _built(d)
            if so is None:
                return None, f"the build left no {MODULE} module in {d}"
        return _import(so), ""
    except (OSError, ImportError, ValueError) as exc:  # unwritable cache, broken module
        return None, f"{type(exc).__name__}: {exc}"


def build(dest: Path) -> str:
    """Compile into ``dest`` (atomically: a temporary directory renamed into place, so
    concurrent builders never import half a file); "" or why it failed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        env = dict(os.environ, EXPERTPRED_KERNEL="jit")  # the builder compiles with numba
        env.pop("EXPERTPRED_NO_JIT", None)
        # the builder imports this very package, wherever it was imported from here
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            r = subprocess.run([sys.executable, "-m", __name__, str(tmp)], env=env,
                               capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"the build took over {BUILD_TIMEOUT_S:.0f} s"
        if r.returncode != 0 or _built(tmp) is None:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            return f"the build failed (exit {r.returncode}: {tail[0]})"
        try:
            os.rename(tmp, dest)
        except OSError:
            if _built(dest) is None:  # not a concurrent builder's finished copy
                raise
        return ""
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compile(out_dir: str) -> None:
    """The builder (in its own process): the same Python functions the JIT compiles."""
    from numba.pycc import CC

    from . import fast_mlp_jit
    if fast_mlp_jit.resolve() != "jit":  # binds the helpers _step / _advance call
        raise SystemExit("the builder needs numba's JIT")
    cc = CC(MODULE)
    cc.output_dir = out_dir
    cc.target_cpu = "host"  # what the JIT compiles for too
    cc.verbose = False
    cc.export("advance", ADVANCE_SIG)(fast_mlp_jit._advance)
    cc.export("step", STEP_SIG)(fast_mlp_jit._step)
    cc.compile()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m {__name__} OUT_DIR")
    _compile(sys.argv[1])
