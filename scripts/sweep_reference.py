"""Print (or --write into docs/sweep-reference.md) the sweep-file reference, generated from mlora_cli/spec/schema.py.

    python scripts/sweep_reference.py --write
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

from mlora_cli.spec.convert import _type_name
from mlora_cli.spec.schema import (
    AdapterConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    PruneConfig,
    RLConfig,
    SearchConfig,
    SweepConfig,
    SweepSpec,
    TaskConfig,
    TrainConfig,
)

START, END = "<!-- sweep-reference:start -->", "<!-- sweep-reference:end -->"
SECTIONS = [("top level", SweepSpec), ("model", ModelConfig), ("tasks[i]", TaskConfig), ("adapter", AdapterConfig),
            ("train", TrainConfig), ("train.rl", RLConfig), ("eval", EvalConfig), ("sweep", SweepConfig),
            ("sweep.search", SearchConfig), ("sweep.prune", PruneConfig), ("logging", LoggingConfig)]


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "required"
    if isinstance(value, tuple):
        value = "[" + ", ".join(map(str, value)) + "]"
    return "null" if value is None else f"`{value}`"


def reference() -> str:
    lines = []
    for title, cls in SECTIONS:
        lines += [f"**{title}**", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _type_name(hints[f.name]).replace("|", "\\|")
            if f.metadata.get("one_or_list"):
                kind = f"a string or {kind}"
            meaning = f.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | {kind} | {default_text(f)} | {meaning} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


PAGE = Path(__file__).resolve().parent.parent / "docs" / "sweep-reference.md"


def updated_page(text: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{reference()}{END}{tail}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        PAGE.write_text(updated_page(PAGE.read_text()))
    else:
        print(reference())
