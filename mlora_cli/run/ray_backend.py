"""Workers as Ray actors, for sweeps over more than one machine.

    mlora run SWEEP --backend ray [--address auto|ray://HOST:PORT]

Each worker plan becomes one actor (one GPU, or `threads` CPUs), which runs the same
`worker.run` as a local process. Actors write their files into a scratch folder on their
own node and ship every file they write to the driver as bytes, so the run folder, its
checkpoints and its training state all land on the driver, whatever node trained what.
Progress events stream back through a Ray queue. On `--resume`, each actor first gets
the driver's saved state for its adapters.
"""

from __future__ import annotations

import queue as queue_module
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlora_cli import count_from, started_at
from mlora_cli.data.sources import TaskData
from mlora_cli.errors import ConfigError, StorageError
from mlora_cli.spec.plan import WorkerPlan
from mlora_cli.spec.schema import SweepSpec
from mlora_cli.spec.tasks import first_line


def files_under(path: Path, root: Path) -> dict[str, bytes]:
    """Every file at or under `path`, keyed by its path relative to `root`."""
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in paths}


class WorkerActor:
    """Runs one worker plan on whatever node Ray places it."""

    def run(self, plan: WorkerPlan, spec: SweepSpec, task_data: dict[int, list[TaskData]], worker_id: int,
            resume: bool, saved_state: dict[str, bytes], events: Any, launcher_start: float) -> None:
        import os

        from mlora_cli.run import worker

        count_from(launcher_start)  # the driver's start, on the wall clock (nodes' clocks agree to NTP's skew)

        if plan.device.startswith("cuda"):
            plan = WorkerPlan("cuda:0", plan.adapters, plan.threads, plan.max_concurrent)  # Ray sets the visible GPU
        os.environ.update(plan.thread_environment())
        scratch = Path(tempfile.mkdtemp(prefix=f"mlora-worker-{worker_id}-"))
        try:
            for relative, data in saved_state.items():
                (scratch / relative).parent.mkdir(parents=True, exist_ok=True)
                (scratch / relative).write_bytes(data)

            def ship(path: Path) -> None:
                events.put({"event": "files", "worker": worker_id, "files": files_under(path, scratch)})

            try:
                worker.run(plan, spec, task_data, scratch, events.put, worker_id=worker_id, resume=resume, written=ship)
            except (ConfigError, StorageError) as exc:  # a user error found once the model loaded; a failed write
                events.put({"event": "worker_error", "worker": worker_id, "error": exc})  # ConfigError pickles whole
                return
            events.put({"event": "worker_done", "worker": worker_id, **worker.cuda_peak()})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def run_ray_workers(
    plans: list[WorkerPlan], spec: SweepSpec, task_data: dict[int, list[TaskData]], run_dir: Path,
    handle: Any, resume: bool, address: str | None,
) -> None:
    """Run every plan as a Ray actor; `handle(event)` gets each event (files included) on the driver."""
    import ray
    from ray.util.queue import Queue

    if not ray.is_initialized():
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:  # no cluster there, a malformed address
            raise ConfigError([f"--address {address}: cannot connect to a Ray cluster ({first_line(exc)})"]) from None
    events = Queue()
    remote_actor = ray.remote(WorkerActor)
    running, calls = set(), {}
    for worker_id, plan in enumerate(plans):
        gpus = 1 if plan.device.startswith("cuda") else 0
        actor = remote_actor.options(num_gpus=gpus, num_cpus=plan.threads or 1).remote()
        saved = {}
        if resume:
            for adapter in plan.adapters:
                for path in (run_dir / "state").glob(f"{adapter.name}.*"):
                    saved.update(files_under(path, run_dir))
        calls[worker_id] = actor.run.remote(plan, spec, task_data, worker_id, resume, saved, events, started_at())
        running.add(worker_id)
    while running:
        try:
            event = events.get(timeout=0.5)
        except queue_module.Empty:
            for worker_id, call in list(calls.items()):
                if ray.wait([call], timeout=0)[0]:
                    del calls[worker_id]
                    try:
                        ray.get(call)
                    except Exception as exc:  # the actor died: its adapters fail, the others go on
                        running.discard(worker_id)
                        handle({"event": "worker_failed", "worker": worker_id,
                                "reason": f"ray actor: {str(exc).splitlines()[0]}"})
            continue
        if event["event"] == "worker_error":
            raise event["error"]
        handle(event)
        if event["event"] == "worker_done":
            running.discard(event["worker"])
    while not events.empty():
        handle(events.get_nowait())
