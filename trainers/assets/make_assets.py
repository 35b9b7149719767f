"""Rebuild the bundled offline assets (run once by a maintainer; the outputs are committed).

    python trainers/assets/make_assets.py ../shared/data/products.jsonl

Writes:
  products-400.jsonl              the first 400 rows of the shuffled products file (product,
                                  category, description): demo and test data, Red Dot schema
  models/tiny-llama/tokenizer.json  a 1,024-token byte-level BPE trained on that slice, so the tiny
                                  model sees realistic tokens without any Hub download
  models/open_llama_3b_v2/tokenizer.json  a 32,000-token BPE (OpenLLaMA's vocabulary size) trained
                                  on all 13,824 rows, so random:open_llama_3b_v2 sees realistic
                                  token counts per example (real runs use the checkpoint's own)
  models/tiny-llama/chat_template.jinja  a small chat template ("### User:" / "### Assistant:" turns, the
                                  assistant's ending in EOS inside {% generation %} markers, so TRL's
                                  assistant_only_loss can mask it): the tiny model as a chat model
  products-chat-200.jsonl         the first 200 rows of products-400 as conversations (messages): a
                                  system turn, the category asked and answered, then the description's
                                  first sentence (a catalogue line: 100-263 tokens a conversation)

The model configs under models/ are written by hand (tiny-llama) or copied from the published
config.json of the checkpoint (open_llama_3b_v2); they are data, not code. models/desc-llama (the
demo's pretrained base, with its own tokenizer and weights) is written by pretrain.py beside this file.
"""

import json
import re
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = Path(__file__).parent
SLICE_ROWS = 400  # enough for a 320/32 train/test split in the smoke sweep, small enough to ship
TINY_VOCAB = 1024  # multiple of 32: bitsandbytes' CPU 4-bit path asserts out_features % 32 == 0
OPEN_LLAMA_VOCAB = 32000  # the real model's vocabulary size
CHAT_ROWS = 200  # the chat demo samples 160 of them
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'assistant' -%}\n"
    "{{- '### Assistant:\\n' -}}{% generation %}{{- message['content'] + eos_token -}}{% endgeneration %}"
    "{{- '\\n' -}}\n"
    "{%- else -%}\n"
    "{{- '### ' + message['role'] | capitalize + ':\\n' + message['content'] + '\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '### Assistant:\\n' -}}{%- endif -%}\n"
)
SYSTEM = "You write product descriptions for a design award catalogue."
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "pad_token": "<unk>", "padding_side": "right"}


def train_tokenizer(rows: list[dict], vocab_size: int, model_dir: Path, max_length: int) -> int:
    """Byte-level BPE like LLaMA-family fast tokenizers; specials match the LLaMA ids (unk 0, bos 1, eos 2)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [f"{r['product']} {r['category']}\n{r['description']}\n### End" for r in rows]
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(model_dir / "tokenizer.json"))
    config = {**TOKENIZER_CONFIG, "model_max_length": max_length}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok.get_vocab_size()


def first_sentence(text: str) -> str:
    line = text.split("\n")[0]
    found = re.match(r"(.+?[.!?])(\s|$)", line)
    return found.group(1) if found else line


def chat_rows(rows: list[dict]) -> list[dict]:
    """Product rows as two-turn conversations: every assistant turn is learned under loss_on='assistant'."""
    return [{"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Which category is the {r['product']} in?"},
        {"role": "assistant", "content": r["category"]},
        {"role": "user", "content": "Describe it in one sentence."},
        {"role": "assistant", "content": first_sentence(r["description"])},
    ]} for r in rows]


def write_chat_assets(rows: list[dict]) -> None:
    (HERE / "models" / "tiny-llama" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    out = HERE / f"products-chat-{CHAT_ROWS}.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chat_rows(rows[:CHAT_ROWS])))


def main(source: str) -> None:
    with open(source) as f:
        rows = [{k: row[k] for k in ("product", "category", "description")} for row in map(json.loads, f)]
    out = HERE / "products-400.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:SLICE_ROWS]))
    tiny = train_tokenizer(rows[:SLICE_ROWS], TINY_VOCAB, HERE / "models" / "tiny-llama", max_length=512)
    full = train_tokenizer(rows, OPEN_LLAMA_VOCAB, HERE / "models" / "open_llama_3b_v2", max_length=2048)
    write_chat_assets(rows)
    print(f"wrote {out} ({SLICE_ROWS} rows), a {tiny}-token and a {full}-token tokenizer")


if __name__ == "__main__":
    main(sys.argv[1])
