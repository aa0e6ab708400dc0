"""The single-tenant baseline: one adapter of a sweep, trained the usual way with plain PEFT.

    python -m mlora_cli.bench.baseline RESOLVED_SWEEP.yaml ADAPTER_NAME OUT.json [DATA_DIR]

This is what `mlora bench --sequential-baseline` runs, as a fresh process per adapter, one
after another: import, load the base, `get_peft_model`, `torch.optim.AdamW(fused=True)` (the fast one) with a LambdaLR
schedule and `clip_grad_norm_`, then the same evaluation as mlora (loss and token accuracy
from one forward per eval batch; exact match from batched greedy `generate` with a KV cache).
It sees exactly mlora's data: the same tasks, tokenization, batches (same per-adapter sampler
and seed), padding to the longest row of each batch, and the same initial LoRA weights; torch
keeps its default thread count. Only naive fine-tuning is supported here.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mlora_cli import PROCESS_START  # the process is timed from its first line, imports included

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from mlora_cli import seeds  # noqa: E402
from mlora_cli.contract import load_resolved_sweep, matrix_of, mean_over_tasks  # noqa: E402
from mlora_cli.spec.load import parse_spec  # noqa: E402
from mlora_cli.data.batches import BatchSampler, collate, collate_prompts, token_losses, tokenize_task  # noqa: E402
from mlora_cli.eval.evaluate import completion_text, task_scores  # noqa: E402
from mlora_cli.train.rewards import load_reward, matches, score  # noqa: E402
from mlora_cli.model.base import load_base  # noqa: E402
from mlora_cli.model.engine import linear_layer_names, lora_a_init, matches_target, output_layer_name  # noqa: E402
from mlora_cli.model.optim import lr_factor  # noqa: E402
from mlora_cli.spec.sweep import expand  # noqa: E402
from mlora_cli.data.sources import load_task  # noqa: E402


@torch.no_grad()
def evaluate(model, tasks, tokenizer, eval_config) -> dict[str, dict[str, float]]:
    model.eval()
    scores = {}
    for task in tasks:
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
    model.train()
    return scores


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
    # The same initial A as mlora gives this adapter (same seed, same layer order).
    targets = [n for n in linear_layer_names(base.model) if matches_target(n, config.target_modules, output_layer_name(base.model))]
    generator = torch.Generator().manual_seed(seeds.lora_init(adapter.seed))
    initial_a = {n: lora_a_init(config.rank, base.model.get_submodule(n).in_features, generator) for n in targets}
    model = get_peft_model(base.model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                                 target_modules=list(config.target_modules)))
    with torch.no_grad():
        for name in targets:
            model.base_model.model.get_submodule(name).lora_A["default"].weight.copy_(initial_a[name])
    ready = time.perf_counter()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                                  weight_decay=config.weight_decay, fused=True)
    steps = adapter.task_steps([t.steps for t in spec.tasks])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k, sum(steps), train.warmup_steps, train.schedule))
    matrix_rows, train_losses, train_seconds, eval_seconds, train_tokens = [], [], 0.0, 0.0, 0
    start = time.perf_counter()
    matrix_rows.append(evaluate(model, tasks, tokenizer, spec.eval))
    eval_seconds += time.perf_counter() - start
    model.train()
    for index, task in enumerate(tasks):
        sampler = BatchSampler(len(task.train), adapter.seed, index)
        start = time.perf_counter()
        for _ in range(steps[index]):
            batch = collate([task.train[i] for i in sampler.next(train.batch_size)], tokenizer.pad_token_id, device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss_sum, tokens, _ = token_losses(logits, batch.labels)
            loss = loss_sum.sum() / tokens.sum().clamp(min=1)
            loss.backward()
            train_losses.append(loss.item())
            if train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            train_tokens += int(batch.tokens_per_row.sum())
        train_seconds += time.perf_counter() - start
        start = time.perf_counter()
        matrix_rows.append(evaluate(model, tasks, tokenizer, spec.eval))
        eval_seconds += time.perf_counter() - start

    final = matrix_rows[-1]
    result = {
        "name": adapter.name,
        "final": final,
        "final_mean": mean_over_tasks(final),
        "matrix": matrix_of(matrix_rows, [t.name for t in tasks]),
        "startup_seconds": ready - PROCESS_START,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "train_tokens": train_tokens,
        "train_losses": train_losses,
        "wall_seconds": time.perf_counter() - PROCESS_START,
    }
    Path(out_file).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:5])
