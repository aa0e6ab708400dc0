"""The tables of a search (sweep.search, sweep.prune): its space and budget before a run, its trials ranked after.

Both read whole at 80 columns, as the other tables (report.tables): the ranking leaves out its parameters
column first where the adapter names are long, and the caption says so.
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from mlora_cli.contract import MAX_REPEATS
from mlora_cli.report.fit import Col, best_marked, caption_text, drop_to_fit, fitted_table, left_out_notes, width_budget
from mlora_cli.report.format import format_metric, metric_short
from mlora_cli.spec.schema import SweepSpec
from mlora_cli.spec.space import Dimension, halving_estimate, measuring_steps, space_size
from mlora_cli.spec.sweep import NAME_ALIASES, AdapterSpec, format_value, search_space


def status_text(status: str) -> str:
    return {"done": "[green]done[/]", "pruned": "[yellow]pruned[/]"}.get(status, f"[red]{escape(status)}[/]")


def _params_text(varied: dict[str, Any]) -> str:
    """A trial's parameters as its adapter name would spell them: `r8 lr3.2e-3`."""
    return " ".join(f"{NAME_ALIASES.get(k, k.rpartition('.')[2])}{format_value(v)}" for k, v in varied.items())


def _steps_text(steps: list[int]) -> str:
    if len(steps) > 6:
        return f"{steps[0]}, {steps[1]}, ... {steps[-1]} (every {steps[1] - steps[0]})"
    return ", ".join(map(str, steps)) or "(none before the last)"


def _space_size_text(space: dict[str, Dimension], trials: int) -> str:
    """How many configurations a space of choices and integer ranges holds, when trials may use it up."""
    size = space_size(space)
    if size is None:
        return ""  # a float range: as many as the sampler draws
    if trials <= size:
        return f"; the space holds {size:,} configurations"
    return (f"; the space holds only {size:,} configurations: a suggestion already tried is told its result, "
            f"not trained, and once every configuration has been tried (or the sampler offers nothing new "
            f"{MAX_REPEATS} times in a row) a repeat is trained, with the same result")


def search_table(spec: SweepSpec, adapters: list[AdapterSpec], width: int | None = None) -> Table:
    """`mlora run --dry-run` of a searched or pruned sweep: the space, the objective, pruning and the step budget."""
    search, prune = spec.sweep.search, spec.sweep.prune
    task_steps = [t.steps for t in spec.tasks]
    steps = max(a.total_steps(task_steps) for a in adapters)
    measured = measuring_steps(spec, steps)
    direction = "minimized" if search.metric == "loss" else "maximized"
    seeds = len(spec.sweep.seeds or (spec.seed,))
    space = search_space(spec) if search.method != "grid" else {}
    rows = [(key, dimension.describe()) for key, dimension in space.items()]
    rows += [
        ("trials", (f"{search.trials} configurations x {seeds} seeds = {len(adapters)}" if seeds > 1 else
                    f"{len(adapters)}") + f", asked from Optuna's {search.method} sampler as slots free (the plan "
         "above shows the defaults each slot holds until then)" + _space_size_text(space, search.trials or 0)
         if search.method != "grid" else f"{len(adapters)}: every adapter of grid / zip / list is one trial"),
        ("objective", f"{search.metric} over the {search.over} tasks, {direction}"),
        ("steps per trial", f"{steps}" + (" (the defaults'; the space varies them)" if any(
            k.startswith(("train.steps_per_task", "sweep.")) for k in search_space(spec)) and search.method != "grid"
                                          else "")),
        ("pruning", "none" if prune.method == "none" else
         f"{prune.method} at steps {_steps_text(measured)}"
         + (f", each rung keeping 1/{prune.reduction_factor}" if prune.method == "asha" else
            f", from step {prune.min_steps} after {prune.startup_trials} trained trials completed")),
        ("budget", f"at most {len(adapters) * steps:,} steps (no trial pruned)" + (
            f"; about {halving_estimate(len(adapters), steps, measured, prune.reduction_factor):,.0f} if every rung "
            f"keeps 1/{prune.reduction_factor} (synchronous successive halving)"
            if prune.method == "asha" and not prune.every_steps else "")),
    ]
    table = Table(title=f"{spec.name}: search, study in RUN/search.db", show_header=False, width=width_budget(width))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, text in rows:
        table.add_row(escape(key), escape(text))
    return table


def trials_table(results: dict[str, Any], width: int | None = None) -> Table:
    """A search's trials ranked by the objective, best first; pruned trials after them, those that got furthest
    first; failed ones last. The parameters column goes first where the table does not fit."""
    entries = [e for e in results["adapters"].values() if e.get("trial")]
    first = entries[0]["trial"]
    sign = 1 if first["direction"] == "minimize" else -1
    order = {"done": 0, "pruned": 1}

    def rank(entry: dict[str, Any]) -> tuple[int, int, float]:
        value = entry["trial"]["objective"]
        # Steps order the pruned only: finished trials rank by their objective, whatever steps they were given
        # (train.steps_per_task may be searched).
        reached = -entry["steps"] if entry["status"] != "done" else 0
        return order.get(entry["status"], 2), reached, sign * value if value is not None else float("inf")

    entries.sort(key=rank)
    metric = first["metric"]
    values = [e["trial"]["objective"] for e in entries]
    best = values[0] if entries[0]["status"] == "done" else None
    columns = [
        Col("rank", [str(i + 1) for i in range(len(entries))]),
        Col("adapter", [escape(e["name"]) for e in entries], justify="left"),
        Col("trial\n#", [str(e["trial"]["number"]) for e in entries], drop=2),
        Col("status", [status_text(e["status"]) for e in entries], justify="left"),
        Col("steps", [str(e["steps"]) for e in entries]),
        Col(metric_short(metric), best_marked([format_metric(metric, v) for v in values], values, best)),
        Col("parameters", [escape(_params_text(e["varied"])) for e in entries], justify="left", drop=1),
    ]
    shown, dropped = drop_to_fit(columns, width_budget(width))
    return fitted_table(shown, title=f"{results['run']['name']}: {len(entries)} trials ranked by {metric} "
                                     f"({first['over']} tasks), best first",
                        caption=caption_text(f"{metric_short(metric).replace(chr(10), ' ')}: the objective, at the end"
                                             " (done) or where the pruner stopped it (pruned, at that step)",
                                             *left_out_notes(dropped, width_budget(width))))
