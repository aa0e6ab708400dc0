"""Batched evaluation: every requested adapter on every task in shared forward passes.

For each task, the eval rows of all adapters are stacked (one group per adapter, equal
group sizes) so N adapters cost about one batched pass, not N. Metrics per task:

- loss: mean cross-entropy over all completion tokens of the eval split;
- token_accuracy: fraction of completion tokens whose argmax is the reference token;
- exact_match: fraction of examples whose greedy generation (until eos or `max_new_tokens`)
  equals the reference completion, whitespace-trimmed;
- reward: the mean of the task's `reward` over the same greedy generations (train.rewards).

Generation starts from the loss pass itself (see `greedy_generate`): no second prefill, and
rows leave the batch as soon as they finish.

An adapter with B = 0 equals the base, so "before training" is the base model alone,
evaluated once per distinct eval data and shared.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlora_cli.data.batches import Row, TokenizedTask, collate, token_losses
from mlora_cli.errors import ConfigError
from mlora_cli.model.base import cache_argument, model_cache
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.spec.schema import EvalConfig
from mlora_cli.train.rewards import failure_line, load_reward, matches, score

LOSS_METRICS = ("loss", "token_accuracy")


@dataclass
class EvalRequest:
    key: str  # the adapter (or any label) the scores belong to
    slot: int | None  # None: the base alone
    tasks: Sequence[TokenizedTask]


def _chunks(groups: list[list[Row]], batch_rows: int) -> list[list[list[Row]]]:
    """Split equal-sized groups into chunks of the same number of rows per group."""
    per_group = max(1, batch_rows // max(1, len(groups)))
    size = max(len(g) for g in groups)
    return [[g[i : i + per_group] for g in groups] for i in range(0, size, per_group)]


@torch.no_grad()
def _score_task(
    engine: MultiLoraModel, slots: list[int] | None, groups: list[list[Row]], config: EvalConfig, tokenizer: Any,
    task: TokenizedTask,
) -> list[tuple[dict[str, float], str | None]]:
    """Per group: its scores on `task`, and why its reward failed (None when it did not)."""
    sums = [{"loss": 0.0, "tokens": 0.0, "correct": 0.0, "exact": 0.0} for _ in groups]
    texts: list[tuple[list[str], list[str], list[str]]] = [([], [], []) for _ in groups]  # prompts, completions, refs
    want_loss = any(m in config.metrics for m in LOSS_METRICS)
    want_reward = "reward" in config.metrics
    want_generation = "exact_match" in config.metrics or want_reward
    for chunk in _chunks(groups, config.batch_size):
        rows = [row for part in chunk for row in part]
        counts = [len(part) for part in chunk]
        group_of_row = [g for g, n in enumerate(counts) for _ in range(n)]
        batch = collate(rows, tokenizer.pad_token_id, engine.device)
        with engine.routed(slots or [], counts if slots else []):
            output = engine.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  use_cache=want_generation)
        if want_loss:
            loss, tokens, correct = (t.cpu().tolist() for t in token_losses(output.logits, batch.labels))
            for g, row_loss, row_tokens, row_correct in zip(group_of_row, loss, tokens, correct):
                sums[g]["loss"] += row_loss
                sums[g]["tokens"] += row_tokens
                sums[g]["correct"] += row_correct
        if want_generation:
            predicted, cache = output.logits.argmax(-1).cpu(), model_cache(output)
            del output  # the logits (rows x length x vocab) are not needed while decoding
            generated = greedy_generate(engine, rows, slots, group_of_row, batch.attention_mask, predicted, cache,
                                        config.max_new_tokens, tokenizer.eos_token_id)
            for g, row, tokens_out in zip(group_of_row, rows, generated):
                completion = completion_text(tokens_out, tokenizer)
                sums[g]["exact"] += matches(completion, row.completion)
                for values, value in zip(texts[g], (row.prompt, completion, row.completion)):
                    values.append(value)
    reward = load_reward(task.reward) if want_reward else None
    results = []
    for group, total, (prompts, completions, references) in zip(groups, sums, texts):
        mean_reward, failure = None, None
        if reward is not None:
            try:
                values = score(reward, prompts, completions, references, task.name)
                mean_reward = sum(values) / max(1, len(values))
            except Exception as exc:  # the user's reward: its failure is this group's (adapter's) alone
                failure = failure_line(task.reward, task.name, exc)
        scores = task_scores(total["loss"], total["tokens"], total["correct"], total["exact"], len(group),
                             config.metrics, mean_reward)
        results.append((scores, failure))
    return results


def task_scores(loss: float, tokens: float, correct: float, exact: float, rows: int,
                metrics: Sequence[str], reward: float | None = None) -> dict[str, float]:
    """One task's scores from its sums over the eval split (the one scorer; the baseline uses it too).

    loss: mean cross-entropy per completion token; token_accuracy: share of completion tokens
    whose argmax is the reference; exact_match: share of rows whose generation matched;
    reward: the mean reward of the generations (NaN when the reward failed).
    """
    scores: dict[str, float] = {}
    if "loss" in metrics:
        scores["loss"] = loss / max(1.0, tokens)
    if "token_accuracy" in metrics:
        scores["token_accuracy"] = correct / max(1.0, tokens)
    if "exact_match" in metrics:
        scores["exact_match"] = exact / max(1, rows)
    if "reward" in metrics:
        scores["reward"] = math.nan if reward is None else reward
    return scores


def completion_text(generated: list[int], tokenizer: Any) -> str:
    """Generated ids up to the first end-of-sequence, decoded."""
    if tokenizer.eos_token_id in generated:
        generated = generated[: generated.index(tokenizer.eos_token_id)]
    return str(tokenizer.decode(generated, skip_special_tokens=True))


def greedy_generate(
    engine: MultiLoraModel,
    rows: list[Row],
    slots: list[int] | None,
    group_of_row: list[int],
    attention_mask: torch.Tensor,
    predicted: torch.Tensor,
    cache: Any,
    max_new_tokens: int,
    eos_id: int,
) -> list[list[int]]:
    """Greedy generation for every row, continuing from the teacher-forced pass over prompt + reference.

    Greedy decoding is causal, so while its tokens equal the reference completion's, the
    teacher-forced pass has already computed them: the argmax after prompt + reference[:j]
    is generated token j. Each row's generation is read off that pass up to its first
    mismatch (one token past it), and only the rows still unfinished there are decoded
    further, one token per step, from that pass's KV cache cut to prompt + the matched
    reference (the rest masked out, positions given explicitly). Finished rows (eos or
    `max_new_tokens`) leave the batch at once instead of padding it to the slowest row.
    The result is the same token sequence `generate(do_sample=False)` gives.

    `predicted` is the pass's argmax per position (rows x length, on the CPU), `cache` its
    KV cache (see `model_cache`), `attention_mask` the pass's (right-padded) mask.
    """
    generated: list[list[int]] = []
    resume: list[int] = []  # per row: cache positions that stay valid (prompt + matched reference)
    for i, row in enumerate(rows):
        reference = row.ids[row.prompt_len :]
        tokens = [int(predicted[i, row.prompt_len - 1])]
        while (tokens[-1] != eos_id and len(tokens) < max_new_tokens and len(tokens) <= len(reference)
               and tokens[-1] == reference[len(tokens) - 1]):
            tokens.append(int(predicted[i, row.prompt_len - 1 + len(tokens)]))
        generated.append(tokens)
        resume.append(row.prompt_len + len(tokens) - 1)
    active = [i for i, tokens in enumerate(generated) if tokens[-1] != eos_id and len(tokens) < max_new_tokens]
    if not active:
        return generated
    cache_arg = cache_argument(engine.model)
    length = attention_mask.size(1)
    index = torch.tensor(active, device=attention_mask.device)
    cache.batch_select_indices(index)
    positions = torch.tensor([resume[i] for i in active], device=attention_mask.device)
    mask = (torch.arange(length, device=attention_mask.device).unsqueeze(0) < positions.unsqueeze(1)).long()
    while active:
        next_input = torch.tensor([[generated[i][-1]] for i in active], device=attention_mask.device)
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        active_slots, counts = _runs([group_of_row[i] for i in active], slots)
        with engine.routed(active_slots, counts):
            step = engine.model(input_ids=next_input, attention_mask=mask, position_ids=positions.unsqueeze(1),
                                use_cache=True, **{cache_arg: cache})
        for i, token in zip(active, step.logits[:, -1].argmax(-1).tolist()):
            generated[i].append(token)
        keep = [k for k, i in enumerate(active) if generated[i][-1] != eos_id and len(generated[i]) < max_new_tokens]
        if len(keep) < len(active):
            kept = torch.tensor(keep, device=attention_mask.device, dtype=torch.long)
            cache.batch_select_indices(kept)
            mask, positions = mask[kept], positions[kept]
            active = [active[k] for k in keep]
        positions = positions + 1
    return generated


def _runs(groups: list[int], slots: list[int] | None) -> tuple[list[int], list[int]]:
    """Rows' groups (consecutive) -> (slot of each run, rows in it); no routing for the base alone."""
    if slots is None:
        return [], []
    runs = [(group, len(list(members))) for group, members in itertools.groupby(groups)]
    return [slots[group] for group, _ in runs], [count for _, count in runs]


def evaluate(
    engine: MultiLoraModel, requests: list[EvalRequest], config: EvalConfig, tokenizer: Any,
    failures: dict[str, str] | None = None,
) -> tuple[dict[str, dict[str, dict[str, float]]], float]:
    """Scores as {request key: {task name: {metric: value}}}, and the seconds it took.

    A reward that fails on a request's generations goes into `failures` (request key -> why),
    leaving the other requests' scores as they are; without `failures` it is a ConfigError.
    """
    failed: dict[str, str] = {} if failures is None else failures
    start = time.perf_counter()
    scores: dict[str, dict[str, dict[str, float]]] = {r.key: {} for r in requests}
    base_requests = [r for r in requests if r.slot is None]
    adapter_requests = [r for r in requests if r.slot is not None]
    task_count = len(requests[0].tasks) if requests else 0
    for j in range(task_count):
        if adapter_requests:
            groups = [sorted(r.tasks[j].eval, key=lambda row: row.tokens) for r in adapter_requests]
            slots = [r.slot for r in adapter_requests]
            results = _score_task(engine, slots, groups, config, tokenizer, adapter_requests[0].tasks[j])  # type: ignore[arg-type]
            for request, (result, failure) in zip(adapter_requests, results):
                scores[request.key][request.tasks[j].name] = result
                if failure:
                    failed.setdefault(request.key, failure)
        # Requests for the base alone share one pass per distinct eval set.
        distinct: dict[int, list[EvalRequest]] = {}
        for request in base_requests:
            distinct.setdefault(id(request.tasks[j]), []).append(request)
        for same in distinct.values():
            rows = sorted(same[0].tasks[j].eval, key=lambda row: row.tokens)
            ((result, failure),) = _score_task(engine, None, [rows], config, tokenizer, same[0].tasks[j])
            for request in same:
                scores[request.key][request.tasks[j].name] = dict(result)
                if failure:
                    failed.setdefault(request.key, failure)
    if failures is None and failed:
        raise ConfigError(sorted(set(failed.values())))
    return scores, time.perf_counter() - start
