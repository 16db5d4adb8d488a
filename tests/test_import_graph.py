"""The import graph of ``expertpred`` runs one way: no room imports a room above it.

Rooms, lowest first (a room may import its own rank and any rank below it)::

    0  errors, units, shipped, model, root plain records, errors, formatting; no I/O policy
    1  gguf, llama                         the two external formats/APIs we speak
    2  trace                               routing out of llama.cpp into datasets
    3  features                            trace -> model inputs
    4  predictors, learn                   fit, judge and export predictors
    5  prefetch                            runtime: I/O engine, buffer, plugin
    6  lab, cli, serve                     research harnesses and front ends

``learn`` sits *beside* ``predictors`` (same rank), not above it: ``learn.train`` fits
predictors, and predictors use the pure-numpy ``learn.metrics`` to pick their settings,
so neither is below the other; both stay below the runtime (``prefetch`` loads what they
wrote) and neither may import ``prefetch``. A cache simulator that wants the buffer's
policy classes therefore needs them in a room at rank <= 4.

Every import counts, including imports inside functions (they still tie the rooms
together, only later). Run: ``python -m pytest -q tests/test_import_graph.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "expertpred"

RANK = {
    "": 0, "errors": 0, "shipped": 0, "model": 0, "units": 0,
    "gguf": 1, "llama": 1,
    "trace": 2,
    "features": 3,
    "predictors": 4, "learn": 4,
    "prefetch": 5,
    "lab": 6, "cli": 6, "serve": 6,
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module in the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def room(module: str) -> str:
    """``expertpred.gguf.layout`` -> ``gguf``; ``expertpred.serve_http`` -> ``serve``."""
    parts = module.split(".")
    if len(parts) == 1:
        return ""
    name = parts[1]
    return "serve" if name.startswith("serve") else name


def imported_modules(module: str, path: Path) -> set[str]:
    """Every ``expertpred`` module that ``module`` imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` imports the module pkg.sub when that is a module
            subs = {f"{target}.{a.name}" for a in node.names} & MODULES.keys()
            found.update(subs or {target})
    return {m for m in found if m == "expertpred" or m.startswith("expertpred.")}


def test_every_room_has_a_rank():
    unranked = sorted({room(m) for m in MODULES} - RANK.keys())
    assert not unranked, f"give these rooms a rank in RANK: {unranked}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    src = room(module)
    upward = sorted(
        f"{t} ({room(t)}, rank {RANK[room(t)]})"
        for t in imported_modules(module, MODULES[module])
        if room(t) in RANK and RANK[room(t)] > RANK.get(src, 99)
    )
    assert not upward, f"{module} ({src}, rank {RANK.get(src)}) imports upward: {upward}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The scanner itself: a relative import from trace into prefetch is found."""
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from ..prefetch.engine import PrefetchEngine\n")
    assert "expertpred.prefetch.engine" in imported_modules("expertpred.trace.x", bad)
