"""One worker: load the base once, then co-train its adapters through the task sequence.

`run(plan, ...)` is a plain function (tests call it in-process). The worker holds
`plan.slots` adapters at once; each trains `tasks[0]`, `tasks[1]`, ... and is evaluated
on every task before training and after each task (all due adapters in one batched
pass). When an adapter finishes or fails, its slot takes the next queued adapter at once,
without reloading the base. Everything an adapter sees (init, batches, dropout) comes
from its own seed (`mlora_cli.seeds`), so neighbours never change its results.

The loop is `start -> evaluate when due -> step -> finish`; what a strategy adds lives in
`train.strategies`, the training state on disk in `run.state`, what a slot holds in the engine.
Ctrl-C saves every active adapter's state at the end of the step it interrupts.
"""

from __future__ import annotations

import functools
import json
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from mlora_cli import seeds
from mlora_cli.contract import (
    AdapterResult,
    Emit,
    adapter_dir,
    adapter_result,
    checkpoint_dir,
    result_path,
    state_path,
)
from mlora_cli.data.batches import BatchSampler, Row, TokenizedTask, check_formats, tokenize_task
from mlora_cli.data.sources import TaskData
from mlora_cli.errors import ConfigError, Interrupted, StorageError
from mlora_cli.eval.base_rows import KeptBaseScores
from mlora_cli.eval.harness_rows import HarnessRows
from mlora_cli.eval.reeval import read_peft_adapter
from mlora_cli.eval.request import EvalRequest
from mlora_cli.files import write_json
from mlora_cli.model.base import load_base
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.model.optim import lr_factor
from mlora_cli.run import state
from mlora_cli.run.progress import AdapterProgress, spend_rl_batch, step_failure
from mlora_cli.run.search import Search, objective
from mlora_cli.run.signals import ctrl_c_between_steps
from mlora_cli.spec.plan import WorkerPlan
from mlora_cli.spec.schema import SweepSpec
from mlora_cli.spec.space import measuring_steps
from mlora_cli.spec.sweep import AdapterSpec
from mlora_cli.train.grpo import RLJob, rl_batches
from mlora_cli.train.rewards import load_reward
from mlora_cli.train.step import StepInput, fused_step, squared_gradients
from mlora_cli.train.strategies import Strategies, engine_shape


class Worker:
    """The training loop of one worker over a slot engine; see the module doc."""

    def __init__(self, plan: WorkerPlan, spec: SweepSpec, task_data: dict[int, list[TaskData]], run_dir: Path | None,
                 emit: Emit, worker_id: int, resume: bool, written: Callable[[Path], None] | None = None):
        self.plan, self.spec, self.task_data, self.run_dir = plan, spec, task_data, run_dir
        self.emit, self.worker_id, self.resume = emit, worker_id, resume
        # The Optuna study (an adapter is a trial), for a searched or pruned sweep.
        self.search = Search(spec, run_dir, resume) if spec.sweep.runs_a_study else None
        # Told of every file or folder written under run_dir (Ray ships them to the driver).
        self.written = written or (lambda path: None)
        started = time.perf_counter()
        self.base = load_base(spec.base_model, plan.device, spec.model)
        check_formats(spec.tasks, self.base.tokenizer, spec.base_model)
        load_rewards(spec, task_data)
        self.tokenizer = self.base.tokenizer
        self.tokenized: dict[tuple[int, int], list[TokenizedTask]] = {}
        # A search's trials are asked later: the engine is built to fit any of them (search.shape).
        configs = [a.adapter for a in plan.adapters] + (self.search.shape() if self.search else [])
        targets = sorted({t for config in configs for t in config.target_modules})
        num_slots, max_rank = engine_shape(configs, plan.slots, len(spec.tasks))
        self.engine = MultiLoraModel(self.base.model, targets, num_slots, max_rank, self.base.autocast,
                                     spec.model.share_prompts)
        self.strategies = Strategies(self.engine, plan.slots)
        # eval.harness_tasks: lm-evaluation-harness columns of R, scored for every due adapter together
        self.harness = HarnessRows(spec.eval, self.base.model, self.tokenizer) if spec.eval.harness_tasks else None
        self.base_scores = KeptBaseScores()  # every adapter's R row before training: the base's, evaluated once
        self.queue = deque(plan.adapters)
        self.free_slots = list(range(plan.slots))[::-1]
        self.active: list[AdapterProgress] = []
        self.results: dict[str, AdapterResult] = {}
        self.interrupted = 0  # the stop signal seen (SIGINT, SIGTERM); see ctrl_c_between_steps
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
            if self.search is not None:
                self.search.resumed(self.results[adapter.name])
            self.free_slots.append(slot)
            self.emit({"event": "adapter_done", "worker": self.worker_id, "adapter": adapter.name,
                       "result": self.results[adapter.name], "resumed": True})
            return
        if self.search is not None:  # a trial slot gets its parameters, asked from Optuna now that a slot is free
            adapter = self.search.begin(adapter)
            self.emit({"event": "trial", "worker": self.worker_id, "adapter": adapter.name, "spec": adapter})
        self.engine.load_slot(slot, adapter.adapter, adapter.train.max_grad_norm, adapter.seed)
        self.strategies.start(slot, adapter.adapter, adapter.seed)
        dropout = None
        if adapter.adapter.dropout > 0:
            # A host generator whatever the device: drawing each mask's seed from it never waits for a
            # GPU, and its state resumes on another device (a CUDA generator's state fits CUDA only).
            dropout = torch.Generator().manual_seed(seeds.dropout(adapter.seed))
        task_steps = adapter.task_steps([t.steps for t in self.spec.tasks])
        progress = AdapterProgress(spec=adapter, slot=slot, tasks=[], sampler=BatchSampler(1, adapter.seed, 0),
                                   task_steps=task_steps, dropout_generator=dropout,
                                   measure_at=tuple(measuring_steps(self.spec, sum(task_steps))))
        self.active.append(progress)
        if adapter.adapter.init_from is not None:  # a damaged or unfitting warm start fails this adapter only
            try:
                self.engine.set_slot_weights(slot, adapter.adapter, warm_start(self.engine, adapter))
            except ConfigError as exc:
                return self.finish(progress, "; ".join(problem if problem.startswith("adapter.init_from") else
                                                       f"adapter.init_from: {problem}" for problem in exc.problems))
        try:
            progress.tasks = self.tasks_for(adapter)
        except ConfigError as exc:  # bad data for this adapter must not stop the others
            return self.finish(progress, "; ".join(exc.problems))
        except Exception as exc:
            return self.finish(progress, f"data: {type(exc).__name__}: {exc}")
        progress.sampler = BatchSampler(len(progress.tasks[0].train), adapter.seed, 0)
        saved = state_path(self.run_dir, adapter.name) if self.run_dir is not None else None
        if self.resume and saved is not None and saved.is_file():
            try:
                state.restore(saved, progress, self.engine, self.strategies)
            except ValueError as exc:  # a state this engine cannot take: this adapter fails, the others go on
                return self.finish(progress, f"resume: {saved}: {exc}")
            self.emit({"event": "resumed", "worker": self.worker_id, "adapter": adapter.name, "step": progress.step})
            pruned = self.search.decided(adapter.name) if self.search is not None else None
            if pruned is not None and progress.step >= pruned["step"]:  # pruned at a task's end, its result unwritten
                self.finish(progress, pruned=pruned)

    def finish(self, progress: AdapterProgress, failure: str | None = None, pruned: dict | None = None) -> None:
        """The adapter ends (done, failed, or `pruned` with what the pruner compared); its slot is free at once."""
        progress.failure = progress.failure or failure
        if self.run_dir is not None and progress.failure is None and pruned is None:
            folder = adapter_dir(self.run_dir, progress.spec.name)
            self.engine.save_slot(progress.slot, progress.spec.adapter, folder, self.spec.base_model)
            self.written(folder)
        entry = adapter_result(progress.spec, [t.name for t in self.spec.tasks], evals=progress.evals,
                               curve=progress.curve, steps=progress.step, train_tokens=progress.tokens,
                               train_seconds=progress.train_seconds, eval_seconds=progress.eval_seconds,
                               failure=progress.failure, pruned=pruned is not None, harness=progress.harness)
        value = None
        if self.search is not None:  # its trial, recorded in the result; told to Optuna once the result is written
            final, last = entry["final"], len(self.spec.tasks) - 1
            value = pruned["value"] if pruned else objective(self.spec, final, last) if final else None
            entry["trial"] = self.search.outcome(progress.spec.name, value, pruned)
        self.results[progress.spec.name] = entry
        if self.run_dir is not None:
            write_json(result_path(self.run_dir, progress.spec.name), entry)
            self.written(result_path(self.run_dir, progress.spec.name))
        if self.search is not None:
            self.search.close(progress.spec.name, entry["status"], value)
        self.emit({"event": "adapter_done", "worker": self.worker_id, "adapter": progress.spec.name, "result": entry})
        self.active.remove(progress)
        self.free_slots.append(progress.slot)

    def checkpoint(self, progress: AdapterProgress) -> None:
        if self.run_dir is not None:
            self.written(state.save(self.run_dir, progress, self.engine, self.strategies))

    def end_task(self, progress: AdapterProgress) -> None:
        """Strategy bookkeeping after task `task_index - 1` ended (and was evaluated), before the next."""
        finished = progress.task_index - 1
        fisher = functools.partial(fisher_of, self.engine, progress, finished, self.tokenizer.pad_token_id)
        self.strategies.end_task(progress.slot, progress.spec.adapter, finished, progress.spec.seed, fisher,
                                 len(progress.tasks[finished].train))

    def rl_step_batches(self) -> set[str]:
        """Sample and score new batches for the adapters on a `grpo` task whose samples are used up (one fused
        pass; each keeps its batch in `progress.rl_batch` for `num_iterations` steps); a failing reward stops
        one. Returns the adapters that sampled this step."""
        due = [p for p in self.active if self.spec.tasks[p.task_index].objective == "grpo" and p.rl_batch is None]
        batches, failures = rl_batches(self.engine, self.tokenizer, [self.rl_job(p) for p in due]) if due else ({}, {})
        for progress in due:
            progress.rl_batch = batches.get(progress.spec.name)
            if progress.spec.name in failures:
                self.finish(progress, failures[progress.spec.name])
        return set(batches)

    def rl_job(self, progress: AdapterProgress) -> RLJob:
        """An adapter's share of this step's RL sampling: `batch_size` prompts (replay's from earlier tasks among
        them), `group_size` samples each."""
        size = progress.spec.train.batch_size
        replayed = self.strategies.replayed_items(progress.slot, progress.spec.adapter, size)
        prompts = [progress.task.train[i] for i in progress.sampler.next(size - len(replayed))]
        scorers = {len(prompts) + k: (progress.tasks[t].reward, progress.tasks[t].name)
                   for k, (t, _) in enumerate(replayed)}
        prompts += [progress.tasks[t].train[i] for t, i in replayed]
        return RLJob(progress.spec.name, progress.slot, progress.spec.seed, progress.step, prompts,
                     progress.spec.train.rl, progress.task.reward, progress.task.name, scorers)

    def batch_rows(self, progress: AdapterProgress) -> list[Row]:
        size = progress.spec.train.batch_size
        replayed = self.strategies.replayed_rows(progress.slot, progress.spec.adapter, size, progress.tasks)
        return [progress.task.train[i] for i in progress.sampler.next(size - len(replayed))] + replayed

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> dict[str, AdapterResult]:
        try:
            return self.loop()
        except OSError as exc:  # a write into the run folder failed: stop; every earlier write is whole
            raise StorageError(exc.filename or self.run_dir, exc) from exc

    def loop(self) -> dict[str, AdapterResult]:
        with ctrl_c_between_steps(self):
            while self.queue or self.active:
                if self.interrupted:
                    for progress in self.active:
                        self.checkpoint(progress)  # Ctrl-C or SIGTERM: stop cleanly; `--resume` continues from here
                    raise Interrupted(self.interrupted)
                while self.free_slots and self.queue:
                    self.start(self.queue.popleft(), self.free_slots.pop())
                if not self.evaluate_due() and self.active:  # none active: every adapter started was already done
                    self.train_step()
        return self.results

    def evaluate_due(self) -> bool:
        """Evaluate every adapter that is due, in one batched pass; False when none was."""
        due = [p for p in self.active if p.needs_eval or p.needs_curve_eval]
        if not due:
            return False
        # Before its first step an adapter is the base (B = 0), evaluated once for the worker; a warm start is not.
        requests = [EvalRequest(p.spec.name, p.slot if p.step or p.spec.adapter.init_from else None, p.tasks,
                                p.spec.seed) for p in due]
        failures: dict[str, str] = {}
        scores, seconds, kept = self.base_scores.evaluate(self.engine, requests, self.spec.eval, self.tokenizer,
                                                          failures)
        harness, harness_seconds = self.harness_rows([p for p in due if p.needs_eval and p.spec.name not in failures])
        for progress in due:
            progress.eval_seconds += 0.0 if progress.spec.name in kept else seconds / (len(due) - len(kept))
            if progress.spec.name in failures:  # its reward failed: it stops, the others go on
                self.finish(progress, failures[progress.spec.name])
                continue
            boundary = progress.needs_eval
            progress.curve.append({
                "step": progress.step,
                # the task being trained at this step; at a boundary, the one just finished
                "task_index": max(0, progress.task_index - 1) if boundary else progress.task_index,
                "after_task": progress.task_index if boundary else None,
                "scores": scores[progress.spec.name],
            })
            progress.needs_curve_eval = False
            pruned = self.judge(progress, scores[progress.spec.name])
            if boundary:
                progress.eval_seconds += harness_seconds.get(progress.spec.name, 0.0)
                if self.harness is not None:
                    progress.harness.append(harness[progress.spec.name])
                self.row_done(progress, scores[progress.spec.name])
            if pruned and progress in self.active:
                self.finish(progress, pruned=pruned)  # its slot takes the next queued adapter, as after any finish
        return True

    def harness_rows(self, due: list[AdapterProgress]) -> tuple[dict[str, dict], dict[str, float]]:
        """The harness columns of the R rows now due ({} without eval.harness_tasks), and each adapter's share of
        the seconds they took."""
        if self.harness is None or not due:
            return {}, {}
        started = time.perf_counter()
        rows = self.harness.score(self.engine, [(p.spec.name, p.slot, not p.step and p.spec.adapter.init_from is None)
                                                for p in due])
        share = (time.perf_counter() - started) / len(due)
        return rows, {p.spec.name: share for p in due}

    def judge(self, progress: AdapterProgress, scores: dict[str, dict[str, float]]) -> dict | None:
        """At a measuring step, report the objective to the study; what pruned it, if its pruner says so."""
        if self.search is None or progress.step not in progress.measure_at:
            return None
        value = objective(self.spec, scores, progress.curve[-1]["task_index"])
        return self.search.judge(progress.spec.name, progress.step, value)

    def row_done(self, progress: AdapterProgress, scores: dict[str, dict[str, float]]) -> None:
        """A row of R: save the per-task checkpoint, then finish the adapter or start its next task."""
        progress.evals.append(scores)
        progress.needs_eval = False
        self.emit({"event": "eval", "worker": self.worker_id, "adapter": progress.spec.name,
                   "after_task": progress.task_index, "scores": scores,
                   **({"harness": progress.harness[-1]} if progress.harness else {})})
        if progress.task_index and self.run_dir is not None:
            checkpoint = checkpoint_dir(self.run_dir, progress.spec.name, progress.task_index)
            self.engine.save_slot(progress.slot, progress.spec.adapter, checkpoint, self.spec.base_model)
            self.written(checkpoint)
        if progress.finished:
            return self.finish(progress)
        if progress.task_index:
            self.end_task(progress)  # after the checkpoint above: it holds the adapter as trained
        self.checkpoint(progress)

    def train_step(self) -> None:
        sampled = self.rl_step_batches()
        inputs = []
        for progress in self.active:
            train = progress.spec.train
            factor = lr_factor(progress.step, progress.total_steps, train.warmup_steps, train.schedule)
            batch = progress.rl_batch
            rows = batch.rows if batch else self.batch_rows(progress)
            inputs.append(StepInput(progress.slot, rows, progress.spec.adapter.lr * factor,
                                    progress.spec.adapter.dropout, progress.dropout_generator,
                                    batch.advantages if batch else None, train.rl if batch else None,
                                    batch.old_log_probs if batch else None,
                                    bool(batch and batch.steps_left > 1 and batch.old_log_probs is None)))
        step_results, seconds = fused_step(self.engine, inputs, self.tokenizer.pad_token_id, self.strategies)
        records, failed, saves = [], [], []
        for progress, part, outcome in zip(list(self.active), inputs, step_results):
            progress.count_step(outcome.tokens, seconds)
            records.append({
                "adapter": progress.spec.name, "task": progress.task.name, "task_index": progress.task_index,
                "step": progress.step, "loss": outcome.loss, "lr": part.lr, "grad_norm": outcome.grad_norm,
                "tokens": outcome.tokens, "seconds": seconds,
                **spend_rl_batch(progress, part, progress.spec.name in sampled),
            })
            progress.failure = step_failure(progress, outcome.finite, outcome.loss, outcome.grad_norm)
            if progress.failure:
                failed.append(progress)
            elif progress.task_done:
                progress.next_task()
            else:
                curve_every = self.spec.eval.every_steps
                if curve_every and progress.step % curve_every == 0 or progress.step in progress.measure_at:
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


def cuda_peak() -> dict[str, float]:
    """This process's peak GPU memory (allocated and reserved by torch, MiB), if it used a GPU."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    return {"cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
            "cuda_max_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}


def load_rewards(spec: SweepSpec, task_data: dict[int, list[TaskData]]) -> None:
    """Import every reward the run will call, before training: one that cannot be found is a ConfigError."""
    tasks = next(iter(task_data.values()), [])
    # Replay on an RL task scores an earlier task's prompts by that task's reward: with any RL task, all of them.
    every = any(t.objective == "grpo" for t in spec.tasks) or bool({"reward", "pass_at_k"} & set(spec.eval.metrics))
    if not every:
        return
    for i, data in enumerate(tasks):
        load_reward(data.reward, key=f"tasks[{i}].reward")


def warm_start(engine: MultiLoraModel, adapter: AdapterSpec) -> dict[str, torch.Tensor]:
    """The weights of `adapter.init_from`, checked to cover exactly the layers this adapter trains."""
    path = Path(adapter.adapter.init_from or "")
    saved = read_peft_adapter(path)
    layers = {f"base_model.model.{name}" for name in engine.targeted_layers(adapter.adapter)}
    held = {key.rsplit(".lora_", 1)[0] for key in saved.weights}
    if held != layers:
        extra, missing = sorted(held - layers), sorted(layers - held)
        raise ConfigError([f"adapter.init_from: {path} does not fit adapter '{adapter.name}': "
                           + "; ".join(part for part in (
                               f"{len(extra)} layers it does not target (e.g. {extra[0]})" if extra else "",
                               f"no weights for {len(missing)} of its layers (e.g. {missing[0]})" if missing else "")
                                       if part)])
    return saved.weights


def fisher_of(engine: MultiLoraModel, progress: AdapterProgress, finished: int, pad_id: int) -> list[torch.Tensor]:
    """EWC's diagonal Fisher of task `finished`: one example per backward, the mean of per-example squared gradients."""
    rows = progress.tasks[finished].train
    sampler = BatchSampler(len(rows), progress.spec.seed, seeds.fisher_samples_task(finished))
    batches = [[StepInput(progress.slot, [rows[i]], 0.0, 0.0, None)]
               for i in sampler.next(progress.spec.adapter.fisher_samples)]
    with torch.enable_grad():  # called from inside the strategies' no-grad bookkeeping
        return squared_gradients(engine, batches, pad_id)


def run(
    plan: WorkerPlan,
    spec: SweepSpec,
    task_data: dict[int, list[TaskData]],
    run_dir: Path | None,
    emit: Emit = lambda event: None,
    worker_id: int = 0,
    resume: bool = False,
    written: Callable[[Path], None] | None = None,
) -> dict[str, AdapterResult]:
    """Train and evaluate every adapter of `plan`; returns {adapter name: result entry}.

    `task_data` maps a data seed to the task sequence generated with it.
    """
    if plan.threads:
        torch.set_num_threads(plan.threads)
    return Worker(plan, spec, task_data, run_dir, emit, worker_id, resume, written).run()
