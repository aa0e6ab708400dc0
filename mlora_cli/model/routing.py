"""Routing: which slot owns which rows of a fused batch, shared by every fused layer (`model.multi_lora`).

Set by `MultiLoraModel.routed()` before a forward and cleared after it. Its index tensors are built on the host and
copied to the device before the forward (`on_device`), so the forward never waits for them; with gradient
checkpointing it replays a layer's recompute under the routing and dropout generators of its forward.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mlora_cli.data.batches import to_device


@dataclass
class Routing:
    """Which slot owns which rows of the current batch; shared by every fused layer."""

    slots: list[int] = field(default_factory=list)  # slot of each group, in row order
    rows: list[int] = field(default_factory=list)  # rows in each group
    dropout: list[float] = field(default_factory=list)  # dropout of each group's slot
    generators: list[torch.Generator | None] = field(default_factory=list)  # per-group dropout RNG
    slot_index: torch.Tensor | None = None  # `slots` as a tensor on the model's device
    in_slot_order: bool = False  # slots == 0, 1, ..., G-1
    ranks: list[int] = field(default_factory=list)  # rank in use by each group's slot
    distinct_slots: bool = True  # no slot has two groups
    per_adapter: bool = False  # always compute the LoRA term group by group, PEFT's way (set on the CPU)
    device: torch.device = torch.device("cpu")
    _by_rank: tuple[list[tuple[int, torch.Tensor]], torch.Tensor | None] | None = None  # see `by_rank`
    # The LoRA term as two batched matmuls over all groups (multi_lora's GPU path), not a loop over them: not
    # per_adapter, and the groups equal or unequal enough to pad (`_paddable`). Set with the routing, read per layer.
    batched: bool = False
    # The batched path with groups of unequal rows: each row's place in the (groups x longest group) padded
    # layout, on the device; None when the groups are equal (no padding) or the loop computes them.
    padded_rows: torch.Tensor | None = None
    # The per-adapter (CPU) path: consecutive groups of one rank, as (first group, end group), whose matmuls
    # `torch.nn.functional.grouped_mm` makes in one call without gradients (`per_adapter.per_adapter_terms`);
    # empty on the batched path.
    runs: list[tuple[int, int]] = field(default_factory=list)
    row_slots: torch.Tensor | None = None  # the per-adapter path: each row's slot (CPU), for one scale multiply
    # With dropout: each row's 1 / (1 - p) (1 where p = 0), fp32 on the device, for half-precision inputs.
    dropout_scales: torch.Tensor | None = None
    _offsets: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)  # see `run_offsets`
    # The per-adapter path's plan of how to compute the groups, made once for every layer (`per_adapter._units`).
    plans: dict[tuple[int, bool, bool | None], Any] = field(default_factory=dict)

    def set(
        self,
        slots: list[int],
        rows: list[int],
        ranks: list[int],
        device: torch.device,
        dropout: list[float] | None = None,
        generators: list[torch.Generator | None] | None = None,
    ) -> None:
        self.slots, self.rows, self.ranks = list(slots), list(rows), list(ranks)
        self.dropout = list(dropout) if dropout is not None else [0.0] * len(slots)
        self.generators = list(generators) if generators is not None else [None] * len(slots)
        self.device, self._by_rank = torch.device(device), None
        self.slot_index = on_device(self.slots, self.device)
        self.in_slot_order = self.slots == list(range(len(self.slots)))
        self.distinct_slots = len(set(self.slots)) == len(self.slots)
        uniform = len(set(self.rows)) == 1
        padded = bool(self.rows) and not uniform and _paddable(self.rows)
        self.batched = not self.per_adapter and (uniform or padded)
        self.padded_rows, self.runs, self.row_slots, self._offsets, self.plans = None, [], None, {}, {}
        self.dropout_scales = None
        if any(p > 0 for p in self.dropout):
            self.dropout_scales = on_device([1.0 / (1.0 - p) for p, count in zip(self.dropout, self.rows)
                                             for _ in range(count)], self.device, torch.float32)
        if self.per_adapter and self.slots:
            self.runs = _equal_rank_runs(self.ranks)
            self.row_slots = torch.tensor([slot for slot, count in zip(self.slots, self.rows) for _ in range(count)])
        if not self.per_adapter and self.slots:
            self.by_rank()  # now, before the forward: built mid-forward, its copies would wait for the GPU
            if padded:
                longest = max(self.rows)
                self.padded_rows = on_device([g * longest + i for g, count in enumerate(self.rows)
                                              for i in range(count)], self.device)

    def by_rank(self) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor | None]:
        """For the batched path: [(rank, the slots of the groups with that rank)], ranks
        ascending, slots as a tensor on the device; and the permutation from that order back
        to group order (None when it is group order). Made on first use per routing."""
        if self._by_rank is None:
            order = sorted(range(len(self.slots)), key=lambda g: self.ranks[g])
            groups = [(rank, on_device([self.slots[g] for g in order if self.ranks[g] == rank], self.device))
                      for rank in sorted(set(self.ranks))]
            inverse = sorted(range(len(order)), key=lambda i: order[i])
            identity = inverse == list(range(len(inverse)))
            self._by_rank = groups, None if identity else on_device(inverse, self.device)
        return self._by_rank

    def run_offsets(self, first: int, end: int, tokens_per_row: int) -> torch.Tensor:
        """`grouped_mm`'s offsets for groups first..end-1 (each group's end in flat token rows, int32)."""
        key = (first, end, tokens_per_row)
        if key not in self._offsets:
            ends = itertools.accumulate(count * tokens_per_row for count in self.rows[first:end])
            self._offsets[key] = torch.tensor(list(ends), dtype=torch.int32)
        return self._offsets[key]

    def clear(self) -> None:
        self.set([], [], [], torch.device("cpu"))

    def checkpoint_contexts(
        self
    ) -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
        """`context_fn` for torch.utils.checkpoint: replay a layer's recompute as its forward ran.

        Gradient checkpointing recomputes a layer during backward, after `routed()` has
        cleared the routing, and the recompute would draw fresh dropout masks from the
        adapters' generators. So at forward time we keep the routing and each generator's
        state, and the recompute runs under them, then puts back what it found: the
        gradients and every later random draw are those of a run without checkpointing.
        """
        return contextlib.nullcontext(), self._replaying(self._snapshot(), self._generator_states())

    def _snapshot(self) -> tuple[Any, ...]:
        return (self.slots, self.rows, self.ranks, self.dropout, self.generators, self.slot_index, self.in_slot_order,
                self.device, self._by_rank, self.batched, self.padded_rows, self.runs, self.row_slots, self._offsets,
                self.plans, self.dropout_scales, self.distinct_slots)

    def _restore(self, snapshot: tuple[Any, ...]) -> None:
        (self.slots, self.rows, self.ranks, self.dropout, self.generators, self.slot_index,
         self.in_slot_order, self.device, self._by_rank, self.batched, self.padded_rows, self.runs, self.row_slots,
         self._offsets, self.plans, self.dropout_scales, self.distinct_slots) = snapshot

    def _generator_states(self) -> list[tuple[torch.Generator, torch.Tensor]]:
        return [(g, g.get_state()) for g, p in zip(self.generators, self.dropout) if g is not None and p > 0]

    @contextlib.contextmanager
    def _replaying(
        self, snapshot: tuple[Any, ...], states: list[tuple[torch.Generator, torch.Tensor]]
    ) -> Iterator[None]:
        routing = self._snapshot()  # in backward: usually the cleared routing
        # the forward's generators, as they are now
        now = [(generator, generator.get_state()) for generator, _ in states]
        self._restore(snapshot)
        for generator, state in states:
            generator.set_state(state)
        try:
            yield
        finally:
            self._restore(routing)
            for generator, state in now:
                generator.set_state(state)


def _equal_rank_runs(ranks: list[int]) -> list[tuple[int, int]]:
    """Maximal stretches of consecutive groups with one rank, as (first group, end group)."""
    runs: list[tuple[int, int]] = []
    for group, rank in enumerate(ranks):
        if runs and ranks[runs[-1][0]] == rank:
            runs[-1] = (runs[-1][0], group + 1)
        else:
            runs.append((group, group + 1))
    return runs


def _paddable(rows: list[int]) -> bool:
    """Unequal groups (a decode step after some rows ended, adapters with other batch or group sizes) are
    zero-padded to the longest when that at most doubles the rows; past that the loop wastes less."""
    return len(rows) * max(rows) <= 2 * sum(rows)


def on_device(values: list[int] | list[float], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A tensor of `values` on `device`; to a GPU through pinned memory without waiting for it (a copy
    from pageable memory would wait for every kernel queued before it)."""
    return to_device(torch.tensor(values, dtype=dtype), device)
