"""Recipe that builds the two shipped tiny MoE models (corpus, tokenizer, training, card)."""
