"""The one llama.cpp hook, used by the tracer, the prefetch plugin and iotrace: ``nodes``
(router node names and capture plans, written once), ``ggml`` (ctypes view of ggml tensors,
the threadpool, the C eval callback), ``hook`` (``RoutingHook``: the callback and its
buffers), ``runtime`` (models, contexts with ``cb_eval`` set, the graph probe, the one
decode loop). See docs/llama-hook.md."""
