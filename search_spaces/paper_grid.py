"""The blog post's sweep: OpenLLaMA-3b-v2 on Red Dot product descriptions, four LoRA/QLoRA trials.

    python -m sweep.run search_spaces/paper_grid.py --dry-run   # 2,662,400 / 5,324,800 / 12,994,560 / 12,994,560
    python -m sweep.run search_spaces/paper_grid.py             # needs CUDA GPUs and the Hugging Face Hub

Offline GPU hosts: --set model=random:open_llama_3b_v2 (same architecture, seeded random weights).
"""

from sweep import Settings, Space, Trial

# The two products the post judged every configuration by.
POST_PROMPTS = [
    {"product": "Corelogic Smooth Mouse", "category": "Optical Mouse"},
    {"product": "Hoover Lightspeed", "category": "Cordless Vacuum Cleaner"},
]

space = Space(
    name="paper-grid",
    settings=Settings(
        model="openlm-research/open_llama_3b_v2",
        dataset="xiyuez/red-dot-design-award-product-description",
        device="cuda",
        lora_alpha=8,  # the post's value for every trial
        lora_dropout=0.05,  # the post's value
        epochs=3,  # the post trained 3 epochs
        max_seq_length=256,  # the post's SFTTrainer max_seq_length
        train_samples=5000,  # the post sampled 5,000 rows...
        seed=42,  # ...with seed 42
        learning_rate=2e-4,  # the usual QLoRA rate for a 3B model
        batch_size=4,
        grad_accum=4,  # 16 examples per optimizer step; the fast trainer path runs them as one padding-free batch
        gradient_checkpointing=False,  # the fast path holds 16 x <=256 tokens of a 3B base without it (see README)
        max_new_tokens=128,  # the post's generation length
        data_format="post",  # product, category, description in the post's instruction and Alpaca template
        loss_on="all",  # the post trained on the whole text, prompt included
        eval_prompts=POST_PROMPTS,
    ),
    # Not a cross product: the post's four trials exactly, in its table's order.
    trials=[
        Trial(r=8, targets="attention", bits=4),
        Trial(r=16, targets="attention", bits=4),
        Trial(r=8, targets="all_linear", bits=4),
        Trial(r=8, targets="all_linear", bits=8),
    ],
)
