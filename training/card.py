"""The prose model card (README.md) written next to card.json."""

from __future__ import annotations

from pathlib import Path


def write_readme(path: Path, card: dict) -> None:
    cfg = card["config"]
    loss = card["loss"]
    stats = card["routing_stats_heldout"]
    ho = card["corpus"]["heldout_documents"]
    rows = "\n".join(
        f"| {r['layer']} | {r['keep_rate']:.3f} | {r['marginal_baseline']:.3f} "
        f"| {r['topk_overlap']:.3f} | {r['usage_entropy']:.3f} | {r['min_share']:.2f} "
        f"| {r['max_share']:.2f} | {r['dead_experts']} |"
        for r in stats
    )
    lines = [
        f"# {card['name']}",
        "",
        "A tiny trained Mixture-of-Experts language model shipped with expertpred as a small, "
        "realistic target for expert-trace collection and prefetching experiments. It is not a "
        "useful language model; it is a model whose routers were trained like a real MoE's.",
        "",
        f"- **Architecture**: `{card['hf_architecture']}` (GGUF arch "
        f"`{card['gguf_architecture']}`), {cfg['n_layer']} layers, hidden {cfg['n_embd']}, "
        f"{cfg['n_head']} heads ({cfg['n_kv_head']} KV) of {cfg['head_dim']}, "
        f"{cfg['n_expert']} experts, top-{cfg['n_expert_used']}, expert FFN width "
        f"{cfg['expert_ff']}, vocab {card['vocab_size']} (byte-level BPE), "
        f"{card['n_params'] / 1e6:.2f} M parameters. `model.gguf` is f32 "
        f"({card['gguf']['bytes'] / 1e6:.1f} MB, sha256 `{card['gguf']['sha256'][:16]}…`); "
        "`hf/` is the same model as a transformers checkpoint.",
        f"- **Data**: the Python {card['corpus']['python_version']} standard library's own "
        "source (code) and `pydoc_data.topics` (English prose), present on every Python "
        f"install. Whole files/topics are held out by a hash of their name: "
        f"{len(ho.get('code', []))} code files and {len(ho.get('prose', []))} prose topics "
        "(listed in `card.json`, `corpus.heldout_documents`); "
        "`training.corpus.load_corpus(\"heldout\")` returns them as prompts.",
        f"- **Training**: {card['tokens_seen']:,} tokens ({cfg['max_steps']} steps × "
        f"{cfg['batch_size']} × {cfg['seq_len']}), AdamW, linear warmup + cosine LR (peak "
        f"{cfg['lr']}), per-layer router load-balancing loss × {cfg['router_aux_loss_coef']}, "
        f"prose upsampled to {cfg['prose_fraction']:.0%} of rows, seed {cfg['seed']}; "
        f"{card['train_wall_seconds']:.0f} s with {cfg['threads']} torch thread(s) on a shared "
        "2-core CPU.",
        f"- **Validation loss** (nats/token): code {loss['code']['valid']}, prose "
        f"{loss['prose']['valid']}; a unigram model of the training text scores "
        f"{loss['code']['valid_unigram']} / {loss['prose']['valid_unigram']}.",
        "",
        "## Routing on held-out text",
        "",
        "keep = how often a token keeps the previous token's 1st-choice expert (random: "
        f"{stats[0]['random_baseline']}; marginal = the rate for independent tokens with the "
        "observed expert usage); overlap = shared fraction of consecutive top-k sets (random: "
        f"{stats[0]['topk_overlap_baseline']}); entropy = normalised entropy of expert usage; "
        "min/max = least/most used expert's share relative to uniform.",
        "",
        "| layer | keep | marginal | overlap | entropy | min | max | dead |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        rows,
        "",
        f"Rebuild: `{card['command']}`",
        "",
    ]
    Path(path).write_text("\n".join(lines))
