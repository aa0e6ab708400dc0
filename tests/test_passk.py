"""pass@k in evaluation: Chen et al.'s estimator against its closed form, pass@1 as the drawn samples'
pass rate, samples that do not depend on neighbours (or on the batch, or on evaluating again), a reward
that fails only its adapter, a micro run writing pass_at_k everywhere, and validation of its settings."""

from __future__ import annotations

import csv
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import builtin_tasks, micro_sweep, mlora, run_cli, write_sweep

from mlora_cli.data.batches import TokenizedTask, tokenize_task
from mlora_cli.data.sources import load_task
from mlora_cli.errors import ConfigError
from mlora_cli.eval import base_rows
from mlora_cli.eval import evaluate as evaluation
from mlora_cli.eval.evaluate import completion_text, evaluate
from mlora_cli.eval.passk import mean_pass_at_k, pass_at_k, passing_counts
from mlora_cli.eval.request import EvalRequest
from mlora_cli.model.base import build_builtin
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.spec.load import load_task_suite
from mlora_cli.spec.schema import AdapterConfig, EvalConfig, TaskConfig
from mlora_cli.train.rewards import load_reward

TARGETS = ("q_proj", "v_proj", "down_proj")

# A reward the random micro model passes about a third of the time, by a property of the sampled text:
# the tests need samples that pass and samples that do not. `FAIL_ON` makes that call raise.
LUCKY = textwrap.dedent("""\
    import os
    calls = []

    def lucky(prompts, completions, references, **fields):
        calls.append(1)
        if len(calls) == int(os.environ.get("FAIL_ON", "0")):
            raise RuntimeError("cannot score this")
        return [float(sum(map(ord, c)) % 3 == 0) for c in completions]
""")


@pytest.mark.parametrize(("n", "c", "k"), [
    (1, 0, 1), (1, 1, 1), (10, 0, 1), (10, 0, 5), (10, 10, 1), (10, 10, 10), (10, 3, 1), (10, 3, 5),
    (10, 6, 5), (10, 8, 5), (8, 1, 8), (20, 7, 4), (5, 2, 3),
], ids=lambda value: str(value))
def test_estimator_equals_the_closed_form(n: int, c: int, k: int) -> None:
    closed = 1.0 - math.comb(n - c, k) / math.comb(n, k)  # comb is 0 when n - c < k: then pass@k = 1
    assert pass_at_k(n, c, k) == pytest.approx(closed, rel=1e-12, abs=1e-12)


def test_estimator_edges_and_large_n() -> None:
    assert pass_at_k(10, 0, 3) == 0.0 and pass_at_k(10, 10, 3) == 1.0 and pass_at_k(10, 8, 3) == 1.0
    assert pass_at_k(200, 37, 1) == pytest.approx(37 / 200)
    # The binomials overflow a float here; the product form does not.
    assert pass_at_k(2000, 3, 1000) == pytest.approx(1 - math.comb(1997, 1000) / math.comb(2000, 1000), rel=1e-9)
    for bad in ((4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    rewards = [1.0, 0.0, 1.0, 0.5, 0.999, 0.0, 1.0, 1.0, 1.0]  # 3 examples x 3 samples; only full marks pass
    assert passing_counts(rewards, 3) == [2, 0, 3]
    assert mean_pass_at_k(rewards, 3, 2) == pytest.approx((pass_at_k(3, 2, 2) + 0.0 + 1.0) / 3)


@pytest.fixture(scope="module")
def engine_and_tasks(tmp_path_factory: pytest.TempPathFactory) -> tuple[MultiLoraModel, Any, list[TokenizedTask]]:
    """builtin:micro with 3 slots: two adapters with nonzero B (they change the distribution), one at B = 0."""
    torch.manual_seed(0)
    model, tokenizer = build_builtin("builtin:micro")
    engine = MultiLoraModel(model, TARGETS, 3, 4)
    for slot in range(3):
        engine.load_slot(slot, AdapterConfig(rank=4, target_modules=TARGETS), 1.0, seed=slot)
        if slot < 2:
            with torch.no_grad():
                for layer in engine.layers.values():
                    layer.lora_B[slot].normal_(0, 0.5, generator=torch.Generator().manual_seed(slot))
    reward = tmp_path_factory.mktemp("reward") / "lucky.py"
    reward.write_text(LUCKY)
    tasks = [tokenize_task(load_task(TaskConfig(name=name, source=f"builtin:{name}", train_examples=8,
                                                eval_examples=6, reward=f"python:{reward}:lucky"), 0, None),
                           tokenizer, 32)
             for name in ("copy", "reverse")]
    return engine, tokenizer, tasks


def config(**changes: Any) -> EvalConfig:
    return EvalConfig(**{"metrics": ("pass_at_k",), "samples": 5, "pass_k": 2, "max_new_tokens": 5, **changes})


def pass_scores(scores: dict[str, dict[str, dict[str, float]]], key: str) -> dict[str, float]:
    return {task: values["pass_at_k"] for task, values in scores[key].items()}


def test_pass_at_1_is_the_pass_rate_of_the_drawn_samples(engine_and_tasks: Any, monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    engine, tokenizer, tasks = engine_and_tasks
    drawn: list[Any] = []  # every sampling pass's rollouts
    real = evaluation.sample

    def recording(*args: Any) -> Any:
        drawn.append(real(*args))
        return drawn[-1]

    monkeypatch.setattr(evaluation, "sample", recording)
    scores, _ = evaluate(engine, [EvalRequest("a", 0, tasks, seed=0)], config(pass_k=1), tokenizer)
    rewards: dict[str, list[float]] = {task.name: [] for task in tasks}  # every drawn sample's, by its prompt's task
    task_of = {row.prompt: task.name for task in tasks for row in task.eval}
    lucky = load_reward(tasks[0].reward)
    for rollouts in drawn:
        for rollout in rollouts:
            texts = [completion_text(ids, tokenizer) for ids in rollout.completion_ids]
            for row, value in zip(rollout.rows, lucky([], texts, []), strict=True):
                rewards[task_of[row.prompt]].append(value)
    for task in tasks:
        assert len(rewards[task.name]) == 5 * len(task.eval)
        rate = sum(r >= 1.0 for r in rewards[task.name]) / len(rewards[task.name])
        assert scores["a"][task.name]["pass_at_k"] == pytest.approx(rate)
    assert 0.0 < sum(rate for rate in pass_scores(scores, "a").values()) < 2.0  # some samples pass, some do not


def test_neighbours_batching_and_evaluating_again_do_not_change_pass_at_k(engine_and_tasks: Any) -> None:
    engine, tokenizer, tasks = engine_and_tasks
    alone, _ = evaluate(engine, [EvalRequest("a", 0, tasks, seed=7)], config(), tokenizer)
    together, _ = evaluate(engine, [EvalRequest("b", 1, tasks, seed=3), EvalRequest("a", 0, tasks, seed=7),
                                    EvalRequest("base", None, tasks, seed=3)], config(), tokenizer)
    small_passes, _ = evaluate(engine, [EvalRequest("a", 0, tasks, seed=7), EvalRequest("b", 1, tasks, seed=3)],
                               config(batch_size=8), tokenizer)  # one example per adapter per pass
    again, _ = evaluate(engine, [EvalRequest("a", 0, tasks, seed=7)], config(), tokenizer)
    assert pass_scores(together, "a") == pass_scores(alone, "a") == pass_scores(small_passes, "a")
    assert pass_scores(again, "a") == pass_scores(alone, "a")
    assert pass_scores(small_passes, "b") == pass_scores(together, "b")
    other_seed, _ = evaluate(engine, [EvalRequest("a", 0, tasks, seed=8)], config(samples=20), tokenizer)
    more, _ = evaluate(engine, [EvalRequest("a", 0, tasks, seed=7)], config(samples=20), tokenizer)
    assert pass_scores(other_seed, "a") != pass_scores(more, "a")  # the seed does drive the samples


def test_the_base_alone_samples_as_an_adapter_at_b_zero(engine_and_tasks: Any) -> None:
    """Slot None (before training) is the base with no adapter: the same samples as slot 2, whose B is 0."""
    engine, tokenizer, tasks = engine_and_tasks
    scores, _ = evaluate(engine, [EvalRequest("zero", 2, tasks, seed=5), EvalRequest("base", None, tasks, seed=5),
                                  EvalRequest("base-again", None, tasks, seed=5)], config(), tokenizer)
    assert pass_scores(scores, "base") == pass_scores(scores, "zero") == pass_scores(scores, "base-again")


def test_a_failing_reward_fails_only_its_adapter(engine_and_tasks: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, tokenizer, tasks = engine_and_tasks
    reference, _ = evaluate(engine, [EvalRequest("a", 0, tasks[:1], seed=1)], config(), tokenizer)
    load_reward(tasks[0].reward).__globals__["calls"].clear()
    monkeypatch.setenv("FAIL_ON", "2")  # calls: adapter a, then adapter b (one task)
    failures: dict[str, str] = {}
    scores, _ = evaluate(engine, [EvalRequest("a", 0, tasks[:1], seed=1), EvalRequest("b", 1, tasks[:1], seed=2)],
                         config(), tokenizer, failures)
    assert list(failures) == ["b"] and "RuntimeError: cannot score this" in failures["b"]
    assert math.isnan(scores["b"]["copy"]["pass_at_k"])
    assert pass_scores(scores, "a") == pass_scores(reference, "a")


def test_a_workers_kept_base_scores_are_a_fresh_evaluations_per_data_and_seed_and_a_failed_reward_is_retried(
    engine_and_tasks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter starting later takes the base's row of R from the worker (eval.base_rows): the scores a fresh
    evaluation gives, kept per eval data and (pass_at_k's samples are seeded) per seed; a reward that failed on the
    base is not kept but tried again (it may have failed once: a service, a timeout)."""
    engine, tokenizer, tasks = engine_and_tasks
    settings = config(metrics=("pass_at_k", "loss", "exact_match"))
    evaluated: list[list[str]] = []  # the requests every real evaluation was given
    real = base_rows.evaluate

    def recording(engine: Any, requests: list[EvalRequest], *args: Any) -> Any:
        evaluated.append([r.key for r in requests])
        return real(engine, requests, *args)

    monkeypatch.setattr(base_rows, "evaluate", recording)
    kept, failures = base_rows.KeptBaseScores(), {}
    first, _, reused = kept.evaluate(engine, [EvalRequest("x", None, tasks, seed=3), EvalRequest("a", 0, tasks)],
                                     settings, tokenizer, failures)
    later, seconds, reused_later = kept.evaluate(engine, [EvalRequest("y", None, tasks, seed=3)], settings, tokenizer,
                                                 failures)
    other_seed, _, _ = kept.evaluate(engine, [EvalRequest("z", None, tasks, seed=4)], settings, tokenizer, failures)
    assert evaluated == [["x", "a"], ["z"]] and (reused, reused_later, seconds) == (set(), {"y"}, 0.0)
    fresh, _ = evaluate(engine, [EvalRequest("y", None, tasks, seed=3)], settings, tokenizer)
    fresh_other, _ = evaluate(engine, [EvalRequest("z", None, tasks, seed=4)], settings, tokenizer)
    assert later["y"] == first["x"] == fresh["y"] and other_seed["z"] == fresh_other["z"] and not failures
    later["y"]["copy"]["loss"] = -1.0  # each adapter's scores are its own copy
    assert kept.evaluate(engine, [EvalRequest("w", None, tasks, seed=3)], settings, tokenizer, {})[0]["w"] == first["x"]

    load_reward(tasks[0].reward).__globals__["calls"].clear()
    monkeypatch.setenv("FAIL_ON", "1")  # the base's first reward call raises, the next ones do not
    failing, failures, evaluated[:] = base_rows.KeptBaseScores(), {}, []
    failing.evaluate(engine, [EvalRequest("x", None, tasks[:1], seed=5)], settings, tokenizer, failures)
    retried, _, _ = failing.evaluate(engine, [EvalRequest("y", None, tasks[:1], seed=5)], settings, tokenizer,
                                     failures)
    failing.evaluate(engine, [EvalRequest("v", None, tasks[:1], seed=5)], settings, tokenizer, failures)
    assert list(failures) == ["x"] and "cannot score this" in failures["x"]
    assert evaluated == [["x"], ["y"]]  # y tried again (and passed): kept from then on
    fresh, _ = evaluate(engine, [EvalRequest("y", None, tasks[:1], seed=5)], settings, tokenizer)
    assert retried["y"] == fresh["y"]


def test_samples_below_pass_k_is_one_line_at_validate(tmp_path: Path) -> None:
    sweep = micro_sweep(eval={"metrics": ["loss", "pass_at_k"], "pass_k": 4, "samples": 2})
    result = mlora("validate", write_sweep(tmp_path, sweep))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "eval.samples: must be >= eval.pass_k (n samples per example to estimate pass@k from; "
        "got samples 2 < pass_k 4)"]
    tasks_file = tmp_path / "tasks.yaml"
    tasks_file.write_text(json.dumps({"tasks": sweep["tasks"], "eval": {"pass_k": 3, "samples": 1}}))
    with pytest.raises(ConfigError) as error:
        load_task_suite(tasks_file)
    assert [line.split(" (")[0] for line in error.value.problems] == ["eval.samples: must be >= eval.pass_k"]


@pytest.mark.slow
def test_a_run_writes_pass_at_k_for_every_task_and_eval_reproduces_it(tmp_path: Path) -> None:
    sweep = micro_sweep(
        name="passk", devices="cpu", seed=3,
        tasks=builtin_tasks("copy", "reverse", train_examples=16, eval_examples=4, reward="python:./lucky.py:lucky"),
        adapter={"rank": 4, "target_modules": list(TARGETS)},
        eval={"metrics": ["loss", "pass_at_k"], "samples": 4, "pass_k": 2, "max_new_tokens": 6},
        sweep={"grid": {"adapter.lr": [1e-2, 3e-3]}},
    )
    (tmp_path / "lucky.py").write_text(LUCKY)
    result, run_dir, results = run_cli(tmp_path, sweep)
    assert "pass@k" in result.output  # the tables show it
    for name, entry in results["adapters"].items():
        assert entry["status"] == "done"
        assert [len(row) for row in entry["matrix"]["pass_at_k"]] == [2, 2, 2]
        assert all(0.0 < value < 1.0 for row in entry["matrix"]["pass_at_k"] for value in row)  # lucky passes some
        assert set(entry["final"]) == {"copy", "reverse"} and all("pass_at_k" in s for s in entry["final"].values())
        assert "pass_at_k" in entry["cl_metrics"]
        assert (run_dir / "plots" / f"{name}-pass_at_k-heatmap.png").is_file()
    with (run_dir / "forgetting.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row["metric"] == "pass_at_k"]
    assert {(row["adapter"], row["after_task"], row["eval_task"]) for row in rows} == {
        (name, str(after), task) for name in results["adapters"] for after in range(3) for task in ("copy", "reverse")}

    again = mlora("eval", run_dir)
    assert again.exit_code == 0, again.output
    (eval_dir,) = (run_dir / "evals").iterdir()
    recomputed = json.loads((eval_dir / "results.json").read_text())["adapters"]
    for name, entry in results["adapters"].items():
        assert recomputed[name]["matrix"]["pass_at_k"] == entry["matrix"]["pass_at_k"]
