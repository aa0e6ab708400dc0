"""Placement: device resolution and cost-balanced, deterministic assignment of adapters to workers."""

from __future__ import annotations

from typing import Any

import pytest

from mlora_cli.spec.plan import WorkerPlan, adapter_cost, assign, gpu_device_nodes_present, resolve_devices
from mlora_cli.spec.schema import SweepConfig, SweepSpec, TaskConfig
from mlora_cli.spec.sweep import AdapterSpec, expand


def make_spec(max_concurrent: int | None = None, **sweep: Any) -> SweepSpec:
    tasks = (TaskConfig(name="a", source="builtin:copy"), TaskConfig(name="b", source="builtin:sort"))
    return SweepSpec(name="t", tasks=tasks, sweep=SweepConfig(**sweep), max_concurrent=max_concurrent)


def ranked(*ranks: int, max_concurrent: int | None = None) -> tuple[SweepSpec, list[AdapterSpec]]:
    """A sweep of explicitly named adapters `n0, n1, ...` with the given ranks."""
    entries = tuple({"name": f"n{i}", "adapter.rank": rank} for i, rank in enumerate(ranks))
    spec = make_spec(max_concurrent, list=entries)
    return spec, expand(spec)


def names(plan: WorkerPlan) -> list[str]:
    return [a.name for a in plan.adapters]


# ---------------------------------------------------------------------------------------
# resolve_devices


@pytest.mark.parametrize(
    ("devices", "cuda_count", "cpu_count", "expected"),
    [
        ("auto", 0, 8, [("cpu", None)]),
        ("auto", 2, 8, [("cuda:0", None), ("cuda:1", None)]),
        ("cpu", 2, 8, [("cpu", None)]),
        ("cpu:4", 0, 16, [("cpu", 4)] * 4),
        ("cpu:3", 0, 16, [("cpu", 5)] * 3),
        ("cpu:8", 0, 4, [("cpu", 1)] * 8),  # more workers than cores: one thread each, never zero
        ("cuda", 2, 8, [("cuda:0", None)]),
        ("cuda:1", 2, 8, [("cuda:1", None)]),
        (("cuda:0", "cuda:1"), 0, 8, [("cuda:0", None), ("cuda:1", None)]),
        (("cuda",), 1, 8, [("cuda:0", None)]),
    ],
)
def test_resolve_devices(
    devices: str | tuple[str, ...], cuda_count: int, cpu_count: int, expected: list[tuple[str, int | None]]
) -> None:
    assert resolve_devices(devices, cuda_count, cpu_count) == expected


def test_auto_splits_long_cpu_sweeps_over_two_workers() -> None:
    assert resolve_devices("auto", 0, 2, adapter_count=8, work=400_000) == [("cpu", 1), ("cpu", 1)]
    assert resolve_devices("auto", 0, 2, adapter_count=8, work=5_000) == [("cpu", None)]  # not worth a second start
    assert resolve_devices("auto", 0, 2, adapter_count=1, work=400_000) == [("cpu", None)]
    assert resolve_devices("auto", 0, 1, adapter_count=8, work=400_000) == [("cpu", None)]
    assert resolve_devices("auto", 2, 8, adapter_count=8, work=400_000) == [("cuda:0", None), ("cuda:1", None)]


# ---------------------------------------------------------------------------------------
# adapter_cost and assign


def test_cost_grows_with_rank_batch_and_steps() -> None:
    spec = make_spec(
        list=({"adapter.rank": 4}, {"adapter.rank": 16}, {"train.batch_size": 16}, {"train.steps_per_task": 99})
    )
    small, high_rank, big_batch, long_run = (adapter_cost(a, spec) for a in expand(spec))
    base = adapter_cost(expand(make_spec())[0], spec)  # rank 8, batch 8, 50 steps per task
    assert small < base < high_rank
    assert base < big_batch and base < long_run


def test_one_worker_keeps_sweep_order() -> None:
    spec, adapters = ranked(4, 64, 8, 32)
    [plan] = assign(adapters, spec, [("cpu", None)])
    assert plan.adapters == tuple(adapters)
    assert (plan.device, plan.threads) == ("cpu", None)


def test_assign_balances_cost() -> None:
    # Costs are proportional to rank + 8: 72, 40, 24, 16, 16. Largest first onto the lighter
    # worker: cuda:0 gets n0 (72) then n4 (16) = 88; cuda:1 gets n1, n2, n3 = 80.
    spec, adapters = ranked(64, 32, 16, 8, 8)
    plans = assign(adapters, spec, [("cuda:0", None), ("cuda:1", None)])
    assert [(p.device, names(p)) for p in plans] == [("cuda:0", ["n0", "n4"]), ("cuda:1", ["n1", "n2", "n3"])]
    loads = [sum(adapter_cost(a, spec) for a in p.adapters) for p in plans]
    assert max(loads) - min(loads) <= max(adapter_cost(a, spec) for a in adapters)


def test_equal_adapters_split_evenly() -> None:
    spec = make_spec(grid={"adapter.lr": [1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3, 7e-3]})
    adapters = expand(spec)
    plans = assign(adapters, spec, resolve_devices("cpu:3", 0, 12))
    assert sorted(len(p.adapters) for p in plans) == [2, 2, 3]
    assert all(p.threads == 4 for p in plans)
    # Every adapter exactly once, and each worker keeps the sweep order.
    assert sorted(a.name for p in plans for a in p.adapters) == sorted(a.name for a in adapters)
    for plan in plans:
        positions = [adapters.index(a) for a in plan.adapters]
        assert positions == sorted(positions)


def test_assign_keeps_sweep_order_within_a_worker() -> None:
    spec, adapters = ranked(8, 64, 8, 32, 8, 16, 8)
    for plan in assign(adapters, spec, resolve_devices(("cuda:0", "cuda:1", "cuda:2"), 3, 8)):
        positions = [adapters.index(a) for a in plan.adapters]
        assert positions == sorted(positions), names(plan)


def test_assign_is_deterministic() -> None:
    spec, adapters = ranked(8, 8, 16, 16, 4, 32, 8)
    workers = resolve_devices("cpu:3", 0, 12)
    first = assign(adapters, spec, workers)
    assert all(assign(adapters, spec, workers) == first for _ in range(3))
    # The placement follows sweep order, not input identity: a rebuilt sweep places the same way.
    assert [names(p) for p in assign(expand(spec), spec, workers)] == [names(p) for p in first]


def test_empty_workers_are_dropped() -> None:
    spec, adapters = ranked(8, 16)
    plans = assign(adapters, spec, resolve_devices(("cuda:0", "cuda:1", "cuda:2", "cuda:3"), 4, 8))
    assert [(p.device, names(p)) for p in plans] == [("cuda:0", ["n1"]), ("cuda:1", ["n0"])]
    assert assign([], spec, [("cpu", None)]) == []


def test_max_concurrent_and_slots() -> None:
    spec, adapters = ranked(8, 8, 8, max_concurrent=2)
    [plan] = assign(adapters, spec, [("cpu", None)])
    assert (plan.max_concurrent, plan.slots) == (2, 2)
    spec, adapters = ranked(8, 8, max_concurrent=5)
    [plan] = assign(adapters, spec, [("cpu", None)])
    assert plan.slots == 2  # never more slots than adapters
    spec, adapters = ranked(8, 8, 8)
    [plan] = assign(adapters, spec, [("cpu", None)])
    assert (plan.max_concurrent, plan.slots) == (None, 3)


def test_workers_are_placed_without_importing_torch_when_there_is_no_gpu() -> None:
    """The driver starts the workers sooner when it does not import torch (a second or two) just
    to learn there is no GPU: without a GPU device node, placement must not import it."""
    import subprocess
    import sys
    from pathlib import Path


    if gpu_device_nodes_present():
        pytest.skip("a GPU device node exists here: placement asks torch how many GPUs")
    code = (
        "import sys; from pathlib import Path; from mlora_cli.spec.load import load_sweep; "
        "from mlora_cli.spec.sweep import expand; from mlora_cli.run.launcher import load_task_data, plan_workers; "
        "spec, _ = load_sweep(Path('sweeps/bench.yaml'), []); adapters = expand(spec); "
        "load_task_data(spec, adapters, Path('sweeps')); plans = plan_workers(spec, adapters); "
        "assert all(p.device == 'cpu' for p in plans); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_gpu_workers_see_the_parents_gpus_not_the_first_ones() -> None:
    """A worker for cuda:i sees the i-th GPU this process sees: a scheduler's "2,3" means physical GPUs 2 and 3."""
    from mlora_cli.run.launcher import visible_device_for

    assert [visible_device_for(i, None) for i in range(2)] == ["0", "1"]
    assert [visible_device_for(i, "2,3") for i in range(2)] == ["2", "3"]
    uuids = "GPU-8a1b0c3e-0000-0000-0000-000000000001, GPU-8a1b0c3e-0000-0000-0000-000000000002"
    assert visible_device_for(1, uuids) == "GPU-8a1b0c3e-0000-0000-0000-000000000002"
