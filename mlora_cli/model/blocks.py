"""Where one slot's LoRA matrices lie in the fused layer's stacked parameters (`model.multi_lora`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Block:
    """Where one slot's LoRA matrix lives in its row of a stacked parameter.

    The first `rank * width` entries of the row, viewed as (rank, width) when `rank_first`
    (A: (r, d_in)) or as (width, rank) (B: (d_out, r)): a contiguous tensor laid out as
    PEFT's. `of` works on any tensor shaped like the parameter (its gradient, a moment).
    """

    width: int
    rank_first: bool

    def of(self, row: torch.Tensor, rank: int) -> torch.Tensor:
        entries = row.view(-1)[: rank * self.width]
        return entries.view(rank, self.width) if self.rank_first else entries.view(self.width, rank)

    def view(self, stack: torch.Tensor, slot: int, rank: int, transposed: bool = False) -> torch.Tensor:
        """`of(stack[slot], rank)` (or its `.t()`) of a contiguous (S, ...) stack, made as one view
        (these are made per adapter, layer and step: one `as_strided` is the cheapest view)."""
        rows, columns = (rank, self.width) if self.rank_first else (self.width, rank)
        shape, strides = ((columns, rows), (1, columns)) if transposed else ((rows, columns), (columns, 1))
        return stack.as_strided(shape, strides, stack.storage_offset() + slot * stack.stride(0))

    def entries(self, stack: torch.Tensor, slot: int, rank: int) -> torch.Tensor:
        """The same block as its flat entries (1-d), one view."""
        return stack.as_strided((rank * self.width,), (1,), stack.storage_offset() + slot * stack.stride(0))
