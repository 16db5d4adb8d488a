"""User-facing errors: one line that names the file or value and what was expected."""

from __future__ import annotations


class ExpertPredError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits 2."""

    def __str__(self) -> str:
        # one line, whatever a wrapped library's message held (Arrow's span several lines)
        return " ".join(super().__str__().split())


class GGUFError(ExpertPredError):
    """A file is not a readable MoE GGUF."""
