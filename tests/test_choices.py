"""choice_accuracy: each choice's log-likelihood equals a plain PEFT/transformers loop over the choices, in a
fused batch with a neighbour; the argmax (mean and sum) is the metric; neighbours change nothing; the bench
baseline agrees; a micro run writes it everywhere and `mlora eval` reproduces it; and validation names the key,
the task and the line."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import engine_with_trained_b, micro_sweep, mlora, run_cli, write_sweep
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from mlora_cli.bench import baseline
from mlora_cli.data.batches import TokenizedTask, tokenize_task
from mlora_cli.data.sources import load_task
from mlora_cli.errors import ConfigError
from mlora_cli.eval import choices as choice_scoring
from mlora_cli.eval.evaluate import evaluate
from mlora_cli.eval.request import EvalRequest
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.spec.load import load_task_suite
from mlora_cli.spec.schema import AdapterConfig, EvalConfig, TaskConfig
from mlora_cli.spec.tasks import parse_choices

TARGETS = ("q_proj", "v_proj", "down_proj")
ADAPTER = AdapterConfig(rank=4, alpha=8.0, target_modules=TARGETS)

# Sentiment with choices of different lengths (so mean and sum can disagree), and a yes/no/maybe task whose
# examples carry their own choices (two or three).
SENTIMENT = [{"prompt": f"review: {text} ->", "completion": label}
             for text, label in [("great fun", "pos"), ("dull and slow", "negative"), ("loved it", "pos"),
                                 ("awful", "negative"), ("fine i guess", "neutral"), ("superb cast", "pos"),
                                 ("a mess", "negative"), ("ok", "neutral"), ("bad acting", "negative"),
                                 ("so good", "pos"), ("meh", "neutral"), ("brilliant", "pos")]]
SENTIMENT_CHOICES = ["pos", "negative", "neutral"]
QUESTIONS = [{"q": f"is {a} > {b}?", "a": "yes" if a > b else "no",
              "options": ["yes", "no"] if i % 2 else ["no", "yes", "maybe"]}
             for i, (a, b) in enumerate([(3, 1), (2, 5), (9, 4), (1, 7), (6, 6), (8, 2), (4, 9), (7, 3), (5, 8),
                                         (0, 1)])]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def task_configs(folder: Path) -> list[TaskConfig]:
    write_jsonl(folder / "sentiment.jsonl", SENTIMENT)
    write_jsonl(folder / "questions.jsonl", QUESTIONS)
    return [TaskConfig(name="sentiment", source="jsonl:sentiment.jsonl", train_examples=4, eval_examples=8,
                       choices=tuple(SENTIMENT_CHOICES)),
            TaskConfig(name="questions", source="jsonl:questions.jsonl", train_examples=2, eval_examples=8,
                       prompt_field="q", completion_field="a", choices_field="options")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Any:
    """builtin:micro, slots 0 and 1 with nonzero (different) B, slot 2 at B = 0; the two tasks tokenized; an
    untouched copy of the base for the PEFT reference."""
    folder = tmp_path_factory.mktemp("choices")
    engine, reference, tokenizer = engine_with_trained_b(TARGETS, ADAPTER, slots=3, nonzero=2)
    tasks = [tokenize_task(load_task(task, 0, folder), tokenizer, 40) for task in task_configs(folder)]
    return engine, reference, tokenizer, tasks


def peft_of(reference: torch.nn.Module, engine: MultiLoraModel, slot: int) -> torch.nn.Module:
    peft = get_peft_model(copy.deepcopy(reference), LoraConfig(r=ADAPTER.rank, lora_alpha=ADAPTER.alpha,
                                                               target_modules=list(TARGETS)))
    set_peft_model_state_dict(peft, engine.slot_weights(slot, ADAPTER))
    return peft.eval()


@torch.no_grad()
def reference_log_likelihoods(model: torch.nn.Module, tokenizer: Any, task: TokenizedTask) -> list[list[float]]:
    """Per example, per choice: log p(choice ids + eos | prompt ids), one row at a time, summed by hand."""
    out = []
    for row in task.eval:
        prompt = tokenizer(row.prompt, add_special_tokens=True)["input_ids"]
        values = []
        for choice in row.choices:
            completion = tokenizer(choice.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + completion])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            values.append(sum(float(log_probs[len(prompt) - 1 + t, token]) for t, token in enumerate(completion)))
        out.append(values)
    return out


def expected_accuracy(task: TokenizedTask, values: list[list[float]], normalization: str) -> float:
    correct = 0
    for row, lls in zip(task.eval, values, strict=True):
        lengths = [len(choice.ids) - choice.prompt_len for choice in row.choices]
        scores = [ll / n if normalization == "mean" else ll for ll, n in zip(lls, lengths)]
        correct += row.choices[scores.index(max(scores))].completion == row.completion
    return correct / len(task.eval)


def test_choice_log_likelihoods_and_argmax_equal_a_plain_loop(setup: Any) -> None:
    engine, reference, tokenizer, tasks = setup
    assert [len(row.choices) for row in tasks[1].eval] != [len(tasks[1].eval[0].choices)] * 8  # 2 or 3 per example
    # Slot 1 is fused with its neighbour slot 0, two rows each per pass: several passes of mixed lengths.
    found = choice_scoring.choice_log_likelihoods(engine, [0, 1], [tasks, tasks], 4, tokenizer.pad_token_id)
    peft = peft_of(reference, engine, 1)
    for j, task in enumerate(tasks):
        expected = reference_log_likelihoods(peft, tokenizer, task)
        got = [[found[1][(j, i, c)][0] for c in range(len(row.choices))] for i, row in enumerate(task.eval)]
        torch.testing.assert_close(torch.tensor([v for e in got for v in e]),
                                   torch.tensor([v for e in expected for v in e]), atol=1e-4, rtol=1e-5)
        for normalization in ("mean", "sum"):
            scores, _ = evaluate(engine, [EvalRequest("zero", 0, tasks), EvalRequest("one", 1, tasks)],
                                 EvalConfig(metrics=("choice_accuracy",), choice_normalization=normalization,
                                            batch_size=5), tokenizer)
            assert scores["one"][task.name] == {"choice_accuracy": expected_accuracy(task, expected, normalization)}
    means = [expected_accuracy(t, reference_log_likelihoods(peft, tokenizer, t), "mean") for t in tasks]
    sums = [expected_accuracy(t, reference_log_likelihoods(peft, tokenizer, t), "sum") for t in tasks]
    assert means != sums  # the two normalisations do pick differently here: both paths are exercised


def test_neighbours_and_batching_do_not_change_choice_accuracy(setup: Any) -> None:
    engine, _, tokenizer, tasks = setup
    config = EvalConfig(metrics=("loss", "choice_accuracy"))
    alone, _ = evaluate(engine, [EvalRequest("a", 1, tasks)], config, tokenizer)
    together, _ = evaluate(engine, [EvalRequest("b", 0, tasks), EvalRequest("a", 1, tasks),
                                    EvalRequest("base", None, tasks), EvalRequest("zero", 2, tasks)],
                           EvalConfig(metrics=("loss", "choice_accuracy"), batch_size=3), tokenizer)
    for task in tasks:
        assert together["a"][task.name]["choice_accuracy"] == alone["a"][task.name]["choice_accuracy"]
        # Before training (slot None) is the base alone: slot 2, whose B is 0, scores the same.
        assert together["base"][task.name]["choice_accuracy"] == together["zero"][task.name]["choice_accuracy"]
    found_alone = choice_scoring.choice_log_likelihoods(engine, [1], [tasks], 256, tokenizer.pad_token_id)[0]
    found_mixed = choice_scoring.choice_log_likelihoods(engine, [0, 1, 2], [tasks] * 3, 5, tokenizer.pad_token_id)[1]
    assert found_alone.keys() == found_mixed.keys()
    for key, (ll, n) in found_alone.items():
        assert found_mixed[key][1] == n and found_mixed[key][0] == pytest.approx(ll, abs=1e-4)


def test_the_bench_baseline_scores_choices_as_mlora(setup: Any) -> None:
    engine, reference, tokenizer, tasks = setup
    config = EvalConfig(metrics=("choice_accuracy",), batch_size=7)
    fused, _ = evaluate(engine, [EvalRequest("b", 0, tasks), EvalRequest("a", 1, tasks)], config, tokenizer)
    plain = baseline.evaluate(peft_of(reference, engine, 1), tasks, tokenizer, config)
    assert plain == fused["a"]


def test_choices_fields_read_lists_json_and_bars() -> None:
    assert parse_choices(["yes", "no", 3]) == ("yes", "no", "3")
    assert parse_choices('["a|b", "c"]') == ("a|b", "c")
    assert parse_choices("yes|no| maybe") == ("yes", "no", " maybe")  # split as written, nothing trimmed
    with pytest.raises(ValueError, match="not a JSON list"):
        parse_choices("[yes, no]")


@pytest.mark.slow
def test_a_run_writes_choice_accuracy_and_eval_reproduces_it(tmp_path: Path) -> None:
    configs = task_configs(tmp_path)
    with (tmp_path / "questions.csv").open("w", newline="") as file:  # the per-example choices as a CSV `|` cell
        writer = csv.writer(file)
        writer.writerow(["q", "a", "options"])
        writer.writerows([row["q"], row["a"], "|".join(row["options"])] for row in QUESTIONS)
    tasks = [{"name": "sentiment", "source": "jsonl:sentiment.jsonl", "train_examples": 4, "eval_examples": 8,
              "choices": SENTIMENT_CHOICES},
             {"name": "questions", "source": "csv:questions.csv", "train_examples": 2, "eval_examples": 8,
              "prompt_field": "q", "completion_field": "a", "choices_field": "options"}]
    assert configs[0].choices == tuple(tasks[0]["choices"])
    sweep = micro_sweep(name="choices", devices="cpu", tasks=tasks,
                        adapter={"rank": 4, "target_modules": list(TARGETS)},
                        train={"max_seq_len": 64},  # nothing cut, so `mlora eval --adapter` (no cut) agrees
                        eval={"metrics": ["loss", "choice_accuracy"]}, sweep={"grid": {"adapter.lr": [1e-2, 3e-2]}})
    result, run_dir, results = run_cli(tmp_path, sweep)
    assert "choice" in result.output  # the tables show it
    for name, entry in results["adapters"].items():
        assert entry["status"] == "done"
        matrix = entry["matrix"]["choice_accuracy"]
        assert [len(row) for row in matrix] == [2, 2, 2]
        assert all(0.0 <= value <= 1.0 and value * 8 == int(value * 8) for row in matrix for value in row)
        assert "choice_accuracy" in entry["cl_metrics"]
        assert (run_dir / "plots" / f"{name}-choice_accuracy-heatmap.png").is_file()
    with (run_dir / "forgetting.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row["metric"] == "choice_accuracy"]
    assert {(row["adapter"], row["after_task"], row["eval_task"]) for row in rows} == {
        (name, str(after), task) for name in results["adapters"] for after in range(3)
        for task in ("sentiment", "questions")}

    again = mlora("eval", run_dir)
    assert again.exit_code == 0, again.output
    (eval_dir,) = (run_dir / "evals").iterdir()
    recomputed = json.loads((eval_dir / "results.json").read_text())["adapters"]
    for name, entry in results["adapters"].items():
        assert recomputed[name]["matrix"]["choice_accuracy"] == entry["matrix"]["choice_accuracy"]

    # Any saved adapter, on a tasks file: its final scores, with the run's data (the same seed).
    tasks_file = tmp_path / "tasks.yaml"
    tasks_file.write_text(json.dumps({"tasks": tasks, "eval": {"metrics": ["choice_accuracy"]}, "seed": 0}))
    name, entry = next(iter(results["adapters"].items()))
    assert entry["seed"] == 0
    alone = mlora("eval", "--base", "builtin:micro", "--adapter", run_dir / "adapters" / name, "--tasks", tasks_file,
                  "--json")
    assert alone.exit_code == 0, alone.output
    final = json.loads(alone.stdout)["adapters"][name]["final"]
    assert final == {task: {"choice_accuracy": scores["choice_accuracy"]} for task, scores in entry["final"].items()}


def validate(folder: Path, tasks: list[dict[str, Any]], metrics: tuple[str, ...] = ("loss", "choice_accuracy")
             ) -> list[str]:
    """`mlora validate` of a micro sweep with these tasks: exit code 2 and its error lines."""
    result = mlora("validate", write_sweep(folder, micro_sweep(tasks=tasks, eval={"metrics": list(metrics)})))
    assert result.exit_code == 2, result.output
    return result.stderr.strip().splitlines()


def test_validation_lines(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "sentiment.jsonl", SENTIMENT)
    good = {"name": "sentiment", "source": "jsonl:sentiment.jsonl", "train_examples": 4, "eval_examples": 4,
            "choices": SENTIMENT_CHOICES}
    builtin = {"name": "copy", "source": "builtin:copy", "train_examples": 8, "eval_examples": 2}
    assert validate(tmp_path, [good, builtin]) == [
        "tasks[1]: choice_accuracy needs choices or choices_field (task 'copy' has neither)"]
    assert validate(tmp_path, [{**good, "choices": ["pos", "negative"]}]) == [  # line 5's "neutral" is not listed
        "tasks[0].choices: sentiment.jsonl line 5: completion 'neutral' is not one of the choices "
        "['pos', 'negative']"]
    assert validate(tmp_path, [{**builtin, "choices": ["a", "b"]}], ("loss",)) == [
        "tasks[0].choices: builtin tasks have open answers, not a set of choices; use a jsonl, csv, parquet or hf "
        "source"]
    assert validate(tmp_path, [{**good, "choices": []}]) == [
        "tasks[0].choices: must not be empty (list the answers, e.g. [positive, negative])"]
    assert validate(tmp_path, [{**good, "choices": ["pos", "negative", "neutral", "pos"]}]) == [
        "tasks[0].choices: duplicate choice 'pos'"]
    assert validate(tmp_path, [{**good, "choices": [True, False]}]) == [  # YAML's reading of [yes, no]
        'tasks[0].choices: YAML reads unquoted yes/no/on/off/true/false as true/false; quote each choice, e.g. '
        '["yes", "no"]']
    assert validate(tmp_path, [{**good, "choices": None, "choices_field": "labels"}]) == [
        "tasks[0].choices_field: 'labels' not in sentiment.jsonl (fields: prompt, completion)"]
    assert validate(tmp_path, [{**good, "choices_field": "completion"}]) == [
        "tasks[0].choices_field: set choices (the same for every example) or choices_field (per example), not both"]
    # Per-example choices: a CSV `|` cell whose choices lack the completion, on its line of the file.
    (tmp_path / "q.csv").write_text("q,a,options\nis 1 > 0?,yes,yes|no\nis 0 > 1?,no,yes|maybe\n")
    csv_task = {"name": "q", "source": "csv:q.csv", "train_examples": 1, "eval_examples": 1, "prompt_field": "q",
                "completion_field": "a", "choices_field": "options"}
    assert validate(tmp_path, [csv_task]) == [
        "tasks[0].choices_field: q.csv line 3: completion 'no' is not one of the choices ['yes', 'maybe']"]


def test_tasks_files_and_loaded_rows_are_checked_too(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "sentiment.jsonl", SENTIMENT)
    tasks_file = tmp_path / "tasks.yaml"
    tasks_file.write_text(json.dumps({"tasks": [{"name": "s", "source": "jsonl:sentiment.jsonl"}],
                                      "eval": {"metrics": ["choice_accuracy"]}}))
    with pytest.raises(ConfigError) as error:
        load_task_suite(tasks_file)
    assert error.value.problems == ["tasks[0]: choice_accuracy needs choices or choices_field (task 's' has neither)"]
    # Parquet (and hf) rows are checked as they load, naming the row of the source.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"],
                             "options": [["x", "y"], ["x", "y"], ["x", "y"]]}), tmp_path / "rows.parquet")
    task = TaskConfig(name="p", source="parquet:rows.parquet", train_examples=1, eval_examples=2,
                      choices_field="options")
    with pytest.raises(ConfigError) as error:
        load_task(task, 0, tmp_path, path="tasks[0]")
    assert error.value.problems == [
        "tasks[0].choices_field: row 2 of parquet:rows.parquet: completion 'z' is not one of the choices ['x', 'y']"]
