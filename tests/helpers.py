"""Small helpers shared by test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def numbers(value: Any, path: str = "") -> dict[str, float]:
    """Every number in a nested JSON value, keyed by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numbers(item, f"{path}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in numbers(item, f"{path}[{i}]").items()}
    if isinstance(value, bool) or not isinstance(value, int | float):
        return {}
    return {path: value}


def write_sweep(base: dict[str, Any], folder: Path, /, **changes: Any) -> Path:
    """`base` with top-level `changes` (any key, `sweep` too), as a sweep file whose runs go under `folder/runs`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({**base, "output_dir": str(folder / "runs"), **changes}, sort_keys=False))
    return path
