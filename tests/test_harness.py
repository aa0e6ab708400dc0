"""lm-evaluation-harness through the fused engine: on a tiny local multiple-choice task and a tiny generate_until
task, each adapter's numbers equal the harness's own HFLM over the same adapter in PEFT, every request batch is
scored once for all adapters, and `mlora eval --harness-tasks` writes the scores next to the task matrix."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the [lm-eval] extra")

from helpers import engine_with_trained_b, micro_sweep, mlora, write_sweep  # noqa: E402
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402

from mlora_cli.eval import harness  # noqa: E402
from mlora_cli.model.engine import MultiLoraModel  # noqa: E402
from mlora_cli.spec.schema import AdapterConfig  # noqa: E402

TARGETS = ("q_proj", "v_proj", "down_proj")
ADAPTER = AdapterConfig(rank=4, alpha=8.0, target_modules=TARGETS)
ROWS = [{"question": f"is {a} > {b}?", "choices": ["yes", "no", "maybe"], "answer": 0 if a > b else 1,
         "target": "yes" if a > b else "no"} for a, b in [(3, 1), (2, 5), (9, 4), (1, 7), (8, 2), (4, 9)]]


def write_tasks(folder: Path) -> Path:
    """Two harness tasks over one local JSONL file: multiple_choice (acc, acc_norm) and generate_until."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_text: \"{{question}} ->\"\n")
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\ndoc_to_target: \"{{target}}\"\n"
        "generation_kwargs:\n  until: [\"?\", \"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


def table_row(output: str, *cells: str) -> list[str]:
    """The cells of the first table line holding all of `cells` (in order), or []."""
    for line in output.splitlines():
        found = [c.strip() for c in line.replace("│", "|").split("|") if c.strip()]
        if all(cell in found for cell in cells):
            return found
    return []


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Any:
    """builtin:micro with slots 0 and 1 holding different nonzero B; a clean copy of the base for PEFT."""
    engine, reference, tokenizer = engine_with_trained_b(TARGETS, ADAPTER, slots=2, nonzero=2)
    return engine, reference, tokenizer, write_tasks(tmp_path_factory.mktemp("harness"))


def peft_of(reference: torch.nn.Module, engine: MultiLoraModel, slot: int) -> torch.nn.Module:
    peft = get_peft_model(copy.deepcopy(reference), LoraConfig(r=ADAPTER.rank, lora_alpha=ADAPTER.alpha,
                                                               target_modules=list(TARGETS)))
    set_peft_model_state_dict(peft, engine.slot_weights(slot, ADAPTER))
    return peft.eval()


class Requests:
    """A stand-in for the harness's Instance: only `.args` is read."""

    def __init__(self, *args: Any):
        self.args = args


def test_each_adapter_equals_hflm_over_peft_and_one_pass_serves_all(setup: Any) -> None:
    from lm_eval.models.huggingface import HFLM

    engine, reference, tokenizer, tasks = setup
    manager = harness.task_manager(["tiny_mc", "tiny_gen"], tasks)
    fused = harness.FusedHarness(engine, [0, 1], tokenizer, batch_size=64)
    calls = []
    hook = engine.model.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        first, second = fused.views()
        ours = {"a": harness.run_tasks(first, ["tiny_mc", "tiny_gen"], manager)}
        after_first = len(calls)
        ours["b"] = harness.run_tasks(second, ["tiny_mc", "tiny_gen"], manager)
    finally:
        hook.remove()
    assert after_first > 0 and len(calls) == after_first  # the second adapter is answered without a forward
    # 18 loglikelihood requests (6 docs x 3 choices) in one pass, 6 generations in one generate: for both adapters.
    assert fused.forwards == 2
    assert len(fused.likelihoods) == 18 and all(len(v) == 2 for v in fused.likelihoods.values())
    for label, slot in zip("ab", [0, 1]):
        lm = HFLM(pretrained=peft_of(reference, engine, slot), tokenizer=tokenizer, batch_size=64, max_length=2048)
        theirs = harness.run_tasks(lm, ["tiny_mc", "tiny_gen"], manager)
        assert ours[label] == theirs, label
    # The adapters differ, and so do their raw log-likelihoods; the generations compared are not all empty.
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in fused.likelihoods.values())
    assert any(text for texts in fused.generations.values() for text in texts)


def test_mlora_eval_adapters_writes_the_same_scores(setup: Any, tmp_path: Path) -> None:
    """`mlora eval --base --adapter A --adapter B --harness-tasks`: saved PEFT folders, the bridge's scores."""
    engine, _, tokenizer, tasks = setup
    for slot, name in enumerate("ab"):
        engine.save_slot(slot, ADAPTER, tmp_path / name, "builtin:micro")
    manager = harness.task_manager(["tiny_mc"], tasks)
    fused = harness.FusedHarness(engine, [0, 1], tokenizer)
    expected = {name: harness.run_tasks(view, ["tiny_mc"], manager) for name, view in zip("ab", fused.views())}
    result = mlora("eval", "--base", "builtin:micro", "--adapter", tmp_path / "a", "--adapter", tmp_path / "b",
                   "--harness-tasks", "tiny_mc", "--harness-include", tasks, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert {name: a["harness"] for name, a in document["adapters"].items()} == expected
    assert document["run"]["harness_tasks"] == ["tiny_mc"]
    table = mlora("eval", "--base", "builtin:micro", "--adapter", tmp_path / "a", "--harness-tasks", "tiny_mc",
                  "--harness-include", tasks, columns=200)
    assert table.exit_code == 0 and table_row(table.output, "a", "tiny_mc", "acc"), table.output


def test_raw_answers_match_hflm_per_request(setup: Any) -> None:
    """Log-likelihoods (to float tolerance), greediness, rolling log-likelihoods and generations, request by request."""
    from lm_eval.models.huggingface import HFLM

    engine, reference, tokenizer, _ = setup
    fused = harness.FusedHarness(engine, [1, 0], tokenizer, batch_size=4)  # slots in another order, small passes
    pairs = [Requests(row["question"] + " ->", " " + choice) for row in ROWS for choice in row["choices"]]
    rolling = [Requests(row["question"]) for row in ROWS]
    gens = [Requests(row["question"] + " ->", {"until": ["?"], "max_gen_toks": 5}) for row in ROWS]
    for index, slot in enumerate([1, 0]):
        view = fused.views()[index]
        lm = HFLM(pretrained=peft_of(reference, engine, slot), tokenizer=tokenizer, batch_size=4, max_length=2048)
        for (ll, greedy), (ll_ref, greedy_ref) in zip(view.loglikelihood(pairs), lm.loglikelihood(pairs)):
            assert ll == pytest.approx(ll_ref, abs=1e-4) and greedy == greedy_ref
        assert view.loglikelihood_rolling(rolling) == pytest.approx(lm.loglikelihood_rolling(rolling), abs=1e-4)
        assert view.generate_until(gens) == lm.generate_until(gens)
    passes = fused.forwards
    fused.views()[1].loglikelihood(pairs)  # already cached for every slot: no more passes
    assert fused.forwards == passes


@pytest.mark.slow
def test_mlora_eval_writes_harness_columns(tmp_path: Path) -> None:
    tasks = write_tasks(tmp_path / "harness")
    sweep = write_sweep(tmp_path, micro_sweep(sweep={"grid": {"adapter.rank": [2, 4]}}))
    assert mlora("run", sweep, "--no-plots").exit_code == 0
    run_dir = next((tmp_path / "runs").iterdir())
    result = mlora("eval", run_dir, "--harness-tasks", "tiny_mc,tiny_gen", "--harness-include", tasks, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    for adapter in document["adapters"].values():
        assert set(adapter["harness"]) == {"tiny_mc", "tiny_gen"}
        assert 0 <= adapter["harness"]["tiny_mc"]["acc"] <= 1
        assert "matrix" in adapter  # the task matrix is still there
    written = json.loads((Path(document["run"]["output_dir"]) / "results.json").read_text())
    table = mlora("eval", run_dir, "--harness-tasks", "tiny_mc", "--harness-include", tasks, columns=200)
    assert table.exit_code == 0 and table_row(table.output, "tiny_mc", "acc"), table.output
    assert written["adapters"].keys() == document["adapters"].keys()
    assert all("harness" in a for a in written["adapters"].values())


@pytest.mark.slow  # indexes the harness's builtin tasks (about 10 s)
def test_unknown_task_is_one_line(setup: Any) -> None:
    from mlora_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        harness.task_manager(["tiny_mc", "nope"], setup[3])


def test_cli_option_errors_are_lines(tmp_path: Path) -> None:
    result = mlora("eval", "--base", "builtin:micro", "--adapter", tmp_path, "--harness-include", tmp_path / "none")
    assert result.exit_code == 2
    for line in ("no such folder", "--harness-include needs --harness-tasks", "--adapter needs --base MODEL"):
        assert line in result.output, result.output


@pytest.mark.slow
def test_harness_columns_of_r_in_a_run(tmp_path: Path) -> None:
    """eval.harness_tasks: every adapter scored at every row of R; row 0 is the base's, shared; the rows equal
    `mlora eval RUN --harness-every-task` over the run's checkpoints; forgetting.csv and the report carry them."""
    tasks = write_tasks(tmp_path / "harness")
    sweep = micro_sweep(sweep={"grid": {"adapter.rank": [2, 4]}},
                        eval={"metrics": ["loss"], "harness_tasks": ["tiny_mc", "tiny_gen"],
                              "harness_include": "harness"})
    result = mlora("run", write_sweep(tmp_path, sweep), columns=200)
    assert result.exit_code == 0, result.output
    assert table_row(result.output, "r2", "tiny_mc", "acc"), result.output  # before, after and change
    run_dir = next((tmp_path / "runs").iterdir())
    written = json.loads((run_dir / "results.json").read_text())
    entries = list(written["adapters"].values())
    for entry in entries:
        assert len(entry["harness_matrix"]) == 3  # before training, after each of the two tasks
        assert entry["harness"] == entry["harness_matrix"][-1]
        assert set(entry["harness"]) == {"tiny_mc", "tiny_gen"}
    assert entries[0]["harness_matrix"][0] == entries[1]["harness_matrix"][0]  # the base, scored once
    csv_lines = (run_dir / "forgetting.csv").read_text().splitlines()
    assert any(",harness:tiny_mc,acc," in line for line in csv_lines)
    assert (run_dir / "plots" / "harness-tiny_mc-acc.png").is_file()  # each adapter's score after every task

    again = mlora("eval", run_dir, "--harness-tasks", "tiny_mc,tiny_gen", "--harness-include", tasks,
                  "--harness-every-task", "--json")
    assert again.exit_code == 0, again.output
    document = json.loads(again.stdout)
    for name, entry in written["adapters"].items():
        for row, row_again in zip(entry["harness_matrix"], document["adapters"][name]["harness_matrix"], strict=True):
            for task, values in row.items():
                assert values == pytest.approx(row_again[task], abs=1e-9)


def test_harness_keys_are_checked_at_validate(tmp_path: Path) -> None:
    sweep = micro_sweep(eval={"harness_include": "missing"})
    result = mlora("validate", write_sweep(tmp_path, sweep), columns=300)
    assert result.exit_code == 2
    assert f"eval.harness_include: no such folder: {tmp_path / 'missing'}" in result.output
    assert "eval.harness_include: names local harness tasks, but eval.harness_tasks is empty" in result.output
    result = mlora("eval", tmp_path, "--harness-every-task")
    assert result.exit_code == 2 and "--harness-every-task needs RUN_DIR and --harness-tasks" in result.output


@pytest.mark.slow  # indexes the harness's builtin tasks (about 10 s)
def test_an_unknown_harness_task_stops_the_run_with_one_line(tmp_path: Path) -> None:
    write_tasks(tmp_path / "harness")
    sweep = micro_sweep(eval={"metrics": ["loss"], "harness_tasks": ["tiny_mc", "nope"], "harness_include": "harness"})
    result = mlora("run", write_sweep(tmp_path, sweep), "--no-plots", columns=300)
    assert result.exit_code == 2
    assert (f"eval.harness_tasks: unknown task 'nope' (neither a harness task nor under {tmp_path / 'harness'})"
            in result.output)


def test_a_harness_task_whose_data_cannot_load_stops_the_run_with_one_line(tmp_path: Path) -> None:
    tasks = write_tasks(tmp_path / "harness")
    (tasks / "tiny.jsonl").unlink()  # the task YAML names a data file that is gone
    sweep = micro_sweep(eval={"metrics": ["loss"], "harness_tasks": ["tiny_mc"], "harness_include": "harness"})
    result = mlora("run", write_sweep(tmp_path, sweep), "--no-plots", columns=300)
    assert result.exit_code == 2, result.output
    assert "eval.harness_tasks: lm-evaluation-harness failed: " in result.output
    assert "Traceback" not in result.output


def test_mlora_eval_names_a_harness_task_whose_data_cannot_load(setup: Any, tmp_path: Path) -> None:
    engine, _, _, _ = setup
    engine.save_slot(0, ADAPTER, tmp_path / "a", "builtin:micro")
    tasks = write_tasks(tmp_path / "harness")
    (tasks / "tiny.jsonl").unlink()
    result = mlora("eval", "--base", "builtin:micro", "--adapter", tmp_path / "a", "--harness-tasks", "tiny_mc",
                   "--harness-include", tasks, columns=300)
    assert result.exit_code == 2, result.output
    assert "--harness-tasks: lm-evaluation-harness failed: FileNotFoundError: " in result.output
    assert "Traceback" not in result.output
