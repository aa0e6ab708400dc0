"""Without gradients the per-adapter (CPU) LoRA term makes runs of equal-rank groups as `grouped_mm` calls: bit
for bit the group-by-group `mm`s of the autograd path, whatever the slots' order and ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlora_cli.model import per_adapter
from mlora_cli.model.multi_lora import MultiLoraLinear
from mlora_cli.model.routing import Routing

D_IN, D_OUT, MAX_RANK, SLOTS = 48, 40, 8, 6


def layer_with_slots(ranks: list[int]) -> MultiLoraLinear:
    generator = torch.Generator().manual_seed(0)
    layer = MultiLoraLinear(nn.Linear(D_IN, D_OUT), SLOTS, MAX_RANK, Routing(per_adapter=True))
    with torch.no_grad():
        for slot, rank in enumerate(ranks):
            layer.a_block(slot, rank).copy_(torch.randn(rank, D_IN, generator=generator))
            layer.b_block(slot, rank).copy_(torch.randn(D_OUT, rank, generator=generator))
            layer.scale[slot] = 16.0 / rank / (slot + 1)
    return layer


@pytest.mark.parametrize(("slots", "ranks", "rows"), [
    ([0, 1, 2, 3, 4, 5], [8] * 6, [3, 1, 4, 2, 2, 5]),             # one run, the stack's blocks as they lie
    ([5, 2, 0, 3, 2], [8] * 6, [2, 3, 1, 4, 2]),                   # out of order, a slot twice: blocks gathered
    ([0, 1, 2, 3, 4, 5], [4, 4, 8, 8, 8, 2], [2, 2, 3, 1, 2, 2]),  # runs per rank; rank 2 group by group
], ids=["in-order", "gathered", "mixed-ranks"])
@pytest.mark.parametrize("tokens", [1, 5], ids=["decode", "sequence"])
def test_grouped_runs_equal_the_group_by_group_matmuls(slots: list[int], ranks: list[int], rows: list[int],
                                                       tokens: int) -> None:
    layer = layer_with_slots(ranks)
    layer.routing.set(slots, rows, [ranks[s] for s in slots], torch.device("cpu"))
    x = torch.randn(sum(rows), tokens, D_IN, generator=torch.Generator().manual_seed(2))
    grouped = per_adapter._units(x.reshape(-1, D_IN), layer.lora_A, layer.lora_B, layer.scale, layer.routing,
                                 tokens, grouping=True)
    assert sum(unit.grouped for unit in grouped) == (1 if len(set(ranks)) == 1 else 2)
    by_group = layer(x.clone().requires_grad_(True))  # the autograd path: group by group
    with torch.no_grad():
        assert torch.equal(layer(x), by_group)
        layer.routing.runs = []
        assert torch.equal(layer(x), by_group)
