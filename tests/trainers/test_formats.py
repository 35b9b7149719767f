"""Every data format: rows rendered byte for byte, the data check naming file, row and field, the space's own
evaluation prompts, and the chat template a conversational format needs."""

import pytest

from tests.conftest import tiny_cfg, write_jsonl
from trainers.data import DataError, build_splits, check_available
from trainers.evaluate import quality_prompts
from trainers.formats import chat_template_problem, render, space_prompt
from trainers.models import load_tokenizer, local_tokenizer

ALPACA_HEAD = "Below is an instruction that describes a task"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "Blue."}]

# (settings, row, expected TRL-shaped columns, expected reference, expected title)
CASES = {
    "post": (dict(), {"product": "Mouse", "category": "Optical Mouse", "description": "Smooth."},
             {"prompt": "Below is an instruction that describes a task. Write a response that appropriately completes "
                        "the request.\n\n### Instruction:\n\nCreate a detailed description for the following product: "
                        "Mouse, belonging to category: Optical Mouse\n\n### Response:\n",
              "completion": "Smooth.\n### End"}, "Smooth.", "Mouse (Optical Mouse)"),
    "alpaca with input": (dict(data_format="alpaca"), {"instruction": "Sum.", "input": "2 and 3", "output": "5"},
                          {"prompt": "Below is an instruction that describes a task, paired with an input that "
                                     "provides further context. Write a response that appropriately completes the "
                                     "request.\n\n"
                                     "### Instruction:\nSum.\n\n### Input:\n2 and 3\n\n### Response:\n",
                           "completion": "5"}, "5", "Sum."),
    "alpaca without input": (dict(data_format="alpaca"), {"instruction": "Say hi.", "input": None, "output": "Hi"},
                             {"prompt": "Below is an instruction that describes a task. Write a response that "
                                        "appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n"
                                        "### Response:\n", "completion": "Hi"}, "Hi", "Say hi."),
    "prompt/completion mapped, own template, end marker": (
        dict(data_format="prompt_completion", columns={"completion": "answer"}, end_marker="<done>",
             template="Q: {question}\nContext: {ctx}\nA: "),
        {"question": "Why?", "ctx": "None.", "answer": "Because."},
        {"prompt": "Q: Why?\nContext: None.\nA: ", "completion": "Because.\n<done>"}, "Because.", "Why?"),
    "post as a chat turn": (dict(template="chat", end_marker=""), {"product": "Mouse", "category": "Mice",
                                                                    "description": "Smooth."},
                            {"prompt": [{"role": "user", "content": "Create a detailed description for the following "
                                                                    "product: Mouse, belonging to category: Mice"}],
                             "completion": [{"role": "assistant", "content": "Smooth."}]}, "Smooth.", "Mouse (Mice)"),
    "messages": (dict(data_format="messages", columns={"messages": "conversation"}), {"conversation": MESSAGES},
                 {"messages": MESSAGES}, "Blue.", "Name a colour."),
    "text": (dict(data_format="text"), {"text": "one two three four"}, {"text": "one two three four"}, "four",
             "one two three four"),
}


@pytest.mark.parametrize("case", CASES)
def test_every_format_renders_byte_for_byte(case):
    settings, row, shaped, reference, title = CASES[case]
    out = render(tiny_cfg(**settings), row)
    assert {k: out[k] for k in shaped} == shaped
    assert (out["reference"], out["title"]) == (reference, title)
    if "messages" in shaped:  # generation starts after the last user turn; its reply is the reference
        assert out["eval_prompt"] == MESSAGES[:4]
    elif "text" in shaped:  # plain text: the first half is continued, the second half is the reference
        assert out["eval_prompt"] == "one two three"
    else:
        assert out["eval_prompt"] == shaped["prompt"]


def test_the_formats_own_data_builds_splits(tmp_path):
    """A chat file (the bundled one) and an Alpaca file with no input column go through sampling and splitting."""
    chat = build_splits(tiny_cfg(dataset="bundled:products-chat-200", data_format="messages", train_samples=40))
    assert chat["train"].column_names[:1] == ["messages"] and len(chat["test"]) == 4
    assert [m["role"] for m in chat["train"][0]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    splits = build_splits(tiny_cfg(dataset=str(path), data_format="alpaca", train_samples=10))
    assert all(p.endswith("### Response:\n") and "### Input" not in p for p in splits["train"]["prompt"])


@pytest.mark.parametrize("settings, rows, says", [
    (dict(data_format="alpaca", columns={"instruction": "question"}), [{"q": "a", "output": "b"}],
     "lacks column(s) question (columns maps instruction to it) for the alpaca format (has: q, output)"),
    (dict(data_format="prompt_completion", template="Q: {question}\nA: "), [{"prompt": "a", "completion": "b"}],
     "lacks column(s) question for the prompt_completion format (has: prompt, completion)"),
    (dict(), [{"product": "a", "category": "b", "description": "c"}, {"product": "a", "category": None,
                                                                      "description": "c"}],
     "line 2: field 'category' is missing or null"),
    (dict(data_format="alpaca"), [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "  "}],
     "line 2: field 'output' is empty (only whitespace)"),
    (dict(data_format="messages"), [{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}],
     "line 1: field 'messages' message 2 must be {role: system|user|assistant, content: text}"),
    (dict(data_format="messages"), [{"messages": [{"role": "user", "content": "x"}]}],
     "line 1: field 'messages' needs an assistant message after another message"),
    (dict(data_format="text"), [{"text": "fine"}, {"text": 7}], "line 2: field 'text' is '7' (int), not text"),
    # the columns the format reads, by the dataset's names; an optional one may be empty but must be text
    (dict(data_format="alpaca", columns={"output": "answer"}), [{"instruction": "a", "answer": "b"},
                                                                {"instruction": "c", "answer": None}],
     "line 2: field 'answer' is missing or null"),
    (dict(data_format="alpaca"), [{"instruction": "a", "input": 5, "output": "b"}],
     "line 1: field 'input' is '5' (int), not text"),
    # a slice of the file: its rows are no longer the file's lines
    (dict(data_format="text", dataset_split="train[1:]"), [{"text": "a"}, {"text": "b"}, {"text": ""}],
     "row 2: field 'text' is empty"),
])
def test_bad_data_is_refused_with_one_line_naming_line_and_field(tmp_path, settings, rows, says):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        check_available(tiny_cfg(dataset=str(path), **settings))
    assert says in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_alpaca_input_may_be_missing_or_null(tmp_path):
    rows = [{"instruction": "a", "input": None, "output": "b"}, {"instruction": "c", "input": "", "output": "d"}]
    assert check_available(tiny_cfg(dataset=str(write_jsonl(tmp_path / "d.jsonl", rows)), data_format="alpaca")) == 2


def test_eval_prompts_are_the_spaces_own_then_heldout_rows():
    posts = ({"product": "Corelogic Smooth Mouse", "category": "Optical Mouse"},)
    cfg = tiny_cfg(eval_prompts=posts, heldout_prompts=2)
    items = quality_prompts(cfg, build_splits(cfg)["test"])
    assert [it["source"] for it in items] == ["space", "test", "test"]
    assert items[0] == {"title": "Corelogic Smooth Mouse (Optical Mouse)", "reference": None, "source": "space",
                        "prompt": render(cfg, {**posts[0], "description": ""})["prompt"]}
    assert items[1]["reference"] and items[1]["prompt"].endswith("### Response:\n")
    assert quality_prompts(tiny_cfg(heldout_prompts=0), build_splits(cfg)["test"]) == []  # no post prompts by default
    alpaca = tiny_cfg(data_format="alpaca", template="chat")
    assert space_prompt(alpaca, "Name a colour.")["prompt"] == [{"role": "user", "content": "Name a colour."}]
    chat = tiny_cfg(data_format="messages")
    assert space_prompt(chat, MESSAGES[:2])["prompt"] == MESSAGES[:2]
    assert space_prompt(chat, "Hi")["prompt"] == [{"role": "user", "content": "Hi"}]


def test_a_conversational_format_needs_a_chat_template():
    """The bundled tiny tokenizer has one (with {% generation %} markers); the 32k one has none."""
    assert chat_template_problem(tiny_cfg(data_format="messages", loss_on="assistant"), local_tokenizer(
        tiny_cfg())) is None
    cfg = tiny_cfg(model="random:open_llama_3b_v2", data_format="messages")
    field, msg = chat_template_problem(cfg, local_tokenizer(cfg))
    assert field == "chat_template" and "has none" in msg
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    cfg = tiny_cfg(model="random:open_llama_3b_v2", data_format="messages", chat_template=plain)
    assert chat_template_problem(cfg, local_tokenizer(cfg)) is None  # the space's template is used
    field, msg = chat_template_problem(tiny_cfg(data_format="messages", loss_on="assistant", chat_template=plain),
                                       local_tokenizer(tiny_cfg(chat_template=plain)))
    assert field == "loss_on" and "{% generation %}" in msg
    broken = tiny_cfg(data_format="alpaca", template="chat", chat_template="{% for m in messages %}")
    field, msg = chat_template_problem(broken, local_tokenizer(broken))
    assert field == "chat_template" and "does not render" in msg
    assert load_tokenizer(str(local_tokenizer(tiny_cfg()).name_or_path), chat_template=plain).chat_template == plain
