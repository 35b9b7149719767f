"""Your data in another shape: conversations (``messages``) through the model's chat template, the loss taken on
every token or on the assistant's replies only, as a sweep axis. CPU, offline, about a minute.

    python -m sweep.run search_spaces/chat_smoke.py

The data is the bundled products as two-turn conversations (the category asked and answered, then a one-sentence
description; trainers/assets/products-chat-200.jsonl). The tiny tokenizer carries a small chat template whose
{% generation %} markers TRL's assistant_only_loss masks by. The two trials take their loss on different
tokens, so the table compares them on the response loss (the assistant's tokens, for both).
"""

from sweep import Settings, Space, grid

space = Space(
    name="chat-smoke",
    settings=Settings(
        model="random:tiny-llama",  # 2 layers, 64 wide; its tokenizer has a chat template (see above)
        dataset="bundled:products-chat-200",  # 200 conversations shipped in the repo
        data_format="messages",  # rendered with the chat template, as TRL does
        device="cpu",
        learning_rate=3e-3,  # a random base barely moves at 2e-4 in a few dozen steps
        epochs=1,
        batch_size=8,
        max_seq_length=256,  # as in the post; the conversations are 100-263 tokens
        train_samples=160,  # 144 train / 16 test
        seed=42,
        logging_steps=6,
        max_new_tokens=24,  # short generations keep the CPU demo quick
        heldout_prompts=2,
        eval_prompts=[[{"role": "user", "content": "Which category is the Hoover Lightspeed in?"}]],
    ),
    trials=grid(r=[8], targets=["all_linear"], bits=[16], loss_on=["all", "assistant"]),
)
