"""Task data formats: alpaca, messages (OpenAI-style) and sharegpt, from the row to the tokens that carry loss.

The tokenizer is the character tokenizer with a small chat template (`[role] content` per turn), so every
expected token is a character of a known string. A sweep on a tiny Llama folder trains each format end to end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import mlora, write_sweep

from mlora_cli.data.batches import IGNORE, collate, tokenize_task
from mlora_cli.data.sources import Example, load_task
from mlora_cli.errors import ConfigError
from mlora_cli.model.base import char_tokenizer
from mlora_cli.spec.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, conversation
from mlora_cli.spec.schema import TaskConfig
from mlora_cli.spec.tasks import check_task

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "sum 2+3"},
    {"role": "assistant", "content": "5"},
]
SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    tokenizer = char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def as_sharegpt(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"from": SHAREGPT[t["role"]], "value": t["content"]} for t in turns]


def trained_text(tokenizer: Any, row: Any) -> list[str]:
    """The text of each run of consecutive tokens that carries loss in the row's collated labels."""
    labels = collate([row], tokenizer.pad_token_id).labels[0].tolist()
    runs: list[list[int]] = []
    for position, label in enumerate(labels):
        if label != IGNORE:
            if not runs or labels[position - 1] == IGNORE:
                runs.append([])
            runs[-1].append(label)
    return [tokenizer.decode(run) for run in runs]


def conversation_task(format: str, **fields: Any) -> TaskConfig:
    return TaskConfig(name="chat", source="jsonl:data.jsonl", format=format, train_examples=2, eval_examples=1,
                      **fields)


@pytest.mark.parametrize("format", ["messages", "sharegpt"])
def test_a_conversation_learns_every_assistant_turn_and_evaluates_the_last(
    format: str, tokenizer: Any, tmp_path: Path
) -> None:
    turns = CONVERSATION if format == "messages" else as_sharegpt(CONVERSATION)
    field = "messages" if format == "messages" else "conversations"
    write_jsonl(tmp_path / "data.jsonl", [{field: turns, "id": i} for i in range(3)])
    data = load_task(conversation_task(format), seed=0, base_dir=tmp_path)
    example = data.train[0]
    assert (example.prompt, example.completion) == ("sum 2+3", "5")  # the last user turn: what rewards see
    assert example.history == (("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "sum 2+3"))

    task = tokenize_task(data, tokenizer, max_seq_len=200)
    train, evaluated = task.train[0], task.eval[0]
    prompt = "[system] be brief\n[user] hi\n[assistant] hello\n[user] sum 2+3\n[assistant] "
    assert tokenizer.decode(train.ids[: train.prompt_len]) == prompt
    assert train.ids == evaluated.ids and train.prompt_len == evaluated.prompt_len
    # Training: the earlier reply (its trailing newline is layout) and the last one with eos; evaluation: the last.
    assert trained_text(tokenizer, train) == ["hello", "5<eos>"]
    assert trained_text(tokenizer, evaluated) == ["5<eos>"]


def test_a_one_turn_conversation_is_the_chat_format(tokenizer: Any) -> None:
    from mlora_cli.data.batches import tokenize_example

    chat = tokenize_example(Example("sum 2+3", "5"), tokenizer, 64, "chat", trained_history=True)
    turns = ((("user", "sum 2+3"),))
    assert tokenize_example(Example("sum 2+3", "5", history=turns), tokenizer, 64, "messages",
                            trained_history=True) == chat


def test_truncation_keeps_the_reply_and_moves_the_trained_spans(tokenizer: Any, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [{"messages": CONVERSATION}] * 3)
    data = load_task(conversation_task("messages"), seed=0, base_dir=tmp_path)
    full = tokenize_task(data, tokenizer, max_seq_len=200).train[0]
    hello = tokenizer.decode(full.ids).index("hello")  # one token per character
    for cut, expected in ((10, ["hello", "5<eos>"]), (hello + 2, ["llo", "5<eos>"]), (hello + 6, ["5<eos>"])):
        row = tokenize_task(data, tokenizer, max_seq_len=full.tokens - cut).train[0]
        assert row.ids == full.ids[cut:] and row.prompt_len == full.prompt_len - cut
        assert trained_text(tokenizer, row) == expected


def test_alpaca_rows_use_alpacas_prompt_template(tokenizer: Any, tmp_path: Path) -> None:
    rows = [{"instruction": "Add.", "input": "2+3", "output": "5"}, {"instruction": "Say hi.", "input": "",
                                                                     "output": "hi"}] * 2
    write_jsonl(tmp_path / "data.jsonl", rows)
    task = TaskConfig(name="a", source="jsonl:data.jsonl", format="alpaca", train_examples=3, eval_examples=1)
    data = load_task(task, seed=0, base_dir=tmp_path)
    examples = {e.completion: e for e in data.train + data.eval}
    assert examples["5"].prompt == ALPACA_WITH_INPUT.format(instruction="Add.", input="2+3")
    assert examples["hi"].prompt == ALPACA_NO_INPUT.format(instruction="Say hi.")
    assert examples["5"].prompt.endswith("### Input:\n2+3\n\n### Response:\n")
    row = tokenize_task(data, tokenizer, 400).train[0]
    assert trained_text(tokenizer, row) == [row.completion + "<eos>"]  # a plain prompt: loss on the output only


def test_conversations_read_from_parquet_and_csv(tokenizer: Any, tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"messages": [CONVERSATION] * 3}).to_parquet(str(tmp_path / "data.parquet"))
    (tmp_path / "data.csv").write_text("messages\n" + "\n".join(
        '"' + json.dumps(CONVERSATION).replace('"', '""') + '"' for _ in range(3)) + "\n")
    for source in ("parquet:data.parquet", "csv:data.csv"):
        task = TaskConfig(name="c", source=source, format="messages", train_examples=2, eval_examples=1)
        assert check_task(task, "tasks[0]", tmp_path) == []
        example = load_task(task, seed=0, base_dir=tmp_path).train[0]
        assert example.history[-1] == ("user", "sum 2+3") and example.completion == "5"


@pytest.mark.parametrize(("value", "problem"), [
    ([], "expected a non-empty list of turns, got []"),
    ([{"role": "user"}], "turn 0: expected {role, content}, got {'role': 'user'}"),
    ([{"role": "bot", "content": "x"}], "turn 0: unknown role 'bot' (known: system, user, assistant, tool)"),
    ([{"role": "user", "content": ["x"]}], "turn 0: content must be text, got ['x']"),
    ([{"role": "user", "content": "x"}], "the last turn must be the assistant's reply (the reference), not user"),
    ([{"role": "assistant", "content": "x"}], "no user turn before the reply"),
    ("[nope", "not a JSON list of turns (Expecting value)"),
])
def test_malformed_conversations_say_what_is_wrong(value: Any, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        conversation(value, "messages")
    assert str(caught.value) == problem


def test_validate_names_the_key_and_the_line(tmp_path: Path) -> None:
    bad_role = [*CONVERSATION[:2], {"role": "bot", "content": "x"}]
    write_jsonl(tmp_path / "data.jsonl", [{"messages": CONVERSATION}, {"messages": bad_role}])
    assert check_task(conversation_task("messages"), "tasks[0]", tmp_path) == [
        "tasks[0].source: data.jsonl line 2: 'messages': turn 2: unknown role 'bot' (known: system, user, "
        "assistant, tool)"]
    assert check_task(conversation_task("sharegpt"), "tasks[0]", tmp_path) == [
        "tasks[0].messages_field: 'conversations' not in data.jsonl (fields: messages)"]
    assert check_task(conversation_task("sharegpt", messages_field="messages"), "tasks[0]", tmp_path) == [
        "tasks[0].source: data.jsonl line 1: 'messages': turn 0: expected {from, value}, got {'role': 'system', "
        "'content': 'be brief'}"]
    assert check_task(conversation_task("alpaca"), "tasks[0]", tmp_path) == [
        "tasks[0].format: alpaca: 'instruction' not in data.jsonl (fields: messages)",
        "tasks[0].format: alpaca: 'output' not in data.jsonl (fields: messages)"]
    builtin = TaskConfig(name="b", source="builtin:copy", format="messages")
    assert check_task(builtin, "tasks[1]", None) == [
        "tasks[1].format: builtin tasks are prompt and completion text (plain or chat); messages reads its fields "
        "from a jsonl, csv, parquet or hf source"]


def test_a_row_missing_its_conversation_fails_at_load(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"messages": [CONVERSATION, None, CONVERSATION]}).to_parquet(
        str(tmp_path / "data.parquet"))
    task = TaskConfig(name="c", source="parquet:data.parquet", format="messages", train_examples=2, eval_examples=1)
    with pytest.raises(ConfigError) as caught:
        load_task(task, seed=0, base_dir=tmp_path, path="tasks[0]")
    assert caught.value.problems == ["tasks[0].source: row 1 of parquet:data.parquet has no 'messages'"]


def test_a_template_that_rewrites_earlier_turns_is_one_line(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    # Numbers each turn from the end: a turn renders differently once later turns follow.
    tokenizer.chat_template = ("{% for m in messages %}[{{ loop.revindex }}] {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}[a] {% endif %}")
    write_jsonl(tmp_path / "data.jsonl", [{"messages": CONVERSATION}] * 3)
    data = load_task(conversation_task("messages"), seed=0, base_dir=tmp_path, path="tasks[2]")
    with pytest.raises(ConfigError) as caught:
        tokenize_task(data, tokenizer, 200)
    assert caught.value.problems == [
        "tasks[2].format: train example 0: turn 2: the chat template renders the conversation up to this assistant "
        "turn differently once later turns follow, so its tokens cannot be marked for loss"]


@pytest.mark.slow
def test_every_format_trains_in_one_sweep(tmp_path: Path) -> None:
    from test_models import save_tiny_model

    folder = save_tiny_model("llama", tmp_path / "llama", TEMPLATE)
    rows = [{"messages": [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": str(a + b)},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": str(a + b)}],
             "instruction": "Add.", "input": f"{a}+{b}", "output": str(a + b)} for a in range(6) for b in range(6)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    write_jsonl(tmp_path / "share.jsonl", [{"conversations": as_sharegpt(r["messages"])} for r in rows])
    task = {"source": "jsonl:data.jsonl", "train_examples": 24, "eval_examples": 8}
    sweep = {
        "name": "formats", "base_model": str(folder), "devices": "cpu", "seed": 0,
        "tasks": [{"name": "messages", "format": "messages", **task},
                  {"name": "alpaca", "format": "alpaca", **task},
                  {**task, "name": "sharegpt", "format": "sharegpt", "source": "jsonl:share.jsonl"}],
        "adapter": {"rank": 4, "lr": 1e-2},
        "train": {"steps_per_task": 3, "batch_size": 4, "max_seq_len": 400, "checkpoint_every": None},
        "eval": {"metrics": ["loss", "exact_match"], "max_new_tokens": 4},
    }
    result = mlora("run", write_sweep(tmp_path, sweep), "--no-plots")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    (entry,) = results["adapters"].values()
    assert entry["status"] == "done"
    for name in ("messages", "alpaca", "sharegpt"):
        assert torch.isfinite(torch.tensor(entry["final"][name]["loss"])) and "exact_match" in entry["final"][name]


def test_a_conversation_task_needs_a_chat_template(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [{"messages": CONVERSATION}] * 3)
    sweep = {"name": "f", "base_model": "builtin:micro", "devices": "cpu",
             "tasks": [{"name": "c", "source": "jsonl:data.jsonl", "format": "messages", "train_examples": 2,
                        "eval_examples": 1}], "train": {"steps_per_task": 1}}
    result = mlora("run", write_sweep(tmp_path, sweep), "--no-plots", columns=300)
    assert result.exit_code == 2
    assert "tasks[0].format: messages needs a chat template, and the tokenizer of builtin:micro has none (set " \
           "model.tokenizer: one with a template)" in result.output
