"""CL tables, matrix panels and PNG plots of a hand-made results dict (plots skip without matplotlib)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from mlora_cli.report import plots
from mlora_cli.report.tables import cl_seed_table, cl_table, matrix_panel, print_cl_report

TASKS = ["copy", "reverse", "sort"]

# "keeper" retains everything, "forgetter" forgets every earlier task, "partial" fails after one task.
KEEPER = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
FORGETTER = [[0.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.3, 0.8, 0.0], [0.0, 0.2, 0.7]]
KEEPER_LOSS = [[3.0, 3.0, 3.0], [0.5, 3.0, 3.0], [0.5, 0.5, 3.0], [0.5, 0.5, 0.5]]
FORGETTER_LOSS = [[3.0, 3.0, 3.0], [0.5, 3.0, 3.0], [2.0, 0.6, 3.0], [2.5, 1.5, 0.7]]


def curve() -> list[dict[str, Any]]:
    points = []
    for step in range(0, 31, 5):
        task_index = min(max(step - 1, 0) // 10, 2)
        scores = {
            name: {
                "exact_match": max(0.0, 1 - abs(step - 10 * (j + 1)) / 15),
                "loss": 1 + abs(step - 10 * (j + 1)) / 10,
            }
            for j, name in enumerate(TASKS)
        }
        points.append({"step": step, "task_index": task_index, "scores": scores})
    return points


def entry(name: str, seed: int, em: list[list[float]], loss: list[list[float]], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "seed": seed,
        "status": "done",
        "config": {"rank": name[:1]},
        "matrix": {"exact_match": em, "loss": loss},
        **extra,
    }


def fake_results() -> dict[str, Any]:
    adapters = [
        entry("keeper", 0, KEEPER, KEEPER_LOSS, curve=curve()),
        entry("forgetter", 0, FORGETTER, FORGETTER_LOSS),
        {**entry("partial", 0, KEEPER[:2], KEEPER_LOSS[:2]), "status": "failed"},
    ]
    return {"adapters": {a["name"]: a for a in adapters}, "run": {"name": "fake", "tasks": TASKS}}


def render(renderable: Any) -> str:
    console = Console(record=True, width=220, color_system=None)
    console.print(renderable)
    return console.export_text()


def row(text: str, label: str) -> str:
    """The table line whose first cell is `label`."""
    return next(line for line in text.splitlines() if line.lstrip("│┃ ").startswith(label + " "))


def cells(table: Any, header_start: str) -> list[str]:
    column = next(c for c in table.columns if str(c.header).startswith(header_start))
    return list(column.cells)


def test_cl_table_shows_every_metric_and_marks_the_best() -> None:
    results = fake_results()
    table = cl_table(results, "exact_match")
    text = render(table)
    assert [str(c.header) for c in table.columns] == [
        "adapter", "ACC\n%", "BWT\npp", "FWT\npp", "forget\npp", "learn\n%", "worst\n%", "dip\npp"
    ]
    keeper = row(text, "keeper")
    assert "100.0" in keeper and "0.0" in keeper
    forgetter = row(text, "forgetter")
    # ACC (0+0.2+0.7)/3, BWT ((0-0.9)+(0.2-0.8))/2, FWT ((0.1-0)+(0-0))/2, forgetting (0.9+0.8-0.2)/2, LA 0.8
    for number in ("30.0", "-75.0", "+5.0", "+75.0", "80.0"):
        assert number in forgetter
    partial = row(text, "partial")
    assert "-" in partial and "100.0" not in partial
    assert cells(table, "ACC")[:2] == ["[bold green]100.0[/]", "30.0"]
    assert cells(table, "forget")[:2] == ["[bold green]0.0[/]", "+75.0"]


def test_cl_table_on_loss_prefers_the_lowest_loss() -> None:
    table = cl_table(fake_results(), "loss")
    text = render(table)
    headers = [str(c.header) for c in table.columns]
    assert "ACC\nloss" in headers and "worst\nloss" in headers  # worst: the highest loss (min-ACC on loss)
    forgetter = row(text, "forgetter")
    # ACC (2.5+1.5+0.7)/3; forgetting on -loss: ((2.5-0.5) + (1.5-0.6))/2 = 1.45
    assert "1.5667" in forgetter and "+1.4500" in forgetter
    assert cells(table, "ACC")[:2] == ["[bold green]0.5000[/]", "1.5667"]


def test_cl_seed_table_averages_seeds() -> None:
    results = fake_results()
    del results["adapters"]["partial"]
    results["adapters"] = {
        "k-s0": entry("k-s0", 0, KEEPER, KEEPER_LOSS),
        "k-s1": entry("k-s1", 1, FORGETTER, FORGETTER_LOSS),
    }
    text = render(cl_seed_table(results, "exact_match"))
    line = row(text, "k")
    # ACC: mean of 100.0 and 30.0 = 65.0, sample std = 49.5
    assert "65.0 ± 49.5" in line and " 2 " in line


def test_matrix_panel_shows_the_matrix_and_summary() -> None:
    text = render(matrix_panel(fake_results()["adapters"]["forgetter"], "exact_match", TASKS))
    assert row(text, "before").split("│")[2:5] == ["  0.0 ", "     0.0 ", "  0.0 "]
    assert row(text, "sort").split("│")[2:5] == ["  0.0 ", "    20.0 ", " 70.0 "]
    text = " ".join(text.split())  # the caption may wrap
    assert "ACC (%) 30.0" in text and "BWT (pp) -75.0" in text and "forgetting (pp) +75.0" in text
    loss_text = render(matrix_panel(fake_results()["adapters"]["partial"], "loss", TASKS))
    assert "0.5000" in loss_text and "ACC" not in loss_text  # a failed adapter: its rows, no summary


def test_print_cl_report_prints_tables_and_panels() -> None:
    console = Console(record=True, width=220, color_system=None)
    print_cl_report(console, fake_results(), matrices=True)
    text = console.export_text()
    assert "continual learning on exact_match" in text and "continual learning on loss" in text
    assert "keeper: exact_match (%)" in text and "mean ± std" not in text


def test_write_all_writes_non_empty_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = plots.write_all(tmp_path, fake_results(), TASKS)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [f"{a}-{m}-heatmap.png" for a in ("keeper", "forgetter", "partial") for m in ("exact_match", "loss")]
        + [f"keeper-{m}-curves.png" for m in ("exact_match", "loss")]
        + [f"learning-vs-forgetting-{m}.png" for m in ("exact_match", "loss")]
    )
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_an_rl_run_gets_its_reward_curve(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = [{"adapter": a, "step": step, "loss": 1.0, **({"reward_mean": step / 10} if step > 2 else {})}
               for a in ("keeper", "forgetter") for step in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = plots.write_all(tmp_path, fake_results(), TASKS)
    assert tmp_path / "plots" / "rl-reward.png" in paths
    assert (tmp_path / "plots" / "rl-reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if "reward_mean" not in r))
    assert not [p for p in plots.write_all(tmp_path, fake_results(), TASKS) if p.name == "rl-reward.png"]


def test_plots_without_matplotlib_say_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install matplotlib"):
        plots.heatmap(fake_results()["adapters"]["keeper"], "exact_match", TASKS, tmp_path / "x.png")
