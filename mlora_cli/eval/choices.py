"""Multiple choice by likelihood: `choice_accuracy`, the share of examples whose most likely choice is the reference.

A task with `choices` (or `choices_field`) gives each eval example a row per choice (`Row.choices`),
tokenized exactly as a training row whose completion is that choice: prompt ids + choice ids + eos,
the same truncation. A choice's log-likelihood is the sum over its completion tokens (eos included)
of log p(token | everything before it):

    ll(c) = sum_t log p(c_t | prompt, c_<t)            (t over the choice's tokens and eos)

The predicted choice is the argmax of ll(c) / len(c) (`eval.choice_normalization: mean`, the default)
or of ll(c) itself (`sum`); ties go to the choice listed first. Including eos makes the score of
"yes" differ from that of "yes, but": it is the probability of the whole answer ending there.
Why mean is the default: the sum adds one negative term per token, so it favours short choices when
choices differ in length (lm-evaluation-harness reports it as `acc`); its `acc_norm` divides by the
choice's length in bytes to be fair across tokenizers. All of mlora's adapters share one tokenizer, so
the per-token mean is the same correction in the unit mlora's `loss` already uses.

Each choice is a full row (prompt + choice); the prompt is not computed once and shared through a KV
cache: a row is then exactly a training row (its own truncation), every pass is one plain forward, and
for the 2-5 short choices of classification tasks the prompt is recomputed only that many times.

Every choice row of every example of every task, for all adapters together, goes through the fused
engine in shared passes of about `eval.batch_size` rows (`choice_log_likelihoods`); the base alone
(before training) in passes of its own, once per distinct eval data. The plain-PEFT baseline scores
the same rows with `row_log_likelihoods` and `task_choice_accuracy`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mlora_cli.data.batches import Row, TokenizedTask, collate, token_losses
from mlora_cli.eval.request import EvalRequest
from mlora_cli.model.engine import MultiLoraModel

# (summed log-likelihood, tokens) of one choice; keyed by (task index, example index, choice index).
Likelihood = tuple[float, int]
ChoiceKey = tuple[int, int, int]


def choice_rows(tasks: Sequence[TokenizedTask]) -> list[tuple[ChoiceKey, Row]]:
    """Every choice row of every eval example of `tasks`, shortest first (less padding per pass)."""
    rows = [((j, i, c), row) for j, task in enumerate(tasks) for i, example in enumerate(task.eval)
            for c, row in enumerate(example.choices)]
    return sorted(rows, key=lambda item: item[1].tokens)


def row_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> list[Likelihood]:
    """Per row of a collated batch: its completion's summed log-likelihood and its completion tokens."""
    losses, tokens, _ = token_losses(logits, labels)
    return [(-loss, int(n)) for loss, n in zip(losses.tolist(), tokens.tolist())]


def predicted_choice(likelihoods: Sequence[Likelihood], normalization: str) -> int:
    """The index of the most likely choice: by mean log-likelihood per token, or by the sum; the first on ties."""
    values = [ll / max(1, n) if normalization == "mean" else ll for ll, n in likelihoods]
    return max(range(len(values)), key=lambda c: (values[c], -c))


def task_choice_accuracy(task: TokenizedTask, likelihoods: dict[tuple[int, int], Likelihood],
                         normalization: str) -> float:
    """Share of the task's eval examples whose predicted choice is the reference; `likelihoods` by (example,
    choice). NaN for a task without choices (validation keeps choice_accuracy off such tasks)."""
    examples = [(i, row) for i, row in enumerate(task.eval) if row.choices]
    if not examples:
        return math.nan
    correct = 0
    for i, row in examples:
        texts = [choice.completion for choice in row.choices]
        found = [likelihoods[(i, c)] for c in range(len(texts))]
        correct += texts[predicted_choice(found, normalization)] == row.completion
    return correct / len(examples)


@torch.no_grad()
def choice_log_likelihoods(
    engine: MultiLoraModel, slots: Sequence[int] | None, task_sets: Sequence[Sequence[TokenizedTask]], batch_size: int,
    pad_id: int,
) -> list[dict[ChoiceKey, Likelihood]]:
    """Per request (slot, tasks): the log-likelihood of each choice row, in fused passes of about `batch_size` rows.

    Each pass takes the same number of rows from every request (at least one each, shortest rows first), grouped
    per request as `engine.routed` routes them; `slots` None: one request, the base alone.
    """
    orders = [choice_rows(tasks) for tasks in task_sets]
    per_pass = max(1, batch_size // max(1, len(orders)))
    found: list[dict[ChoiceKey, Likelihood]] = [{} for _ in orders]
    for start in range(0, max((len(order) for order in orders), default=0), per_pass):
        parts = [(index, order[start : start + per_pass]) for index, order in enumerate(orders)
                 if order[start : start + per_pass]]
        batch = collate([row for _, part in parts for _, row in part], pad_id, engine.device)
        routing: tuple[list[int], list[int]] = ([], [])
        if slots is not None:
            routing = ([slots[index] for index, _ in parts], [len(part) for _, part in parts])
        with engine.routed(*routing):
            logits = engine.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        values = iter(row_log_likelihoods(logits, batch.labels))
        for index, part in parts:
            for key, _ in part:
                found[index][key] = next(values)
    return found


def choice_accuracy(engine: MultiLoraModel, requests: Sequence[EvalRequest], normalization: str, batch_size: int,
                    pad_id: int) -> dict[str, dict[str, float]]:
    """choice_accuracy as {request key: {task name: value}} for `eval.evaluate`'s requests (key, slot, tasks).

    The adapters (slot set) are scored together; requests for the base alone (slot None) share one scoring per
    distinct eval data.
    """
    found: dict[str, dict[ChoiceKey, Likelihood]] = {}
    adapters = [r for r in requests if r.slot is not None]
    if adapters:
        slots = [r.slot for r in adapters if r.slot is not None]
        together = choice_log_likelihoods(engine, slots, [r.tasks for r in adapters], batch_size, pad_id)
        found.update(zip((r.key for r in adapters), together))
    shared: dict[tuple[int, ...], list[EvalRequest]] = {}
    for request in requests:
        if request.slot is None:
            shared.setdefault(tuple(id(t) for t in request.tasks), []).append(request)
    for same in shared.values():
        (base,) = choice_log_likelihoods(engine, None, [same[0].tasks], batch_size, pad_id)
        found.update({request.key: base for request in same})
    scores: dict[str, dict[str, float]] = {}
    for request in requests:
        scores[request.key] = {}
        for j, task in enumerate(request.tasks):
            by_example = {(i, c): value for (task_index, i, c), value in found[request.key].items() if task_index == j}
            scores[request.key][task.name] = task_choice_accuracy(task, by_example, normalization)
    return scores
