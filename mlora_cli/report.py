"""Everything a person sees: the adapter plan, live progress, and the result tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mlora_cli.config import SweepSpec
from mlora_cli.plan import WorkerPlan

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
        table.add_column(column, justify="left" if column in ("adapter", "device") else "right")
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
    table.add_column("adapter")
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

    def __enter__(self) -> ProgressView:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "run_start":
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
        elif kind == "eval":
            self.progress.update(self.bars[event["worker"]], losses=f"evaluating after task {event['after_task']}")
