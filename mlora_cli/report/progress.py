"""Progress of a run, fed by the workers' events: live bars on a terminal, plain lines in a log, or nothing.

`progress_view` picks one: `ProgressView` (one rich bar per worker) when stdout is a terminal, `PlainProgress`
(whole lines, nothing redrawn, for CI logs and pipes) when it is not, `QuietProgress` with `mlora run --quiet`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from mlora_cli.contract import Event
from mlora_cli.report.format import PERCENT_METRICS, format_metric
from mlora_cli.spec.schema import SweepSpec


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

    def __call__(self, event: Event) -> None:
        kind = event["event"]
        if kind == "run_start":
            self.run_dir = event["run_dir"]
            tasks = [t.steps for t in self.spec.tasks]
            for worker_id, plan in enumerate(event["plans"]):
                total = sum(a.total_steps(tasks) for a in plan.adapters)
                self.bars[worker_id] = self.progress.add_task(
                    f"worker {worker_id} {plan.device}", total=total, losses="loading base"
                )
        elif kind == "worker_ready":  # the bar's clock restarts here: loading the base is not training time
            self.progress.reset(self.bars[event["worker"]], losses=f"base loaded in {event['load_seconds']:.1f} s")
        elif kind == "step":
            losses = [r["loss"] for r in event["records"]]
            self.progress.update(self.bars[event["worker"]], advance=len(losses), losses=loss_summary(losses))
        elif kind == "resumed":
            self.progress.update(self.bars[event["worker"]], advance=event["step"])
        elif kind == "adapter_done" and event.get("resumed"):
            self.progress.update(self.bars[event["worker"]], advance=event["result"]["steps"])
        elif kind == "eval":
            self.progress.update(self.bars[event["worker"]], losses=f"eval after task {event['after_task']}")


def _clock(seconds: float) -> str:
    """0:01:30, as rich's elapsed and remaining columns show time."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def scores_text(scores: dict[str, float]) -> str:
    """`exact_match 62.5% loss 0.4120`: one evaluation's metrics, fractions in percent as the tables show them."""
    return " ".join(f"{m} {format_metric(m, value)}{'%' if m in PERCENT_METRICS else ''}"
                    for m, value in sorted(scores.items()))


class PlainProgress:
    """The live view's information as whole lines, for a stdout that is not a terminal (CI logs, pipes, files).

    Nothing is redrawn, so a log reads top to bottom:

        run micro: 2 adapters, 1 worker, run folder runs/micro-20261128-120508
        worker 0 cpu: base loaded in 1.2 s
        worker 0 cpu: 3/12 steps (25%), 0:00:04 elapsed, 0:00:12 left, loss 4.51 (4.50-4.52)
        r8: task 1/2 copy done; on copy: exact_match 62.5% loss 0.4120; mean over 2 tasks: exact_match 31.2% ...
        r8: done, 6 steps

    A worker's line comes at each quarter of its steps and at least every `every_seconds` while it trains; an
    adapter's line at the end of each of its tasks (its score on that task, then the mean over all tasks) and
    when it ends (done or failed).
    """

    def __init__(self, console: Console, spec: SweepSpec, every_seconds: float = 10.0):
        self.console = console
        self.spec = spec
        self.every_seconds = every_seconds
        self.run_dir: str | None = None
        self.started = time.monotonic()
        self.workers: dict[int, dict[str, Any]] = {}  # worker -> device, done, total, last line time, quarter

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def line(self, text: str) -> None:
        # soft_wrap: one event, one line, however narrow the console thinks it is
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def __call__(self, event: Event) -> None:
        kind = event["event"]
        if kind == "run_start":
            self.run_dir = event["run_dir"]
            self.started = time.monotonic()
            tasks = [t.steps for t in self.spec.tasks]
            for worker_id, plan in enumerate(event["plans"]):
                total = sum(a.total_steps(tasks) for a in plan.adapters)
                self.workers[worker_id] = {"device": plan.device, "done": 0, "total": total, "resumed": 0,
                                           "printed": self.started, "quarter": 0, "ready": self.started}
            count = sum(len(plan.adapters) for plan in event["plans"])
            workers = len(event["plans"])
            self.line(f"{'resuming' if event.get('resume') else 'run'} {self.spec.name}: {count} adapter"
                      f"{'s' if count != 1 else ''}, {workers} worker{'s' if workers != 1 else ''}, "
                      f"run folder {self.run_dir}")
        elif kind == "worker_ready":  # the time left counts from here: loading the base is done
            worker = self.workers[event["worker"]]
            worker["ready"] = worker["printed"] = time.monotonic()
            self.line(f"worker {event['worker']} {worker['device']}: base loaded in {event['load_seconds']:.1f} s")
        elif kind == "step":
            worker = self.workers[event["worker"]]
            losses = [r["loss"] for r in event["records"]]
            worker["done"] += len(losses)
            self.worker_line(event["worker"], loss_summary(losses))
        elif kind == "resumed" or (kind == "adapter_done" and event.get("resumed")):
            steps = event["step"] if kind == "resumed" else event["result"]["steps"]
            self.workers[event["worker"]]["done"] += steps
            self.workers[event["worker"]]["resumed"] += steps
            if kind == "adapter_done":
                self.line(f"{event['adapter']}: already done, {steps} steps")
        elif kind == "eval" and event["after_task"] > 0:
            self.task_line(event["adapter"], event["after_task"], event["scores"])
        elif kind == "adapter_done":
            result = event["result"]
            status = {"done": "done", "pruned": f"pruned at step {result.get('steps')}"}.get(
                result["status"], f"failed: {result['failure']}")
            self.line(f"{event['adapter']}: {status}, {result['steps']} steps")

    def worker_line(self, worker_id: int, losses: str) -> None:
        worker = self.workers[worker_id]
        now = time.monotonic()
        quarter = 4 * worker["done"] // max(worker["total"], 1)
        if quarter == worker["quarter"] and now - worker["printed"] < self.every_seconds:
            return
        worker["quarter"], worker["printed"] = quarter, now
        elapsed = now - self.started
        trained = worker["done"] - worker["resumed"]
        left = (now - worker["ready"]) / trained * (worker["total"] - worker["done"]) if trained else 0.0
        self.line(f"worker {worker_id} {worker['device']}: {worker['done']}/{worker['total']} steps "
                  f"({100 * worker['done'] // max(worker['total'], 1)}%), {_clock(elapsed)} elapsed, "
                  f"{_clock(left)} left, {losses}")

    def task_line(self, adapter: str, after_task: int, scores: dict[str, dict[str, float]]) -> None:
        task = self.spec.tasks[after_task - 1].name
        metrics = sorted({m for values in scores.values() for m in values})
        mean = {m: sum(values[m] for values in scores.values() if m in values) / len(scores) for m in metrics}
        self.line(f"{adapter}: task {after_task}/{len(self.spec.tasks)} {task} done; on {task}: "
                  f"{scores_text(scores.get(task, {}))}; mean over {len(scores)} tasks: {scores_text(mean)}")


class QuietProgress:
    """`mlora run --quiet`: no progress at all; it keeps the run folder for the interrupt message."""

    def __init__(self) -> None:
        self.run_dir: str | None = None

    def __enter__(self) -> QuietProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def __call__(self, event: Event) -> None:
        if event["event"] == "run_start":
            self.run_dir = event["run_dir"]


def progress_view(console: Console, spec: SweepSpec,
                  quiet: bool = False) -> ProgressView | PlainProgress | QuietProgress:
    """Live bars on a terminal, plain lines elsewhere (CI logs, pipes), nothing with `quiet`."""
    if quiet:
        return QuietProgress()
    return ProgressView(console, spec) if console.is_terminal else PlainProgress(console, spec)


def summary_line(results: dict[str, Any]) -> str:
    """The whole run in one line (`mlora run --quiet`): adapters done and failed, wall time, the run folder."""
    run = results["run"]
    statuses = [entry["status"] for entry in results["adapters"].values()]
    done, failed, pruned = (statuses.count(status) for status in ("done", "failed", "pruned"))
    return (f"{run['name']}: {done} adapter{'s' if done != 1 else ''} done, {failed} failed"
            + (f", {pruned} pruned" if pruned else "")
            + f", {run['wall_seconds']:.1f} s wall, run folder {run['run_dir']}")
