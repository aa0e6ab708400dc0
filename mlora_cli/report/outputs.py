"""The files written beside results.json: forgetting.csv (long format) and the PNG plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from mlora_cli.files import write_text

FORGETTING_CSV_FIELDS = ("adapter", "seed", "after_task", "eval_task", "metric", "value")


def forgetting_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every R entry of every adapter in long format, one dict per (adapter, metric, after_task, eval_task).

    after_task is 0 before training and i after the i-th task (1-based, the matrix row); eval_task is a task name,
    or `harness:TASK` for an eval.harness_tasks column. A failed adapter contributes the rows it reached.
    """
    task_names = results["run"]["tasks"]
    rows = []
    for name, entry in results["adapters"].items():
        for metric in sorted(entry.get("matrix", {})):
            for after_task, scores in enumerate(entry["matrix"][metric]):
                for eval_task, value in zip(task_names, scores, strict=True):
                    rows.append({"adapter": name, "seed": entry.get("seed"), "after_task": after_task,
                                 "eval_task": eval_task, "metric": metric, "value": value})
        for after_task, scores in enumerate(entry.get("harness_matrix", [])):
            for task, values in sorted(scores.items()):
                rows.extend({"adapter": name, "seed": entry.get("seed"), "after_task": after_task,
                             "eval_task": f"harness:{task}", "metric": metric, "value": value}
                            for metric, value in sorted(values.items()))
    return rows


def write_forgetting_csv(path: Path, results: dict[str, Any]) -> None:
    """`forgetting_rows` as CSV with a header line (`forgetting.csv` in the run folder), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FORGETTING_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(forgetting_rows(results))
    write_text(Path(path), buffer.getvalue())


def write_reports(folder: Path, results: dict[str, Any], plots: bool = True) -> list[str]:
    """forgetting.csv and PNG plots next to results.json; returns notes for the user (and the adapters that
    `mlora eval` could not evaluate: run.not_evaluated, adapter -> its status in the run)."""
    notes = [f"{name}: not evaluated, it saved no per-task checkpoint (its status in the run: {status})"
             for name, status in results["run"].get("not_evaluated", {}).items()]
    write_forgetting_csv(folder / "forgetting.csv", results)
    if not plots:
        return notes
    try:
        from mlora_cli.report import plots as plotting

        plotting.write_all(folder, results, results["run"]["tasks"])
    except ImportError as exc:
        return [*notes, str(exc)]
    return notes
