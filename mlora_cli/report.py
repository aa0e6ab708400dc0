"""Everything a person sees: the adapter plan, live progress, and the result tables."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mlora_cli import metrics as cl
from mlora_cli.config import SweepSpec
from mlora_cli.plan import WorkerPlan
from mlora_cli.runfolder import write_text

# How each metric reads: higher is better unless listed here.
LOWER_IS_BETTER = {"loss"}
PERCENT_METRICS = {"exact_match", "token_accuracy"}


def format_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if metric in PERCENT_METRICS else f"{value:.4f}"


def metric_header(metric: str) -> str:
    return f"{metric} (%)" if metric in PERCENT_METRICS else metric


def plan_table(spec: SweepSpec, plans: list[WorkerPlan]) -> Table:
    """The expanded adapters and where each one trains (`mlora run --dry-run`)."""
    count = sum(len(p.adapters) for p in plans)
    table = Table(title=f"{spec.name}: {count} adapters, {len(spec.tasks)} tasks, base {spec.base_model}")
    for column in ("adapter", "seed", "rank", "alpha", "lr", "dropout", "batch", "steps", "worker", "device"):
        table.add_column(column, justify="left" if column in ("adapter", "device") else "right", no_wrap=column == "adapter")
    for worker_id, plan in enumerate(plans):
        for adapter in plan.adapters:
            steps = adapter.total_steps([t.steps for t in spec.tasks])
            table.add_row(
                adapter.name, str(adapter.seed), str(adapter.adapter.rank), f"{adapter.adapter.alpha:g}",
                f"{adapter.adapter.lr:g}", f"{adapter.adapter.dropout:g}", str(adapter.train.batch_size), str(steps),
                str(worker_id), plan.device + (f" ({plan.threads} threads)" if plan.threads else ""),
            )
    return table


def results_table(results: dict[str, Any]) -> Table:
    """Adapters x final metrics (mean over tasks after the last task) and throughput."""
    adapters = results["adapters"]
    metrics = sorted({m for entry in adapters.values() for m in entry["final_mean"]})
    table = Table(title=f"{results['run']['name']}: final evaluation (mean over tasks) and throughput")
    table.add_column("adapter", no_wrap=True)
    table.add_column("status")
    for metric in metrics:
        table.add_column(metric_header(metric), justify="right")
    for column in ("train tokens/s", "steps/s", "train s", "eval s"):
        table.add_column(column, justify="right")
    best = {}
    for metric in metrics:
        values = [e["final_mean"][metric] for e in adapters.values() if metric in e["final_mean"]]
        if values:
            best[metric] = min(values) if metric in LOWER_IS_BETTER else max(values)
    for name, entry in adapters.items():
        cells = []
        for metric in metrics:
            value = entry["final_mean"].get(metric)
            text = format_metric(metric, value)
            cells.append(f"[bold green]{text}[/]" if value is not None and value == best.get(metric) else text)
        status = "[green]done[/]" if entry["status"] == "done" else f"[red]{entry['status']}[/]"
        table.add_row(
            name, status, *cells, f"{entry['train_tokens_per_s']:,.0f}", f"{entry['steps_per_s']:.2f}",
            f"{entry['train_seconds']:.1f}", f"{entry['eval_seconds']:.1f}",
        )
    return table


def print_summary(console: Console, results: dict[str, Any]) -> None:
    run = results["run"]
    console.print(results_table(results))
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
        console.print(f"[yellow]note[/] {note}")
    console.print(f"run folder: {run['run_dir']}")


class ProgressView:
    """A rich progress bar per worker, fed by worker events."""

    def __init__(self, console: Console, spec: SweepSpec):
        self.spec = spec
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("adapter-steps"),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"),
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
            shown = " ".join(f"{x:.2f}" for x in losses[:8]) + (" ..." if len(losses) > 8 else "")
            self.progress.update(self.bars[event["worker"]], advance=len(losses), losses=f"loss {shown}")
        elif kind == "resumed":
            self.progress.update(self.bars[event["worker"]], advance=event["step"])
        elif kind == "adapter_done" and event.get("resumed"):
            self.progress.update(self.bars[event["worker"]], advance=event["result"]["steps"])
        elif kind == "eval":
            self.progress.update(self.bars[event["worker"]], losses=f"evaluating after task {event['after_task']}")


# Continual-learning reports: the metrics of mlora_cli.metrics over every adapter, as tables, panels and CSV.

CL_COLUMNS = ("acc", "bwt", "fwt", "forgetting", "learning_acc", "min_acc", "largest_dip")
# Columns that are differences of scores, shown with a sign (and in percentage points for percent metrics).
CL_SIGNED = {"bwt", "fwt", "forgetting", "largest_dip"}


def _cl_header(column: str, metric: str) -> str:
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


def _cl_caption(metric: str) -> str:
    unit = "pp = percentage points; " if metric in PERCENT_METRICS else "computed on -loss, so "
    return (
        f"{unit}BWT > 0: later tasks helped earlier ones; FWT > 0: earlier tasks helped later ones "
        "(vs the base); forgetting > 0: drop from the best score; best in each column in green"
    )


def _cl_columns(per_adapter: list[dict[str, float | None]]) -> list[str]:
    """The stability-gap columns appear only when some adapter has a curve."""
    return [c for c in CL_COLUMNS if c in CL_COLUMNS[:5] or any(c in values for values in per_adapter)]


def cl_table(results: dict[str, Any], metric: str) -> Table:
    """Adapters x ACC, BWT, FWT, forgetting, learning accuracy (and min-ACC, largest dip with a curve) for `metric`."""
    task_names = results["run"]["tasks"]
    adapters = results["adapters"]
    per_adapter = [cl.entry_cl_metrics(entry, task_names).get(metric, {}) for entry in adapters.values()]
    columns = _cl_columns(per_adapter)
    table = Table(title=f"{results['run']['name']}: continual learning on {metric}, {len(task_names)} tasks",
                  caption=_cl_caption(metric))
    table.add_column("adapter", no_wrap=True)
    for column in columns:
        table.add_column(_cl_header(column, metric), justify="right")
    best = {c: _cl_best(c, metric, _present(v.get(c) for v in per_adapter)) for c in columns}
    for name, values in zip(adapters, per_adapter, strict=True):
        cells = []
        for column in columns:
            value = values.get(column)
            text = _cl_format(column, metric, value)
            cells.append(f"[bold green]{text}[/]" if value is not None and value == best[column] else text)
        table.add_row(name, *cells)
    return table


def cl_seed_table(results: dict[str, Any], metric: str) -> Table:
    """Like `cl_table`, one row per configuration: mean ± sample std over its seeds (`sweep.seeds`)."""
    task_names = results["run"]["tasks"]
    adapters = results["adapters"]
    groups = cl.seed_groups(results)
    per_group = {
        label: [cl.entry_cl_metrics(adapters[n], task_names).get(metric, {}) for n in names]
        for label, names in groups.items()
    }
    columns = _cl_columns([v for values in per_group.values() for v in values])
    stats = {label: {c: cl.aggregate([v.get(c) for v in values]) for c in columns}
             for label, values in per_group.items()}
    table = Table(title=f"{results['run']['name']}: continual learning on {metric}, mean ± std over seeds",
                  caption=_cl_caption(metric))
    table.add_column("configuration")
    table.add_column("seeds", justify="right")
    for column in columns:
        table.add_column(_cl_header(column, metric), justify="right")
    best = {c: _cl_best(c, metric, _present(s[c]["mean"] for s in stats.values())) for c in columns}
    for label, names in groups.items():
        cells = []
        for column in columns:
            mean, std = stats[label][column]["mean"], stats[label][column]["std"]
            text = "-" if mean is None else f"{_cl_format(column, metric, mean)} ± {format_metric(metric, std)}"
            cells.append(f"[bold green]{text}[/]" if mean is not None and mean == best[column] else text)
        table.add_row(label, str(len(names)), *cells)
    return table


def _goodness_color(goodness: float) -> str:
    """Red (0, bad) through amber to green (1, good), readable on dark and light terminals."""
    red, amber, green = (215, 48, 39), (214, 160, 0), (26, 152, 80)
    g = min(max(goodness, 0.0), 1.0)
    lo, hi, t = (red, amber, g * 2) if g < 0.5 else (amber, green, g * 2 - 1)
    r, gr, b = (round(a + (c - a) * t) for a, c in zip(lo, hi, strict=True))
    return f"rgb({r},{gr},{b})"


def matrix_panel(entry: dict[str, Any], metric: str, task_names: list[str]) -> Table:
    """One adapter's R matrix for `metric`: rows before / after each task, columns the evaluated task.

    Colors read as good (green) to bad (red): on 0-100 % for percent metrics, over the matrix's own range for loss.
    The diagonal (each task right after training it) is bold. Used by `mlora run --matrix`.
    """
    R = entry["matrix"][metric]
    better = cl.higher_is_better(metric)
    if metric in PERCENT_METRICS:
        lo, hi = 0.0, 1.0
    else:
        flat = [x for row in R for x in row]
        lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
    table = Table(title=f"{entry['name']}: {metric_header(metric)}")
    table.add_column("after ↓ on →", style="bold")
    for name in task_names:
        table.add_column(name, justify="right")
    for i, row in enumerate(R):
        cells = []
        for j, value in enumerate(row):
            position = (value - lo) / (hi - lo) if hi > lo else 0.5
            style = _goodness_color(position if better else 1 - position) + (" bold" if i == j + 1 else "")
            cells.append(f"[{style}]{format_metric(metric, value)}[/]")
        table.add_row("before" if i == 0 else task_names[i - 1], *cells)
    if cl.is_complete(R):
        values = cl.cl_metrics(R, better)
        table.caption = "  ".join(
            f"{_cl_header(c, metric)} {_cl_format(c, metric, values[c])}" for c in ("acc", "bwt", "forgetting")
        )
    return table


def print_cl_report(console: Console, results: dict[str, Any], matrices: bool = False) -> None:
    """The CL tables for every evaluated metric; the seed table when seeds repeat; R panels with `matrices`."""
    present = {m for entry in results["adapters"].values() for m in entry.get("matrix", {})}
    ordered = [m for m in cl.HIGHER_IS_BETTER if m in present]
    seeds_repeat = any(len(names) > 1 for names in cl.seed_groups(results).values())
    for metric in ordered:
        console.print(cl_table(results, metric))
        if seeds_repeat:
            console.print(cl_seed_table(results, metric))
    if matrices:
        for entry in results["adapters"].values():
            for metric in ordered:
                if entry.get("matrix", {}).get(metric):
                    console.print(matrix_panel(entry, metric, results["run"]["tasks"]))


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


def adapters_eval_table(results: dict[str, Any]) -> Table:
    """`mlora eval --adapter ...`: every adapter x task x metric."""
    tasks = results["run"]["tasks"]
    adapters = results["adapters"]
    metrics = sorted({m for e in adapters.values() for scores in e["final"].values() for m in scores})
    table = Table(title=f"{len(adapters)} adapters on {results['run']['base_model']}")
    table.add_column("adapter", no_wrap=True)
    for metric in metrics:
        for task in tasks:
            table.add_column(f"{task} {metric_header(metric)}", justify="right")
        table.add_column(f"mean {metric_header(metric)}", justify="right")
    for name, entry in adapters.items():
        cells = []
        for metric in metrics:
            cells += [format_metric(metric, entry["final"][t].get(metric)) for t in tasks]
            cells.append(format_metric(metric, entry["final_mean"].get(metric)))
        table.add_row(name, *cells)
    return table


def bench_tables(report: dict[str, Any]) -> list[Table]:
    """`mlora bench`: modes side by side, agreement, fusion efficiency."""
    machine = report["machine"]
    header = f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}" + (
        f", {machine['gpu']}" if "gpu" in machine else "")
    modes = Table(title=f"mlora bench: {report['sweep']}, {report['adapters']} adapters ({header})")
    columns = ["mode", "wall s", "experiments/h", "mean experiment s", "train tokens/s", "eval s", "peak RSS MiB",
               "throughput vs seq", "experiment time vs seq"]
    for column in columns:
        modes.add_column(column, justify="left" if column == "mode" else "right", no_wrap=column == "mode")
    for name, m in report["modes"].items():
        modes.add_row(
            name, f"{m['wall_seconds']:.1f}", f"{m['experiments_per_hour']:,.0f}", f"{m['mean_experiment_seconds']:.1f}",
            f"{m['train_tokens_per_s']:,.0f}", f"{m['eval_seconds']:.1f}", f"{m['peak_rss_mib']:,.0f}",
            f"{m['throughput_vs_sequential']:.2f}x" if "throughput_vs_sequential" in m else "-",
            f"{m['mean_experiment_time_vs_sequential']:.2f}x" if "mean_experiment_time_vs_sequential" in m else "-",
        )
    tables = [modes]
    fusion = report["fusion"]
    summary = Table(title="co-training against its limits")
    summary.add_column("figure")
    summary.add_column("value", justify="right")
    summary.add_column("meaning")
    summary.add_row("fusion efficiency (train)", f"{fusion['fusion_efficiency_train']:.2f}",
                    f"union step (rank {fusion['union_rank']}) {fusion['union_step_seconds'] * 1e3:.0f} ms / fused step"
                    f" {fusion['fused_step_seconds'] * 1e3:.0f} ms ({fusion['torch_threads']} thread"
                    f"{'s' if fusion['torch_threads'] != 1 else ''})")
    summary.add_row("fusion efficiency (eval)", f"{fusion['fusion_efficiency_eval']:.2f}",
                    f"union pass {fusion['union_eval_seconds']:.2f} s / fused pass {fusion['fused_eval_seconds']:.2f} s")
    if "experiment_throughput_ratio" in report:
        summary.add_row("experiment throughput ratio", f"{report['experiment_throughput_ratio']:.2f}x",
                        "concurrent / sequential experiments per hour")
        summary.add_row("peak memory below 2 sequential", "yes" if report["memory_below_two_sequential"] else "no",
                        f"{report['modes']['concurrent']['peak_rss_mib']:,.0f} MiB vs 2 x "
                        f"{report['modes']['sequential']['peak_rss_mib']:,.0f} MiB")
    if "concurrency_curve" in report:
        curve = ", ".join(f"{c}: {v:,.0f}" for c, v in report["concurrency_curve"].items())
        summary.add_row("experiments/h by concurrency", curve, "max_concurrent: experiments per hour")
    tables.append(summary)
    if "agreement" in report:
        agree = Table(title="agreement: concurrent vs sequential final metrics (per task, worst case)")
        for column in ("adapter", "max |d loss| (%)", "max |d exact match| (points)", "verdict"):
            agree.add_column(column, justify="left" if column in ("adapter", "verdict") else "right")
        for name, v in report["agreement"].items():
            agree.add_row(name, f"{100 * v['max_loss_rel_delta']:.3f}", f"{100 * v['max_exact_match_delta']:.1f}",
                          "[green]agree[/]" if v["agree"] else "[red]disagree[/]")
        tables.append(agree)
    return tables
