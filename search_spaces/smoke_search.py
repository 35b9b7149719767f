"""A search on the CPU: Optuna TPE over LoRA's own knobs, seeded with two of the post's trials, with ASHA
stopping the worse trials early. Tiny random LLaMA, bundled data, offline, a few minutes on 2 cores.

    python -m sweep.run search_spaces/smoke_search.py --dry-run                 # axes, ranges, parameter range
    python -m sweep.run search_spaces/smoke_search.py
    python -m sweep.run search_spaces/smoke_search.py --extend --num-samples 10  # two more, TPE warm-started
"""

from sweep import ASHA, Choice, FloatRange, IntRange, Search, Settings, Space, Trial

space = Space(
    name="smoke-search",
    settings=Settings(
        model="random:tiny-llama",  # 2 layers, 64 wide, 1,024-token tokenizer trained on the bundled data
        dataset="bundled:products-400",  # 400 real product descriptions shipped in the repo
        device="cpu",
        lora_alpha=8,  # as in the post (where alpha_rule is "fixed")
        learning_rate=3e-3,  # the seeds' rate: a random base barely moves at 2e-4 in a few dozen steps
        epochs=2,
        batch_size=8,
        train_samples=160,  # 144 train / 16 test: 36 optimizer steps a trial
        eval_every=6,  # held-out loss every 6 steps: what ASHA compares
        checkpoint_every=50,  # the evals' checkpoints are enough to resume from at this size
        logging_steps=4,
        max_new_tokens=16,  # short generations keep the CPU search quick; the post used 128
        heldout_prompts=1,
    ),
    # The seeds: two of the post's trial shapes, evaluated first, so TPE starts from known points.
    trials=[
        Trial(r=8, targets="attention", bits=4),
        Trial(r=8, targets="all_linear", bits=4),
    ],
    search=Search(
        axes={
            "r": IntRange(4, 32, log=True),
            "targets": Choice(["attention", "all_linear"]),
            "bits": Choice([4, 16]),  # 4-bit QLoRA or a plain base; 8-bit is the slowest path on a CPU
            "alpha_rule": Choice(["fixed", "2r"]),
            "learning_rate": FloatRange(1e-3, 1e-2, log=True),
        },
        algorithm="tpe",
        num_samples=8,
        max_concurrent=2,  # one trial per core
        seed=0,
    ),
    early_stopping=ASHA(grace_period=6, reduction_factor=2),  # rungs at steps 6, 12 and 24
)
