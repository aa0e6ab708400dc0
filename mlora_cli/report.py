"""Everything a person sees: the adapter plan, live progress, and the result tables.

Every table reads whole at 80 columns, the width a caller that passes no `width` gets: short headers over two lines
(the name, then the unit), a caption that spells the abbreviations out, and no adapter name or number ever cut or
wrapped. Given a wider `width`, tables add columns. Where the columns still do not fit (long adapter names), a table
leaves out its columns of least interest and says so in its caption, or continues in a second table on the same rows.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console, Group, JustifyMethod
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table
from rich.text import Text

from mlora_cli import metrics as cl
from mlora_cli.config import SweepSpec
from mlora_cli.plan import WorkerPlan
from mlora_cli.runfolder import write_text

# How each metric reads: higher is better unless listed here.
LOWER_IS_BETTER = {"loss"}
PERCENT_METRICS = {"exact_match", "token_accuracy"}

# The width every table fits when its caller gives none: a plain terminal, a log file, a pipe.
DEFAULT_WIDTH = 80


def format_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if metric in PERCENT_METRICS else f"{value:.4f}"


def metric_header(metric: str) -> str:
    return f"{metric} (%)" if metric in PERCENT_METRICS else metric


# Short two-line headers of the per-metric columns, and what the caption says they are.
_METRIC_SHORT = {"exact_match": "exact\n%", "token_accuracy": "token\nacc %", "loss": "loss"}
_METRIC_LEGEND = {"exact_match": "exact: exact match (greedy generation)", "token_accuracy": "token acc: token accuracy"}


def _metric_short(metric: str) -> str:
    return _METRIC_SHORT.get(metric, metric_header(metric))


# ---------------------------------------------------------------------------------------
# Fitting a table to a width: every column as wide as its widest cell (nothing is ever cut), columns of least
# interest left out, or the value columns spread over several tables that repeat the key columns.


def _budget(width: int | None) -> int:
    return DEFAULT_WIDTH if width is None else width


def _text_width(markup: str) -> int:
    """Cells of the widest line of a rich markup string."""
    if "[" not in markup:  # no markup: most cells
        return max(cell_len(line) for line in markup.split("\n"))
    return max((line.cell_len for line in Text.from_markup(markup).split("\n")), default=0)


@dataclass
class _Col:
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
        return max(self.min_width, *(_text_width(text) for text in [self.header, *self.cells]))


def _table_width(columns: Sequence[_Col]) -> int:
    """The rendered width of a default rich table: edges, one rule between columns, one space padding each side."""
    return sum(c.width for c in columns) + 3 * len(columns) + 1


def _fit(columns: list[_Col], budget: int) -> tuple[list[_Col], list[_Col]]:
    """(shown, left out): droppable columns go, lowest `drop` first, until the table fits `budget`."""
    shown, dropped = list(columns), []
    for column in sorted((c for c in columns if c.drop), key=lambda c: c.drop):
        if _table_width(shown) <= budget:
            break
        shown.remove(column)
        dropped.append(column)
    return shown, dropped


def _left_out(dropped: list[_Col], budget: int) -> list[str]:
    """Caption lines for the columns `_fit` left out."""
    notes = []
    folded = [c.folded for c in dropped if c.folded]
    if folded:
        notes.append("every adapter: " + ", ".join(folded))
    hidden = [c.name for c in dropped if not c.folded]
    if hidden:
        notes.append(f"left out to fit {budget} columns: {', '.join(hidden)}")
    return notes


def _parts(keys: list[_Col], values: list[_Col], budget: int) -> list[list[_Col]]:
    """The value columns in order over as few tables as fit `budget`, as evenly as they go, each led by the keys.

    The value columns of the narrower tables widen to make every table as wide as the widest.
    """
    greedy: list[list[_Col]] = [[]]
    for column in values:
        if greedy[-1] and _table_width(keys + greedy[-1] + [column]) > budget:
            greedy.append([])
        greedy[-1].append(column)
    count = len(greedy)
    size, extra = divmod(len(values), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    even = [values[bounds[i]:bounds[i + 1]] for i in range(count)]
    parts = even if all(_table_width(keys + part) <= budget for part in even) else greedy
    widest = max(_table_width(keys + part) for part in parts)
    widened = []
    for part in parts:
        spare = widest - _table_width(keys + part)
        widened.append([replace(c, min_width=c.width + spare // len(part) + (i < spare % len(part)))
                        for i, c in enumerate(part)] if part else part)
    return [keys + part for part in widened]


def _table(columns: list[_Col], title: str | None = None, caption: str | None = None) -> Table:
    table = Table(title=title, caption=caption or None, caption_justify="left")
    for column in columns:
        table.add_column(column.header, justify=column.justify, no_wrap=True, style=column.style,
                         min_width=column.min_width or None)
    for row in zip(*(c.cells for c in columns), strict=True):
        table.add_row(*row)
    return table


def _continued(parts: list[list[_Col]], title: str, caption: str | None = None) -> list[Table]:
    """One table per part: the first under `title`, the last with `caption`."""
    return [
        _table(part, title if i == 0 else f"{title} (continued)", caption if i == len(parts) - 1 else None)
        for i, part in enumerate(parts)
    ]


def _one(tables: list[Table]) -> Table | Group:
    return tables[0] if len(tables) == 1 else Group(*tables)


def _caption(*lines: str) -> str:
    return "\n".join(line for line in lines if line)


def _best_marked(texts: list[str], values: list[float | None], best: float | None) -> list[str]:
    return [f"[bold green]{t}[/]" if v is not None and v == best else t for t, v in zip(texts, values, strict=True)]


def _device_text(plan: WorkerPlan) -> str:
    threads = f", {plan.threads} thread{'s' if plan.threads != 1 else ''}" if plan.threads else ""
    return plan.device + threads


def _worker_text(worker_id: int, plan: WorkerPlan) -> str:
    parts = [_device_text(plan)]
    count = len(plan.adapters)
    parts.append(f"{count} adapter{'s' if count != 1 else ''}")
    if plan.slots < count:
        parts.append(f"{plan.slots} at a time")
    return f"worker {worker_id}: {', '.join(parts)}"


def plan_table(spec: SweepSpec, plans: list[WorkerPlan], width: int | None = None) -> Table:
    """The expanded adapters and which worker trains each (`mlora run --dry-run`); the workers' devices below.

    At 100 columns and more, each row names its worker's device too. Where the columns do not fit, settings every
    adapter shares move into the caption first.
    """
    budget = _budget(width)
    count = sum(len(p.adapters) for p in plans)
    rows = [(worker_id, plan, adapter) for worker_id, plan in enumerate(plans) for adapter in plan.adapters]
    task_steps = [t.steps for t in spec.tasks]
    settings = {  # header: cells, in table order
        "seed": [str(a.seed) for _, _, a in rows],
        "rank": [str(a.adapter.rank) for _, _, a in rows],
        "alpha": [f"{a.adapter.alpha:g}" for _, _, a in rows],
        "lr": [f"{a.adapter.lr:g}" for _, _, a in rows],
        "drop": [f"{a.adapter.dropout:g}" for _, _, a in rows],
        "batch": [str(a.train.batch_size) for _, _, a in rows],
        "steps": [str(a.total_steps(task_steps)) for _, _, a in rows],
    }
    order = ["steps", "batch", "drop", "alpha", "seed", "rank", "lr"]  # the first left out first
    columns = [_Col("adapter", [escape(a.name) for _, _, a in rows], justify="left")]
    for header, cells in settings.items():
        same = len(set(cells)) == 1
        drop = 2 + order.index(header) + (0 if same else len(order))
        columns.append(_Col(header, cells, drop=drop, folded=f"{header} {cells[0]}" if same else None))
    columns.append(_Col("worker", [str(worker_id) for worker_id, _, _ in rows]))
    if budget >= 100:
        columns.append(_Col("device", [_device_text(plan) for _, plan, _ in rows], justify="left", drop=1))
    shown, dropped = _fit(columns, budget)
    named = {c.header for c in shown} | {c.header for c in dropped if c.folded}
    legend = "; ".join(text for header, text in (
        ("drop", "drop: LoRA dropout"), ("batch", "batch: rows per step"),
        ("steps", f"steps: over all {len(spec.tasks)} tasks"),
    ) if header in named)
    return _table(
        shown, title=f"{spec.name}: {count} adapters, {len(spec.tasks)} tasks, base {spec.base_model}",
        caption=_caption("; ".join(_worker_text(i, p) for i, p in enumerate(plans)), legend, *_left_out(dropped, budget)),
    )


def results_table(results: dict[str, Any], width: int | None = None) -> Table:
    """Adapters x final metrics (mean over tasks after the last task) and throughput; steps/s at 100 columns."""
    budget = _budget(width)
    adapters = results["adapters"]
    metrics = sorted({m for entry in adapters.values() for m in entry["final_mean"]})
    entries = list(adapters.values())
    columns = [
        _Col("adapter", [escape(name) for name in adapters], justify="left"),
        _Col("status", ["[green]done[/]" if e["status"] == "done" else f"[red]{escape(e['status'])}[/]"
                        for e in entries], justify="left"),
    ]
    for metric in metrics:
        values = [e["final_mean"].get(metric) for e in entries]
        present = _present(values)
        best = (min(present) if metric in LOWER_IS_BETTER else max(present)) if present else None
        columns.append(_Col(_metric_short(metric), _best_marked([format_metric(metric, v) for v in values], values, best)))
    columns.append(_Col("train\ntok/s", [f"{e['train_tokens_per_s']:,.0f}" for e in entries], drop=4))
    if budget >= 100:
        columns.append(_Col("steps\n/s", [f"{e['steps_per_s']:.2f}" for e in entries], drop=1))
    columns.append(_Col("train\ns", [f"{e['train_seconds']:.1f}" for e in entries], drop=3))
    columns.append(_Col("eval\ns", [f"{e['eval_seconds']:.1f}" for e in entries], drop=2))
    shown, dropped = _fit(columns, budget)
    headers = {c.header for c in shown}
    legend = [_METRIC_LEGEND[m] for m in metrics if m in _METRIC_LEGEND and _metric_short(m) in headers]
    legend.append("mean over tasks after the last task, best in green")
    legend += [text for header, text in (
        ("train\ntok/s", "tok/s: training tokens per second"), ("steps\n/s", "steps/s: optimizer steps per second"),
        ("train\ns", "train s: seconds training"), ("eval\ns", "eval s: seconds evaluating"),
    ) if header in headers]
    return _table(shown, title=f"{results['run']['name']}: final evaluation, mean over tasks",
                  caption=_caption("; ".join(legend), *_left_out(dropped, budget)))


def print_summary(console: Console, results: dict[str, Any]) -> None:
    run = results["run"]
    console.print(results_table(results, console.width))
    for name in run["failed"]:
        console.print(f"[red]failed[/] {name}: {results['adapters'][name]['failure']}")
    memory = f"peak RSS {run['peak_rss_mib']:,.0f} MiB"
    if "cuda_max_allocated_mib" in run:
        memory += f", CUDA max allocated {run['cuda_max_allocated_mib']:,.0f} MiB"
    console.print(
        f"{run['adapter_count']} adapters in {run['wall_seconds']:.1f} s wall "
        f"({run['train_tokens_per_s']:,.0f} train tokens/s overall), {memory}"
    )
    for note in run.get("notes", []):
        console.print(f"[yellow]note[/] {escape(note)}")  # a note may hold [brackets] (pip extras)
    console.print(f"run folder: {run['run_dir']}")


def loss_summary(losses: Sequence[float]) -> str:
    """One step's losses over the adapters in a few characters: `loss 0.52 (0.31-0.80)`, mean (min-max)."""
    if not losses:
        return "loss -"
    mean = sum(losses) / len(losses)
    if len(losses) == 1:
        return f"loss {mean:.2f}"
    return f"loss {mean:.2f} ({min(losses):.2f}-{max(losses):.2f})"


class ProgressView:
    """A rich progress bar per worker, fed by worker events.

    One line per worker: `worker 0 cpu ━━━━━━━ 120/480 steps 0:00:31 0:01:30 loss 0.52 (0.31-0.80)`; the bar takes
    whatever width the text leaves, so the line fits 80 columns and grows with the terminal.
    """

    def __init__(self, console: Console, spec: SweepSpec):
        self.spec = spec
        fixed = Column(no_wrap=True)
        self.progress = Progress(
            "[bold]{task.description}", BarColumn(bar_width=None), MofNCompleteColumn(table_column=fixed), "steps",
            TimeElapsedColumn(table_column=fixed), TimeRemainingColumn(table_column=fixed), "{task.fields[losses]}",
            console=console, transient=False,
        )
        self.bars: dict[int, Any] = {}
        self.run_dir: str | None = None

    def __enter__(self) -> ProgressView:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "run_start":
            self.run_dir = event["run_dir"]
            tasks = [t.steps for t in self.spec.tasks]
            for worker_id, plan in enumerate(event["plans"]):
                total = sum(a.total_steps(tasks) for a in plan.adapters)
                self.bars[worker_id] = self.progress.add_task(
                    f"worker {worker_id} {plan.device}", total=total, losses="loading base"
                )
        elif kind == "step":
            losses = [r["loss"] for r in event["records"]]
            self.progress.update(self.bars[event["worker"]], advance=len(losses), losses=loss_summary(losses))
        elif kind == "resumed":
            self.progress.update(self.bars[event["worker"]], advance=event["step"])
        elif kind == "adapter_done" and event.get("resumed"):
            self.progress.update(self.bars[event["worker"]], advance=event["result"]["steps"])
        elif kind == "eval":
            self.progress.update(self.bars[event["worker"]], losses=f"eval after task {event['after_task']}")


# Continual-learning reports: the metrics of mlora_cli.metrics over every adapter, as tables, panels and CSV.

CL_COLUMNS = ("acc", "bwt", "fwt", "forgetting", "learning_acc", "min_acc", "largest_dip")
# Columns that are differences of scores, shown with a sign (and in percentage points for percent metrics).
CL_SIGNED = {"bwt", "fwt", "forgetting", "largest_dip"}


def _cl_header(column: str, metric: str) -> str:
    """The long name of a CL column with its unit, as in the caption of `matrix_panel`: `forgetting (pp)`."""
    percent = metric in PERCENT_METRICS
    names = {
        "acc": "ACC", "bwt": "BWT", "fwt": "FWT", "forgetting": "forgetting", "learning_acc": "learning acc",
        "min_acc": "min-ACC" if cl.higher_is_better(metric) else "max loss", "largest_dip": "largest dip",
    }
    if names[column] == "max loss":
        return names[column]
    unit = ("pp" if column in CL_SIGNED else "%") if percent else metric
    return f"{names[column]} ({unit})"


def _cl_format(column: str, metric: str, value: float | None) -> str:
    text = format_metric(metric, value)
    return f"+{text}" if column in CL_SIGNED and value is not None and value > 0 else text


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _cl_best(column: str, metric: str, values: list[float]) -> float | None:
    """The best value of a CL column: transfer is better up, forgetting and dips down, ACC-like as the metric."""
    if not values:
        return None
    if column in ("bwt", "fwt"):
        return max(values)
    if column in ("forgetting", "largest_dip"):
        return min(values)
    return max(values) if cl.higher_is_better(metric) else min(values)


# The tables' short names of the CL columns (the unit goes on a second header line), and the order in which they are
# left out of a table too wide for its width (0: never).
_CL_SHORT = {"acc": "ACC", "bwt": "BWT", "fwt": "FWT", "forgetting": "forget", "learning_acc": "learn",
             "min_acc": "worst", "largest_dip": "dip"}
_CL_DROP = {"acc": 0, "bwt": 5, "fwt": 1, "forgetting": 0, "learning_acc": 2, "min_acc": 4, "largest_dip": 3}


def _cl_short_header(column: str, metric: str) -> str:
    unit = ("pp" if column in CL_SIGNED else "%") if metric in PERCENT_METRICS else metric
    return f"{_CL_SHORT[column]}\n{unit}"


def _cl_legend(columns: Iterable[str], metric: str) -> str:
    better = cl.higher_is_better(metric)
    texts = {
        "acc": "ACC: mean after the last task",
        "bwt": "BWT: backward transfer (> 0: later tasks helped earlier ones)",
        "fwt": "FWT: forward transfer (> 0: earlier tasks helped later ones, vs the base)",
        "forgetting": "forget: forgetting (> 0: fell from the best score)",
        "learning_acc": "learn: learning accuracy (each task right after training it)",
        "min_acc": "worst: min-ACC (a finished task's lowest later score)" if better
        else "worst: a finished task's highest later loss (min-ACC)",
        "largest_dip": "dip: largest stability gap (deepest fall while the next task trains)",
    }
    unit = "pp: percentage points" if metric in PERCENT_METRICS else "transfer, forget and dip computed on -loss"
    return "; ".join([*(texts[c] for c in columns), unit, "best in each column in green"])


def _cl_columns(per_adapter: list[dict[str, float | None]]) -> list[str]:
    """The stability-gap columns appear only when some adapter has a curve."""
    return [c for c in CL_COLUMNS if c in CL_COLUMNS[:5] or any(c in values for values in per_adapter)]


def cl_table(results: dict[str, Any], metric: str, width: int | None = None) -> Table:
    """Adapters x ACC, BWT, FWT, forgetting, learning accuracy (and min-ACC, largest dip with a curve) for `metric`.

    Where they do not all fit `width` (default 80), FWT goes first, then learning accuracy and the stability gap.
    """
    budget = _budget(width)
    task_names = results["run"]["tasks"]
    adapters = results["adapters"]
    per_adapter = [cl.entry_cl_metrics(entry, task_names).get(metric, {}) for entry in adapters.values()]
    columns = [_Col("adapter", [escape(name) for name in adapters], justify="left")]
    for column in _cl_columns(per_adapter):
        values = [v.get(column) for v in per_adapter]
        best = _cl_best(column, metric, _present(values))
        texts = [_cl_format(column, metric, value) for value in values]
        columns.append(_Col(_cl_short_header(column, metric), _best_marked(texts, values, best), drop=_CL_DROP[column]))
    shown, dropped = _fit(columns, budget)
    keys = [k for k in CL_COLUMNS if any(c.header == _cl_short_header(k, metric) for c in shown)]
    return _table(shown, title=f"{results['run']['name']}: continual learning on {metric}, {len(task_names)} tasks",
                  caption=_caption(_cl_legend(keys, metric), *_left_out(dropped, budget)))


def cl_seed_table(results: dict[str, Any], metric: str, width: int | None = None) -> Table | Group:
    """Like `cl_table`, one row per configuration: mean ± sample std over its seeds (`sweep.seeds`).

    Where the columns do not fit `width` (default 80), they continue in a second table on the same rows.
    """
    budget = _budget(width)
    task_names = results["run"]["tasks"]
    adapters = results["adapters"]
    groups = cl.seed_groups(results)
    per_group = {
        label: [cl.entry_cl_metrics(adapters[n], task_names).get(metric, {}) for n in names]
        for label, names in groups.items()
    }
    cl_columns = _cl_columns([v for values in per_group.values() for v in values])
    stats = {label: {c: cl.aggregate([v.get(c) for v in values]) for c in cl_columns}
             for label, values in per_group.items()}
    keys = [_Col("config", [escape(label) for label in groups], justify="left"),
            _Col("seeds", [str(len(names)) for names in groups.values()])]
    values = []
    for column in cl_columns:
        means = [stats[label][column]["mean"] for label in groups]
        texts = ["-" if stats[label][column]["mean"] is None else
                 f"{_cl_format(column, metric, stats[label][column]['mean'])} ± "
                 f"{format_metric(metric, stats[label][column]['std'])}" for label in groups]
        values.append(_Col(_cl_short_header(column, metric), _best_marked(texts, means, _cl_best(column, metric, _present(means)))))
    caption = _caption(_cl_legend(cl_columns, metric) + "; mean ± std over each configuration's seeds")
    return _one(_continued(_parts(keys, values, budget),
                           f"{results['run']['name']}: continual learning on {metric}, mean ± std over seeds", caption))


def _goodness_color(goodness: float) -> str:
    """Red (0, bad) through amber to green (1, good), readable on dark and light terminals."""
    red, amber, green = (215, 48, 39), (214, 160, 0), (26, 152, 80)
    g = min(max(goodness, 0.0), 1.0)
    lo, hi, t = (red, amber, g * 2) if g < 0.5 else (amber, green, g * 2 - 1)
    r, gr, b = (round(a + (c - a) * t) for a, c in zip(lo, hi, strict=True))
    return f"rgb({r},{gr},{b})"


def matrix_panel(entry: dict[str, Any], metric: str, task_names: list[str], width: int | None = None) -> Table | Group:
    """One adapter's R matrix for `metric`: rows before / after each task, columns the evaluated task.

    Colors read as good (green) to bad (red): on 0-100 % for percent metrics, over the matrix's own range for loss.
    The diagonal (each task right after training it) is bold. Used by `mlora run --matrix`. Where the tasks do not
    fit `width` (default 80) side by side, the matrix continues in a second table on the same rows.
    """
    R = entry["matrix"][metric]
    better = cl.higher_is_better(metric)
    if metric in PERCENT_METRICS:
        lo, hi = 0.0, 1.0
    else:
        flat = [x for row in R for x in row]
        lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
    keys = [_Col("after ↓ on →", ["before", *(escape(t) for t in task_names[: len(R) - 1])], justify="left",
                 style="bold")]
    values = []
    for j, name in enumerate(task_names):
        cells = []
        for i, row in enumerate(R):
            if j >= len(row):
                cells.append("-")
                continue
            position = (row[j] - lo) / (hi - lo) if hi > lo else 0.5
            style = _goodness_color(position if better else 1 - position) + (" bold" if i == j + 1 else "")
            cells.append(f"[{style}]{format_metric(metric, row[j])}[/]")
        values.append(_Col(escape(name), cells))
    caption = None
    if cl.is_complete(R):
        summary = cl.cl_metrics(R, better)
        caption = "  ".join(
            f"{_cl_header(c, metric)} {_cl_format(c, metric, summary[c])}" for c in ("acc", "bwt", "forgetting")
        )
    return _one(_continued(_parts(keys, values, _budget(width)), f"{entry['name']}: {metric_header(metric)}", caption))


def print_cl_report(console: Console, results: dict[str, Any], matrices: bool = False) -> None:
    """The CL tables for every evaluated metric; the seed table when seeds repeat; R panels with `matrices`.

    The tables fit the console's width.
    """
    width = console.width
    present = {m for entry in results["adapters"].values() for m in entry.get("matrix", {})}
    ordered = [m for m in cl.HIGHER_IS_BETTER if m in present]
    seeds_repeat = any(len(names) > 1 for names in cl.seed_groups(results).values())
    for metric in ordered:
        console.print(cl_table(results, metric, width))
        if seeds_repeat:
            console.print(cl_seed_table(results, metric, width))
    if matrices:
        for entry in results["adapters"].values():
            for metric in ordered:
                if entry.get("matrix", {}).get(metric):
                    console.print(matrix_panel(entry, metric, results["run"]["tasks"], width))


FORGETTING_CSV_FIELDS = ("adapter", "seed", "after_task", "eval_task", "metric", "value")


def forgetting_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every R entry of every adapter in long format, one dict per (adapter, metric, after_task, eval_task).

    after_task is 0 before training and i after the i-th task (1-based, the matrix row); eval_task is a task name.
    A failed adapter contributes the rows it reached.
    """
    task_names = results["run"]["tasks"]
    rows = []
    for name, entry in results["adapters"].items():
        for metric in sorted(entry.get("matrix", {})):
            for after_task, scores in enumerate(entry["matrix"][metric]):
                for eval_task, value in zip(task_names, scores, strict=True):
                    rows.append({"adapter": name, "seed": entry.get("seed"), "after_task": after_task,
                                 "eval_task": eval_task, "metric": metric, "value": value})
    return rows


def write_forgetting_csv(path: Path, results: dict[str, Any]) -> None:
    """`forgetting_rows` as CSV with a header line (`forgetting.csv` in the run folder), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FORGETTING_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(forgetting_rows(results))
    write_text(Path(path), buffer.getvalue())


def adapters_eval_table(results: dict[str, Any], width: int | None = None) -> Group:
    """`mlora eval --adapter ...`: one table per metric, adapters x tasks and their mean (the best mean in green).

    Where the tasks do not fit `width` (default 80) side by side, a metric's table continues in a second one.
    """
    budget = _budget(width)
    tasks = results["run"]["tasks"]
    adapters = results["adapters"]
    metrics = sorted({m for e in adapters.values() for scores in e["final"].values() for m in scores})
    entries = list(adapters.values())
    tables: list[Table] = []
    for metric in metrics:
        keys = [_Col("adapter", [escape(name) for name in adapters], justify="left")]
        values = [_Col(escape(task), [format_metric(metric, e["final"].get(task, {}).get(metric)) for e in entries])
                  for task in tasks]
        means = [e["final_mean"].get(metric) for e in entries]
        present = _present(means)
        best = (min(present) if metric in LOWER_IS_BETTER else max(present)) if present else None
        values.append(_Col("mean", _best_marked([format_metric(metric, v) for v in means], means, best)))
        tables += _continued(_parts(keys, values, budget),
                             f"{len(adapters)} adapters on {results['run']['base_model']}: {metric_header(metric)}")
    return Group(*tables)


def bench_tables(report: dict[str, Any], width: int | None = None) -> list[Table]:
    """`mlora bench`: modes side by side, co-training against its limits, agreement.

    At 100 columns and more the modes table adds each mode's mean experiment time against the sequential one
    (always in bench.json).
    """
    from mlora_cli.bench import EARLY_LOSS_TOLERANCE, EARLY_STEPS, EXACT_MATCH_TOLERANCE, FINAL_LOSS_TOLERANCE

    budget = _budget(width)
    machine = report["machine"]
    header = f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}" + (
        f", {machine['gpu']}" if "gpu" in machine else "")
    modes = list(report["modes"].values())

    def ratio(key: str) -> list[str]:
        return [f"{m[key]:.2f}x" if key in m else "-" for m in modes]

    columns = [
        _Col("mode", [escape(name) for name in report["modes"]], justify="left"),
        _Col("wall\ns", [f"{m['wall_seconds']:.1f}" for m in modes]),
        _Col("exps\nper h", [f"{m['experiments_per_hour']:,.0f}" for m in modes]),
        _Col("mean\nexp s", [f"{m['mean_experiment_seconds']:.1f}" for m in modes]),
        _Col("train\ntok/s", [f"{m['train_tokens_per_s']:,.0f}" for m in modes], drop=4),
        _Col("eval\ns", [f"{m['eval_seconds']:.1f}" for m in modes], drop=2),
        _Col("RSS\nMiB", [f"{m['peak_rss_mib']:,.0f}" for m in modes], drop=3),
        _Col("speed\nvs seq", ratio("throughput_vs_sequential")),
    ]
    if budget >= 100:
        columns.append(_Col("time\nvs seq", ratio("mean_experiment_time_vs_sequential"), drop=1))
    shown, dropped = _fit(columns, budget)
    headers = {c.header for c in shown}
    legend = [text for column, text in (
        ("wall\ns", "wall s: launch to exit"), ("exps\nper h", "exps per h: experiments (adapters trained) per hour"),
        ("mean\nexp s", "mean exp s: mean seconds from start to each adapter's end"),
        ("train\ntok/s", "tok/s: training tokens per second"), ("eval\ns", "eval s: seconds evaluating"),
        ("RSS\nMiB", "RSS: peak resident memory"),
        ("speed\nvs seq", "speed vs seq: experiments per hour against the sequential baseline"),
        ("time\nvs seq", "time vs seq: sequential mean experiment time / this mode's"),
    ) if column in headers]
    tables = [_table(shown, title=f"mlora bench: {report['sweep']}, {report['adapters']} adapters",
                     caption=_caption(header, "; ".join(legend), *_left_out(dropped, budget)))]

    fusion = report["fusion"]
    threads = fusion["torch_threads"]
    summary = Table(title="co-training against its limits", caption_justify="left")
    summary.add_column("figure", no_wrap=True)
    summary.add_column("value", justify="right", no_wrap=True)
    summary.add_column("meaning")
    summary.add_row("fusion efficiency (train)", f"{fusion['fusion_efficiency_train']:.2f}",
                    f"union step (rank {fusion['union_rank']}) {fusion['union_step_seconds'] * 1e3:.0f} ms / fused step"
                    f" {fusion['fused_step_seconds'] * 1e3:.0f} ms ({threads} thread{'s' if threads != 1 else ''})")
    summary.add_row("fusion efficiency (eval)", f"{fusion['fusion_efficiency_eval']:.2f}",
                    f"union pass {fusion['union_eval_seconds']:.2f} s / fused pass {fusion['fused_eval_seconds']:.2f} s")
    if "experiment_throughput_ratio" in report:
        summary.add_row("experiment throughput ratio", f"{report['experiment_throughput_ratio']:.2f}x",
                        "concurrent / sequential experiments per hour")
        summary.add_row("peak RSS below 2 sequential", "yes" if report["memory_below_two_sequential"] else "no",
                        f"{report['modes']['concurrent']['peak_rss_mib']:,.0f} MiB vs 2 x "
                        f"{report['modes']['sequential']['peak_rss_mib']:,.0f} MiB")
    for level, per_hour in report.get("concurrency_curve", {}).items():
        summary.add_row(f"experiments/h, {level} at once", f"{per_hour:,.0f}", f"with max_concurrent {level}")
    tables.append(summary)

    if "agreement" in report:
        names = list(report["agreement"])
        verdicts = list(report["agreement"].values())
        agree = _table([
            _Col("adapter", [escape(name) for name in names], justify="left"),
            _Col("early\n|d loss|", [f"{v['max_early_loss_rel_delta']:.0e}" for v in verdicts]),
            _Col("|d loss|\n%", [f"{100 * v['max_loss_rel_delta']:.3f}" for v in verdicts]),
            _Col("|d exact|\npp", [f"{100 * v['max_exact_match_delta']:.1f}" for v in verdicts]),
            _Col("verdict", ["[green]agree[/]" if v["agree"] else "[red]disagree[/]" for v in verdicts], justify="left"),
        ], title="agreement: concurrent vs sequential",
           caption=f"early |d loss|: largest relative difference of the training loss over the first {EARLY_STEPS} "
                   f"steps (within {EARLY_LOSS_TOLERANCE:g}: rounding); |d loss|, |d exact|: worst case over tasks of "
                   f"the final eval loss (relative, within {100 * FINAL_LOSS_TOLERANCE:g}%) and exact match (points, "
                   f"within {100 * EXACT_MATCH_TOLERANCE:g}); see docs: training amplifies rounding")
        tables.append(agree)
    return tables
