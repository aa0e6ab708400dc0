"""Typed, frozen, validated configuration: the sweep file as Python objects.

`load_sweep(path, overrides)` reads YAML through omegaconf (so `${...}` interpolation
works), applies dotted command-line overrides, and builds a `SweepSpec`. Every problem is
collected with its full key path (`tasks[1].source: ...`) and raised together as one
`ConfigError`, so a user fixes a file in one pass. This module never imports torch.

Each dataclass field carries its one-line help in `metadata["help"]`; the README's sweep
reference is generated from it (`scripts/sweep_reference.py`, checked by a test).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(Exception):
    """One or more problems in user input, each a line `key.path: message`."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _doc(help_text: str, check: Any = None) -> dict[str, Any]:
    return {"help": help_text, "check": check}


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _dropout_range(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


def _beta_range(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


def _unit_interval(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


def _non_empty(value: Any) -> str | None:
    return None if len(value) > 0 else "must not be empty"


def _optional_positive(value: Any) -> str | None:
    return None if value is None else _positive(value)


_REGEX_CHARACTERS = re.compile(r"[\\^$*+?()\[\]{}|]")


def _target_modules(value: tuple[str, ...]) -> str | None:
    if not value:
        return "must not be empty"
    regexes = [name for name in value if _REGEX_CHARACTERS.search(name)]
    if regexes:
        # PEFT reads a string target as a regex; mlora matches names by suffix only.
        return f"'{regexes[0]}' looks like a regex; list the module names instead (suffix match, or all-linear)"
    return None




@dataclass(frozen=True)
class AdapterConfig:
    """One LoRA adapter's shape and optimizer; `sweep` varies these per adapter."""

    rank: int = field(default=8, metadata=_doc("LoRA rank r", _positive))
    alpha: float = field(default=16.0, metadata=_doc("LoRA alpha; the update is scaled by alpha / rank", _positive))
    dropout: float = field(default=0.0, metadata=_doc("dropout on the LoRA input, in [0, 1)", _dropout_range))
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"),
        metadata={**_doc("names of the linear layers that get LoRA (suffix match, as in PEFT), or all-linear",
                         _target_modules), "one_or_list": True},
    )
    lr: float = field(default=1e-3, metadata=_doc("peak learning rate (AdamW)", _positive))
    weight_decay: float = field(default=0.0, metadata=_doc("AdamW decoupled weight decay", _non_negative))
    beta1: float = field(default=0.9, metadata=_doc("AdamW beta1", _beta_range))
    beta2: float = field(default=0.999, metadata=_doc("AdamW beta2", _beta_range))
    eps: float = field(default=1e-8, metadata=_doc("AdamW epsilon", _positive))
    strategy: Literal["naive", "replay", "l2", "ewc", "lwf", "olora"] = field(
        default="naive", metadata=_doc("continual-learning strategy (see README: Strategies)")
    )
    buffer_size: int = field(default=64, metadata=_doc("replay: examples kept from each finished task", _positive))
    replay_ratio: float = field(default=0.25, metadata=_doc("replay: share of each batch drawn from the buffer", _unit_interval))
    l2_lambda: float = field(default=1.0, metadata=_doc("l2: lambda of lambda/2 ||theta - theta_prev||^2", _non_negative))
    ewc_lambda: float = field(default=1000.0, metadata=_doc("ewc: lambda of lambda/2 sum F (theta - theta*)^2", _non_negative))
    ewc_gamma: float = field(default=1.0, metadata=_doc("ewc: online decay of the old Fisher (1: sum over tasks)", _unit_interval))
    fisher_samples: int = field(default=32, metadata=_doc("ewc: training examples whose squared gradients estimate the Fisher", _positive))
    lwf_lambda: float = field(default=1.0, metadata=_doc("lwf: weight of KL(previous adapter || current)", _non_negative))
    lwf_temperature: float = field(default=2.0, metadata=_doc("lwf: softmax temperature of the distillation", _positive))
    olora_lambda1: float = field(default=0.5, metadata=_doc("olora: weight of sum |A_old A_new^T|", _non_negative))
    olora_lambda2: float = field(default=0.0, metadata=_doc("olora: weight of ||A_new||^2", _non_negative))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class TrainConfig:
    """How each adapter trains; per adapter, so `sweep` may vary these too."""

    steps_per_task: int = field(default=50, metadata=_doc("optimizer steps on each task", _positive))
    batch_size: int = field(default=8, metadata=_doc("rows per adapter per step", _positive))
    max_seq_len: int = field(default=64, metadata=_doc("prompt + completion tokens; longer examples are cut", _positive))
    warmup_steps: int = field(default=0, metadata=_doc("linear warmup steps at the start of training", _non_negative))
    schedule: Literal["constant", "linear", "cosine"] = field(
        default="constant", metadata=_doc("lr after warmup, over all of an adapter's steps")
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata=_doc("clip each adapter's gradient to this norm; null: no clipping", _optional_positive)
    )
    grad_norm_limit: float | None = field(
        default=1e4, metadata=_doc("stop an adapter (failed) whose gradient norm, before clipping, exceeds this", _optional_positive)
    )
    checkpoint_every: int | None = field(
        default=50, metadata=_doc("also save the training state every N steps (always at task ends); null: task ends only", _optional_positive)
    )


@dataclass(frozen=True)
class EvalConfig:
    """What is measured on every task's eval split after every task."""

    metrics: tuple[Literal["loss", "token_accuracy", "exact_match"], ...] = field(
        default=("loss", "token_accuracy", "exact_match"),
        metadata=_doc("loss, token_accuracy: on completion tokens; exact_match: greedy generation", _non_empty),
    )
    max_new_tokens: int = field(default=16, metadata=_doc("tokens generated for exact_match", _positive))
    batch_size: int = field(default=256, metadata=_doc("rows per evaluation forward (all adapters together)", _positive))
    every_steps: int | None = field(
        default=None, metadata=_doc("also evaluate every N steps within a task (per-task curves); null: only at task ends", _optional_positive)
    )


@dataclass(frozen=True)
class TaskConfig:
    """One task of the ordered sequence."""

    name: str = field(metadata=_doc("unique task name", _non_empty))
    source: str = field(
        metadata=_doc("builtin:<generator> | jsonl:PATH | csv:PATH | parquet:PATH | hf:NAME[:CONFIG]", _non_empty)
    )
    train_examples: int = field(default=256, metadata=_doc("training examples drawn from the source", _positive))
    eval_examples: int = field(default=64, metadata=_doc("held-out evaluation examples", _positive))
    steps: int | None = field(default=None, metadata=_doc("steps on this task; default train.steps_per_task", _optional_positive))
    prompt_field: str = field(default="prompt", metadata=_doc("file/hf sources: the prompt column"))
    completion_field: str = field(default="completion", metadata=_doc("file/hf sources: the completion column"))
    eval_source: str | None = field(default=None, metadata=_doc("file/hf sources: a separate eval set, else a held-out split"))
    split: str = field(default="train", metadata=_doc("hf sources: the split to read"))
    eval_split: str | None = field(default=None, metadata=_doc("hf eval_source: its split; default `split`"))
    min_len: int = field(default=3, metadata=_doc("builtin: shortest input (characters, or digits for add)", _positive))
    max_len: int = field(default=8, metadata=_doc("builtin: longest input", _positive))
    shift: int = field(default=3, metadata=_doc("builtin caesar: the shift"))
    prefix: str | None = field(default=None, metadata=_doc("builtin: the task tag before the input; default the generator name"))
    format: Literal["plain", "chat"] = field(
        default="plain",
        metadata=_doc("plain: prompt then completion; chat: the prompt as a user turn through the tokenizer's chat template"),
    )


@dataclass(frozen=True)
class ModelConfig:
    """How the frozen base model is loaded (the model itself is the top-level `base_model`)."""

    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata=_doc("the base weights' dtype; LoRA weights and their optimizer stay float32")
    )
    tokenizer: str | None = field(default=None, metadata=_doc("tokenizer id or folder; null: the base model's own"))
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = field(
        default=None, metadata=_doc("attention kernel; null: the transformers default")
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_doc("recompute each layer's activations in backward: less memory, ~30% more compute")
    )


# Module-level aliases: inside SweepConfig the field names `list` and `zip` shadow the builtins.
Mapping = dict[str, Any]


@dataclass(frozen=True)
class SweepConfig:
    """How the `adapter` and `train` defaults expand into many adapters."""

    grid: Mapping = field(default_factory=dict, metadata=_doc("cartesian product: dotted key -> values"))
    zip: Mapping = field(default_factory=dict, metadata=_doc("equal-length lists advanced together"))
    list: tuple[Mapping, ...] = field(default=(), metadata=_doc("explicit adapters: mappings of dotted key -> value"))
    seeds: tuple[int, ...] | None = field(default=None, metadata=_doc("repeat every configuration per seed"))


@dataclass(frozen=True)
class SweepSpec:
    """The whole sweep file."""

    name: str = field(metadata=_doc("run name; the run folder is <output_dir>/<name>-<timestamp>", _non_empty))
    tasks: tuple[TaskConfig, ...] = field(metadata=_doc("the ordered task sequence", _non_empty))
    base_model: str = field(
        default="builtin:tiny",
        metadata=_doc("HF model id, local folder, or builtin:tiny (pretrained) | tiny-random | micro | small | smollm2-135m", _non_empty),
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_doc("how the base model loads"))
    seed: int = field(default=0, metadata=_doc("seed for adapter init, data order and builtin data"))
    adapter: AdapterConfig = field(default_factory=AdapterConfig, metadata=_doc("defaults for every adapter"))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_doc("training defaults for every adapter"))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=_doc("evaluation settings"))
    sweep: SweepConfig = field(default_factory=SweepConfig, metadata=_doc("grid / zip / list expansion"))
    devices: str | tuple[str, ...] = field(default="auto", metadata=_doc("auto | cpu | [cuda:0, ...]"))
    max_concurrent: int | None = field(
        default=None, metadata=_doc("adapters one worker trains at once; null: all", _optional_positive)
    )
    output_dir: str = field(default="runs", metadata=_doc("where run folders are written", _non_empty))


# Keys a sweep may vary per adapter: every field of `adapter` and `train`.
SWEEPABLE_SECTIONS = {"adapter": AdapterConfig, "train": TrainConfig}
MAX_ADAPTERS = 10_000


# ---------------------------------------------------------------------------------------
# Generic building of frozen dataclasses from plain data, collecting every problem.


def did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_plural_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _plural_type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:
        return "mappings"
    plurals = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
    return plurals.get(tp, _type_name(tp))


def unknown_key_hint(section: str, key: str) -> str:
    """Did-you-mean for an unknown key of `adapter` or `train`, looking in the other section too."""
    names = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SWEEPABLE_SECTIONS.items()}
    hint = did_you_mean(key, names[section])
    for other, fields in names.items():
        if not hint and other != section and key in fields:  # lr lives under adapter, batch_size under train
            hint = f" (did you mean '{other}.{key}'?)"
    return hint


_NO = object()  # marks a value that failed to convert


def convert(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    """Convert plain YAML data to `tp`, appending `path: message` for each problem."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, errors)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            trial: list[str] = []
            result = convert(option, value, path, trial)
            if not trial:
                return result
        errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return _NO
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        errors.append(f"{path}: must be one of {', '.join(map(str, choices))}, got {value!r}{did_you_mean(str(value), map(str, choices))}")
        return _NO
    if origin is tuple:
        item_type = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
            return _NO
        items = [convert(item_type, item, f"{path}[{i}]", errors) for i, item in enumerate(value)]
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return _NO
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    errors.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return _NO


def build(cls: Any, data: Any, path: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from a mapping: unknown keys, types and ranges all checked."""
    prefix = f"{path}." if path else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{path or 'sweep file'}: expected a mapping, got {data!r}")
        return _NO
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            section_cls = SWEEPABLE_SECTIONS.get(path)
            hint = unknown_key_hint(path, str(key)) if section_cls is cls else did_you_mean(str(key), fields)
            errors.append(f"{prefix}{key}: unknown key{hint}")
    kwargs: dict[str, Any] = {}
    failed = False
    for name, f in fields.items():
        key_path = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{key_path}: required")
                failed = True
            continue
        value = convert(hints[name], _one_or_list(f, data[name]), key_path, errors)
        if value is _NO or (isinstance(value, tuple) and _NO in value):
            failed = True
            continue
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            errors.append(f"{key_path}: {problem}")
            failed = True
            continue
        kwargs[name] = value
    if failed:
        return _NO
    return cls(**kwargs)


def _one_or_list(f: dataclasses.Field, value: Any) -> Any:
    """A field that takes one name or a list (as PEFT's `target_modules`) reads a lone string as a list of one."""
    return [value] if f.metadata.get("one_or_list") and isinstance(value, str) else value


def check_value(section: str, key: str, value: Any, path: str, errors: list[str]) -> Any:
    """Check one sweep value for `section.key` as the field itself would be checked."""
    cls = SWEEPABLE_SECTIONS[section]
    f = {f.name: f for f in dataclasses.fields(cls)}[key]
    before = len(errors)
    converted = convert(typing.get_type_hints(cls)[key], _one_or_list(f, value), path, errors)
    if len(errors) == before:
        check = f.metadata.get("check")
        problem = check(converted) if check else None
        if problem:
            errors.append(f"{path}: {problem}")
    return converted


# ---------------------------------------------------------------------------------------
# Loading: YAML -> omegaconf (interpolation, overrides) -> plain dict -> SweepSpec.


def _nest_dotted(mapping: Any) -> Any:
    """`{"adapter.rank": [4]}` -> `{"adapter": {"rank": [4]}}`, so both spellings merge."""
    if not isinstance(mapping, dict):
        return mapping
    nested: dict[str, Any] = {}
    for key, value in mapping.items():
        parts = str(key).split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            value = _nest_dotted(value)
            if isinstance(node.get(parts[-1]), dict) and isinstance(value, dict):
                node[parts[-1]].update(value)
            else:
                node[parts[-1]] = value
    return nested


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
        raise ConfigError([f"{path}: the sweep file must be a mapping of keys (name, tasks, ...), got {type(data).__name__}"])
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
            conf.merge_with_dotlist([item])
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
                sweep[axis] = _nest_dotted(sweep[axis])
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
    return _apply_aliases(resolved)  # type: ignore[arg-type]


# PEFT's `LoraConfig` spellings of adapter keys, accepted wherever an adapter key is written.
PEFT_ALIASES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}


def _rename_peft_keys(adapter: dict[str, Any], path: str, problems: list[str]) -> dict[str, Any]:
    renamed = dict(adapter)
    for alias, key in PEFT_ALIASES.items():
        if alias in renamed:
            if key in renamed:
                problems.append(f"{path}.{alias}: PEFT's name for {path}.{key}, which is also set; keep one")
            renamed[key] = renamed.pop(alias)
    return renamed


def _apply_aliases(data: dict[str, Any]) -> dict[str, Any]:
    """Other spellings people reach for, rewritten to mlora's keys before validation.

    `train.lr` is accepted for `adapter.lr` (it wins when both are set), and PEFT's `r`,
    `lora_alpha`, `lora_dropout` for `rank`, `alpha`, `dropout`: in the adapter section and
    in the sweep's grid, zip and list.
    """
    problems: list[str] = []
    train, adapter = data.get("train"), data.get("adapter", {})
    if isinstance(train, dict) and "lr" in train and isinstance(adapter, dict):
        data["adapter"] = {**adapter, "lr": train["lr"]}
        data["train"] = {k: v for k, v in train.items() if k != "lr"}
    if isinstance(data.get("adapter"), dict):
        data["adapter"] = _rename_peft_keys(data["adapter"], "adapter", problems)
    sweep = data.get("sweep")
    if isinstance(sweep, dict):
        for axis in ("grid", "zip"):
            section = sweep.get(axis)
            if isinstance(section, dict) and isinstance(section.get("adapter"), dict):
                section["adapter"] = _rename_peft_keys(section["adapter"], f"sweep.{axis}.adapter", problems)
        entries = sweep.get("list")
        for i, entry in enumerate(entries if isinstance(entries, list) else []):
            if isinstance(entry, dict):
                entries[i] = _nest_dotted(entry)
                if isinstance(entries[i].get("adapter"), dict):
                    entries[i]["adapter"] = _rename_peft_keys(entries[i]["adapter"], f"sweep.list[{i}].adapter",
                                                              problems)
    if problems:
        raise ConfigError(problems)
    return data


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
    for i, device in enumerate(devices if isinstance(devices, list) else [devices]):
        path = f"devices[{i}]" if isinstance(devices, list) else "devices"
        if isinstance(device, str) and not re.fullmatch(r"auto|cpu|cpu:[1-9][0-9]*|cuda(:[0-9]+)?", device):
            errors.append(f"{path}: expected auto, cpu, cpu:K or cuda:N, got '{device}'")
    base_model = data.get("base_model")
    if isinstance(base_model, str) and base_model.startswith("builtin:") and base_model not in BUILTIN_MODELS:
        errors.append(f"base_model: unknown builtin model '{base_model}'{did_you_mean(base_model, BUILTIN_MODELS)}")
    from mlora_cli.weights import PRETRAINED_WEIGHTS, read_checked  # torch-free

    if base_model in PRETRAINED_WEIGHTS:
        problem = read_checked(base_model)[1]
        if problem:
            errors.append(problem)

    # The deeper checks run on every part that built, even when another part failed, so one
    # pass reports every problem. Parts that failed have their errors in `errors` already.
    from mlora_cli.sweep import check_sweep
    from mlora_cli.tasks import check_task  # torch-free: reads file headers only

    for i, task in _built_tasks(spec, data):
        errors.extend(check_task(task, f"tasks[{i}]", base_dir))
    sweep = spec.sweep if spec is not _NO else build(SweepConfig, data.get("sweep"), "sweep", [])
    if sweep is not _NO:
        errors.extend(check_sweep(sweep))
    if errors:
        raise ConfigError(errors)
    return spec


def _built_tasks(spec: Any, data: dict[str, Any]) -> list[tuple[int, TaskConfig]]:
    """(index, task) for every task that is valid on its own."""
    if spec is not _NO:
        return list(enumerate(spec.tasks))
    tasks = data.get("tasks")
    built = [(i, build(TaskConfig, t, f"tasks[{i}]", [])) for i, t in enumerate(tasks if isinstance(tasks, list) else [])]
    return [(i, task) for i, task in built if task is not _NO]


# model.base.BUILTIN_SPECS (built in code) plus SmolLM2, converted from a GGUF file; torch-free here.
BUILTIN_MODELS = ("builtin:tiny", "builtin:tiny-random", "builtin:micro", "builtin:small", "builtin:smollm2-135m")


def load_sweep(path: str | Path, overrides: typing.Sequence[str] = ()) -> tuple[SweepSpec, dict[str, Any]]:
    """Read, override, resolve and validate a sweep file. Returns (spec, resolved plain data)."""
    path = Path(path)
    data = resolve(read_yaml(path), overrides)
    spec = parse_spec(data, base_dir=path.parent)
    return spec, data


def to_plain(obj: Any) -> Any:
    """A config object as plain JSON/YAML-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


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
    if not errors:
        from mlora_cli.tasks import check_task

        for i, task in enumerate(tasks):
            errors.extend(check_task(task, f"tasks[{i}]", path.parent))
    if errors:
        raise ConfigError(errors)
    return TaskSuite(tasks=tuple(tasks), eval=eval_config, seed=seed, base_dir=path.parent)
