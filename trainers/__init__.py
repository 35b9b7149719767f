"""trainers: what one trial runs (data, model loading in 4/8/16 bits, LoRA, SFT, evaluation)."""
