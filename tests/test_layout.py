"""The package's shape: its layers import only downwards, no module imports itself back, errors pickle."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

from helpers import REPO

from mlora_cli.errors import ConfigError

PACKAGE = REPO / "mlora_cli"
# The data flow, bottom up: a module may import its own layer and the layers before it, never one after.
LAYERS = ["mlora_cli", "errors", "seeds", "files", "spec", "contract", "data", "model", "train", "eval", "report",
          "run", "bench", "export", "cli", "__main__"]
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 else "mlora_cli")


def imports(path: Path, top_level_only: bool) -> set[str]:
    """mlora_cli modules `path` imports (each `from X import name` also counted as X.name when that is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("mlora_cli")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlora_cli"):
            found.add(node.module)
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if (REPO / candidate.replace(".", "/")).with_suffix(".py").is_file() or (
                        REPO / candidate.replace(".", "/")).is_dir():
                    found.add(candidate)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_no_import_goes_back_up_the_data_flow() -> None:
    upward = [f"{name} imports {target}" for name, path in MODULES.items() for target in imports(path, False)
              if target != "mlora_cli" and layer(target) > layer(name)]
    assert upward == []


def test_no_import_circle() -> None:
    """Imports inside functions and under TYPE_CHECKING count too: a lazy import that closes a circle is one."""
    graph = {name: {t for t in imports(path, False) if t in MODULES and t != name} for name, path in MODULES.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_modules_stay_small() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_user_error_survives_pickling() -> None:
    """Workers and Ray actors send it to the parent as it is: every problem line arrives."""
    error = ConfigError(["tasks[0].source: no such file: a.jsonl", "adapter.rank: must be > 0"])
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ConfigError) and copy.problems == error.problems and str(copy) == str(error)
