"""Tracing: capture per-token, per-layer routing from llama.cpp or transformers into Parquet."""
