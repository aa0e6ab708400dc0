"""Each slot's LoRA rank: how many ranks are in use, and how many of them are frozen.

One owner, shared by the engine (which lays adapters into slots), the optimizer (which steps
only a slot's own entries, and never its frozen ranks) and the strategies (O-LoRA freezes a
finished task's ranks and grows new ones). The adapter's configured `rank` is where a slot's
rank starts; O-LoRA grows it by `rank` per task.
"""

from __future__ import annotations

import torch


class SlotRanks:
    def __init__(self, num_slots: int):
        self.in_use = [0] * num_slots  # ranks in use per slot; 0: an empty slot
        self.frozen = torch.zeros(num_slots, dtype=torch.long)  # ranks below this never change

    def clear(self, slot: int) -> None:
        self.in_use[slot] = 0
        self.frozen[slot] = 0

    def grow(self, slot: int, by: int) -> tuple[int, int]:
        """Add `by` ranks to the slot; returns the new ranks' (start, stop)."""
        start = self.in_use[slot]
        self.in_use[slot] = start + by
        return start, start + by

    def freeze_all(self, slot: int) -> None:
        """Every rank in use now stays as it is (O-LoRA, at a task's end)."""
        self.frozen[slot] = self.in_use[slot]

    def copy(self, source: int, target: int) -> None:
        self.in_use[target] = self.in_use[source]
        self.frozen[target] = self.frozen[source]
