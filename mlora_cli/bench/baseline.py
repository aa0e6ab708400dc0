"""The single-tenant baseline: one adapter of a sweep, trained the usual way with plain PEFT.

    python -m mlora_cli.bench.baseline RESOLVED_SWEEP.yaml ADAPTER_NAME OUT.json [DATA_DIR]

This is what `mlora bench --sequential-baseline` runs, as a fresh process per adapter, one
after another: import, load the base, `get_peft_model`, `torch.optim.AdamW(fused=True)` (the fast one) with a LambdaLR
schedule and `clip_grad_norm_`, then the same evaluation as mlora (loss and token accuracy
from one forward per eval batch; exact match and reward from batched greedy `generate` with a KV cache).
It sees exactly mlora's data: the same tasks, tokenization, batches (same per-adapter sampler
and seed), padding to the longest row of each batch, and the same initial LoRA weights; torch
keeps its default thread count. Only naive fine-tuning is supported here.

A task with `objective: grpo` is trained by the same GRPO-family algorithm as mlora's: its
prompts x group_size samples come from HF `generate` (a KV cache, the whole group in one
batch), each row drawing its Gumbel noise from the same per-row seed through a logits
processor, so the samples are mlora's own up to rounding; the same reward, advantages and
loss (`train.grpo`) follow, then one optimizer step.
"""

# ruff: noqa: I001 (PROCESS_START must be imported before anything else)
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mlora_cli import PROCESS_START  # the process is timed from its first line, imports included

# The imports below come after PROCESS_START on purpose: their time is part of the baseline's.
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from mlora_cli import seeds  # noqa: E402
from mlora_cli.contract import load_resolved_sweep, matrix_of, mean_over_tasks  # noqa: E402
from mlora_cli.data.batches import BatchSampler, Row, collate, collate_prompts, token_losses, tokenize_task  # noqa: E402
from mlora_cli.data.sources import load_task  # noqa: E402
from mlora_cli.eval import choices, passk  # noqa: E402
from mlora_cli.eval.evaluate import completion_text, task_scores  # noqa: E402
from mlora_cli.model.base import autocast, load_base  # noqa: E402
from mlora_cli.model.engine import linear_layer_names, lora_a_init, matches_target, output_layer_name  # noqa: E402
from mlora_cli.model.optim import lr_factor  # noqa: E402
from mlora_cli.spec.sweep import expand  # noqa: E402
from mlora_cli.train.grpo import (  # noqa: E402
    RLBatch, RLJob, adapter_loss, rollout_request, scored_batch, token_log_probs,
)
from mlora_cli.train.rewards import load_reward, matches, score  # noqa: E402
from mlora_cli.train.rollout import as_rollouts, perturbed_scores  # noqa: E402


@torch.no_grad()
def evaluate(model, tasks, tokenizer, eval_config, seed: int = 0) -> dict[str, dict[str, float]]:
    model.eval()
    scores = {}
    for task_index, task in enumerate(tasks):
        rows = sorted(task.eval, key=lambda r: r.tokens)
        loss = tokens = correct = hits = 0.0
        completions: list[str] = []
        for start in range(0, len(rows), eval_config.batch_size):
            chunk = rows[start : start + eval_config.batch_size]
            if {"loss", "token_accuracy"} & set(eval_config.metrics):
                batch = collate(chunk, tokenizer.pad_token_id, model.device)
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                row_loss, row_tokens, row_correct = token_losses(logits, batch.labels)
                loss, tokens = loss + row_loss.sum().item(), tokens + row_tokens.sum().item()
                correct += row_correct.sum().item()
            if {"exact_match", "reward"} & set(eval_config.metrics):
                ids, mask = collate_prompts(chunk, tokenizer.pad_token_id, model.device)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=eval_config.max_new_tokens,
                                     do_sample=False, num_beams=1, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                for row, generated in zip(chunk, out[:, ids.size(1) :].tolist()):
                    completions.append(completion_text(generated, tokenizer))
                    hits += matches(completions[-1], row.completion)
        reward = None
        if "reward" in eval_config.metrics:
            values = score(load_reward(task.reward), [r.prompt for r in rows], completions,
                           [r.completion for r in rows], task.name)
            reward = sum(values) / max(1, len(values))
        scores[task.name] = task_scores(loss, tokens, correct, hits, len(rows), eval_config.metrics, reward)
        if "pass_at_k" in eval_config.metrics:
            scores[task.name]["pass_at_k"] = sampled_pass_at_k(model, tokenizer, task, task_index, seed, eval_config)
        if "choice_accuracy" in eval_config.metrics:  # a row per choice, batch_size rows per forward
            rows_of = [((i, c), row) for (_, i, c), row in choices.choice_rows([task])]
            likelihoods = {}
            for start in range(0, len(rows_of), eval_config.batch_size):
                chunk = rows_of[start : start + eval_config.batch_size]
                batch = collate([row for _, row in chunk], tokenizer.pad_token_id, model.device)
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                for (key, _), value in zip(chunk, choices.row_log_likelihoods(logits, batch.labels)):
                    likelihoods[key] = value
            scores[task.name]["choice_accuracy"] = choices.task_choice_accuracy(task, likelihoods,
                                                                                eval_config.choice_normalization)
    model.train()
    return scores


class SeededGumbelNoise(LogitsProcessor):
    """Turns `generate`'s greedy pick into mlora's sample: each row's scores plus its own Gumbel noise."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]  # as rollout's
        self.temperature = torch.full((len(seeds), 1), temperature, device=device)
        self.top_p = torch.full((len(seeds),), top_p, device=device) if top_p < 1.0 else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # Finished rows draw too (generate keeps them in the batch); their draws are never used.
        return perturbed_scores(scores, self.temperature, self.top_p, self.generators)


@torch.no_grad()
def sampled_tokens(model, tokenizer, rows: list[Row], seeds: list[int], temperature: float, top_p: float,
                   max_new_tokens: int) -> list[list[int]]:
    """One sampled completion per row from HF `generate`, each row with its own noise seed (mlora's sampling)."""
    ids, mask = collate_prompts(rows, tokenizer.pad_token_id, model.device)
    training = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         num_beams=1, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, logits_processor=LogitsProcessorList([
                             SeededGumbelNoise(seeds, temperature, top_p, model.device)]))
    model.train(training)
    generated = []
    for tokens in out[:, ids.size(1):].tolist():  # generate pads finished rows: cut after the first eos
        end = tokens.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in tokens else len(tokens)
        generated.append(tokens[:end])
    return generated


def sampled_batch(model, tokenizer, job: RLJob) -> RLBatch:
    """`job`'s prompts x group_size completions from HF `generate`, scored: mlora's RL batch, made the usual way."""
    started = time.perf_counter()
    request = rollout_request(job)
    prompts = [row for row in job.prompts for _ in range(job.config.group_size)]
    generated = sampled_tokens(model, tokenizer, prompts, request.seeds, job.config.temperature, job.config.top_p,
                               job.config.max_new_tokens)
    (rollout,) = as_rollouts([request], [row.ids[: row.prompt_len] for row in prompts], generated,
                             tokenizer.eos_token_id)
    return scored_batch(job, rollout, tokenizer, time.perf_counter() - started)


def sampled_pass_at_k(model, tokenizer, task, task_index: int, seed: int, eval_config) -> float:
    """The task's pass@k from `eval.samples` sampled completions per example, seeded as mlora seeds them."""
    n, rows = eval_config.samples, task.eval
    order = sorted(range(len(rows)), key=lambda i: rows[i].tokens)
    texts: dict[int, list[str]] = {}
    per_batch = max(1, eval_config.batch_size // n)
    for start in range(0, len(order), per_batch):
        chunk = order[start:start + per_batch]
        generated = sampled_tokens(model, tokenizer, [rows[i] for i in chunk for _ in range(n)],
                                   passk.sample_seeds(seed, [(task_index, i) for i in chunk], n),
                                   eval_config.temperature, eval_config.top_p, eval_config.max_new_tokens)
        for k, i in enumerate(chunk):
            texts[i] = [completion_text(g, tokenizer) for g in generated[k * n:(k + 1) * n]]
    return passk.task_pass_at_k(task.reward, task.name, [r.prompt for r in rows for _ in range(n)],
                                [t for i in range(len(rows)) for t in texts[i]],
                                [r.completion for r in rows for _ in range(n)], n, eval_config.pass_k)


def rl_loss(model, batch, rl_batch: RLBatch, config,
            old_log_probs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the GRPO-family loss, the completions' mean NLL that mlora logs as `loss`, the token log-probs) of one
    sampled batch; `old_log_probs` when the samples are being reused."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    log_probs, mask = token_log_probs(logits, batch.labels, config.temperature)
    reference = None
    if config.kl_beta > 0:
        with torch.no_grad(), model.disable_adapter():
            reference, _ = token_log_probs(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                           batch.labels, config.temperature)
    advantage = torch.tensor(rl_batch.advantages, dtype=log_probs.dtype, device=log_probs.device)
    loss_sum, tokens, _ = token_losses(logits, batch.labels)
    objective = adapter_loss(log_probs, mask, advantage, config, reference, old_log_probs)
    return objective, loss_sum.sum() / tokens.sum().clamp(min=1), log_probs.detach()


def lone_peft_model(model, adapter):
    """`model` with a PEFT LoRA of `adapter`'s settings on mlora's target layers, its A initialised as mlora's."""
    config = adapter.adapter
    output = output_layer_name(model)
    targets = [n for n in linear_layer_names(model) if matches_target(n, config.target_modules, output)]
    generator = torch.Generator().manual_seed(seeds.lora_init(adapter.seed))  # same seed, same layer order
    initial_a = {n: lora_a_init(config.rank, model.get_submodule(n).in_features, generator) for n in targets}
    peft = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                            target_modules=targets))  # mlora's own resolution of the targets
    with torch.no_grad():
        for name in targets:
            peft.base_model.model.get_submodule(name).lora_A["default"].weight.copy_(initial_a[name])
    if config.init_from is not None:  # a warm start: the saved adapter's weights, as mlora loads them
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(peft, load_file(str(Path(config.init_from) / "adapter_model.safetensors")))
    return peft


def result_entry(name: str, matrix_rows: list[dict[str, dict[str, float]]], task_names: list[str], ready: float,
                 train_seconds: float, eval_seconds: float, train_tokens: int, **extra: object) -> dict[str, object]:
    """What a baseline process writes: its forgetting matrix, final scores and times (from process start)."""
    return {
        "name": name,
        "final": matrix_rows[-1],
        "final_mean": mean_over_tasks(matrix_rows[-1]),
        "matrix": matrix_of(matrix_rows, task_names),
        "startup_seconds": ready - PROCESS_START,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "train_tokens": train_tokens,
        **extra,
        "wall_seconds": time.perf_counter() - PROCESS_START,
    }


def main(sweep_file: str, adapter_name: str, out_file: str, data_dir: str | None = None) -> None:
    base_dir = Path(data_dir) if data_dir else Path(sweep_file).parent  # where relative data paths resolve
    spec, _ = load_resolved_sweep(Path(sweep_file), base_dir)
    adapter = next(a for a in expand(spec) if a.name == adapter_name)
    config, train = adapter.adapter, adapter.train
    if config.strategy != "naive" or config.dropout > 0:
        raise SystemExit("the baseline runs naive fine-tuning without dropout only")

    # The device a worker of `mlora run` would use for this sweep: the first GPU if there is one.
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    base = load_base(spec.base_model, device, spec.model)
    tokenizer = base.tokenizer
    tasks = [tokenize_task(load_task(t, adapter.seed, base_dir), tokenizer, train.max_seq_len)
             for t in spec.tasks]
    model = lone_peft_model(base.model, adapter)
    ready = time.perf_counter()
    with autocast(base.autocast, device):  # model.autocast, as mlora's every forward
        train_and_evaluate(spec, adapter, model, tokenizer, tasks, device, ready, out_file)


def train_and_evaluate(spec, adapter, model, tokenizer, tasks, device, ready: float, out_file: str) -> None:
    config, train = adapter.adapter, adapter.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                                  weight_decay=config.weight_decay, fused=True)
    steps = adapter.task_steps([t.steps for t in spec.tasks])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k, sum(steps), train.warmup_steps, train.schedule))
    matrix_rows, train_losses, train_seconds, eval_seconds, train_tokens = [], [], 0.0, 0.0, 0
    rl_rewards: list[float] = []  # each RL step's mean sampled reward
    start = time.perf_counter()
    matrix_rows.append(evaluate(model, tasks, tokenizer, spec.eval, adapter.seed))
    eval_seconds += time.perf_counter() - start
    model.train()
    step = 0
    for index, task in enumerate(tasks):
        sampler = BatchSampler(len(task.train), adapter.seed, index)
        rl = spec.tasks[index].objective == "grpo"
        start = time.perf_counter()
        rl_batch, old_log_probs = None, None
        for _ in range(steps[index]):
            if rl:
                if rl_batch is None:  # sample; the batch then trains train.rl.num_iterations steps
                    rows = [task.train[i] for i in sampler.next(train.batch_size)]
                    job = RLJob(adapter.name, 0, adapter.seed, step, rows, train.rl, task.reward, task.name)
                    rl_batch, old_log_probs = sampled_batch(model, tokenizer, job), None
                rl_rewards.append(rl_batch.metrics["reward_mean"])
                batch = collate(rl_batch.rows, tokenizer.pad_token_id, device)
                objective, loss, log_probs = rl_loss(model, batch, rl_batch, train.rl, old_log_probs)
                old_log_probs = log_probs if old_log_probs is None else old_log_probs  # pi_old: the first use's
                rl_batch.steps_left -= 1
                rl_batch = rl_batch if rl_batch.steps_left > 0 else None
            else:
                rows = [task.train[i] for i in sampler.next(train.batch_size)]
                batch = collate(rows, tokenizer.pad_token_id, device)
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                loss_sum, tokens, _ = token_losses(logits, batch.labels)
                objective = loss = loss_sum.sum() / tokens.sum().clamp(min=1)
            objective.backward()
            train_losses.append(loss.item())
            step += 1
            if train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            train_tokens += int(batch.tokens_per_row.sum())
        train_seconds += time.perf_counter() - start
        start = time.perf_counter()
        matrix_rows.append(evaluate(model, tasks, tokenizer, spec.eval, adapter.seed))
        eval_seconds += time.perf_counter() - start

    result = result_entry(adapter.name, matrix_rows, [t.name for t in tasks], ready, train_seconds, eval_seconds,
                          train_tokens, train_losses=train_losses, rl_rewards=rl_rewards)
    Path(out_file).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:5])
