"""Task sources -> text examples.

A task's `source` is one of:
- `builtin:<generator>`: synthetic string tasks (reverse, sort, caesar, add, copy), generated
  from (seed, task name), so every run and every process sees the same data;
- `jsonl:PATH`, `csv:PATH`, `parquet:PATH`: local files, relative to the sweep file's folder;
- `hf:NAME[:CONFIG]`: a Hugging Face dataset (`task.split`).

`spec.tasks.check_task` validates a task from file headers only (what `mlora validate` runs);
`load_task` builds the examples (torch-free too; `datasets` is imported only to read files). Prompts carry no EOS: the
tokenizer step appends it to the completion. A row becomes an example as its `format` says (`spec.formats`). A task
with `choices` or `choices_field` gives every example its choices, each row checked to have its completion among
them.
"""

from __future__ import annotations

import dataclasses
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlora_cli import seeds
from mlora_cli.errors import ConfigError
from mlora_cli.spec.formats import messages_field, row_example
from mlora_cli.spec.schema import TaskConfig
from mlora_cli.spec.tasks import (
    BUILTIN_GENERATORS,
    FILE_LOADERS,
    check_task,
    choice_problem,
    choices_key,
    example_choices,
    first_line,
    missing_fields,
    read_fields,
    resolve_path,
    resolve_reward_path,
    source_fields,
)

# One alphabet for every letter task: tasks then differ only in their rule and prefix, which
# is what makes them interfere (the point of a continual-learning benchmark).
ALPHABET = string.ascii_lowercase


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    choices: tuple[str, ...] = ()  # task.choices or the row's choices_field (choice_accuracy); () for none
    # messages / sharegpt: the conversation before the reply, as (role, content) turns; the prompt is then its last
    # user turn's text. () for the other formats.
    history: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TaskData:
    name: str
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    format: str = "plain"  # task.format: how data.tokenize_example turns a prompt into tokens
    reward: str = "exact_match"  # task.reward, a python: path made absolute
    path: str = "task"  # the task's key in the sweep ("tasks[1]"), for messages about its data


# ---------------------------------------------------------------------------------------
# Builtin generators: draw(rng, task) -> input text; answer(input text, task) -> completion.


def _letters(rng: random.Random, task: TaskConfig) -> str:
    return "".join(rng.choices(ALPHABET, k=rng.randint(task.min_len, task.max_len)))


def _number(rng: random.Random, task: TaskConfig) -> int:
    digits = rng.randint(task.min_len, task.max_len)
    return rng.randrange(10) if digits == 1 else rng.randrange(10 ** (digits - 1), 10**digits)


def _sum_problem(rng: random.Random, task: TaskConfig) -> str:
    return f"{_number(rng, task)}+{_number(rng, task)}"


def _caesar(text: str, shift: int) -> str:
    return "".join(ALPHABET[(ALPHABET.index(c) + shift) % 26] for c in text)


Draw = Callable[[random.Random, TaskConfig], str]
Answer = Callable[[str, TaskConfig], str]
_GENERATORS: dict[str, tuple[Draw, Answer]] = {
    "reverse": (_letters, lambda text, task: text[::-1]),
    "sort": (_letters, lambda text, task: "".join(sorted(text))),
    "caesar": (_letters, lambda text, task: _caesar(text, task.shift)),
    "add": (_sum_problem, lambda text, task: str(sum(int(n) for n in text.split("+")))),
    "copy": (_letters, lambda text, task: text),
}
assert tuple(_GENERATORS) == BUILTIN_GENERATORS  # spec.tasks checks sources by these names


def _prompt(prefix: str, text: str) -> str:
    return f"{prefix} {text}=" if prefix else f"{text}="


def _load_builtin(task: TaskConfig, generator: str, seed: int) -> TaskData:
    draw, answer = _GENERATORS[generator]
    rng = random.Random(seeds.data_seed(seed, task.name))
    needed = task.eval_examples + task.train_examples
    seen: set[str] = set()
    inputs: list[str] = []
    while len(inputs) < needed:  # terminates: check_task made sure enough distinct inputs exist
        text = draw(rng, task)
        if text not in seen:
            seen.add(text)
            inputs.append(text)
    prefix = generator if task.prefix is None else task.prefix
    examples = tuple(Example(_prompt(prefix, text), answer(text, task)) for text in inputs)
    # Eval is drawn first, so changing train_examples leaves the eval set as it was.
    return TaskData(task.name, train=examples[task.eval_examples :], eval=examples[: task.eval_examples])


# ---------------------------------------------------------------------------------------
# Loading files and hf datasets through `datasets` (imported here only).


def _load_dataset(task: TaskConfig, source: str, key: str, base_dir: Path | None) -> Any:
    import datasets

    scheme, _, rest = source.partition(":")
    if scheme == "hf":
        name, _, config = rest.partition(":")
        try:
            return datasets.load_dataset(name, config or None, split=task.split)
        except Exception as exc:  # offline, not cached, no such dataset or split, ...
            raise ConfigError([f"{key}: cannot load hf dataset '{name}': {first_line(exc)}"]) from exc
    file = resolve_path(rest, base_dir)
    options: dict[str, Any] = {}
    if scheme == "csv":
        # CSV cells are text: without this pandas reads "007" as 7 and "NA" as a missing value.
        columns = read_fields(scheme, file)
        options = {
            "features": datasets.Features({c: datasets.Value("string") for c in columns}),
            "keep_default_na": False,
        }
    try:
        return datasets.load_dataset(FILE_LOADERS[scheme], data_files=str(file), split="train", **options)
    except Exception as exc:  # malformed rows, mixed types, ...
        raise ConfigError([f"{key}: cannot load {rest}: {first_line(exc)}"]) from exc


def _examples(dataset: Any, indices: list[int], task: TaskConfig, path: str, key: str) -> tuple[Example, ...]:
    """Rows `indices` of `dataset`, read from `task.<key>` ("source" or "eval_source"), as examples."""
    source = getattr(task, key)
    missing = missing_fields(task, path, source, list(dataset.column_names))
    if missing:
        raise ConfigError(missing)
    rows = dataset.select(indices)
    read = [column for _, column in source_fields(task)] + (["input"] if task.format == "alpaca" else [])
    columns = {name: list(rows[name]) for name in read if name in dataset.column_names}
    examples = []
    for position, index in enumerate(indices):
        row = {name: values[position] for name, values in columns.items()}
        try:
            prompt, completion, history = row_example(task.format, row, task.prompt_field, task.completion_field,
                                                      task.messages_field)
        except KeyError as exc:
            raise ConfigError([f"{path}.{key}: row {index} of {source} has no '{exc.args[0]}'"]) from None
        except ValueError as exc:  # row: its index in the source (for a JSONL or CSV file, its data row from 0)
            field = messages_field(task.format, task.messages_field)
            raise ConfigError([f"{path}.{key}: row {index} of {source}: '{field}': {exc}"]) from None
        choices: tuple[str, ...] = ()
        if task.choices is not None or task.choices_field is not None:
            try:
                choices = example_choices(task, row)
                problem = choice_problem(completion, choices)
            except ValueError as exc:
                problem = f"'{task.choices_field}': {exc}"
            if problem:
                raise ConfigError([f"{path}.{choices_key(task)}: row {index} of {source}: {problem}"])
        examples.append(Example(prompt, completion, choices, history))
    return tuple(examples)


def _load_rows(task: TaskConfig, seed: int, base_dir: Path | None, path: str) -> TaskData:
    train_set = _load_dataset(task, task.source, f"{path}.source", base_dir)
    order = list(range(len(train_set)))
    random.Random(seeds.data_seed(seed, task.name)).shuffle(order)
    if task.eval_source is None:
        # Held-out split: eval takes the first rows of the seeded shuffle, train what follows.
        eval_set, eval_indices = train_set, order[: task.eval_examples]
        train_indices = order[task.eval_examples : task.eval_examples + task.train_examples]
        if eval_indices and not train_indices:
            problem = f"{task.source} has {len(order)} rows, all held out for eval_examples; none left to train on"
            raise ConfigError([f"{path}.source: {problem}"])
    else:
        # A given eval set is used as is (file order), the same for every seed.
        eval_set = _load_dataset(task, task.eval_source, f"{path}.eval_source", base_dir)
        eval_indices = list(range(min(len(eval_set), task.eval_examples)))
        train_indices = order[: task.train_examples]
        if not eval_indices:
            raise ConfigError([f"{path}.eval_source: {task.eval_source} has no rows"])
    if not train_indices:
        raise ConfigError([f"{path}.source: {task.source} has no rows"])
    return TaskData(
        task.name,
        train=_examples(train_set, train_indices, task, path, "source"),
        eval=_examples(eval_set, eval_indices, task, path, "eval_source" if task.eval_source else "source"),
    )


def load_task(task: TaskConfig, seed: int, base_dir: Path | None, *, path: str = "task") -> TaskData:
    """Build one task's train and eval examples; deterministic in (seed, task.name).

    Raises ConfigError (lines prefixed with `path`) for any problem check_task finds, and for
    data that can only be seen when loaded (an hf dataset that cannot be fetched, empty splits).
    """
    problems = check_task(task, path, base_dir)
    if problems:
        raise ConfigError(problems)
    scheme, _, rest = task.source.partition(":")
    data = _load_builtin(task, rest, seed) if scheme == "builtin" else _load_rows(task, seed, base_dir, path)
    return dataclasses.replace(data, format=task.format, reward=resolve_reward_path(task.reward, base_dir), path=path)
