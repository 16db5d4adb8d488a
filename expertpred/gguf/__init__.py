"""GGUF files: ``layout`` is the only GGUF parser; ``writer``, ``convert``, ``widen`` and
``random_models`` make GGUF files (HF checkpoints, widened copies, random test models)."""
