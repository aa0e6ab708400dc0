"""Rewards: the builtins, user functions by module or file, the `reward` metric in the matrix,
and a reward that fails stopping only the adapter it scored."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from helpers import builtin_tasks, micro_sweep, mlora, numbers, write_sweep

from mlora_cli.errors import ConfigError
from mlora_cli.train.rewards import char_accuracy, exact_match, last_number, load_reward, prefix_match, score

REFS = ["abc", "abc", "abcd", "the answer is 1,234", "x"]
OUTS = [" abc ", "abd", "ab", "so 1234", "no number"]


def test_builtin_rewards() -> None:
    prompts = [""] * len(REFS)
    assert exact_match(prompts, OUTS, REFS) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert prefix_match(prompts, OUTS, REFS) == [1.0, 2 / 3, 0.5, 0.0, 0.0]
    assert char_accuracy(prompts, OUTS, REFS) == [1.0, 2 / 3, 0.5, 0.0, 0.0]
    assert last_number(prompts, ["so 1234", "42 then 7", "none"], ["1,234", "7", "3"]) == [1.0, 1.0, 0.0]


def test_user_rewards_by_file_and_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_reward.py").write_text("def length(prompts, completions, references, **fields):\n"
                                           "    return [len(c) / 10 for c in completions]\n")
    by_file = load_reward("python:./my_reward.py:length", tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = load_reward("python:my_reward:length")
    for reward in (by_file, by_module):
        assert score(reward, ["p", "q"], ["abcde", ""], ["r", "s"], "t") == [0.5, 0.0]


@pytest.mark.parametrize(("spec", "problem"), [
    ("exactmatch", "reward: expected one of exact_match, prefix_match, char_accuracy, last_number, "
                   "python:MODULE:FUNCTION or python:PATH.py:FUNCTION, got 'exactmatch'"),
    ("python:./missing.py:f", "reward: no such file: ./missing.py"),
    ("python:json:no_such_function", "reward: json has no function 'no_such_function'"),
    ("python:no_such_module_xyz:f", "reward: cannot import no_such_module_xyz: ModuleNotFoundError: "
                                    "No module named 'no_such_module_xyz'"),
])
def test_a_reward_that_cannot_be_found_is_one_line(spec: str, problem: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_reward(spec, tmp_path)
    assert error.value.problems == [problem]


def test_score_checks_what_a_reward_returns() -> None:
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        score(lambda *a, **k: [1.0], ["", ""], ["a", "b"], ["a", "b"], "t")
    with pytest.raises(ValueError, match="not finite"):
        score(lambda *a, **k: [1.0, float("nan")], ["", ""], ["a", "b"], ["a", "b"], "t")
    with pytest.raises(ValueError, match="not a list of numbers"):
        score(lambda *a, **k: None, ["", ""], ["a", "b"], ["a", "b"], "t")
    with pytest.raises(ValueError, match="returned a list whose item 1 is str 'x', not a number"):
        score(lambda *a, **k: [0.5, "x"], ["", ""], ["a", "b"], ["a", "b"], "t")
    with pytest.raises(ValueError, match="item 0 is NoneType None"):
        score(lambda *a, **k: [None, None], ["", ""], ["a", "b"], ["a", "b"], "t")


def test_validate_checks_rewards(tmp_path: Path) -> None:
    tasks = builtin_tasks("copy", "reverse")
    tasks[0]["reward"] = "prefix_mach"
    tasks[1]["reward"] = "python:./nowhere.py:f"
    result = mlora("validate", write_sweep(tmp_path, micro_sweep(tasks=tasks)))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "tasks[0].reward: expected one of exact_match, prefix_match, char_accuracy, last_number, "
        "python:MODULE:FUNCTION or python:PATH.py:FUNCTION, got 'prefix_mach' (did you mean 'prefix_match'?)",
        "tasks[1].reward: no such file: ./nowhere.py",
    ]


def test_validate_reads_a_reward_file_without_running_it(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("def score(prompts:\n")
    (tmp_path / "other.py").write_text("import sys\nsys.exit(3)  # never runs at validate\ndef scored(p, c, r, **k):\n"
                                       "    return [0.0] * len(c)\n")
    (tmp_path / "star.py").write_text("from mlora_cli.train.rewards import *\n")  # may define anything
    tasks = builtin_tasks("copy", "reverse", "sort", "caesar")
    tasks[0]["reward"] = "python:broken.py:score"
    tasks[1]["reward"] = "python:other.py:score"
    tasks[2]["reward"] = "python:other.py:scored"
    tasks[3]["reward"] = "python:star.py:anything"
    result = mlora("validate", write_sweep(tmp_path, micro_sweep(tasks=tasks)))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("tasks[0].reward: broken.py line 1: ")
    assert lines[1:] == ["tasks[1].reward: other.py defines no 'score' (did you mean 'scored'?)"]


def test_a_reward_that_cannot_be_imported_stops_the_run_before_training(tmp_path: Path) -> None:
    """Validate checks a reward's form and file only; the worker imports it before training: one line, exit 2."""
    tasks = builtin_tasks("copy", "reverse")
    tasks[1].update(objective="grpo", reward="python:no_such_module_xyz:f")
    result = mlora("run", write_sweep(tmp_path, micro_sweep(tasks=tasks, devices="cpu")), "--no-plots")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "tasks[1].reward: cannot import no_such_module_xyz: ModuleNotFoundError: No module named 'no_such_module_xyz'"]
    assert "Traceback" not in result.output


FLAKY_REWARD = textwrap.dedent("""\
    # Scores like prefix_match; with FAIL_ON set, the call of that number raises, as a reward
    # that breaks on one adapter's completions would.
    import os
    calls = []

    def graded(prompts, completions, references, **fields):
        calls.append(fields["task"])
        if len(calls) == int(os.environ.get("FAIL_ON", "0")):
            raise RuntimeError("cannot parse this completion")
        return [sum(a == b for a, b in zip(c, r)) / max(1, len(r)) for c, r in zip(completions, references)]
""")


@pytest.mark.slow
def test_reward_metric_and_a_failing_reward_fails_only_its_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for folder in ("reference", "failing"):  # a reward file is relative to the sweep file's folder
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "flaky.py").write_text(FLAKY_REWARD)
    sweep = micro_sweep(
        devices="cpu",
        tasks=builtin_tasks("copy", "reverse", reward="python:./flaky.py:graded"),
        eval={"metrics": ["loss", "exact_match", "reward"], "max_new_tokens": 6},
        sweep={"grid": {"adapter.lr": [1e-2, 3e-3]}},
    )
    reference = mlora("run", write_sweep(tmp_path / "reference", sweep), "--no-plots")
    assert reference.exit_code == 0, reference.output
    (reference_dir,) = (tmp_path / "reference" / "runs").iterdir()
    expected = json.loads((reference_dir / "results.json").read_text())["adapters"]
    for entry in expected.values():
        assert [len(row) for row in entry["matrix"]["reward"]] == [2, 2, 2]  # a column per task, a row per stage
        assert 0.0 <= entry["final_mean"]["reward"] <= 1.0
        assert "reward" in entry["cl_metrics"]

    # Calls: 2 for the shared before-training row (one per task), then per task one per adapter:
    # the 4th is the second adapter's after task 1.
    monkeypatch.setenv("FAIL_ON", "4")
    result = mlora("run", write_sweep(tmp_path / "failing", sweep), "--no-plots")
    assert result.exit_code == 1, result.output  # a run with a failed adapter
    (run_dir,) = (tmp_path / "failing" / "runs").iterdir()
    adapters = json.loads((run_dir / "results.json").read_text())["adapters"]
    assert adapters["lr3e-3"]["status"] == "failed"
    assert adapters["lr3e-3"]["failure"] == (
        "reward python:" + str(tmp_path / "failing" / "flaky.py") +
        ":graded on task 'copy': RuntimeError: cannot parse this completion")
    survivor, reference_entry = adapters["lr1e-2"], expected["lr1e-2"]
    assert survivor["status"] == "done"
    assert numbers(survivor["matrix"]) == numbers(reference_entry["matrix"])
    assert numbers(survivor["final"]) == numbers(reference_entry["final"])
