"""Mutation fuzzing of expertpred's readers with real files as seeds.

``core`` runs one case under limits and classifies its outcome; each format module
(``gguf``, ``trace``, ``artifact``) turns real files into seeded mutations and says what an
accepted input must satisfy. ``benchmarks/fuzz.py`` runs long campaigns; ``tests/fuzz``
runs a bounded profile through hypothesis.
"""
