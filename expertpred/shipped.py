"""Where the repository's shipped models, prompt sets and sample traces live."""

from __future__ import annotations

from pathlib import Path

from .errors import ExpertPredError

SHIPPED_MODELS = ("tiny-mixtral", "tiny-qwen3moe", "tiny-olmoe")
DEFAULT_MODEL = "tiny-mixtral"


def repo_root() -> Path:
    """The checkout expertpred is installed from (editable install: see install.sh)."""
    return Path(__file__).resolve().parents[1]


def model_dir(name: str) -> Path:
    """Directory of a shipped model: ``models/<name>/`` with model.gguf, hf/, card.json."""
    if name not in SHIPPED_MODELS:
        raise ExpertPredError(f"unknown shipped model {name!r}; expected one of "
                              f"{', '.join(SHIPPED_MODELS)}")
    return repo_root() / "models" / name


def model_gguf(name: str) -> Path:
    path = model_dir(name) / "model.gguf"
    if not path.exists():
        raise ExpertPredError(f"{path}: shipped model missing (rebuild it with `python -m "
                              f"training.train_lm --config training/configs/{name}.toml`)")
    return path
