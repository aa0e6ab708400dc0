"""One searched key of a random / tpe sweep: its distribution, read and checked. Pure and torch-free.

`sweep.search.space` maps dotted keys to `{log_uniform: [lo, hi]}`, `{uniform: [lo, hi]}`,
`{int: [lo, hi]}`, `{log_int: [lo, hi]}` or `{choice: [values]}`. Bounds and choices are checked
as the field itself (`adapter.lr` > 0, `adapter.dropout` in [0, 1)); an integer field takes int
ranges, a number field float ranges, any other field a choice. `run.search` turns a Dimension
into Optuna's distribution; `spec.sweep` combines them with the grid / zip / list axes.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any

from mlora_cli.spec.convert import check_value, did_you_mean
from mlora_cli.spec.schema import SWEEPABLE_SECTIONS, SweepSpec

DISTRIBUTIONS = ("log_uniform", "uniform", "int", "log_int", "choice")


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: `low`..`high` (int or float, linear or log scale), or one of `choices`."""

    kind: str  # one of DISTRIBUTIONS
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()

    @property
    def labels(self) -> tuple[Any, ...]:
        """The choices as Optuna stores them: numbers, strings and booleans as they are, lists as `q_proj+v_proj`."""
        return tuple(c if c is None or isinstance(c, (bool, int, float, str)) else "+".join(map(str, c))
                     for c in self.choices)

    def describe(self) -> str:
        if self.kind == "choice":
            return "choice of " + ", ".join(map(str, self.labels))
        return f"{self.kind} [{self.low:g}, {self.high:g}]"


def space_size(space: dict[str, Dimension]) -> int | None:
    """How many configurations a space of choices and integer ranges holds; None with a float range in it."""
    if any(d.kind not in ("choice", "int", "log_int") for d in space.values()):
        return None
    return math.prod(len(d.choices) if d.kind == "choice" else int(d.high - d.low) + 1 for d in space.values())


def flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted or nested keys -> dotted keys: a mapping under a section (`adapter: {lr: ...}`) is nesting."""
    flat: dict[str, Any] = {}
    for key, value in space.items():
        dotted = f"{prefix}{key}"
        section = dotted.rpartition(".")[0]
        is_field = section in SWEEPABLE_SECTIONS and dotted not in SWEEPABLE_SECTIONS
        nested = isinstance(value, dict) and not is_field and not set(value) & set(DISTRIBUTIONS)
        flat.update(flatten_space(value, f"{dotted}.") if nested else {dotted: value})
    return flat


def _number_type(key: str) -> type | None:
    """int or float for a numeric sweepable field (null allowed or not), else None."""
    section, _, name = key.rpartition(".")
    hint = typing.get_type_hints(SWEEPABLE_SECTIONS[section])[name]
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return options[0] if len(options) == 1 and options[0] in (int, float) else None


def parse_dimension(key: str, value: Any, path: str, errors: list[str]) -> Dimension | None:
    """The checked distribution of `key` (a sweepable key), or None with its problem in `errors`."""
    if key == "adapter.init_from":
        errors.append(f"{path}: not searchable (a warm start's rank and alpha must match it); use grid or list")
        return None
    kinds = list(value) if isinstance(value, dict) else []
    if len(kinds) != 1 or kinds[0] not in DISTRIBUTIONS:
        hint = did_you_mean(str(kinds[0]), DISTRIBUTIONS) if len(kinds) == 1 else ""
        errors.append(f"{path}: expected one of {{log_uniform: [lo, hi]}}, {{uniform: [lo, hi]}}, {{int: [lo, hi]}}, "
                      f"{{log_int: [lo, hi]}}, {{choice: [values]}}; got {value!r}{hint}")
        return None
    kind, bounds, where = kinds[0], value[kinds[0]], f"{path}.{kinds[0]}"
    section, _, name = key.rpartition(".")
    before = len(errors)
    if kind == "choice":
        if not isinstance(bounds, list) or not bounds:
            errors.append(f"{where}: expected a non-empty list of values")
            return None
        dimension = Dimension(kind, choices=tuple(check_value(section, name, v, f"{where}[{i}]", errors)
                                                  for i, v in enumerate(bounds)))
        if len(errors) == before and len(set(dimension.labels)) < len(bounds):
            errors.append(f"{where}: a value is listed twice")
        return dimension if len(errors) == before else None
    number, wanted = _number_type(key), int if kind in ("int", "log_int") else float
    if number is not wanted:
        what, use = (("an integer", "{int: [lo, hi]} or {log_int: [lo, hi]}") if number is int else
                     ("a number", "{uniform: [lo, hi]} or {log_uniform: [lo, hi]}") if number is float else
                     ("not a number", "{choice: [values]}"))
        errors.append(f"{where}: {key} is {what}; use {use}")
        return None
    if not isinstance(bounds, list) or len(bounds) != 2:
        errors.append(f"{where}: expected [lo, hi], got {bounds!r}")
        return None
    low, high = (check_value(section, name, b, f"{where}[{i}]", errors) for i, b in enumerate(bounds))
    if len(errors) == before and kind.startswith("log") and low <= 0:
        errors.append(f"{where}: a log scale needs bounds > 0, got [{low:g}, {high:g}]")
    elif len(errors) == before and not low < high:
        errors.append(f"{where}: needs lo < hi, got [{low:g}, {high:g}]")
    return Dimension(kind, low, high) if len(errors) == before else None


def measuring_steps(spec: SweepSpec, total_steps: int) -> list[int]:
    """The steps (over the whole task sequence) at which the objective is reported to Optuna, before the last.

    asha: its rungs, min_steps x reduction_factor^k; median: every eval.every_steps (else every min_steps; its
    n_warmup_steps keeps it from pruning before min_steps); either: every `prune.every_steps` when set.
    """
    prune = spec.sweep.prune
    if prune.method == "none":
        return []
    if prune.every_steps or prune.method == "median":
        every = prune.every_steps or spec.eval.every_steps or prune.min_steps
        return list(range(every, total_steps, every))
    rungs, step = [], prune.min_steps
    while step < total_steps:
        rungs.append(step)
        step *= prune.reduction_factor
    return rungs


def halving_estimate(trials: int, total_steps: int, rungs: list[int], reduction_factor: int) -> float:
    """Steps of `trials` trials of `total_steps` when each rung keeps 1/reduction_factor (synchronous successive
    halving); ASHA decides as trials arrive, promoting the first ones more readily, so it runs somewhat more."""
    ends = [*rungs, total_steps]
    return trials * sum((end - start) / reduction_factor**i for i, (start, end) in enumerate(zip([0, *rungs], ends)))
