"""The `mlora` command. Thin: parse, call, and turn user errors into one line each + exit 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mlora_cli.errors import ConfigError, Interrupted, StorageError
from mlora_cli.spec.load import load_sweep

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
    from mlora_cli.spec.sweep import expand

    try:
        spec, _ = load_sweep(sweep, overrides or [])
    except ConfigError as exc:
        fail(exc.problems)
    adapters = expand(spec)
    console.print(f"ok: {len(adapters)} adapters, {len(spec.tasks)} tasks")


@app.command()
def run(
    sweep: Annotated[Path | None, typer.Argument(help="the sweep YAML file", show_default=False)] = None,
    overrides: OverridesArg = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue an interrupted run folder")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="show the expanded adapters and placement; train nothing")
    ] = False,
    matrix: Annotated[bool, typer.Option("--matrix", help="also print each adapter's accuracy matrix R")] = False,
    plots: Annotated[bool, typer.Option(help="write PNG plots into the run folder")] = True,
    backend: Annotated[str, typer.Option("--backend", help="local (processes on this machine) or ray")] = "local",
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster: auto, or ray://HOST:PORT; default: start a local Ray")
    ] = None,
) -> None:
    """Train every adapter of the sweep, evaluate, and write a run folder."""
    from mlora_cli.report.progress import ProgressView
    from mlora_cli.report.tables import plan_table, print_cl_report, print_summary
    from mlora_cli.spec.sweep import expand

    view = None
    if backend not in ("local", "ray"):
        fail([f"--backend: expected local or ray, got '{backend}'"])
    if backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            fail(["--backend ray needs Ray: pip install 'mlora-sweep[ray]'"])
    if (sweep is None) == (resume is None):
        fail(["give a sweep file, or --resume RUN_DIR (not both)"])
    if resume is not None and overrides:
        fail(["--resume continues a run as it was: no overrides"])
    try:
        if resume is not None:
            from mlora_cli.run.folder import load_run

            if not resume.is_dir():
                fail([f"{resume}: no such run folder"])
            spec, resolved, sweep_dir = load_run(resume)
        else:
            assert sweep is not None
            spec, resolved = load_sweep(sweep, overrides or [])
            sweep_dir = sweep.parent
        adapters = expand(spec)
        if dry_run:
            from mlora_cli.run.launcher import plan_workers

            console.print(plan_table(spec, plan_workers(spec, adapters)))
            return
        from mlora_cli.run.launcher import run_sweep

        view = ProgressView(console, spec)
        with view:
            outcome = run_sweep(spec, resolved, sweep_dir, emit=view, plots=plots, resume_dir=resume,
                                backend=backend, address=address)
    except ConfigError as exc:
        fail(exc.problems)
    except StorageError as exc:
        folder = view.run_dir if view is not None and view.run_dir else "RUN_DIR"
        errors.print(f"{exc}; everything saved before it is whole. Free space, then:\n  mlora run --resume {folder}",
                     markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Interrupted)
        folder = view.run_dir if view is not None and view.run_dir else "RUN_DIR"
        # soft_wrap: the command stays one line to copy, however narrow the terminal (or a log file)
        errors.print(f"interrupted: training state saved. Resume with:\n  mlora run --resume {folder}",
                     markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code if isinstance(exc, Interrupted) else 130) from None
    print_cl_report(console, outcome.results, matrices=matrix)
    print_summary(console, outcome.results)
    if outcome.results["run"]["failed"]:
        raise typer.Exit(1)


@app.command("eval")
def eval_command(
    run_dir: Annotated[
        Path | None, typer.Argument(help="a run folder: recompute its evaluation from checkpoints")
    ] = None,
    tasks: Annotated[
        Path | None, typer.Option("--tasks", help="YAML with tasks: (and optional eval:, seed:), or a sweep")
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="base model for --adapter (HF id, folder, builtin:...)")
    ] = None,
    adapter: Annotated[list[Path] | None, typer.Option("--adapter", help="a PEFT LoRA folder; repeat for more")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda:N")] = "cpu",
    matrix: Annotated[bool, typer.Option("--matrix", help="also print each adapter's accuracy matrix R")] = False,
) -> None:
    """Evaluate saved adapters: a run's per-task checkpoints, or any PEFT LoRA adapters, in batched passes."""
    from mlora_cli.report.tables import adapters_eval_table, print_cl_report
    from mlora_cli.spec.load import load_task_suite

    problems = []
    if run_dir is None and not adapter:
        problems.append("give a RUN_DIR, or --base MODEL --adapter PATH ... --tasks FILE")
    if run_dir is not None and (adapter or base):
        problems.append("--base/--adapter evaluate adapters without a run folder; drop RUN_DIR or them")
    if adapter and (base is None or tasks is None):
        problems.append("--adapter needs --base MODEL and --tasks FILE")
    if run_dir is not None and not run_dir.is_dir():
        problems.append(f"{run_dir}: no such run folder")
    for path in adapter or []:
        if not (path / "adapter_config.json").is_file():
            problems.append(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
    if problems:
        fail(problems)
    try:
        suite = load_task_suite(tasks) if tasks is not None else None
        from mlora_cli.eval import reeval

        if run_dir is not None:
            out_dir, results = reeval.evaluate_run(run_dir, suite, device)
            from mlora_cli.report.outputs import write_reports

            for note in write_reports(out_dir, results):
                console.print(f"note {note}", markup=False)
            if results["run"]["trained_tasks"] == results["run"]["tasks"]:
                print_cl_report(console, results, matrices=matrix)
            else:  # other tasks than trained: no forgetting metrics, the final scores per task
                console.print(adapters_eval_table(results))
            console.print(f"evaluation written to {out_dir}")
        else:
            assert base is not None and suite is not None and adapter
            results = reeval.evaluate_adapters(base, adapter, suite, device)
            console.print(adapters_eval_table(results))
    except ConfigError as exc:
        fail(exc.problems)


@app.command()
def bench(
    sweep: SweepArg,
    overrides: OverridesArg = None,
    sequential_baseline: Annotated[
        bool, typer.Option("--sequential-baseline", help="also run every adapter as its own plain-PEFT process")
    ] = False,
    mode: Annotated[list[str] | None, typer.Option(
        "--mode", help="extra mode: engine-serial, or trl (TRL's GRPOTrainer per experiment; RL sweeps, needs [trl])"
    )] = None,
    concurrency: Annotated[str, typer.Option("--concurrency", help="max_concurrent values, e.g. 1,2,4,8")] = "",
    output: Annotated[
        Path, typer.Option("--output", help="folder for bench.json and every mode's runs")
    ] = Path("bench"),
) -> None:
    """Measure concurrent co-training against the sequential single-tenant baseline on the same sweep."""
    from datetime import datetime

    from mlora_cli.bench.bench import ModeFailed
    from mlora_cli.report.benchmark import bench_tables
    from mlora_cli.spec.sweep import expand

    problems = [f"--mode: unknown mode '{m}' (known: engine-serial, trl)" for m in mode or []
                if m not in ("engine-serial", "trl")]
    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        problems.append(f"--concurrency: expected comma-separated integers, got '{concurrency}'")
        levels = []
    if any(c < 1 for c in levels):
        problems.append("--concurrency: values must be >= 1")
    if problems:
        fail(problems)
    try:
        spec, resolved = load_sweep(sweep, overrides or [])
        adapters = expand(spec)
        if sequential_baseline:
            unsupported = [a.name for a in adapters if a.adapter.strategy != "naive" or a.adapter.dropout > 0]
            if unsupported:
                fail(["sweep: the sequential baseline runs naive fine-tuning without dropout; "
                      f"not: {', '.join(unsupported)}"])
        if "trl" in (mode or []):
            from mlora_cli.bench.trl_grpo import unsupported as trl_unsupported

            if problems := trl_unsupported(spec, adapters):
                fail(problems)
        from mlora_cli.bench.bench import run_bench

        out = output / f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        with console.status("benchmarking") as status:
            report = run_bench(sweep, spec, resolved, adapters, list(overrides or []), out, sequential_baseline,
                               list(mode or []), levels, progress=lambda text: status.update(text))
    except ConfigError as exc:
        fail(exc.problems)
    except ModeFailed as exc:  # a mode's process failed: its log says why
        errors.print(str(exc))
        raise typer.Exit(1) from None
    for table in bench_tables(report):
        console.print(table)
    console.print(f"bench.json: {out / 'bench.json'}")
    if sequential_baseline and not report["agree"]:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)
