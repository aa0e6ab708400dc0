"""Tokenized tasks, per-adapter batch sampling, and padding rows into tensors.

Every example is `prompt ids + completion ids + eos`; only the completion and eos carry
loss. An eval example with choices also carries one such row per choice (`Row.choices`).
A `format: chat` task's prompt is first wrapped as one user turn by the tokenizer's chat template
(with the assistant header, `add_generation_prompt`), so the completion is the assistant's reply. A conversation
(`messages`, `sharegpt`) is rendered whole up to its last reply the same way; in training rows its earlier
assistant turns carry loss too (`Row.trained`), each turn's tokens found by rendering the conversation up to it.
Batches are padded to their own longest row, never to `max_seq_len`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlora_cli import seeds
from mlora_cli.data.sources import Example, TaskData
from mlora_cli.errors import ConfigError
from mlora_cli.spec.formats import TEMPLATED
from mlora_cli.spec.schema import TaskConfig

IGNORE = -100


@dataclass(frozen=True)
class Row:
    ids: tuple[int, ...]
    prompt_len: int  # tokens before the completion
    completion: str  # the reference text, for exact match and rewards
    prompt: str = ""  # the prompt text, for rewards
    # Eval rows of a task with choices: one row per choice, each tokenized as a training row whose completion is
    # that choice (choice_accuracy scores them); () otherwise.
    choices: tuple[Row, ...] = ()
    # Training rows of a conversation: the [start, end) spans of earlier assistant turns, inside the prompt, that
    # carry loss besides the completion; () otherwise (eval rows score the reply only).
    trained: tuple[tuple[int, int], ...] = ()

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class TokenizedTask:
    name: str
    train: tuple[Row, ...]
    eval: tuple[Row, ...]
    reward: str = "exact_match"  # what scores a completion (train.rewards)


def check_formats(tasks: Sequence[TaskConfig], tokenizer: Any, model_name: str) -> None:
    """ConfigError for every task whose format renders through a chat template (chat, messages, sharegpt) when the
    tokenizer has none (known at worker start)."""
    if getattr(tokenizer, "chat_template", None):
        return
    problems = [f"tasks[{i}].format: {task.format} needs a chat template, and the tokenizer of {model_name} has none "
                + ("(use format: plain, or model.tokenizer: one with a template)" if task.format == "chat" else
                   "(set model.tokenizer: one with a template)")
                for i, task in enumerate(tasks) if task.format in TEMPLATED]
    if problems:
        raise ConfigError(problems)


def prompt_ids(example: Example, tokenizer: Any, format: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The example's prompt tokens, and the [start, end) token spans in them of earlier assistant turns (which carry
    loss in training: a conversation's every assistant turn is learned, not only the reply)."""
    if format not in TEMPLATED:
        return tokenizer(example.prompt, add_special_tokens=True)["input_ids"], []
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"format: {format} needs a tokenizer with a chat template")
    turns = example.history or (("user", example.prompt),)
    text = _render(tokenizer, turns, generation=True)
    cuts = [0]  # character offsets: text[cuts[0]:cuts[1]] untrained, text[cuts[1]:cuts[2]] an assistant turn, ...
    for index, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        before, through = _render(tokenizer, turns[:index], generation=True), _render(tokenizer, turns[: index + 1])
        if not (through.startswith(before) and text.startswith(through) and len(before) >= cuts[-1]):
            raise ValueError(f"turn {index}: the chat template renders the conversation up to this assistant turn "
                             "differently once later turns follow, so its tokens cannot be marked for loss")
        # Trailing whitespace after the end-of-turn marker is layout, not the reply: it carries no loss.
        cuts += [len(before), len(before) + len(through[len(before) :].rstrip())]
    cuts.append(len(text))
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for piece, (start, end) in enumerate(itertools.pairwise(cuts)):
        # Each piece is tokenized on its own, as the prompt and the completion are: a token never straddles the
        # edge of a trained span. The template already wrote any special tokens (bos, turn markers).
        tokens = tokenizer(text[start:end], add_special_tokens=False)["input_ids"] if end > start else []
        if piece % 2:
            spans.append((len(ids), len(ids) + len(tokens)))
        ids += tokens
    return ids, spans


def _render(tokenizer: Any, turns: Sequence[tuple[str, str]], generation: bool = False) -> str:
    messages = [{"role": role, "content": content} for role, content in turns]
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
    except Exception as exc:  # a template's own raise_exception (roles must alternate, ...), a jinja error
        raise ValueError(f"the chat template refuses the conversation: {str(exc).strip().splitlines()[0]}") from None


def tokenize_example(example: Example, tokenizer: Any, max_seq_len: int, format: str = "plain",
                     with_choices: bool = False, trained_history: bool = False) -> Row:
    """The example as a row; `with_choices`: with a row per choice (`Row.choices`), tokenized the same way;
    `trained_history`: earlier assistant turns of a conversation carry loss too (training rows)."""
    prompt, spans = prompt_ids(example, tokenizer, format)
    choices = tuple(_row(prompt, example.prompt, choice, tokenizer, max_seq_len)
                    for choice in (example.choices if with_choices else ()))
    return _row(prompt, example.prompt, example.completion, tokenizer, max_seq_len, choices,
                spans if trained_history else [])


def _row(prompt: list[int], prompt_text: str, completion_text: str, tokenizer: Any, max_seq_len: int,
         choices: tuple[Row, ...] = (), spans: Sequence[tuple[int, int]] = ()) -> Row:
    completion = tokenizer(completion_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # Too long: keep the whole completion (the thing learned) and the end of the prompt.
    keep_prompt = max(1, max_seq_len - len(completion))
    cut = max(0, len(prompt) - keep_prompt)
    prompt = prompt[cut:]
    ids = (prompt + completion)[:max_seq_len]
    trained = tuple((max(0, start - cut), end - cut) for start, end in spans if end - cut > max(0, start - cut))
    return Row(ids=tuple(ids), prompt_len=len(prompt), completion=completion_text, prompt=prompt_text,
               choices=choices, trained=trained)


def tokenize_task(task: TaskData, tokenizer: Any, max_seq_len: int) -> TokenizedTask:
    """ConfigError (`tasks[i].format: ...`) for an example the chat template cannot render or mark."""

    def rows(examples: Sequence[Example], split: str, **options: bool) -> tuple[Row, ...]:
        tokenized = []
        for number, example in enumerate(examples):
            try:
                tokenized.append(tokenize_example(example, tokenizer, max_seq_len, task.format, **options))
            except ValueError as exc:
                raise ConfigError([f"{task.path}.format: {split} example {number}: {exc}"]) from None
        return tuple(tokenized)

    train = rows(task.train, "train", trained_history=True)
    if train and not any(row.tokens > row.prompt_len or row.trained for row in train):
        raise ConfigError([f"{task.path}: no training example keeps a token of its completion within "
                           f"train.max_seq_len={max_seq_len}: raise it"])
    return TokenizedTask(name=task.name, train=train, eval=rows(task.eval, "eval", with_choices=True),
                         reward=task.reward)


class BatchSampler:
    """An adapter's own stream of training rows: reshuffled every epoch, from its own RNG.

    Seeded by (adapter seed, task index) only, so the batches an adapter sees do not depend
    on its neighbours, and the sequential baseline can replay them exactly.
    """

    def __init__(self, size: int, seed: int, task_index: int):
        self.size = size
        self.rng = random.Random(seeds.batch_order(seed, task_index))
        self.order: list[int] = []
        self.position = 0

    def next(self, batch_size: int) -> list[int]:
        picked = []
        while len(picked) < batch_size:
            if self.position >= len(self.order):
                self.order = list(range(self.size))
                self.rng.shuffle(self.order)
                self.position = 0
            take = min(batch_size - len(picked), len(self.order) - self.position)
            picked.extend(self.order[self.position : self.position + take])
            self.position += take
        return picked

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "order": self.order, "position": self.position}

    def load_state(self, state: dict[str, Any]) -> None:
        rng_state = state["rng"]
        self.rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
        self.order, self.position = list(state["order"]), state["position"]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (R, L)
    attention_mask: torch.Tensor  # (R, L)
    labels: torch.Tensor  # (R, L), IGNORE outside completions

    @property
    def tokens_per_row(self) -> torch.Tensor:
        return self.attention_mask.sum(1)


def collate(rows: list[Row], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Right-pad rows to the longest one; labels only on completion tokens (and a row's `trained` spans)."""
    length = max(r.tokens for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.tensor(row.ids, dtype=torch.long)
        input_ids[i, : row.tokens] = ids
        attention_mask[i, : row.tokens] = 1
        labels[i, row.prompt_len : row.tokens] = ids[row.prompt_len :]
        for start, end in row.trained:
            labels[i, start:end] = ids[start:end]
    return Batch(*(to_device(t, device) for t in (input_ids, attention_mask, labels)))


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """To `device`; through pinned memory and without blocking when that is a GPU."""
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def collate_prompts(
    rows: list[Row], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad the prompts of rows, for generation."""
    length = max(r.prompt_len for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - row.prompt_len :] = torch.tensor(row.ids[: row.prompt_len], dtype=torch.long)
        attention_mask[i, length - row.prompt_len :] = 1
    return input_ids.to(device), attention_mask.to(device)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row summed completion loss, completion token count, and correct-token count (position t predicts t+1)."""
    return predicted_token_losses(logits[:, :-1], labels[:, 1:])


def predicted_token_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """`token_losses` where logits[:, t] already predicts targets[:, t] (IGNORE: no loss)."""
    predicting = logits.float()
    losses = torch.nn.functional.cross_entropy(
        predicting.reshape(-1, predicting.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view_as(targets)
    mask = targets != IGNORE
    correct = (predicting.argmax(-1) == targets) & mask
    return losses.sum(1), mask.sum(1), correct.sum(1)
