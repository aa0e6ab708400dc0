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

from mlora_cli.data import Row, collate, token_losses
from mlora_cli.model.engine import MultiLoraModel


@dataclass
class StepInput:
    """One adapter's part of a fused step."""

    slot: int
    rows: list[Row]
    lr: float
    dropout: float
    generator: torch.Generator | None


@dataclass
class StepResult:
    slot: int
    loss: float
    grad_norm: float
    tokens: int
    finite: bool


def fused_step(engine: MultiLoraModel, inputs: list[StepInput], pad_id: int) -> tuple[list[StepResult], float]:
    """Train every adapter in `inputs` one step; returns per-adapter results and seconds."""
    start = time.perf_counter()
    rows = [row for part in inputs for row in part.rows]
    batch = collate(rows, pad_id, engine.device)
    slots = [part.slot for part in inputs]
    counts = [len(part.rows) for part in inputs]
    with engine.routed(slots, counts, [p.dropout for p in inputs], [p.generator for p in inputs]):
        logits = engine.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    row_loss, row_tokens, _ = token_losses(logits, batch.labels)
    group = torch.repeat_interleave(torch.arange(len(inputs), device=row_loss.device),
                                    torch.tensor(counts, device=row_loss.device))
    loss_sum = torch.zeros(len(inputs), device=row_loss.device).index_add(0, group, row_loss)
    token_count = torch.zeros(len(inputs), device=row_loss.device).index_add(0, group, row_tokens.float())
    adapter_loss = loss_sum / token_count.clamp(min=1)
    adapter_loss.sum().backward()

    optimizer = engine.optimizer
    norms = optimizer.grad_norms()
    slot_index = torch.tensor(slots, device=norms.device)
    finite = torch.isfinite(adapter_loss.detach()) & torch.isfinite(norms[slot_index])
    active = torch.zeros(engine.num_slots, dtype=torch.bool, device=norms.device)
    active[slot_index] = finite
    lrs = torch.zeros(engine.num_slots, dtype=torch.float64)
    lrs[slot_index.cpu()] = torch.tensor([p.lr for p in inputs], dtype=torch.float64)
    optimizer.step(active, lrs, norms)
    engine.zero_grad()

    losses = adapter_loss.detach().cpu().tolist()
    grad_norms = norms[slot_index].cpu().tolist()
    tokens = [int(t) for t in torch.zeros(len(inputs), dtype=torch.long).index_add(
        0, group.cpu(), batch.tokens_per_row.cpu()).tolist()]
    flags = finite.cpu().tolist()
    results = [StepResult(s, loss, norm, tok, ok) for s, loss, norm, tok, ok in zip(slots, losses, grad_norms, tokens, flags)]
    return results, time.perf_counter() - start
