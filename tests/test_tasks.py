"""Task sources: builtin generators, local files, hf errors, and check_task messages."""

from __future__ import annotations

import csv
import json
import os
import string
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mlora_cli.data.sources import Example, TaskData, load_task
from mlora_cli.errors import ConfigError
from mlora_cli.spec.schema import TaskConfig
from mlora_cli.spec.tasks import BUILTIN_GENERATORS, check_task

REPO = Path(__file__).resolve().parents[1]
LETTER_TASKS = ("reverse", "sort", "caesar", "copy")


def builtin(generator: str, **kwargs: object) -> TaskConfig:
    kwargs.setdefault("name", generator)
    return TaskConfig(source=f"builtin:{generator}", **kwargs)  # type: ignore[arg-type]


def input_of(example: Example, prefix: str) -> str:
    assert example.prompt.startswith(f"{prefix} ") and example.prompt.endswith("=")
    return example.prompt[len(prefix) + 1 : -1]


# ---------------------------------------------------------------------------------------
# Builtin generators


def test_builtin_names() -> None:
    assert set(BUILTIN_GENERATORS) >= {"reverse", "sort", "caesar", "add", "copy"}


@pytest.mark.parametrize("generator", BUILTIN_GENERATORS)
def test_builtin_deterministic_sized_and_disjoint(generator: str) -> None:
    task = builtin(generator, train_examples=50, eval_examples=20)
    data = load_task(task, seed=0, base_dir=None)
    assert isinstance(data, TaskData) and data.name == generator
    assert data == load_task(task, seed=0, base_dir=None)
    assert data != load_task(task, seed=1, base_dir=None)
    assert data.train != load_task(builtin(generator, name="other", train_examples=50), seed=0, base_dir=None).train
    assert (len(data.train), len(data.eval)) == (50, 20)
    prompts = [e.prompt for e in data.train + data.eval]
    assert len(set(prompts)) == len(prompts)  # distinct inside and across the splits
    assert all(32 <= ord(c) < 127 for e in data.train + data.eval for c in e.prompt + e.completion)


@pytest.mark.parametrize("generator", BUILTIN_GENERATORS)
def test_builtin_eval_set_independent_of_train_size(generator: str) -> None:
    small = load_task(builtin(generator, train_examples=10), seed=3, base_dir=None)
    large = load_task(builtin(generator, train_examples=100), seed=3, base_dir=None)
    assert small.eval == large.eval


def test_builtin_answers_are_correct() -> None:
    for generator, rule in {
        "reverse": lambda s: s[::-1],
        "sort": lambda s: "".join(sorted(s)),
        "caesar": lambda s: "".join(chr((ord(c) - 97 + 5) % 26 + 97) for c in s),
        "copy": lambda s: s,
    }.items():
        data = load_task(builtin(generator, shift=5, min_len=2, max_len=6), seed=0, base_dir=None)
        for example in data.train + data.eval:
            text = input_of(example, generator)
            assert 2 <= len(text) <= 6
            assert example.completion == rule(text)
    add = load_task(builtin("add", min_len=1, max_len=4), seed=0, base_dir=None)
    for example in add.train + add.eval:
        a, b = input_of(example, "add").split("+")
        assert all(1 <= len(n) <= 4 and (n == "0" or not n.startswith("0")) for n in (a, b))
        assert example.completion == str(int(a) + int(b))


def test_caesar_shift_wraps() -> None:
    data = load_task(builtin("caesar", shift=27, prefix="c"), seed=0, base_dir=None)
    example = data.train[0]
    assert example.completion == "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in input_of(example, "c"))


def test_letter_tasks_share_one_alphabet() -> None:
    for generator in LETTER_TASKS:
        data = load_task(builtin(generator), seed=0, base_dir=None)
        letters = {c for e in data.train + data.eval for c in input_of(e, generator)}
        assert letters == set(string.ascii_lowercase), generator
    add = load_task(builtin("add"), seed=0, base_dir=None)
    assert {c for e in add.train for c in input_of(e, "add")} == set(string.digits + "+")


def test_empty_prefix_makes_tasks_conflict() -> None:
    # Without a tag the same prompt asks for different answers: the interference we want to measure.
    kwargs = {"prefix": "", "min_len": 2, "max_len": 2, "train_examples": 200}
    reverse = load_task(builtin("reverse", **kwargs), seed=0, base_dir=None)
    copy = load_task(builtin("copy", **kwargs), seed=0, base_dir=None)
    assert all(e.prompt == f"{e.prompt[:-1]}=" and e.prompt[:-1].isalpha() for e in reverse.train)
    answers = {e.prompt: e.completion for e in reverse.train}
    conflicts = [e for e in copy.train if e.prompt in answers and answers[e.prompt] != e.completion]
    assert conflicts


def test_custom_prefix() -> None:
    data = load_task(builtin("sort", prefix="SORT:"), seed=0, base_dir=None)
    assert all(e.prompt.startswith("SORT: ") for e in data.train)


def test_builtin_data_does_not_depend_on_hash_seed() -> None:
    code = "from mlora_cli.data.sources import load_task; from mlora_cli.spec.load import TaskConfig; " + (
        "print(load_task(TaskConfig(name='t', source='builtin:reverse'), 0, None).train[:3])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_import_is_light() -> None:
    code = "import json, sys, mlora_cli.data.sources; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True).stdout
    modules = set(json.loads(out))
    assert not modules & {"torch", "datasets", "pyarrow", "transformers"}


# ---------------------------------------------------------------------------------------
# Files


ROWS = [{"q": f"question {i}", "a": i} for i in range(30)]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict[str, object]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


Writer = Callable[[Path, list[dict[str, object]]], Path]
WRITERS: list[tuple[str, Writer]] = [("jsonl", write_jsonl), ("csv", write_csv), ("parquet", write_parquet)]


def file_task(source: str, **kwargs: object) -> TaskConfig:
    return TaskConfig(name="f", source=source, prompt_field="q", completion_field="a", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("scheme", "writer"), WRITERS)
def test_file_sources_held_out_split(tmp_path: Path, scheme: str, writer: Writer) -> None:
    writer(tmp_path / f"data.{scheme}", ROWS)
    task = file_task(f"{scheme}:data.{scheme}", train_examples=20, eval_examples=5)
    assert check_task(task, "tasks[0]", tmp_path) == []
    data = load_task(task, seed=0, base_dir=tmp_path)
    assert (len(data.train), len(data.eval)) == (20, 5)
    everything = {Example(r["q"], str(r["a"])) for r in ROWS}  # type: ignore[arg-type]
    assert set(data.train) <= everything and set(data.eval) <= everything
    assert not set(data.train) & set(data.eval)
    assert data == load_task(task, seed=0, base_dir=tmp_path)
    assert data != load_task(task, seed=1, base_dir=tmp_path)


def test_fewer_rows_than_requested_uses_what_exists(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", ROWS[:8])
    data = load_task(file_task("jsonl:d.jsonl", train_examples=100, eval_examples=3), seed=0, base_dir=tmp_path)
    assert (len(data.train), len(data.eval)) == (5, 3)


def test_all_rows_held_out_is_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", ROWS[:4])
    with pytest.raises(ConfigError) as info:
        load_task(file_task("jsonl:d.jsonl", eval_examples=4), seed=0, base_dir=tmp_path, path="tasks[2]")
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith("tasks[2].source: ")


def test_eval_source(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_csv(tmp_path / "eval.csv", [{"q": "held", "a": n} for n in range(10)])
    task = file_task("jsonl:train.jsonl", eval_source="csv:eval.csv", train_examples=25, eval_examples=4)
    assert check_task(task, "tasks[0]", tmp_path) == []
    data = load_task(task, seed=0, base_dir=tmp_path)
    assert len(data.train) == 25 and all(e.prompt.startswith("question") for e in data.train)
    assert data.eval == tuple(Example("held", str(n)) for n in range(4))


def test_csv_cells_stay_text(tmp_path: Path) -> None:
    write_csv(tmp_path / "d.csv", [{"q": "007+1", "a": "008"}, {"q": "NA", "a": ""}])
    data = load_task(file_task("csv:d.csv", eval_examples=1), seed=0, base_dir=tmp_path)
    assert set(data.train + data.eval) == {Example("007+1", "008"), Example("NA", "")}


def test_relative_paths_use_cwd_without_base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    assert check_task(file_task("jsonl:d.jsonl"), "t", None) == []
    assert len(load_task(file_task("jsonl:d.jsonl", eval_examples=2), seed=0, base_dir=None).eval) == 2


def test_hf_unavailable_is_one_line_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # datasets reads the environment at import; another test may have imported it already.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    task = TaskConfig(name="h", source="hf:mlora-test/no-such-dataset:default")
    assert check_task(task, "tasks[0]", None) == []
    with pytest.raises(ConfigError) as info:
        load_task(task, seed=0, base_dir=None, path="tasks[0]")
    [problem] = info.value.problems
    assert problem.startswith("tasks[0].source: cannot load hf dataset 'mlora-test/no-such-dataset': ")
    assert "\n" not in problem


# ---------------------------------------------------------------------------------------
# check_task messages


def test_check_unknown_builtin_suggests() -> None:
    assert check_task(builtin("revrse"), "tasks[1]", None) == [
        "tasks[1].source: unknown builtin 'revrse' (did you mean 'reverse'?)"
    ]
    [problem] = check_task(builtin("zzz"), "tasks[0]", None)
    assert "unknown builtin 'zzz'" in problem and "reverse" in problem


def test_check_missing_file(tmp_path: Path) -> None:
    assert check_task(file_task("jsonl:data/x.jsonl"), "tasks[0]", tmp_path) == [
        "tasks[0].source: no such file: data/x.jsonl"
    ]
    write_jsonl(tmp_path / "t.jsonl", ROWS)
    task = file_task("jsonl:t.jsonl", eval_source="parquet:nope.parquet")
    assert check_task(task, "tasks[0]", tmp_path) == ["tasks[0].eval_source: no such file: nope.parquet"]


@pytest.mark.parametrize(("scheme", "writer"), WRITERS)
def test_check_missing_field_names_available_fields(tmp_path: Path, scheme: str, writer: Writer) -> None:
    (tmp_path / "data").mkdir()
    writer(tmp_path / "data" / f"x.{scheme}", [{"a": "1", "b": "2"}])
    task = TaskConfig(name="f", source=f"{scheme}:data/x.{scheme}", prompt_field="question", completion_field="b")
    assert check_task(task, "tasks[0]", tmp_path) == [
        f"tasks[0].prompt_field: 'question' not in data/x.{scheme} (fields: a, b)"
    ]


def test_check_bad_scheme() -> None:
    [problem] = check_task(file_task("data.jsonl"), "tasks[0]", None)
    assert problem.startswith("tasks[0].source: unknown source 'data.jsonl'") and "'jsonl:data.jsonl'" in problem
    [problem] = check_task(file_task("json:data.jsonl"), "tasks[0]", None)
    assert "did you mean 'jsonl'" in problem
    [problem] = check_task(file_task("jsonl:x.jsonl", eval_source="ftp:x"), "tasks[3]", Path("/nonexistent"))[1:]
    assert problem.startswith("tasks[3].eval_source: unknown source 'ftp:x'")


def test_check_hf_form() -> None:
    assert check_task(TaskConfig(name="h", source="hf:org/name"), "t", None) == []
    assert check_task(TaskConfig(name="h", source="hf:name:config"), "t", None) == []
    for bad in ("hf:", "hf:a:b:c", "hf:has space"):
        [problem] = check_task(TaskConfig(name="h", source=bad), "tasks[0]", None)
        assert problem.startswith("tasks[0].source: expected hf:NAME[:CONFIG]")


def test_check_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.parquet").write_text("not parquet")
    for name in ("bad.jsonl", "empty.jsonl", "bad.parquet"):
        scheme = name.split(".")[1]
        [problem] = check_task(file_task(f"{scheme}:{name}"), "tasks[0]", tmp_path)
        assert problem.startswith(f"tasks[0].source: cannot read {name}: "), problem


def test_check_min_len_above_max_len() -> None:
    assert check_task(builtin("copy", min_len=5, max_len=3), "tasks[0]", None) == [
        "tasks[0].min_len: must be <= max_len (5 > 3)"
    ]


def test_check_too_few_distinct_inputs() -> None:
    [problem] = check_task(builtin("copy", min_len=1, max_len=1), "tasks[0]", None)
    assert problem.startswith("tasks[0].train_examples: ") and "only 26 distinct inputs" in problem
    with pytest.raises(ConfigError):
        load_task(builtin("copy", min_len=1, max_len=1), seed=0, base_dir=None)
    assert check_task(builtin("sort", min_len=3, max_len=3), "tasks[0]", None) == []
    # add draws pairs: 10 one-digit numbers give 100 inputs.
    assert check_task(builtin("add", min_len=1, max_len=1, train_examples=90, eval_examples=10), "t", None) == []
    assert check_task(builtin("add", min_len=1, max_len=1, train_examples=91, eval_examples=10), "t", None) != []
    # Exactly as many inputs as needed still loads (every input once).
    data = load_task(builtin("copy", min_len=1, max_len=1, train_examples=20, eval_examples=6), 0, None)
    assert {e.completion for e in data.train + data.eval} == set(string.ascii_lowercase)
    assert check_task(builtin("copy", min_len=10**6, max_len=10**6), "t", None) == []  # instant


def test_check_builtin_eval_source_and_prefix() -> None:
    assert check_task(builtin("copy", eval_source="jsonl:x.jsonl"), "tasks[0]", None) == [
        "tasks[0].eval_source: not allowed for builtin sources (they make their own eval split)"
    ]
    [problem] = check_task(builtin("copy", prefix="a\nb"), "tasks[0]", None)
    assert problem.startswith("tasks[0].prefix: ")
    [problem] = check_task(file_task("jsonl:x.jsonl", eval_source="builtin:copy"), "tasks[0]", None)[1:]
    assert problem.startswith("tasks[0].eval_source: ")
