"""Fitting a rich table to a terminal width without ever cutting a cell.

Every table reads whole at 80 columns, the width a caller that passes no `width` gets: short
headers over two lines (the name, then the unit), a caption that spells the abbreviations out,
and no adapter name or number ever cut or wrapped. Given a wider `width`, tables add columns.
Where the columns still do not fit (long adapter names), a table leaves out its columns of
least interest and says so in its caption, or continues in a second table on the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property

from rich.cells import cell_len
from rich.console import Group, JustifyMethod
from rich.table import Table
from rich.text import Text

from mlora_cli.report.format import DEFAULT_WIDTH

# ---------------------------------------------------------------------------------------
# Fitting a table to a width: every column as wide as its widest cell (nothing is ever cut), columns of least
# interest left out, or the value columns spread over several tables that repeat the key columns.


def width_budget(width: int | None) -> int:
    return DEFAULT_WIDTH if width is None else width


def text_width(markup: str) -> int:
    """Cells of the widest line of a rich markup string."""
    if "[" not in markup:  # no markup: most cells
        return max(cell_len(line) for line in markup.split("\n"))
    return max((line.cell_len for line in Text.from_markup(markup).split("\n")), default=0)


@dataclass
class Col:
    header: str  # "name\nunit"
    cells: list[str]  # rich markup, one per row
    justify: JustifyMethod = "right"
    drop: int = 0  # 0: always shown; else left out, lowest first, while the table is too wide
    folded: str | None = None  # the caption's words for it when left out, where every row holds the same value
    style: str | None = None
    min_width: int = 0

    @property
    def name(self) -> str:
        return " ".join(self.header.split())

    @cached_property  # a 10,000-adapter table is measured once, not once per fitting step
    def width(self) -> int:
        return max(self.min_width, *(text_width(text) for text in [self.header, *self.cells]))


def table_width(columns: Sequence[Col]) -> int:
    """The rendered width of a default rich table: edges, one rule between columns, one space padding each side."""
    return sum(c.width for c in columns) + 3 * len(columns) + 1


def drop_to_fit(columns: list[Col], budget: int) -> tuple[list[Col], list[Col]]:
    """(shown, left out): droppable columns go, lowest `drop` first, until the table fits `budget`."""
    shown, dropped = list(columns), []
    for column in sorted((c for c in columns if c.drop), key=lambda c: c.drop):
        if table_width(shown) <= budget:
            break
        shown.remove(column)
        dropped.append(column)
    return shown, dropped


def left_out_notes(dropped: list[Col], budget: int) -> list[str]:
    """Caption lines for the columns `drop_to_fit` left out."""
    notes = []
    folded = [c.folded for c in dropped if c.folded]
    if folded:
        notes.append("every adapter: " + ", ".join(folded))
    hidden = [c.name for c in dropped if not c.folded]
    if hidden:
        notes.append(f"left out to fit {budget} columns: {', '.join(hidden)}")
    return notes


def split_columns(keys: list[Col], values: list[Col], budget: int) -> list[list[Col]]:
    """The value columns in order over as few tables as fit `budget`, as evenly as they go, each led by the keys.

    The value columns of the narrower tables widen to make every table as wide as the widest.
    """
    greedy: list[list[Col]] = [[]]
    for column in values:
        if greedy[-1] and table_width(keys + greedy[-1] + [column]) > budget:
            greedy.append([])
        greedy[-1].append(column)
    count = len(greedy)
    size, extra = divmod(len(values), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    even = [values[bounds[i]:bounds[i + 1]] for i in range(count)]
    parts = even if all(table_width(keys + part) <= budget for part in even) else greedy
    widest = max(table_width(keys + part) for part in parts)
    widened = []
    for part in parts:
        spare = widest - table_width(keys + part)
        widened.append([replace(c, min_width=c.width + spare // len(part) + (i < spare % len(part)))
                        for i, c in enumerate(part)] if part else part)
    return [keys + part for part in widened]


def fitted_table(columns: list[Col], title: str | None = None, caption: str | None = None) -> Table:
    table = Table(title=title, caption=caption or None, caption_justify="left")
    for column in columns:
        table.add_column(column.header, justify=column.justify, no_wrap=True, style=column.style,
                         min_width=column.min_width or None)
    for row in zip(*(c.cells for c in columns), strict=True):
        table.add_row(*row)
    return table


def continued_tables(parts: list[list[Col]], title: str, caption: str | None = None) -> list[Table]:
    """One table per part: the first under `title`, the last with `caption`."""
    return [
        fitted_table(part, title if i == 0 else f"{title} (continued)", caption if i == len(parts) - 1 else None)
        for i, part in enumerate(parts)
    ]


def as_one(tables: list[Table]) -> Table | Group:
    return tables[0] if len(tables) == 1 else Group(*tables)


def caption_text(*lines: str) -> str:
    return "\n".join(line for line in lines if line)


def best_marked(texts: list[str], values: list[float | None], best: float | None) -> list[str]:
    return [f"[bold green]{t}[/]" if v is not None and v == best else t for t, v in zip(texts, values, strict=True)]
