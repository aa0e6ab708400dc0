"""The LoRA term group by group, PEFT's way: the CPU path of the fused layer (`model.multi_lora`).

Each group g of a routing (slot k, rows x_g) gets `linear(linear(x_g, A_k), B_k) * s_k` with the
very matmuls PEFT makes (forward, and autograd's in backward), on its slot's blocks laid out as
PEFT's tensors, so an adapter's output and gradients are bit-identical to training it alone with
PEFT. On a CPU each of those matmuls is tiny and most of its cost is the call, so they are made
in as few calls as keeps those numbers:

- all groups are one autograd node (`PerAdapterLora`) whose backward makes autograd's own matmuls;
- a run of consecutive groups of one rank and equal rows (`Routing.runs`; every decode step, and the
  training step of adapters of one batch and group size) makes each matmul, forward and backward, as
  one `bmm` over the groups (or one per part of the inner dimension, as `mm` splits it between threads) where
  that rounds as the groups' own `mm`s, checked once per shape class (`exact_batch`); where none does, the loop;
- without gradients (sampling, evaluation) a run of unequal rows makes them as one `grouped_mm` call,
  which torch computes on the CPU as a loop of the same `mm`s, and no autograd node is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mlora_cli.model.blocks import Block
from mlora_cli.model.exact_batch import bmm_or_loop, exact_bmm
from mlora_cli.model.routing import Routing

# Profiler range (only entered while torch.profiler records): the per-adapter backward.
LORA_BACKWARD = "mlora: LoRA term backward"


@dataclass(frozen=True)
class Unit:
    """Groups first..end-1 of a routing, computed together: one group with two `mm`s; a run of groups of one rank
    and equal rows (`batched`) with two `bmm`s where they round as the groups' `mm`s (`exact_batch`), else their
    loop; or (without gradients) a run of one rank with two `grouped_mm`s. `offsets`: each group's end in flat
    rows, where `grouped_mm` applies; `rows`: the run's rows of the batch. Everything a layer reads of it is worked
    out once, when the unit is made (a decode step's layer costs tens of microseconds: recomputing these per
    layer was a third of it)."""

    first: int
    end: int
    start: int  # the unit's rows of the flattened batch (rows x tokens): start..stop-1
    stop: int
    slots: list[int]
    rank: int
    consecutive: bool  # the slots are k, k+1, ...: their rows of a stack are one strided view, no gather
    key: tuple[int, ...]  # the slots, and the rank last: what a layer's views of the unit depend on (`_unit_views`)
    offsets: torch.Tensor | None = None
    rows: slice | None = None
    batched: bool = False

    @property
    def single(self) -> bool:
        return self.end - self.first == 1


def _unit(routing: Routing, first: int, end: int, tokens_per_row: int, **kind: Any) -> Unit:
    """Groups first..end-1 of `routing` as a unit (`kind`: Unit's offsets, rows, batched)."""
    start = sum(routing.rows[:first]) * tokens_per_row
    stop = start + sum(routing.rows[first:end]) * tokens_per_row
    slots = routing.slots[first:end]
    rank = routing.ranks[first]
    return Unit(first, end, start, stop, slots, rank, _consecutive(slots), (*slots, rank), **kind)


def _units(x_flat: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, routing: Routing,
           tokens_per_row: int, training: bool) -> list[Unit]:
    """How to compute the groups (fp32 without autocast; else one at a time): runs of equal rank (`Routing.runs`)
    together, as `bmm`s when the run's groups have equal rows, else (without gradients) as `grouped_mm`s where
    torch's checks allow it (16-byte aligned rows and blocks, rank a multiple of 4); the rest one group at a time.
    With gradients only where every slot has one group (its gradient blocks are then written, not summed).
    Made once per routing for all its layers (`Routing.plans`)."""
    float32 = torch.float32
    if (not routing.runs or x_flat.device.type != "cpu" or not x_flat.is_contiguous()
            or x_flat.dtype != float32 or lora_a.dtype != float32 or lora_b.dtype != float32
            or torch.is_autocast_enabled("cpu") or (training and not routing.distinct_slots)):
        key: tuple[int, bool, bool | None] = (tokens_per_row, training, None)
        if key not in routing.plans:  # (the same every call: made once per routing too)
            routing.plans[key] = [_unit(routing, g, g + 1, tokens_per_row) for g in range(len(routing.slots))]
        return routing.plans[key]
    aligned = not training and not (x_flat.data_ptr() % 16 or x_flat.stride(0) % 4 or lora_a.data_ptr() % 16
                                    or lora_a.stride(0) % 4 or lora_b.data_ptr() % 16 or lora_b.stride(0) % 4)
    key = (tokens_per_row, training, aligned)
    if key not in routing.plans:
        routing.plans[key] = _plan(routing, tokens_per_row, training, aligned)
    return routing.plans[key]


def _plan(routing: Routing, tokens_per_row: int, training: bool, aligned: bool) -> list[Unit]:
    units: list[Unit] = []
    for first, end in routing.runs:
        # With gradients, a group of one token row and rank 1 would make autograd take its column-major matmul
        # (see `_linear_grads`): those keep the loop, which makes it.
        equal_rows = len(set(routing.rows[first:end])) == 1 and not (
            training and routing.rows[first] * tokens_per_row == 1 and routing.ranks[first] == 1)
        groupable = aligned and routing.ranks[first] % 4 == 0
        if end - first < 2 or not (equal_rows or groupable):
            units += [_unit(routing, group, group + 1, tokens_per_row) for group in range(first, end)]
            continue
        rows = slice(sum(routing.rows[:first]), sum(routing.rows[:end]))
        offsets = routing.run_offsets(first, end, tokens_per_row) if groupable else None
        units.append(_unit(routing, first, end, tokens_per_row, offsets=offsets, rows=rows, batched=equal_rows))
    return units


def _run_scales(scale: torch.Tensor, routing: Routing, unit: Unit) -> torch.Tensor:
    """s_k of a run, to multiply its product viewed as (groups, rows x tokens, d_out) if batched (a view of `scale`
    for consecutive slots), else as (rows, tokens, d_out): the same float32 products as one multiply per group."""
    if not unit.batched:
        assert routing.row_slots is not None and unit.rows is not None  # set with a per-adapter routing's runs
        return scale.index_select(0, routing.row_slots[unit.rows]).view(-1, 1, 1)
    if unit.consecutive:
        return scale[unit.slots[0] : unit.slots[0] + len(unit.slots)].view(-1, 1, 1)
    assert routing.slot_index is not None
    return scale.index_select(0, routing.slot_index[unit.first : unit.end]).view(-1, 1, 1)


def _run_matmul(left: torch.Tensor, blocks: torch.Tensor, unit: Unit) -> torch.Tensor:
    """Each group's rows of `left` times its block of `blocks` (G, k, n), with each group's numbers those of its own
    `mm`: batched (`exact_batch`) where that rounds as they do, as (G, rows of a group, n); else one `grouped_mm`,
    or the loop, as (rows, n). `left` is (rows, k), or (G, rows of a group, k) as a batched product comes (kept so:
    a view costs ~3 us, a tenth of a decode step's LoRA matmul)."""
    if unit.batched:
        batch = left if left.dim() == 3 else left.view(unit.end - unit.first, -1, left.size(1))
        product = exact_bmm(batch, blocks)
        if product is None and unit.offsets is None:
            product = bmm_or_loop(batch, blocks, loop=True)
        if product is not None:
            return product
    return nn.functional.grouped_mm(left.view(-1, left.size(-1)), blocks, offs=unit.offsets)


def _consecutive(slots: list[int]) -> bool:
    """Whether `slots` are k, k+1, ...: their rows of a stack are then one strided view, no gather."""
    return slots == list(range(slots[0], slots[0] + len(slots)))


def _run_blocks(stack: torch.Tensor, layout: Block, unit: Unit) -> torch.Tensor:
    """(G, rows, columns): the unit's slots' blocks (see Block) transposed as `Block.view(transposed=True)` makes
    them, for `grouped_mm`; a view of the stack when the slots are consecutive, else gathered (a copy, same
    values)."""
    slots, rank = unit.slots, unit.rank
    rows, columns = (rank, layout.width) if layout.rank_first else (layout.width, rank)
    if unit.consecutive:
        return stack.as_strided((len(slots), columns, rows), (stack.stride(0), 1, columns),
                                stack.storage_offset() + slots[0] * stack.stride(0))
    flat = stack.reshape(stack.size(0), -1)[:, : rows * columns]
    return flat[slots].view(len(slots), rows, columns).transpose(1, 2)


UnitViews = dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
_MAX_UNIT_VIEWS = 256  # per layer: past it the views are made again (routings with ever new slot sets)


def _unit_views(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor, layouts: tuple[Block, Block],
                routing: Routing, unit: Unit, views: UnitViews | None) -> tuple[torch.Tensor, ...]:
    """A run's A^T and B^T blocks (`_run_blocks`) and, batched, its scales (`_run_scales`). Views of consecutive
    slots depend on the layer's stacks and the unit's slots and rank only, so `views` (the layer's own dict) keeps
    them across routings: a decode step routes anew every step, and making them again in every layer was about a
    seventh of a decode step's LoRA term here. Keyed by the stacks' storage too, in case it is replaced."""
    # Only consecutive slots' blocks are views; a gather is a copy, which would not follow the weights.
    keep = views is not None and unit.consecutive
    key = (unit.key, unit.batched, lora_a.data_ptr(), lora_b.data_ptr(), scale.data_ptr()) if keep else None
    if key is not None and key in views:
        return views[key]
    # Of the stacks' data (detached: the same memory and version counter), not autograd views of the parameters,
    # which autograd forbids using once the parameter was changed in place with gradients on (as loading does).
    made = (_run_blocks(lora_a.detach(), layouts[0], unit), _run_blocks(lora_b.detach(), layouts[1], unit),
            _run_scales(scale, routing, unit) if unit.batched else None)
    if key is not None:
        if len(views) >= _MAX_UNIT_VIEWS:
            views.clear()
        views[key] = made
    return made


def per_adapter_terms(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor,
                      routing: Routing, layouts: tuple[Block, Block], saved: list[torch.Tensor] | None = None,
                      views: UnitViews | None = None) -> tuple[torch.Tensor, Any, list[Unit]]:
    """Each group's `linear(linear(x_g, A_k), B_k) * s_k`, PEFT's calls on its slot's blocks, written into its rows
    of one output; returns it, the scales used and the units computed (`_units`). `saved` collects (x_g, A_k^T,
    B_k^T, hidden) per unit for the backward (a run's as (G, ...) blocks and flat rows); without it (no gradient:
    sampling, evaluation) this is the whole LoRA term, without an autograd node to build (about 3% of a sampling
    pass here). `views`: the layer's views of its runs' blocks, kept across calls (`_unit_views`)."""
    tokens_per_row = math.prod(x.shape[1:-1])
    x_flat = x.reshape(-1, x.size(-1))
    units = _units(x_flat, lora_a, lora_b, routing, tokens_per_row, training=saved is not None)
    # Times a Python float, as PEFT's `* scaling` is; on a GPU the 0-dim tensor (reading the values out would be a
    # host sync). Read where a group is computed by itself, or for the backward (runs scale by the tensor).
    scales: Any = scale
    if scale.device.type == "cpu" and (saved is not None or any(unit.single for unit in units)):
        scales = scale.tolist()
    delta = None
    for unit in units:
        flat = x_flat if unit.start == 0 and unit.stop == x_flat.size(0) else x_flat[unit.start : unit.stop]
        slots, rank = unit.slots, unit.rank
        if unit.single:
            # A_k^T and B_k^T exactly as PEFT's `weight.t()` of its contiguous (r, d_in) and
            # (d_out, r) weights: one view each, made directly (a slot's blocks, see Block).
            a_t = layouts[0].view(lora_a, slots[0], rank, transposed=True)
            b_t = layouts[1].view(lora_b, slots[0], rank, transposed=True)
            hidden = flat.mm(a_t)
            product = hidden.mm(b_t)
        else:
            a_t, b_t, run_scales = _unit_views(lora_a, lora_b, scale, layouts, routing, unit, views)
            hidden = _run_matmul(flat, a_t, unit)
            product = _run_matmul(hidden, b_t, unit)
        whole = len(units) == 1
        if whole:  # the product is the whole term (a fresh tensor): scaled where it lies
            delta = into = product
        else:
            if delta is None:  # in the matmul's dtype (bf16 under autocast)
                # Each unit's term is written straight into its rows of the output (no concatenation).
                delta = product.new_empty(x_flat.size(0), product.size(-1))
            into = delta[unit.start : unit.stop]
        if unit.single:
            torch.mul(product, scales[slots[0]], out=into)
        else:
            # As (groups, rows x tokens, d_out) if batched, else (rows, tokens, d_out): one scale per group or row.
            shape = (unit.end - unit.first, -1, product.size(-1)) if unit.batched else (-1, tokens_per_row,
                                                                                       product.size(-1))
            if product.dim() == 2:  # from `grouped_mm`: a batched `_run_matmul` gives (groups, rows, d_out)
                product = product.view(shape)
            if run_scales is None:  # a grouped run: one scale per row
                run_scales = _run_scales(scale, routing, unit)
            torch.mul(product, run_scales, out=product if whole else into.view(shape))
        if saved is not None:
            saved += [flat, a_t, b_t, hidden]
    assert delta is not None  # routing has at least one group
    return delta.view(*x.shape[:-1], -1), scales, units


class PerAdapterLora(torch.autograd.Function):
    """Each group's `linear(linear(x_g, A_k), B_k) * s_k` on its slot's blocks, as one autograd node.

    Forward and backward make exactly the matmuls autograd makes for PEFT's two `linear`
    calls (the same operands, layouts and order: see `_linear_grads`), so results and gradients
    are bit-identical to PEFT's; one node instead of a dozen per adapter and layer is what
    saves the time, which on the CPU is mostly the autograd bookkeeping of small matmuls.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor,
                routing: Routing, layouts: tuple[Block, Block], views: UnitViews | None = None) -> torch.Tensor:
        tensors: list[torch.Tensor] = []
        delta, scales, units = per_adapter_terms(x, lora_a, lora_b, scale, routing, layouts, tensors, views)
        # Saved the official way, so that activation checkpointing can drop and recompute them.
        ctx.save_for_backward(*tensors)
        ctx.units = [(unit.slots, unit.rank) for unit in units]
        # Whether the backward writes every entry of the gradient stacks (every slot routed, at the stacks' rank):
        # then they need no zeros first.
        ctx.covering = (sorted(set(routing.slots)) == list(range(lora_a.size(0)))
                        and all(rank == lora_a.size(1) for rank in routing.ranks))
        ctx.scales, ctx.shapes, ctx.layouts = scales, (lora_a.shape, lora_b.shape), layouts
        ctx.input_shape = x.shape
        # The backward runs under the forward's autocast (bf16 on a GPU), as autograd's own
        # recorded casts would make it (what torch.amp.custom_bwd does, for any device).
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return delta

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            if not torch.autograd.profiler._is_profiler_enabled:
                return PerAdapterLora._backward(ctx, grad_output)
            with torch.profiler.record_function(LORA_BACKWARD):
                return PerAdapterLora._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        tensors = ctx.saved_tensors
        # Without autocast, each matmul writes its result where it belongs: the input gradient
        # into its rows, the weight gradients into the slot's blocks (an `out=` matmul would
        # skip autocast's cast, so under it results are added in and joined instead).
        direct = not torch.is_autocast_enabled(grad_output.device.type)
        filled = direct and ctx.covering
        grad_a, grad_b = (unfilled(grad_output, shape) if filled else grad_output.new_zeros(shape)
                          for shape in ctx.shapes)
        flats = tensors[0::4]
        grad_parts = grad_output.reshape(-1, grad_output.size(-1)).split([flat.size(0) for flat in flats])
        into = None
        if ctx.needs_input_grad[0] and direct:
            into = grad_output.new_empty(sum(flat.size(0) for flat in flats), ctx.input_shape[-1])
        into_parts = into.split([flat.size(0) for flat in flats]) if into is not None else [None] * len(flats)
        grad_x_parts = []
        written: set[int] = set()
        for index, (grad_part, (slots, rank)) in enumerate(zip(grad_parts, ctx.units)):
            flat, a_t, b_t, hidden = tensors[4 * index : 4 * index + 4]
            if len(slots) > 1:  # a run (every slot in it has no other group: its blocks are written)
                grad_x_parts.append(_run_grads(grad_part, flat, a_t, b_t, hidden, slots, rank, ctx, grad_a, grad_b,
                                               into_parts[index]))
                continue
            slot = slots[0]
            # A slot met twice in one batch gets its gradients summed.
            first = direct and slot not in written
            written.add(slot)
            grad_delta = grad_part * ctx.scales[slot]
            grad_a_block, grad_b_block = (ctx.layouts[0].view(grad_a, slot, rank),
                                          ctx.layouts[1].view(grad_b, slot, rank))
            grad_hidden = _linear_grads(grad_delta, hidden, b_t, grad_b_block, first)
            grad_x_parts.append(_linear_grads(grad_hidden, flat, a_t, grad_a_block, first, into_parts[index],
                                              inputs_grad=ctx.needs_input_grad[0]))
        if not ctx.needs_input_grad[0]:
            return None, grad_a, grad_b, None, None, None, None
        grad_x = into if into is not None else torch.cat(grad_x_parts)
        return grad_x.view(ctx.input_shape), grad_a, grad_b, None, None, None, None


def unfilled(like: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A gradient stack the backward writes entirely (its entries are not zeroed first)."""
    return like.new_empty(shape)


def _run_grads(grad: torch.Tensor, flat: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor, hidden: torch.Tensor,
               slots: list[int], rank: int, ctx: Any, grad_a: torch.Tensor, grad_b: torch.Tensor,
               into: torch.Tensor | None) -> torch.Tensor | None:
    """`_linear_grads` of both matmuls for a run of G groups of equal rows (no autocast): the same per-group
    matmuls, on the same operands and layouts, each as one `bmm` over the groups where it rounds as they do
    (`exact_batch.bmm_or_loop`). Writes the slots' blocks of `grad_a` and `grad_b`; returns the input's gradient
    (into `into` if given) or None if the input needs none."""
    groups = len(slots)
    grad_delta = grad.view(groups, -1, grad.size(-1)) * grad.new_tensor([ctx.scales[s] for s in slots]).view(-1, 1, 1)
    hidden, flat = hidden.view(groups, -1, hidden.size(-1)), flat.view(groups, -1, flat.size(-1))
    _write_blocks(grad_delta.transpose(1, 2), hidden, grad_b, ctx.layouts[1], slots, rank)
    grad_hidden = bmm_or_loop(grad_delta, b_t.transpose(1, 2))
    _write_blocks(grad_hidden.transpose(1, 2), flat, grad_a, ctx.layouts[0], slots, rank)
    if not ctx.needs_input_grad[0]:
        return None
    out = into.view(groups, -1, into.size(-1)) if into is not None else None
    return bmm_or_loop(grad_hidden, a_t.transpose(1, 2), out=out).view(-1, flat.size(-1))


def _write_blocks(left: torch.Tensor, right: torch.Tensor, stack: torch.Tensor, layout: Block, slots: list[int],
                  rank: int) -> None:
    """Each slot's block of a gradient stack := its group's `left @ right` (`bmm_or_loop`): made in place when the
    slots are consecutive and their blocks fill their rows (the view of the stack is then contiguous), else copied
    in, one copy for consecutive slots."""
    products_shape = (len(slots), left.size(1), right.size(2))
    if _consecutive(slots):
        view = stack.as_strided(products_shape, (stack.stride(0), products_shape[2], 1),
                                stack.storage_offset() + slots[0] * stack.stride(0))
        if view.is_contiguous():
            bmm_or_loop(left, right, out=view)
        else:
            view.copy_(bmm_or_loop(left, right))
        return
    for slot, value in zip(slots, bmm_or_loop(left, right)):
        layout.view(stack, slot, rank).copy_(value)


def _linear_grads(grad: torch.Tensor, inputs: torch.Tensor, weight_t: torch.Tensor, weight_grad: torch.Tensor,
                  overwrite: bool, inputs_out: torch.Tensor | None = None,
                  inputs_grad: bool = True) -> torch.Tensor | None:
    """Backward of `inputs.mm(weight_t)`, weight_t = W.t() for a contiguous W (PEFT's `linear`).

    Returns the gradient of `inputs` (written into `inputs_out` if given: the same matmul,
    into a given row-major buffer; None if not `inputs_grad`) and writes W's gradient into
    `weight_grad` (W's block of the gradient stack), or adds it there unless `overwrite`.
    These are exactly autograd's matmuls (torch's mm_mat1_backward / mm_mat2_backward): a
    column-major operand gets its gradient in column order, which is a different matmul and
    so a different rounding.
    `weight_t` is always column-major, so W's gradient is `grad.t().mm(inputs)` (which
    autograd computes, then transposes twice).
    """
    if not inputs_grad:
        grad_inputs = None
    elif inputs.stride(0) == 1 and inputs.stride(1) == inputs.size(0):
        grad_inputs = weight_t.mm(grad.t()).t()
        if inputs_out is not None:
            inputs_out.copy_(grad_inputs)
    elif inputs_out is not None:
        grad_inputs = torch.mm(grad, weight_t.t(), out=inputs_out)
    else:
        grad_inputs = grad.mm(weight_t.t())
    if overwrite:
        torch.mm(grad.t(), inputs, out=weight_grad)
    else:
        weight_grad.add_(grad.t().mm(inputs))
    return grad_inputs
