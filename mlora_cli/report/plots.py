"""PNG plots of a run's continual-learning results: R heatmaps, evaluation curves, learning vs forgetting.

matplotlib (a dependency) is imported only when a plot is drawn, so commands that draw none start faster. Figures are
built with the object API on the Agg canvas, never through pyplot, so plotting changes no global backend state
and works headless and from any thread.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlora_cli.contract import METRICS
from mlora_cli.eval import metrics as cl
from mlora_cli.files import write_bytes
from mlora_cli.report.format import PERCENT_METRICS, format_metric, metric_header

# The metrics `write_all` plots, when the run evaluated them.
PLOTTED_METRICS = ("exact_match", "reward", "pass_at_k", "choice_accuracy", "loss")


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas; a clear ImportError when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plots need matplotlib, a dependency of mlora-sweep that is missing here: "
                          "pip install matplotlib") from error
    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> Path:
    """Write the PNG atomically (a reader never sees half a file)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def _scale(metric: str) -> float:
    """Percent metrics are stored as fractions and drawn in %."""
    return 100.0 if metric in PERCENT_METRICS else 1.0


def heatmap(
    entry: dict[str, Any], metric: str, task_names: Sequence[str], path: Path, trained: Sequence[str] | None = None
) -> Path:
    """One adapter's R matrix as an annotated heatmap: rows before / after each task, columns the evaluated task.

    `trained` names the rows' tasks when they differ from the evaluated ones (`mlora eval --tasks`).
    """
    trained = list(trained if trained is not None else task_names)
    R = entry["matrix"][metric]
    better = cl.higher_is_better(metric)
    scale = _scale(metric)
    values = [[x * scale for x in row] for row in R]
    T = len(task_names)
    figure = _figure(1.6 + 1.1 * T, 1.2 + 0.55 * (len(R) + 1))
    ax = figure.add_subplot()
    if metric in PERCENT_METRICS:
        vmin, vmax = 0.0, 100.0
    else:
        flat = [x for row in values for x in row]
        vmin, vmax = min(flat), max(flat)
    # Green is good either way: reversed colormap for lower-is-better metrics.
    image = ax.imshow(values, cmap="RdYlGn" if better else "RdYlGn_r", vmin=vmin, vmax=vmax, aspect="auto")
    for i, row in enumerate(R):
        for j, value in enumerate(row):
            shade = (value * scale - vmin) / (vmax - vmin) if vmax > vmin else 0.5
            dark = shade < 0.2 or shade > 0.8
            ax.text(
                j,
                i,
                format_metric(metric, value),
                ha="center",
                va="center",
                fontsize=9,
                color="white" if dark else "black",
                fontweight="bold" if i == j + 1 else "normal",
            )
    ax.set_xticks(range(T), list(task_names))
    ax.set_yticks(range(len(R)), ["before"] + [f"after {name}" for name in trained[: len(R) - 1]])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training")
    failed = "" if entry.get("status", "done") == "done" else f" ({entry['status']})"
    ax.set_title(f"{entry['name']}{failed}: {metric_header(metric)} after each task")
    figure.colorbar(image, ax=ax, label=metric_header(metric))
    return _save(figure, path)


def _task_ends(curve: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """(task_index, step of its last evaluation) for each task the curve reaches, in step order."""
    ends: dict[int, int] = {}
    for point in sorted(curve, key=lambda p: p["step"]):
        ends[point["task_index"]] = point["step"]
    return sorted(ends.items())


def has_curve(entry: dict[str, Any], metric: str) -> bool:
    """Whether the adapter's curve holds any `metric` score."""
    return any(metric in scores for p in entry.get("curve") or () for scores in p.get("scores", {}).values())


def curves(entry: dict[str, Any], metric: str, task_names: Sequence[str], path: Path) -> Path:
    """Each task's score against the adapter's step during training, from `entry['curve']`; dashed task switches."""
    if not has_curve(entry, metric):
        raise ValueError(f"adapter {entry['name']!r} has no evaluation curve with {metric}")
    points = sorted(entry["curve"], key=lambda p: p["step"])
    scale = _scale(metric)
    figure = _figure(7.5, 4.2)
    ax = figure.add_subplot()
    for name in task_names:
        xy = [
            (p["step"], p["scores"][name][metric] * scale)
            for p in points
            if metric in p.get("scores", {}).get(name, {})
        ]
        if xy:
            ax.plot(*zip(*xy, strict=True), marker="o", markersize=3, linewidth=1.5, label=f"on {name}")
    ends = _task_ends(points)
    start = points[0]["step"]
    for task_index, end in ends:
        if task_index < len(ends) - 1:
            ax.axvline(end, color="grey", linestyle="--", linewidth=0.8)
        if 0 <= task_index < len(task_names):
            # Name each task's training span along the top edge.
            ax.text(
                (start + end) / 2,
                1.01,
                f"training {task_names[task_index]}",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color="dimgrey",
            )
        start = end
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    ax.set_xlabel("adapter step")
    ax.set_ylabel(metric_header(metric))
    ax.set_title(f"{entry['name']}: {metric_header(metric)} on each task during training", pad=18)
    ax.grid(alpha=0.3)
    ax.legend(title="evaluated", fontsize=8)
    return _save(figure, path)


def learning_vs_forgetting(results: dict[str, Any], metric: str, path: Path) -> Path:
    """Every adapter as a labeled point: learning accuracy (x) against forgetting (y), for `metric`."""
    task_names = results["run"]["tasks"]
    scale = _scale(metric)
    points = []
    for name, entry in results["adapters"].items():
        values = cl.entry_cl_metrics(entry, task_names).get(metric, {})
        learning, forgotten = values.get("learning_acc"), values.get("forgetting")
        if learning is not None and forgotten is not None:
            points.append((name, learning * scale, forgotten * scale))
    if not points:
        raise ValueError(f"no adapter has a complete {metric} matrix over 2 or more tasks")
    percent = metric in PERCENT_METRICS
    figure = _figure(6.5, 4.8)
    ax = figure.add_subplot()
    ax.scatter([p[1] for p in points], [p[2] for p in points], s=28, color="tab:blue", zorder=3)
    for name, x, y in points:
        ax.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.margins(0.15)  # room for the labels of the outermost points
    xlabel = (
        f"learning accuracy: mean {metric} right after training each task (%)"
        if percent
        else (f"learning {metric}: mean {metric} right after training each task")
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"forgetting ({'pp' if percent else 'rise in ' + metric}; > 0 is worse)")
    # Learning accuracy is better to the right for accuracy, to the left for loss; forgetting is better low.
    corner = "lower right" if cl.higher_is_better(metric) else "lower left"
    ax.set_title(f"{results['run']['name']}: learning vs forgetting on {metric} (best: {corner})")
    ax.grid(alpha=0.3)
    return _save(figure, path)


def trials(results: dict[str, Any], path: Path) -> Path:
    """A search's trials: each one's objective at every step it was measured (the values Optuna got), finished
    trials solid to their final value, pruned ones faded with an x where the pruner stopped them, the best in bold."""
    entries = [e for e in results["adapters"].values() if e.get("trial")]
    if not entries:
        raise ValueError("no adapter of this run is a trial of a search")
    first = entries[0]["trial"]
    metric, scale = first["metric"], _scale(first["metric"])
    done = [e for e in entries if e["status"] == "done" and e["trial"]["objective"] is not None]
    pick = min if first["direction"] == "minimize" else max
    best = pick(done, key=lambda e: e["trial"]["objective"])["name"] if done else None
    figure = _figure(7.5, 4.6)
    ax = figure.add_subplot()
    for entry in entries:
        points = [(r["step"], r["value"] * scale) for r in entry["trial"]["reports"]]
        if entry["status"] == "done" and entry["trial"]["objective"] is not None:
            points.append((entry["steps"], entry["trial"]["objective"] * scale))
        if not points:
            continue
        x, y = zip(*points, strict=True)
        if entry["name"] == best:
            ax.plot(x, y, color="tab:green", linewidth=2.5, marker="o", markersize=4, zorder=3,
                    label=f"best: {entry['name']}")
        elif entry["status"] == "done":
            ax.plot(x, y, color="tab:blue", linewidth=1.2, marker="o", markersize=3, alpha=0.8)
        else:  # pruned (or failed): faded, an x where it stopped
            ax.plot(x, y, color="grey", linewidth=1.0, alpha=0.35)
            ax.plot(x[-1:], y[-1:], color="tab:red", marker="x", markersize=5, alpha=0.5, linestyle="none")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("adapter step (over the whole task sequence)")
    ax.set_ylabel(f"{metric_header(metric)}, mean over the {first['over']} tasks")
    pruned = sum(e["status"] == "pruned" for e in entries)
    ax.set_title(f"{results['run']['name']}: {len(entries)} trials ({pruned} pruned, faded)")
    ax.grid(alpha=0.3)
    if best:
        ax.legend(fontsize=8)
    return _save(figure, path)


def rl_rewards(records: Sequence[dict[str, Any]], title: str, path: Path) -> Path:
    """The mean sampled reward of every RL step, one line per adapter, from metrics.jsonl's records."""
    by_adapter: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if "reward_mean" in record:
            by_adapter.setdefault(record["adapter"], []).append((record["step"], record["reward_mean"]))
    if not by_adapter:
        raise ValueError("no RL step in these metrics")
    figure = _figure(7.5, 4.6)
    ax = figure.add_subplot()
    for name, points in by_adapter.items():
        x, y = zip(*sorted(points), strict=True)
        ax.plot(x, y, linewidth=1.2, marker="o", markersize=2, label=name)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("adapter step (over the whole task sequence)")
    ax.set_ylabel("mean sampled reward")
    ax.set_title(f"{title}: reward of the completions each RL step trained on")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(by_adapter) > 6 else 1)
    return _save(figure, path)


def harness(results: dict[str, Any], task: str, metric: str, path: Path) -> Path:
    """One harness task's metric after each task of the sequence (0: before training), one line per adapter."""
    figure = _figure(7.5, 4.6)
    ax = figure.add_subplot()
    for name, entry in results["adapters"].items():
        values = [row.get(task, {}).get(metric) for row in entry.get("harness_matrix", [])]
        if any(value is not None for value in values):
            ax.plot(range(len(values)), [math.nan if v is None else v for v in values], linewidth=1.2, marker="o",
                    markersize=3, label=name)
    trained = results["run"].get("trained_tasks", results["run"]["tasks"])
    ax.set_xticks(range(len(trained) + 1), ["before", *(f"after {t}" for t in trained)], fontsize=8)
    ax.set_ylabel(f"{task} {metric}")
    ax.set_title(f"{results['run'].get('name', '')}: lm-evaluation-harness {task} ({metric}) through the sequence")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(results["adapters"]) > 6 else 1)
    return _save(figure, path)


def write_all(run_dir: Path, results: dict[str, Any], task_names: Sequence[str]) -> list[Path]:
    """Every plot of a run under `<run_dir>/plots/`, for PLOTTED_METRICS where evaluated; the paths written.

    `<adapter>-<metric>-heatmap.png` per adapter, `<adapter>-<metric>-curves.png` where the adapter has a curve,
    `learning-vs-forgetting-<metric>.png` when some adapter has a complete matrix over 2 or more tasks;
    `trials-<metric>.png` for a search; `rl-reward.png` (sampled reward per RL step) when a task is RL;
    `harness-<task>-<metric>.png` with eval.harness_tasks (each harness score after every task). A pruned
    trial gets no plot of its own (a search prunes most of them).
    """
    out = Path(run_dir) / "plots"
    paths = []
    adapters = results["adapters"]
    trained = results["run"].get("trained_tasks", task_names)
    square = list(trained) == list(task_names)
    for metric in PLOTTED_METRICS:
        if not any(entry.get("matrix", {}).get(metric) for entry in adapters.values()):
            continue
        for name, entry in adapters.items():
            if entry.get("status") == "pruned":
                continue
            if entry.get("matrix", {}).get(metric):
                paths.append(heatmap(entry, metric, task_names, out / f"{name}-{metric}-heatmap.png", trained))
            if square and has_curve(entry, metric):
                paths.append(curves(entry, metric, task_names, out / f"{name}-{metric}-curves.png"))
        if square and len(task_names) > 1 and any(
            cl.is_complete(entry.get("matrix", {}).get(metric, [])) for entry in adapters.values()
        ):
            paths.append(learning_vs_forgetting(results, metric, out / f"learning-vs-forgetting-{metric}.png"))
    searched = [entry["trial"] for entry in adapters.values() if entry.get("trial")]
    if searched:
        paths.append(trials(results, out / f"trials-{searched[0]['metric']}.png"))
    harness_columns = sorted({(task, metric) for entry in adapters.values() for row in entry.get("harness_matrix", [])
                              for task, values in row.items() for metric in values})
    for task, metric in harness_columns:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{task}-{metric}")
        paths.append(harness(results, task, metric, out / f"harness-{safe}.png"))
    metrics_file = Path(run_dir) / METRICS  # a training run's (an evaluation folder has none)
    if metrics_file.is_file():
        records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        if any("reward_mean" in record for record in records):
            paths.append(rl_rewards(records, results["run"]["name"], out / "rl-reward.png"))
    return paths
