"""Continual-learning metrics against hand-made matrices and curves with answers worked out by hand."""

from __future__ import annotations

import csv
import random
import subprocess
import sys
from typing import Any

import pytest

from mlora_cli.eval import metrics as cl
from mlora_cli.report.outputs import forgetting_rows, write_forgetting_csv

approx = pytest.approx

# Rows: before, after task 1, after task 2, after task 3; columns: evaluated on task 1, 2, 3.
R3 = [
    [0.0, 0.1, 0.2],
    [0.8, 0.3, 0.1],
    [0.5, 0.9, 0.4],
    [0.4, 0.7, 1.0],
]


def test_one_task_has_no_transfer_or_forgetting() -> None:
    assert cl.cl_metrics([[0.1], [0.8]], higher_is_better=True) == {
        "acc": approx(0.8),
        "bwt": None,
        "fwt": None,
        "forgetting": None,
        "learning_acc": approx(0.8),
    }


def test_two_tasks() -> None:
    R = [[0.1, 0.2], [0.9, 0.4], [0.6, 0.8]]
    assert cl.cl_metrics(R, higher_is_better=True) == {
        "acc": approx((0.6 + 0.8) / 2),
        "bwt": approx(0.6 - 0.9),
        "fwt": approx(0.4 - 0.2),
        "forgetting": approx(0.9 - 0.6),
        "learning_acc": approx((0.9 + 0.8) / 2),
    }


def test_three_tasks() -> None:
    assert cl.average_accuracy(R3) == approx((0.4 + 0.7 + 1.0) / 3)
    assert cl.learning_accuracy(R3) == approx((0.8 + 0.9 + 1.0) / 3)
    assert cl.backward_transfer(R3) == approx(((0.4 - 0.8) + (0.7 - 0.9)) / 2)
    assert cl.forward_transfer(R3) == approx(((0.3 - 0.1) + (0.4 - 0.2)) / 2)
    assert cl.forgetting(R3) == approx(((0.8 - 0.4) + (0.9 - 0.7)) / 2)


def test_perfect_retention() -> None:
    R = [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert cl.cl_metrics(R, higher_is_better=True) == {
        "acc": 1.0,
        "bwt": 0.0,
        "fwt": 0.0,
        "forgetting": 0.0,
        "learning_acc": 1.0,
    }


def test_total_forgetting() -> None:
    R = [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert cl.cl_metrics(R, higher_is_better=True) == {
        "acc": approx(1 / 3),
        "bwt": -1.0,
        "fwt": 0.0,
        "forgetting": 1.0,
        "learning_acc": 1.0,
    }


def test_positive_backward_transfer() -> None:
    R = [[0.0, 0.0], [0.5, 0.0], [0.8, 0.9]]
    values = cl.cl_metrics(R, higher_is_better=True)
    assert values["bwt"] == approx(0.3)
    assert values["forgetting"] == approx(-0.3)  # the final score beats every earlier one


def test_forgetting_max_includes_rows_before_the_task_was_trained() -> None:
    # Task 2 scored 0.9 after task 1 (before its own training), 0.5 after it and at the end: the formula
    # (max over l = 1..T-1, as in Chaudhry et al.) counts 0.9 - 0.5; the l >= j variant would give 0.
    R = [[0.0, 0.0, 0.0], [1.0, 0.9, 0.0], [1.0, 0.5, 0.0], [1.0, 0.5, 1.0]]
    assert cl.forgetting(R) == approx((0.0 + 0.4) / 2)


def test_loss_is_signed_so_that_transfer_reads_like_accuracy() -> None:
    R = [[3.0, 3.0], [1.0, 2.5], [2.0, 0.5]]
    assert cl.cl_metrics(R, higher_is_better=False) == {
        "acc": approx((2.0 + 0.5) / 2),  # plain mean loss, not negated
        "bwt": approx(-1.0),  # loss on task 1 rose from 1.0 to 2.0: negative, bad
        "fwt": approx(0.5),  # task 1 lowered task 2's loss from 3.0 to 2.5: positive, good
        "forgetting": approx(1.0),  # 1.0 above the best loss on task 1: positive, bad
        "learning_acc": approx((1.0 + 0.5) / 2),
    }


@pytest.mark.parametrize("R", [[], [[0.1]], [[0.1, 0.2], [0.3]], [[0.1], [0.2, 0.3]]])
def test_malformed_matrices_are_rejected(R: list[list[float]]) -> None:
    assert not cl.is_complete(R)
    with pytest.raises(ValueError, match="accuracy matrix"):
        cl.cl_metrics(R, higher_is_better=True)


def test_unknown_metric_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        cl.higher_is_better("bleu")


TASKS = ["a", "b", "c"]


def accuracy_curve() -> list[dict[str, Any]]:
    """Three tasks; task a dips to 0.4 while b trains, b dips to 0.5 while c trains."""
    rows = [
        (0, 0, {"a": 0.0, "b": 0.0, "c": 0.0}),  # before training
        (5, 0, {"a": 0.5}),
        (10, 0, {"a": 0.9, "b": 0.1, "c": 0.0}),  # boundary after a
        (12, 1, {"a": 0.4, "b": 0.3}),
        (15, 1, {"a": 0.6, "b": 0.6}),
        (20, 1, {"a": 0.7, "b": 0.8, "c": 0.1}),  # boundary after b
        (22, 2, {"a": 0.65, "b": 0.5}),
        (30, 2, {"a": 0.75, "b": 0.7, "c": 0.9}),  # boundary after c
    ]
    return [
        {"step": s, "task_index": t, "scores": {k: {"exact_match": v} for k, v in scores.items()}}
        for s, t, scores in rows
    ]


def test_stability_gap_on_accuracy() -> None:
    curve = accuracy_curve()
    # min over a from its boundary on: 0.4; over b from its boundary on: 0.5.
    assert cl.min_acc(curve, "exact_match", TASKS) == approx((0.4 + 0.5) / 2)
    # a: 0.9 at its end, 0.4 during b; b: 0.8 at its end, 0.5 during c.
    assert cl.largest_dip(curve, "exact_match", TASKS) == approx(0.5)
    shuffled = curve[:]
    random.Random(0).shuffle(shuffled)
    assert cl.min_acc(shuffled, "exact_match", TASKS) == approx(0.45)
    assert cl.largest_dip(shuffled, "exact_match", TASKS) == approx(0.5)


def test_stability_gap_finds_boundaries_by_after_task() -> None:
    # The worker marks boundary evaluations with after_task (the matrix row). Here the boundaries are also tagged
    # with the *next* task's index, so only after_task tells that step 10 closes task a and step 20 closes task b.
    curve = accuracy_curve()
    for point in curve:
        point["after_task"] = {0: 0, 10: 1, 20: 2, 30: 3}.get(point["step"])
        if point["step"] in (10, 20):
            point["task_index"] += 1
    assert cl.min_acc(curve, "exact_match", TASKS) == approx(0.45)
    assert cl.largest_dip(curve, "exact_match", TASKS) == approx(0.5)


def test_stability_gap_on_loss_is_the_worst_loss_and_a_positive_dip() -> None:
    curve = [
        {**p, "scores": {k: {"loss": 1 - v["exact_match"]} for k, v in p["scores"].items()}} for p in accuracy_curve()
    ]
    assert cl.min_acc(curve, "loss", TASKS) == approx((0.6 + 0.5) / 2)  # the highest loss after each task
    assert cl.largest_dip(curve, "loss", TASKS) == approx(0.5)  # a's loss rose from 0.1 to 0.6


def test_no_dip_is_negative_and_missing_data_is_none() -> None:
    steady = [
        {"step": 10, "task_index": 0, "scores": {"a": {"exact_match": 0.5}}},
        {"step": 20, "task_index": 1, "scores": {"a": {"exact_match": 0.7}, "b": {"exact_match": 0.9}}},
    ]
    assert cl.largest_dip(steady, "exact_match", ["a", "b"]) == approx(-0.2)
    assert cl.min_acc(steady, "exact_match", ["a", "b"]) == approx(0.5)
    assert cl.min_acc(steady, "exact_match", ["a"]) is None  # one task: nothing after it
    assert cl.largest_dip([], "exact_match", ["a", "b"]) is None
    assert cl.min_acc(steady, "loss", ["a", "b"]) is None  # the curve holds no loss


def test_aggregate_uses_the_sample_std_and_skips_none() -> None:
    assert cl.aggregate([1.0, 2.0, 3.0, None]) == {"mean": approx(2.0), "std": approx(1.0), "n": 3}
    assert cl.aggregate([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert cl.aggregate([None]) == {"mean": None, "std": None, "n": 0}


def fake_results(adapters: int = 3, tasks: int = 3) -> dict[str, Any]:
    names = [f"t{j}" for j in range(tasks)]
    entries = {}
    for k in range(adapters):
        matrix = {
            "exact_match": [[min(1.0, 0.1 * (i + j + k)) for j in range(tasks)] for i in range(tasks + 1)],
            "loss": [[1.0 + 0.1 * (i - j + k) for j in range(tasks)] for i in range(tasks + 1)],
        }
        entries[f"r{k}"] = {"name": f"r{k}", "seed": 0, "status": "done", "matrix": matrix}
    return {"adapters": entries, "run": {"name": "fake", "tasks": names}}


def test_forgetting_rows_are_every_matrix_entry(tmp_path) -> None:
    results = fake_results(adapters=3, tasks=3)
    rows = forgetting_rows(results)
    assert len(rows) == 3 * (3 + 1) * 3 * 2
    assert rows[0] == {
        "adapter": "r0",
        "seed": 0,
        "after_task": 0,
        "eval_task": "t0",
        "metric": "exact_match",
        "value": 0.0,
    }
    assert {r["after_task"] for r in rows} == {0, 1, 2, 3}
    path = tmp_path / "forgetting.csv"
    write_forgetting_csv(path, results)
    with path.open() as handle:
        read = list(csv.DictReader(handle))
    assert list(read[0]) == ["adapter", "seed", "after_task", "eval_task", "metric", "value"]
    assert len(read) == len(rows)
    match = next(
        r
        for r in read
        if r["adapter"] == "r2" and r["after_task"] == "3" and r["eval_task"] == "t1" and r["metric"] == "loss"
    )
    assert float(match["value"]) == approx(1.0 + 0.1 * (3 - 1 + 2))


def test_a_failed_adapter_contributes_the_rows_it_reached() -> None:
    results = fake_results(adapters=1, tasks=3)
    entry = results["adapters"]["r0"]
    entry["status"] = "failed"
    entry["matrix"] = {m: R[:2] for m, R in entry["matrix"].items()}
    assert len(forgetting_rows(results)) == 2 * 3 * 2
    assert cl.entry_cl_metrics(entry, results["run"]["tasks"]) == {}


def test_entry_cl_metrics_adds_stability_gap_with_a_curve() -> None:
    entry = {"name": "x", "matrix": {"exact_match": R3}, "curve": accuracy_curve()}
    values = cl.entry_cl_metrics(entry, TASKS)["exact_match"]
    assert values["bwt"] == approx(-0.3)
    assert values["min_acc"] == approx(0.45)
    assert values["largest_dip"] == approx(0.5)


def test_metrics_do_not_import_torch() -> None:
    code = "import sys, mlora_cli.eval.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_add_cl_metrics_fills_entries_and_seed_aggregates() -> None:
    from mlora_cli.eval.metrics import add_cl_metrics

    def entry(name: str, seed: int, forgotten: float) -> dict:
        R = [[0.0, 0.0], [1.0, 0.0], [1.0 - forgotten, 1.0]]
        return {"name": name, "seed": seed, "config": {"adapter": {"rank": 4}}, "matrix": {"exact_match": R},
                "final_mean": {"exact_match": (2.0 - forgotten) / 2}}

    results = {"run": {"tasks": ["a", "b"]},
               "adapters": {"x-s0": entry("x-s0", 0, 1.0), "x-s1": entry("x-s1", 1, 0.5)}}
    add_cl_metrics(results)
    assert results["adapters"]["x-s0"]["cl_metrics"]["exact_match"]["bwt"] == -1.0
    aggregate = results["aggregates"]["x"]
    assert aggregate["adapters"] == ["x-s0", "x-s1"]
    assert aggregate["cl_metrics"]["exact_match"]["bwt"]["mean"] == -0.75
    assert aggregate["cl_metrics"]["exact_match"]["bwt"]["n"] == 2
    assert abs(aggregate["cl_metrics"]["exact_match"]["bwt"]["std"] - 0.3535533905932738) < 1e-12
    assert aggregate["final_mean"]["exact_match"]["mean"] == 0.625
