"""Shared by the config, sweep and CLI tests: the repo root and a writer for temporary sweep files."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The smallest valid sweep: two builtin tasks, default adapter, one adapter.
MINIMAL_SWEEP = """\
name: t
tasks:
  - {name: a, source: "builtin:copy", train_examples: 16, eval_examples: 4}
  - {name: b, source: "builtin:reverse", train_examples: 16, eval_examples: 4}
"""

WriteSweep = Callable[[str], Path]


@pytest.fixture
def write_sweep(tmp_path: Path) -> WriteSweep:
    """Write YAML text to `<tmp_path>/sweep.yaml` and return the path."""

    def write(text: str) -> Path:
        path = tmp_path / "sweep.yaml"
        path.write_text(text)
        return path

    return write


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module: results then do not depend on how a batch is split over threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
