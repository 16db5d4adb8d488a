"""The prose model card (README.md) written next to card.json."""

from __future__ import annotations

from pathlib import Path


def write_readme(path: Path, card: dict) -> None:
    cfg = card["config"]
    loss = card["loss"]
    stats = card["routing_stats_heldout"]
    keep = ", ".join(f"{r['keep_rate']:.3f}" for r in stats)
    ent = ", ".join(f"{r['usage_entropy']:.3f}" for r in stats)
    dead = sum(r["dead_experts"] for r in stats)
    ho = card["corpus"]["heldout_documents"]
    text = f"""# {card['name']}

A tiny trained Mixture-of-Experts language model shipped with expertpred as a realistic,
small target for expert-trace collection and prefetching experiments. It is **not** a useful
language model; it is a model whose routers behave like a real MoE's.

- Architecture: `{card['hf_architecture']}` (GGUF arch `{card['gguf_architecture']}`),
  {cfg['n_layer']} layers, hidden {cfg['n_embd']}, {cfg['n_head']} heads
  ({cfg['n_kv_head']} KV), {cfg['n_expert']} experts, top-{cfg['n_expert_used']},
  expert FFN width {cfg['expert_ff']}, vocab {card['vocab_size']} (byte-level BPE),
  {card['n_params'] / 1e6:.2f} M parameters. `model.gguf` is f32
  ({card['gguf']['bytes'] / 1e6:.1f} MB, sha256 `{card['gguf']['sha256'][:16]}...`).
- Data: the Python {card['corpus']['python_version']} standard library's own source (code)
  and `pydoc_data.topics` (English prose), both present on every Python install.
  Whole files/topics are held out by a hash of their name: {len(ho.get('code', []))} code
  files and {len(ho.get('prose', []))} prose topics (listed in `card.json` under
  `corpus.heldout_documents`); use `training.corpus.load_corpus("heldout")` for prompts.
- Training: {card['tokens_seen']:,} tokens ({cfg['max_steps']} steps x {cfg['batch_size']}
  x {cfg['seq_len']}), AdamW, warmup + cosine LR (peak {cfg['lr']}), router load-balancing
  loss x {cfg['router_aux_loss_coef']}, prose upsampled to {cfg['prose_fraction']:.0%} of
  rows, seed {cfg['seed']}, {card['train_wall_seconds']:.0f} s on 2 CPU cores.
- Validation loss (nats/token): code {loss['code']['valid']}, prose {loss['prose']['valid']}
  vs. unigram {loss['code']['valid_unigram']} / {loss['prose']['valid_unigram']}.
- Routing on held-out text: consecutive tokens keep their 1st-choice expert at rates
  {keep} per layer (random: {stats[0]['random_baseline']}); normalised expert-usage entropy
  {ent}; {dead} dead experts.

Rebuild: `{card['command']}`
"""
    Path(path).write_text(text)
