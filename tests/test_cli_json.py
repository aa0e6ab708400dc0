"""A CLI that scripts well: `--json` documents alone on stdout, plain progress lines off a terminal, `--quiet`,
and typer's shell completion."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MINIMAL_SWEEP, REPO, micro_sweep, mlora, write_sweep
from typer.testing import CliRunner

from mlora_cli.cli import app

GRID = MINIMAL_SWEEP + "sweep:\n  grid: {adapter.rank: [4, 8]}\n"


def test_validate_json_is_one_document_with_the_adapters(tmp_path: Path) -> None:
    result = mlora("validate", write_sweep(tmp_path, GRID), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"ok": True, "adapters": 2, "tasks": 2, "names": ["r4", "r8"]}


def test_validate_json_on_a_bad_sweep_gives_every_problem_and_exit_2(tmp_path: Path) -> None:
    result = mlora("validate", write_sweep(tmp_path, MINIMAL_SWEEP + "adapter: {rank: 0, lrr: 1}\n"), "--json")
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert document["ok"] is False
    assert document["problems"] == ["adapter.lrr: unknown key (did you mean 'lr'?)", "adapter.rank: must be > 0"]


def test_dry_run_json_has_the_expanded_adapters_and_their_workers(tmp_path: Path) -> None:
    result = mlora("run", write_sweep(tmp_path, GRID), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert {"name", "base_model", "tasks", "adapters", "workers"} <= set(plan)
    assert [t["name"] for t in plan["tasks"]] == ["a", "b"]
    assert [a["name"] for a in plan["adapters"]] == ["r4", "r8"]
    for adapter in plan["adapters"]:
        assert {"seed", "varied", "worker", "task_steps", "adapter", "train"} <= set(adapter)
        assert adapter["adapter"]["rank"] == adapter["varied"]["adapter.rank"]
        assert adapter["name"] in plan["workers"][adapter["worker"]]["adapters"]
    assert {"device", "threads", "slots"} <= set(plan["workers"][0])


def test_run_json_without_dry_run_is_a_json_error(tmp_path: Path) -> None:
    result = mlora("run", write_sweep(tmp_path, GRID), "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["ok"] is False


def test_bench_json_prints_the_report_it_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The heavy call is patched out: the CLI must print what run_bench returns, and only that."""
    import mlora_cli.bench.bench as bench
    from mlora_cli.bench.processes import ModeFailed

    report = {"sweep": "t", "adapters": 1, "modes": {"concurrent": {"wall_seconds": 1.5}}, "fusion": {}}
    monkeypatch.setattr(bench, "run_bench", lambda *args, **kwargs: report)
    result = mlora("bench", write_sweep(tmp_path, MINIMAL_SWEEP), "--json", "--output", tmp_path / "bench")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == report

    def failing(*args: object, **kwargs: object) -> None:
        raise ModeFailed("python -m mlora_cli run ... failed; see concurrent.log")

    monkeypatch.setattr(bench, "run_bench", failing)
    result = mlora("bench", write_sweep(tmp_path, MINIMAL_SWEEP), "--json", "--output", tmp_path / "bench")
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"ok": False, "problems": ["python -m mlora_cli run ... failed; "
                                                                   "see concurrent.log"]}


def test_shell_completion_is_typers(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer.completion

    assert "--install-completion" in mlora("--help").output
    # typer's --show-completion is a flag that detects the shell running the process (sh under some CI runners and
    # background jobs, which it does not support): pin bash
    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    script = CliRunner().invoke(app, ["--show-completion"], prog_name="mlora")
    assert script.exit_code == 0 and "_MLORA_COMPLETE=complete_bash" in script.output
    # The entry point answers completion requests, under `python -m mlora_cli` too.
    env = {**os.environ, "_MLORA_COMPLETE": "complete_bash", "COMP_WORDS": "mlora exp", "COMP_CWORD": "1"}
    completed = subprocess.run([sys.executable, "-m", "mlora_cli"], env=env, cwd=REPO, capture_output=True,
                               text=True, timeout=60)
    assert completed.stdout.split() == ["export"], completed.stderr


# -- end-to-end: a micro run --------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("cli-json"), micro_sweep())  # one adapter, named default


@pytest.mark.slow
def test_run_off_a_terminal_prints_plain_lines_and_eval_json(micro: Path) -> None:
    result = mlora("run", micro, "--no-plots")  # CliRunner's stdout is no terminal
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stdout and "\x1b[" not in result.stdout, "redrawn or colored: a live view"
    lines = result.stdout.splitlines()
    progress = lines[:lines.index("default: done, 6 steps") + 1]  # then the tables
    assert not any("━" in line for line in progress), "a rich bar, not plain lines"
    assert re.fullmatch(r"run micro: 1 adapter, 1 worker, run folder .+", lines[0]), lines[0]
    run_dir = Path(lines[0].rpartition(" run folder ")[2])
    assert re.fullmatch(r"worker 0 cpu: base loaded in [0-9.]+ s", lines[1]), lines[1]
    steps = [line for line in lines if line.startswith("worker 0 cpu: ") and " steps (" in line]
    assert re.fullmatch(r"worker 0 cpu: 6/6 steps \(100%\), \d+:\d\d:\d\d elapsed, \d+:\d\d:\d\d left, loss [0-9.]+",
                        steps[-1]), steps
    assert [line.split(" steps")[0] for line in steps[-4:]] == [f"worker 0 cpu: {n}/6" for n in (2, 3, 5, 6)]
    ends = [line for line in lines if line.startswith("default: task ")]
    assert [line.split(";")[0] for line in ends] == ["default: task 1/2 copy done", "default: task 2/2 reverse done"]
    assert re.search(r"on copy: exact_match [0-9.]+% loss [0-9.]+ token_accuracy [0-9.]+%; mean over 2 tasks: ",
                     ends[0]), ends[0]

    evaluated = mlora("eval", run_dir, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    results = json.loads(evaluated.stdout)
    assert set(results) == {"adapters", "run"} and set(results["adapters"]) == {"default"}
    assert {"final", "final_mean", "matrix", "cl_metrics"} <= set(results["adapters"]["default"])
    written = json.loads((Path(results["run"]["output_dir"]) / "results.json").read_text())
    assert written["adapters"] == results["adapters"]


@pytest.mark.slow
def test_quiet_run_prints_only_the_summary(micro: Path) -> None:
    result = mlora("run", micro, "--no-plots", "--quiet")
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    assert re.fullmatch(r"micro: 1 adapter done, 0 failed, [0-9.]+ s wall, run folder .+", line), line
    assert (Path(line.rpartition(" run folder ")[2]) / "results.json").is_file()
