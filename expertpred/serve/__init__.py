"""``expertpred serve``: the prefetching model behind llama-cpp-python's OpenAI-compatible
server (``app``), with Prometheus ``/metrics`` (``metrics``) and traces of the traffic it
serves (``trace``). A front end: it may import every room below it."""

from __future__ import annotations

from .app import ServeConfig, build_app, serve

__all__ = ["ServeConfig", "build_app", "serve"]
