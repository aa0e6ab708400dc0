"""Fusion efficiency: what one fused pass over N adapters costs against the union batch through one adapter.

For each kind of pass, fusion efficiency = time of one adapter's pass over the union batch
(the N adapters' rows together), on an engine holding only that adapter, / time of the fused
N-adapter pass over the same rows; the two are timed alternately, in pairs, and the figure is the
median over the pairs of their ratio (`bench.alternating`), so drift in the machine's speed hits
both alike. 1.0 means co-training costs no more than the union batch.

- train: one training step (forward, backward, clipping, AdamW);
- eval: one batched evaluation pass over a task;
- on a sweep with a `grpo` task, sample: one RL sampling pass (each adapter's prompts x
  group_size rows, decoded to the end), and rl_train: one RL training step on those samples;
  with `model.share_prompts` on, both fused passes are also timed with full rows (each sample
  prefilled and trained as its own row), giving what sharing the prompts speeds them up.

The one adapter is the first adapter given the sweep's mean rank, so that its LoRA matmuls on
the union batch do the work of the N adapters' on their own rows (sum of rows x rank; on a GPU
the batched path pads every adapter to the largest rank, so there the fused step does more).
Everything is timed with the torch threads of one of the concurrent run's workers. The union
RL sampling uses the first adapter's temperature and top-p for every row; fresh adapters all
equal the base (B = 0) and the rows keep their own seeds, so both sides sample the same
tokens and decode the same number of steps.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlora_cli.bench.alternating import Alternated, timed_alternately
from mlora_cli.spec.schema import SweepSpec
from mlora_cli.spec.sweep import AdapterSpec


def fusion_efficiency(spec: SweepSpec, adapters: list[AdapterSpec], data_dir: Path, repeats: int = 7,
                      threads: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Union-batch time / fused time per kind of pass (see the module doc).

    `threads`: torch threads while measuring, those of one of the concurrent run's CPU workers
    (None: torch's default), so the steps are timed as the run ran them.
    """
    import torch

    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return {**_fusion_efficiency(spec, adapters, data_dir, repeats, device), "device": device,
                "torch_threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(default_threads)


def _fusion_efficiency(spec: SweepSpec, adapters: list[AdapterSpec], data_dir: Path, repeats: int,
                       device: str) -> dict[str, Any]:
    import torch

    from mlora_cli.data.batches import TokenizedTask, tokenize_task
    from mlora_cli.data.sources import load_task
    from mlora_cli.eval.evaluate import evaluate
    from mlora_cli.eval.request import EvalRequest
    from mlora_cli.model.base import load_base
    from mlora_cli.model.engine import MultiLoraModel
    from mlora_cli.train.step import StepInput, fused_step

    targets = sorted({t for a in adapters for t in a.adapter.target_modules})

    def engine_for(slots: list[AdapterSpec]) -> tuple[MultiLoraModel, Any]:
        base = load_base(spec.base_model, device, spec.model)
        engine = MultiLoraModel(base.model, targets, len(slots), max(a.adapter.rank for a in slots), base.autocast,
                                spec.model.share_prompts)  # RL passes as the run made them
        for slot, adapter in enumerate(slots):
            engine.load_slot(slot, adapter.adapter, adapter.train.max_grad_norm, adapter.seed)
        return engine, base.tokenizer

    # The union batch runs on an engine of its own holding one adapter, as a single-tenant run
    # would: no other slot's optimizer state or routing to carry. It is the first adapter at
    # the sweep's mean rank: N adapters of ranks r_k on their own rows make the LoRA matmuls
    # of one adapter of rank mean(r_k) on all the rows, so both sides do the same work (at the
    # first adapter's own rank the fused step would have more to do, or less).
    union_rank = max(1, round(statistics.mean(a.adapter.rank for a in adapters)))
    union_adapter = dataclasses.replace(adapters[0], adapter=dataclasses.replace(adapters[0].adapter, rank=union_rank))
    fused_engine, tokenizer = engine_for(adapters)
    union_engine, _ = engine_for([union_adapter])
    pad = tokenizer.pad_token_id
    task = tokenize_task(load_task(spec.tasks[0], adapters[0].seed, data_dir), tokenizer, adapters[0].train.max_seq_len)
    size = adapters[0].train.batch_size
    rows = [[task.train[(slot * size + i) % len(task.train)] for i in range(size)] for slot in range(len(adapters))]
    fused = [StepInput(slot, rows[slot], 1e-9, 0.0, None) for slot in range(len(adapters))]
    union = [StepInput(0, [r for part in rows for r in part], 1e-9, 0.0, None)]
    eval_rows = list(task.eval)
    union_task = TokenizedTask(task.name, (), tuple(eval_rows * len(adapters)))
    fused_requests = [EvalRequest(a.name, slot, [task]) for slot, a in enumerate(adapters)]
    union_request = [EvalRequest("union", 0, [union_task])]

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def alternated(union_run: Callable[[], Any], fused_run: Callable[[], Any], times: int) -> Alternated:
        return timed_alternately(union_run, fused_run, times, sync)

    # A training step is short: more repeats for the same time.
    train = alternated(lambda: fused_step(union_engine, union, pad), lambda: fused_step(fused_engine, fused, pad),
                       3 * repeats)
    evaluation = alternated(lambda: evaluate(union_engine, union_request, spec.eval, tokenizer),
                            lambda: evaluate(fused_engine, fused_requests, spec.eval, tokenizer), repeats)
    rl_figures = _rl_fusion(spec, adapters, data_dir, fused_engine, union_engine, tokenizer, alternated, repeats)
    return {
        **rl_figures,
        "adapters": len(adapters),
        "rows_per_adapter": size,
        "union_rank": union_rank,
        "fused_step_seconds": train.second_seconds,
        "union_step_seconds": train.first_seconds,
        "fusion_efficiency_train": train.ratio,
        "fused_eval_seconds": evaluation.second_seconds,
        "union_eval_seconds": evaluation.first_seconds,
        "fusion_efficiency_eval": evaluation.ratio,
    }




def _rl_fusion(spec: SweepSpec, adapters: list[AdapterSpec], data_dir: Path, fused_engine: Any, union_engine: Any,
               tokenizer: Any, alternated: Callable[..., Alternated], repeats: int) -> dict[str, Any]:
    """Sampling and RL-step fusion on the sweep's first `grpo` task; nothing on a sweep without one."""
    from mlora_cli.data.batches import tokenize_task
    from mlora_cli.data.sources import load_task
    from mlora_cli.train.grpo import RLJob, rollout_request, scored_batch
    from mlora_cli.train.rollout import RolloutRequest, sample
    from mlora_cli.train.step import StepInput, fused_step

    index = next((i for i, t in enumerate(spec.tasks) if t.objective == "grpo"), None)
    if index is None:
        return {}
    first = adapters[0]
    task = tokenize_task(load_task(spec.tasks[index], first.seed, data_dir), tokenizer, first.train.max_seq_len)
    size = first.train.batch_size
    jobs = [RLJob(a.name, slot, a.seed, 0, [task.train[(slot * size + i) % len(task.train)] for i in range(size)],
                  a.train.rl, task.reward, task.name) for slot, a in enumerate(adapters)]
    fused_requests = [rollout_request(job) for job in jobs]
    rl = first.train.rl
    union_request = [RolloutRequest(0, [row for r in fused_requests for row in r.prompts], rl.group_size,
                                    rl.temperature, rl.top_p, rl.max_new_tokens,
                                    [seed for r in fused_requests for seed in r.seeds])]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    sampling = alternated(lambda: sample(union_engine, union_request, pad, eos),
                          lambda: sample(fused_engine, fused_requests, pad, eos), repeats)
    rollouts = sample(fused_engine, fused_requests, pad, eos)
    batches = [scored_batch(job, rollout, tokenizer, 0.0) for job, rollout in zip(jobs, rollouts)]
    fused = [StepInput(slot, b.rows, 1e-9, 0.0, None, b.advantages, job.config)
             for slot, (job, b) in enumerate(zip(jobs, batches))]
    union = [StepInput(0, [r for b in batches for r in b.rows], 1e-9, 0.0, None,
                       [a for b in batches for a in b.advantages], rl)]
    rl_step = alternated(lambda: fused_step(union_engine, union, pad), lambda: fused_step(fused_engine, fused, pad),
                         3 * repeats)
    sharing = {}
    if fused_engine.share_prompts:  # what running each group's prompt once gives: the same passes with full rows

        def full_rows(run: Callable[[], Any]) -> Callable[[], Any]:
            def unshared() -> Any:
                fused_engine.share_prompts = False
                try:
                    return run()
                finally:
                    fused_engine.share_prompts = True
            return unshared

        full_sample = alternated(full_rows(lambda: sample(fused_engine, fused_requests, pad, eos)),
                                 lambda: sample(fused_engine, fused_requests, pad, eos), repeats)
        full_step = alternated(full_rows(lambda: fused_step(fused_engine, fused, pad)),
                               lambda: fused_step(fused_engine, fused, pad), repeats)
        sharing = {"full_rows_sample_seconds": full_sample.first_seconds,
                   "prompt_sharing_speedup_sample": full_sample.ratio,
                   "full_rows_rl_step_seconds": full_step.first_seconds,
                   "prompt_sharing_speedup_rl_train": full_step.ratio}
    return {
        **sharing,
        "rl_rows_per_adapter": size * rl.group_size,
        "fused_sample_seconds": sampling.second_seconds,
        "union_sample_seconds": sampling.first_seconds,
        "fusion_efficiency_sample": sampling.ratio,
        "fused_rl_step_seconds": rl_step.second_seconds,
        "union_rl_step_seconds": rl_step.first_seconds,
        "fusion_efficiency_rl_train": rl_step.ratio,
    }
