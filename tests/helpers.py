"""Plain values and functions shared by the test modules; fixtures live in conftest.py.

Imported as `from helpers import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from mlora_cli.cli import app

REPO = Path(__file__).resolve().parents[1]

# typer.testing.Result in typer >= 0.24 (typer vendors click), click.testing.Result before.
Result = Any

# The smallest valid sweep, as YAML text to append to: two builtin tasks, default adapter, one adapter.
MINIMAL_SWEEP = """\
name: t
tasks:
  - {name: a, source: "builtin:copy", train_examples: 16, eval_examples: 4}
  - {name: b, source: "builtin:reverse", train_examples: 16, eval_examples: 4}
"""


def builtin_tasks(*names: str, train_examples: int = 16, eval_examples: int = 4, **fields: Any) -> list[dict[str, Any]]:
    """One task per name on `builtin:<name>`, each with the same sizes and `fields`."""
    return [
        {"name": name, "source": f"builtin:{name}", "train_examples": train_examples, "eval_examples": eval_examples,
         **fields}
        for name in names
    ]


# What the micro sweeps of the slow tests share: builtin:micro, two small builtin tasks, a short
# training. No eval or sweep section: each test states its own.
MICRO_SWEEP: dict[str, Any] = {
    "name": "micro",
    "base_model": "builtin:micro",
    "tasks": builtin_tasks("copy", "reverse"),
    "adapter": {"alpha": 8, "lr": 1e-2},
    "train": {"steps_per_task": 3, "batch_size": 2, "max_seq_len": 24},
}


def micro_sweep(**changes: Any) -> dict[str, Any]:
    """A fresh copy of MICRO_SWEEP with top-level `changes`: a mapping is merged into the section of
    that name (`train={"steps_per_task": 4}` keeps the other train keys), anything else replaces it."""
    sweep = copy.deepcopy(MICRO_SWEEP)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(sweep.get(key), dict):
            sweep[key] = {**sweep[key], **value}
        else:
            sweep[key] = value
    return sweep


def write_sweep(folder: Path, sweep: str | dict[str, Any], /, **changes: Any) -> Path:
    """Write `folder/sweep.yaml` and return its path: YAML text as it is, or a dict with top-level
    `changes` (any key replaced whole, `sweep` too) whose runs go under `folder/runs` unless it
    names its own output_dir."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    if isinstance(sweep, str):
        assert not changes, "changes apply to a dict sweep only"
        path.write_text(sweep)
    else:
        data = {**sweep, **changes}
        data.setdefault("output_dir", str(folder / "runs"))
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def mlora(*args: str | Path, columns: int | None = None) -> Result:
    """`mlora ARGS...` in-process; `columns`: the terminal width rich sees (None: left to the environment)."""
    return CliRunner().invoke(app, [str(a) for a in args], env=None if columns is None else {"COLUMNS": str(columns)})


def run_cli(folder: Path, sweep: dict[str, Any], *args: str, columns: int | None = None) -> tuple[Result, Path, dict]:
    """`mlora run` of `sweep` written into `folder` (runs under folder/runs), checked to exit 0: the result, the one
    run folder and its results.json."""
    result = mlora("run", write_sweep(folder, sweep), *args, columns=columns)
    assert result.exit_code == 0, result.output
    (run_dir,) = (folder / "runs").iterdir()
    return result, run_dir, json.loads((run_dir / "results.json").read_text())


def engine_with_trained_b(targets: tuple[str, ...], adapter: Any, slots: int, nonzero: int) -> tuple[Any, Any, Any]:
    """builtin:micro in eval mode under an engine of `slots` slots of `adapter`, the first `nonzero` of them with a
    different random B each (so the LoRA term is really tested); the engine, an untouched copy of the base (for a
    PEFT reference) and the tokenizer."""
    import torch

    from mlora_cli.model.base import build_builtin
    from mlora_cli.model.engine import MultiLoraModel

    model, tokenizer = build_builtin("builtin:micro")
    model.eval()
    reference = copy.deepcopy(model)
    engine = MultiLoraModel(model, targets, slots, adapter.rank)
    for slot in range(slots):
        engine.load_slot(slot, adapter, 1.0, seed=slot)
        if slot < nonzero:
            with torch.no_grad():
                for layer in engine.layers.values():
                    layer.lora_B[slot].normal_(0, 0.5, generator=torch.Generator().manual_seed(10 + slot))
    return engine, reference, tokenizer


def numbers(value: Any, path: str = "") -> dict[str, float]:
    """Every number in a nested JSON value, keyed by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in numbers(item, f"{path}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in numbers(item, f"{path}[{i}]").items()}
    if isinstance(value, bool) or not isinstance(value, int | float):
        return {}
    return {path: value}


def stop_mid_run(folder: Path, sweep: Path, stop: int, ready: Callable[[], bool], env: dict[str, str] | None = None,
                 log_name: str = "run.log") -> subprocess.CompletedProcess:
    """`mlora run SWEEP` in a subprocess (cwd `folder`), sent `stop` once `ready()`; its exit code and output."""
    log_path = folder / log_name
    log = log_path.open("w")
    process = subprocess.Popen([sys.executable, "-m", "mlora_cli", "run", str(sweep), "--no-plots"], cwd=folder,
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not ready():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the run did not get there in time"
            time.sleep(0.01)
        process.send_signal(stop)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    return subprocess.CompletedProcess(process.args, process.returncode, log_path.read_text())


def kill_worker_zero_at(monkeypatch: Any, when: Callable[[dict[str, Any]], bool]) -> list[int]:
    """SIGKILL the worker process `mlora-worker-0` at the first event its launcher records for which `when` holds;
    the returned list gets its pid then."""
    from mlora_cli.run import launcher

    real_run_worker_processes, killed = launcher.run_worker_processes, []

    def run_and_kill(plans: Any, spec: Any, task_data: Any, run_dir: Path, record: Any, *args: Any) -> Any:
        def record_and_kill(event: dict[str, Any]) -> None:
            record(event)
            if when(event) and not killed:
                (child,) = [p for p in multiprocessing.active_children() if p.name == "mlora-worker-0"]
                os.kill(child.pid, signal.SIGKILL)
                killed.append(child.pid)

        return real_run_worker_processes(plans, spec, task_data, run_dir, record_and_kill, *args)

    monkeypatch.setattr(launcher, "run_worker_processes", run_and_kill)
    return killed
