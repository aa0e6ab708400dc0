"""One fused training step for every adapter that is training right now.

The rows of all adapters are stacked into one batch (grouped contiguously by slot), the
frozen base runs once, each adapter's loss is the token mean over its own completion
tokens, and the losses are summed for one backward. Because adapters share no parameters
and the base is frozen, d(sum)/d(theta_k) = d(loss_k)/d(theta_k): every adapter gets
exactly the gradient it would get alone. Each slot then takes its own clipped AdamW step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mlora_cli.data.batches import Batch, Row, collate, predicted_token_losses
from mlora_cli.model.base import is_checkpointing
from mlora_cli.model.engine import MultiLoraModel
from mlora_cli.model.prompt_sharing import shared_rows, shares_prompts, suffix_logits
from mlora_cli.model.routing import on_device
from mlora_cli.spec.schema import RLConfig
from mlora_cli.train.grpo import adapter_loss, predicted_log_probs
from mlora_cli.train.strategies import Strategies


@dataclass
class StepInput:
    """One adapter's part of a fused step."""

    slot: int
    rows: list[Row]
    lr: float
    dropout: float
    generator: torch.Generator | None
    advantages: list[float] | None = None  # per row: the rows are sampled completions (objective: grpo)
    rl: RLConfig | None = None
    old_log_probs: list[list[float]] | None = None  # reused samples: log pi_old of each row's completion tokens
    record_log_probs: bool = False  # samples to be reused: the step fills `recorded_log_probs` (pi_old next time)
    recorded_log_probs: list[list[float]] | None = None
    # The step's (log-probs, completion mask) on the device, read into `recorded_log_probs` after the step: read
    # in the forward, they would make the GPU finish it before the backward is queued.
    recording: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class StepResult:
    slot: int
    loss: float
    grad_norm: float
    tokens: int
    finite: bool


def _adapter_losses(
    engine: MultiLoraModel, inputs: list[StepInput], pad_id: int, strategies: Strategies | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per adapter: (objective, task loss, tokens). The RL adapters whose groups share prompts run in one pass
    (each prompt once, model.prompt_sharing), every other adapter's rows in another (stacked full rows): which
    pass an adapter takes depends on itself only, never on its neighbours."""
    shared = [k for k, part in enumerate(inputs) if _shares_prompts(engine, part, strategies)]
    if len(shared) in (0, len(inputs)):
        return _pass_losses(engine, inputs, pad_id, strategies, share=bool(shared))
    full = [k for k in range(len(inputs)) if k not in shared]
    passes = [_pass_losses(engine, [inputs[k] for k in ks], pad_id, strategies, share)
              for ks, share in ((shared, True), (full, False))]
    placed = shared + full  # input index of each entry of the two passes' results, concatenated
    back = on_device(sorted(range(len(placed)), key=placed.__getitem__), engine.device)
    objective, task_loss, tokens = (torch.cat(results)[back] for results in zip(*passes))
    return objective, task_loss, tokens


def _shares_prompts(engine: MultiLoraModel, part: StepInput, strategies: Strategies | None) -> bool:
    """Whether an adapter's rows take the shared-prompt pass: RL rows whose groups share prompts, unless
    `model.share_prompts: false`, dropout (each row draws its own mask), an LwF teacher (it distils every
    position) or gradient checkpointing (no KV cache in its recompute). Supervised rows keep their full rows
    (bit-identical to PEFT)."""
    if not engine.share_prompts or part.advantages is None or part.dropout > 0 or is_checkpointing(engine.model):
        return False
    if strategies is not None and part.slot in strategies.teacher_of:
        return False
    return shares_prompts(part.rows)


def _pass_losses(engine: MultiLoraModel, inputs: list[StepInput], pad_id: int, strategies: Strategies | None,
                 share: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over the stacked rows of `inputs`, each group's prompt once when `share`; per adapter:
    (objective, task loss, tokens)."""
    slots = [part.slot for part in inputs]
    counts = [len(part.rows) for part in inputs]
    batch = None if share else collate([row for part in inputs for row in part.rows], pad_id, engine.device)
    # The KL reference pass first: its logits are gone before the student's (kept for backward) are made.
    base_log_probs = _base_log_probs(engine, inputs, batch, pad_id)
    if share:
        logits, targets = suffix_logits(engine, shared_rows([part.rows for part in inputs]), slots, pad_id)
        tokens_per_row = on_device([row.tokens for part in inputs for row in part.rows], engine.device)
    else:
        assert batch is not None
        with engine.routed(slots, counts, [p.dropout for p in inputs], [p.generator for p in inputs]):
            full_logits = engine.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits, targets, tokens_per_row = full_logits[:, :-1], batch.labels[:, 1:], batch.tokens_per_row
    # The next-token loss is an objective of supervised rows only; for RL rows it is logged. Without a supervised
    # adapter in the pass it needs no graph, which would keep a rows x length x vocab fp32 log-softmax to the end.
    supervised = any(part.advantages is None for part in inputs)
    with torch.set_grad_enabled(supervised and torch.is_grad_enabled()):
        row_loss, row_tokens, _ = predicted_token_losses(logits, targets)
    device = row_loss.device
    # Built on the host and copied without waiting (repeat_interleave with device repeats would sync to size it).
    group = on_device([g for g, count in enumerate(counts) for _ in range(count)], device)
    loss_sum = torch.zeros(len(inputs), device=device).index_add(0, group, row_loss)
    completion_tokens = torch.zeros(len(inputs), device=device).index_add(0, group, row_tokens.float())
    task_loss = loss_sum / completion_tokens.clamp(min=1)
    objective = task_loss
    if any(part.advantages is not None for part in inputs):
        objective = _with_rl_losses(inputs, counts, logits, targets, objective, base_log_probs)
    if strategies is not None and batch is not None:  # teachers take the full rows (see _shares_prompts)
        distillation = strategies.distillation(full_logits, batch.input_ids, batch.attention_mask, slots, counts)
        if distillation is not None:  # added to each adapter's own objective (zero for those without a teacher)
            objective = objective + distillation
    tokens = torch.zeros(len(inputs), dtype=torch.long, device=device).index_add(0, group, tokens_per_row)
    return objective, task_loss, tokens


def _with_rl_losses(inputs: list[StepInput], counts: list[int], logits: torch.Tensor, targets: torch.Tensor,
                    objective: torch.Tensor, base_log_probs: dict[int, torch.Tensor]) -> torch.Tensor:
    """`objective` with the GRPO-family loss in place of the next-token loss where an adapter's rows were sampled;
    logits[:, t] predicts targets[:, t]."""
    starts = [sum(counts[:k]) for k in range(len(counts))]
    losses = list(objective.unbind())
    for k, part in enumerate(inputs):
        if part.advantages is None or part.rl is None:
            continue
        span = slice(starts[k], starts[k] + counts[k])
        log_probs, mask = predicted_log_probs(logits[span], targets[span], part.rl.temperature)  # its rows only
        # Host numbers go over without waiting, and into place without a boolean index (which would sync).
        advantage = on_device(part.advantages, log_probs.device, log_probs.dtype)
        old = None
        if part.old_log_probs is not None:  # row-major over the completion tokens, as recorded
            recorded = on_device([v for row in part.old_log_probs for v in row], log_probs.device, log_probs.dtype)
            old = torch.zeros_like(log_probs).masked_scatter_(mask, recorded)
        if part.record_log_probs:
            part.recording = (log_probs.detach(), mask)
        losses[k] = adapter_loss(log_probs, mask, advantage, part.rl, base_log_probs.get(k), old)
    return torch.stack(losses)


@torch.no_grad()
def _base_log_probs(engine: MultiLoraModel, inputs: list[StepInput], batch: Batch | None,
                    pad_id: int) -> dict[int, torch.Tensor]:
    """log pi_base of the completion tokens of the rows of the adapters with `kl_beta` > 0 (each at its own
    sampling temperature), by input index: one pass of the base alone (the KL reference). `batch`: the step's
    full rows, or None when the step shares prompts (so does this pass)."""
    kl = [k for k, part in enumerate(inputs) if part.rl is not None and part.advantages is not None
          and part.rl.kl_beta > 0]
    if not kl:
        return {}
    if batch is None:
        logits, targets = suffix_logits(engine, shared_rows([inputs[k].rows for k in kl]), [], pad_id, routed=False)
    else:
        starts = [sum(len(part.rows) for part in inputs[:k]) for k in range(len(inputs))]
        rows = on_device([i for k in kl for i in range(starts[k], starts[k] + len(inputs[k].rows))], engine.device)
        with engine.routed([], []):
            full = engine.model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits
        logits, targets = full[:, :-1], batch.labels[rows][:, 1:]
    out, start = {}, 0
    for k in kl:
        size = len(inputs[k].rows)
        out[k], _ = predicted_log_probs(logits[start:start + size], targets[start:start + size],
                                        inputs[k].rl.temperature)
        start += size
    return out


def fused_step(
    engine: MultiLoraModel, inputs: list[StepInput], pad_id: int, strategies: Strategies | None = None
) -> tuple[list[StepResult], float]:
    """Train every adapter in `inputs` one step; returns per-adapter results and seconds."""
    start = time.perf_counter()
    task_loss, norms, tokens, finite = step_on_device(engine, inputs, pad_id, strategies)
    # One host transfer for everything logged (the only wait for the device in a step).
    losses, grad_norms, token_counts, flags = (task_loss.detach().cpu().tolist(), norms.cpu().tolist(),
                                               tokens.cpu().tolist(), finite.cpu().tolist())
    for part in inputs:
        if part.recording is not None:  # the step is done: reading it waits for nothing more
            log_probs, mask = (t.cpu() for t in part.recording)
            part.recorded_log_probs = [row[row_mask].tolist() for row, row_mask in zip(log_probs, mask)]
            part.recording = None
    results = [
        StepResult(part.slot, loss, norm, int(count), ok)
        for part, loss, norm, count, ok in zip(inputs, losses, grad_norms, token_counts, flags)
    ]
    return results, time.perf_counter() - start


STEP_PHASES = ("mlora: forward", "mlora: backward", "mlora: clip and AdamW")  # profiler ranges of a step


def step_on_device(
    engine: MultiLoraModel, inputs: list[StepInput], pad_id: int, strategies: Strategies | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step itself: forward, backward, clipping and AdamW, queued on the engine's device without reading
    anything back. Returns per adapter (task loss, gradient norm, tokens, finite) as device tensors."""
    with torch.profiler.record_function(STEP_PHASES[0]):
        objective, task_loss, tokens = _adapter_losses(engine, inputs, pad_id, strategies)
    with torch.profiler.record_function(STEP_PHASES[1]):
        objective.sum().backward()
        if strategies is not None:
            strategies.add_gradients()
    with torch.profiler.record_function(STEP_PHASES[2]):
        norms, finite = _clip_and_update(engine, inputs, objective)
    return task_loss, norms, tokens, finite


def _clip_and_update(engine: MultiLoraModel, inputs: list[StepInput],
                     objective: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-adapter gradient norms, clipping and AdamW for the adapters whose objective and norm are finite;
    returns (each adapter's norm, whether it was finite)."""
    optimizer = engine.optimizer
    slots = [part.slot for part in inputs]
    norms = engine.grad_norms(slots)
    slot_index = on_device(slots, norms.device)
    finite = torch.isfinite(objective.detach()) & torch.isfinite(norms[slot_index])
    active = torch.zeros(engine.num_slots, dtype=torch.bool, device=norms.device)
    active[slot_index] = finite
    lr_of = dict(zip(slots, (p.lr for p in inputs)))
    lrs = on_device([lr_of.get(slot, 0.0) for slot in range(engine.num_slots)], norms.device, torch.float64)
    optimizer.step(active, lrs, norms)
    engine.zero_grad()
    return norms[slot_index], finite


def squared_gradients(engine: MultiLoraModel, batches: list[list[StepInput]], pad_id: int) -> list[torch.Tensor]:
    """Mean over `batches` of each slot's squared gradient (the diagonal empirical Fisher).

    Each element of `batches` is one fused pass over several adapters' rows; slots are
    disjoint, so one backward gives every adapter its own gradient.
    """
    totals = [torch.zeros_like(p) for p in engine.optimizer.params]
    for inputs in batches:
        objective, _, _ = _adapter_losses(engine, inputs, pad_id, None)
        objective.sum().backward()
        for total, p in zip(totals, engine.optimizer.params):
            if p.grad is not None:
                total.add_(p.grad.detach() ** 2)
        engine.zero_grad()
    return [t / max(1, len(batches)) for t in totals]
