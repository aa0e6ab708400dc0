"""Placement: which worker (device) trains which adapters. Pure and torch-free.

Cost of an adapter ~ rank x tokens x steps (rank stands for the LoRA work, tokens x steps
for the base work it rides on). Adapters go to the least-loaded worker, largest first
(longest-processing-time greedy), which keeps the busiest worker within 4/3 of optimal.
Within a worker, adapters keep their sweep order.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from mlora_cli.spec.schema import SweepSpec
from mlora_cli.spec.sweep import AdapterSpec


@dataclass(frozen=True)
class WorkerPlan:
    device: str  # cpu, cuda:0, ...
    adapters: tuple[AdapterSpec, ...]
    threads: int | None = None  # torch threads for CPU workers; None: torch's default
    max_concurrent: int | None = None

    @property
    def slots(self) -> int:
        return min(self.max_concurrent or len(self.adapters), len(self.adapters))

    def thread_environment(self) -> dict[str, str]:
        """Variables a worker process sets before it imports torch (locally and as a Ray actor alike)."""
        if not self.threads:
            return {}
        return {variable: str(self.threads) for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


# An adapter's share of the frozen base's work in a fused step, in units of LoRA rank: the base
# costs every row the same whatever the rank, so a rank-r adapter costs (r + BASE_COST_IN_RANKS)
# per row-token, not r. A rough constant (the base is the larger part of a step for small ranks).
BASE_COST_IN_RANKS = 8


def adapter_cost(adapter: AdapterSpec, spec: SweepSpec) -> float:
    """Relative work of an adapter (rows x tokens x steps, weighted by rank), to balance workers."""
    steps = adapter.total_steps([t.steps for t in spec.tasks])
    rank_weight = adapter.adapter.rank + BASE_COST_IN_RANKS
    return float(rank_weight * adapter.train.batch_size * adapter.train.max_seq_len * steps)


# `devices: auto` without GPUs: two CPU workers with half the cores each beat one worker with
# all of them (measured on sweeps/quickstart.yaml, 2 cores: 64.0 s vs 70.6 s), once a sweep is
# long enough to repay the second worker's start (~5 s). Work counts adapter-steps x rows x tokens.
AUTO_SPLIT_MIN_WORK = 100_000


def sweep_work(adapters: list[AdapterSpec], spec: SweepSpec) -> float:
    return sum(a.total_steps([t.steps for t in spec.tasks]) * a.train.batch_size * a.train.max_seq_len
               for a in adapters)


# Device nodes that exist wherever a CUDA (or ROCm, which torch also calls cuda) GPU can be used.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg", "/dev/kfd")


def gpu_device_nodes_present() -> bool:
    """Whether any GPU could be visible here, known without importing torch."""
    return any(os.path.exists(node) for node in GPU_DEVICE_NODES)


def missing_cuda_devices(devices: str | tuple[str, ...], cuda_count: int) -> list[str]:
    """One line per `devices` entry that names a CUDA device this machine does not have."""
    entries = list(devices) if isinstance(devices, tuple) else [devices]
    problems = []
    for i, device in enumerate(entries):
        if not isinstance(device, str) or not re.fullmatch(r"cuda(:[0-9]+)?", device):
            continue  # not a CUDA device, or malformed (reported by validation)
        index = int(device.partition(":")[2] or 0)
        if index >= cuda_count:
            key = f"devices[{i}]" if isinstance(devices, tuple) else "devices"
            seen = f"only {cuda_count} CUDA device{'s' if cuda_count != 1 else ''} visible" if cuda_count else \
                "this machine has no CUDA device"
            problems.append(f"{key}: {device} requested, but {seen} (use devices: auto, or cpu)")
    return problems


def resolve_devices(
    devices: str | tuple[str, ...], cuda_count: int, cpu_count: int, adapter_count: int = 1, work: float = 0.0
) -> list[tuple[str, int | None]]:
    """Worker devices and their torch thread counts (None: default) for a `devices` value."""
    if isinstance(devices, tuple):
        return [(d if d != "cuda" else "cuda:0", None) for d in devices]
    if devices == "auto":
        if cuda_count:
            return [(f"cuda:{i}", None) for i in range(cuda_count)]
        if cpu_count >= 2 and adapter_count >= 2 and work >= AUTO_SPLIT_MIN_WORK:
            return [("cpu", cpu_count // 2)] * 2
        return [("cpu", None)]
    if devices.startswith("cpu:"):
        workers = int(devices.partition(":")[2])
        threads = max(1, cpu_count // workers)
        return [("cpu", threads)] * workers
    if devices == "cuda":
        return [("cuda:0", None)]
    return [(devices, None)]


def assign(adapters: list[AdapterSpec], spec: SweepSpec, workers: list[tuple[str, int | None]]) -> list[WorkerPlan]:
    """Split adapters over workers, balancing estimated cost; empty workers are dropped."""
    loads = [0.0] * len(workers)
    chosen: list[list[int]] = [[] for _ in workers]
    order = sorted(range(len(adapters)), key=lambda i: (-adapter_cost(adapters[i], spec), i))
    for i in order:
        w = min(range(len(workers)), key=lambda k: (loads[k], k))
        loads[w] += adapter_cost(adapters[i], spec)
        chosen[w].append(i)
    plans = []
    for (device, threads), indices in zip(workers, chosen, strict=True):
        if indices:
            plans.append(WorkerPlan(device, tuple(adapters[i] for i in sorted(indices)), threads, spec.max_concurrent))
    return plans


def visible_cuda_devices() -> int:
    """CUDA devices torch can use here; torch is imported only where a GPU device node exists."""
    # Without any GPU device node there is nothing torch could find, and not importing it
    # here (a second or two) lets the workers start that much sooner.
    if not gpu_device_nodes_present():
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
