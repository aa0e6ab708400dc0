"""Live progress of a run: one bar per worker, fed by the workers' events."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

from mlora_cli.contract import Event
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
        elif kind == "step":
            losses = [r["loss"] for r in event["records"]]
            self.progress.update(self.bars[event["worker"]], advance=len(losses), losses=loss_summary(losses))
        elif kind == "resumed":
            self.progress.update(self.bars[event["worker"]], advance=event["step"])
        elif kind == "adapter_done" and event.get("resumed"):
            self.progress.update(self.bars[event["worker"]], advance=event["result"]["steps"])
        elif kind == "eval":
            self.progress.update(self.bars[event["worker"]], losses=f"eval after task {event['after_task']}")
