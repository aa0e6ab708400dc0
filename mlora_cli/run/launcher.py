"""From a validated sweep to a finished run folder: prepare, place, run workers, gather.

The only module that knows about devices and processes. Task data is loaded here, before
any model, so bad data is a one-line error (exit 2) rather than a crash mid-run.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from mlora_cli import __version__, count_from, started_at
from mlora_cli.contract import (
    ADAPTERS,
    BASE_RECORD,
    METRICS,
    RESOLVED_SWEEP,
    RESULTS,
    RUN_RECORD,
    Emit,
    Event,
    adapter_record,
    failed_result,
)
from mlora_cli.data.sources import TaskData, load_task
from mlora_cli.errors import ConfigError, Interrupted, StorageError
from mlora_cli.eval.metrics import add_cl_metrics
from mlora_cli.files import append_jsonl, exclusive_run_folder, write_bytes, write_json, write_text
from mlora_cli.report.outputs import write_reports
from mlora_cli.report.trackers import Trackers, missing_trackers
from mlora_cli.run.folder import (
    keep_metrics_up_to_checkpoints,
    new_run_dir,
    record_trial,
    remove_leftovers,
    saved_steps,
)
from mlora_cli.run.signals import defer_sigterm_while_starting
from mlora_cli.spec.plan import (
    WorkerPlan,
    assign,
    missing_cuda_devices,
    resolve_devices,
    sweep_work,
    visible_cuda_devices,
)
from mlora_cli.spec.schema import SweepSpec
from mlora_cli.spec.sweep import AdapterSpec, expand


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
    problems = missing_cuda_devices(spec.devices, cuda_count)
    if problems:
        raise ConfigError(problems)
    workers = resolve_devices(spec.devices, cuda_count, os.cpu_count() or 1, len(adapters), sweep_work(adapters, spec))
    return assign(adapters, spec, workers)


def visible_device_for(index: int, parent_visible: str | None) -> str:
    """What a worker for this process's `cuda:index` sets as CUDA_VISIBLE_DEVICES.

    Device indices here count the GPUs this process sees: with CUDA_VISIBLE_DEVICES="2,3" (a
    scheduler's allocation) cuda:0 is physical GPU 2, so the worker must see "2", not "0".
    Entries are passed on as written, so GPU UUIDs and MIG ids work too.
    """
    if parent_visible is None or not parent_visible.strip():
        return str(index)
    entries = [entry.strip() for entry in parent_visible.split(",") if entry.strip()]
    return entries[index]


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process and its finished children, in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mib": max(own, children)}


def cuda_memory_by_device(peaks: dict[int, dict[str, float]], plans: list[WorkerPlan],
                          backend: str) -> dict[str, Any]:
    """Run-level GPU memory from each worker's peaks: per device, the sum over the workers on it (their peaks
    need not coincide, so an upper bound), and the largest device's figures at the top level.

    Reserved memory is what the caching allocator held (what nvidia-smi shows, less each process's CUDA
    context of a few hundred MiB, which torch does not count). Ray gives every GPU worker a GPU of its own.
    """
    by_device: dict[str, dict[str, float]] = {}
    for worker_id, peak in sorted(peaks.items()):
        key = f"ray worker {worker_id}" if backend == "ray" else plans[worker_id].device
        entry = by_device.setdefault(key, {"max_allocated_mib": 0.0, "max_reserved_mib": 0.0, "workers": 0})
        entry["max_allocated_mib"] += peak["cuda_max_allocated_mib"]
        entry["max_reserved_mib"] += peak["cuda_max_reserved_mib"]
        entry["workers"] += 1
    if not by_device:
        return {}
    return {"cuda_memory": by_device,
            "cuda_max_allocated_mib": max(e["max_allocated_mib"] for e in by_device.values()),
            "cuda_max_reserved_mib": max(e["max_reserved_mib"] for e in by_device.values())}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"mlora": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "datasets"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:  # pragma: no cover
            found[package] = "not installed"
    return found


def run_sweep(
    spec: SweepSpec,
    resolved: dict[str, Any],
    sweep_dir: Path,
    emit: Emit = lambda event: None,
    output_base: Path | None = None,
    plots: bool = True,
    resume_dir: Path | None = None,
    backend: str = "local",
    address: str | None = None,
) -> RunOutcome:
    """Run a validated sweep (or continue `resume_dir`); writes and returns the run folder and results."""
    started = time.perf_counter()
    adapters = expand(spec)
    if problems := missing_trackers(spec.logging.trackers):  # before any data, model or folder
        raise ConfigError(problems)
    if backend == "ray" and spec.sweep.runs_a_study:
        raise ConfigError(["sweep.search / sweep.prune: the study is a SQLite file in the run folder, which Ray "
                           "actors do not share; run it with --backend local"])
    task_data = load_task_data(spec, adapters, sweep_dir)
    plans = plan_workers(spec, adapters)
    if resume_dir is None:
        run_dir = new_run_dir(spec, output_base or Path.cwd())
        write_text(run_dir / RESOLVED_SWEEP, yaml.safe_dump(resolved, sort_keys=False))
        write_json(run_dir / RUN_RECORD, {"sweep_dir": str(sweep_dir.resolve()), "started": datetime.now().isoformat()})
        write_json(run_dir / ADAPTERS, [adapter_record(a) for a in adapters])
    else:
        run_dir = resume_dir
    try:
        with exclusive_run_folder(run_dir):  # a second `--resume` of this folder refuses, not interleaves
            if resume_dir is not None:
                last_step = saved_steps(run_dir, adapters)
                remove_leftovers(run_dir)
                keep_metrics_up_to_checkpoints(run_dir, last_step)
            trackers = Trackers(spec.logging, run_dir, spec.name, adapters, [t.name for t in spec.tasks],
                                spec.eval.metrics, images=plots)
            emit({"event": "run_start", "run_dir": str(run_dir), "plans": plans, "resume": resume_dir is not None})
            metrics_path = run_dir / METRICS

            cuda_peaks: dict[int, dict[str, float]] = {}  # from worker processes, which own the GPUs

            def record(event: dict[str, Any]) -> None:
                if event["event"] == "worker_done" and "cuda_max_allocated_mib" in event:
                    cuda_peaks[event["worker"]] = event
                if event["event"] == "step":
                    append_jsonl(metrics_path, event["records"])
                elif event["event"] == "worker_ready" and not (run_dir / BASE_RECORD).exists():
                    write_json(run_dir / BASE_RECORD, event["base"])
                elif event["event"] == "trial":
                    record_trial(run_dir, event["spec"])
                trackers.record(event)
                emit(event)

            resume = resume_dir is not None
            try:
                if backend == "ray":
                    results = run_on_ray(plans, spec, task_data, run_dir, record, resume, address)
                elif len(plans) == 1 and plans[0].device == "cpu" and plans[0].threads is None:
                    # One default CPU worker: run it here and skip a second interpreter start.
                    from mlora_cli.run import worker

                    results = worker.run(plans[0], spec, task_data, run_dir, record, worker_id=0, resume=resume)
                else:
                    results = run_worker_processes(plans, spec, task_data, run_dir, record, resume)
            except BaseException:  # stopped or failed: the tracker runs end as such; `--resume` continues them
                trackers.close(interrupted=True)
                raise
            trackers.close()

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
                    "failed": sorted(name for name, r in ordered.items() if r["status"] == "failed"),
                    "workers": [{"device": p.device, "threads": p.threads, "adapters": [a.name for a in p.adapters]}
                                for p in plans],
                    "wall_seconds": wall,
                    "train_tokens": total_tokens,
                    "train_tokens_per_s": total_tokens / wall if wall else 0.0,
                    **peak_memory(),
                    **cuda_memory_by_device(cuda_peaks, plans, backend),
                    "versions": versions(),
                    "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                "cpus": os.cpu_count()},
                },
            }
            add_cl_metrics(summary)
            write_json(run_dir / RESULTS, summary)
            summary["run"]["notes"] = write_reports(run_dir, summary, plots)
            return RunOutcome(run_dir=run_dir, results=summary)
    except OSError as exc:  # a write of the run folder failed (a full disk): what was written before is whole
        raise StorageError(exc.filename or run_dir, exc) from exc


def _worker_main(plan: WorkerPlan, spec: SweepSpec, task_data: dict[int, list[TaskData]], run_dir: Path,
                 events: Any, worker_id: int, resume: bool, launcher_start: float) -> None:
    """Entry point of a spawned worker process: one device, its adapters, events to the parent."""
    count_from(launcher_start)
    if plan.device.startswith("cuda:"):
        # Each GPU worker sees only its GPU, as cuda:0.
        index = int(plan.device.partition(":")[2])
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_device_for(index, os.environ.get("CUDA_VISIBLE_DEVICES"))
        plan = dataclasses.replace(plan, device="cuda:0")
    os.environ.update(plan.thread_environment())

    defer_sigterm_while_starting()  # the worker loop installs its own handlers, then reads it before a step
    import multiprocessing

    parent = multiprocessing.parent_process()

    def emit(event: dict[str, Any]) -> None:
        if parent is not None and not parent.is_alive():
            # The parent was killed: stop now, rather than go on writing states into a run folder
            # that nobody records metrics or results for (and that a `--resume` may be running in).
            os._exit(1)
        events.put(event)

    try:
        from mlora_cli.run import worker  # inside the try: a Ctrl-C can land while torch loads (seconds)

        worker.run(plan, spec, task_data, run_dir, emit, worker_id=worker_id, resume=resume)
    except KeyboardInterrupt:  # Ctrl-C or a stop reached this worker too; states are saved, leave quietly
        return
    except (ConfigError, StorageError) as exc:  # a user error found once the model loaded; a failed write
        events.put({"event": "worker_error", "worker": worker_id, "error": exc})  # both pickle whole
        return
    events.put({"event": "worker_done", "worker": worker_id, **worker.cuda_peak()})
    # Everything is written and sent: leave without the interpreter's teardown of torch and
    # transformers (about a second), which the parent would otherwise wait for.
    events.close()
    events.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_worker_processes(
    plans: list[WorkerPlan], spec: SweepSpec, task_data: dict[int, list[TaskData]], run_dir: Path, record: Emit,
    resume: bool = False,
) -> dict[str, Any]:
    """One spawned process per worker plan; events stream back; a dead worker fails only its adapters."""
    import multiprocessing
    import queue

    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    processes = {
        worker_id: context.Process(target=_worker_main,
                                   args=(plan, spec, task_data, run_dir, events, worker_id, resume, started_at()),
                                   name=f"mlora-worker-{worker_id}", daemon=True)
        for worker_id, plan in enumerate(plans)
    }
    for process in processes.values():
        process.start()
    results: dict[str, Any] = {}
    running = set(processes)
    trials: dict[str, AdapterSpec] = {}  # a search's trials as Optuna set them: a dead worker's fail with theirs

    def record_trials(event: Event) -> None:
        if event["event"] == "trial":
            trials[event["adapter"]] = event["spec"]
        record(event)

    def forward_sigterm(signum: int, frame: Any) -> None:
        # SIGTERM (a scheduler, `timeout`) reaches this process alone: the workers save their
        # state between steps on it, as on Ctrl-C, which a terminal sends to all of them.
        for process in processes.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        raise Interrupted(signal.SIGTERM)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward_sigterm) if in_main_thread else None
    try:
        while running:
            try:
                event = events.get(timeout=0.5)
            except queue.Empty:
                for worker_id in list(running):
                    process = processes[worker_id]
                    if not process.is_alive():
                        _drain(events, results, record_trials, running)
                        if worker_id in running:  # died without saying it finished
                            running.discard(worker_id)
                            reason = (f"worker {worker_id} ({plans[worker_id].device}) died with exit code "
                                      f"{process.exitcode}")
                            for adapter in plans[worker_id].adapters:
                                results.setdefault(adapter.name, failed_result(trials.get(adapter.name, adapter),
                                                                               reason))
                continue
            _handle(event, results, record_trials, running)
    except KeyboardInterrupt:
        # The workers got Ctrl-C too and are saving their state between steps: keep
        # recording their last steps' metrics until they exit (bounded), then stop.
        deadline = time.monotonic() + 30
        while any(p.is_alive() for p in processes.values()) and time.monotonic() < deadline:
            _drain(events, results, record_trials, running)
        _drain(events, results, record_trials, running)
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        for process in processes.values():
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    return results


def _handle(event: Event, results: dict[str, Any], record: Emit, running: set[int]) -> None:
    if event["event"] == "worker_error":  # a user error found in the worker: the run stops with it
        raise event["error"]
    if event["event"] == "adapter_done":
        results[event["adapter"]] = event["result"]
    elif event["event"] == "worker_done":
        running.discard(event["worker"])
    record(event)


def _drain(events: Any, results: dict[str, Any], record: Emit, running: set[int]) -> None:
    import queue

    while True:
        try:
            _handle(events.get(timeout=0.2), results, record, running)
        except queue.Empty:
            return


def run_on_ray(
    plans: list[WorkerPlan], spec: SweepSpec, task_data: dict[int, list[TaskData]], run_dir: Path, record: Emit,
    resume: bool, address: str | None,
) -> dict[str, Any]:
    """Workers as Ray actors; their files arrive as events and are written here, on the driver."""
    from mlora_cli.run.ray_backend import run_ray_workers

    results: dict[str, Any] = {}

    def handle(event: Event) -> None:
        if event["event"] == "files":
            for relative, data in event["files"].items():
                write_bytes(run_dir / relative, data)
            return
        if event["event"] == "adapter_done":
            results[event["adapter"]] = event["result"]
        elif event["event"] == "worker_failed":
            for adapter in plans[event["worker"]].adapters:
                results.setdefault(adapter.name, failed_result(adapter, event["reason"]))
        record(event)

    run_ray_workers(plans, spec, task_data, run_dir, handle, resume, address)
    return results
