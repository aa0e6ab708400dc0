"""The LoRA term group by group, PEFT's way: the CPU path of the fused layer (`model.multi_lora`).

Each group g of a routing (slot k, rows x_g) gets `linear(linear(x_g, A_k), B_k) * s_k` with the
very calls PEFT makes, on its slot's blocks laid out as PEFT's tensors, so an adapter's output and
gradients are bit-identical to training it alone with PEFT. The calls are the cost on a CPU (each
tiny matmul is mostly dispatch), so they are made as few as that allows:

- all groups are one autograd node (`PerAdapterLora`) whose backward makes autograd's own matmuls;
- without gradients (sampling, evaluation) no autograd node is built, and a run of consecutive groups of
  one rank (`Routing.runs`) is one `grouped_mm` per matmul, which torch computes on the CPU as a loop of
  `mm` over the same operands: each group's numbers are its own `mm`'s, with one Python call per run
  instead of one per group (~9% of a sampling pass here; the training step's backward gained nothing).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mlora_cli.model.blocks import Block
from mlora_cli.model.routing import Routing

# Profiler range (only entered while torch.profiler records): the per-adapter backward.
LORA_BACKWARD = "mlora: LoRA term backward"


@dataclass(frozen=True)
class Unit:
    """Groups first..end-1 of a routing, computed together: one group with two `mm`s, or (without gradients) a run
    of groups of one rank with two `grouped_mm`s (`offsets`: each group's end in flat rows; `row_scales`: each
    row's s_k)."""

    first: int
    end: int
    offsets: torch.Tensor | None = None
    row_scales: torch.Tensor | None = None

    @property
    def grouped(self) -> bool:
        return self.offsets is not None


def _units(x_flat: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor, routing: Routing,
           tokens_per_row: int, grouping: bool) -> list[Unit]:
    """How to compute the groups: if `grouping`, runs of equal rank (`Routing.runs`) as one `grouped_mm` each where
    torch's checks allow it (fp32, 16-byte aligned rows and blocks); the rest one group at a time."""
    singles = [Unit(group, group + 1) for group in range(len(routing.slots))]
    tensors = (x_flat, lora_a, lora_b)
    if (not grouping or not routing.runs or x_flat.device.type != "cpu" or not x_flat.is_contiguous()
            or any(t.dtype != torch.float32 or t.data_ptr() % 16 for t in tensors)
            or any(t.stride(0) % 4 for t in tensors)):
        return singles
    units: list[Unit] = []
    for first, end in routing.runs:
        if end - first < 2 or routing.ranks[first] % 4:
            units += singles[first:end]
            continue
        rows = routing.row_slots[sum(routing.rows[:first]) : sum(routing.rows[:end])]
        units.append(Unit(first, end, routing.run_offsets(first, end, tokens_per_row), scale.index_select(0, rows)))
    return units


def _run_blocks(stack: torch.Tensor, layout: Block, slots: list[int], rank: int) -> torch.Tensor:
    """(G, rows, columns): the slots' blocks (see Block) transposed as `Block.view(transposed=True)` makes them, for
    `grouped_mm`; a view of the stack when the slots are consecutive, else gathered (a copy, same values)."""
    rows, columns = (rank, layout.width) if layout.rank_first else (layout.width, rank)
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return stack.as_strided((len(slots), columns, rows), (stack.stride(0), 1, columns),
                                stack.storage_offset() + slots[0] * stack.stride(0))
    flat = stack.reshape(stack.size(0), -1)[:, : rows * columns]
    return flat[slots].view(len(slots), rows, columns).transpose(1, 2)


def per_adapter_terms(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor,
                      routing: Routing, layouts: tuple[Block, Block],
                      saved: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, Any]:
    """Each group's `linear(linear(x_g, A_k), B_k) * s_k`, PEFT's calls on its slot's blocks, written into its rows
    of one output; returns it and the scales used. `saved` collects (x_g, A_k^T, B_k^T, hidden) per group for
    the backward; without it (no gradient: sampling, evaluation) this is the whole LoRA term, without an autograd
    node to build (about 3% of a sampling pass here), and runs of groups are `grouped_mm` calls (module doc)."""
    # Times a Python float, as PEFT's `* scaling` is; on a GPU the 0-dim tensor (reading
    # the values out would be a host sync).
    scales = scale.tolist() if scale.device.type == "cpu" else scale
    tokens_per_row = math.prod(x.shape[1:-1])
    x_flat = x.reshape(-1, x.size(-1))
    # Runs only without gradients: measured here, grouping sped sampling up by ~9% but not the training step,
    # whose backward would need copies into the gradient blocks that `mm(out=...)` avoids.
    units = _units(x_flat, lora_a, lora_b, scale, routing, tokens_per_row, grouping=saved is None)
    bounds = [0, *itertools.accumulate(rows * tokens_per_row for rows in routing.rows)]
    delta = None
    for unit in units:
        flat = x_flat[bounds[unit.first] : bounds[unit.end]]
        slots, rank = routing.slots[unit.first : unit.end], routing.ranks[unit.first]
        if unit.grouped:
            a_t, b_t = (_run_blocks(lora_a, layouts[0], slots, rank), _run_blocks(lora_b, layouts[1], slots, rank))
            hidden = nn.functional.grouped_mm(flat, a_t, offs=unit.offsets)
            product = nn.functional.grouped_mm(hidden, b_t, offs=unit.offsets)
        else:
            # A_k^T and B_k^T exactly as PEFT's `weight.t()` of its contiguous (r, d_in) and
            # (d_out, r) weights: one view each, made directly (a slot's blocks, see Block).
            a_t = layouts[0].view(lora_a, slots[0], rank, transposed=True)
            b_t = layouts[1].view(lora_b, slots[0], rank, transposed=True)
            hidden = flat.mm(a_t)
            product = hidden.mm(b_t)
        if delta is None:  # in the matmul's dtype (bf16 under autocast)
            # Each unit's term is written straight into its rows of the output (no concatenation).
            delta = product.new_empty(x_flat.size(0), product.size(1))
        into = delta[bounds[unit.first] : bounds[unit.end]]
        if unit.grouped:  # each row times its slot's scale: the same float32 products as one multiply per group
            torch.mul(product.view(-1, tokens_per_row, product.size(1)), unit.row_scales.view(-1, 1, 1),
                      out=into.view(-1, tokens_per_row, into.size(1)))
        else:
            torch.mul(product, scales[slots[0]], out=into)
        if saved is not None:
            saved += [flat, a_t, b_t, hidden]
    assert delta is not None  # routing has at least one group
    return delta.view(*x.shape[:-1], -1), scales


class PerAdapterLora(torch.autograd.Function):
    """Each group's `linear(linear(x_g, A_k), B_k) * s_k` on its slot's blocks, as one autograd node.

    Forward and backward make exactly the matmuls autograd makes for PEFT's two `linear`
    calls (the same operands, layouts and order: see `_linear_grads`), so results and gradients
    are bit-identical to PEFT's; one node instead of a dozen per adapter and layer is what
    saves the time, which on the CPU is mostly the autograd bookkeeping of small matmuls.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor,
                routing: Routing, layouts: tuple[Block, Block]) -> torch.Tensor:
        tensors: list[torch.Tensor] = []
        delta, scales = per_adapter_terms(x, lora_a, lora_b, scale, routing, layouts, tensors)
        # Saved the official way, so that activation checkpointing can drop and recompute them.
        ctx.save_for_backward(*tensors)
        ctx.groups = list(zip(routing.slots, routing.ranks))
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
        grad_a, grad_b = (grad_output.new_zeros(shape) for shape in ctx.shapes)
        flats = tensors[0::4]
        grad_parts = grad_output.reshape(-1, grad_output.size(-1)).split([flat.size(0) for flat in flats])
        # Without autocast, each matmul writes its result where it belongs: the input gradient
        # into its rows, the weight gradients into the slot's blocks (an `out=` matmul would
        # skip autocast's cast, so under it results are added in and joined instead).
        direct = not torch.is_autocast_enabled(grad_output.device.type)
        into = None
        if ctx.needs_input_grad[0] and direct:
            into = grad_output.new_empty(sum(flat.size(0) for flat in flats), ctx.input_shape[-1])
        into_parts = into.split([flat.size(0) for flat in flats]) if into is not None else [None] * len(flats)
        grad_x_parts = []
        written: set[int] = set()
        for index, (grad_part, (slot, rank)) in enumerate(zip(grad_parts, ctx.groups)):
            flat, a_t, b_t, hidden = tensors[4 * index : 4 * index + 4]
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
            return None, grad_a, grad_b, None, None, None
        grad_x = into if into is not None else torch.cat(grad_x_parts)
        return grad_x.view(ctx.input_shape), grad_a, grad_b, None, None, None


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
