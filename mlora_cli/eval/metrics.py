"""Continual-learning metrics as pure functions of the accuracy matrix R and of the evaluation curve.

R is one adapter's `matrix[metric]` from results.json: T+1 rows of T scores. R[0] is the base alone (before any
training); R[i][j] is the score on task j after training task i, with tasks numbered 1..T as in the papers, so
row i is "after task i" and column j (0-based in Python: `R[i][j - 1]`) is "evaluated on task j".

Sign convention: every transfer metric reads the same way for every metric. BWT > 0 and FWT > 0 are good,
forgetting > 0 is bad. For a lower-is-better metric (loss) they are computed on -R, so a loss that rose after later
tasks is positive forgetting and negative BWT. ACC, learning accuracy and min-ACC stay in the metric's own units
(a mean loss is reported as a loss, not negated).

Torch-free and numpy-free: `mlora report`-style tooling and tests import it without the training stack.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, TypedDict

Matrix = Sequence[Sequence[float]]
Curve = Sequence[dict[str, Any]]

# Which way each evaluation metric improves (the metrics `eval.metrics` may list).
HIGHER_IS_BETTER = {"exact_match": True, "token_accuracy": True, "reward": True, "pass_at_k": True,
                    "choice_accuracy": True, "loss": False}

CL_KEYS = ("acc", "bwt", "fwt", "forgetting", "learning_acc")


def higher_is_better(metric: str) -> bool:
    """Whether larger values of `metric` are better; a clear error for a metric we do not know."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(sorted(HIGHER_IS_BETTER))}")
    return HIGHER_IS_BETTER[metric]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def task_count(R: Matrix) -> int:
    """T, after checking that R has T+1 rows of T scores (T >= 1)."""
    if len(R) < 2:
        raise ValueError(f"an accuracy matrix needs a 'before' row and at least one task row; got {len(R)} rows")
    T = len(R) - 1
    for i, row in enumerate(R):
        if len(row) != T:
            raise ValueError(f"accuracy matrix row {i} has {len(row)} scores; expected {T} (one per task)")
    return T


def is_complete(R: Matrix) -> bool:
    """True when R is a full (T+1) x T matrix; a failed adapter's matrix stops early."""
    return len(R) >= 2 and all(len(row) == len(R) - 1 for row in R)


def average_accuracy(R: Matrix) -> float:
    """ACC = (1/T) sum_{j=1..T} R[T][j]: the mean score over all tasks after the last task."""
    T = task_count(R)
    return _mean(R[T])


def learning_accuracy(R: Matrix) -> float:
    """LA = (1/T) sum_{j=1..T} R[j][j]: the mean score on each task right after training it (plasticity)."""
    T = task_count(R)
    return _mean([R[j][j - 1] for j in range(1, T + 1)])


def backward_transfer(R: Matrix) -> float | None:
    """BWT = (1/(T-1)) sum_{j=1..T-1} (R[T][j] - R[j][j]); None for T = 1.

    How much training the later tasks changed the earlier ones: negative is forgetting, positive is later tasks
    helping earlier ones. GEM, Lopez-Paz & Ranzato 2017, https://arxiv.org/abs/1706.08840 (eq. 2).
    """
    T = task_count(R)
    if T == 1:
        return None
    return _mean([R[T][j - 1] - R[j][j - 1] for j in range(1, T)])


def forward_transfer(R: Matrix) -> float | None:
    """FWT = (1/(T-1)) sum_{j=2..T} (R[j-1][j] - R[0][j]); None for T = 1.

    How much training the earlier tasks helped a task before it was trained, against the base alone (R[0], the
    GEM paper's random-init baseline b). GEM, Lopez-Paz & Ranzato 2017, https://arxiv.org/abs/1706.08840 (eq. 3).
    """
    T = task_count(R)
    if T == 1:
        return None
    return _mean([R[j - 1][j - 1] - R[0][j - 1] for j in range(2, T + 1)])


def forgetting(R: Matrix) -> float | None:
    """F = (1/(T-1)) sum_{j=1..T-1} (max_{i=1..T-1} R[i][j] - R[T][j]); None for T = 1.

    The drop on each earlier task from its best score to its final one. Chaudhry et al. 2018 (RWalk),
    https://arxiv.org/abs/1801.10112 (eq. 9-10), taken at the last task. The max runs over i = 1..T-1 exactly as in
    the paper's formula, so rows before task j was trained (i < j) are included; the common variant that takes the
    max over i = j..T-1 differs only when a task scored higher before it was trained than at any point after.
    """
    T = task_count(R)
    if T == 1:
        return None
    return _mean([max(R[i][j - 1] for i in range(1, T)) - R[T][j - 1] for j in range(1, T)])


def cl_metrics(R: Matrix, higher_is_better: bool) -> dict[str, float | None]:
    """ACC, BWT, FWT, forgetting and learning accuracy of one adapter's matrix for one metric.

    For a lower-is-better metric, BWT, FWT and forgetting are computed on -R so they read as for accuracy
    (BWT, FWT > 0 good; forgetting > 0 bad); ACC and learning accuracy stay plain means of R (e.g. a mean loss).
    """
    task_count(R)
    signed = R if higher_is_better else [[-x for x in row] for row in R]
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(signed),
        "fwt": forward_transfer(signed),
        "forgetting": forgetting(signed),
        "learning_acc": learning_accuracy(R),
    }


# Stability gap: the curve holds evaluations during training, not only at task boundaries.
# De Lange, van de Ven & Tuytelaars 2023, "Continual evaluation for lifelong learning: identifying the stability gap",
# https://arxiv.org/abs/2205.13452. A curve point is {"step", "task_index" (0-based, the task being trained),
# "scores": {task name: {metric: value}}}; the evaluation right after task j finishes carries task_index j and,
# as the worker writes it, "after_task": j + 1 (the matrix row; 0 for the evaluation before training).


def _score(point: dict[str, Any], task: str, metric: str) -> float | None:
    value = point.get("scores", {}).get(task, {}).get(metric)
    return None if value is None else float(value)


def _end_of_task(points: list[dict[str, Any]], j: int) -> dict[str, Any] | None:
    """The boundary evaluation right after task j: the point marked after_task == j + 1, else the last point
    with task_index == j."""
    marked = [p for p in points if p.get("after_task") == j + 1]
    during = [p for p in points if p["task_index"] == j]
    candidates = marked or during
    return candidates[-1] if candidates else None


def min_acc(curve: Curve, metric: str, task_names: Sequence[str]) -> float | None:
    """min-ACC: the worst score each finished task ever drops to, averaged over the tasks before the last.

    With tasks j = 0..T-1 (0-based, as `task_index`), end_j the boundary evaluation right after task j (the point
    with after_task == j+1, else the last point with task_index == j), and after_j = {end_j} + every point with
    task_index > j:

        worst_j = min_{p in after_j} score_j(p)      (max for a lower-is-better metric: the highest loss)
        min_acc = mean_{j = 0..T-2} worst_j

    Tasks with no score in after_j are left out of the mean; None when none is left (T = 1, or no curve).
    In the metric's own units, like ACC. De Lange et al. 2023 (min-ACC), https://arxiv.org/abs/2205.13452.
    """
    better = higher_is_better(metric)
    points = sorted(curve, key=lambda p: p["step"])
    worst = []
    for j, task in enumerate(task_names[:-1]):
        end = _end_of_task(points, j)
        after = ([end] if end is not None else []) + [p for p in points if p["task_index"] > j]
        scores = [s for s in (_score(p, task, metric) for p in after) if s is not None]
        if scores:
            worst.append(min(scores) if better else max(scores))
    return _mean(worst) if worst else None


def largest_dip(curve: Curve, metric: str, task_names: Sequence[str]) -> float | None:
    """The largest stability gap: how far a task falls during the next task, below where its own training ended.

    With end_j the boundary evaluation after task j (as in `min_acc`) and next_j the points with
    task_index == j+1 (training task j+1, including its own closing boundary):

        dip_j = score_j(end_j) - min_{p in next_j} score_j(p)     (higher is better)
        dip_j = max_{p in next_j} score_j(p) - score_j(end_j)     (lower is better: a rise in loss)
        largest_dip = max_{j = 0..T-2} dip_j

    dip > 0 always means task j got worse; a negative value means no task dipped (every one kept improving).
    Tasks without both scores are skipped; None when none is left. In the metric's units (a fraction for accuracy).
    De Lange et al. 2023, https://arxiv.org/abs/2205.13452.
    """
    better = higher_is_better(metric)
    points = sorted(curve, key=lambda p: p["step"])
    dips = []
    for j, task in enumerate(task_names[:-1]):
        end = _end_of_task(points, j)
        start = None if end is None else _score(end, task, metric)
        during = [s for s in (_score(p, task, metric) for p in points if p["task_index"] == j + 1) if s is not None]
        if start is None or not during:
            continue
        dips.append(start - min(during) if better else max(during) - start)
    return max(dips) if dips else None


class Aggregate(TypedDict):
    mean: float | None
    std: float | None
    n: int


def aggregate(values: Sequence[float | None]) -> Aggregate:
    """Mean and sample standard deviation (n-1) over seeds, ignoring None; std 0.0 for n = 1, None for n = 0."""
    present = [float(v) for v in values if v is not None]
    n = len(present)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = _mean(present)
    std = math.sqrt(sum((x - mean) ** 2 for x in present) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def entry_cl_metrics(entry: dict[str, Any], task_names: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Every CL metric of one results.json adapter entry: metric -> {acc, bwt, fwt, forgetting, learning_acc}.

    Adds min_acc and largest_dip when the entry has a `curve`. Metrics whose matrix is incomplete (a failed
    adapter) are left out.
    """
    out: dict[str, dict[str, float | None]] = {}
    for metric, R in entry.get("matrix", {}).items():
        if metric not in HIGHER_IS_BETTER or not is_complete(R):
            continue
        values = cl_metrics(R, HIGHER_IS_BETTER[metric])
        if entry.get("curve"):
            values["min_acc"] = min_acc(entry["curve"], metric, task_names)
            values["largest_dip"] = largest_dip(entry["curve"], metric, task_names)
        out[metric] = values
    return out


def seed_groups(results: dict[str, Any]) -> dict[str, list[str]]:
    """Adapters that differ only in seed, by label (the name without its `-s<seed>` suffix), in results order."""
    groups: dict[str, list[str]] = {}
    labels: dict[str, str] = {}
    for name, entry in results["adapters"].items():
        key = json.dumps(entry.get("config", entry.get("varied")), sort_keys=True, default=str)
        suffix = f"-s{entry.get('seed')}"
        labels.setdefault(key, name[: -len(suffix)] if name.endswith(suffix) else name)
        groups.setdefault(labels[key], []).append(name)
    return groups


def add_cl_metrics(results: dict[str, Any]) -> None:
    """Fill each adapter's `cl_metrics` and, when seeds repeat, `aggregates` (mean +- std over seeds)."""
    tasks = results["run"]["tasks"]
    for entry in results["adapters"].values():
        entry["cl_metrics"] = entry_cl_metrics(entry, tasks)
    groups = seed_groups(results)
    if not any(len(names) > 1 for names in groups.values()):
        return
    aggregates: dict[str, Any] = {}
    for label, names in groups.items():
        entries = [results["adapters"][n] for n in names]
        metrics = sorted({m for e in entries for m in e["cl_metrics"]})
        aggregates[label] = {
            "adapters": names,
            "cl_metrics": {
                m: {k: aggregate([e["cl_metrics"].get(m, {}).get(k) for e in entries])
                    for k in CL_KEYS}
                for m in metrics
            },
            "final_mean": {m: aggregate([e["final_mean"].get(m) for e in entries]) for m in metrics},
        }
    results["aggregates"] = aggregates
