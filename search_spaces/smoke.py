"""The paper grid's four trial shapes on a small pretrained LLaMA and bundled data: CPU, offline, minutes.

    python -m sweep.run search_spaces/smoke.py

Same axes as the post (r 8/16, attention/all_linear, 4/8-bit through bitsandbytes' CPU backend), and as
in the post a pretrained base is fine-tuned: ``desc-llama`` (0.93 M parameters, 1.9 MB in bf16, shipped in the repo) was
pretrained as a plain language model on 13,424 Debian package descriptions that exclude the 400 rows
this sweep trains and evaluates on (``trainers/assets/pretrain.py``). Sized for about two minutes on
2 CPU cores.
"""

from sweep import Settings, Space, Trial

# The two products the post judged every configuration by.
POST_PROMPTS = [
    {"product": "Corelogic Smooth Mouse", "category": "Optical Mouse"},
    {"product": "Hoover Lightspeed", "category": "Cordless Vacuum Cleaner"},
]

space = Space(
    name="smoke",
    settings=Settings(
        model="bundled:desc-llama",  # 2 layers, 128 wide, 2,048-token tokenizer; pretrained, never saw these rows
        dataset="bundled:products-400",  # 400 real product descriptions shipped in the repo
        device="cpu",
        lora_alpha=8,  # as in the post
        lora_dropout=0.05,  # as in the post
        learning_rate=1e-3,  # a few dozen steps: 2e-4 barely moves; 3e-3 over-learns the template and loops
        epochs=1,
        batch_size=8,
        max_seq_length=256,  # as in the post; desc-llama's 2,048-token tokenizer cuts a quarter of rows (table)
        train_samples=320,
        test_fraction=0.15,  # 272 train / 48 test: enough held-out examples for useful error bars
        seed=42,
        logging_steps=4,
        max_new_tokens=32,  # short generations keep the CPU demo quick; the post used 128
        heldout_prompts=6,  # ROUGE-L over 6 held-out rows (its standard error says how rough that is)
        data_format="post",  # product, category, description in the post's instruction and Alpaca template
        loss_on="all",  # the post trained on the whole text, prompt included
        eval_prompts=POST_PROMPTS,
    ),
    trials=[
        Trial(r=8, targets="attention", bits=4),
        Trial(r=16, targets="attention", bits=4),
        Trial(r=8, targets="all_linear", bits=4),
        Trial(r=8, targets="all_linear", bits=8),
    ],
)
