"""Every table mlora prints reads whole at 80 columns: no header, adapter name or number cut to `…` or wrapped,
no line past the width; at 140 columns the tables that have wide variants add their columns."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import micro_sweep, mlora, write_sweep
from rich.console import Console

from mlora_cli.eval import metrics as cl
from mlora_cli.report.benchmark import bench_tables
from mlora_cli.report.format import format_metric
from mlora_cli.report.progress import ProgressView
from mlora_cli.report.tables import (
    adapters_eval_table,
    cl_seed_table,
    cl_table,
    matrix_panel,
    plan_table,
    print_cl_report,
    print_summary,
    results_table,
)
from mlora_cli.spec.load import parse_spec
from mlora_cli.spec.plan import assign, resolve_devices
from mlora_cli.spec.sweep import expand

TASKS = ["copy", "reverse", "sort"]
METRICS = ("exact_match", "token_accuracy", "loss")
# Two configurations x two seeds, as `sweep.grid` x `sweep.seeds` names them, and a failed third configuration.
CONFIGS = {"r8-lr1e-3": (8, 1e-3), "r32-lr3e-3": (32, 3e-3)}
NAMES = [f"{label}-s{seed}" for label in CONFIGS for seed in (0, 1)]
FAILED = "r64-lr1e-2-s0"


def accuracy_matrix(k: int) -> list[list[float]]:
    """R for an accuracy metric, different per adapter: each task learned, then partly forgotten."""
    learned = [0.97 - 0.05 * k, 0.91 - 0.03 * k, 0.88 + 0.02 * k]
    return [
        [0.02, 0.01, 0.0],
        [learned[0], 0.05 + 0.01 * k, 0.03],
        [learned[0] - 0.21 - 0.02 * k, learned[1], 0.07 - 0.01 * k],
        [learned[0] - 0.33 - 0.04 * k, learned[1] - 0.12 - 0.03 * k, learned[2]],
    ]


def loss_matrix(k: int) -> list[list[float]]:
    learned = [0.3123 + 0.05 * k, 0.4412 - 0.02 * k, 0.2876 + 0.01 * k]
    return [
        [3.8871, 4.1202, 3.9954],
        [learned[0], 3.5127 - 0.1 * k, 3.7712],
        [learned[0] + 1.2301 + 0.1 * k, learned[1], 3.6612 + 0.05 * k],
        [learned[0] + 1.9876 + 0.2 * k, learned[1] + 0.9123 + 0.1 * k, learned[2]],
    ]


def curve(matrices: dict[str, list[list[float]]]) -> list[dict[str, Any]]:
    """Evaluations every 5 steps of 3 tasks x 20 steps: the boundary scores, and a dip mid-way through each task."""
    points = []
    for step in range(0, 61, 5):
        task_index = min(max(step - 1, 0) // 20, 2)
        row = 0 if step == 0 else min(step // 20 + (step % 20 > 0), 3)
        mid = step % 20 == 10
        scores = {}
        for j, task in enumerate(TASKS):
            scores[task] = {}
            for metric, R in matrices.items():
                value = R[row][j]
                if mid and j < task_index:  # a stability gap: earlier tasks sag while the next one trains
                    value = value * 0.8 if metric != "loss" else value * 1.3
                scores[task][metric] = value
        point = {"step": step, "task_index": task_index, "scores": scores}
        if step % 20 == 0:
            point["after_task"] = step // 20
        points.append(point)
    return points


def adapter_entry(name: str, k: int) -> dict[str, Any]:
    matrices = {"exact_match": accuracy_matrix(k), "token_accuracy": [[min(1.0, x + 0.06) for x in row]
                                                                      for row in accuracy_matrix(k)],
                "loss": loss_matrix(k)}
    final = {task: {m: matrices[m][-1][j] for m in METRICS} for j, task in enumerate(TASKS)}
    label, _, seed = name.rpartition("-s")
    rank, lr = CONFIGS[label]
    return {
        "name": name, "seed": int(seed), "status": "done", "config": {"adapter": {"rank": rank, "lr": lr}},
        "final": final, "final_mean": {m: sum(final[t][m] for t in TASKS) / len(TASKS) for m in METRICS},
        "matrix": matrices, "curve": curve(matrices), "steps": 60, "train_tokens": 123_456,
        "train_tokens_per_s": 12_345.6 + 1000 * k, "steps_per_s": 3.21 + k, "train_seconds": 118.7 + k,
        "eval_seconds": 12.3 + k,
    }


def fake_results() -> dict[str, Any]:
    adapters = {name: adapter_entry(name, k) for k, name in enumerate(NAMES)}
    partial = adapter_entry(NAMES[0], 0)
    adapters[FAILED] = {
        **partial, "name": FAILED, "seed": 0, "status": "failed", "config": {"adapter": {"rank": 64, "lr": 1e-2}},
        "final": {}, "final_mean": {}, "matrix": {m: R[:2] for m, R in partial["matrix"].items()}, "curve": [],
        "train_tokens_per_s": 0.0, "steps_per_s": 0.0, "train_seconds": 0.0, "eval_seconds": 0.0,
        "failure": "gradient norm 1.2e+05 above grad_norm_limit",
    }
    run = {"name": "cl-grid", "tasks": TASKS, "base_model": "builtin:tiny", "failed": [FAILED],
           "adapter_count": len(adapters), "wall_seconds": 321.0, "train_tokens_per_s": 45_678.0,
           "peak_rss_mib": 2345.0, "run_dir": "runs/cl-grid-20250101-120000"}
    return {"adapters": adapters, "run": run}


def render(renderable: Any, width: int = 80) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.export_text()


def tokens(text: str) -> set[str]:
    """Every run of characters between spaces and table rules: a number or name cut or wrapped is not among them."""
    return set(re.findall(r"[^\s│┃]+", text))


def flat(text: str) -> str:
    """The text with its line breaks and rules gone: for captions and titles, which may wrap."""
    return " ".join(re.findall(r"[^\s│┃]+", text))


def assert_fits(text: str, width: int = 80) -> None:
    assert "…" not in text, text
    too_long = [line for line in text.splitlines() if len(line) > width]
    assert not too_long, "\n".join(too_long)


def headers(table: Any) -> list[str]:
    return [str(c.header) for c in table.columns]


def cl_numbers(results: dict[str, Any], metric: str, columns: list[str]) -> set[str]:
    numbers = set()
    for entry in results["adapters"].values():
        values = cl.entry_cl_metrics(entry, TASKS).get(metric, {})
        for column in columns:
            if values.get(column) is not None:
                text = format_metric(metric, values[column])
                signed = column in ("bwt", "fwt", "forgetting", "largest_dip") and values[column] > 0
                numbers.add(f"+{text}" if signed else text)
    return numbers


ALL_CL = ["acc", "bwt", "fwt", "forgetting", "learning_acc", "min_acc", "largest_dip"]


@pytest.mark.parametrize("metric", ["exact_match", "token_accuracy"])
def test_cl_table_of_a_percent_metric_shows_every_column_at_80(metric: str) -> None:
    results = fake_results()
    table = cl_table(results, metric)
    text = render(table)
    assert_fits(text)
    assert headers(table) == ["adapter", "ACC\n%", "BWT\npp", "FWT\npp", "forget\npp", "learn\n%", "worst\n%",
                              "dip\npp"]
    assert set(results["adapters"]) <= tokens(text)
    assert cl_numbers(results, metric, ALL_CL) <= tokens(text)
    assert "pp: percentage points" in flat(text) and "dip: largest stability gap" in flat(text)


def test_cl_table_on_loss_leaves_out_fwt_at_80_and_shows_it_when_wider() -> None:
    results = fake_results()
    table = cl_table(results, "loss")
    text = render(table)
    assert_fits(text)
    assert headers(table) == ["adapter", "ACC\nloss", "BWT\nloss", "forget\nloss", "learn\nloss", "worst\nloss",
                              "dip\nloss"]
    assert set(results["adapters"]) <= tokens(text)
    shown = [c for c in ALL_CL if c != "fwt"]
    assert cl_numbers(results, "loss", shown) <= tokens(text)
    assert "left out to fit 80 columns: FWT loss" in flat(text)
    wide = cl_table(results, "loss", width=140)
    wide_text = render(wide, 140)
    assert_fits(wide_text, 140)
    assert "FWT\nloss" in headers(wide) and "left out" not in wide_text
    assert cl_numbers(results, "loss", ALL_CL) <= tokens(wide_text)


@pytest.mark.parametrize("metric", METRICS)
def test_cl_seed_table_fits_80_and_keeps_every_column(metric: str) -> None:
    results = fake_results()
    text = render(cl_seed_table(results, metric))
    assert_fits(text)
    for label, names in cl.seed_groups(results).items():
        line = next(line for line in text.splitlines() if line.lstrip("│┃ ").startswith(label + " "))
        assert f" {len(names)} " in line
    for header in ("ACC", "BWT", "FWT", "forget", "learn", "worst", "dip"):
        assert header in tokens(text)
    groups = cl.seed_groups(results)
    r8 = [cl.entry_cl_metrics(results["adapters"][n], TASKS)[metric]["acc"] for n in groups["r8-lr1e-3"]]
    stats = cl.aggregate(r8)
    assert f"{format_metric(metric, stats['mean'])} ± {format_metric(metric, stats['std'])}" in text


def test_results_table_fits_80_and_adds_steps_per_second_when_wider() -> None:
    results = fake_results()
    table = results_table(results)
    text = render(table)
    assert_fits(text)
    assert set(results["adapters"]) <= tokens(text)
    assert "steps\n/s" not in headers(table)
    for entry in results["adapters"].values():
        expected = {format_metric(m, v) for m, v in entry["final_mean"].items()}
        expected |= {f"{entry['train_tokens_per_s']:,.0f}", f"{entry['train_seconds']:.1f}",
                     f"{entry['eval_seconds']:.1f}"}
        assert expected <= tokens(text), expected - tokens(text)
    assert "exact: exact match" in flat(text) and "token acc: token accuracy" in flat(text)
    wide = results_table(results, width=140)
    wide_text = render(wide, 140)
    assert_fits(wide_text, 140)
    assert "steps\n/s" in headers(wide)
    assert {f"{e['steps_per_s']:.2f}" for e in results["adapters"].values()} <= tokens(wide_text)


def test_print_summary_and_cl_report_fit_80() -> None:
    console = Console(width=80, record=True, file=io.StringIO(), color_system=None)
    print_cl_report(console, fake_results(), matrices=True)
    print_summary(console, fake_results())
    text = console.export_text()
    assert_fits(text)
    assert "r32-lr3e-3-s1: exact_match (%)" in text and "mean ± std over seeds" in flat(text)


def test_matrix_panel_continues_in_a_second_table_when_tasks_do_not_fit() -> None:
    entry = fake_results()["adapters"]["r32-lr3e-3-s1"]
    text = render(matrix_panel(entry, "loss", TASKS))
    assert_fits(text)
    assert {format_metric("loss", x) for row in entry["matrix"]["loss"] for x in row} <= tokens(text)
    many = [f"task-{i:02d}" for i in range(12)]
    R = [[0.01 * (i + j) for j in range(12)] for i in range(13)]
    text = render(matrix_panel({"name": "r32-lr3e-3-s1", "matrix": {"exact_match": R}}, "exact_match", many))
    assert_fits(text)
    assert set(many) <= tokens(text) and "(continued)" in text
    assert {format_metric("exact_match", x) for row in R for x in row} <= tokens(text)


def test_adapters_eval_table_is_one_table_per_metric() -> None:
    results = fake_results()
    del results["adapters"][FAILED]
    text = render(adapters_eval_table(results))
    assert_fits(text)
    for metric in METRICS:
        header = f"{metric} (%)" if metric != "loss" else "loss"
        assert f"{len(NAMES)} adapters on builtin:tiny: {header}" in text
    for entry in results["adapters"].values():
        scores = {format_metric(m, entry["final"][t][m]) for t in TASKS for m in METRICS}
        scores |= {format_metric(m, v) for m, v in entry["final_mean"].items()}
        assert scores <= tokens(text), scores - tokens(text)
    assert set(NAMES) | set(TASKS) <= tokens(text)


def make_plan(**sweep: Any) -> tuple[Any, list[Any]]:
    spec = parse_spec({
        "name": "cl-grid", "base_model": "builtin:micro", "devices": "cpu:2",
        "tasks": [{"name": t, "source": f"builtin:{t}"} for t in TASKS],
        "train": {"steps_per_task": 40}, "sweep": sweep,
    })
    adapters = expand(spec)
    return spec, assign(adapters, spec, resolve_devices(spec.devices, 0, 2))


def test_plan_table_fits_80_with_the_devices_below() -> None:
    spec, plans = make_plan(grid={"adapter.rank": [8, 32], "adapter.lr": [1e-4, 3e-3]}, seeds=[0, 1])
    names = [a.name for p in plans for a in p.adapters]
    assert "r32-lr3e-3-s1" in names
    table = plan_table(spec, plans)
    text = render(table)
    assert_fits(text)
    assert set(names) <= tokens(text)
    assert {"0.0001", "0.003", "120"} <= tokens(text)
    assert "worker 0: cpu, 1 thread, 4 adapters; worker 1: cpu, 1 thread, 4 adapters" in flat(text)
    assert "device" not in headers(table)
    wide = plan_table(spec, plans, width=140)
    wide_text = render(wide, 140)
    assert_fits(wide_text, 140)
    assert "device" in headers(wide) and "cpu, 1 thread" in wide_text.split("┩")[1]


def test_plan_table_moves_shared_settings_to_the_caption_for_long_names() -> None:
    spec, plans = make_plan(grid={"adapter.rank": [8, 32], "adapter.lr": [1e-4, 3e-3], "adapter.dropout": [0.0, 0.05],
                                  "train.batch_size": [4, 16]}, seeds=[0, 1])
    names = [a.name for p in plans for a in p.adapters]
    assert max(len(n) for n in names) == 25
    text = render(plan_table(spec, plans))
    assert_fits(text)
    assert set(names) <= tokens(text)
    assert "every adapter: steps 120" in flat(text)


def bench_report() -> dict[str, Any]:
    def mode(wall: float, ratio: float | None) -> dict[str, Any]:
        figures = {"wall_seconds": wall, "experiments": 8, "experiments_per_hour": 8 / wall * 3600,
                   "mean_experiment_seconds": wall / 3, "train_tokens_per_s": 123_456 / wall, "eval_seconds": wall / 10,
                   "peak_rss_mib": 1234.5 + wall}
        if ratio is not None:
            figures |= {"throughput_vs_sequential": ratio, "mean_experiment_time_vs_sequential": ratio * 1.7}
        return figures

    names = [f"r{r}-lr{lr}" for r in (4, 8, 16, 32) for lr in ("1e-3", "3e-3")]
    return {
        "sweep": "bench", "adapters": 8,
        "machine": {"cpu": "AMD EPYC 7B13 64-Core Processor", "cores": 2, "torch": "2.5.1+cpu"},
        "modes": {"sequential": mode(401.2, 1.0), "concurrent": mode(123.4, 3.25), "engine-serial": mode(210.9, 1.9),
                  "concurrent@2": mode(180.1, 2.23), "concurrent@4": mode(140.7, 2.85)},
        "fusion": {"adapters": 8, "rows_per_adapter": 4, "union_rank": 15, "fused_step_seconds": 0.1414,
                   "union_step_seconds": 0.1234, "fusion_efficiency_train": 0.873, "fused_eval_seconds": 1.32,
                   "union_eval_seconds": 1.23, "fusion_efficiency_eval": 0.932, "torch_threads": 1},
        "experiment_throughput_ratio": 3.25, "memory_below_two_sequential": True,
        "concurrency_curve": {"1": 136.6, "2": 159.9, "4": 204.7, "8": 233.4},
        "agreement": {n: {"max_early_loss_rel_delta": 3e-8 * (i + 1), "max_loss_rel_delta": 0.000123 * (i + 1),
                          "max_exact_match_delta": 0.0156 * (i % 2), "agree": i != 3} for i, n in enumerate(names)},
        "agreement_tolerances": {"early_steps": 5, "early_loss": 1e-4, "final_loss": 0.1, "exact_match": 0.05},
    }


def test_bench_tables_fit_80_and_add_the_experiment_time_ratio_when_wider() -> None:
    report = bench_report()
    tables = bench_tables(report)
    text = "\n".join(render(table) for table in tables)
    assert_fits(text)
    modes = tables[0]
    assert "time\nvs seq" not in headers(modes)
    for name, m in report["modes"].items():
        expected = {name, f"{m['wall_seconds']:.1f}", f"{m['experiments_per_hour']:,.0f}",
                    f"{m['mean_experiment_seconds']:.1f}", f"{m['train_tokens_per_s']:,.0f}",
                    f"{m['eval_seconds']:.1f}", f"{m['peak_rss_mib']:,.0f}", f"{m['throughput_vs_sequential']:.2f}x"}
        assert expected <= tokens(text), expected - tokens(text)
    assert {"0.87", "0.93", "3.25x", "yes", "137", "160", "205", "233"} <= tokens(text)
    assert "fusion efficiency (train)" in text and "fusion efficiency (eval)" in text
    for name, verdict in report["agreement"].items():
        assert name in tokens(text) and f"{100 * verdict['max_loss_rel_delta']:.3f}" in tokens(text)
    assert "disagree" in tokens(text)
    wide = bench_tables(report, width=140)
    wide_text = render(wide[0], 140)
    assert_fits(wide_text, 140)
    assert "time\nvs seq" in headers(wide[0]) and "5.52x" in tokens(wide_text)


def test_progress_line_fits_80_with_a_compact_loss() -> None:
    spec, plans = make_plan(grid={"adapter.rank": [8, 32], "adapter.lr": [1e-4, 3e-3]}, seeds=[0, 1])
    console = Console(width=80, record=True, file=io.StringIO(), color_system=None)
    view = ProgressView(console, spec)
    view({"event": "run_start", "run_dir": "runs/x", "plans": plans})
    losses = [0.8012, 0.3111, 0.52, 0.61, 0.4, 0.55, 0.47, 0.49, 0.66]
    view({"event": "step", "worker": 0, "records": [{"loss": x} for x in losses]})
    view({"event": "eval", "worker": 1, "after_task": 2})
    console.print(view.progress.make_tasks_table(view.progress.tasks))
    text = console.export_text()
    assert_fits(text)
    lines = text.splitlines()
    assert len(lines) == 2, text
    assert "loss 0.53 (0.31-0.80)" in lines[0] and "9/480 steps" in lines[0]
    assert "eval after task 2" in lines[1] and lines[1].startswith("worker 1 cpu")


def test_a_run_on_a_terminal_shows_live_bars_through_every_worker_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mlora run` with a terminal for stdout (the live bars, not the plain lines a pipe gets): every event a worker
    sends reaches ProgressView, base loading included, and the run ends as off a terminal."""
    from mlora_cli import cli

    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(width=100, file=screen, force_terminal=True, color_system=None))
    result = mlora("run", write_sweep(tmp_path, micro_sweep(eval={"metrics": ["loss"]})), "--no-plots")
    assert result.exit_code == 0, result.output
    text = screen.getvalue()
    assert "base loaded in" in text and "6/6 steps" in text, text  # the bar, through base loading, filled
    assert "continual learning on loss" in text  # the tables after it
