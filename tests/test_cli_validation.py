"""`mlora validate` and `mlora run --dry-run` through the CLI: the happy path, and every bad input
rejected before any model loads, each problem one `key.path: message` line, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import MINIMAL_SWEEP, REPO, Result, mlora, write_sweep

QUICKSTART = str(REPO / "sweeps" / "quickstart.yaml")
WIDE = 200  # terminal columns: rich then does not cut adapter names in the dry-run table


@pytest.fixture(autouse=True)
def no_cuda_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Place on CPU without asking torch for GPUs: fast, and the same table on any machine."""
    import mlora_cli.run.launcher

    monkeypatch.setattr(mlora_cli.run.launcher, "visible_cuda_devices", lambda: 0)


def stderr_of(result: Result) -> str | None:
    """The error stream alone, where this click keeps it apart (8.2+); None where it is mixed in."""
    try:
        return result.stderr
    except ValueError:
        return None


def problems_of(result: Result) -> list[str]:
    """The problem lines of a rejected input, after checking it was a clean exit 2."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return [line for line in result.output.splitlines() if line.strip()]


def assert_problems(result: Result, expected: list[str]) -> None:
    """Exactly one line per expected problem, each line containing its expected text, in any order."""
    lines = problems_of(result)
    assert len(lines) == len(expected), lines
    for text in expected:
        assert any(text in line for line in lines), (text, lines)


# ---------------------------------------------------------------------------------------
# The happy path


def test_validate_quickstart() -> None:
    result = mlora("validate", QUICKSTART, columns=WIDE)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "ok: 8 adapters, 3 tasks"


def test_validate_with_overrides() -> None:
    result = mlora("validate", QUICKSTART, "adapter.lr=3e-3", "sweep.grid.adapter.rank=[4,8]", columns=WIDE)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "ok: 4 adapters, 3 tasks"


GRID_DOTTED = "sweep:\n  grid:\n    adapter.rank: [4, 8, 16]\n    adapter.lr: [1e-3, 3e-3]\n"
GRID_NESTED = "sweep:\n  grid:\n    adapter:\n      rank: [4, 8, 16]\n      lr: [1e-3, 3e-3]\n"


@pytest.mark.parametrize("grid", [GRID_DOTTED, GRID_NESTED], ids=["dotted", "nested"])
def test_grid_override_either_spelling(tmp_path: Path, grid: str) -> None:
    path = write_sweep(tmp_path, MINIMAL_SWEEP + grid)
    assert mlora("validate", path, columns=WIDE).output.strip() == "ok: 6 adapters, 2 tasks"
    result = mlora("run", path, "--dry-run", "sweep.grid.adapter.rank=[4,8]", columns=WIDE)
    assert result.exit_code == 0, result.output
    assert "4 adapters" in result.output
    for name in ("r4-lr1e-3", "r4-lr3e-3", "r8-lr1e-3", "r8-lr3e-3"):
        assert name in result.output
    assert "r16" not in result.output


def test_interpolation(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, MINIMAL_SWEEP + "train: {batch_size: 4}\neval:\n  batch_size: ${train.batch_size}\n")
    result = mlora("validate", path, columns=WIDE)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "ok: 1 adapters, 2 tasks"


def test_dry_run_prints_the_plan_and_trains_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlora_cli.run.launcher

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("--dry-run must not train")

    monkeypatch.setattr(mlora_cli.run.launcher, "run_sweep", no_training)
    result = mlora("run", QUICKSTART, "--dry-run", columns=WIDE)
    assert result.exit_code == 0, result.output
    assert "quickstart: 8 adapters, 3 tasks" in result.output
    for rank in (4, 8, 16, 32):
        for lr in ("1e-3", "3e-3"):
            assert f"r{rank}-lr{lr}" in result.output


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_validate_never_imports_torch() -> None:
    code = (
        "import sys; from mlora_cli.cli import app; from typer.testing import CliRunner; "
        "r=CliRunner().invoke(app, ['validate','sweeps/quickstart.yaml']); print('torch' in sys.modules)"
    )
    assert run_python(code).strip() == "False"


def test_config_sweep_plan_import_without_torch() -> None:
    code = (
        "import json, sys; import mlora_cli.spec.load, mlora_cli.spec.sweep, mlora_cli.spec.plan, mlora_cli.cli; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    assert not set(json.loads(run_python(code))) & {"torch", "transformers", "peft", "datasets"}


def test_dry_run_loads_no_model() -> None:
    # Counting CUDA devices may import torch; building the model or a worker may not.
    code = (
        "import json, sys; from mlora_cli.cli import app; from typer.testing import CliRunner; "
        "r=CliRunner().invoke(app, ['run','sweeps/quickstart.yaml','--dry-run']); assert r.exit_code == 0, r.output; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    modules = set(json.loads(run_python(code)))
    assert not modules & {"transformers", "peft", "datasets", "mlora_cli.model", "mlora_cli.run.worker"}


# ---------------------------------------------------------------------------------------
# Bad input: one case per problem, each with the lines `validate` must print (substrings).


@dataclass(frozen=True)
class Case:
    text: str
    expected: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    files: tuple[tuple[str, str], ...] = ()  # (name, content) written beside the sweep file


def with_extra(extra: str = "", task: str = "") -> str:
    """The minimal sweep plus a third task `c` with `task` as its source, plus `extra` YAML."""
    return MINIMAL_SWEEP + (f'  - {{name: c, source: "{task}"}}\n' if task else "") + extra


def bad(text: str, *expected: str, overrides: tuple[str, ...] = (), files: tuple[tuple[str, str], ...] = ()) -> Case:
    return Case(text, expected, overrides, files)


JSONL_QA = '{"question": "2+2", "answer": "4"}\n'
BIG_GRID = f"sweep:\n  grid:\n    adapter.rank: {list(range(1, 101))}\n    train.batch_size: {list(range(1, 102))}\n"

CASES: dict[str, Case] = {
    "yaml-syntax": bad("name: t\nadapter:\n  rank: 4\n   alpha: 8\n", "sweep.yaml: YAML syntax error (line 4"),
    "not-a-mapping": bad("- name: t\n- tasks: []\n", "sweep.yaml: the sweep file must be a mapping"),
    "scalar-file": bad("just text\n", "sweep.yaml: the sweep file must be a mapping"),
    "empty-file": bad("", "sweep.yaml: the sweep file is empty"),
    "unknown-top-key": bad(with_extra("trian: {steps_per_task: 3}\n"), "trian: unknown key (did you mean 'train'?)"),
    "unknown-adapter-key": bad(with_extra("adapter: {rnak: 4}\n"), "adapter.rnak: unknown key (did you mean 'rank'?)"),
    "unknown-task-key": bad(
        MINIMAL_SWEEP + '  - {name: c, sorce: "builtin:sort"}\n',
        "tasks[2].sorce: unknown key (did you mean 'source'?)",
        "tasks[2].source: required",
    ),
    "wrong-type": bad(with_extra("train: {batch_size: eight}\n"), "train.batch_size: expected an integer, got 'eight'"),
    "bool-is-not-int": bad(with_extra("adapter: {rank: true}\n"), "adapter.rank: expected an integer, got True"),
    "bad-literal": bad(
        with_extra("train: {schedule: cosin}\n"),
        "train.schedule: must be one of constant, linear, cosine, got 'cosin' (did you mean 'cosine'?)",
    ),
    "rank-zero": bad(with_extra("adapter: {rank: 0}\n"), "adapter.rank: must be > 0"),
    "rank-negative": bad(with_extra("adapter: {rank: -4}\n"), "adapter.rank: must be > 0"),
    "alpha-zero": bad(with_extra("adapter: {alpha: 0}\n"), "adapter.alpha: must be > 0"),
    "lr-zero": bad(with_extra("adapter: {lr: 0.0}\n"), "adapter.lr: must be > 0"),
    "lr-negative": bad(with_extra("adapter: {lr: -1e-3}\n"), "adapter.lr: must be > 0"),
    "dropout-one": bad(with_extra("adapter: {dropout: 1.0}\n"), "adapter.dropout: must be in [0, 1)"),
    "dropout-negative": bad(with_extra("adapter: {dropout: -0.1}\n"), "adapter.dropout: must be in [0, 1)"),
    "no-tasks-key": bad("name: t\n", "tasks: required"),
    "empty-task-list": bad("name: t\ntasks: []\n", "tasks: must not be empty"),
    "tasks-not-a-list": bad("name: t\ntasks: {a: 1}\n", "tasks: expected a list of mappings"),
    "duplicate-task-names": bad(
        MINIMAL_SWEEP + '  - {name: a, source: "builtin:sort"}\n',
        "tasks[2].name: duplicate task name 'a' (also tasks[0])",
    ),
    "duplicate-adapter-names": bad(
        with_extra("sweep:\n  list:\n    - {name: x, adapter.rank: 4}\n    - {name: x, adapter.rank: 8}\n"),
        "sweep.list[1].name: duplicate adapter name 'x' (also sweep.list[0])",
    ),
    "missing-data-file": bad(
        with_extra(task="jsonl:data/missing.jsonl"), "tasks[2].source: no such file: data/missing.jsonl"
    ),
    "data-file-without-fields": bad(
        with_extra(task="jsonl:qa.jsonl"),
        "tasks[2].prompt_field: 'prompt' not in qa.jsonl (fields: question, answer)",
        "tasks[2].completion_field: 'completion' not in qa.jsonl (fields: question, answer)",
        files=(("qa.jsonl", JSONL_QA),),
    ),
    "unknown-builtin": bad(
        with_extra(task="builtin:revrse"), "tasks[2].source: unknown builtin 'revrse' (did you mean 'reverse'?)"
    ),
    "unknown-builtin-model": bad(
        with_extra("base_model: builtin:tinny\n"), "base_model: unknown builtin model 'builtin:tinny'"
    ),
    "bad-device": bad(
        with_extra("devices: [cpu, gpu]\n"), "devices[1]: expected auto, cpu, cpu:K or cuda:N, got 'gpu'"
    ),
    "grid-unknown-key-dotted": bad(
        with_extra("sweep: {grid: {adapter.rnak: [4, 8]}}\n"),
        "sweep.grid.adapter.rnak: unknown key 'adapter.rnak' (did you mean 'rank'?)",
    ),
    "grid-unknown-key-nested": bad(
        with_extra("sweep: {grid: {adapter: {rnak: [4, 8]}}}\n"),
        "sweep.grid.adapter.rnak: unknown key 'adapter.rnak' (did you mean 'rank'?)",
    ),
    "grid-not-sweepable": bad(
        with_extra("sweep: {grid: {eval.batch_size: [4, 8]}}\n"),
        "sweep.grid.eval.batch_size: unknown key 'eval.batch_size'; a sweep varies adapter.* and train.* keys",
    ),
    "grid-bad-values": bad(
        with_extra("sweep: {grid: {adapter.rank: [4, 0, x]}}\n"),
        "sweep.grid.adapter.rank[1]: must be > 0",
        "sweep.grid.adapter.rank[2]: expected an integer, got 'x'",
    ),
    "too-many-adapters": bad(with_extra(BIG_GRID), "sweep: expands to 10,100 adapters, more than the limit of 10,000"),
    "zip-unequal": bad(
        with_extra("sweep: {zip: {adapter.rank: [4, 8], adapter.lr: [1e-3]}}\n"),
        "sweep.zip: lists must have equal length (adapter.rank: 2, adapter.lr: 1)",
    ),
    "zip-unknown-key": bad(  # used to crash with a KeyError
        with_extra("sweep: {zip: {adapter.rnak: [4, 8], adapter.lr: [1e-3, 3e-3]}}\n"),
        "sweep.zip.adapter.rnak: unknown key 'adapter.rnak' (did you mean 'rank'?)",
    ),
    "zip-not-a-list": bad(  # used to crash with a TypeError
        with_extra("sweep: {zip: {adapter.rank: 4, adapter.lr: [1e-3, 3e-3]}}\n"),
        "sweep.zip.adapter.rank: expected a non-empty list of values",
    ),
    "override-without-equals": bad(
        MINIMAL_SWEEP, "override 'adapter.rank': expected key=value", overrides=("adapter.rank",)
    ),
    "override-bad-yaml": bad(
        MINIMAL_SWEEP, "override 'adapter.target_modules=[q_proj': ", overrides=("adapter.target_modules=[q_proj",)
    ),
    "override-bad-index": bad(  # used to crash with a TypeError
        MINIMAL_SWEEP,
        "override 'tasks.5.steps=3': tasks[5]: list index out of range",
        "override 'tasks.x.steps=3': ",
        overrides=("tasks.5.steps=3", "tasks.x.steps=3"),
    ),
    "override-unknown-key": bad(
        MINIMAL_SWEEP, "adapter.rnak: unknown key (did you mean 'rank'?)", overrides=("adapter.rnak=4",)
    ),
    "override-wrong-section": bad(
        MINIMAL_SWEEP, "adapter.batch_size: unknown key (did you mean 'train.batch_size'?)",
        overrides=("adapter.batch_size=4",)
    ),
    "override-wrong-type": bad(
        MINIMAL_SWEEP, "adapter.rank: expected an integer, got 'abc'", overrides=("adapter.rank=abc",)
    ),
    "devices-empty": bad(
        MINIMAL_SWEEP, "devices: an empty list (give auto, cpu, cpu:K or a list of cuda:N)", overrides=("devices=[]",)
    ),
    "missing-interpolation": bad(
        with_extra("adapter:\n  alpha: ${adapter.nope}\n"), "adapter.alpha: Interpolation key 'adapter.nope'"
    ),
}


def write_case(tmp_path: Path, case: Case) -> Path:
    for name, content in case.files:
        (tmp_path / name).write_text(content)
    return write_sweep(tmp_path, case.text)


@pytest.mark.parametrize("case", CASES)
def test_validate_rejects(tmp_path: Path, case: str) -> None:
    result = mlora("validate", write_case(tmp_path, CASES[case]), *CASES[case].overrides, columns=WIDE)
    assert_problems(result, list(CASES[case].expected))


RUN_CASES = [
    "yaml-syntax",
    "rank-zero",
    "duplicate-adapter-names",
    "missing-data-file",
    "zip-unequal",
    "override-bad-index",
]


@pytest.mark.parametrize("case", RUN_CASES)
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_run_rejects_before_any_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, dry_run: bool
) -> None:
    import mlora_cli.run.launcher

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bad sweep reached the launcher")

    monkeypatch.setattr(mlora_cli.run.launcher, "run_sweep", must_not_run)
    monkeypatch.setattr(mlora_cli.run.launcher, "plan_workers", must_not_run)
    path = write_case(tmp_path, CASES[case])
    result = mlora("run", path, *CASES[case].overrides, *(["--dry-run"] if dry_run else []), columns=WIDE)
    assert_problems(result, list(CASES[case].expected))


def test_missing_file(tmp_path: Path) -> None:
    for command in ("validate", "run"):
        result = mlora(command, tmp_path / "nope.yaml", columns=WIDE)
        assert_problems(result, [f"{tmp_path / 'nope.yaml'}: no such file"])


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"name: \xd0\x00\xff\n")
    assert_problems(mlora("validate", path, columns=WIDE), [f"{path}: cannot read: "])


def test_problems_go_to_stderr(tmp_path: Path) -> None:
    result = mlora("validate", write_sweep(tmp_path, with_extra("adapter: {rank: 0}\n")), columns=WIDE)
    stderr = stderr_of(result)
    if stderr is not None:
        assert stderr.strip() == "adapter.rank: must be > 0"
        assert result.stdout.strip() == ""


def test_every_problem_reported_together(tmp_path: Path) -> None:
    (tmp_path / "qa.jsonl").write_text(JSONL_QA)
    text = """\
name: t
trian: {}
tasks:
  - {name: a, source: "builtin:revrse"}
  - {name: a, source: "jsonl:missing.jsonl"}
  - {name: c, source: "jsonl:qa.jsonl"}
adapter: {rank: 0, lr: -1, rnak: 3, dropout: 1.5}
train: {batch_size: eight}
sweep:
  grid:
    adapter.rnak: [1, 2]
  zip:
    adapter.alpha: [1, 2]
    adapter.dropout: [0.1]
"""
    expected = [
        "trian: unknown key (did you mean 'train'?)",
        "adapter.rnak: unknown key (did you mean 'rank'?)",
        "adapter.rank: must be > 0",
        "adapter.lr: must be > 0",
        "adapter.dropout: must be in [0, 1)",
        "train.batch_size: expected an integer, got 'eight'",
        "tasks[1].name: duplicate task name 'a' (also tasks[0])",
        "tasks[0].source: unknown builtin 'revrse' (did you mean 'reverse'?)",
        "tasks[1].source: no such file: missing.jsonl",
        "tasks[2].prompt_field: 'prompt' not in qa.jsonl",
        "tasks[2].completion_field: 'completion' not in qa.jsonl",
        "sweep.grid.adapter.rnak: unknown key 'adapter.rnak' (did you mean 'rank'?)",
        "sweep.zip: lists must have equal length (adapter.alpha: 2, adapter.dropout: 1)",
    ]
    path = write_case(tmp_path, Case(text, ()))
    for args in (["validate", path], ["run", path], ["run", path, "--dry-run"]):
        assert_problems(mlora(*args, columns=WIDE), expected)


def test_bad_task_does_not_hide_other_tasks_problems(tmp_path: Path) -> None:
    # tasks[1] fails to build; tasks[0] and the sweep are still checked in the same pass.
    text = 'name: t\ntasks:\n  - {name: a, source: "builtin:revrse"}\n  - 5\nsweep: {grid: {train.bs: [1, 2]}}\n'
    assert_problems(
        mlora("validate", write_sweep(tmp_path, text), columns=WIDE),
        [
            "tasks[1]: expected a mapping, got 5",
            "tasks[0].source: unknown builtin 'revrse'",
            "sweep.grid.train.bs: unknown key 'train.bs'",
        ],
    )


def test_an_output_dir_that_cannot_hold_a_run_is_one_line(tmp_path: Path) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    result = mlora("run", write_sweep(tmp_path, MINIMAL_SWEEP), f"output_dir={taken}", "--no-plots")
    assert problems_of(result) == [f"output_dir: cannot make the run folder in {taken}: Not a directory"]


def test_eval_on_a_device_this_machine_lacks_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlora_cli.eval.options

    monkeypatch.setattr(mlora_cli.eval.options, "visible_cuda_devices", lambda: 0)
    result = mlora("eval", str(tmp_path), "--device", "cuda:1")
    assert problems_of(result) == ["--device: cuda:1 requested, but this machine has no CUDA device (use --device cpu)"]
    result = mlora("eval", str(tmp_path), "--device", "gpu")
    assert problems_of(result) == ["--device: expected cpu or cuda:N, got 'gpu'"]


def test_resume_with_overrides_says_so(tmp_path: Path) -> None:
    result = mlora("run", "--resume", str(tmp_path), "adapter.rank=8")
    assert problems_of(result) == ["--resume continues a run as it was: no overrides"]
    assert problems_of(mlora("run")) == ["give a sweep file, or --resume RUN_DIR"]
