"""Plain YAML data -> the schema's frozen dataclasses, collecting every problem with its key path.

`build(cls, data, path, errors)` checks unknown keys (with a did-you-mean), types and each
field's range; problems go to `errors` as `key.path: message`, so a user fixes a file in one
pass. Torch-free.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

from mlora_cli.spec.schema import SWEEPABLE_SECTIONS


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
    return {int: "an integer", float: "a number", str: "a string",
            bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


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
        errors.append(f"{path}: must be one of {', '.join(map(str, choices))}, got {value!r}"
                      f"{did_you_mean(str(value), map(str, choices))}")
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


def to_plain(obj: Any) -> Any:
    """A config object as plain JSON/YAML-ready data (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj
