"""Checking a task's source from file headers only: what `mlora validate` runs (no `datasets`, no torch).

`check_task` returns one `tasks[i].key: message` line per problem: an unknown scheme or
builtin generator, a missing file, a field not in its header, too few distinct builtin inputs,
a JSONL/CSV row whose completion is not one of its choices.
Loading the examples is `data.sources.load_task`.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from mlora_cli.spec.convert import did_you_mean
from mlora_cli.spec.formats import CONVERSATIONS, messages_field, required_fields, row_example
from mlora_cli.spec.schema import TaskConfig

SCHEMES = ("builtin", "jsonl", "csv", "parquet", "hf")
FILE_LOADERS = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}  # scheme -> `datasets` builder
HF_FORM = re.compile(r"([^:\s]+)(?::([^:\s]+))?")
# The builtin generators (data.sources holds their code).
BUILTIN_GENERATORS = ("reverse", "sort", "caesar", "add", "copy")


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


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def resolve_path(file: str, base_dir: Path | None) -> Path:
    path = Path(file).expanduser()
    return base_dir / path if base_dir is not None and not path.is_absolute() else path


def read_fields(scheme: str, path: Path) -> list[str]:
    """Column names from the file's header (first row for jsonl); ValueError if unreadable or empty."""
    if scheme == "parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.read_metadata(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise ValueError(first_line(exc)) from exc
        if meta.num_rows == 0:
            raise ValueError("no rows")
        return list(meta.schema.to_arrow_schema().names)  # top-level columns (schema.names lists leaves: a list
        # column's is "element")
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


def first_bad_row(scheme: str, path: Path) -> str | None:
    """Where a JSONL or CSV file stops parsing ("line 7: not valid JSON (...)"), or None; parquet is checked whole."""
    if scheme == "parquet":
        return None
    with path.open(newline="", encoding="utf-8") as f:
        if scheme == "csv":
            reader = csv.reader(f)
            width, rows, ended = len(next(reader, [])), 0, reader.line_num
            for row in reader:
                start, ended = ended + 1, reader.line_num  # a quoted field may span lines
                if row and len(row) != width:
                    spans = f" (a quoted field runs from line {start} to {ended}: a quote left open?)" \
                        if ended > start else ""
                    return f"line {start}: {len(row)} fields, the header has {width}{spans}"
                rows += bool(row)
            return None if rows else "has a header but no rows"
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {number}: not valid JSON ({exc.msg}, column {exc.colno})"
            if not isinstance(row, dict):
                return f"line {number}: not a JSON object"
    return None


def parse_choices(value: object) -> tuple[str, ...]:
    """One example's `choices_field` value as its choices: a list as it is, text as a JSON list (when it starts
    with `[`) or split on `|` (no trimming: a choice is tokenized as written). ValueError when it is neither."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list ({exc.msg})") from exc
        else:
            return tuple(value.split("|"))
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of choices or text, got {value!r}")
    return tuple(str(item) for item in value)


def choice_problem(reference: str, choices: tuple[str, ...]) -> str | None:
    """Why an example's choices cannot score it: none, a duplicate, or its completion not among them."""
    if not choices:
        return "no choices"
    duplicates = sorted({c for c in choices if choices.count(c) > 1})
    if duplicates:
        return f"duplicate choice {duplicates[0]!r}"
    if reference not in choices:
        return f"completion {reference!r} is not one of the choices {list(choices)!r}"
    return None


def choices_key(task: TaskConfig) -> str:
    """The task key that gave its choices (for messages): `choices_field` or `choices`."""
    return "choices_field" if task.choices_field is not None else "choices"


def example_choices(task: TaskConfig, row: dict[str, object]) -> tuple[str, ...]:
    """The choices of one source row: the task's fixed list or the row's `choices_field`; ValueError when unreadable."""
    if task.choices_field is None:
        return tuple(str(c) for c in task.choices or ())
    value = row.get(task.choices_field)
    if value is None:
        raise ValueError(f"no '{task.choices_field}'")
    return parse_choices(value)


def first_bad_example(task: TaskConfig, scheme: str, path: Path) -> tuple[str, str] | None:
    """The first JSONL/CSV row that cannot be an example of `task`, as (task key, "line 7: ..."): a JSONL row
    without a field the task reads, a malformed conversation (`source`), or choices that cannot score it; None when
    there is none. A CSV row has every column of the header (or `first_bad_row` said so); parquet and hf rows are
    checked when loaded (`data.sources`)."""
    if scheme not in ("jsonl", "csv"):
        return None
    with_choices = task.choices is not None or task.choices_field is not None
    checks_rows = task.format in CONVERSATIONS or with_choices
    if scheme == "csv" and not checks_rows:
        return None
    with path.open(newline="", encoding="utf-8") as f:
        if scheme == "csv":
            reader = csv.DictReader(f)
            numbered: list[tuple[int, dict]] = [(reader.line_num, row) for row in reader]
        else:
            numbered = [(n, json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]
    if scheme == "jsonl":
        fields = [value for _, value in source_fields(task)]
        for number, row in numbered:
            if missing := [name for name in fields if name not in row]:
                return "source", f"line {number}: no '{missing[0]}' field"
    if not checks_rows:
        return None
    for number, row in numbered:
        try:
            _, reference, _ = row_example(task.format, row, task.prompt_field, task.completion_field,
                                          task.messages_field)
        except KeyError:
            continue  # a row without a field is reported when the task loads
        except ValueError as exc:
            return "source", f"line {number}: '{messages_field(task.format, task.messages_field)}': {exc}"
        if not with_choices:
            continue
        try:
            problem = choice_problem(reference, example_choices(task, row))
        except ValueError as exc:
            problem = f"'{task.choices_field}': {exc}"
        if problem:
            return choices_key(task), f"line {number}: {problem}"
    return None


def source_fields(task: TaskConfig) -> list[tuple[str, str]]:
    """(task key, column) pairs a source of `task` must have; a key of "format" names a field of the format."""
    named = required_fields(task.format, task.prompt_field, task.completion_field, task.messages_field)
    return named + ([("choices_field", task.choices_field)] if task.choices_field is not None else [])


def missing_fields(task: TaskConfig, path: str, source: str, fields: list[str]) -> list[str]:
    """One line per field `task` reads that `source` (whose columns are `fields`) lacks."""
    return [f"{path}.{name}: " + (f"{task.format}: '{value}'" if name == "format" else f"'{value}'")
            + f" not in {source} (fields: {', '.join(fields)})" for name, value in source_fields(task)
            if value not in fields]


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
        return [] if HF_FORM.fullmatch(rest) else [f"{key}: expected hf:NAME[:CONFIG], got '{source}'"]
    if scheme not in FILE_LOADERS:
        return [_unknown_source(source, key)]
    if not rest:
        return [f"{key}: missing path after '{scheme}:'"]
    file = resolve_path(rest, base_dir)
    if not file.is_file():
        return [f"{key}: no such file: {rest}"]
    try:
        fields = read_fields(scheme, file)
        bad_row = first_bad_row(scheme, file)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [f"{key}: cannot read {rest}: {first_line(exc)}"]
    if bad_row:
        return [f"{key}: {rest} {bad_row}"]
    problems = missing_fields(task, path, rest, fields)
    if not problems:
        bad = first_bad_example(task, scheme, file)
        if bad:  # "source" problems are of this very file, which may be the eval_source
            problems.append(f"{key if bad[0] == 'source' else f'{path}.{bad[0]}'}: {rest} {bad[1]}")
    return problems


def _check_builtin(task: TaskConfig, generator: str, path: str) -> list[str]:
    if generator not in BUILTIN_GENERATORS:
        hint = did_you_mean(generator, BUILTIN_GENERATORS) or f" (choose from {', '.join(BUILTIN_GENERATORS)})"
        return [f"{path}.source: unknown builtin '{generator}'{hint}"]
    problems = []
    if task.eval_source is not None:
        problems.append(f"{path}.eval_source: not allowed for builtin sources (they make their own eval split)")
    if task.choices is not None or task.choices_field is not None:
        problems.append(f"{path}.{choices_key(task)}: builtin tasks have open answers, not a set of choices; use a "
                        "jsonl, csv, parquet or hf source")
    if task.format in ("alpaca", *CONVERSATIONS):
        problems.append(f"{path}.format: builtin tasks are prompt and completion text (plain or chat); {task.format} "
                        "reads its fields from a jsonl, csv, parquet or hf source")
    if task.prefix is not None and not all(" " <= c <= "~" for c in task.prefix):
        problems.append(f"{path}.prefix: use printable ASCII only (no tabs or newlines), got {task.prefix!r}")
    needed = task.train_examples + task.eval_examples
    if task.min_len <= task.max_len and (available := _distinct_inputs(generator, task, needed)) < needed:
        problems.append(
            f"{path}.train_examples: builtin:{generator} with lengths {task.min_len}..{task.max_len} has only "
            f"{available} distinct inputs, fewer than train_examples + eval_examples = {needed}; raise max_len"
        )
    return problems


# The builtin rewards (train.rewards holds their code).
BUILTIN_REWARDS = ("exact_match", "prefix_match", "char_accuracy", "last_number")


def resolve_reward_path(reward: str, base_dir: Path | None) -> str:
    """`python:PATH.py:FUNCTION` with PATH made relative to the sweep file's folder; other rewards as they are."""
    scheme, _, rest = reward.partition(":")
    target, _, name = rest.rpartition(":")
    if scheme != "python" or not target.endswith(".py") or base_dir is None:
        return reward
    return f"python:{resolve_path(target, base_dir)}:{name}"


def check_reward(reward: str, key: str, base_dir: Path | None) -> list[str]:
    """Problems with a task's `reward` found without importing anything: its form, and a file that is not there."""
    if reward in BUILTIN_REWARDS:
        return []
    scheme, _, rest = reward.partition(":")
    target, _, name = rest.rpartition(":")
    if scheme != "python" or not target or not name:
        hint = did_you_mean(reward, BUILTIN_REWARDS)
        return [f"{key}: expected one of {', '.join(BUILTIN_REWARDS)}, python:MODULE:FUNCTION or "
                f"python:PATH.py:FUNCTION, got '{reward}'{hint}"]
    if target.endswith(".py"):
        file = resolve_path(target, base_dir)
        if not file.is_file():
            return [f"{key}: no such file: {target}"]
        return _defined_in(file, name, key, target)
    return []


def _defined_in(file: Path, name: str, key: str, target: str) -> list[str]:
    """Whether `file` parses and defines `name` at its top level, read as source (nothing of it runs)."""
    import ast

    try:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    except SyntaxError as exc:
        return [f"{key}: {target} line {exc.lineno}: {exc.msg}"]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return [f"{key}: cannot read {target}: {first_line(exc)}"]
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    # Defined; or perhaps defined where reading cannot tell (a star import, under a condition, in a loop):
    # importing it at the start of the run decides.
    unknowable = (ast.If, ast.Try, ast.With, ast.For, ast.While)
    if name in defined or "*" in defined or any(isinstance(node, unknowable) for node in tree.body):
        return []
    return [f"{key}: {target} defines no '{name}'{did_you_mean(name, sorted(defined))}"]


def check_choice_metric(tasks: list[tuple[int, TaskConfig]], metrics: tuple[str, ...]) -> list[str]:
    """`choice_accuracy` in eval.metrics needs every (index, task) to have choices to score."""
    if "choice_accuracy" not in metrics:
        return []
    return [f"tasks[{i}]: choice_accuracy needs choices or choices_field (task '{task.name}' has neither)"
            for i, task in tasks if task.choices is None and task.choices_field is None]


def check_task(task: TaskConfig, path: str, base_dir: Path | None) -> list[str]:
    """Problems with one task, each `path.key: message`; reads file headers only (and, for a task with choices,
    its JSONL/CSV rows)."""
    problems = check_reward(task.reward, f"{path}.reward", base_dir)
    if task.min_len > task.max_len:
        problems.append(f"{path}.min_len: must be <= max_len ({task.min_len} > {task.max_len})")
    if task.choices is not None and task.choices_field is not None:
        problems.append(f"{path}.choices_field: set choices (the same for every example) or choices_field (per "
                        "example), not both")
        return problems
    scheme, _, rest = task.source.partition(":")
    if scheme == "builtin":
        return problems + _check_builtin(task, rest, path)
    problems += _check_data_source(task, task.source, f"{path}.source", path, base_dir)
    if task.eval_source is not None:
        problems += _check_data_source(task, task.eval_source, f"{path}.eval_source", path, base_dir)
    return problems
