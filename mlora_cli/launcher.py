"""From a validated sweep to a finished run folder: prepare, place, run workers, gather.

The only module that knows about devices and processes. Task data is loaded here, before
any model, so bad data is a one-line error (exit 2) rather than a crash mid-run.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from mlora_cli import __version__
from mlora_cli.config import ConfigError, SweepSpec, to_plain
from mlora_cli.metrics import add_cl_metrics
from mlora_cli.plan import WorkerPlan, assign, resolve_devices
from mlora_cli.report import write_forgetting_csv
from mlora_cli.runfolder import append_jsonl, write_json, write_text
from mlora_cli.sweep import AdapterSpec, expand
from mlora_cli.tasks import TaskData, load_task

Emit = Callable[[dict[str, Any]], None]


@dataclass
class RunOutcome:
    run_dir: Path
    results: dict[str, Any]


def load_task_data(spec: SweepSpec, adapters: list[AdapterSpec], base_dir: Path | None) -> dict[int, list[TaskData]]:
    """The task sequence for every data seed the adapters use; ConfigError on bad data."""
    data: dict[int, list[TaskData]] = {}
    problems: list[str] = []
    for seed in sorted({a.seed for a in adapters}):
        tasks = []
        for i, task in enumerate(spec.tasks):
            try:
                tasks.append(load_task(task, seed, base_dir, path=f"tasks[{i}]"))
            except ConfigError as exc:
                problems.extend(p for p in exc.problems if p not in problems)
        data[seed] = tasks
    if problems:
        raise ConfigError(problems)
    return data


def plan_workers(spec: SweepSpec, adapters: list[AdapterSpec], cuda_count: int | None = None) -> list[WorkerPlan]:
    if cuda_count is None:
        cuda_count = visible_cuda_devices()
    workers = resolve_devices(spec.devices, cuda_count, os.cpu_count() or 1)
    return assign(adapters, spec, workers)


def visible_cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def new_run_dir(spec: SweepSpec, base: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = base / spec.output_dir if not Path(spec.output_dir).is_absolute() else Path(spec.output_dir)
    run_dir = root / f"{spec.name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = root / f"{spec.name}-{stamp}-{suffix}"
    run_dir.mkdir(parents=True)
    return run_dir


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process and its finished children, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    memory = {"peak_rss_mib": max(own, children)}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            memory["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:  # pragma: no cover
        pass
    return memory


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {
        "mlora": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def run_sweep(
    spec: SweepSpec,
    resolved: dict[str, Any],
    sweep_dir: Path,
    emit: Emit = lambda event: None,
    output_base: Path | None = None,
    plots: bool = True,
) -> RunOutcome:
    """Run a validated sweep; writes and returns the run folder and results."""
    from mlora_cli import worker

    started = time.perf_counter()
    adapters = expand(spec)
    task_data = load_task_data(spec, adapters, sweep_dir)
    plans = plan_workers(spec, adapters)
    run_dir = new_run_dir(spec, output_base or Path.cwd())
    write_text(run_dir / "sweep.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
    write_json(run_dir / "adapters.json", [
        {"name": a.name, "seed": a.seed, "varied": a.varied, "adapter": to_plain(a.adapter), "train": to_plain(a.train)}
        for a in adapters
    ])
    emit({"event": "run_start", "run_dir": str(run_dir), "plans": plans})
    metrics_path = run_dir / "metrics.jsonl"

    def record(event: dict[str, Any]) -> None:
        if event["event"] == "step":
            append_jsonl(metrics_path, event["records"])
        elif event["event"] == "worker_ready" and not (run_dir / "base.json").exists():
            write_json(run_dir / "base.json", event["base"])
        emit(event)

    results: dict[str, Any] = {}
    for worker_id, plan in enumerate(plans):
        results.update(worker.run(plan, spec, task_data, run_dir, record, worker_id=worker_id))

    wall = time.perf_counter() - started
    ordered = {a.name: results[a.name] for a in adapters if a.name in results}
    total_tokens = sum(r["train_tokens"] for r in ordered.values())
    summary = {
        "adapters": ordered,
        "run": {
            "name": spec.name,
            "run_dir": str(run_dir),
            "sweep_dir": str(sweep_dir.resolve()),  # relative data paths resolve against it
            "base_model": spec.base_model,
            "tasks": [t.name for t in spec.tasks],
            "adapter_count": len(adapters),
            "failed": sorted(name for name, r in ordered.items() if r["status"] != "done"),
            "workers": [{"device": p.device, "threads": p.threads, "adapters": [a.name for a in p.adapters]} for p in plans],
            "wall_seconds": wall,
            "train_tokens": total_tokens,
            "train_tokens_per_s": total_tokens / wall if wall else 0.0,
            **peak_memory(),
            "versions": versions(),
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        },
    }
    add_cl_metrics(summary)
    write_json(run_dir / "results.json", summary)
    summary["run"]["notes"] = write_reports(run_dir, summary, plots)
    return RunOutcome(run_dir=run_dir, results=summary)


def write_reports(folder: Path, results: dict[str, Any], plots: bool = True) -> list[str]:
    """forgetting.csv and PNG plots next to results.json; returns notes for the user."""
    write_forgetting_csv(folder / "forgetting.csv", results)
    if not plots:
        return []
    try:
        from mlora_cli import plots as plotting

        plotting.write_all(folder, results, results["run"]["tasks"])
    except ImportError as exc:
        return [str(exc)]
    return []
