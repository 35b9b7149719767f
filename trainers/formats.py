"""A row of the space's data format -> what TRL's SFTTrainer trains on, and the prompts generated for.

TRL 1.16 knows three dataset shapes; every format becomes one of them, so that TRL's own machinery
decides which tokens the loss is taken on (``completion_only_loss``: the completion of prompt-completion
data; ``assistant_only_loss``: the chat template's ``{% generation %}`` spans):

    language modeling   {"text": str}                                   text
    prompt-completion   {"prompt": str, "completion": str}              post, alpaca, prompt_completion
                        {"prompt": [user turn], "completion": [assistant turn]}   the same, template="chat"
    conversational      {"messages": [...]}                             messages

Beside those, every row carries what evaluation needs: ``eval_prompt`` (where a generation starts),
``reference`` (the response, for ROUGE-L) and ``title`` (how generations.md and samples.md name it).
"""

from __future__ import annotations

from trainers.config import CHAT, OPTIONAL_FIELDS, POST_END_MARKER, Settings

POST_INSTRUCTION = ("Create a detailed description for the following product: {product}, belonging to category: "
                    "{category}")
POST_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n\n{instruction}\n\n### Response:\n{response}"
)
# Stanford Alpaca's two prompts, with and without an input: the shape most instruction datasets were built for.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
TITLE_CHARS = 60


def prompt(product: str, category: str) -> str:
    """The post's prompt: everything up to where the model should start writing the description."""
    return POST_TEMPLATE.format(instruction=POST_INSTRUCTION.format(product=product, category=category), response="")


def format_row(product: str, category: str, description: str) -> str:
    """One of the post's training texts: its prompt, the description and the end marker."""
    return prompt(product, category) + f"{description}\n{POST_END_MARKER}"


def prompt_text(cfg: Settings, fields: dict[str, str]) -> str:
    """A non-chat prompt from its fields: the space's template, else the format's own."""
    if cfg.template:
        return cfg.template.format(**fields)
    if cfg.data_format == "post":
        return prompt(fields["product"], fields["category"])
    if cfg.data_format == "alpaca":
        return (ALPACA_TEMPLATE if fields["input"] else ALPACA_NO_INPUT).format(**fields)
    return fields["prompt"]


def user_turn(cfg: Settings, fields: dict[str, str]) -> str:
    """The prompt as one user turn of a chat template (``template="chat"``): the instruction, without the
    Alpaca scaffolding the chat template replaces."""
    if cfg.data_format == "post":
        return POST_INSTRUCTION.format(**fields)
    if cfg.data_format == "alpaca":
        return fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
    return fields["prompt"]


def response_text(cfg: Settings, response: str) -> str:
    """The response as trained on: followed by the end marker on its own line, if there is one (EOS, or the
    chat template's end of turn, comes after it)."""
    return f"{response}\n{cfg.marker}" if cfg.marker else response


def fields_of(cfg: Settings, row: dict) -> dict[str, str]:
    """The prompt's fields of a dataset row, by the format's names (a missing optional field is "")."""
    return {f: (row.get(cfg.column(f)) or "") if f in OPTIONAL_FIELDS else row[cfg.column(f)]
            for f in cfg.prompt_fields}


def short(text: str) -> str:
    line = text.strip().split("\n")[0].strip()
    return line if len(line) <= TITLE_CHARS else line[:TITLE_CHARS - 3].rstrip() + "..."


def title(cfg: Settings, fields: dict[str, str]) -> str:
    if "product" in fields and "category" in fields:  # the post's "Product (Category)", as it named its prompts
        return f"{fields['product']} ({fields['category']})"
    return short(next((v for v in fields.values() if v.strip()), "(empty prompt)"))


def chat(messages) -> list[dict[str, str]]:
    """Messages as role and content only: datasets fills absent keys of a list of structs with None, which
    chat templates would render."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def last_reply(messages: list[dict]) -> int:
    """Index of the last assistant turn (the data check guarantees one, after some other turn)."""
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def render(cfg: Settings, row: dict) -> dict:
    """One dataset row -> its TRL-shaped columns plus eval_prompt, reference and title."""
    if cfg.data_format == "text":
        text = row[cfg.column("text")]
        cut = text.find(" ", len(text) // 2)  # generation continues the first half; the second is the reference
        cut = cut if cut > 0 else len(text) // 2
        return {"text": text, "eval_prompt": text[:cut], "reference": text[cut:].strip(), "title": short(text)}
    if cfg.data_format == "messages":
        messages = chat(row[cfg.column("messages")])
        k = last_reply(messages)
        opening = next((m["content"] for m in messages if m["role"] == "user"), messages[0]["content"])
        return {"messages": messages, "eval_prompt": messages[:k], "reference": messages[k]["content"],
                "title": short(opening)}
    fields, response = fields_of(cfg, row), row[cfg.column(cfg.response_field)]
    if cfg.template == CHAT:
        turn = [{"role": "user", "content": user_turn(cfg, fields)}]
        shaped = {"prompt": turn, "completion": [{"role": "assistant", "content": response_text(cfg, response)}]}
    else:
        shaped = {"prompt": prompt_text(cfg, fields), "completion": response_text(cfg, response)}
    return {**shaped, "eval_prompt": shaped["prompt"], "reference": response, "title": title(cfg, fields)}


def space_prompt(cfg: Settings, entry) -> dict:
    """One of the space's ``eval_prompts`` -> {title, prompt}, rendered exactly as a training prompt is."""
    if cfg.data_format == "messages":
        messages = [{"role": "user", "content": entry}] if isinstance(entry, str) else chat(entry)
        return {"title": short(messages[-1]["content"]), "prompt": messages}
    if cfg.data_format == "text":
        return {"title": short(entry), "prompt": entry}
    if isinstance(entry, str):  # the one required field
        entry = {cfg.required_prompt_fields[0]: entry}
    fields = {f: entry.get(f, "") for f in cfg.prompt_fields}
    text = [{"role": "user", "content": user_turn(cfg, fields)}] if cfg.template == CHAT else prompt_text(cfg, fields)
    return {"title": title(cfg, fields), "prompt": text}


def chat_template_problem(cfg: Settings, tokenizer) -> tuple[str, str] | None:
    """(field, message) when the tokenizer cannot render this format's chat: no chat template, one that
    fails to render, or, for ``loss_on="assistant"``, one without ``{% generation %}`` markers that TRL has
    no training version of (TRL's assistant_only_loss masks what those markers enclose)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if not cfg.conversational:
        return None
    why = "data_format='messages'" if cfg.data_format == "messages" else "template='chat'"
    if not tokenizer.chat_template:
        return "chat_template", (f"{why} needs a chat template and the tokenizer of {cfg.model} has none; give one "
                                 "as Settings(chat_template=...) (Jinja)")
    sample = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    try:
        tokenizer.apply_chat_template(sample, tokenize=False)
    except Exception as e:  # noqa: BLE001 - Jinja raises many types; the user needs the first line
        return "chat_template", f"the chat template does not render a conversation: {str(e).splitlines()[0]}"
    if cfg.loss_on == "assistant" and not has_generation_markers(tokenizer.chat_template):
        try:
            get_training_chat_template(tokenizer)
        except ValueError:
            return "loss_on", ("'assistant' needs {% generation %} ... {% endgeneration %} around the assistant's "
                               "turns in the chat template, and TRL knows no training version of this one; add the "
                               "markers (Settings(chat_template=...)) or use loss_on='all'")
    return None
