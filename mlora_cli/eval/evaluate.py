"""Batched evaluation: every requested adapter on every task in shared forward passes.

For each task, the eval rows of all adapters are stacked (one group per adapter, equal
group sizes) so N adapters cost about one batched pass, not N. Metrics per task:

- loss: mean cross-entropy over all completion tokens of the eval split;
- token_accuracy: fraction of completion tokens whose argmax is the reference token;
- exact_match: fraction of examples whose greedy generation (until eos or `max_new_tokens`)
  equals the reference completion, whitespace-trimmed;
- reward: the mean of the task's `reward` over the same greedy generations (train.rewards);
- pass_at_k: `eval.samples` completions sampled per example (`rollout.sample`, noise seeded by
  `seeds.eval_sample`), passing at full reward, turned into pass@k by Chen et al.'s unbiased
  estimator (eval.passk).
- choice_accuracy: share of examples whose most likely choice (log-likelihood of each choice as
  the completion, per token or summed) is the reference (eval.choices).

Generation starts from the loss pass itself (see `greedy_generate`): no second prefill, and
rows leave the batch as soon as they finish.

An adapter with B = 0 equals the base, so "before training" is the base model alone,
evaluated once per distinct eval data and shared (for pass_at_k, per distinct data and seed);
a worker keeps those scores for the adapters that start later (eval.base_rows).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from typing import Any, cast

import torch

from mlora_cli.data.batches import Row, TokenizedTask, collate, token_losses
from mlora_cli.errors import ConfigError
from mlora_cli.eval.choices import choice_accuracy
from mlora_cli.eval.passk import sample_seeds, task_pass_at_k
from mlora_cli.eval.request import EvalRequest
from mlora_cli.model.base import cache_argument, model_cache
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.spec.schema import EvalConfig
from mlora_cli.train.rewards import failure_line, load_reward, matches, score
from mlora_cli.train.rollout import RolloutRequest, sample

LOSS_METRICS = ("loss", "token_accuracy")
# Scored in passes of their own (sampled completions; a row per choice), not in the teacher-forced and greedy passes.
OWN_PASS_METRICS = ("pass_at_k", "choice_accuracy")


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
    forward_metrics = [m for m in config.metrics if m not in OWN_PASS_METRICS]
    task_count = len(requests[0].tasks) if requests and forward_metrics else 0
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
    if "pass_at_k" in config.metrics:
        for key, per_task in sampled_pass_at_k(engine, requests, config, tokenizer, failed).items():
            for task_name, value in per_task.items():
                scores[key].setdefault(task_name, {})["pass_at_k"] = value
    if "choice_accuracy" in config.metrics:
        chosen = choice_accuracy(engine, requests, config.choice_normalization, config.batch_size,
                                 tokenizer.pad_token_id)
        for key, per_task in chosen.items():
            for task_name, value in per_task.items():
                scores[key].setdefault(task_name, {})["choice_accuracy"] = value
    if failures is None and failed:
        raise ConfigError(sorted(set(failed.values())))
    return scores, time.perf_counter() - start


class _BaseAlone:
    """The engine with every row routed to no adapter: `rollout.sample` through it samples from the base alone.

    `sample` reads only `model`, `device`, `share_prompts` and `routed` of its engine; each request's slot is
    ignored here.
    """

    def __init__(self, engine: MultiLoraModel):
        self.engine, self.model, self.device = engine, engine.model, engine.device
        self.share_prompts = engine.share_prompts

    def routed(self, slots: Sequence[int], rows: Sequence[int]) -> Any:
        return self.engine.routed([], [])


def sampled_pass_at_k(
    engine: MultiLoraModel, requests: list[EvalRequest], config: EvalConfig, tokenizer: Any, failed: dict[str, str],
) -> dict[str, dict[str, float]]:
    """pass@k as {request key: {task name: value}}: `config.samples` completions of every eval example.

    The adapters' samples of every task are drawn together (`_sample_pass_at_k`); requests for the
    base alone in one more such pass, shared by requests with the same eval data and seed. A reward
    that fails puts the request into `failed` and its pass@k is NaN.
    """
    scores: dict[str, dict[str, float]] = {}
    adapters = [r for r in requests if r.slot is not None]
    if adapters:
        scores.update(_sample_pass_at_k(engine, adapters, config, tokenizer, failed))
    shared: dict[tuple[tuple[int, ...], int], list[EvalRequest]] = {}
    for request in requests:
        if request.slot is None:
            shared.setdefault((tuple(id(t) for t in request.tasks), request.seed), []).append(request)
    if shared:
        firsts = [same[0] for same in shared.values()]
        base = _sample_pass_at_k(cast(MultiLoraModel, _BaseAlone(engine)), firsts, config, tokenizer, failed)
        for same in shared.values():
            for request in same:
                scores[request.key] = dict(base[same[0].key])
                if same[0].key in failed:
                    failed.setdefault(request.key, failed[same[0].key])
    return scores


def _example_order(request: EvalRequest) -> list[tuple[int, int]]:
    """Every (task index, example index) of a request, shortest prompt first (less left padding per pass)."""
    items = [(j, i) for j, task in enumerate(request.tasks) for i in range(len(task.eval))]
    return sorted(items, key=lambda item: request.tasks[item[0]].eval[item[1]].prompt_len)


def _sample_pass_at_k(
    engine: MultiLoraModel, requests: list[EvalRequest], config: EvalConfig, tokenizer: Any, failed: dict[str, str],
) -> dict[str, dict[str, float]]:
    """n samples per example of every task for every request, in fused passes of about `eval.batch_size` rows.

    Each pass takes the same number of examples from every request (all tasks mixed, at least one
    each), so the adapters always sample together: one pass when all rows fit `eval.batch_size`.
    Sample s of example i of task j is drawn with the noise of `seeds.eval_sample(request seed, j,
    i, s)`: it does not depend on the pass or the neighbours.
    """
    n = config.samples
    orders = [_example_order(r) for r in requests]
    per_pass = max(1, config.batch_size // (n * len(requests)))
    texts: list[dict[tuple[int, int], list[str]]] = [{} for _ in requests]
    for start in range(0, max(len(order) for order in orders), per_pass):
        parts = [(index, order[start : start + per_pass]) for index, order in enumerate(orders)
                 if order[start : start + per_pass]]
        rollout_requests = [
            RolloutRequest(requests[index].slot or 0, [requests[index].tasks[j].eval[i] for j, i in items], n,
                           config.temperature, config.top_p, config.max_new_tokens,
                           sample_seeds(requests[index].seed, items, n))
            for index, items in parts
        ]
        rollouts = sample(engine, rollout_requests, tokenizer.pad_token_id, tokenizer.eos_token_id)
        for (index, items), rollout in zip(parts, rollouts):
            for position, item in enumerate(items):
                texts[index][item] = [completion_text(ids, tokenizer)
                                      for ids in rollout.completion_ids[position * n : (position + 1) * n]]
    scores: dict[str, dict[str, float]] = {}
    for request, completions in zip(requests, texts):
        scores[request.key] = {}
        for j, task in enumerate(request.tasks):
            rows = task.eval
            try:
                value = task_pass_at_k(task.reward, task.name, [r.prompt for r in rows for _ in range(n)],
                                       [t for i in range(len(rows)) for t in completions[(j, i)]],
                                       [r.completion for r in rows for _ in range(n)], n, config.pass_k)
            except ConfigError:  # a reward that cannot be imported: the user's setup, as in the greedy path
                raise
            except Exception as exc:  # the user's reward: its failure is this request's (adapter's) alone
                failed.setdefault(request.key, failure_line(task.reward, task.name, exc))
                value = math.nan
            scores[request.key][task.name] = value
    return scores
