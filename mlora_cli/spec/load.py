"""Reading a sweep file: YAML -> omegaconf (interpolation, overrides) -> plain data -> SweepSpec.

`load_sweep(path, overrides)` reads YAML through omegaconf (so `${...}` interpolation works),
applies dotted command-line overrides and other spellings (aliases), and builds and
cross-checks a `SweepSpec`. Every problem is collected with its full key path
(`tasks[1].source: ...`) and raised together as one `ConfigError`. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mlora_cli.errors import ConfigError
from mlora_cli.spec.aliases import apply_aliases, canonical_override, nest_dotted
from mlora_cli.spec.convert import _NO, build, did_you_mean
from mlora_cli.spec.models import BUILTIN_MODELS, PRETRAINED_WEIGHTS, read_checked
from mlora_cli.spec.plan import gpu_device_nodes_present, missing_cuda_devices
from mlora_cli.spec.schema import EvalConfig, SweepConfig, SweepSpec, TaskConfig
from mlora_cli.spec.space import measuring_steps
from mlora_cli.spec.sweep import check_sweep, expand, searched_keys
from mlora_cli.spec.tasks import check_choice_metric, check_task, first_line


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"{path}: no such file"])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{path}: YAML syntax error{where}: {problem}"]) from None
    if data is None:
        raise ConfigError([f"{path}: the sweep file is empty; it must be a mapping of keys (name, tasks, ...)"])
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the sweep file must be a mapping of keys (name, tasks, ...), "
                           f"got {type(data).__name__}"])
    try:
        # Parse again through omegaconf's loader: it reads 1e-3 as a float, as users expect.
        data = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: {_error_text(exc)}"]) from None
    return data  # type: ignore[return-value]


def _error_text(exc: Exception) -> str:
    """One line for an omegaconf or YAML error, led by the key it concerns when known."""
    if isinstance(exc, yaml.YAMLError):
        return str(getattr(exc, "problem", None) or exc).splitlines()[0]
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    key = getattr(exc, "full_key", None)
    return f"{key}: {text}" if key else text


_OMEGACONF_ERRORS = (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError)


def _apply_overrides(conf: Any, overrides: typing.Sequence[str]) -> None:
    """Set each dotted `key=value` (list items by index: tasks.1.steps=5); ConfigError naming each bad one."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override '{item}': expected key=value, e.g. adapter.lr=3e-3")
            continue
        try:
            conf.merge_with_dotlist([canonical_override(conf, item)])
        except _OMEGACONF_ERRORS as exc:  # bad YAML value, a list index out of range or not a number, ...
            problems.append(f"override '{item}': {_error_text(exc)}")
    if problems:
        raise ConfigError(problems)


def resolve(data: dict[str, Any], overrides: typing.Sequence[str] = ()) -> dict[str, Any]:
    """Apply dotted overrides and `${...}` interpolation; return plain data."""
    data = dict(data)
    sweep = data.get("sweep")
    if isinstance(sweep, dict):
        sweep = dict(sweep)
        for axis in ("grid", "zip"):
            if isinstance(sweep.get(axis), dict):
                sweep[axis] = nest_dotted(sweep[axis])
        data["sweep"] = sweep
    try:
        conf = OmegaConf.create(data)
    except _OMEGACONF_ERRORS as exc:
        raise ConfigError([_error_text(exc)]) from None
    _apply_overrides(conf, overrides)
    try:
        resolved = OmegaConf.to_container(conf, resolve=True)
    except _OMEGACONF_ERRORS as exc:
        raise ConfigError([_error_text(exc)]) from None
    return apply_aliases(resolved)  # type: ignore[arg-type]


def parse_spec(data: dict[str, Any], base_dir: Path | None = None) -> SweepSpec:
    """Build and cross-check a SweepSpec; raise ConfigError listing every problem."""
    errors: list[str] = []
    spec = build(SweepSpec, data, "", errors)
    tasks = data.get("tasks")
    if isinstance(tasks, list):
        seen: dict[str, int] = {}
        for i, task in enumerate(tasks):
            name = task.get("name") if isinstance(task, dict) else None
            if isinstance(name, str):
                if name in seen:
                    errors.append(f"tasks[{i}].name: duplicate task name '{name}' (also tasks[{seen[name]}])")
                seen[name] = i
    if isinstance(data.get("name"), str) and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", data["name"]):
        errors.append("name: use letters, digits, '-', '_' and '.' only (it names the run folder)")
    devices = data.get("devices", "auto")
    if isinstance(devices, list) and not devices:
        errors.append("devices: an empty list (give auto, cpu, cpu:K or a list of cuda:N)")
    for i, device in enumerate(devices if isinstance(devices, list) else [devices]):
        path = f"devices[{i}]" if isinstance(devices, list) else "devices"
        if isinstance(device, str) and not re.fullmatch(r"auto|cpu|cpu:[1-9][0-9]*|cuda(:[0-9]+)?", device):
            errors.append(f"{path}: expected auto, cpu, cpu:K or cuda:N, got '{device}'")
    base_model = data.get("base_model")
    if isinstance(base_model, str) and base_model.startswith("builtin:") and base_model not in BUILTIN_MODELS:
        errors.append(f"base_model: unknown builtin model '{base_model}'{did_you_mean(base_model, BUILTIN_MODELS)}")
    if isinstance(base_model, str) and not base_model.startswith("builtin:"):
        errors.extend(local_model_problems(base_model))
    if not gpu_device_nodes_present() and isinstance(devices, (str, list)):
        errors.extend(missing_cuda_devices(tuple(devices) if isinstance(devices, list) else devices, 0))
    if isinstance(base_model, str) and base_model in PRETRAINED_WEIGHTS:
        problem = read_checked(base_model)[1]
        if problem:
            errors.append(problem)

    # The deeper checks run on every part that built, even when another part failed, so one
    # pass reports every problem. Parts that failed have their errors in `errors` already.
    for i, task in _built_tasks(spec, data):
        errors.extend(check_task(task, f"tasks[{i}]", base_dir))
    sweep = spec.sweep if spec is not _NO else build(SweepConfig, data.get("sweep"), "sweep", [])
    if sweep is not _NO:
        errors.extend(check_sweep(sweep))
    eval_config = spec.eval if spec is not _NO else build(EvalConfig, data.get("eval"), "eval", [])
    if eval_config is not _NO:
        errors.extend(check_eval(eval_config))
        errors.extend(check_choice_metric(_built_tasks(spec, data), eval_config.metrics))
        if sweep is not _NO:
            errors.extend(check_search(sweep, eval_config))
    if not errors:
        errors.extend(check_init_from(spec) + check_prune_steps(spec))
    if errors:
        raise ConfigError(errors)
    return spec


def check_prune_steps(spec: SweepSpec) -> list[str]:
    """Pruning that could never act: not before the last step of the longest trial (the defaults' where a search
    varies train.steps_per_task)."""
    prune = spec.sweep.prune
    if prune.method == "none" or (spec.sweep.search.method != "grid"
                                  and "train.steps_per_task" in searched_keys(spec)):  # each trial's own
        return []
    task_steps = [t.steps for t in spec.tasks]
    longest = max(adapter.total_steps(task_steps) for adapter in expand(spec))
    if prune.min_steps >= longest:
        return [f"sweep.prune.min_steps: {prune.min_steps} is not below the {longest} steps a trial trains: nothing "
                "would be pruned (a trial is judged before its last step)"]
    if not measuring_steps(spec, longest):  # median's interval, or prune.every_steps, is the whole trial or more
        key, every = ("sweep.prune.every_steps", prune.every_steps) if prune.every_steps else (
            "eval.every_steps", spec.eval.every_steps)
        return [f"{key}: {every} measures the objective no earlier than the last of the {longest} steps a trial "
                "trains: nothing would be pruned"]
    return []


def check_init_from(spec: SweepSpec) -> list[str]:
    """Every `adapter.init_from` names a PEFT LoRA folder of the adapter's rank and alpha (read without torch)."""
    problems: list[str] = []
    method = spec.sweep.search.method
    if method != "grid" and spec.adapter.init_from is not None:  # trial slots hold the defaults: check what varies
        if varied := sorted(searched_keys(spec) & {"adapter.rank", "adapter.alpha"}):
            return [f"adapter.init_from: a warm start fixes the rank and alpha it was trained with; method {method} "
                    f"searches {' and '.join(varied)}"]
    for adapter in expand(spec):
        path = adapter.adapter.init_from
        if path is None:
            continue
        where = "adapter.init_from" + (f" (adapter {adapter.name})" if spec.sweep.grid or spec.sweep.zip
                                       or spec.sweep.list else "")
        config_file = Path(path) / "adapter_config.json"
        if not config_file.is_file():
            problem = f"{where}: {path} is not a PEFT adapter folder (no adapter_config.json)"
        else:
            try:
                saved = json.loads(config_file.read_text())
                rank, alpha = int(saved["r"]), float(saved["lora_alpha"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                problem = f"{where}: {config_file}: unreadable ({type(exc).__name__}: {exc})"
            else:
                problem = None
                if saved.get("peft_type", "LORA") != "LORA" or saved.get("use_dora"):
                    problem = f"{where}: {path} is not a plain LoRA adapter"
                elif (rank, alpha) != (adapter.adapter.rank, adapter.adapter.alpha):
                    problem = (f"{where}: {path} has r={rank}, lora_alpha={alpha:g}; the adapter has rank "
                               f"{adapter.adapter.rank}, alpha {adapter.adapter.alpha:g}: set them to match")
                else:
                    problem = _safetensors_problem(Path(path) / "adapter_model.safetensors", where)
        if problem and problem not in problems:
            problems.append(problem)
    return problems


def _safetensors_problem(file: Path, where: str) -> str | None:
    """Why `file` is not a readable safetensors file, from its header alone (8-byte length, then JSON), or None."""
    try:
        with file.open("rb") as stream:
            size = file.stat().st_size
            length = int.from_bytes(stream.read(8), "little")
            if not 2 <= length <= size - 8:
                return f"{where}: {file}: not a safetensors file (damaged or truncated)"
            header = json.loads(stream.read(length))
    except FileNotFoundError:
        return f"{where}: {file.parent} has no adapter_model.safetensors"
    except (OSError, ValueError) as exc:
        return f"{where}: {file}: unreadable ({type(exc).__name__}: {first_line(exc)})"
    return None if isinstance(header, dict) else f"{where}: {file}: not a safetensors file (damaged)"


def absolute_paths(data: dict[str, Any], base_dir: Path) -> None:
    """Relative `adapter.init_from` paths (in `adapter` and in sweep values) and `eval.harness_include` resolved
    against the sweep's folder.

    In place, so the run folder's resolved sweep names the same folders wherever it is resumed from.
    """
    def absolute(value: Any) -> Any:
        if isinstance(value, str) and not Path(value).expanduser().is_absolute():
            return str((base_dir / value).resolve())
        return str(Path(value).expanduser()) if isinstance(value, str) else value

    evaluation = data.get("eval")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("harness_include"), str):
        evaluation["harness_include"] = absolute(evaluation["harness_include"])
    key = "adapter.init_from"
    adapter = data.get("adapter")
    if isinstance(adapter, dict) and "init_from" in adapter:
        adapter["init_from"] = absolute(adapter["init_from"])
    sweep = data.get("sweep")
    if not isinstance(sweep, dict):
        return
    for part in ("grid", "zip"):
        axis = sweep.get(part)
        if isinstance(axis, dict) and isinstance(axis.get(key), list):
            axis[key] = [absolute(v) for v in axis[key]]
    for entry in sweep.get("list") or []:
        if isinstance(entry, dict) and key in entry:
            entry[key] = absolute(entry[key])


HARNESS_MISSING = "needs lm-evaluation-harness, which is not installed: pip install 'mlora-sweep[lm-eval]'"


def check_eval(config: EvalConfig) -> list[str]:
    """Problems between `eval` keys: pass@k draws its k tries from the n samples of each example; harness tasks need
    the harness installed and their include folder there (the task names are checked when the run starts)."""
    import importlib.util

    problems = []
    if config.samples < config.pass_k:
        problems.append(f"eval.samples: must be >= eval.pass_k (n samples per example to estimate pass@k from; "
                        f"got samples {config.samples} < pass_k {config.pass_k})")
    if config.harness_tasks and importlib.util.find_spec("lm_eval") is None:
        problems.append(f"eval.harness_tasks: {HARNESS_MISSING}")
    if config.harness_include is not None and not Path(config.harness_include).is_dir():
        problems.append(f"eval.harness_include: no such folder: {config.harness_include}")
    if config.harness_include is not None and not config.harness_tasks:
        problems.append("eval.harness_include: names local harness tasks, but eval.harness_tasks is empty")
    return problems


def check_search(sweep: SweepConfig, config: EvalConfig) -> list[str]:
    """A search or pruning runs through Optuna (installed?) on a metric the evaluation computes."""
    import importlib.util

    problems = []
    if sweep.runs_a_study and importlib.util.find_spec("optuna") is None:
        problems.append(f"sweep.search: method {sweep.search.method} / prune {sweep.prune.method} run through Optuna, "
                        "which is not installed: pip install 'mlora-sweep[optuna]'")
    metric = sweep.search.metric
    if metric is not None and metric not in config.metrics:
        problems.append(f"sweep.search.metric: '{metric}' is not evaluated (eval.metrics: {', '.join(config.metrics)})"
                        f"{did_you_mean(str(metric), config.metrics)}")
    return problems


def local_model_problems(name: str) -> list[str]:
    """A base model named by a path must be a folder with config.json; a hub id (`org/name`) is checked when loaded."""
    path = Path(name).expanduser()
    path_like = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or path.exists()
    if not path_like:
        return []
    if not path.is_dir():
        return [f"base_model: no such folder: {name} (a hub id looks like org/name)"]
    if not (path / "config.json").is_file():
        return [f"base_model: {name} has no config.json: not a transformers model folder"]
    return []


def _built_tasks(spec: Any, data: dict[str, Any]) -> list[tuple[int, TaskConfig]]:
    """(index, task) for every task that is valid on its own."""
    if spec is not _NO:
        return list(enumerate(spec.tasks))
    tasks = data.get("tasks")
    built = [(i, build(TaskConfig, t, f"tasks[{i}]", []))
             for i, t in enumerate(tasks if isinstance(tasks, list) else [])]
    return [(i, task) for i, task in built if task is not _NO]




def load_sweep(path: str | Path, overrides: typing.Sequence[str] = ()) -> tuple[SweepSpec, dict[str, Any]]:
    """Read, override, resolve and validate a sweep file. Returns (spec, resolved plain data)."""
    path = Path(path)
    data = resolve(read_yaml(path), overrides)
    absolute_paths(data, path.parent)
    spec = parse_spec(data, base_dir=path.parent)
    return spec, data


@dataclass(frozen=True)
class TaskSuite:
    """What `mlora eval --tasks FILE` evaluates on: a task list, eval settings and a data seed."""

    tasks: tuple[TaskConfig, ...]
    eval: EvalConfig
    seed: int | None  # None: each adapter's own seed
    base_dir: Path | None = None  # relative data paths resolve against it (the tasks file's folder)


def load_task_suite(path: str | Path) -> TaskSuite:
    """Read `tasks:` (plus optional `eval:` and `seed:`) from a tasks file or a whole sweep file."""
    path = Path(path)
    data = resolve(read_yaml(path))
    errors: list[str] = []
    allowed = {f.name for f in dataclasses.fields(SweepSpec)}
    for key in data:
        if key not in allowed:
            errors.append(f"{path}: {key}: unknown key{did_you_mean(str(key), allowed)}")
    raw_tasks = data.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        errors.append(f"{path}: tasks: expected a non-empty list of tasks")
        raw_tasks = []
    tasks = [build(TaskConfig, t, f"tasks[{i}]", errors) for i, t in enumerate(raw_tasks)]
    eval_config = build(EvalConfig, data.get("eval"), "eval", errors)
    seed = data.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        errors.append(f"seed: expected an integer, got {seed!r}")
    names = [t.name for t in tasks if t is not _NO]
    for name in {n for n in names if names.count(n) > 1}:
        errors.append(f"tasks: duplicate task name '{name}'")
    if eval_config is not _NO:
        errors.extend(check_eval(eval_config))
        errors.extend(check_choice_metric([(i, t) for i, t in enumerate(tasks) if t is not _NO], eval_config.metrics))
    if not errors:
        for i, task in enumerate(tasks):
            errors.extend(check_task(task, f"tasks[{i}]", path.parent))
    if errors:
        raise ConfigError(errors)
    return TaskSuite(tasks=tuple(tasks), eval=eval_config, seed=seed, base_dir=path.parent)
