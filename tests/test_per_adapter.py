"""Without gradients the per-adapter (CPU) LoRA term makes runs of equal-rank groups as `bmm` calls (equal rows,
where bmm rounds as mm: `exact_batch`) or `grouped_mm` calls: bit for bit the group-by-group `mm`s of the autograd
path, whatever the slots' order, ranks and rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlora_cli.model import exact_batch, per_adapter
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
    ([0, 1, 2, 3, 4, 5], [8] * 6, [3] * 6),                        # equal rows: one batched run
    ([5, 2, 0, 3, 2], [6] * 6, [2] * 5),                           # batched, gathered, a rank grouped_mm refuses
    ([0, 1, 2, 3, 4, 5], [4, 4, 8, 8, 8, 2], [2, 2, 3, 1, 3, 2]),  # a batched run, a grouped one, a single
], ids=["in-order", "gathered", "mixed-ranks", "equal-rows", "equal-rows-gathered", "mixed-units"])
@pytest.mark.parametrize("tokens", [1, 5], ids=["decode", "sequence"])
def test_runs_equal_the_group_by_group_matmuls(slots: list[int], ranks: list[int], rows: list[int],
                                               tokens: int) -> None:
    layer = layer_with_slots(ranks)
    routed_ranks = [ranks[s] for s in slots]
    layer.routing.set(slots, rows, routed_ranks, torch.device("cpu"))
    x = torch.randn(sum(rows), tokens, D_IN, generator=torch.Generator().manual_seed(2))
    units = per_adapter._units(x.reshape(-1, D_IN), layer.lora_A, layer.lora_B, layer.routing,
                               tokens, training=False)
    runs = [(first, end) for first, end in layer.routing.runs if end - first > 1]
    assert [(unit.first, unit.end) for unit in units if not unit.single] == runs
    assert [unit.batched for unit in units if not unit.single] == [len(set(rows[f:e])) == 1 for f, e in runs]
    layer.routing.runs = []  # every group by itself: the matmuls PEFT makes
    with torch.no_grad():
        by_group = layer(x)
    layer.routing.set(slots, rows, routed_ranks, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(layer(x), by_group)
    assert torch.equal(layer(x.clone().requires_grad_(True)), by_group)  # the autograd path's runs


def test_bmm_is_used_only_where_it_rounds_as_the_groups_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bmm that rounds differently (here: one ulp off) is found by the check and not used: each group gets its mm's
    bits; one that rounds alike is used, and the check runs once per shape class."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # only the plain bmm is tried
    generator = torch.Generator().manual_seed(3)
    left, right = torch.randn(4, 6, 32, generator=generator), torch.randn(4, 8, 32, generator=generator).transpose(1, 2)
    expected = torch.stack([left[g].mm(right[g]) for g in range(4)])
    calls: list[int] = []

    def counted(a: torch.Tensor, b: torch.Tensor, ulp_off: bool = False) -> torch.Tensor:
        """A bmm that rounds as the groups' mm (whatever this machine's does), or one ulp off."""
        calls.append(1)
        result = torch.stack([a[g].clone().mm(b[g].clone()) for g in range(a.size(0))])
        return torch.nextafter(result, torch.full_like(result, float("inf"))) if ulp_off else result

    monkeypatch.setattr(exact_batch, "_EXACT", {})
    monkeypatch.setattr(exact_batch.torch, "bmm", lambda a, b, out=None: counted(a, b, ulp_off=True))
    assert exact_batch.exact_way(left, right) is None
    assert torch.equal(exact_batch.bmm_or_loop(left, right), expected)
    assert len(calls) == 1  # the check's; the product itself was the loop

    monkeypatch.setattr(exact_batch, "_EXACT", {})
    monkeypatch.setattr(exact_batch.torch, "bmm", lambda a, b, out=None: counted(a, b))
    calls.clear()
    for _ in range(3):
        assert torch.equal(exact_batch.bmm_or_loop(left, right), expected)
    assert len(calls) == 4  # one check, three products
    assert len(exact_batch._EXACT) == 1
    assert torch.equal(exact_batch.bmm_or_loop(left[:, :5], right), expected[:, :5])  # another shape: checked anew
    assert len(exact_batch._EXACT) == 2


@pytest.mark.parametrize("into", [False, True], ids=["new", "out"])
def test_a_split_of_the_inner_dimension_is_used_where_the_whole_bmm_rounds_otherwise(
        monkeypatch: pytest.MonkeyPatch, into: bool) -> None:
    """Where `mm` splits its sum between threads, a bmm over the whole inner dimension rounds otherwise (here: one
    ulp off whenever it gets all of it) but one bmm per thread's part, added, rounds as the groups' mm: the check
    finds it. The operands (the check's too) are small integers, so every order of the sums gives the same bits and
    only the fault decides."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    random_like = exact_batch._random_like
    monkeypatch.setattr(exact_batch, "_random_like", lambda tensor: random_like(tensor).mul_(2).round_())
    generator = torch.Generator().manual_seed(5)
    left = torch.randint(-4, 5, (3, 6, 32), generator=generator).float()
    right = torch.randint(-4, 5, (3, 8, 32), generator=generator).float().transpose(1, 2)
    expected = torch.stack([left[g].mm(right[g]) for g in range(3)])
    real_bmm, inner = torch.bmm, []

    def whole_is_off(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        inner.append(a.size(2))
        result = real_bmm(a, b)
        if a.size(2) == 32:
            result = torch.nextafter(result, torch.full_like(result, float("inf")))
        return result if out is None else out.copy_(result)

    monkeypatch.setattr(exact_batch, "_EXACT", {})
    monkeypatch.setattr(exact_batch.torch, "bmm", whole_is_off)
    out = torch.full_like(expected, float("nan")) if into else None
    assert exact_batch.exact_way(left, right, out) == "split"
    inner.clear()
    product = exact_batch.bmm_or_loop(left, right, out=out)
    assert torch.equal(product, expected) and inner == [16, 16]
    if into:
        assert product.data_ptr() == out.data_ptr()
    # Where no part rounds alike either, the loop.
    monkeypatch.setattr(exact_batch, "_EXACT", {})
    monkeypatch.setattr(exact_batch.torch, "bmm", lambda a, b, out=None: torch.nextafter(
        real_bmm(a, b), torch.full((1,), float("inf"))))
    assert exact_batch.exact_way(left, right) is None
    assert torch.equal(exact_batch.bmm_or_loop(left, right), expected)


def test_the_check_leaves_the_global_generator_alone() -> None:
    left, right = torch.randn(3, 7, 16)[:, 1:], torch.randn(3, 16, 5)  # a view not on the allocator's alignment
    state = torch.get_rng_state()
    exact_batch._EXACT.clear()
    exact_batch.exact_way(left, right)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_new_routing_gets_a_new_plan() -> None:
    """The plan of units is kept per routing for all its layers: setting another routing (here unequal rows after
    equal ones, as when a decode step's rows end) must not reuse it."""
    layer = layer_with_slots([8] * 6)
    for rows in ([3] * 6, [3, 1, 3, 2, 3, 3]):
        layer.routing.set(list(range(6)), rows, [8] * 6, torch.device("cpu"))
        x = torch.randn(sum(rows), 2, D_IN, generator=torch.Generator().manual_seed(4))
        by_group = layer(x.clone().requires_grad_(True))
        with torch.no_grad():
            assert torch.equal(layer(x), by_group)
        (unit,) = layer.routing.plans[(2, False, True)]
        assert unit.batched == (len(set(rows)) == 1)


@pytest.mark.parametrize(("slots", "rank"), [
    (list(range(SLOTS)), MAX_RANK),      # every slot at the stacks' rank: written entirely, not zeroed first
    (list(range(SLOTS - 1)), MAX_RANK),  # a slot not routed: its rows stay zero
    (list(range(SLOTS)), 4),             # below the stacks' rank: the rest of each row stays zero
], ids=["covering", "slot-not-routed", "padded-rank"])
def test_gradient_stacks_are_written_entirely_or_zeroed(monkeypatch: pytest.MonkeyPatch, slots: list[int],
                                                        rank: int) -> None:
    """Where the backward leaves gradient stacks unzeroed it must write every entry (they start as NaN here);
    elsewhere every entry that is not a routed slot's block is exactly zero."""
    monkeypatch.setattr(per_adapter, "unfilled", lambda like, shape: like.new_full(shape, float("nan")))
    layer = layer_with_slots([rank] * SLOTS)
    layer.routing.set(slots, [2] * len(slots), [rank] * len(slots), torch.device("cpu"))
    x = torch.randn(2 * len(slots), 3, D_IN, generator=torch.Generator().manual_seed(5), requires_grad=True)
    layer(x).square().sum().backward()
    for stack, layout in ((layer.lora_A.grad, layer.a_layout), (layer.lora_B.grad, layer.b_layout)):
        assert stack is not None and torch.isfinite(stack).all()
        outside = torch.ones_like(stack, dtype=torch.bool)
        for slot in slots:
            layout.view(outside, slot, rank).fill_(False)
        assert stack[outside].abs().sum() == 0
        assert all(layout.view(stack, slot, rank).abs().sum() > 0 for slot in slots)


def test_a_layers_views_of_its_runs_are_kept_across_routings_and_follow_its_weights() -> None:
    """A layer keeps its views of a run's blocks and scales from one routing to the next (a decode step routes anew
    every step); they must follow the weights updated in place and be made again when a stack's storage is
    replaced, giving the group-by-group numbers every time."""
    layer = layer_with_slots([8] * 6)
    x = torch.randn(12, 1, D_IN, generator=torch.Generator().manual_seed(6))

    def by_group() -> torch.Tensor:
        layer.routing.runs = []  # every group by itself: the matmuls PEFT makes
        try:
            return layer(x)
        finally:
            layer.routing.set(list(range(6)), [2] * 6, [8] * 6, torch.device("cpu"))

    with torch.no_grad():
        layer.routing.set(list(range(6)), [2] * 6, [8] * 6, torch.device("cpu"))
        assert torch.equal(layer(x), by_group())
        assert len(layer.unit_views) == 1
        layer.lora_A.mul_(2.0)  # as the optimizer updates it: in place
        layer.scale[3] = 0.5
        assert torch.equal(layer(x), by_group())
        assert len(layer.unit_views) == 1  # a new routing of the same run: the same views
        layer.lora_B.data = layer.lora_B.data * 3.0  # a new storage: the views are made anew
        assert torch.equal(layer(x), by_group())
        assert len(layer.unit_views) == 2
