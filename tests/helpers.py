"""Small helpers shared by test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from typing import Any


def numbers(value: Any, path: str = "") -> dict[str, float]:
    """Every number in a nested JSON value, keyed by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numbers(item, f"{path}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in numbers(item, f"{path}[{i}]").items()}
    if isinstance(value, bool) or not isinstance(value, int | float):
        return {}
    return {path: value}
