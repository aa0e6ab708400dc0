"""One worker: load the base once, then co-train its adapters through the task sequence.

`run(plan, ...)` is a plain function (tests call it in-process). The worker holds
`plan.slots` adapters at once; each trains `tasks[0]`, `tasks[1]`, ... and is evaluated
on every task before training and after each task (all due adapters in one batched
pass). When an adapter finishes or fails, its slot takes the next queued adapter at once,
without reloading the base. Everything an adapter sees (init, batches, dropout) comes
from its own seed, so neighbours never change its results.

With a run folder, each adapter's whole training state is written to `state/<name>.pt`
at every task boundary and every `train.checkpoint_every` steps (write, then rename), and
its result to `state/<name>.result.json` when it ends; `resume=True` continues from them.
Ctrl-C saves every active adapter's state at the end of the step it interrupts.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlora_cli import PROCESS_START
from mlora_cli.config import SweepSpec, to_plain
from mlora_cli.data import BatchSampler, Row, TokenizedTask, check_formats, tokenize_task
from mlora_cli.evaluate import EvalRequest, evaluate
from mlora_cli.model.base import load_base
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.model.optim import lr_factor
from mlora_cli.plan import WorkerPlan
from mlora_cli.runfolder import write_json
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
    replay_buffer: list[tuple[int, int]] = field(default_factory=list)  # (task index, row index)
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

    # Plain fields saved in a checkpoint (tensors and RNG states are added separately).
    SAVED = ("task_index", "step_in_task", "step", "needs_eval", "needs_curve_eval", "evals", "curve",
             "replay_buffer", "tokens", "train_seconds", "eval_seconds")


def task_steps(spec: SweepSpec, adapter: AdapterSpec) -> list[int]:
    return [task.steps or adapter.train.steps_per_task for task in spec.tasks]


def state_path(run_dir: Path, name: str) -> Path:
    return run_dir / "state" / f"{name}.pt"


def result_path(run_dir: Path, name: str) -> Path:
    return run_dir / "state" / f"{name}.result.json"


class Worker:
    """The training loop of one worker over a slot engine; see the module doc."""

    def __init__(self, plan: WorkerPlan, spec: SweepSpec, task_data: dict[int, list[TaskData]], run_dir: Path | None,
                 emit: Emit, worker_id: int, resume: bool, written: Callable[[Path], None] | None = None):
        self.plan, self.spec, self.task_data, self.run_dir = plan, spec, task_data, run_dir
        self.emit, self.worker_id, self.resume = emit, worker_id, resume
        # Told of every file or folder written under run_dir (Ray ships them to the driver).
        self.written = written or (lambda path: None)
        started = time.perf_counter()
        self.base = load_base(spec.base_model, plan.device, spec.model)
        check_formats(spec.tasks, self.base.tokenizer, spec.base_model)
        self.tokenizer = self.base.tokenizer
        self.tokenized: dict[tuple[int, int], list[TokenizedTask]] = {}
        targets = sorted({t for a in plan.adapters for t in a.adapter.target_modules})
        # O-LoRA stacks one LoRA per task in its slot; LwF keeps a frozen teacher in a spare slot.
        max_rank = max(a.adapter.rank * (len(spec.tasks) if a.adapter.strategy == "olora" else 1) for a in plan.adapters)
        teachers = any(a.adapter.strategy == "lwf" for a in plan.adapters)
        self.engine = MultiLoraModel(self.base.model, targets, plan.slots * (2 if teachers else 1), max_rank)
        self.strategies = Strategies(self.engine, plan.slots)
        self.queue = deque(plan.adapters)
        self.free_slots = list(range(plan.slots))[::-1]
        self.active: list[AdapterProgress] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.interrupted = False  # Ctrl-C seen; see ctrl_c_between_steps
        emit({"event": "worker_ready", "worker": worker_id, "load_seconds": time.perf_counter() - started,
              "base": self.base.info})

    # -- adapters entering and leaving slots ------------------------------------------------

    def tasks_for(self, adapter: AdapterSpec) -> list[TokenizedTask]:
        key = (adapter.seed, adapter.train.max_seq_len)
        if key not in self.tokenized:
            self.tokenized[key] = [tokenize_task(t, self.tokenizer, adapter.train.max_seq_len)
                                   for t in self.task_data[adapter.seed]]
        return self.tokenized[key]

    def start(self, adapter: AdapterSpec, slot: int) -> None:
        if self.resume and self.run_dir is not None and result_path(self.run_dir, adapter.name).is_file():
            self.results[adapter.name] = json.loads(result_path(self.run_dir, adapter.name).read_text())
            self.free_slots.append(slot)
            self.emit({"event": "adapter_done", "worker": self.worker_id, "adapter": adapter.name,
                       "result": self.results[adapter.name], "resumed": True})
            return
        self.engine.load_slot(slot, adapter.adapter, adapter.train.max_grad_norm, adapter.seed)
        self.strategies.start(slot, adapter.adapter)
        generator = None
        if adapter.adapter.dropout > 0:
            generator = torch.Generator(device=self.engine.device).manual_seed(adapter.seed + 7919)
        progress = AdapterProgress(
            spec=adapter,
            slot=slot,
            tasks=[],
            task_steps=task_steps(self.spec, adapter),
            sampler=BatchSampler(1, adapter.seed, 0),
            dropout_generator=generator,
            replay_rng=random.Random(f"replay:{adapter.seed}") if adapter.adapter.strategy == "replay" else None,
        )
        self.active.append(progress)
        try:
            progress.tasks = self.tasks_for(adapter)
        except Exception as exc:  # bad data for this adapter must not stop the others
            progress.failure = f"data: {type(exc).__name__}: {exc}"
            self.finish(progress)
            return
        progress.sampler = BatchSampler(len(progress.tasks[0].train), adapter.seed, 0)
        saved = state_path(self.run_dir, adapter.name) if self.run_dir is not None else None
        if self.resume and saved is not None and saved.is_file():
            try:
                self.restore(progress, torch.load(saved, weights_only=False))
            except ValueError as exc:  # a state this engine cannot take: this adapter fails, the others go on
                progress.failure = f"resume: {saved}: {exc}"
                self.finish(progress)
                return
            self.emit({"event": "resumed", "worker": self.worker_id, "adapter": adapter.name, "step": progress.step})

    def finish(self, progress: AdapterProgress) -> None:
        if self.run_dir is not None and progress.failure is None:
            folder = self.run_dir / "adapters" / progress.spec.name
            self.engine.save_slot(progress.slot, progress.spec.adapter, folder, self.spec.base_model)
            self.written(folder)
        entry = result_entry(progress, self.spec)
        self.results[progress.spec.name] = entry
        if self.run_dir is not None:
            write_json(result_path(self.run_dir, progress.spec.name), entry)
            self.written(result_path(self.run_dir, progress.spec.name))
        self.emit({"event": "adapter_done", "worker": self.worker_id, "adapter": progress.spec.name, "result": entry})
        self.active.remove(progress)
        self.free_slots.append(progress.slot)

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoint(self, progress: AdapterProgress) -> None:
        """Write the adapter's whole training state atomically (write, then rename)."""
        if self.run_dir is None:
            return
        state = {name: getattr(progress, name) for name in AdapterProgress.SAVED}
        state.update(
            slot=self.engine.slot_state(progress.slot),
            strategy=self.strategies.slot_state(progress.slot),
            sampler=progress.sampler.state(),
            replay_rng=progress.replay_rng.getstate() if progress.replay_rng else None,
            dropout_rng=progress.dropout_generator.get_state() if progress.dropout_generator is not None else None,
        )
        path = state_path(self.run_dir, progress.spec.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        self.written(path)

    def restore(self, progress: AdapterProgress, state: dict[str, Any]) -> None:
        self.engine.load_slot_state(progress.slot, state["slot"])  # first: it checks the state fits
        for name in AdapterProgress.SAVED:
            setattr(progress, name, state[name])
        progress.replay_buffer = [tuple(item) for item in progress.replay_buffer]  # type: ignore[misc]
        self.strategies.load_slot_state(progress.slot, state["strategy"])
        if not progress.finished:
            task = progress.tasks[progress.task_index]
            progress.sampler = BatchSampler(len(task.train), progress.spec.seed, progress.task_index)
            progress.sampler.load_state(state["sampler"])
        if progress.replay_rng is not None and state["replay_rng"] is not None:
            rng = state["replay_rng"]
            progress.replay_rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        if progress.dropout_generator is not None and state["dropout_rng"] is not None:
            progress.dropout_generator.set_state(state["dropout_rng"])

    # -- strategy bookkeeping and batches ---------------------------------------------------

    def end_task(self, progress: AdapterProgress) -> None:
        """Strategy bookkeeping after task `task_index - 1` ended (and was evaluated), before the next."""
        config, finished = progress.spec.adapter, progress.task_index - 1
        finished_task = progress.tasks[finished]
        if config.strategy == "replay":
            keep = random.Random(f"buffer:{progress.spec.seed}:{finished}")
            picked = keep.sample(range(len(finished_task.train)), min(config.buffer_size, len(finished_task.train)))
            progress.replay_buffer.extend((finished, i) for i in picked)

        def fisher() -> list[torch.Tensor]:
            # One example per backward: the empirical Fisher is the mean of per-example squared gradients.
            sampler = BatchSampler(len(finished_task.train), progress.spec.seed, 10_000 + finished)
            batches = [[StepInput(progress.slot, [finished_task.train[i]], 0.0, 0.0, None)]
                       for i in sampler.next(config.fisher_samples)]
            with torch.enable_grad():  # called from inside the strategies' no-grad bookkeeping
                return squared_gradients(self.engine, batches, self.tokenizer.pad_token_id)

        self.strategies.end_task(progress.slot, config, finished, progress.spec.seed, fisher)

    def batch_rows(self, progress: AdapterProgress) -> list[Row]:
        task, size = progress.tasks[progress.task_index], progress.spec.train.batch_size
        replayed: list[Row] = []
        if progress.replay_buffer and progress.replay_rng is not None:
            count = min(round(size * progress.spec.adapter.replay_ratio), len(progress.replay_buffer))
            replayed = [progress.tasks[t].train[i] for t, i in progress.replay_rng.sample(progress.replay_buffer, count)]
        return [task.train[i] for i in progress.sampler.next(size - len(replayed))] + replayed

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> dict[str, dict[str, Any]]:
        with self.ctrl_c_between_steps():
            while self.queue or self.active:
                if self.interrupted:
                    for progress in self.active:
                        self.checkpoint(progress)  # Ctrl-C: stop cleanly; `--resume` continues from here
                    raise KeyboardInterrupt
                while self.free_slots and self.queue:
                    self.start(self.queue.popleft(), self.free_slots.pop())
                if not self.evaluate_due() and self.active:  # none active: every adapter started was already done
                    self.train_step()
        return self.results

    @contextlib.contextmanager
    def ctrl_c_between_steps(self) -> Iterator[None]:
        """Ctrl-C only sets `interrupted`, which the loop checks between steps.

        A KeyboardInterrupt raised mid-step (weights stepped, counters not; a task evaluated,
        its strategy bookkeeping not done; metrics not yet written) would be saved as a state
        that resumes wrong. A second Ctrl-C stops at once, without saving.
        """
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return

        def on_ctrl_c(signum: int, frame: Any) -> None:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True

        previous = signal.signal(signal.SIGINT, on_ctrl_c)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    def evaluate_due(self) -> bool:
        """Evaluate every adapter that is due, in one batched pass; False when none was."""
        due = [p for p in self.active if p.needs_eval or p.needs_curve_eval]
        if not due:
            return False
        requests = [EvalRequest(p.spec.name, p.slot if p.step else None, p.tasks) for p in due]
        scores, seconds = evaluate(self.engine, requests, self.spec.eval, self.tokenizer)
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
            if not boundary:
                continue
            progress.evals.append(scores[progress.spec.name])
            progress.needs_eval = False
            self.emit({"event": "eval", "worker": self.worker_id, "adapter": progress.spec.name,
                       "after_task": progress.task_index, "scores": scores[progress.spec.name]})
            if progress.task_index and self.run_dir is not None:
                checkpoint = self.run_dir / "checkpoints" / progress.spec.name / f"after-task-{progress.task_index}"
                self.engine.save_slot(progress.slot, progress.spec.adapter, checkpoint, self.spec.base_model)
                self.written(checkpoint)
            if progress.finished:
                self.finish(progress)
            else:
                if progress.task_index:
                    self.end_task(progress)  # after the checkpoint above: it holds the adapter as trained
                self.checkpoint(progress)
        return True

    def train_step(self) -> None:
        inputs = []
        for progress in self.active:
            train = progress.spec.train
            factor = lr_factor(progress.step, progress.total_steps, train.warmup_steps, train.schedule)
            inputs.append(StepInput(progress.slot, self.batch_rows(progress), progress.spec.adapter.lr * factor,
                                    progress.spec.adapter.dropout, progress.dropout_generator))
        step_results, seconds = fused_step(self.engine, inputs, self.tokenizer.pad_token_id, self.strategies)
        records, failed, saves = [], [], []
        for progress, part, outcome in zip(list(self.active), inputs, step_results):
            progress.step += 1
            progress.step_in_task += 1
            progress.tokens += outcome.tokens
            progress.train_seconds += seconds
            task_name = progress.tasks[progress.task_index].name
            records.append({
                "adapter": progress.spec.name, "task": task_name, "task_index": progress.task_index,
                "step": progress.step, "loss": outcome.loss, "lr": part.lr, "grad_norm": outcome.grad_norm,
                "tokens": outcome.tokens, "seconds": seconds,
            })
            limit = progress.spec.train.grad_norm_limit
            if not outcome.finite:
                progress.failure = (f"non-finite loss or gradient (loss={outcome.loss}, grad_norm={outcome.grad_norm}) "
                                    f"at step {progress.step}, task '{task_name}'")
            elif limit is not None and outcome.grad_norm > limit:
                progress.failure = (f"gradient norm {outcome.grad_norm:.3g} above train.grad_norm_limit={limit:g} "
                                    f"at step {progress.step}, task '{task_name}'")
            if progress.failure:
                failed.append(progress)
            elif progress.step_in_task >= progress.task_steps[progress.task_index]:
                progress.task_index += 1
                progress.step_in_task = 0
                progress.needs_eval = True
                if not progress.finished:
                    size = len(progress.tasks[progress.task_index].train)
                    progress.sampler = BatchSampler(size, progress.spec.seed, progress.task_index)
            else:
                if self.spec.eval.every_steps and progress.step % self.spec.eval.every_steps == 0:
                    progress.needs_curve_eval = True
                every = progress.spec.train.checkpoint_every
                if every and progress.step % every == 0:
                    saves.append(progress)
        # The step's metrics go out before any state or result that holds the step: after a kill,
        # `--resume` keeps metrics.jsonl up to each saved state, so a line missing there stays missing.
        self.emit({"event": "step", "worker": self.worker_id, "records": records})
        for progress in failed:
            self.finish(progress)
        for progress in saves:
            self.checkpoint(progress)


def run(
    plan: WorkerPlan,
    spec: SweepSpec,
    task_data: dict[int, list[TaskData]],
    run_dir: Path | None,
    emit: Emit = lambda event: None,
    worker_id: int = 0,
    resume: bool = False,
    written: Callable[[Path], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train and evaluate every adapter of `plan`; returns {adapter name: result entry}.

    `task_data` maps a data seed to the task sequence generated with it.
    """
    if plan.threads:
        torch.set_num_threads(plan.threads)
    return Worker(plan, spec, task_data, run_dir, emit, worker_id, resume, written).run()


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
