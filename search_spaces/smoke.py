"""The paper grid's four trial shapes on a tiny random LLaMA and bundled data: CPU, offline, minutes.

    python -m sweep.run search_spaces/smoke.py

Same axes as the post (r 8/16, attention/all_linear, 4/8-bit through bitsandbytes' CPU backend);
sized so the whole sweep finishes in about two minutes on 2 CPU cores.
"""

from sweep import Settings, Space, Trial

space = Space(
    name="smoke",
    settings=Settings(
        model="random:tiny-llama",  # 2 layers, 64 wide, 1,024-token tokenizer trained on the bundled data
        dataset="bundled:products-400",  # 400 real product descriptions shipped in the repo
        device="cpu",
        lora_alpha=8,  # as in the post
        lora_dropout=0.05,  # as in the post
        learning_rate=3e-3,  # a random base barely moves at 2e-4 in a few dozen steps
        epochs=2,
        batch_size=8,
        max_seq_length=256,  # as in the post
        train_samples=320,  # 288 train / 32 test
        seed=42,
        logging_steps=4,
        max_new_tokens=32,  # short generations keep the CPU demo quick; the post used 128
    ),
    trials=[
        Trial(r=8, targets="attention", bits=4),
        Trial(r=16, targets="attention", bits=4),
        Trial(r=8, targets="all_linear", bits=4),
        Trial(r=8, targets="all_linear", bits=8),
    ],
)
