"""One worker: load the base once, then co-train its adapters through the task sequence.

`run(plan, ...)` is a plain function (tests call it in-process). The worker holds
`plan.slots` adapters at once; each trains `tasks[0]`, `tasks[1]`, ... and is evaluated
on every task before training and after each task (all due adapters in one batched
pass). When an adapter finishes or fails, its slot takes the next queued adapter at once,
without reloading the base. Everything an adapter sees (init, batches, dropout) comes
from its own seed, so neighbours never change its results.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlora_cli import PROCESS_START
from mlora_cli.config import SweepSpec, to_plain
from mlora_cli.data import BatchSampler, Row, TokenizedTask, tokenize_task
from mlora_cli.evaluate import EvalRequest, evaluate
from mlora_cli.model.base import load_base
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.model.optim import lr_factor
from mlora_cli.plan import WorkerPlan
from mlora_cli.strategies import Strategies
from mlora_cli.sweep import AdapterSpec
from mlora_cli.tasks import TaskData
from mlora_cli.train import StepInput, fused_step, squared_gradients

Emit = Callable[[dict[str, Any]], None]


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
    replay_buffer: list[Row] = field(default_factory=list)
    replay_rng: random.Random | None = None
    tokens: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    failure: str | None = None

    @property
    def total_steps(self) -> int:
        return sum(self.task_steps)

    @property
    def finished(self) -> bool:
        return self.task_index >= len(self.tasks)


def task_steps(spec: SweepSpec, adapter: AdapterSpec) -> list[int]:
    return [task.steps or adapter.train.steps_per_task for task in spec.tasks]


def run(
    plan: WorkerPlan,
    spec: SweepSpec,
    task_data: dict[int, list[TaskData]],
    run_dir: Path | None,
    emit: Emit = lambda event: None,
    worker_id: int = 0,
) -> dict[str, dict[str, Any]]:
    """Train and evaluate every adapter of `plan`; returns {adapter name: result entry}.

    `task_data` maps a data seed to the task sequence generated with it.
    """
    if plan.threads:
        torch.set_num_threads(plan.threads)
    started = time.perf_counter()
    base = load_base(spec.base_model, plan.device)
    tokenizer = base.tokenizer
    tokenized: dict[tuple[int, int], list[TokenizedTask]] = {}

    def tasks_for(adapter: AdapterSpec) -> list[TokenizedTask]:
        key = (adapter.seed, adapter.train.max_seq_len)
        if key not in tokenized:
            tokenized[key] = [tokenize_task(t, tokenizer, adapter.train.max_seq_len) for t in task_data[adapter.seed]]
        return tokenized[key]

    targets = sorted({t for a in plan.adapters for t in a.adapter.target_modules})
    # O-LoRA stacks one LoRA per task in its slot; LwF keeps a frozen teacher in a spare slot.
    max_rank = max(a.adapter.rank * (len(spec.tasks) if a.adapter.strategy == "olora" else 1) for a in plan.adapters)
    teachers = any(a.adapter.strategy == "lwf" for a in plan.adapters)
    engine = MultiLoraModel(base.model, targets, plan.slots * (2 if teachers else 1), max_rank)
    strategies = Strategies(engine, plan.slots)
    emit({"event": "worker_ready", "worker": worker_id, "load_seconds": time.perf_counter() - started, "base": base.info})

    queue = deque(plan.adapters)
    free_slots = list(range(plan.slots))[::-1]
    active: list[AdapterProgress] = []
    results: dict[str, dict[str, Any]] = {}

    def start(adapter: AdapterSpec, slot: int) -> None:
        engine.load_slot(slot, adapter.adapter, adapter.train.max_grad_norm, adapter.seed)
        strategies.start(slot, adapter.adapter)
        generator = None
        if adapter.adapter.dropout > 0:
            generator = torch.Generator(device=engine.device).manual_seed(adapter.seed + 7919)
        active.append(
            AdapterProgress(
                spec=adapter,
                slot=slot,
                tasks=tasks_for(adapter),
                task_steps=task_steps(spec, adapter),
                sampler=BatchSampler(len(tasks_for(adapter)[0].train), adapter.seed, 0),
                dropout_generator=generator,
                replay_rng=random.Random(f"replay:{adapter.seed}") if adapter.adapter.strategy == "replay" else None,
            )
        )

    def end_task(progress: AdapterProgress) -> None:
        """Strategy bookkeeping when an adapter finished a task and another follows."""
        config, finished_task = progress.spec.adapter, progress.tasks[progress.task_index]
        if config.strategy == "replay":
            keep = random.Random(f"buffer:{progress.spec.seed}:{progress.task_index}")
            picked = keep.sample(range(len(finished_task.train)), min(config.buffer_size, len(finished_task.train)))
            progress.replay_buffer.extend(finished_task.train[i] for i in picked)

        def fisher() -> list[torch.Tensor]:
            sampler = BatchSampler(len(finished_task.train), progress.spec.seed, 10_000 + progress.task_index)
            batches = [[StepInput(progress.slot, [finished_task.train[i] for i in sampler.next(progress.spec.train.batch_size)],
                                  0.0, 0.0, None)] for _ in range(config.fisher_batches)]
            with torch.enable_grad():  # called from inside the strategies' no-grad bookkeeping
                return squared_gradients(engine, batches, tokenizer.pad_token_id)

        strategies.end_task(progress.slot, config, progress.task_index, progress.spec.seed, fisher)

    def batch_rows(progress: AdapterProgress) -> list[Row]:
        task, size = progress.tasks[progress.task_index], progress.spec.train.batch_size
        replayed: list[Row] = []
        if progress.replay_buffer and progress.replay_rng is not None:
            count = min(round(size * progress.spec.adapter.replay_ratio), len(progress.replay_buffer))
            replayed = progress.replay_rng.sample(progress.replay_buffer, count)
        return [task.train[i] for i in progress.sampler.next(size - len(replayed))] + replayed

    def finish(progress: AdapterProgress) -> None:
        if run_dir is not None and progress.failure is None:
            engine.save_slot(progress.slot, progress.spec.adapter, run_dir / "adapters" / progress.spec.name, spec.base_model)
        results[progress.spec.name] = result_entry(progress, spec)
        emit({"event": "adapter_done", "worker": worker_id, "adapter": progress.spec.name, "result": results[progress.spec.name]})
        active.remove(progress)
        free_slots.append(progress.slot)

    while queue or active:
        while free_slots and queue:
            start(queue.popleft(), free_slots.pop())
        due = [p for p in active if p.needs_eval or p.needs_curve_eval]
        if due:
            requests = [EvalRequest(p.spec.name, p.slot if p.step else None, p.tasks) for p in due]
            scores, seconds = evaluate(engine, requests, spec.eval, tokenizer)
            for progress in due:
                progress.eval_seconds += seconds / len(due)
                boundary = progress.needs_eval
                progress.curve.append({
                    "step": progress.step,
                    # the task being trained at this step; at a boundary, the one just finished
                    "task_index": max(0, progress.task_index - 1) if boundary else progress.task_index,
                    "after_task": progress.task_index if boundary else None,
                    "scores": scores[progress.spec.name],
                })
                progress.needs_curve_eval = False
                if not progress.needs_eval:
                    continue
                progress.evals.append(scores[progress.spec.name])
                progress.needs_eval = False
                emit({"event": "eval", "worker": worker_id, "adapter": progress.spec.name,
                      "after_task": progress.task_index, "scores": scores[progress.spec.name]})
                if progress.task_index and run_dir is not None:
                    checkpoint = run_dir / "checkpoints" / progress.spec.name / f"after-task-{progress.task_index}"
                    engine.save_slot(progress.slot, progress.spec.adapter, checkpoint, spec.base_model)
                if progress.finished:
                    finish(progress)
            continue

        inputs = []
        for progress in active:
            factor = lr_factor(progress.step, progress.total_steps, progress.spec.train.warmup_steps, progress.spec.train.schedule)
            inputs.append(StepInput(progress.slot, batch_rows(progress), progress.spec.adapter.lr * factor,
                                    progress.spec.adapter.dropout, progress.dropout_generator))
        step_results, seconds = fused_step(engine, inputs, tokenizer.pad_token_id, strategies)
        records = []
        for progress, part, outcome in zip(list(active), inputs, step_results):
            progress.step += 1
            progress.step_in_task += 1
            progress.tokens += outcome.tokens
            progress.train_seconds += seconds
            records.append({
                "adapter": progress.spec.name, "task": progress.tasks[progress.task_index].name,
                "task_index": progress.task_index, "step": progress.step, "loss": outcome.loss, "lr": part.lr,
                "grad_norm": outcome.grad_norm, "tokens": outcome.tokens, "seconds": seconds,
            })
            if not outcome.finite:
                progress.failure = (f"non-finite loss or gradient (loss={outcome.loss}, grad_norm={outcome.grad_norm}) "
                                    f"at step {progress.step}, task '{progress.tasks[progress.task_index].name}'")
                finish(progress)
            elif progress.step_in_task >= progress.task_steps[progress.task_index]:
                if progress.task_index + 1 < len(progress.tasks):
                    end_task(progress)
                progress.task_index += 1
                progress.step_in_task = 0
                progress.needs_eval = True
                if not progress.finished:
                    size = len(progress.tasks[progress.task_index].train)
                    progress.sampler = BatchSampler(size, progress.spec.seed, progress.task_index)
            elif spec.eval.every_steps and progress.step % spec.eval.every_steps == 0:
                progress.needs_curve_eval = True
        emit({"event": "step", "worker": worker_id, "records": records})
    return results


def result_entry(progress: AdapterProgress, spec: SweepSpec) -> dict[str, Any]:
    """The adapter's entry in results.json."""
    task_names = [t.name for t in spec.tasks]
    metrics = sorted({m for row in progress.evals for scores in row.values() for m in scores})
    matrix = {m: [[row[t][m] for t in task_names] for row in progress.evals] for m in metrics}
    final = progress.evals[-1] if progress.failure is None and progress.evals else {}
    return {
        "name": progress.spec.name,
        "seed": progress.spec.seed,
        "status": "failed" if progress.failure else "done",
        "failure": progress.failure,
        "varied": progress.spec.varied,
        "config": {"adapter": to_plain(progress.spec.adapter), "train": to_plain(progress.spec.train)},
        "final": final,
        "final_mean": {m: sum(s[m] for s in final.values()) / len(final) for m in metrics} if final else {},
        "matrix": matrix,
        "curve": progress.curve,
        "steps": progress.step,
        "train_tokens": progress.tokens,
        "train_seconds": progress.train_seconds,
        "train_tokens_per_s": progress.tokens / progress.train_seconds if progress.train_seconds else 0.0,
        "steps_per_s": progress.step / progress.train_seconds if progress.train_seconds else 0.0,
        "eval_seconds": progress.eval_seconds,
        # seconds from process start (imports and base load included) to this adapter's end
        "finished_after_s": time.perf_counter() - PROCESS_START,
    }
