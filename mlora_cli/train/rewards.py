"""Verifiable rewards: plain callables over a batch, as TRL's reward functions are.

A reward is `fn(prompts, completions, references, **fields) -> list[float]`, one float per
completion; `fields` holds `task` (the task's name). A task names its reward with `reward:`:

- `exact_match`: 1.0 when the completion equals the reference (both whitespace-trimmed), else 0.0;
- `prefix_match`: the length of the longest common prefix over the reference's length (graded);
- `char_accuracy`: characters equal at the same position, over the longer of the two (graded;
  extra or missing characters count against it);
- `last_number`: 1.0 when the last number in the completion equals the last number in the
  reference (math word problems: "... so the answer is 42"), else 0.0;
- `python:MODULE:FUNCTION` or `python:PATH.py:FUNCTION`: your own function (a path is relative
  to the sweep file's folder).

A reward that raises, or returns anything but one finite number per completion, fails the
adapter it scored (with one line naming the reward), never its neighbours.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlora_cli.errors import ConfigError
from mlora_cli.spec import tasks as spec_tasks

Reward = Callable[..., Sequence[float]]


def matches(completion: str, reference: str) -> bool:
    """Exact match: the completion equals the reference, both whitespace-trimmed (the eval metric uses it too)."""
    return completion.strip() == reference.strip()


def exact_match(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str],
                **fields: Any) -> list[float]:
    return [float(matches(c, r)) for c, r in zip(completions, references, strict=True)]


def prefix_match(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str],
                 **fields: Any) -> list[float]:
    scores = []
    for completion, reference in zip(completions, references, strict=True):
        completion, reference = completion.strip(), reference.strip()
        common = 0
        while common < min(len(completion), len(reference)) and completion[common] == reference[common]:
            common += 1
        scores.append(common / max(1, len(reference)))
    return scores


def char_accuracy(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str],
                  **fields: Any) -> list[float]:
    scores = []
    for completion, reference in zip(completions, references, strict=True):
        completion, reference = completion.strip(), reference.strip()
        same = sum(a == b for a, b in zip(completion, reference))
        scores.append(same / max(1, len(completion), len(reference)))
    return scores


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def last_number(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str],
                **fields: Any) -> list[float]:
    scores = []
    for completion, reference in zip(completions, references, strict=True):
        got, want = _last_number(completion), _last_number(reference)
        scores.append(float(got is not None and want is not None and math.isclose(got, want)))
    return scores


BUILTIN_REWARDS: dict[str, Reward] = {
    "exact_match": exact_match, "prefix_match": prefix_match, "char_accuracy": char_accuracy,
    "last_number": last_number,
}
assert tuple(BUILTIN_REWARDS) == spec_tasks.BUILTIN_REWARDS  # validate checks rewards by these names


_LOADED: dict[tuple[str, str], Reward] = {}  # a user's module is imported once per process, as any import


def load_reward(spec: str, base_dir: Path | None = None, key: str = "reward") -> Reward:
    """The reward function `spec` names; ConfigError (one line, `key: ...`) when it cannot be found."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    cache_key = (spec, str(base_dir))
    if cache_key not in _LOADED:
        _LOADED[cache_key] = _import_reward(spec, base_dir, key)
    return _LOADED[cache_key]


def _import_reward(spec: str, base_dir: Path | None, key: str) -> Reward:
    scheme, _, rest = spec.partition(":")
    target, _, name = rest.rpartition(":")
    if scheme != "python" or not target or not name:
        raise ConfigError([f"{key}: expected one of {', '.join(BUILTIN_REWARDS)}, python:MODULE:FUNCTION or "
                           f"python:PATH.py:FUNCTION, got '{spec}'"])
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            path = base_dir / path if base_dir is not None and not path.is_absolute() else path
            module_spec = importlib.util.spec_from_file_location(f"mlora_reward_{path.stem}", path)
            if module_spec is None or module_spec.loader is None or not path.is_file():
                raise ConfigError([f"{key}: no such file: {target}"])
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as exc:  # the user's module failed to import: its own error, in one line
        raise ConfigError([f"{key}: cannot import {target}: {type(exc).__name__}: {exc}"]) from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError([f"{key}: {target} has no function '{name}'"])
    return function  # type: ignore[no-any-return]


def failure_line(spec: str, task: str, error: BaseException) -> str:
    """What a failed adapter's `failure` says when its reward raised or returned the wrong thing."""
    return f"reward {spec} on task '{task}': {type(error).__name__}: {error}"


def score(reward: Reward, prompts: list[str], completions: list[str], references: list[str], task: str) -> list[float]:
    """The reward's values, checked: one finite number per completion; ValueError naming what is wrong."""
    values = reward(prompts, completions, references, task=task)
    try:
        items = list(values)
    except TypeError as exc:
        raise ValueError(f"returned {type(values).__name__}, not a list of numbers") from exc
    numbers = []
    for index, value in enumerate(items):
        try:
            numbers.append(float(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"returned a list whose item {index} is {type(value).__name__} {value!r:.40}, not a "
                             "number") from exc
    if len(numbers) != len(completions):
        raise ValueError(f"returned {len(numbers)} values for {len(completions)} completions")
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError("returned a value that is not finite")
    return numbers
