"""Distributed-training tests (a package, so they share conftest helpers)."""
