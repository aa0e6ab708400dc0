"""`mlora run --resume`: a run killed mid-task (SIGKILL: no chance to save anything) and
continued ends exactly as if never stopped, for every strategy's state and dropout; resuming
a finished run changes and trains nothing; a folder that is not a run is a one-line error;
state files are written whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import builtin_tasks, micro_sweep, mlora, numbers, stop_mid_run, write_sweep
from safetensors.torch import load_file

from mlora_cli.eval import base_rows
from mlora_cli.run import worker

RTOL, ATOL = 1e-5, 1e-7
STEPS_PER_TASK = 12

# Every strategy that carries state from task to task (replay buffer and RNG, EWC Fisher and
# anchor, LwF teacher, O-LoRA's frozen blocks, L2 anchor) and a dropout RNG, checkpointed every
# 3 steps and evaluated mid-task every 4. Every example of both tasks has the same length (5
# letters, 4-letter prefixes): a fused step's padded length then never depends on which
# adapters share it, which dropout masks do depend on (see test_scale's xfail).
SWEEP = micro_sweep(
    name="resume",
    seed=7,
    devices="cpu",
    tasks=builtin_tasks("copy", "sort", train_examples=24, eval_examples=6, min_len=5, max_len=5),
    adapter={"rank": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    train={"steps_per_task": STEPS_PER_TASK, "checkpoint_every": 3},
    eval={"max_new_tokens": 6, "metrics": ["loss", "token_accuracy", "exact_match"], "every_steps": 4},
    sweep={"list": [
        {"name": "replay", "adapter.strategy": "replay", "adapter.buffer_size": 4, "adapter.replay_ratio": 0.5},
        {"name": "ewc", "adapter.strategy": "ewc", "adapter.fisher_samples": 4},
        {"name": "lwf", "adapter.strategy": "lwf"},
        {"name": "olora", "adapter.strategy": "olora"},
        {"name": "l2", "adapter.strategy": "l2"},
        {"name": "dropout", "adapter.dropout": 0.2},
    ]},
)
NAMES = [entry["name"] for entry in SWEEP["sweep"]["list"]]


# Whole runs killed and resumed in subprocesses: the slow tier.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def only_run_in(folder: Path) -> Path:
    (run_dir,) = (folder / "runs").iterdir()
    return run_dir


def metric_lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(folder: Path, reference_folder: Path) -> None:
    """The same PEFT weights, within rounding relative to each whole tensor (see test_scale)."""
    weights = load_file(folder / "adapter_model.safetensors")
    expected = load_file(reference_folder / "adapter_model.safetensors")
    assert weights.keys() == expected.keys()
    for key, tensor in expected.items():
        assert (weights[key] - tensor).norm() <= RTOL * tensor.norm() + ATOL, (folder, key)


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    """Every adapter: status, steps, tokens, final scores, matrices, curve, final and per-task weights."""
    results = json.loads((run_dir / "results.json").read_text())["adapters"]
    reference = json.loads((reference_dir / "results.json").read_text())["adapters"]
    assert list(results) == list(reference) == NAMES
    for name, expected in reference.items():
        entry = results[name]
        assert entry["status"] == expected["status"] == "done", (name, entry["failure"])
        assert (entry["steps"], entry["train_tokens"]) == (expected["steps"], expected["train_tokens"]), name
        for key in ("final", "matrix", "cl_metrics", "curve"):
            got, want = numbers(entry[key]), numbers(expected[key])
            assert got.keys() == want.keys(), (name, key)
            for path, value in want.items():
                assert got[path] == pytest.approx(value, rel=RTOL, abs=ATOL), f"{name} {key}{path}"
        assert_same_weights(run_dir / "adapters" / name, reference_dir / "adapters" / name)
        for task in (1, 2):
            checkpoint = Path("checkpoints") / name / f"after-task-{task}"
            assert_same_weights(run_dir / checkpoint, reference_dir / checkpoint)


def partial_writes(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if ".tmp" in p.name]


def lines_so_far(folder: Path) -> list[dict[str, Any]]:
    """metrics.jsonl of the one run in `folder` as far as it is written (a torn last line skipped)."""
    records = []
    for path in folder.glob("runs/*/metrics.jsonl"):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep run once, uninterrupted."""
    folder = tmp_path_factory.mktemp("reference")
    result = mlora("run", write_sweep(folder, SWEEP), "--no-plots")
    assert result.exit_code == 0, result.output
    return only_run_in(folder)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["SIGKILL", "Ctrl-C", "SIGTERM"])
def test_a_run_stopped_mid_task_resumes_to_the_same_results(
    stop: signal.Signals, reference: Path, tmp_path: Path
) -> None:
    """SIGKILL: resumed from the periodic states. Ctrl-C and SIGTERM: every adapter saved where it stopped."""
    # The same single thread as the reference, so that rounding agrees.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    stopped = stop_mid_run(tmp_path, write_sweep(tmp_path, SWEEP), stop, env=env, log_name="killed.log",
                           ready=lambda: any(r["task_index"] == 0 and r["step"] >= 4 for r in lines_so_far(tmp_path)))
    output = (tmp_path / "killed.log").read_text()
    run_dir = only_run_in(tmp_path)
    assert not (run_dir / "results.json").exists(), output  # it did not get to the end
    states = {name: torch.load(worker.state_path(run_dir, name), weights_only=False) for name in NAMES}
    assert any(state["step_in_task"] > 0 for state in states.values()), (
        "stopped with no adapter saved mid-task: the test ran too slowly to test that")
    if stop in (signal.SIGINT, signal.SIGTERM):
        assert stopped.returncode == 128 + stop and f"mlora run --resume {run_dir}" in output, output
        logged = metric_lines(run_dir)
        for name, state in states.items():
            assert state["step"] == max(r["step"] for r in logged if r["adapter"] == name), name

    result = mlora("run", "--resume", run_dir, "--no-plots")

    assert result.exit_code == 0, result.output
    assert_same_run(run_dir, reference)
    lines = metric_lines(run_dir)
    counts = Counter((r["adapter"], r["step"]) for r in lines)
    expected_steps = {(name, step) for name in NAMES for step in range(1, 2 * STEPS_PER_TASK + 1)}
    assert set(counts) == expected_steps and set(counts.values()) == {1}  # none missing, none twice
    reference_loss = {(r["adapter"], r["step"]): r["loss"] for r in metric_lines(reference)}
    for record in lines:
        assert record["loss"] == pytest.approx(reference_loss[record["adapter"], record["step"]], rel=RTOL)
    assert partial_writes(run_dir) == []


def test_ctrl_c_during_a_task_end_saves_a_state_that_resumes_exactly(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C typed while EWC estimates its Fisher, between the task's evaluation and the strategies'
    bookkeeping: the run stops after that task end, not in the middle of it."""
    real_squared_gradients = worker.squared_gradients
    interrupted = []

    def ctrl_c_meanwhile(*args: Any) -> list[torch.Tensor]:
        if not interrupted:
            interrupted.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return real_squared_gradients(*args)

    with monkeypatch.context() as patch:
        patch.setattr(worker, "squared_gradients", ctrl_c_meanwhile)
        result = mlora("run", write_sweep(tmp_path, SWEEP), "--no-plots")
    assert interrupted and result.exit_code == 130, result.output
    run_dir = only_run_in(tmp_path)
    assert {r["task_index"] for r in metric_lines(run_dir)} == {0}

    result = mlora("run", "--resume", run_dir, "--no-plots")

    assert result.exit_code == 0, result.output
    assert_same_run(run_dir, reference)


def test_a_saved_state_that_does_not_fit_fails_that_adapter_only(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state file written for another layout (here: an older mlora's padded B) is one clear
    failure of its adapter on resume; the others resume and end as if never stopped."""
    real_squared_gradients = worker.squared_gradients

    def ctrl_c_once(*args: Any) -> list[torch.Tensor]:
        os.kill(os.getpid(), signal.SIGINT)
        return real_squared_gradients(*args)

    with monkeypatch.context() as patch:
        patch.setattr(worker, "squared_gradients", ctrl_c_once)
        result = mlora("run", write_sweep(tmp_path, SWEEP), "--no-plots")
    assert result.exit_code == 130, result.output
    run_dir = only_run_in(tmp_path)
    saved = worker.state_path(run_dir, "replay")
    state = torch.load(saved, weights_only=False)
    rank = state["slot"]["rank"]
    state["slot"]["lora_B"] = [b.view(-1, rank) for b in state["slot"]["lora_B"]]  # (d_out, r_max)
    torch.save(state, saved)

    result = mlora("run", "--resume", run_dir, "--no-plots")

    assert result.exit_code == 1, result.output  # a run with a failed adapter
    assert "Traceback" not in result.output
    results = json.loads((run_dir / "results.json").read_text())["adapters"]
    assert results["replay"]["status"] == "failed"
    assert results["replay"]["failure"] == (f"resume: {saved}: the saved training state does not fit this engine "
                                            "(another model, maximum rank, or an older mlora's layout)")
    for name in NAMES[1:]:
        assert results[name]["status"] == "done", (name, results[name]["failure"])
        assert_same_weights(run_dir / "adapters" / name, reference / "adapters" / name)


def test_resuming_a_finished_run_changes_and_trains_nothing(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / reference.name
    shutil.copytree(reference, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished run was trained or evaluated again")

    monkeypatch.setattr(worker, "fused_step", must_not_run)
    monkeypatch.setattr(base_rows, "evaluate", must_not_run)  # the worker's evaluations go through it
    result = mlora("run", "--resume", run_dir, "--no-plots")

    assert result.exit_code == 0, result.output
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()
    results = run_dir / "results.json"  # rewritten: its `run` part holds this call's wall time
    assert [p for p in before if before[p] != after[p]] in ([], [results])
    assert json.loads(after[results])["adapters"] == json.loads(before[results])["adapters"]


def test_resume_rejects_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "some-folder").mkdir()
    (tmp_path / "some-folder" / "notes.txt").write_text("not a run")

    for folder in (tmp_path / "some-folder", tmp_path / "missing"):
        result = mlora("run", "--resume", folder)

        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and str(folder) in lines[0], lines
        assert "Traceback" not in result.output


def test_resume_takes_no_sweep_file_and_no_overrides(reference: Path, tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, SWEEP)
    for args in (["run", sweep, "--resume", reference], ["run", "--resume", reference, "train.lr=1e-3"], ["run"]):
        result = mlora(*args)

        assert result.exit_code == 2, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "runs").exists()


def test_state_files_are_written_whole_then_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """... and never ahead of metrics.jsonl: a kill right after a save loses no metrics line."""
    real_save = torch.save
    saved_to: list[Path] = []

    def watched_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        path = Path(f)
        saved_to.append(path)
        name = path.name.removeprefix(".").removesuffix(".pt.tmp")
        logged = metric_lines(path.parents[1]) if obj["step"] else []
        assert sorted(r["step"] for r in logged if r["adapter"] == name) == list(range(1, obj["step"] + 1))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", watched_save)
    small = {"list": [{"name": "ewc", "adapter.strategy": "ewc", "adapter.fisher_samples": 2}, {"name": "naive"}]}
    train = {**SWEEP["train"], "steps_per_task": 2, "checkpoint_every": 1}
    sweep = write_sweep(tmp_path, SWEEP, sweep=small, train=train)

    result = mlora("run", sweep, "--no-plots")

    assert result.exit_code == 0, result.output
    run_dir = only_run_in(tmp_path)
    state = run_dir / "state"
    # step 0, 1 (every step), 2 (task end), 3, and 4 ends the run (its result is saved instead)
    assert sorted(p.name for p in saved_to) == sorted([".ewc.pt.tmp", ".naive.pt.tmp"] * 4)
    assert {p.parent for p in saved_to} == {state}
    assert sorted(p.name for p in state.iterdir()) == ["ewc.pt", "ewc.result.json", "naive.pt", "naive.result.json"]
    for name in ("ewc", "naive"):
        assert torch.load(state / f"{name}.pt", weights_only=False)["step"] == 3
    assert partial_writes(run_dir) == []
