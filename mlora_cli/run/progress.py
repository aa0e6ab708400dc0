"""Where one adapter is in its run: its slot, tasks, data position, evaluations and counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mlora_cli.data.batches import BatchSampler, TokenizedTask
from mlora_cli.spec.sweep import AdapterSpec
from mlora_cli.train.grpo import RLBatch
from mlora_cli.train.step import StepInput


@dataclass
class AdapterProgress:
    spec: AdapterSpec
    slot: int
    tasks: list[TokenizedTask]
    task_steps: list[int]
    sampler: BatchSampler
    dropout_generator: torch.Generator | None
    task_index: int = 0
    step_in_task: int = 0
    step: int = 0
    needs_eval: bool = True  # at a task boundary (a row of the accuracy matrix)
    needs_curve_eval: bool = False  # mid-task (eval.every_steps)
    evals: list[dict[str, dict[str, float]]] = field(default_factory=list)  # row i: after i tasks
    curve: list[dict[str, Any]] = field(default_factory=list)  # every evaluation, by step
    harness: list[dict[str, dict[str, float]]] = field(default_factory=list)  # eval.harness_tasks, rows as evals
    tokens: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    failure: str | None = None
    rl_batch: RLBatch | None = None  # sampled completions still to be trained on (train.rl.num_iterations)
    measure_at: tuple[int, ...] = ()  # steps at which the objective is reported to Optuna (sweep.prune; run.search)

    # Plain fields saved in a checkpoint (tensors and RNG states are added by run.state).
    SAVED = ("task_index", "step_in_task", "step", "needs_eval", "needs_curve_eval", "evals", "curve",
             "tokens", "train_seconds", "eval_seconds", "rl_batch", "harness")

    @property
    def total_steps(self) -> int:
        return sum(self.task_steps)

    @property
    def finished(self) -> bool:
        return self.task_index >= len(self.tasks)

    @property
    def task(self) -> TokenizedTask:
        return self.tasks[self.task_index]

    def count_step(self, tokens: int, seconds: float) -> None:
        self.step += 1
        self.step_in_task += 1
        self.tokens += tokens
        self.train_seconds += seconds

    @property
    def task_done(self) -> bool:
        return self.step_in_task >= self.task_steps[self.task_index]

    def next_task(self) -> None:
        """The current task's steps are done: the next row of R is due, then the next task's data."""
        self.task_index += 1
        self.step_in_task = 0
        self.rl_batch = None  # samples of the task just ended are not reused on the next
        self.needs_eval = True
        if not self.finished:
            self.sampler = BatchSampler(len(self.task.train), self.spec.seed, self.task_index)


def step_failure(progress: AdapterProgress, finite: bool, loss: float, grad_norm: float) -> str | None:
    """Why this step stops the adapter (the failure policy), or None."""
    where = f"at step {progress.step}, task '{progress.task.name}'"
    if not finite:
        return f"non-finite loss or gradient (loss={loss}, grad_norm={grad_norm}) {where}"
    limit = progress.spec.train.grad_norm_limit
    if limit is not None and grad_norm > limit:
        return f"gradient norm {grad_norm:.3g} above train.grad_norm_limit={limit:g} {where}"
    return None


def spend_rl_batch(progress: AdapterProgress, part: StepInput, sampled: bool) -> dict[str, Any]:
    """One step of `progress`'s RL batch used: it keeps pi_old if recorded and is dropped when used up; returns
    the step's RL metrics."""
    batch = progress.rl_batch
    if batch is None:
        return {}
    uses = progress.spec.train.rl.num_iterations
    metrics: dict[str, Any] = dict(batch.metrics)
    if uses > 1:  # reusing samples: which use this is; sampling and scoring were paid on the first
        metrics["sample_use"] = uses - batch.steps_left + 1
        if not sampled:
            metrics.update(sample_seconds=0.0, score_seconds=0.0)
    if part.recorded_log_probs is not None:
        batch.old_log_probs = part.recorded_log_probs
    batch.steps_left -= 1
    if batch.steps_left <= 0:
        progress.rl_batch = None
    return metrics
