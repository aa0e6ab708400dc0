"""Batched evaluation: every requested adapter on every task in shared forward passes.

For each task, the eval rows of all adapters are stacked (one group per adapter, equal
group sizes) so N adapters cost about one batched pass, not N. Metrics per task:

- loss: mean cross-entropy over all completion tokens of the eval split;
- token_accuracy: fraction of completion tokens whose argmax is the reference token;
- exact_match: fraction of examples whose greedy generation (KV cache, until eos or
  `max_new_tokens`) equals the reference completion, whitespace-trimmed.

An adapter with B = 0 equals the base, so "before training" is the base model alone,
evaluated once per distinct eval data and shared.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlora_cli.config import EvalConfig
from mlora_cli.data import Row, TokenizedTask, collate, collate_prompts, token_losses
from mlora_cli.model.engine import MultiLoraModel

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
    engine: MultiLoraModel, slots: list[int] | None, groups: list[list[Row]], config: EvalConfig, tokenizer: Any
) -> list[dict[str, float]]:
    sums = [{"loss": 0.0, "tokens": 0.0, "correct": 0.0, "exact": 0.0} for _ in groups]
    want_loss = any(m in config.metrics for m in LOSS_METRICS)
    for chunk in _chunks(groups, config.batch_size):
        rows = [row for part in chunk for row in part]
        counts = [len(part) for part in chunk]
        group_of_row = [g for g, n in enumerate(counts) for _ in range(n)]
        routing = engine.routed(slots, counts) if slots is not None else engine.routed([], [])
        with routing:
            if want_loss:
                batch = collate(rows, tokenizer.pad_token_id, engine.device)
                logits = engine.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                loss, tokens, correct = (t.cpu().tolist() for t in token_losses(logits, batch.labels))
                for g, row_loss, row_tokens, row_correct in zip(group_of_row, loss, tokens, correct):
                    sums[g]["loss"] += row_loss
                    sums[g]["tokens"] += row_tokens
                    sums[g]["correct"] += row_correct
            if "exact_match" in config.metrics:
                for g, hit in zip(group_of_row, _exact_matches(engine, rows, config.max_new_tokens, tokenizer)):
                    sums[g]["exact"] += hit
    results = []
    for group, total in zip(groups, sums):
        scores: dict[str, float] = {}
        if "loss" in config.metrics:
            scores["loss"] = total["loss"] / max(1.0, total["tokens"])
        if "token_accuracy" in config.metrics:
            scores["token_accuracy"] = total["correct"] / max(1.0, total["tokens"])
        if "exact_match" in config.metrics:
            scores["exact_match"] = total["exact"] / max(1, len(group))
        results.append(scores)
    return results


def _exact_matches(engine: MultiLoraModel, rows: list[Row], max_new_tokens: int, tokenizer: Any) -> list[bool]:
    input_ids, attention_mask = collate_prompts(rows, tokenizer.pad_token_id, engine.device)
    output = engine.model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    hits = []
    for row, generated in zip(rows, output[:, input_ids.size(1) :].tolist()):
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id)]
        text = tokenizer.decode(generated, skip_special_tokens=True)
        hits.append(text.strip() == row.completion.strip())
    return hits


def evaluate(
    engine: MultiLoraModel, requests: list[EvalRequest], config: EvalConfig, tokenizer: Any
) -> tuple[dict[str, dict[str, dict[str, float]]], float]:
    """Scores as {request key: {task name: {metric: value}}}, and the seconds it took."""
    start = time.perf_counter()
    scores: dict[str, dict[str, dict[str, float]]] = {r.key: {} for r in requests}
    base_requests = [r for r in requests if r.slot is None]
    adapter_requests = [r for r in requests if r.slot is not None]
    task_count = len(requests[0].tasks) if requests else 0
    for j in range(task_count):
        if adapter_requests:
            groups = [sorted(r.tasks[j].eval, key=lambda row: row.tokens) for r in adapter_requests]
            slots = [r.slot for r in adapter_requests]
            for request, result in zip(adapter_requests, _score_task(engine, slots, groups, config, tokenizer)):  # type: ignore[arg-type]
                scores[request.key][request.tasks[j].name] = result
        # Requests for the base alone share one pass per distinct eval set.
        distinct: dict[int, list[EvalRequest]] = {}
        for request in base_requests:
            distinct.setdefault(id(request.tasks[j]), []).append(request)
        for same in distinct.values():
            rows = sorted(same[0].tasks[j].eval, key=lambda row: row.tokens)
            (result,) = _score_task(engine, None, [rows], config, tokenizer)
            for request in same:
                scores[request.key][request.tasks[j].name] = dict(result)
    return scores, time.perf_counter() - start
