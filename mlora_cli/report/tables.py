"""The tables of a run: the adapter plan, final results, continual-learning metrics, R matrices.

Every table reads whole at 80 columns, the width a caller that passes no `width` gets: short headers over two lines
(the name, then the unit), a caption that spells the abbreviations out, and no adapter name or number ever cut or
wrapped. Given a wider `width`, tables add columns. Where the columns still do not fit (long adapter names), a table
leaves out its columns of least interest and says so in its caption, or continues in a second table on the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from mlora_cli.eval import metrics as cl
from mlora_cli.report.fit import (
    Col,
    as_one,
    best_marked,
    caption_text,
    continued_tables,
    drop_to_fit,
    fitted_table,
    left_out_notes,
    split_columns,
    width_budget,
)
from mlora_cli.report.format import (
    METRIC_LEGEND,
    PERCENT_METRICS,
    format_metric,
    metric_header,
    metric_short,
)
from mlora_cli.report.trials import status_text, trials_table
from mlora_cli.spec.plan import WorkerPlan
from mlora_cli.spec.schema import SweepSpec


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
    budget = width_budget(width)
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
    columns = [Col("adapter", [escape(a.name) for _, _, a in rows], justify="left")]
    for header, cells in settings.items():
        same = len(set(cells)) == 1
        drop = 2 + order.index(header) + (0 if same else len(order))
        columns.append(Col(header, cells, drop=drop, folded=f"{header} {cells[0]}" if same else None))
    columns.append(Col("worker", [str(worker_id) for worker_id, _, _ in rows]))
    if budget >= 100:
        columns.append(Col("device", [_device_text(plan) for _, plan, _ in rows], justify="left", drop=1))
    shown, dropped = drop_to_fit(columns, budget)
    named = {c.header for c in shown} | {c.header for c in dropped if c.folded}
    legend = "; ".join(text for header, text in (
        ("drop", "drop: LoRA dropout"), ("batch", "batch: rows per step"),
        ("steps", f"steps: over all {len(spec.tasks)} tasks"),
    ) if header in named)
    return fitted_table(
        shown, title=f"{spec.name}: {count} adapters, {len(spec.tasks)} tasks, base {spec.base_model}",
        caption=caption_text("; ".join(_worker_text(i, p) for i, p in enumerate(plans)), legend,
                             *left_out_notes(dropped, budget)),
    )


def results_table(results: dict[str, Any], width: int | None = None) -> Table:
    """Adapters x final metrics (mean over tasks after the last task) and throughput; steps/s at 100 columns."""
    budget = width_budget(width)
    adapters = results["adapters"]
    metrics = sorted({m for entry in adapters.values() for m in entry["final_mean"]})
    entries = list(adapters.values())
    columns = [
        Col("adapter", [escape(name) for name in adapters], justify="left"),
        Col("status", [status_text(e["status"]) for e in entries], justify="left"),
    ]
    for metric in metrics:
        values = [e["final_mean"].get(metric) for e in entries]
        present = _present(values)
        best = (max(present) if cl.higher_is_better(metric) else min(present)) if present else None
        columns.append(Col(metric_short(metric), best_marked([format_metric(metric, v) for v in values], values, best)))
    columns.append(Col("train\ntok/s", [f"{e['train_tokens_per_s']:,.0f}" for e in entries], drop=4))
    if budget >= 100:
        columns.append(Col("steps\n/s", [f"{e['steps_per_s']:.2f}" for e in entries], drop=1))
    columns.append(Col("train\ns", [f"{e['train_seconds']:.1f}" for e in entries], drop=3))
    columns.append(Col("eval\ns", [f"{e['eval_seconds']:.1f}" for e in entries], drop=2))
    shown, dropped = drop_to_fit(columns, budget)
    headers = {c.header for c in shown}
    legend = [METRIC_LEGEND[m] for m in metrics if m in METRIC_LEGEND and metric_short(m) in headers]
    legend.append("mean over tasks after the last task, best in green")
    legend += [text for header, text in (
        ("train\ntok/s", "tok/s: training tokens per second"), ("steps\n/s", "steps/s: optimizer steps per second"),
        ("train\ns", "train s: seconds training"), ("eval\ns", "eval s: seconds evaluating"),
    ) if header in headers]
    return fitted_table(shown, title=f"{results['run']['name']}: final evaluation, mean over tasks",
                  caption=caption_text("; ".join(legend), *left_out_notes(dropped, budget)))


def print_summary(console: Console, results: dict[str, Any]) -> None:
    run = results["run"]
    if any(entry.get("trial") for entry in results["adapters"].values()):
        console.print(trials_table(results, console.width))
    console.print(results_table(results, console.width))
    for name in run["failed"]:
        if results["adapters"][name]["status"] == "failed":  # pruned is no failure
            console.print(f"[red]failed[/] {name}: {results['adapters'][name]['failure']}")
    memory = f"peak RSS {run['peak_rss_mib']:,.0f} MiB"
    if "cuda_max_allocated_mib" in run:
        memory += (f", GPU peak {run['cuda_max_allocated_mib']:,.0f} MiB allocated"
                   + (f" / {run['cuda_max_reserved_mib']:,.0f} MiB reserved" if "cuda_max_reserved_mib" in run else "")
                   + (" (busiest GPU)" if len(run.get("cuda_memory", {})) > 1 else ""))
    console.print(
        f"{run['adapter_count']} adapters in {run['wall_seconds']:.1f} s wall "
        f"({run['train_tokens_per_s']:,.0f} train tokens/s overall), {memory}"
    )
    for note in run.get("notes", []):
        console.print(f"[yellow]note[/] {escape(note)}")  # a note may hold [brackets] (pip extras)
    console.print(f"run folder: {run['run_dir']}")


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
    budget = width_budget(width)
    task_names = results["run"]["tasks"]
    adapters = results["adapters"]
    per_adapter = [cl.entry_cl_metrics(entry, task_names).get(metric, {}) for entry in adapters.values()]
    columns = [Col("adapter", [escape(name) for name in adapters], justify="left")]
    for column in _cl_columns(per_adapter):
        values = [v.get(column) for v in per_adapter]
        best = _cl_best(column, metric, _present(values))
        texts = [_cl_format(column, metric, value) for value in values]
        columns.append(Col(_cl_short_header(column, metric), best_marked(texts, values, best), drop=_CL_DROP[column]))
    shown, dropped = drop_to_fit(columns, budget)
    keys = [k for k in CL_COLUMNS if any(c.header == _cl_short_header(k, metric) for c in shown)]
    return fitted_table(
        shown, title=f"{results['run']['name']}: continual learning on {metric}, {len(task_names)} tasks",
        caption=caption_text(_cl_legend(keys, metric), *left_out_notes(dropped, budget)),
    )


def cl_seed_table(results: dict[str, Any], metric: str, width: int | None = None) -> Table | Group:
    """Like `cl_table`, one row per configuration: mean ± sample std over its seeds (`sweep.seeds`).

    Where the columns do not fit `width` (default 80), they continue in a second table on the same rows.
    """
    budget = width_budget(width)
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
    keys = [Col("config", [escape(label) for label in groups], justify="left"),
            Col("seeds", [str(len(names)) for names in groups.values()])]
    values = []
    for column in cl_columns:
        means = [stats[label][column]["mean"] for label in groups]
        texts = ["-" if stats[label][column]["mean"] is None else
                 f"{_cl_format(column, metric, stats[label][column]['mean'])} ± "
                 f"{format_metric(metric, stats[label][column]['std'])}" for label in groups]
        values.append(Col(_cl_short_header(column, metric),
                          best_marked(texts, means, _cl_best(column, metric, _present(means)))))
    caption = caption_text(_cl_legend(cl_columns, metric) + "; mean ± std over each configuration's seeds")
    return as_one(continued_tables(split_columns(keys, values, budget),
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
    keys = [Col("after ↓ on →", ["before", *(escape(t) for t in task_names[: len(R) - 1])], justify="left",
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
        values.append(Col(escape(name), cells))
    caption = None
    if cl.is_complete(R):
        summary = cl.cl_metrics(R, better)
        caption = "  ".join(
            f"{_cl_header(c, metric)} {_cl_format(c, metric, summary[c])}" for c in ("acc", "bwt", "forgetting")
        )
    return as_one(continued_tables(split_columns(keys, values, width_budget(width)),
                                   f"{entry['name']}: {metric_header(metric)}", caption))


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
    harness = harness_table(results)
    if harness is not None:
        console.print(harness)
    if matrices:
        for entry in results["adapters"].values():
            for metric in ordered:
                if entry.get("matrix", {}).get(metric):
                    console.print(matrix_panel(entry, metric, results["run"]["tasks"], width))


def adapters_eval_table(results: dict[str, Any], width: int | None = None) -> Group:
    """`mlora eval --adapter ...`: one table per metric, adapters x tasks and their mean (the best mean in green).

    Where the tasks do not fit `width` (default 80) side by side, a metric's table continues in a second one.
    """
    budget = width_budget(width)
    tasks = results["run"]["tasks"]
    adapters = results["adapters"]
    metrics = sorted({m for e in adapters.values() for scores in e["final"].values() for m in scores})
    entries = list(adapters.values())
    tables: list[Table] = []
    for metric in metrics:
        keys = [Col("adapter", [escape(name) for name in adapters], justify="left")]
        values = [Col(escape(task), [format_metric(metric, e["final"].get(task, {}).get(metric)) for e in entries])
                  for task in tasks]
        means = [e["final_mean"].get(metric) for e in entries]
        present = _present(means)
        best = (max(present) if cl.higher_is_better(metric) else min(present)) if present else None
        values.append(Col("mean", best_marked([format_metric(metric, v) for v in means], means, best)))
        tables += continued_tables(split_columns(keys, values, budget),
                             f"{len(adapters)} adapters on {results['run']['base_model']}: {metric_header(metric)}")
    return Group(*tables)


def harness_table(results: dict[str, Any]) -> Table | None:
    """lm-evaluation-harness scores, one line per (adapter, harness task, metric): the final value, and with
    `harness_matrix` (eval.harness_tasks in a run) the value before training and the change; None without any."""
    adapters = results["adapters"]
    with_rows = any(len(entry.get("harness_matrix", [])) > 1 for entry in adapters.values())
    table = Table(title="lm-evaluation-harness" + (" (general ability, before training -> after the last task)"
                                                   if with_rows else ""))
    for column in ("adapter", "harness task", "metric", *(("before", "after", "change") if with_rows else ("value",))):
        table.add_column(column, justify="left" if column in ("adapter", "harness task", "metric") else "right")
    for name, entry in adapters.items():
        rows = entry.get("harness_matrix", [])
        for task, values in sorted(entry.get("harness", {}).items()):
            for metric, value in sorted(values.items()):
                if not with_rows:
                    table.add_row(name, task, metric, f"{value:.4f}")
                    continue
                before = rows[0].get(task, {}).get(metric) if rows else None
                change = "" if before is None else f"{value - before:+.4f}"
                table.add_row(name, task, metric, "" if before is None else f"{before:.4f}", f"{value:.4f}", change)
    return table if table.row_count else None
