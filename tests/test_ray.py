"""`--backend ray`: workers as Ray actors on a local Ray (2 CPUs) write the same run folder,
on the driver, with the same results as local workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import builtin_tasks, micro_sweep, mlora, write_sweep

from mlora_cli.run.launcher import run_sweep
from mlora_cli.spec.load import parse_spec

# A local Ray cluster: the slow tier.
pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'mlora-sweep[ray]'")

SWEEP = micro_sweep(
    name="rayrun",
    tasks=builtin_tasks("copy"),
    adapter={"rank": 2, "alpha": 4},
    eval={"max_new_tokens": 4},
    sweep={"grid": {"adapter.rank": [2, 4]}},
)


@pytest.fixture()
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_workers_write_the_same_run_folder_on_the_driver(local_ray: None, tmp_path: Path) -> None:
    spec = parse_spec({**SWEEP, "devices": "cpu:2"})
    events = []
    outcome = run_sweep(spec, SWEEP, tmp_path, emit=events.append, output_base=tmp_path / "ray", plots=False,
                        backend="ray")
    assert len(outcome.results["run"]["workers"]) == 2
    torch.set_num_threads(1)
    try:
        local = run_sweep(parse_spec(SWEEP), SWEEP, tmp_path, output_base=tmp_path / "local", plots=False)
    finally:
        torch.set_num_threads(2)
    for name, entry in local.results["adapters"].items():
        ours = outcome.results["adapters"][name]
        assert ours["status"] == "done"
        assert ours["final_mean"]["loss"] == pytest.approx(entry["final_mean"]["loss"], rel=1e-4)
        for folder in ("adapters", "checkpoints"):
            files = sorted(p.relative_to(outcome.run_dir) for p in (outcome.run_dir / folder / name).rglob("*"))
            assert files == sorted(p.relative_to(local.run_dir) for p in (local.run_dir / folder / name).rglob("*"))
        assert (outcome.run_dir / "state" / f"{name}.result.json").is_file()
    lines = (outcome.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3 and {json.loads(line)["adapter"] for line in lines} == set(local.results["adapters"])
    assert sum(e["event"] == "worker_ready" for e in events) == 2


def test_an_address_with_no_ray_cluster_is_one_line(tmp_path: Path) -> None:
    result = mlora("run", write_sweep(tmp_path, SWEEP), "--backend", "ray", "--address", "bogus://x", "--no-plots")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--address bogus://x: cannot connect to a Ray cluster" in result.stderr
