"""Byte-level BPE tokenizer trained on the training split, and its GGUF form.

GPT-2 style: bytes are mapped to printable characters, text is pre-split with the GPT-2
regex, ``<|endoftext|>`` is id 0. llama.cpp reads it as ``tokenizer.ggml.model = "gpt2"``
with ``tokenizer.ggml.pre = "gpt-2"`` -- the pre-tokenizer whose regex equals the one used
here. (llama.cpp's ``"default"`` pre-tokenizer first splits punctuation runs and digits, so
it tokenizes differently; tests/test_models_equivalence.py checks the identity.) The GGUF
fields are made by ``expertpred.gguf.convert.gguf_tokenizer_from_json``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

log = logging.getLogger(__name__)

EOT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries (incl. 256 bytes and EOT = id 0)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],  # first special token gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOT) == 0, "EOT must be id 0"
    log.info("trained byte-level BPE: %d tokens", tok.get_vocab_size())
    return tok


def hf_fast_tokenizer(tok: Tokenizer):
    """Wrap for ``save_pretrained`` (writes tokenizer.json next to the HF checkpoint)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=None, pad_token=EOT
    )
