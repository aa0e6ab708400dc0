"""Sweep expansion: one SweepSpec -> a deterministic list of fully resolved adapters.

Pure and torch-free. The sweep varies keys of the `adapter` and `train` sections:

- `grid`: cartesian product, the last key varying fastest;
- `zip`: equal-length lists advanced together (one axis);
- `list`: explicit adapters, each a mapping of dotted keys (may set `name`);
- `seeds`: every configuration once per seed.

The axes combine as grid x zip x list x seeds. Names come from the keys that vary
(`r8-lr3e-3`), so the same sweep always yields the same names.

A `search` with method random or tpe expands instead into `trials` x seeds trial slots
(`trial-07`, `trial-07-s1`) that hold the defaults: `run.search` asks Optuna for each trial's
parameters when a slot frees, and `trial_adapter` resolves them. Its space is the `space`
distributions plus every grid key as a choice and one choice of zip row and of list entry.
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
from mlora_cli.spec.space import Dimension, flatten_space, parse_dimension


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of the sweep, fully resolved."""

    name: str
    seed: int
    adapter: AdapterConfig
    train: TrainConfig
    varied: dict[str, Any]  # dotted key -> value, what the sweep set for this adapter
    trial: int | None = None  # a random/tpe trial slot: its configuration index; its values come from Optuna

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


# A random / tpe search's choice of zip row and of list entry (the entry's index), named as Optuna stores them.
ZIP_PARAM, LIST_PARAM = "sweep.zip", "sweep.list"


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


def _axes(sweep: SweepConfig, errors: list[str]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Each axis is (its key, or sweep.zip / sweep.list) and its points; a point maps dotted keys to checked values."""
    axes: list[tuple[str, list[dict[str, Any]]]] = []
    owner: dict[str, str] = {}  # dotted key -> the axis that varies it; a key may be varied by one axis only

    def claim(key: str, axis: str, path: str) -> None:
        if owner.setdefault(key, axis) != axis:
            errors.append(f"{path}: '{key}' is also varied by {owner[key]}; vary each key in one place")

    for key, values in flatten(sweep.grid).items():
        claim(key, "sweep.grid", f"sweep.grid.{key}")
        checked = _check_values(key, values, f"sweep.grid.{key}", errors)
        if checked is not None:
            axes.append((key, [{key: value} for value in checked]))

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
        axes.append((ZIP_PARAM, [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]))

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
        axes.append((LIST_PARAM, points))
    if sweep.seeds is not None:
        for i, seed in enumerate(sweep.seeds):
            if seed in sweep.seeds[:i]:
                errors.append(f"sweep.seeds[{i}]: duplicate seed {seed}")
    for key in flatten_space(sweep.search.space):
        claim(key, "sweep.search.space", f"sweep.search.space.{key}")
    return axes


def _size_problems(axes: list[tuple[str, list[dict[str, Any]]]], sweep: SweepConfig) -> list[str]:
    count = len(sweep.seeds or (0,))
    if sweep.search.method != "grid":
        count *= sweep.search.trials or 1
    else:
        for _, points in axes:
            count *= len(points)
    if count > MAX_ADAPTERS:
        return [f"sweep: expands to {count:,} adapters, more than the limit of {MAX_ADAPTERS:,}"]
    return []


def check_sweep(sweep: SweepConfig) -> list[str]:
    """Every problem of a `sweep` section, each `sweep.key.path: message`; expands nothing."""
    errors: list[str] = []
    axes = _axes(sweep, errors)
    _check_search(sweep, axes, errors)
    return errors or _size_problems(axes, sweep)


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
    _check_search(spec.sweep, axes, errors)
    seeds = spec.sweep.seeds or (spec.seed,)
    errors = errors or _size_problems(axes, spec.sweep)
    if errors:
        raise ConfigError(errors)
    if spec.sweep.search.method != "grid":
        return trial_slots(spec)
    combos = list(itertools.product(*(points for _, points in axes)))
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
    return [_resolved(spec, name, seed, point)
            for name, (seed, point) in zip(_unique(names, explicit), settings, strict=True)]


def _resolved(spec: SweepSpec, name: str, seed: int, point: dict[str, Any], trial: int | None = None) -> AdapterSpec:
    """The adapter of one configuration: the defaults with the dotted keys of `point` set."""
    adapter_values = {k.partition(".")[2]: v for k, v in point.items() if k.startswith("adapter.")}
    rl_values = {k.rpartition(".")[2]: v for k, v in point.items() if k.startswith("train.rl.")}
    train_values = {k.partition(".")[2]: v for k, v in point.items()
                    if k.startswith("train.") and not k.startswith("train.rl.")}
    if rl_values:
        train_values["rl"] = dataclasses.replace(spec.train.rl, **rl_values)
    return AdapterSpec(name=name, seed=seed, adapter=dataclasses.replace(spec.adapter, **adapter_values),
                       train=dataclasses.replace(spec.train, **train_values), varied=dict(point), trial=trial)


# -- search: random / tpe trial slots, their space, and what a trial's parameters resolve to ------------------


def _space(sweep: SweepConfig, axes: list[tuple[str, list[dict[str, Any]]]], errors: list[str]) -> dict[str, Dimension]:
    space = {key: Dimension("choice", choices=tuple(range(len(points))) if key in (ZIP_PARAM, LIST_PARAM)
                            else tuple(point[key] for point in points)) for key, points in axes}
    for key, value in flatten_space(sweep.search.space).items():
        path = f"sweep.search.space.{key}"
        dimension = _check_key(key, path, errors) and parse_dimension(key, value, path, errors)
        if dimension:
            space[key] = dimension
    return space


def _check_search(sweep: SweepConfig, axes: list[tuple[str, list[dict[str, Any]]]], errors: list[str]) -> None:
    search, prune = sweep.search, sweep.prune
    if search.method == "grid":
        if search.trials is not None:
            errors.append("sweep.search.trials: method grid runs every configuration of grid / zip / list; "
                          "trials needs method random or tpe")
        if search.space:
            errors.append("sweep.search.space: method grid runs grid / zip / list as written; a space needs "
                          "method random or tpe")
    else:
        if search.trials is None:
            errors.append(f"sweep.search.trials: required with method {search.method} (configurations to try)")
        _space(sweep, axes, errors)
        for key, points in axes:  # each becomes a choice sampled apart from the rank and alpha a warm start fixes
            if found := [i for i, point in enumerate(points) if "adapter.init_from" in point]:
                where = {ZIP_PARAM: "sweep.zip.", LIST_PARAM: f"sweep.list[{found[0]}]."}.get(key, "sweep.grid.")
                errors.append(f"{where}adapter.init_from: not searchable with method {search.method} (a warm "
                              "start's rank and alpha must match it); use method grid")
        if not axes and not search.space:
            errors.append("sweep.search.space: nothing to search: give distributions (or grid / zip / list keys)")
    if search.metric is None and sweep.runs_a_study:
        needs = f"prune.method {prune.method}" if prune.method != "none" else f"method {search.method}"
        errors.append(f"sweep.search.metric: required with {needs} (the objective: one of eval.metrics)")


def searched_keys(spec: SweepSpec) -> set[str]:
    """Every key a random / tpe trial may set: the space's, and those of grid, zip rows and list entries."""
    points = [point for _, axis in _axes(spec.sweep, []) for point in axis]
    return {key for point in points for key in point if key != "name"} | set(flatten_space(spec.sweep.search.space))


def search_space(spec: SweepSpec) -> dict[str, Dimension]:
    """What Optuna samples for a random / tpe trial: the `space`, each grid key as a choice of its values, and one
    choice of zip row and one of list entry (by index)."""
    errors: list[str] = []
    space = _space(spec.sweep, _axes(spec.sweep, errors), errors)
    if errors:
        raise ConfigError(errors)
    return space


def trial_slots(spec: SweepSpec) -> list[AdapterSpec]:
    """A random / tpe search's adapters: `trials` slots (x seeds), named trial-07 (trial-07-s1 with seeds), holding
    the defaults until `run.search` asks Optuna for their parameters."""
    trials = spec.sweep.search.trials or 0
    width = len(str(max(trials - 1, 0)))
    seeds = spec.sweep.seeds or (spec.seed,)
    return [_resolved(spec, f"trial-{k:0{width}d}" + (f"-s{seed}" if spec.sweep.seeds else ""), seed, {}, k)
            for k in range(trials) for seed in seeds]


def trial_adapter(spec: SweepSpec, slot: AdapterSpec, params: dict[str, Any]) -> AdapterSpec:
    """A trial slot resolved with the parameters Optuna gave it (a choice by its label)."""
    axes = dict(_axes(spec.sweep, []))
    point: dict[str, Any] = {}
    for key, dimension in search_space(spec).items():
        value = dimension.choices[dimension.labels.index(params[key])] if dimension.kind == "choice" else params[key]
        if key in (ZIP_PARAM, LIST_PARAM):
            point.update({k: v for k, v in axes[key][value].items() if k != "name"})
        else:
            point[key] = value
    return _resolved(spec, slot.name, slot.seed, point, slot.trial)


def search_envelope(spec: SweepSpec) -> list[AdapterConfig]:
    """Adapter configs that bound every trial a random / tpe search may ask (its largest rank with each set of target
    modules and each strategy), so a worker builds an engine that fits them all."""
    space, axes = search_space(spec), dict(_axes(spec.sweep, []))

    def values(key: str) -> list[Any]:
        found = [getattr(spec.adapter, key.partition(".")[2])]
        for name, dimension in space.items():
            if name in (ZIP_PARAM, LIST_PARAM):
                found += [point[key] for point in axes[name] if key in point]
            elif name == key:
                found += list(dimension.choices) if dimension.kind == "choice" else [int(dimension.high)]
        return list(dict.fromkeys(found))

    rank = max(values("adapter.rank"))
    return [dataclasses.replace(spec.adapter, rank=rank, target_modules=modules, strategy=strategy)
            for modules in values("adapter.target_modules") for strategy in values("adapter.strategy")]
