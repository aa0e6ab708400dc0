"""Sweep expansion: one SweepSpec -> a deterministic list of fully resolved adapters.

Pure and torch-free. The sweep varies keys of the `adapter` and `train` sections:

- `grid`: cartesian product, the last key varying fastest;
- `zip`: equal-length lists advanced together (one axis);
- `list`: explicit adapters, each a mapping of dotted keys (may set `name`);
- `seeds`: every configuration once per seed.

The axes combine as grid x zip x list x seeds. Names come from the keys that vary
(`r8-lr3e-3`), so the same sweep always yields the same names.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from typing import Any

from mlora_cli.errors import ConfigError
from mlora_cli.spec.convert import check_value, did_you_mean, unknown_key_hint
from mlora_cli.spec.schema import MAX_ADAPTERS, SWEEPABLE_SECTIONS, AdapterConfig, SweepConfig, SweepSpec, TrainConfig


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of the sweep, fully resolved."""

    name: str
    seed: int
    adapter: AdapterConfig
    train: TrainConfig
    varied: dict[str, Any]  # dotted key -> value, what the sweep set for this adapter

    def task_steps(self, task_steps: list[int | None]) -> list[int]:
        """This adapter's steps on each task: the task's own `steps`, else its `train.steps_per_task`."""
        return [steps or self.train.steps_per_task for steps in task_steps]

    def total_steps(self, task_steps: list[int | None]) -> int:
        return sum(self.task_steps(task_steps))


# Short, readable name parts for common keys; others use the bare key name.
NAME_ALIASES = {
    "adapter.rank": "r",
    "adapter.alpha": "a",
    "adapter.lr": "lr",
    "adapter.dropout": "do",
    "adapter.weight_decay": "wd",
    "adapter.target_modules": "tm",
    "adapter.strategy": "",
    "train.batch_size": "bs",
    "train.steps_per_task": "steps",
    "train.max_seq_len": "len",
    "train.warmup_steps": "wu",
    "train.max_grad_norm": "clip",
    "adapter.buffer_size": "buf",
    "adapter.replay_ratio": "rr",
    "adapter.l2_lambda": "lam",
    "adapter.ewc_lambda": "lam",
    "adapter.ewc_gamma": "gamma",
    "adapter.lwf_lambda": "lam",
    "adapter.lwf_temperature": "temp",
    "adapter.olora_lambda1": "orth",
    "adapter.olora_lambda2": "anorm",
    "train.rl.group_size": "g",
    "train.rl.temperature": "temp",
    "train.rl.top_p": "topp",
    "train.rl.max_new_tokens": "new",
    "train.rl.loss": "",
    "train.rl.scale_rewards": "scale",
    "train.rl.kl_beta": "kl",
    "train.rl.num_iterations": "mu",
    "train.rl.clip_eps": "clip",
}


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested or dotted keys -> dotted keys; a non-mapping value is a leaf."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def format_value(value: Any) -> str:
    """3e-3 for 0.003, 8 for 8, q_proj+v_proj for a list; safe in a folder name."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value == int(value) and abs(value) < 1e4:
            text = str(int(value))
        elif 0.1 <= abs(value) < 1e4:
            text = f"{value:.4g}"
        else:
            mantissa, exponent = f"{value:.3e}".split("e")
            text = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    elif isinstance(value, (list, tuple)):
        text = "+".join(format_value(v) for v in value)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+\-]", "_", text)


def _check_key(key: str, path: str, errors: list[str]) -> bool:
    section, _, name = key.rpartition(".")
    if section not in SWEEPABLE_SECTIONS or not name:
        options = [f"{s}.{f.name}" for s, cls in SWEEPABLE_SECTIONS.items() for f in dataclasses.fields(cls)]
        errors.append(f"{path}: unknown key '{key}'; a sweep varies adapter.* and train.* keys"
                      f"{did_you_mean(key, options)}")
        return False
    fields = [f.name for f in dataclasses.fields(SWEEPABLE_SECTIONS[section])]
    if name not in fields:
        errors.append(f"{path}: unknown key '{key}'{unknown_key_hint(section, name)}")
        return False
    return True


def _check_values(key: str, values: Any, path: str, errors: list[str]) -> list[Any] | None:
    """The checked values of one grid or zip key, or None (with the problems in `errors`)."""
    if not _check_key(key, path, errors):
        return None
    if not isinstance(values, list) or not values:
        errors.append(f"{path}: expected a non-empty list of values")
        return None
    section, _, name = key.rpartition(".")
    return [check_value(section, name, v, f"{path}[{i}]", errors) for i, v in enumerate(values)]


def _axes(sweep: SweepConfig, errors: list[str]) -> list[list[dict[str, Any]]]:
    """Each axis is a list of points; a point maps dotted keys to checked values."""
    axes: list[list[dict[str, Any]]] = []
    owner: dict[str, str] = {}  # dotted key -> the axis that varies it; a key may be varied by one axis only

    def claim(key: str, axis: str, path: str) -> None:
        if owner.setdefault(key, axis) != axis:
            errors.append(f"{path}: '{key}' is also varied by {owner[key]}; vary each key in one place")

    for key, values in flatten(sweep.grid).items():
        claim(key, "sweep.grid", f"sweep.grid.{key}")
        checked = _check_values(key, values, f"sweep.grid.{key}", errors)
        if checked is not None:
            axes.append([{key: value} for value in checked])

    zipped = flatten(sweep.zip)
    columns = {}
    for key, values in zipped.items():
        claim(key, "sweep.zip", f"sweep.zip.{key}")
        checked = _check_values(key, values, f"sweep.zip.{key}", errors)
        if checked is not None:
            columns[key] = checked
    if len({len(values) for values in columns.values()}) > 1:
        sizes = ", ".join(f"{k}: {len(v)}" for k, v in columns.items())
        errors.append(f"sweep.zip: lists must have equal length ({sizes})")
    elif columns:
        axes.append([dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)])

    if sweep.list:
        points = []
        named: dict[str, int] = {}
        for i, entry in enumerate(sweep.list):
            point = {}
            for key, value in flatten(entry).items():
                path = f"sweep.list[{i}].{key}"
                if key == "name":
                    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+\-]*", value):
                        errors.append(f"{path}: a name uses letters, digits, '-', '_', '+' and '.' only")
                    elif value in named:
                        errors.append(f"{path}: duplicate adapter name '{value}' (also sweep.list[{named[value]}])")
                    else:
                        named[value] = i
                    point["name"] = value
                elif _check_key(key, path, errors):
                    claim(key, "sweep.list", path)
                    section, _, name = key.rpartition(".")
                    point[key] = check_value(section, name, value, path, errors)
            points.append(point)
        axes.append(points)
    if sweep.seeds is not None:
        for i, seed in enumerate(sweep.seeds):
            if seed in sweep.seeds[:i]:
                errors.append(f"sweep.seeds[{i}]: duplicate seed {seed}")
    return axes


def _size_problems(axes: list[list[dict[str, Any]]], seed_count: int) -> list[str]:
    count = seed_count
    for axis in axes:
        count *= len(axis)
    if count > MAX_ADAPTERS:
        return [f"sweep: expands to {count:,} adapters, more than the limit of {MAX_ADAPTERS:,}"]
    return []


def check_sweep(sweep: SweepConfig) -> list[str]:
    """Every problem of a `sweep` section, each `sweep.key.path: message`; expands nothing."""
    errors: list[str] = []
    axes = _axes(sweep, errors)
    return errors or _size_problems(axes, len(sweep.seeds or (0,)))


def _name(combo: tuple[dict[str, Any], ...], varying: list[str]) -> str:
    """Axis by axis: an explicit list `name` stands for its entry; other keys show if they vary."""
    parts = []
    for part in combo:
        if "name" in part:
            parts.append(str(part["name"]))
            continue
        for key in varying:
            if key in part:
                alias = NAME_ALIASES.get(key, key.rpartition(".")[2])
                parts.append(f"{alias}{format_value(part[key])}")
    return "-".join(parts) or "default"


def _unique(names: list[str], explicit: list[bool]) -> list[str]:
    """Names as given, except repeats, which get -2, -3, ...; names a user wrote win over generated ones."""
    taken = set(names)
    seen: set[str] = set()
    unique = list(names)
    for i in sorted(range(len(names)), key=lambda i: not explicit[i]):  # explicit first; stable otherwise
        name = names[i]
        if name in seen:
            k = 2
            while f"{name}-{k}" in taken:
                k += 1
            name = f"{name}-{k}"
            taken.add(name)
        seen.add(name)
        unique[i] = name
    return unique


def expand(spec: SweepSpec) -> list[AdapterSpec]:
    """All adapters of the sweep, in a stable order, with unique readable names."""
    errors: list[str] = []
    axes = _axes(spec.sweep, errors)
    seeds = spec.sweep.seeds or (spec.seed,)
    errors = errors or _size_problems(axes, len(seeds))
    if errors:
        raise ConfigError(errors)
    combos = list(itertools.product(*axes))
    points = [{k: v for part in combo for k, v in part.items() if k != "name"} for combo in combos]
    # A key varies when it takes two values, or is set for some adapters only. One pass: a
    # 10,000-adapter sweep must stay instant.
    values: dict[str, set[str]] = {}
    for point in points:
        for key, value in point.items():
            values.setdefault(key, set()).add(repr(value))
    varying = [key for key, seen in values.items() if len(seen) > 1 or any(key not in p for p in points)]

    names, explicit, settings = [], [], []
    for combo, point in zip(combos, points, strict=True):
        base_name = _name(combo, varying)
        for seed in seeds:
            names.append(f"{base_name}-s{seed}" if spec.sweep.seeds else base_name)
            explicit.append(any("name" in part for part in combo))
            settings.append((seed, point))
    adapters = []
    for name, (seed, point) in zip(_unique(names, explicit), settings, strict=True):
        adapter_values = {k.partition(".")[2]: v for k, v in point.items() if k.startswith("adapter.")}
        rl_values = {k.rpartition(".")[2]: v for k, v in point.items() if k.startswith("train.rl.")}
        train_values = {k.partition(".")[2]: v for k, v in point.items()
                        if k.startswith("train.") and not k.startswith("train.rl.")}
        if rl_values:
            train_values["rl"] = dataclasses.replace(spec.train.rl, **rl_values)
        adapters.append(
            AdapterSpec(
                name=name,
                seed=seed,
                adapter=dataclasses.replace(spec.adapter, **adapter_values),
                train=dataclasses.replace(spec.train, **train_values),
                varied=dict(point),
            )
        )
    return adapters
