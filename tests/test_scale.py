"""Scaling a sweep out never changes an adapter's results: a failing neighbour, fewer slots
than adapters (slots refilled from the queue), or two worker processes instead of one all give
every other adapter the same metrics, matrices and saved weights as one worker training them
all at once. A worker process that dies fails only its own adapters; one whose `mlora run`
dies stops too.

Same within rounding, not bitwise: an adapter's rows in a different fused batch go through
matmuls of another shape. Everything runs on one torch thread so that rounding is stable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import builtin_tasks, kill_worker_zero_at, micro_sweep, mlora, numbers, write_sweep
from safetensors.torch import load_file

import mlora_cli
from mlora_cli.eval import evaluate as evaluate_module
from mlora_cli.run import launcher
from mlora_cli.spec.load import load_sweep

RTOL, ATOL = 1e-5, 1e-7

# Five adapters that end at different steps (so slots free up at different times), with the
# stateful strategies among them (so a refilled slot must start clean).
ADAPTERS = [
    {"name": "olora", "adapter.strategy": "olora", "train.steps_per_task": 2},
    {"name": "ewc", "adapter.strategy": "ewc", "adapter.fisher_samples": 4, "train.steps_per_task": 5},
    {"name": "lwf", "adapter.strategy": "lwf", "train.steps_per_task": 3},
    {"name": "r2-bs3", "adapter.rank": 2, "train.batch_size": 3, "train.steps_per_task": 6},
    {"name": "replay", "adapter.strategy": "replay", "adapter.buffer_size": 4, "train.steps_per_task": 4},
]
SWEEP = micro_sweep(
    name="scale",
    seed=5,
    devices="cpu",
    tasks=builtin_tasks("copy", "sort", train_examples=24, eval_examples=6),
    adapter={"rank": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    eval={"max_new_tokens": 6, "metrics": ["loss", "token_accuracy", "exact_match"]},
    sweep={"list": ADAPTERS},
)


# Whole runs over worker processes: the slow tier.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def run(folder: Path, **changes: Any) -> tuple[launcher.RunOutcome, list[dict[str, Any]]]:
    """What `mlora run --no-plots` does, keeping every event the workers sent."""
    path = write_sweep(folder, SWEEP, **changes)
    spec, resolved = load_sweep(path)
    events: list[dict[str, Any]] = []
    outcome = launcher.run_sweep(spec, resolved, path.parent, emit=events.append, plots=False)
    return outcome, events


def assert_same_adapter(run_dir: Path, entry: dict[str, Any], reference_dir: Path, reference: dict[str, Any]) -> None:
    """Same status, steps, tokens, final scores, matrices, eval curve and saved PEFT weights."""
    name = entry["name"]
    assert entry["status"] == reference["status"] == "done", (name, entry["failure"])
    assert (entry["steps"], entry["train_tokens"]) == (reference["steps"], reference["train_tokens"]), name
    for key in ("final", "final_mean", "matrix", "cl_metrics", "curve"):
        got, expected = numbers(entry[key]), numbers(reference[key])
        assert got.keys() == expected.keys(), (name, key)
        for path, value in expected.items():
            assert got[path] == pytest.approx(value, rel=RTOL, abs=ATOL), f"{name} {key}{path}"
    weights = load_file(run_dir / "adapters" / name / "adapter_model.safetensors")
    expected_weights = load_file(reference_dir / "adapters" / name / "adapter_model.safetensors")
    assert weights.keys() == expected_weights.keys()
    for key, tensor in expected_weights.items():
        # Relative to the whole tensor, not per element: AdamW divides by sqrt(v) + eps, so a weight
        # whose gradient is ~eps moves by a few lr-scaled ulps more or less when that gradient's rounding does.
        assert (weights[key] - tensor).norm() <= RTOL * tensor.norm() + ATOL, (name, key)


def files_in(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[launcher.RunOutcome, list[dict[str, Any]]]:
    """The sweep on one in-process worker, all five adapters at once."""
    return run(tmp_path_factory.mktemp("reference"))


def test_a_failing_adapter_leaves_the_others_unchanged(reference: Any, tmp_path: Path) -> None:
    # lr 1e38: B steps to ~1e38 at once and its output overflows; at 1e4 the residual stream saturates
    # RMSNorm to uniform logits instead (finite loss, no gradient), which is no test of the failure path.
    explodes = {"name": "explodes", "adapter.lr": 1e38}  # the loss or gradient turns non-finite
    capped = {"name": "capped", "train.grad_norm_limit": 1e-3}  # above train.grad_norm_limit at once
    entries = [ADAPTERS[0], explodes, *ADAPTERS[1:3], capped, *ADAPTERS[3:]]
    sweep = write_sweep(tmp_path, SWEEP, sweep={"list": entries})

    result = mlora("run", sweep, "--no-plots")

    assert result.exit_code == 1, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["run"]["failed"] == ["capped", "explodes"]
    assert "non-finite loss or gradient" in results["adapters"]["explodes"]["failure"]
    assert "train.grad_norm_limit=0.001 at step 1" in results["adapters"]["capped"]["failure"]
    for name in ("explodes", "capped"):
        entry = results["adapters"][name]
        assert entry["status"] == "failed" and entry["final"] == {} and 0 < entry["steps"] < 6
        assert not (run_dir / "adapters" / name).exists()  # no final adapter for a failed run
        assert json.loads((run_dir / "state" / f"{name}.result.json").read_text())["status"] == "failed"
    assert list(results["adapters"]) == [e["name"] for e in entries]
    outcome, _ = reference
    for name, expected in outcome.results["adapters"].items():
        assert_same_adapter(run_dir, results["adapters"][name], outcome.run_dir, expected)


def test_slots_refilled_from_the_queue_give_the_same_results(
    reference: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_passes: list[str] = []  # the task of every pass scoring the base alone
    score_task = evaluate_module._score_task

    def counted(engine: Any, slots: Any, groups: Any, config: Any, tokenizer: Any, task: Any) -> Any:
        if slots is None:
            base_passes.append(task.name)
        return score_task(engine, slots, groups, config, tokenizer, task)

    monkeypatch.setattr(evaluate_module, "_score_task", counted)
    outcome, events = run(tmp_path, max_concurrent=2)

    assert [e["event"] for e in events].count("worker_ready") == 1  # the base was loaded once ...
    assert base_passes == ["copy", "sort"]  # ... and evaluated once: the refills' rows before training kept it
    steps = [[r["adapter"] for r in e["records"]] for e in events if e["event"] == "step"]
    assert max(len(s) for s in steps) == 2  # never more than two adapters in a fused step ...
    assert {a for s in steps for a in s} == {a["name"] for a in ADAPTERS}  # ... yet all five trained
    reference_outcome, reference_events = reference
    assert len(next(e for e in reference_events if e["event"] == "step")["records"]) == 5
    for name, expected in reference_outcome.results["adapters"].items():
        assert_same_adapter(outcome.run_dir, outcome.results["adapters"][name], reference_outcome.run_dir, expected)


def test_two_worker_processes_give_the_same_results_and_run_folder(
    reference: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cpu:2 splits the CPUs: with 2 of them, one torch thread per worker, as in the reference.
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    # Experiment times count from the launcher's start, here 1000 s ago, in the worker processes too.
    monkeypatch.setattr(mlora_cli, "PROCESS_START", time.perf_counter() - 1000)
    outcome, events = run(tmp_path, devices="cpu:2")
    ended = time.perf_counter() - mlora_cli.PROCESS_START
    assert all(1000 < e["finished_after_s"] < ended for e in outcome.results["adapters"].values())

    workers = outcome.results["run"]["workers"]
    assert [(w["device"], w["threads"]) for w in workers] == [("cpu", 1), ("cpu", 1)]
    assert sorted(a for w in workers for a in w["adapters"]) == sorted(a["name"] for a in ADAPTERS)
    assert all(w["adapters"] for w in workers)
    assert sorted(e["worker"] for e in events if e["event"] == "worker_ready") == [0, 1]
    reference_outcome, _ = reference
    assert files_in(outcome.run_dir) == files_in(reference_outcome.run_dir)
    for name, expected in reference_outcome.results["adapters"].items():
        assert_same_adapter(outcome.run_dir, outcome.results["adapters"][name], reference_outcome.run_dir, expected)
    lines = [json.loads(line) for line in (outcome.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["adapter"], r["step"]) for r in lines) == sorted(
        (a["name"], step) for a in ADAPTERS for step in range(1, 2 * a["train.steps_per_task"] + 1))


def test_a_dead_worker_fails_only_its_own_adapters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker process is SIGKILLed once its first adapter is done, while it trains the second."""
    killed = kill_worker_zero_at(monkeypatch, lambda event: event["event"] == "adapter_done")
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # one torch thread: a second one only waits on a busy machine
    sweep = write_sweep(tmp_path, SWEEP, devices="cpu:1", max_concurrent=1, sweep={"list": [
        {"name": "short", "train.steps_per_task": 1},
        {"name": "long", "train.steps_per_task": 200},  # still training when the kill comes
    ]})

    result = mlora("run", sweep, "--no-plots")

    assert killed and result.exit_code == 1, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["adapters"]["short"]["status"] == "done" and results["adapters"]["short"]["final"]
    assert (run_dir / "adapters" / "short" / "adapter_model.safetensors").is_file()
    long = results["adapters"]["long"]
    assert long["status"] == "failed"
    assert long["failure"] == f"worker 0 (cpu) died with exit code {-signal.SIGKILL}"
    assert results["run"]["failed"] == ["long"]
    assert (run_dir / "forgetting.csv").is_file()


def test_dropout_masks_do_not_depend_on_the_neighbours(tmp_path: Path) -> None:
    dropout = {"name": "dropout", "adapter.dropout": 0.1}
    alone, _ = run(tmp_path / "alone", sweep={"list": [dropout]})
    # A neighbour with 8 rows a step: the longest row of a fused step is often one of its rows.
    together, _ = run(tmp_path / "together", sweep={"list": [dropout, {"name": "wide", "train.batch_size": 8}]})

    assert_same_adapter(together.run_dir, together.results["adapters"]["dropout"], alone.run_dir,
                        alone.results["adapters"]["dropout"])


def spawned_workers_of(pid: int) -> list[int]:
    """The multiprocessing-spawned children of process `pid`, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rpartition(")")[2].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        if parent == pid and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return found


def has_ended(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")  # a zombie has ended; reaping it is the business of its new parent


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc")
def test_a_worker_stops_when_mlora_is_killed(tmp_path: Path) -> None:
    """A killed `mlora run` leaves no worker behind, training on into the run folder."""
    sweep = write_sweep(tmp_path, SWEEP, devices="cpu:1",
                        sweep={"list": [{"name": "endless", "train.steps_per_task": 100_000}]})
    process = subprocess.Popen([sys.executable, "-m", "mlora_cli", "run", str(sweep), "--no-plots"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("runs/*/base.json")):  # written once the worker has loaded the base
            assert process.poll() is None and time.monotonic() < deadline, "the worker never got ready"
            time.sleep(0.05)
        (worker_pid,) = spawned_workers_of(process.pid)
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not has_ended(worker_pid):
            if time.monotonic() > deadline:
                os.kill(worker_pid, signal.SIGKILL)
                pytest.fail("the worker outlived mlora by 30 s")
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
