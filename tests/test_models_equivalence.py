"""The shipped trained models: llama.cpp (GGUF) and transformers (HF checkpoint) agree on
tokenization and next-token logits for held-out text, the GGUF is the one the card names,
and the routers are not random (consecutive tokens keep their 1st-choice expert more often
than 1 / n_expert in the middle layers)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `training/` is a recipe next to the package, not installed

from training.corpus import load_corpus  # noqa: E402

MODELS = ("tiny-mixtral", "tiny-qwen3moe", "tiny-olmoe")
N_TOKENS = 256  # tokens per domain compared position by position
# llama.cpp context settings -> bounds on the per-position max |logit diff| (f32 weights,
# |logits| up to ~16): (median, 99th percentile, worst position).
# "stock" = llama.cpp's defaults, flash attention and an f16 KV cache: measured median ~1e-3
# on all three models, p99 ~2.5e-3 on tiny-mixtral / tiny-qwen3moe but 3.3e-2 on tiny-olmoe's
# code text. A position whose router sees a near-tie may pick the other expert in llama.cpp
# (up to ~0.3 at a few positions); with top-8 of 64 experts and 16 layers tiny-olmoe has many
# more near-ties (11 of 256 positions above 1e-2), and a flip propagates to later layers and
# tokens. Hence a median bound for systematic errors plus a loose worst-position bound.
# "exact" = no flash attention, f32 KV cache: measured p99 5e-6 and worst 5.7e-6 on
# tiny-olmoe, so any conversion error shows there.
MODES = {
    "stock": ({}, (5e-3, 5e-2, 1.0)),
    "exact": ({"flash_attn_type": 0, "type_k": 0, "type_v": 0}, (1e-4, 1e-3, 1e-2)),
}
MIN_TOP1_AGREEMENT = 0.99


def _model_dir(name: str) -> Path:
    d = ROOT / "models" / name
    if not (d / "model.gguf").exists():
        pytest.skip(f"{d}/model.gguf not built (python -m training.train_lm --config "
                    f"training/configs/{name}.toml)")
    return d


def _heldout_text(domain: str, n_chars: int = 12000) -> str:
    return "".join(d.text for d in load_corpus("heldout", domain))[:n_chars]


@pytest.fixture(scope="module", params=MODELS)
def shipped(request):
    """(model dir, HF tokenizer, HF model, llama.cpp model) for one shipped model."""
    torch = pytest.importorskip("torch")
    llama_cpp = pytest.importorskip("llama_cpp")
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    d = _model_dir(request.param)
    torch.set_num_threads(2)
    tok = Tokenizer.from_file(str(d / "hf" / "tokenizer.json"))
    hf = AutoModelForCausalLM.from_pretrained(d / "hf", dtype=torch.float32).eval()
    llm = llama_cpp.Llama(str(d / "model.gguf"), logits_all=True, n_ctx=512, n_batch=512,
                          n_threads=2, verbose=False)
    yield d, tok, hf, llm
    llm.close()


@pytest.mark.parametrize("domain", ["code", "prose"])
def test_tokenization_identical(shipped, domain):
    _, tok, _, llm = shipped
    text = _heldout_text(domain)
    hf_ids = tok.encode(text, add_special_tokens=False).ids
    cpp_ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert cpp_ids == hf_ids


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("domain", ["code", "prose"])
def test_logits_match_transformers(shipped, domain, mode):
    import llama_cpp
    import torch

    d, tok, hf, stock = shipped
    kwargs, (median, p99, worst) = MODES[mode]
    ids = tok.encode(_heldout_text(domain), add_special_tokens=False).ids[:N_TOKENS]
    assert len(ids) == N_TOKENS
    llm = stock if mode == "stock" else llama_cpp.Llama(
        str(d / "model.gguf"), logits_all=True, n_ctx=512, n_batch=512, n_threads=2,
        verbose=False, **kwargs)
    try:
        llm.reset()
        llm.eval(ids)
        cpp = np.asarray(llm.scores[:N_TOKENS], dtype=np.float32)
    finally:
        if llm is not stock:
            llm.close()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    agreement = float((cpp.argmax(-1) == ref.argmax(-1)).mean())
    diff = np.abs(cpp - ref).max(-1)  # per position
    assert agreement >= MIN_TOP1_AGREEMENT, f"top-1 agreement {agreement:.4f}"
    assert np.median(diff) < median, f"median |diff| {np.median(diff):.3g}"
    assert np.quantile(diff, 0.99) < p99, f"p99 |diff| {np.quantile(diff, 0.99):.3g}"
    assert diff.max() < worst, f"max |diff| {diff.max():.3g}"


def test_card_matches_files(shipped):
    d = shipped[0]
    card = json.loads((d / "card.json").read_text())
    sha = hashlib.sha256((d / "model.gguf").read_bytes()).hexdigest()
    assert card["gguf"]["sha256"] == sha
    lo = card["loss"]
    for domain in ("code", "prose"):
        assert lo[domain]["valid"] < lo[domain]["valid_unigram"] - 1.0
    held = {dom: set(names) for dom, names in card["corpus"]["heldout_documents"].items()}
    if card["corpus"]["python_version"] == sys.version.split()[0]:
        for domain in ("code", "prose"):
            assert held[domain] == {x.name for x in load_corpus("heldout", domain)}


def test_routing_is_not_random(shipped):
    from training.data import fixed_windows, token_stream
    from training.route_stats import layer_stats, router_topk

    _, tok, hf, _ = shipped
    n_expert = getattr(hf.config, "num_local_experts", None) or hf.config.num_experts
    windows = np.concatenate([
        fixed_windows(token_stream(tok, load_corpus("heldout", dom)), 128, 4 * 128)
        for dom in ("code", "prose")
    ])
    choices = router_topk(hf, windows)
    stats = [layer_stats(c, n_expert) for c in choices]
    n_layer = len(stats)
    middle = stats[n_layer // 4 : n_layer - n_layer // 4]
    assert all(s["keep_rate"] > 1.0 / n_expert for s in middle), [s["keep_rate"] for s in stats]
    assert all(s["dead_experts"] == 0 for s in stats)
