"""The ``expertpred`` command line: the only layer that prints.

Each command parses its options, calls one library function and prints the result;
:mod:`.app` holds the typer app and ``main`` (user errors -> one line, exit 2).
"""

from __future__ import annotations

from . import demo, gguf, lab, learn, prefetch, trace  # noqa: F401  (registers the commands)
from .app import app, main

# The order of --help: the main job first, then the pipeline's order, then the harnesses.
_ORDER = ("demo", "inspect", "widen", "trace", "analyze", "train", "evaluate", "export", "run",
          "serve", "experiment", "iotrace")
app.registered_commands.sort(key=lambda c: _ORDER.index(c.name or c.callback.__name__))

__all__ = ["app", "main"]
