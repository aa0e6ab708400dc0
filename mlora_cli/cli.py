"""The `mlora` command. Thin: parse, call, and turn user errors into one line each + exit 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mlora_cli.config import ConfigError, load_sweep

app = typer.Typer(
    help="Co-train a sweep of LoRA adapters over one shared frozen base model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

SweepArg = Annotated[Path, typer.Argument(help="the sweep YAML file", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="dotted overrides, e.g. train.lr=3e-3 'sweep.grid.adapter.rank=[4,8]'", show_default=False),
]


def fail(problems: list[str]) -> None:
    for problem in problems:
        errors.print(problem, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def validate(sweep: SweepArg, overrides: OverridesArg = None) -> None:
    """Check a sweep file without loading any model: every problem, or a one-line summary."""
    from mlora_cli.sweep import expand

    try:
        spec, _ = load_sweep(sweep, overrides or [])
    except ConfigError as exc:
        fail(exc.problems)
    adapters = expand(spec)
    console.print(f"ok: {len(adapters)} adapters, {len(spec.tasks)} tasks")


@app.command()
def run(
    sweep: SweepArg,
    overrides: OverridesArg = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show the expanded adapters and placement; train nothing")] = False,
) -> None:
    """Train every adapter of the sweep, evaluate, and write a run folder."""
    from mlora_cli.report import ProgressView, plan_table, print_summary
    from mlora_cli.sweep import expand

    try:
        spec, resolved = load_sweep(sweep, overrides or [])
        adapters = expand(spec)
        if dry_run:
            from mlora_cli.launcher import plan_workers

            console.print(plan_table(spec, plan_workers(spec, adapters)))
            return
        from mlora_cli.launcher import run_sweep

        with ProgressView(console, spec) as view:
            outcome = run_sweep(spec, resolved, sweep.parent, emit=view)
    except ConfigError as exc:
        fail(exc.problems)
    print_summary(console, outcome.results)
    if outcome.results["run"]["failed"]:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)
