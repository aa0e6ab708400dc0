"""Each slot's gradient norm as `clip_grad_norm_` computes it on the adapter alone: the norm of its tensors' norms.

The CPU's per-slot optimizer (`model.optim`) clips each slot by it, so it must be bit-identical to
`clip_grad_norm_` on the adapter's own tensors (its blocks of the stacked gradients, see `Block`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mlora_cli.model.blocks import Block
from mlora_cli.model.exact_batch import row_norms_are_exact

Blocks = dict[int, tuple[list[int], list[torch.Tensor]]]  # slot -> (its parameters, its gradient blocks)


def slot_norms(grads: Sequence[torch.Tensor | None], blocks: Blocks, ranks: Sequence[int],
               layouts: Sequence[Block]) -> dict[int, torch.Tensor]:
    """{slot: its gradient norm} for the slots of `blocks` (`ranks`: each slot's rank in use)."""
    return by_parameter(grads, blocks, ranks, layouts) or by_block(blocks)


def by_block(blocks: Blocks) -> dict[int, torch.Tensor]:
    """From the blocks' norms. Each tensor's norm is its own reduction, so one `_foreach_norm` for every slot's
    blocks gives each the numbers of a call for its slot alone."""
    every_view = [view for _, views in blocks.values() for view in views]
    tensor_norms = torch._foreach_norm(every_view, 2.0) if every_view else []
    norms, start = {}, 0
    for slot, (_, views) in blocks.items():
        if views:
            norms[slot] = torch.linalg.vector_norm(torch.stack(tensor_norms[start : start + len(views)]), 2.0)
        start += len(views)
    return norms


def by_parameter(grads: Sequence[torch.Tensor | None], blocks: Blocks, ranks: Sequence[int],
                 layouts: Sequence[Block]) -> dict[int, torch.Tensor] | None:
    """The same norms with one row reduction per stacked gradient over every slot's block, where the slots share
    their rank and parameters and the reduction gives each row the bits of the block's own norm
    (`exact_batch.row_norms_are_exact`); None where not (then `by_block`)."""
    slots = list(blocks)
    if len(slots) < 2:
        return None
    rank, indices = ranks[slots[0]], blocks[slots[0]][0]
    if not indices or any(ranks[s] != rank or blocks[s][0] != indices for s in slots):
        return None
    chosen = None if slots == list(range(len(ranks))) else torch.tensor(slots)  # the slots in use, if not all
    per_parameter = []
    for i in indices:
        grad = grads[i]
        assert grad is not None  # indices hold only parameters with a gradient
        rows = grad.view(grad.size(0), -1)[:, : rank * layouts[i].width]
        if chosen is not None:
            rows = rows.index_select(0, chosen)
        if not row_norms_are_exact(rows):
            return None
        per_parameter.append(torch.linalg.vector_norm(rows, 2.0, dim=1))
    by_slot = torch.stack(per_parameter, dim=1)  # row g: slot g's per-tensor norms
    # Each row as its own tensor, as clip_grad_norm_'s stack of the norms is (a few dozen entries a slot).
    return {slot: torch.linalg.vector_norm(by_slot[g].clone(), 2.0) for g, slot in enumerate(slots)}
