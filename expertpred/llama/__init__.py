"""llama.cpp through llama-cpp-python: ``ggml`` holds the ctypes bindings to ggml's tensor
struct and the compiled C capture callback that the tracer and the plugin hook in with."""
