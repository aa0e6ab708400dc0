"""Task data formats: which fields a row has, and how a row becomes a prompt and a reference reply. Torch-free.

- `plain`: `prompt_field` then `completion_field`, as text.
- `chat`: the same fields; the prompt becomes one user turn of the tokenizer's chat template.
- `alpaca`: `instruction`, optional `input`, `output` (Stanford Alpaca's fields), written out with Alpaca's
  prompt template as a plain prompt; the reply is `output`.
- `messages`: OpenAI-style `messages` (`messages_field`): a list of {role, content}, roles system / user /
  assistant / tool, ending with the assistant's reply.
- `sharegpt`: `conversations` (`messages_field`): a list of {from, value}, from system / human / gpt (user,
  assistant and tool also read), ending with gpt's reply.

A conversation's last turn is the reference reply (what exact match and rewards compare with, and what generation
continues); every turn before it is the prompt, rendered by the chat template. Training puts loss on every
assistant turn (the earlier ones included); evaluation scores the last (`data.batches`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

CONVERSATIONS = ("messages", "sharegpt")
# The chat template renders the prompt of these formats.
TEMPLATED = ("chat", *CONVERSATIONS)
ALPACA_FIELDS = ("instruction", "input", "output")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "function_call": "assistant", "observation": "tool"}
# Stanford Alpaca's prompt templates (github.com/tatsu-lab/stanford_alpaca, train.py), with and without an input.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

Turn = tuple[str, str]  # (role, content)


def messages_field(format: str, configured: str | None) -> str:
    """The column that holds a conversation: `messages_field`, else the format's usual name."""
    return configured or ("conversations" if format == "sharegpt" else "messages")


def required_fields(format: str, prompt_field: str, completion_field: str,
                    configured: str | None) -> list[tuple[str, str]]:
    """(task key, column) pairs a source must have for `format`; a key of "format" names the format's own field."""
    if format == "alpaca":
        return [("format", "instruction"), ("format", "output")]
    if format in CONVERSATIONS:
        return [("messages_field", messages_field(format, configured))]
    return [("prompt_field", prompt_field), ("completion_field", completion_field)]


def alpaca_prompt(instruction: Any, input: Any) -> str:
    if input is None or str(input) == "":
        return ALPACA_NO_INPUT.format(instruction=instruction)
    return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)


def conversation(value: Any, format: str) -> tuple[Turn, ...]:
    """A row's conversation as (role, content) turns; ValueError saying what is wrong with it. Text (a CSV cell)
    is read as JSON."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON list of turns ({exc.msg})") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"expected a non-empty list of turns, got {_short(value)}")
    role_key, content_key = ("from", "value") if format == "sharegpt" else ("role", "content")
    turns = []
    for number, turn in enumerate(value):
        if not isinstance(turn, Mapping) or role_key not in turn or content_key not in turn:
            raise ValueError(f"turn {number}: expected {{{role_key}, {content_key}}}, got {_short(turn)}")
        role, content = turn[role_key], turn[content_key]
        role = SHAREGPT_ROLES.get(role) if format == "sharegpt" else (role if role in ROLES else None)
        if role is None:
            known = ", ".join(SHAREGPT_ROLES if format == "sharegpt" else ROLES)
            raise ValueError(f"turn {number}: unknown {role_key} {turn[role_key]!r} (known: {known})")
        if not isinstance(content, str):
            raise ValueError(f"turn {number}: {content_key} must be text, got {_short(content)}")
        turns.append((role, content))
    if turns[-1][0] != "assistant":
        raise ValueError(f"the last turn must be the assistant's reply (the reference), not {turns[-1][0]}")
    if not any(role == "user" for role, _ in turns[:-1]):
        raise ValueError("no user turn before the reply")
    return tuple(turns)


def row_example(format: str, row: Mapping[str, Any], prompt_field: str, completion_field: str,
                configured: str | None) -> tuple[str, str, tuple[Turn, ...]]:
    """(prompt, reference reply, turns before the reply) of one source row; the turns are () unless the format is a
    conversation, and then the prompt is the last user turn's text (what a reward function sees).
    KeyError for a missing field, ValueError for a malformed one."""
    if format == "alpaca":
        for name in ("instruction", "output"):
            if row.get(name) is None:
                raise KeyError(name)
        return alpaca_prompt(row["instruction"], row.get("input")), str(row["output"]), ()
    if format in CONVERSATIONS:
        field = messages_field(format, configured)
        if row.get(field) is None:
            raise KeyError(field)
        turns = conversation(row[field], format)
        history = turns[:-1]
        prompt = next(content for role, content in reversed(history) if role == "user")
        return prompt, turns[-1][1], history
    for name in (prompt_field, completion_field):
        if row.get(name) is None:
            raise KeyError(name)
    return str(row[prompt_field]), str(row[completion_field]), ()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
