"""The `mlora` command. Thin: parse, call, and turn user errors into one line each + exit 2.

With `--json` (validate, run --dry-run, eval, bench) stdout holds one JSON document and nothing else: tables and
notes go nowhere, status to stderr, and user errors become `{"ok": false, "problems": [...]}` with exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from mlora_cli.errors import ConfigError, Interrupted, StorageError
from mlora_cli.spec.load import load_sweep

if TYPE_CHECKING:
    from mlora_cli.spec.plan import WorkerPlan
    from mlora_cli.spec.schema import SweepSpec
    from mlora_cli.spec.sweep import AdapterSpec

app = typer.Typer(
    help="Co-train a sweep of LoRA adapters over one shared frozen base model.",
    no_args_is_help=True,
    add_completion=True,  # typer's --install-completion / --show-completion
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

SweepArg = Annotated[Path, typer.Argument(help="the sweep YAML file", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="dotted overrides, e.g. train.lr=3e-3 'sweep.grid.adapter.rank=[4,8]'", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document on stdout, nothing else there")]


def say(text: str, stream: Console = console) -> None:
    """A plain line: no markup, no highlighting, never wrapped (paths and commands stay whole to copy)."""
    stream.print(text, markup=False, highlight=False, soft_wrap=True)


def print_json(document: Any) -> None:
    typer.echo(json.dumps(document, indent=2, default=str))


def fail(problems: list[str], as_json: bool = False) -> None:
    if as_json:
        print_json({"ok": False, "problems": problems})
    else:
        for problem in problems:
            errors.print(problem, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def plan_document(spec: SweepSpec, adapters: list[AdapterSpec], plans: list[WorkerPlan]) -> dict[str, Any]:
    """`mlora run --dry-run --json`: the expanded adapters with their settings, and which worker trains each."""
    from mlora_cli.spec.convert import to_plain

    steps = [t.steps for t in spec.tasks]
    worker_of = {a.name: i for i, plan in enumerate(plans) for a in plan.adapters}
    return {
        "name": spec.name, "base_model": spec.base_model,
        "tasks": [{"name": t.name, "source": t.source, "objective": t.objective, "steps": t.steps}
                  for t in spec.tasks],
        "adapters": [{"name": a.name, "seed": a.seed, "varied": a.varied, "worker": worker_of[a.name],
                      "task_steps": a.task_steps(steps), "adapter": to_plain(a.adapter), "train": to_plain(a.train)}
                     for a in adapters],
        "workers": [{"worker": i, "device": plan.device, "threads": plan.threads, "slots": plan.slots,
                     "adapters": [a.name for a in plan.adapters]} for i, plan in enumerate(plans)],
    }


@app.command()
def validate(sweep: SweepArg, overrides: OverridesArg = None, as_json: JsonOpt = False) -> None:
    """Check a sweep file without loading any model: every problem, or a one-line summary."""
    from mlora_cli.spec.sweep import expand

    try:
        spec, _ = load_sweep(sweep, overrides or [])
    except ConfigError as exc:
        fail(exc.problems, as_json)
    adapters = expand(spec)
    if as_json:
        names = [a.name for a in adapters]
        print_json({"ok": True, "adapters": len(adapters), "tasks": len(spec.tasks), "names": names})
    else:
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
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="no progress and no tables: only a one-line summary and errors")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="with --dry-run: the plan as one JSON document")] = False,
) -> None:
    """Train every adapter of the sweep, evaluate, and write a run folder."""
    from mlora_cli.report.progress import progress_view, summary_line
    from mlora_cli.report.tables import plan_table, print_cl_report, print_summary
    from mlora_cli.spec.sweep import expand

    view = None
    if as_json and not dry_run:
        fail(["--json goes with --dry-run (a run writes RUN_DIR/results.json; --quiet prints one line)"], as_json)
    if backend not in ("local", "ray"):
        fail([f"--backend: expected local or ray, got '{backend}'"], as_json)
    if backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            fail(["--backend ray needs Ray: pip install 'mlora-sweep[ray]'"], as_json)
    # `--resume RUN adapter.rank=8` takes the override for the sweep argument.
    if resume is not None and (overrides or (sweep is not None and "=" in str(sweep))):
        fail(["--resume continues a run as it was: no overrides"], as_json)
    if (sweep is None) == (resume is None):
        fail(["give a sweep file, or --resume RUN_DIR (not both)" if sweep is not None else
              "give a sweep file, or --resume RUN_DIR"], as_json)
    try:
        if resume is not None:
            from mlora_cli.run.folder import load_run

            if not resume.is_dir():
                fail([f"{resume}: no such run folder"], as_json)
            spec, resolved, sweep_dir = load_run(resume)
        else:
            assert sweep is not None
            spec, resolved = load_sweep(sweep, overrides or [])
            sweep_dir = sweep.parent
        adapters = expand(spec)
        if dry_run:
            from mlora_cli.run.launcher import plan_workers

            plans = plan_workers(spec, adapters)
            if as_json:
                print_json(plan_document(spec, adapters, plans))
            else:
                console.print(plan_table(spec, plans))
                if spec.sweep.runs_a_study:
                    from mlora_cli.report.trials import search_table

                    console.print(search_table(spec, adapters, console.width))
            return
        from mlora_cli.run.launcher import run_sweep

        view = progress_view(console, spec, quiet)
        with view:
            outcome = run_sweep(spec, resolved, sweep_dir, emit=view, plots=plots, resume_dir=resume,
                                backend=backend, address=address)
    except ConfigError as exc:
        fail(exc.problems, as_json)
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
    if quiet:
        for name in outcome.results["run"]["failed"]:
            errors.print(f"failed {name}: {outcome.results['adapters'][name]['failure']}", markup=False,
                         highlight=False, soft_wrap=True)
        console.print(summary_line(outcome.results), markup=False, highlight=False, soft_wrap=True)
    else:
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
    harness_tasks: Annotated[str | None, typer.Option(
        "--harness-tasks", help="lm-evaluation-harness tasks, comma-separated, for each adapter (its final checkpoint;"
        " needs the [lm-eval] extra)")] = None,
    harness_include: Annotated[Path | None, typer.Option(
        "--harness-include", help="a folder of harness task YAMLs (local tasks for --harness-tasks)")] = None,
    harness_every_task: Annotated[bool, typer.Option(
        "--harness-every-task", help="RUN_DIR: score the harness on every per-task checkpoint and the base, not only "
        "the final one (the harness columns of R)")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate saved adapters: a run's per-task checkpoints, or any PEFT LoRA adapters, in batched passes."""
    from mlora_cli.eval.options import option_problems
    from mlora_cli.report.tables import adapters_eval_table, harness_table, print_cl_report
    from mlora_cli.spec.load import load_task_suite

    harness_list = [t.strip() for t in (harness_tasks or "").split(",") if t.strip()] or None
    problems = option_problems(run_dir, tasks, base, adapter or [], device, harness_list, harness_include,
                               harness_every_task)
    if problems:
        fail(problems, as_json)
    try:
        suite = load_task_suite(tasks) if tasks is not None else None
        from mlora_cli.eval import reeval

        if run_dir is not None:
            out_dir, results = reeval.evaluate_run(run_dir, suite, device, harness_list, harness_include,
                                                   harness_every_task)
            from mlora_cli.report.outputs import write_reports

            for note in write_reports(out_dir, results):
                (errors if as_json else console).print(f"note {note}", markup=False)
            if as_json:  # what it wrote to out_dir/results.json, and where
                print_json({**results, "run": {**results["run"], "output_dir": str(out_dir)}})
            elif results["run"]["trained_tasks"] == results["run"]["tasks"]:
                print_cl_report(console, results, matrices=matrix)  # the harness table among them
            else:  # other tasks than trained: no forgetting metrics, the final scores per task
                console.print(adapters_eval_table(results))
                console.print(harness_table(results) or "")
            if not as_json:
                say(f"evaluation written to {out_dir}")
        else:
            assert base is not None and adapter
            results = reeval.evaluate_adapters(base, adapter, suite, device, harness_tasks=harness_list,
                                               harness_include=harness_include)
            if as_json:
                print_json(results)
            else:
                if suite is not None:
                    console.print(adapters_eval_table(results))
                if harness_list:
                    console.print(harness_table(results) or "")
    except ConfigError as exc:
        fail(exc.problems, as_json)


@app.command()
def bench(
    sweep: SweepArg,
    overrides: OverridesArg = None,
    sequential_baseline: Annotated[
        bool, typer.Option("--sequential-baseline", help="also run every adapter as its own plain-PEFT process")
    ] = False,
    mode: Annotated[list[str] | None, typer.Option(
        "--mode", help="extra mode: engine-serial, or trl (TRL's GRPOTrainer per experiment; RL sweeps; "
        "pip install 'mlora-sweep\\[trl]')"
    )] = None,
    concurrency: Annotated[str, typer.Option("--concurrency", help="max_concurrent values, e.g. 1,2,4,8")] = "",
    fusion_matrix: Annotated[bool, typer.Option(
        "--fusion-matrix", help="instead of the modes: the training step's fusion efficiency on the CPU for 1 and "
        "all threads x q,v / all-linear x equal / the sweep's ranks x dropout 0 / 0.05 (docs/benchmark.md)"
    )] = False,
    output: Annotated[
        Path, typer.Option("--output", help="folder for bench.json and every mode's runs (or fusion-matrix.json)")
    ] = Path("bench"),
    as_json: JsonOpt = False,
) -> None:
    """Measure concurrent co-training against the sequential single-tenant baseline on the same sweep."""
    from datetime import datetime

    from mlora_cli.bench.processes import ModeFailed
    from mlora_cli.report.benchmark import bench_tables, fusion_matrix_table
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
    if fusion_matrix and (sequential_baseline or mode or levels):
        problems.append("--fusion-matrix: times the training step alone; run it without --sequential-baseline, "
                        "--mode and --concurrency")
    if problems:
        fail(problems, as_json)
    try:
        spec, resolved = load_sweep(sweep, overrides or [])
        if spec.sweep.runs_a_study:
            fail(["sweep.search: mlora bench compares fixed adapters; a searched or pruned sweep is timed by "
                  "scripts/bench-search.py"], as_json)
        adapters = expand(spec)
        if sequential_baseline:
            unsupported = [a.name for a in adapters if a.adapter.strategy != "naive" or a.adapter.dropout > 0]
            if unsupported:
                fail(["sweep: the sequential baseline runs naive fine-tuning without dropout; "
                      f"not: {', '.join(unsupported)}"], as_json)
        if "trl" in (mode or []):
            from mlora_cli.bench.trl_grpo import unsupported as trl_unsupported

            if problems := trl_unsupported(spec, adapters):
                fail(problems, as_json)
        from mlora_cli.bench.bench import run_bench

        out = output / f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file where a folder must be, no permission
            fail([f"--output: cannot make {out}: {exc.strerror or exc}"], as_json)
        with (errors if as_json else console).status("benchmarking") as status:
            if fusion_matrix:
                from mlora_cli.bench.fusion_matrix import fusion_matrix_report

                report = fusion_matrix_report(sweep, spec, adapters, out, progress=lambda text: status.update(text))
            else:
                report = run_bench(sweep, spec, resolved, adapters, list(overrides or []), out, sequential_baseline,
                                   list(mode or []), levels, progress=lambda text: status.update(text))
    except ConfigError as exc:
        fail(exc.problems, as_json)
    except ModeFailed as exc:  # a mode's process failed: its log says why
        if as_json:
            print_json({"ok": False, "problems": [str(exc)]})
        else:
            errors.print(str(exc))
        raise typer.Exit(1) from None
    if as_json:
        print_json(report)  # as written to bench.json (fusion-matrix.json)
        raise typer.Exit(1 if sequential_baseline and not report["agree"] else 0)
    for table in [fusion_matrix_table(report)] if fusion_matrix else bench_tables(report):
        console.print(table)
    written = "fusion-matrix.json" if fusion_matrix else "bench.json"
    console.print(f"{written}: {out / written}")
    if sequential_baseline and not report["agree"]:
        raise typer.Exit(1)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder", metavar="RUN_DIR", show_default=False)],
    names: Annotated[list[str] | None, typer.Argument(
        help="adapters to export; default: every adapter with a final checkpoint", metavar="ADAPTER",
        show_default=False)] = None,
    merge: Annotated[Path | None, typer.Option(
        "--merge", metavar="OUT", help="also write each adapter merged into the base: a transformers folder OUT/NAME"
    )] = None,
    base_out: Annotated[Path | None, typer.Option(
        "--base-out", metavar="DIR", help="write the base model + tokenizer as a transformers folder (builtin: "
        "bases are built in code)")] = None,
    check_vllm: Annotated[bool, typer.Option(
        "--check-vllm", help="check each adapter against vLLM's multi-LoRA rules; print `vllm serve ...`")] = False,
    max_lora_rank: Annotated[int, typer.Option(  # vLLM's default (export.VLLM_DEFAULT_MAX_LORA_RANK)
        "--max-lora-rank", help="for --check-vllm: the server's --max-lora-rank")] = 16,
    push_to_hub: Annotated[str | None, typer.Option(
        "--push-to-hub", metavar="REPO", help="upload each adapter folder to the hub model repo REPO-NAME (one per "
        "adapter)")] = None,
) -> None:
    """Write a model card into each adapter folder; optionally merged models, the base, a vLLM check, hub uploads."""
    from mlora_cli import export as exporting

    try:
        run = exporting.load_run(run_dir)
        selected = exporting.select(run, list(names or []))
        problems = exporting.output_problems([p for p in [base_out, *(merge / n for n in selected if merge)] if p])
        if check_vllm and max_lora_rank not in exporting.VLLM_MAX_LORA_RANKS:
            problems.append(f"--max-lora-rank: vLLM {exporting.VLLM_VERSION} takes one of "
                            f"{', '.join(map(str, exporting.VLLM_MAX_LORA_RANKS))}, got {max_lora_rank}")
        if push_to_hub is not None:
            problems += exporting.hub_problems(push_to_hub, selected)
        if problems:
            fail(problems)
        if base_out is not None:
            say(f"base model: {exporting.write_base(run, base_out)}")
        for card in exporting.write_cards(run, selected, base_out, push_to_hub, merge):
            say(f"model card: {card}")
        for folder in exporting.write_merged(run, selected, merge, base_out) if merge is not None else []:
            say(f"merged model: {folder}")
        refused: list[str] = []
        if check_vllm:
            verdicts = exporting.vllm_check(run, selected, max_lora_rank)
            refused = [v.name for v in verdicts if v.problems]
            say(f"vLLM {exporting.VLLM_VERSION} multi-LoRA serving, --max-lora-rank {max_lora_rank}:")
            for v in verdicts:
                say(f"{'no' if v.problems else 'ok'}  {v.name} (rank {v.rank})"
                    + (": " + "; ".join(v.problems + v.notes) if v.problems or v.notes else ""))
            command = exporting.vllm_serve_command(exporting.base_reference(run, base_out), verdicts)
            say(command or "no adapter would load")
            if command and run.builtin and base_out is None:
                say(f"BASE_DIR: {run.base_model} is built in code; write it with --base-out BASE_DIR")
        for repo in exporting.push_to_hub(run, selected, push_to_hub) if push_to_hub is not None else []:
            say(f"uploaded: https://huggingface.co/{repo}")
    except ConfigError as exc:
        fail(exc.problems)
    except exporting.ExportFailed as exc:
        say(str(exc), errors)
        raise typer.Exit(1) from None
    if refused:  # scripts can gate a deployment on it
        raise typer.Exit(1)


def main() -> None:
    try:
        app(prog_name="mlora")  # also under `python -m mlora_cli`: completion scripts name the command
    except KeyboardInterrupt:
        errors.print("interrupted")
        sys.exit(130)
