"""Rebuild the bundled offline assets (run once by a maintainer; the outputs are committed).

    python trainers/assets/make_assets.py ../shared/data/products.jsonl

Writes:
  products-400.jsonl              the first 400 rows of the shuffled products file (product,
                                  category, description): demo and test data, Red Dot schema
  models/tiny-llama/tokenizer.json  a 1,024-token byte-level BPE trained on that slice, so the tiny
                                  model sees realistic tokens without any Hub download

The model configs under models/ are written by hand (tiny-llama) or copied from the published
config.json of the checkpoint (open_llama_3b_v2); they are data, not code.
"""

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = Path(__file__).parent
SLICE_ROWS = 400  # enough for a 320/32 train/test split in the smoke sweep, small enough to ship
TINY_VOCAB = 1024  # multiple of 32: bitsandbytes' CPU 4-bit path asserts out_features % 32 == 0


def main(source: str) -> None:
    rows = []
    with open(source) as f:
        for line in f:
            row = json.loads(line)
            rows.append({k: row[k] for k in ("product", "category", "description")})
            if len(rows) == SLICE_ROWS:
                break
    out = HERE / "products-400.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    # Byte-level BPE like LLaMA-family fast tokenizers; specials match the LLaMA ids (unk 0, bos 1, eos 2).
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [f"{r['product']} {r['category']}\n{r['description']}\n### End" for r in rows]
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(HERE / "models" / "tiny-llama" / "tokenizer.json"))
    print(f"wrote {out} ({len(rows)} rows) and a {tok.get_vocab_size()}-token tokenizer")


if __name__ == "__main__":
    main(sys.argv[1])
