"""Task sources -> text examples.

A task's `source` is one of:
- `builtin:<generator>`: synthetic string tasks (reverse, sort, caesar, add, copy), generated
  from (seed, task name), so every run and every process sees the same data;
- `jsonl:PATH`, `csv:PATH`, `parquet:PATH`: local files, relative to the sweep file's folder;
- `hf:NAME[:CONFIG]`: a Hugging Face dataset (`task.split`).

`check_task` validates a task from file headers only (what `mlora validate` runs, so it never
imports `datasets` or torch); `load_task` builds the examples. Prompts carry no EOS: the
tokenizer step appends it to the completion.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlora_cli.config import ConfigError, TaskConfig, did_you_mean

# One alphabet for every letter task: tasks then differ only in their rule and prefix, which
# is what makes them interfere (the point of a continual-learning benchmark).
ALPHABET = string.ascii_lowercase
SCHEMES = ("builtin", "jsonl", "csv", "parquet", "hf")
FILE_LOADERS = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}  # scheme -> `datasets` builder
_HF_FORM = re.compile(r"([^:\s]+)(?::([^:\s]+))?")


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


@dataclass(frozen=True)
class TaskData:
    name: str
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    format: str = "plain"  # task.format: how data.tokenize_example turns a prompt into tokens


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
BUILTIN_GENERATORS: tuple[str, ...] = tuple(_GENERATORS)


def _distinct_inputs(generator: str, task: TaskConfig, needed: int) -> int:
    """How many distinct inputs `generator` can draw, counted only as far as `needed`."""
    numbers = total = 0
    for length in range(task.min_len, task.max_len + 1):
        # Capped at 16: 26**16 and 10**16 exceed any example count, and huge lengths stay instant.
        if generator == "add":
            numbers += 10 if length == 1 else 9 * 10 ** (min(length, 16) - 1)
            total = numbers**2  # an add input is a pair of numbers
        else:
            total += 26 ** min(length, 16)
        if total >= needed:
            return needed
    return total


def _stable_seed(seed: int, name: str) -> int:
    # Python's hash() is salted per process; workers must agree on the data.
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "big")


def _prompt(prefix: str, text: str) -> str:
    return f"{prefix} {text}=" if prefix else f"{text}="


def _load_builtin(task: TaskConfig, generator: str, seed: int) -> TaskData:
    draw, answer = _GENERATORS[generator]
    rng = random.Random(_stable_seed(seed, task.name))
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
# Checking (fast, no `datasets` import).


def _resolve(file: str, base_dir: Path | None) -> Path:
    path = Path(file).expanduser()
    return base_dir / path if base_dir is not None and not path.is_absolute() else path


def _read_fields(scheme: str, path: Path) -> list[str]:
    """Column names from the file's header (first row for jsonl); ValueError if unreadable or empty."""
    if scheme == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.read_metadata(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise ValueError(_first_line(exc)) from exc
        if meta.num_rows == 0:
            raise ValueError("no rows")
        return list(meta.schema.names)
    with path.open(newline="", encoding="utf-8") as f:
        if scheme == "csv":
            header = next(csv.reader(f), None)
            if not header:
                raise ValueError("no header row")
            return header
        for number, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)  # JSONDecodeError is a ValueError
                if not isinstance(row, dict):
                    raise ValueError(f"line {number} is not a JSON object")
                return list(row)
    raise ValueError("no rows")


def _unknown_source(source: str, key: str) -> str:
    scheme, sep, _ = source.partition(":")
    hint = did_you_mean(scheme, SCHEMES) if sep else ""
    for name in FILE_LOADERS:
        if not sep and source.endswith(f".{name}"):
            hint = f" (did you mean '{name}:{source}'?)"
    expected = "builtin:NAME, jsonl:PATH, csv:PATH, parquet:PATH or hf:NAME[:CONFIG]"
    return f"{key}: unknown source '{source}'; expected {expected}{hint}"


def _check_data_source(task: TaskConfig, source: str, key: str, path: str, base_dir: Path | None) -> list[str]:
    scheme, _, rest = source.partition(":")
    if scheme == "builtin":
        return [f"{key}: a builtin cannot be an eval_source (builtins make their own eval split)"]
    if scheme == "hf":
        return [] if _HF_FORM.fullmatch(rest) else [f"{key}: expected hf:NAME[:CONFIG], got '{source}'"]
    if scheme not in FILE_LOADERS:
        return [_unknown_source(source, key)]
    if not rest:
        return [f"{key}: missing path after '{scheme}:'"]
    file = _resolve(rest, base_dir)
    if not file.is_file():
        return [f"{key}: no such file: {rest}"]
    try:
        fields = _read_fields(scheme, file)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [f"{key}: cannot read {rest}: {_first_line(exc)}"]
    return [
        f"{path}.{name}: '{value}' not in {rest} (fields: {', '.join(fields)})"
        for name, value in (("prompt_field", task.prompt_field), ("completion_field", task.completion_field))
        if value not in fields
    ]


def _check_builtin(task: TaskConfig, generator: str, path: str) -> list[str]:
    if generator not in _GENERATORS:
        hint = did_you_mean(generator, BUILTIN_GENERATORS) or f" (choose from {', '.join(BUILTIN_GENERATORS)})"
        return [f"{path}.source: unknown builtin '{generator}'{hint}"]
    problems = []
    if task.eval_source is not None:
        problems.append(f"{path}.eval_source: not allowed for builtin sources (they make their own eval split)")
    if task.prefix is not None and not all(" " <= c <= "~" for c in task.prefix):
        problems.append(f"{path}.prefix: use printable ASCII only (no tabs or newlines), got {task.prefix!r}")
    needed = task.train_examples + task.eval_examples
    if task.min_len <= task.max_len and (available := _distinct_inputs(generator, task, needed)) < needed:
        problems.append(
            f"{path}.train_examples: builtin:{generator} with lengths {task.min_len}..{task.max_len} has only "
            f"{available} distinct inputs, fewer than train_examples + eval_examples = {needed}; raise max_len"
        )
    return problems


def check_task(task: TaskConfig, path: str, base_dir: Path | None) -> list[str]:
    """Problems with one task, each `path.key: message`; reads file headers only."""
    problems = []
    if task.min_len > task.max_len:
        problems.append(f"{path}.min_len: must be <= max_len ({task.min_len} > {task.max_len})")
    scheme, _, rest = task.source.partition(":")
    if scheme == "builtin":
        return problems + _check_builtin(task, rest, path)
    problems += _check_data_source(task, task.source, f"{path}.source", path, base_dir)
    if task.eval_source is not None:
        problems += _check_data_source(task, task.eval_source, f"{path}.eval_source", path, base_dir)
    return problems


# ---------------------------------------------------------------------------------------
# Loading files and hf datasets through `datasets` (imported here only).


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _load_dataset(task: TaskConfig, source: str, key: str, base_dir: Path | None) -> Any:
    import datasets

    scheme, _, rest = source.partition(":")
    if scheme == "hf":
        name, _, config = rest.partition(":")
        try:
            return datasets.load_dataset(name, config or None, split=task.split)
        except Exception as exc:  # offline, not cached, no such dataset or split, ...
            raise ConfigError([f"{key}: cannot load hf dataset '{name}': {_first_line(exc)}"]) from exc
    file = _resolve(rest, base_dir)
    options: dict[str, Any] = {}
    if scheme == "csv":
        # CSV cells are text: without this pandas reads "007" as 7 and "NA" as a missing value.
        columns = _read_fields(scheme, file)
        options = {
            "features": datasets.Features({c: datasets.Value("string") for c in columns}),
            "keep_default_na": False,
        }
    try:
        return datasets.load_dataset(FILE_LOADERS[scheme], data_files=str(file), split="train", **options)
    except Exception as exc:  # malformed rows, mixed types, ...
        raise ConfigError([f"{key}: cannot load {rest}: {_first_line(exc)}"]) from exc


def _examples(dataset: Any, indices: list[int], task: TaskConfig, path: str, key: str) -> tuple[Example, ...]:
    """Rows `indices` of `dataset`, read from `task.<key>` ("source" or "eval_source"), as examples."""
    source = getattr(task, key)
    for name, value in (("prompt_field", task.prompt_field), ("completion_field", task.completion_field)):
        if value not in dataset.column_names:
            raise ConfigError([f"{path}.{name}: '{value}' not in {source} (fields: {', '.join(dataset.column_names)})"])
    rows = dataset.select(indices)
    prompts, completions = list(rows[task.prompt_field]), list(rows[task.completion_field])
    for index, prompt, completion in zip(indices, prompts, completions, strict=True):
        if prompt is None or completion is None:
            field = task.prompt_field if prompt is None else task.completion_field
            raise ConfigError([f"{path}.{key}: row {index} of {source} has no '{field}'"])
    return tuple(Example(str(p), str(c)) for p, c in zip(prompts, completions, strict=True))


def _load_rows(task: TaskConfig, seed: int, base_dir: Path | None, path: str) -> TaskData:
    train_set = _load_dataset(task, task.source, f"{path}.source", base_dir)
    order = list(range(len(train_set)))
    random.Random(_stable_seed(seed, task.name)).shuffle(order)
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
    return dataclasses.replace(data, format=task.format)
