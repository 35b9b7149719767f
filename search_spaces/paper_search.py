"""A search around the blog post's grid: OpenLLaMA-3b-v2 on Red Dot product descriptions, Optuna TPE over
LoRA's own knobs (rank, target modules, base bits, how alpha follows r, dropout, learning rate), seeded
with the post's four trials, ASHA stopping the worse trials on the held-out loss.

    python -m sweep.run search_spaces/paper_search.py --dry-run   # axes, ranges, 2,662,400 ... parameter range
    python -m sweep.run search_spaces/paper_search.py             # needs CUDA GPUs and the Hugging Face Hub
    python -m sweep.run search_spaces/paper_search.py --extend --num-samples 32   # 8 more, warm-started

Offline GPU hosts: --set model=random:open_llama_3b_v2 (same architecture, seeded random weights).
"""

from sweep import ASHA, Budget, Choice, FloatRange, IntRange, Search, Settings, Space, Trial

space = Space(
    name="paper-search",
    settings=Settings(
        model="openlm-research/open_llama_3b_v2",
        dataset="xiyuez/red-dot-design-award-product-description",
        device="cuda",
        lora_alpha=8,  # the post's value (used as is where alpha_rule is "fixed" or "rslora")
        lora_dropout=0.05,  # the post's value, for the seeds
        learning_rate=2e-4,  # the seeds' rate: the usual QLoRA rate for a 3B model
        epochs=3,  # the post trained 3 epochs
        max_seq_length=256,  # the post's SFTTrainer max_seq_length
        train_samples=5000,  # the post sampled 5,000 rows...
        seed=42,  # ...with seed 42
        batch_size=4,
        grad_accum=4,  # 16 examples per optimizer step (one padding-free batch on the fast path): 846 steps a trial
        gradient_checkpointing=False,  # as paper_grid.py: the fast path holds 16 x <=256 tokens of a 3B base
        max_new_tokens=128,  # the post's generation length
        eval_every=50,  # held-out loss every 50 steps: what ASHA compares (and the MLflow eval curve)
        checkpoint_every=50,
    ),
    # The seeds: the post's four trials exactly, in its table's order, evaluated first.
    trials=[
        Trial(r=8, targets="attention", bits=4),
        Trial(r=16, targets="attention", bits=4),
        Trial(r=8, targets="all_linear", bits=4),
        Trial(r=8, targets="all_linear", bits=8),
    ],
    search=Search(
        axes={
            "r": IntRange(4, 64, log=True),
            "targets": Choice(["attention", "all_linear", ["q_proj", "k_proj", "v_proj", "o_proj"]]),
            "bits": Choice([4, 8]),  # QLoRA, or LoRA over LLM.int8: the post's two
            "alpha_rule": Choice(["fixed", "r", "2r", "rslora"]),
            "lora_dropout": FloatRange(0.0, 0.1),
            "learning_rate": FloatRange(5e-5, 1e-3, log=True),
        },
        algorithm="tpe",
        num_samples=24,
        max_concurrent=4,  # TPE learns from finished trials: more at once means less-informed proposals
        seed=42,
    ),
    early_stopping=ASHA(grace_period=100, reduction_factor=3),  # rungs at steps 100 and 300 of 846
    budget=Budget(gpu_hours=12),  # the four seeds take about 2 GPU-hours on an H200 today
)
