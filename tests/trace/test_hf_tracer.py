"""HFTracer on random-weight transformers models of the four supported families, and the
cross-check of both tracers: the same checkpoint converted to GGUF (expertpred.gguf.convert) and
traced through llama.cpp must give the same router logits and the same selected experts.
The same cross-check runs on the shipped models when they are built.

Measured router-logit max abs diff (f32 weights): random models 2.5e-3..7.5e-3 with
llama.cpp's defaults (flash attention, f16 KV cache), 4e-6..1.2e-5 without flash attention
and with an f32 KV cache; tiny-mixtral 1.8e-2 / 1.9e-5 on 522 tokens. Expert-id agreement
0.998..1.0 (a near-tie flips now and then).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from expertpred.errors import ExpertPredError  # noqa: E402
from expertpred.gguf.convert import hf_to_gguf  # noqa: E402
from expertpred.shipped import SHIPPED_MODELS, repo_root  # noqa: E402
from expertpred.trace.hf_tracer import HFTracer  # noqa: E402
from expertpred.trace.llama_tracer import LlamaTracer  # noqa: E402
from expertpred.trace.record import Phase  # noqa: E402

log = logging.getLogger(__name__)

VOCAB = 258  # 256 bytes, one merge ("ĠĠ"), <|endoftext|>
EOS = 257
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=EOS,
              bos_token_id=EOS, pad_token_id=EOS)
# family -> (config class, model class, extra config, renormalises top-k weights?)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=8, num_experts_per_tok=2), True),
    "qwen2moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                 dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, norm_topk_prob=False), False),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                 dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
                      norm_topk_prob=True), True),
    # llama.cpp's olmoe sizes attn_k_norm by n_embd: no GQA
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_experts=8, num_experts_per_tok=2, num_key_value_heads=4), False),
}
# llama.cpp context settings of the cross-check -> router-logit tolerance (clean entries).
# "stock": llama.cpp's defaults — flash attention (f16 Q·K on CPU) and an f16 KV cache;
# measured up to 1.8e-2 on tiny-mixtral at late positions of repeated text (sharp attention).
# "exact": no flash attention, f32 KV cache; measured 2e-5.
MODES = {
    "stock": ({}, 5e-2),
    "exact": ({"flash_attn_type": 0, "type_k": 0, "type_v": 0}, 1e-4),
}
MIN_AGREEMENT = 0.98  # expert ids (near-ties may flip)
TEXT = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, x):\n        self.items.append(x)\n\n"
    "The river ran quietly past the old mill, where the miller's daughter counted sacks of "
    "flour and dreamed of the sea. Every spring the water rose, and every autumn the "
    "villagers argued about who should mend the wheel. Nobody remembered who had built it.\n"
)


def _byte_tokenizer_json(path: Path) -> None:
    """A byte-level BPE tokenizer.json (the converter needs one; llama.cpp needs a merge)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    char = dict(zip(bs, cs))
    vocab = {chr(char[b]): b for b in range(256)}
    sp = chr(char[32])
    vocab[sp + sp] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(sp, sp)]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))


def _random_model(family: str, seed: int = 0):
    cfg_cls, model_cls, extra, _ = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra})
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():  # decisive routers, O(1) activations (HF zero-inits some routers)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("gate.weight"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> save_pretrained directory holding also tokenizer.json and model.gguf."""
    root = tmp_path_factory.mktemp("hf_tracer")
    out = {}
    for family in FAMILIES:
        d = root / family
        _random_model(family).save_pretrained(d)
        _byte_tokenizer_json(d / "tokenizer.json")
        hf_to_gguf(d, d / "model.gguf")
        out[family] = d
    return out


def _tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def _compare(h, ll) -> tuple[float, float, float]:
    """(max |router-logit diff| over clean entries, over all, expert-id agreement).

    A near-tie flip of the selected experts of token t at layer l changes that token's
    hidden state in later layers and, through attention, every later token's: entries
    (t', l') with t' >= t and l' > l are downstream of the flip and may legitimately differ
    by more than float noise. "Clean" entries have no flip at any (t'' <= t', l'' < l').
    """
    flip = np.any(np.sort(h.experts, -1) != np.sort(ll.experts, -1), axis=-1)  # (T, L)
    upstream = np.zeros_like(flip)
    upstream[:, 1:] = np.maximum.accumulate(np.maximum.accumulate(flip, axis=0), axis=1)[:, :-1]
    diff = np.abs(h.logits - ll.logits).max(-1)  # (T, L)
    return float(diff[~upstream].max()), float(diff.max()), float((h.experts == ll.experts).mean())


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_experts_are_topk_and_weights_follow_config(checkpoints, family):
    with HFTracer(checkpoints[family], n_threads=1, capture_hidden=True) as tr:
        t = tr.trace_tokens(_tokens(48), n_prompt=40, seq_id=3, prompt_id="x", domain="prose")
        n_layers = len(tr.moe_layers_)
    k = t.experts.shape[-1]
    assert t.logits.shape == (48, n_layers, tr.n_expert_) and t.experts.shape == (48, n_layers, k)
    assert t.hidden is not None and t.hidden.shape == (48, n_layers, 64)
    assert (t.phase[:40] == Phase.PROMPT).all() and (t.phase[40:] == Phase.DECODE).all()
    probs = _softmax(t.logits.astype(np.float64))
    top = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    assert np.array_equal(top, t.experts)
    sel = np.take_along_axis(probs, t.experts.astype(np.int64), axis=-1)
    if FAMILIES[family][3]:
        sel = sel / sel.sum(-1, keepdims=True)
    np.testing.assert_allclose(t.weights, sel, atol=2e-6)
    assert (np.abs(t.logits).sum(-1) > 0).all()


@pytest.mark.parametrize("family", ["mixtral", "qwen2moe"])
def test_hf_greedy_trace_equals_generate_and_teacher_forcing(checkpoints, family):
    with HFTracer(checkpoints[family], n_threads=1) as tr:
        prompt = _tokens(10, seed=1)
        g = tr.trace(prompt, max_tokens=12)
        tf = tr.trace_tokens(g.tokens, n_prompt=10)
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            ref = tr.model_.generate(ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=12, do_sample=False)[0].tolist()
    ref = ref[: len(ref) - 1] if ref[-1] == EOS else ref
    assert g.tokens.tolist() == ref  # KV-cache loop == transformers' own greedy generate
    assert g.n_tokens == len(g.logits) and (g.phase == tf.phase).all()
    np.testing.assert_allclose(g.logits, tf.logits, atol=1e-4)
    assert np.array_equal(g.experts, tf.experts)


def _cross_check(gguf: Path, hf_dir: Path, tokens: list[int] | str, mode: str,
                 record_property, label: str) -> None:
    params, atol = MODES[mode]
    with LlamaTracer(gguf, n_ctx=1024, n_threads=1, context_params=params) as lt:
        toks = lt.tokenize(tokens) if isinstance(tokens, str) else tokens
        ll = lt.trace(toks)
    with HFTracer(hf_dir, n_threads=1) as hf:
        h = hf.trace_tokens(toks)
    assert h.logits.shape == ll.logits.shape
    clean, diff, agree = _compare(h, ll)
    record_property("router_logit_max_abs_diff", diff)
    record_property("router_logit_max_abs_diff_clean", clean)
    record_property("expert_agreement", agree)
    log.info("%s [%s] (%d tokens): router logits max |diff| %.2e (%.2e where no upstream "
             "near-tie flip), expert agreement %.4f", label, mode, len(toks), diff, clean, agree)
    assert clean < atol
    assert agree >= MIN_AGREEMENT
    assert float(np.abs(h.logits - ll.logits).mean()) < atol / 10
    same = (h.experts == ll.experts).all(-1)
    assert np.abs(h.weights - ll.weights)[same].max() < atol


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_and_transformers_route_alike(checkpoints, family, mode, record_property):
    d = checkpoints[family]
    _cross_check(d / "model.gguf", d, _tokens(96, seed=2), mode, record_property, family)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_shipped_models_llama_cpp_and_transformers_route_alike(name, mode, record_property):
    d = repo_root() / "models" / name
    if not (d / "model.gguf").exists() or not (d / "hf" / "config.json").exists():
        pytest.skip(f"{d}/model.gguf or hf/ not built yet (python -m training.train_lm "
                    f"--config training/configs/{name}.toml)")
    _cross_check(d / "model.gguf", d / "hf", TEXT * 3, mode, record_property, name)


def test_non_moe_and_missing_checkpoints_are_user_errors(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2)
    dense = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ExpertPredError, match="no sparse MoE blocks"):
        HFTracer(dense)
    with pytest.raises(ExpertPredError, match="no config.json"):
        HFTracer(tmp_path)
