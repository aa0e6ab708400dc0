"""User mistakes end in one line and exit 2 wherever they surface; stops, full disks and leftovers lose nothing.

Validate catches what it can know without a model (a base folder that does not exist, a CUDA
device on a machine without one, a data file that stops parsing, with its line); the run
catches the rest (a hub id that cannot be loaded, in the worker). SIGTERM stops like Ctrl-C.
A second mlora on the same run folder refuses. A failed state write keeps the previous
state and the run resumes; leftovers of a kill are removed; a corrupt state is one line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import builtin_tasks, micro_sweep, mlora, stop_mid_run, write_sweep

from mlora_cli.contract import result_path, state_path
from mlora_cli.files import exclusive_run_folder
from mlora_cli.run import launcher, signals, state
from mlora_cli.spec import load as spec_load

# Long enough to be stopped mid-task; saved every 5 steps.
SWEEP = micro_sweep(
    name="reliable",
    devices="cpu",
    tasks=builtin_tasks("copy", "sort", train_examples=24, eval_examples=4, min_len=5, max_len=5),
    adapter={"rank": 4, "target_modules": ["q_proj", "v_proj"]},
    train={"steps_per_task": 60, "checkpoint_every": 5},
    eval={"max_new_tokens": 6, "metrics": ["loss", "exact_match"]},
    sweep={"grid": {"adapter.lr": [1e-2, 3e-3]}},
)


def one_line(result: Any) -> str:
    """The one line a user error prints on stderr (stdout may hold the progress bars)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def only_run_in(folder: Path) -> Path:
    (run_dir,) = (folder / "runs").iterdir()
    return run_dir


# -- validate: what can be known without a model --------------------------------------------


def test_validate_catches_a_missing_base_folder_and_a_folder_that_is_no_model(tmp_path: Path) -> None:
    result = mlora("validate", write_sweep(tmp_path, SWEEP, base_model="./models/none"))
    assert result.exit_code == 2
    assert one_line(result) == "base_model: no such folder: ./models/none (a hub id looks like org/name)"
    (tmp_path / "empty").mkdir()
    result = mlora("validate", write_sweep(tmp_path, SWEEP, base_model=str(tmp_path / "empty")))
    assert one_line(result).endswith("has no config.json: not a transformers model folder")


def test_validate_catches_a_cuda_device_on_a_machine_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spec_load, "gpu_device_nodes_present", lambda: False)
    result = mlora("validate", write_sweep(tmp_path, SWEEP, devices=["cuda:0", "cpu"]))
    assert result.exit_code == 2
    assert one_line(result) == (
        "devices[0]: cuda:0 requested, but this machine has no CUDA device (use devices: auto, or cpu)")


def test_run_catches_a_cuda_device_that_is_not_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where GPU device nodes exist, validate cannot count GPUs without torch: the run does, before any worker."""
    monkeypatch.setattr(spec_load, "gpu_device_nodes_present", lambda: True)
    monkeypatch.setattr(launcher, "visible_cuda_devices", lambda: 1)
    result = mlora("run", write_sweep(tmp_path, SWEEP, devices=["cuda:0", "cuda:1"]))
    assert result.exit_code == 2
    assert one_line(result) == (
        "devices[1]: cuda:1 requested, but only 1 CUDA device visible (use devices: auto, or cpu)")
    assert not (tmp_path / "runs").exists()


def test_validate_names_the_line_where_a_data_file_stops_parsing(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": }\n')
    (tmp_path / "b.csv").write_text("prompt,completion\na,b\nc,d,e\n")
    (tmp_path / "c.jsonl").write_text('{"prompt": "a", "completion": "b"}\n["not", "an", "object"]\n')
    tasks = [{"name": n, "source": s} for n, s in (("a", "jsonl:a.jsonl"), ("b", "csv:b.csv"), ("c", "jsonl:c.jsonl"))]
    result = mlora("validate", write_sweep(tmp_path, SWEEP, tasks=tasks))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        "tasks[0].source: a.jsonl line 3: not valid JSON (Expecting value, column 31)",
        "tasks[1].source: b.csv line 3: 3 fields, the header has 2",
        "tasks[2].source: c.jsonl line 2: not a JSON object",
    ]


def test_validate_names_a_row_without_a_field_an_open_quote_and_a_header_alone(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c"}\n')
    (tmp_path / "b.csv").write_text('prompt,completion\na,b\n"c,d\ne,f\ng,h\n')
    (tmp_path / "c.csv").write_text("prompt,completion\n")
    tasks = [{"name": n, "source": s} for n, s in (("a", "jsonl:a.jsonl"), ("b", "csv:b.csv"), ("c", "csv:c.csv"))]
    tasks[2]["eval_source"] = "jsonl:a.jsonl"
    result = mlora("validate", write_sweep(tmp_path, SWEEP, tasks=tasks))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        "tasks[0].source: a.jsonl line 3: no 'completion' field",
        "tasks[1].source: b.csv line 3: 1 fields, the header has 2 (a quoted field runs from line 3 to 5: a quote "
        "left open?)",
        "tasks[2].source: c.csv has a header but no rows",
        "tasks[2].eval_source: a.jsonl line 3: no 'completion' field",
    ]


def test_a_hub_id_that_cannot_be_loaded_is_one_line_from_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it there too
    result = mlora("run", write_sweep(tmp_path, SWEEP, base_model="no-such-org/no-such-model"), "--no-plots")
    assert result.exit_code == 2
    assert one_line(result).startswith("base_model: cannot load 'no-such-org/no-such-model': ")


# -- stops, locks, failed writes, leftovers ---------------------------------------------------


def run_until_mid_task(tmp_path: Path, sweep: dict[str, Any], stop: signal.Signals) -> subprocess.CompletedProcess:
    """`mlora run` in a subprocess, sent `stop` once some adapter is a few steps into its first task."""
    def some_adapter_at_step_7() -> bool:
        metrics = list((tmp_path / "runs").glob("*/metrics.jsonl"))
        return bool(metrics) and any(json.loads(line)["step"] >= 7
                                     for line in metrics[0].read_text().splitlines()[:-1])

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return stop_mid_run(tmp_path, write_sweep(tmp_path, sweep), stop, some_adapter_at_step_7, env)


@pytest.mark.slow
@pytest.mark.parametrize("devices", ["cpu", "cpu:2"], ids=["in-process worker", "two worker processes"])
def test_sigterm_saves_state_between_steps_and_prints_the_resume_command(devices: str, tmp_path: Path) -> None:
    """What a scheduler or `timeout` sends: the run stops as on Ctrl-C, exit 143, and resumes to the end."""
    stopped = run_until_mid_task(tmp_path, {**SWEEP, "devices": devices}, signal.SIGTERM)
    run_dir = only_run_in(tmp_path)
    assert stopped.returncode == 143, stopped.stdout
    assert f"mlora run --resume {run_dir}" in stopped.stdout and "Traceback" not in stopped.stdout
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for name in ("lr1e-2", "lr3e-3"):
        steps = [r["step"] for r in logged if r["adapter"] == name]
        if not state_path(run_dir, name).is_file():  # its worker was still starting: nothing to save
            assert not steps, name
            continue
        saved = torch.load(state_path(run_dir, name), weights_only=False)
        assert saved["step"] == max(steps, default=0), name  # saved where it stopped

    result = mlora("run", "--resume", run_dir, "--no-plots")
    assert result.exit_code == 0, result.output
    results = json.loads((run_dir / "results.json").read_text())
    assert [entry["steps"] for entry in results["adapters"].values()] == [120, 120]


def test_a_sigterm_while_a_worker_process_starts_is_kept_for_its_loop_even_from_a_finalizer(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A spawned worker imports torch and loads the base for seconds. A SIGTERM then, even one whose handler runs
    inside a finalizer (`__del__`, where a raised exception is printed with a traceback and dropped), stops the
    worker's loop before its first step, quietly."""
    monkeypatch.setattr(signals, "_sigterm_while_starting", 0)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signals.defer_sigterm_while_starting()

        class SignalledWhileCollected:
            def __del__(self) -> None:
                os.kill(os.getpid(), signal.SIGTERM)

        SignalledWhileCollected()  # collected at once: the signal arrives inside its __del__
        worker = SimpleNamespace(interrupted=0)
        with signals.ctrl_c_between_steps(worker):
            assert worker.interrupted == signal.SIGTERM  # what the loop reads before its first step
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.slow
def test_a_second_mlora_on_the_same_run_folder_refuses(tmp_path: Path) -> None:
    short = {**SWEEP, "train": {**SWEEP["train"], "steps_per_task": 2}}
    assert mlora("run", write_sweep(tmp_path, short), "--no-plots").exit_code == 0
    run_dir = only_run_in(tmp_path)
    with exclusive_run_folder(run_dir):  # as a first `mlora run --resume` would hold it
        result = mlora("run", "--resume", run_dir, "--no-plots")
    assert result.exit_code == 2
    assert one_line(result) == (
        f"{run_dir}: in use by another mlora (pid {os.getpid()}); wait for it to end, or stop it "
        "(its state is saved) and resume then")
    assert mlora("run", "--resume", run_dir, "--no-plots").exit_code == 0  # free again


@pytest.mark.slow
def test_a_failed_state_write_keeps_the_previous_state_and_the_run_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save
    saves: list[Path] = []

    def disk_fills_up(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        saves.append(Path(path))
        if len(saves) > 6:  # the first states are written; then the disk is full
            Path(path).write_bytes(b"half a state")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(state.torch, "save", disk_fills_up)
    result = mlora("run", write_sweep(tmp_path, SWEEP), "--no-plots")
    monkeypatch.undo()
    run_dir = only_run_in(tmp_path)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert re.match(rf"cannot write {run_dir}/state/lr(1e-2|3e-3)\.pt: No space left on device; everything saved",
                    result.stderr), result.output
    assert f"mlora run --resume {run_dir}" in result.output
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]  # the half-written state is gone
    for name in ("lr1e-2", "lr3e-3"):
        torch.load(state_path(run_dir, name), weights_only=False)  # the previous states load whole

    result = mlora("run", "--resume", run_dir, "--no-plots")
    assert result.exit_code == 0, result.output
    assert [e["steps"] for e in json.loads((run_dir / "results.json").read_text())["adapters"].values()] == [120, 120]


@pytest.mark.slow
def test_resume_removes_leftovers_and_names_a_corrupt_state(tmp_path: Path) -> None:
    short = {**SWEEP, "train": {**SWEEP["train"], "steps_per_task": 6, "checkpoint_every": 2}}
    result = mlora("run", write_sweep(tmp_path, short), "--no-plots")
    assert result.exit_code == 0, result.output
    run_dir = only_run_in(tmp_path)
    # As a kill leaves them: an adapter that had not ended (its result gone, its state cut short)
    # and the temporary names of interrupted writes.
    result_path(run_dir, "lr1e-2").unlink()
    data = state_path(run_dir, "lr1e-2").read_bytes()
    state_path(run_dir, "lr1e-2").write_bytes(data[: len(data) // 2])
    (run_dir / "state" / ".lr1e-2.pt.tmp").write_bytes(b"partial")
    (run_dir / "adapters" / ".lr1e-2.x.tmp").mkdir()

    result = mlora("run", "--resume", run_dir, "--no-plots")

    assert result.exit_code == 2
    line = one_line(result)
    assert line.startswith(f"{state_path(run_dir, 'lr1e-2')}: cannot be read (")
    assert line.endswith("delete it to train lr1e-2 again from its last readable point")
    state_path(run_dir, "lr1e-2").unlink()  # as the line says
    result = mlora("run", "--resume", run_dir, "--no-plots")
    assert result.exit_code == 0, result.output
    assert not [p for p in run_dir.rglob(".*") if p.name.endswith((".tmp", ".old"))]

    (run_dir / "results.json").write_text('{"adapters": {')  # cut short
    result = mlora("eval", run_dir)
    assert result.exit_code == 2
    assert one_line(result).startswith(f"{run_dir / 'results.json'}: cannot be read (JSONDecodeError: ")


def test_a_max_seq_len_that_cuts_every_completion_fails_its_adapter_with_one_line(tmp_path: Path) -> None:
    """Prompts are cut to keep the completion, but at max_seq_len 1 nothing of it is left: that adapter fails with
    one line naming the task and the key (it trained on nothing, loss 0, before); its neighbour trains."""
    sweep = micro_sweep(tasks=builtin_tasks("copy", steps=2), sweep={"list": [
        {"name": "cut", "train.max_seq_len": 1}, {"name": "whole"}]})
    result = mlora("run", write_sweep(tmp_path, sweep), "--no-plots")
    assert result.exit_code == 1, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    adapters = json.loads((run_dir / "results.json").read_text())["adapters"]
    assert adapters["whole"]["status"] == "done"
    assert adapters["cut"]["failure"] == ("tasks[0]: no training example keeps a token of its completion within "
                                          "train.max_seq_len=1: raise it")

    # `mlora eval` has no checkpoint of it to evaluate, and says so rather than leaving it out silently.
    evaluated = mlora("eval", run_dir)
    assert evaluated.exit_code == 0, evaluated.output
    assert ("note cut: not evaluated, it saved no per-task checkpoint (its status in the run: failed)"
            in " ".join(evaluated.output.split())), evaluated.output
    (out_dir,) = (run_dir / "evals").iterdir()
    written = json.loads((out_dir / "results.json").read_text())
    assert list(written["adapters"]) == ["whole"] and written["run"]["not_evaluated"] == {"cut": "failed"}
