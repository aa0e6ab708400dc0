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

from mlora_cli.config import (
    MAX_ADAPTERS,
    SWEEPABLE_SECTIONS,
    AdapterConfig,
    ConfigError,
    SweepSpec,
    TrainConfig,
    check_value,
    did_you_mean,
)


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of the sweep, fully resolved."""

    name: str
    seed: int
    adapter: AdapterConfig
    train: TrainConfig
    varied: dict[str, Any]  # dotted key -> value, what the sweep set for this adapter

    def total_steps(self, task_steps: list[int | None]) -> int:
        return sum(steps or self.train.steps_per_task for steps in task_steps)


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
    section, _, name = key.partition(".")
    if section not in SWEEPABLE_SECTIONS or not name:
        options = [f"{s}.{f.name}" for s, cls in SWEEPABLE_SECTIONS.items() for f in dataclasses.fields(cls)]
        errors.append(f"{path}: unknown key '{key}'; a sweep varies adapter.* and train.* keys{did_you_mean(key, options)}")
        return False
    fields = [f.name for f in dataclasses.fields(SWEEPABLE_SECTIONS[section])]
    if name not in fields:
        errors.append(f"{path}: unknown key '{key}'{did_you_mean(name, fields)}")
        return False
    return True


def _axes(spec: SweepSpec, errors: list[str]) -> list[list[dict[str, Any]]]:
    """Each axis is a list of points; a point maps dotted keys to checked values."""
    axes: list[list[dict[str, Any]]] = []
    for key, values in flatten(spec.sweep.grid).items():
        path = f"sweep.grid.{key}"
        if not _check_key(key, path, errors):
            continue
        if not isinstance(values, list) or not values:
            errors.append(f"{path}: expected a non-empty list of values")
            continue
        section, _, name = key.partition(".")
        axes.append([{key: check_value(section, name, v, f"{path}[{i}]", errors)} for i, v in enumerate(values)])
    zipped = flatten(spec.sweep.zip)
    lengths = set()
    for key, values in zipped.items():
        path = f"sweep.zip.{key}"
        if _check_key(key, path, errors):
            if not isinstance(values, list) or not values:
                errors.append(f"{path}: expected a non-empty list of values")
            else:
                lengths.add(len(values))
    if len(lengths) > 1:
        sizes = ", ".join(f"{k}: {len(v)}" for k, v in zipped.items() if isinstance(v, list))
        errors.append(f"sweep.zip: lists must have equal length ({sizes})")
    elif lengths:
        (length,) = lengths
        points = []
        for i in range(length):
            point = {}
            for key, values in zipped.items():
                section, _, name = key.partition(".")
                point[key] = check_value(section, name, values[i], f"sweep.zip.{key}[{i}]", errors)
            points.append(point)
        axes.append(points)
    if spec.sweep.list:
        points = []
        for i, entry in enumerate(spec.sweep.list):
            point = {}
            for key, value in flatten(entry).items():
                path = f"sweep.list[{i}].{key}"
                if key == "name":
                    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+\-]*", value):
                        errors.append(f"{path}: a name uses letters, digits, '-', '_', '+' and '.' only")
                    point["name"] = value
                elif _check_key(key, path, errors):
                    section, _, name = key.partition(".")
                    point[key] = check_value(section, name, value, path, errors)
            points.append(point)
        axes.append(points)
    return axes


def _name(point: dict[str, Any], varying: list[str]) -> str:
    if "name" in point:
        return str(point["name"])
    parts = []
    for key in varying:
        if key in point:
            alias = NAME_ALIASES.get(key, key.partition(".")[2])
            parts.append(f"{alias}{format_value(point[key])}")
    return "-".join(parts) or "default"


def expand(spec: SweepSpec) -> list[AdapterSpec]:
    """All adapters of the sweep, in a stable order, with unique readable names."""
    errors: list[str] = []
    axes = _axes(spec, errors)
    if errors:
        raise ConfigError(errors)
    count = 1
    for axis in axes:
        count *= len(axis)
    seeds = spec.sweep.seeds or (spec.seed,)
    if count * len(seeds) > MAX_ADAPTERS:
        raise ConfigError([f"sweep: expands to {count * len(seeds):,} adapters, more than the limit of {MAX_ADAPTERS:,}"])
    points = [dict(item for part in combo for item in part.items()) for combo in itertools.product(*axes)]
    varying = []
    for point in points:
        for key in point:
            if key != "name" and key not in varying and len({repr(p.get(key)) for p in points}) > 1:
                varying.append(key)

    adapters: list[AdapterSpec] = []
    names: dict[str, int] = {}
    for point in points:
        base_name = _name(point, varying)
        for seed in seeds:
            name = f"{base_name}-s{seed}" if spec.sweep.seeds else base_name
            names[name] = names.get(name, 0) + 1
            if names[name] > 1:
                if "name" in point:
                    errors.append(f"sweep.list: duplicate adapter name '{name}'")
                name = f"{name}-{names[name]}"
            adapter_values = {k.partition(".")[2]: v for k, v in point.items() if k.startswith("adapter.")}
            train_values = {k.partition(".")[2]: v for k, v in point.items() if k.startswith("train.")}
            adapters.append(
                AdapterSpec(
                    name=name,
                    seed=seed,
                    adapter=dataclasses.replace(spec.adapter, **adapter_values),
                    train=dataclasses.replace(spec.train, **train_values),
                    varied={k: v for k, v in point.items() if k != "name"},
                )
            )
    if errors:
        raise ConfigError(errors)
    return adapters
