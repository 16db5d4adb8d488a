"""Prompt sets to trace: the shipped JSONL format, the user's own JSONL, or plain text.

JSONL: one object per line, ``{"id": str, "domain": str, "split": str, "text": str}``; only
``text`` is required (``id`` defaults to the line number, ``domain`` to ``"unknown"``,
``split`` to none). Plain text (any other file whose first non-blank line does not start
with ``{``): one prompt per blank-line-separated paragraph, id = its first line number.

A prompt's ``index`` is its position among all prompts of the file — the trace dataset's
``seq_id`` — so it stays the same whatever ``split`` / ``domain`` filter selects it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ExpertPredError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})
SPLITS = ("train", "validation", "test")
DEFAULT_DOMAIN = "unknown"


class PromptFileError(ExpertPredError):
    """A prompt file cannot be read as JSONL prompts or plain-text paragraphs."""


@dataclass(frozen=True)
class Prompt:
    index: int  # position among all prompts of the file: the trace's seq_id
    id: str
    domain: str
    split: str | None
    text: str


def _is_jsonl(path: Path, text: str) -> bool:
    if path.suffix.lower() in JSONL_SUFFIXES:
        return True
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    return first.lstrip().startswith("{")


def _str_field(path: Path, lineno: int, obj: dict[str, object], key: str,
               default: str | None) -> str | None:
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise PromptFileError(f"{path}:{lineno}: field {key!r} is {type(v).__name__} "
                              f"{v!r}; expected a string")
    return str(v)


def _parse_jsonl(path: Path, text: str) -> list[Prompt]:
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}:{lineno}: malformed JSON ({exc.msg}, column "
                                  f"{exc.colno}); expected one JSON object per line") from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{path}:{lineno}: a JSON {type(obj).__name__}; expected "
                                  'an object like {"text": "..."}')
        body = obj.get("text")
        if not isinstance(body, str) or not body.strip():
            what = "no \"text\" field" if body is None else f"\"text\" is {body!r}"
            raise PromptFileError(f"{path}:{lineno}: {what}; expected a non-empty string "
                                  "\"text\"")
        pid = _str_field(path, lineno, obj, "id", str(lineno))
        assert pid is not None
        if pid in seen:
            raise PromptFileError(f"{path}:{lineno}: duplicate id {pid!r} (first on line "
                                  f"{seen[pid]}); expected unique ids")
        seen[pid] = lineno
        domain = _str_field(path, lineno, obj, "domain", DEFAULT_DOMAIN)
        split = _str_field(path, lineno, obj, "split", None)
        prompts.append(Prompt(len(prompts), pid, domain or DEFAULT_DOMAIN, split, body))
    return prompts


def _parse_text(path: Path, text: str) -> list[Prompt]:
    prompts: list[Prompt] = []
    para: list[str] = []
    start = 0
    lines = text.splitlines()
    for lineno, line in enumerate(lines + [""], start=1):
        if line.strip():
            if not para:
                start = lineno
            para.append(line)
        elif para:
            prompts.append(Prompt(len(prompts), str(start), DEFAULT_DOMAIN, None,
                                  "\n".join(para)))
            para = []
    return prompts


def read_prompt_file(path: str | os.PathLike[str]) -> list[Prompt]:
    """Every prompt of ``path``, in file order (raises PromptFileError on bad input)."""
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: no such file; expected a prompt file (JSONL or text)")
    if not path.is_file():
        raise PromptFileError(f"{path}: not a regular file; expected a prompt file "
                              "(JSONL or text)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not UTF-8 text (bad byte at offset {exc.start}); "
                              "expected a UTF-8 prompt file") from None
    if not text.strip():
        raise PromptFileError(f"{path}: empty prompt file; expected at least one prompt")
    prompts = _parse_jsonl(path, text) if _is_jsonl(path, text) else _parse_text(path, text)
    if not prompts:
        raise PromptFileError(f"{path}: no prompts found; expected at least one")
    log.debug("%s: %d prompts", path, len(prompts))
    return prompts


def load_prompts(path: str | os.PathLike[str], split: str | None = None,
                 domain: str | None = None) -> list[Prompt]:
    """Prompts of ``path``, filtered by ``split`` and ``domain`` (None = all).

    An empty selection is an error that names the values the file does have.
    """
    prompts = read_prompt_file(path)
    out = [p for p in prompts
           if (split is None or p.split == split) and (domain is None or p.domain == domain)]
    if not out:
        for key, want in (("split", split), ("domain", domain)):
            have = sorted({str(getattr(p, key)) for p in prompts if getattr(p, key) is not None})
            if want is not None and want not in have:
                where = ", ".join(have) if have else f"none: the file has no {key} field"
                raise PromptFileError(f"{path}: no prompt with {key} {want!r} ({key}s in the "
                                      f"file: {where})")
        raise PromptFileError(f"{path}: no prompt with split {split!r} and domain {domain!r}")
    return out


def prompt_token_ids(prompt: str | Sequence[int] | np.ndarray,
                     tokenize: Callable[[str], list[int]]) -> list[int]:
    """A prompt given as text (tokenized here) or as token ids, as a non-empty list of ints
    (both tracers take either)."""
    toks = tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not toks:
        raise ExpertPredError("empty prompt: expected at least one token")
    return toks
