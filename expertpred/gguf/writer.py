"""Write GGUF files from numpy tensors: the one place that calls ``gguf.GGUFWriter``.

Used by the HF converter (``expertpred.gguf.convert``), the random-weight fixtures
(``expertpred.gguf.random_models``) and ``expertpred widen``. Files are written to a temporary
name and renamed when complete, so an interrupted write never leaves a half file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

log = logging.getLogger(__name__)

HParam = int | float | str | bool


@dataclass(frozen=True)
class GGUFTokenizer:
    """The ``tokenizer.ggml.*`` fields of a GGUF file."""

    model: str  # "gpt2" (byte-level BPE) is what the shipped models use
    tokens: list[str]
    merges: list[str]
    token_types: list[int]  # gguf.TokenType values, one per token
    bos_id: int
    eos_id: int
    pre: str = "gpt-2"  # llama.cpp pre-tokenizer; "gpt-2" = the GPT-2 regex HF byte-level BPE uses


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what byte-level BPE vocabularies use).

    >>> m = bytes_to_unicode(); len(m), m[ord("a")], m[ord(" ")]
    (256, 'a', 'Ġ')
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer() -> GGUFTokenizer:
    """A 259-token byte-level BPE tokenizer: ``<|endoftext|>``, 256 bytes and two merges.

    Enough for random-weight fixture models: every text tokenizes (llama.cpp refuses a
    gpt2 vocabulary without merges, so two harmless ones are included).
    """
    mapping = bytes_to_unicode()
    merges = ["Ġ t", "h e"]
    tokens = ["<|endoftext|>"] + [mapping[b] for b in range(256)] + ["Ġt", "he"]
    types = [int(gguf.TokenType.CONTROL)] + [int(gguf.TokenType.NORMAL)] * (len(tokens) - 1)
    return GGUFTokenizer("gpt2", tokens, merges, types, bos_id=0, eos_id=0)


def _add_hparam(w: gguf.GGUFWriter, key: str, value: HParam) -> None:
    # bool before int: bool is a subclass of int in Python.
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value) if value >= 0 else w.add_int32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        raise TypeError(f"hparam {key!r}: expected int, float, str or bool, got {type(value)}")


@contextmanager
def atomic_writer(path: Path, arch: str) -> Iterator[tuple[gguf.GGUFWriter, Path]]:
    """A ``GGUFWriter`` on ``path.tmp`` (yielded with that path), renamed to ``path`` when the
    block ends; on any error it is closed and the partial file removed, so ``path`` never
    holds half a GGUF."""
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        yield w, tmp
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise


def write_gguf(
    path: Path,
    arch: str,
    name: str,
    hparams: dict[str, HParam],
    tensors: dict[str, np.ndarray],
    tokenizer: GGUFTokenizer,
) -> Path:
    """Write a GGUF file atomically and return its path.

    ``hparams`` keys are GGUF keys without the ``{arch}.`` prefix (``"block_count"``,
    ``"rope.freq_base"``); ``tensors`` use GGUF names and numpy (row-major) shapes, e.g.
    ``blk.0.ffn_gate_exps.weight`` of shape (n_expert, n_ff, n_embd). Arrays are written
    in their own dtype (float32 / float16); 1-D norms should be float32.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, arch) as (w, _):
        w.add_name(name)
        for key, value in hparams.items():
            _add_hparam(w, f"{arch}.{key}", value)
        ftype = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}
        big = [t for t in tensors.values() if t.ndim >= 2]
        if big:
            w.add_file_type(ftype.get(big[0].dtype, 0))
        w.add_tokenizer_model(tokenizer.model)
        w.add_tokenizer_pre(tokenizer.pre)
        w.add_token_list(tokenizer.tokens)
        w.add_token_types(tokenizer.token_types)
        if tokenizer.merges:
            w.add_token_merges(tokenizer.merges)
        w.add_bos_token_id(tokenizer.bos_id)
        w.add_eos_token_id(tokenizer.eos_id)
        w.add_add_bos_token(False)
        for tname, arr in tensors.items():
            w.add_tensor(tname, np.ascontiguousarray(arr))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
    log.info("wrote %s (%d tensors, %d bytes)", path, len(tensors), path.stat().st_size)
    return path
