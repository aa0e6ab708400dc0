"""A run's contract, defined once: the run folder's paths, each adapter's results.json entry, and worker events.

Everything that writes or reads these (the worker, the launcher, the Ray backend, `mlora eval`,
the bench) uses the names here, so a field or a path is spelled in one place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

import mlora_cli
from mlora_cli.errors import ConfigError, unreadable
from mlora_cli.spec.convert import to_plain
from mlora_cli.spec.schema import SweepSpec
from mlora_cli.spec.sweep import AdapterSpec

# -- the run folder ---------------------------------------------------------------------------

RESOLVED_SWEEP = "sweep.resolved.yaml"
RUN_RECORD = "run.json"
ADAPTERS = "adapters.json"
BASE_RECORD = "base.json"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
TRACKERS_RECORD = "trackers.json"  # each experiment tracker's run ids, for --resume (report/trackers.py)
SEARCH_DB = "search.db"  # the Optuna study of a searched or pruned sweep (SQLite): optuna.load_study opens it
SEARCH_LOCK = "search.lock"  # held around every study operation, so the run's worker processes take turns
# A search skips sampler suggestions of configurations already tried, up to this many in a row; then one is trained.
MAX_REPEATS = 100


def state_path(run_dir: Path, name: str) -> Path:
    """An adapter's whole training state (weights, optimizer, data and RNG positions, strategy)."""
    return run_dir / "state" / f"{name}.pt"


def result_path(run_dir: Path, name: str) -> Path:
    """An adapter's results entry, written when it ends (done or failed)."""
    return run_dir / "state" / f"{name}.result.json"


def adapter_dir(run_dir: Path, name: str) -> Path:
    """The final adapter, PEFT format."""
    return run_dir / "adapters" / name


def checkpoint_dir(run_dir: Path, name: str, after_task: int) -> Path:
    """The adapter after task `after_task` (1-based), PEFT format."""
    return run_dir / "checkpoints" / name / f"after-task-{after_task}"


def load_resolved_sweep(path: Path, sweep_dir: Path) -> tuple[SweepSpec, dict[str, Any]]:
    """A run's `sweep.resolved.yaml` as a validated spec (data paths resolve against `sweep_dir`), and its data."""
    import yaml

    from mlora_cli.spec.load import parse_spec

    try:
        resolved = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([unreadable(path, exc)]) from None
    return parse_spec(resolved, base_dir=sweep_dir), resolved


# -- results.json: one entry per adapter ---------------------------------------------------------

Scores = dict[str, dict[str, float]]  # task -> metric -> value


def matrix_of(rows: Sequence[dict[str, dict[str, float]]], task_names: Sequence[str]) -> dict[str, list[list[float]]]:
    """metric -> R from evaluation rows (row i: task -> metric -> score after i tasks)."""
    metrics = sorted({m for row in rows for scores in row.values() for m in scores})
    return {m: [[row[t][m] for t in task_names] for row in rows] for m in metrics}


def mean_over_tasks(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """metric -> its mean over the tasks of one evaluation row ({} for none)."""
    if not scores:
        return {}
    metrics = sorted({m for values in scores.values() for m in values})
    return {m: sum(values[m] for values in scores.values()) / len(scores) for m in metrics}


class PruneRecord(TypedDict):
    step: int  # the step (over the whole task sequence) of the evaluation that pruned it
    value: float  # its objective there
    rung: int | None  # asha: the rung (0: min_steps); median: None
    rung_values: list[float]  # what the pruner compared: asha, the rung's values; median, completed trials' at step


class TrialRecord(TypedDict):
    """An adapter's Optuna trial, in a sweep with sweep.search or sweep.prune (run.search)."""

    number: int  # the trial's number in search.db
    params: dict[str, Any]  # as Optuna stores them (a choice of list by its label)
    metric: str
    over: str  # seen | current | all
    direction: str  # minimize | maximize
    objective: float | None  # done: the value told to Optuna; pruned: the value it was pruned at
    reports: list[dict[str, float]]  # every intermediate value reported: {step, value}
    pruned: PruneRecord | None


class _SearchedResult(TypedDict, total=False):
    trial: TrialRecord  # only in a sweep with sweep.search or sweep.prune
    # only with eval.harness_tasks: {harness task: {metric: value}} after the last task ({} when not done), and
    # one such row before training and after each task (the harness columns of R)
    harness: Scores
    harness_matrix: list[Scores]


class AdapterResult(_SearchedResult):
    name: str
    seed: int
    status: Literal["done", "failed", "pruned"]  # pruned: stopped early by the sweep's pruner (not a failure)
    failure: str | None
    varied: dict[str, Any]  # dotted key -> value, what the sweep set
    config: dict[str, Any]  # {"adapter": ..., "train": ...}, plain
    final: Scores  # after the last task; {} when failed
    final_mean: dict[str, float]  # metric -> mean over tasks
    matrix: dict[str, list[list[float]]]  # metric -> R, one row before training and one after each task
    curve: list[dict[str, Any]]  # every evaluation: step, task_index, after_task, scores
    steps: int
    train_tokens: int
    train_seconds: float
    train_tokens_per_s: float
    steps_per_s: float
    eval_seconds: float
    finished_after_s: float | None  # from the start of the mlora process that launched the run (imports and base
    # load included) to this adapter's end, whichever process trained it (mlora_cli.count_from)


def adapter_record(adapter: AdapterSpec) -> dict[str, Any]:
    """An adapter's entry in adapters.json: its name, seed, what its sweep varied, and its settings."""
    return {"name": adapter.name, "seed": adapter.seed, "varied": adapter.varied, "adapter": to_plain(adapter.adapter),
            "train": to_plain(adapter.train)}


def adapter_result(
    adapter: AdapterSpec, task_names: list[str], *, evals: list[Scores], curve: list[dict[str, Any]], steps: int,
    train_tokens: int, train_seconds: float, eval_seconds: float, failure: str | None,
    finished_after_s: float | None = None, pruned: bool = False, harness: list[Scores] | None = None,
) -> AdapterResult:
    """The results.json entry of an adapter that ran `steps` steps; `evals[i]` is the matrix row after i tasks, and
    `harness[i]` its eval.harness_tasks scores (entries `harness_matrix`, and `harness` for the final row)."""
    final = evals[-1] if failure is None and not pruned and evals else {}
    extra: dict[str, Any] = {}
    if harness:
        extra = {"harness": harness[-1] if final else {}, "harness_matrix": harness}
    return {**extra,
        "name": adapter.name,
        "seed": adapter.seed,
        "status": "failed" if failure else "pruned" if pruned else "done",
        "failure": failure,
        "varied": adapter.varied,
        "config": {"adapter": to_plain(adapter.adapter), "train": to_plain(adapter.train)},
        "final": final,
        "final_mean": mean_over_tasks(final),
        "matrix": matrix_of(evals, task_names),
        "curve": curve,
        "steps": steps,
        "train_tokens": train_tokens,
        "train_seconds": train_seconds,
        "train_tokens_per_s": train_tokens / train_seconds if train_seconds else 0.0,
        "steps_per_s": steps / train_seconds if train_seconds else 0.0,
        "eval_seconds": eval_seconds,
        "finished_after_s": (time.perf_counter() - mlora_cli.PROCESS_START) if finished_after_s is None
        else finished_after_s,
    }


def failed_result(adapter: AdapterSpec, reason: str) -> AdapterResult:
    """The entry of an adapter that never finished (its worker died or failed)."""
    entry = adapter_result(adapter, [], evals=[], curve=[], steps=0, train_tokens=0, train_seconds=0.0,
                           eval_seconds=0.0, failure=reason)
    entry["finished_after_s"] = None
    return entry


# -- events: what a worker tells the launcher (in process, through a queue, or from a Ray actor) ---


class WorkerReady(TypedDict):
    event: Literal["worker_ready"]
    worker: int
    load_seconds: float
    base: dict[str, Any]  # base.json


class StepRecord(TypedDict):  # one line of metrics.jsonl
    adapter: str
    task: str
    task_index: int
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    seconds: float


class RLStepRecord(StepRecord, total=False):  # the line of an adapter on an `objective: grpo` task
    reward_mean: float
    reward_std: float
    zero_variance_groups: float  # share of groups whose rewards were all equal
    truncated: float  # share of completions cut at max_new_tokens
    completion_tokens: float  # mean sampled length
    sample_seconds: float  # the fused sampling pass, shared by the step's RL adapters
    score_seconds: float  # this adapter's reward


class Trial(TypedDict):
    event: Literal["trial"]  # a searched trial slot was given its parameters (run.search): its settings from now
    worker: int
    adapter: str
    spec: AdapterSpec


class Step(TypedDict):
    event: Literal["step"]
    worker: int
    records: list[StepRecord | RLStepRecord]


class Evaluated(TypedDict):
    event: Literal["eval"]
    worker: int
    adapter: str
    after_task: int
    scores: Scores
    harness: NotRequired[Scores]  # with eval.harness_tasks: the row's harness columns


class Resumed(TypedDict):
    event: Literal["resumed"]
    worker: int
    adapter: str
    step: int


class AdapterDone(TypedDict, total=False):
    event: Literal["adapter_done"]
    worker: int
    adapter: str
    result: AdapterResult
    resumed: bool  # its result was already in the run folder


class WorkerDone(TypedDict, total=False):
    event: Literal["worker_done"]
    worker: int
    cuda_max_allocated_mib: float  # this worker's peaks on its GPU (worker.cuda_peak)
    cuda_max_reserved_mib: float


class WorkerError(TypedDict):
    event: Literal["worker_error"]  # a user error found once the model loaded (a ConfigError, pickled)
    worker: int
    error: Exception


class WorkerFailed(TypedDict):
    event: Literal["worker_failed"]  # a Ray actor died: its unfinished adapters fail
    worker: int
    reason: str


class Files(TypedDict):
    event: Literal["files"]  # from a Ray actor: what it wrote, to be written on the driver
    worker: int
    files: dict[str, bytes]  # path relative to the run folder -> contents


class RunStart(TypedDict):  # the launcher tells its listener (progress bars), not a worker
    event: Literal["run_start"]
    run_dir: str
    plans: list[Any]  # spec.plan.WorkerPlan
    resume: bool


# Every event, each spelled once above; `event` tells them apart.
Event = (RunStart | WorkerReady | Trial | Step | Evaluated | Resumed | AdapterDone | WorkerDone | WorkerError
         | WorkerFailed | Files)
Emit = Callable[[Event], None]
