"""The fused multi-adapter LoRA linear layer.

A batch of R rows holds the rows of several adapters, grouped contiguously: group g has
`rows[g]` rows and belongs to slot `slots[g]`. For input x (R, T, d_in) the layer returns

    y = x W^T + b                                            (frozen base, once for all rows)
    y[rows of g] += (dropout_k(x[rows of g]) A_k^T) B_k^T * s_k   with k = slots[g], s_k = alpha_k / r_k

A_k is (r_k, d_in) and B_k is (d_out, r_k), exactly PEFT's lora_A / lora_B weights, and the
LoRA term is evaluated in PEFT's order (scale last). Every slot's A and B live in two stacked
parameters, zero-padded to the largest rank:

    lora_A: (S, r_max, d_in)      lora_B: (S, d_out, r_max)

The padding never changes a result: padded rows of A and columns of B start at zero and
their gradients are exactly zero (each is multiplied by the other's zero), so they stay
zero under AdamW. Rows never mix: each group only reads its own slot's A and B, and the loss
of an adapter only reaches its own slot's gradients, so co-training is exact (see
tests/test_multi_lora.py). Two ways to compute the LoRA term, same math:

- on a GPU, when every group has the same number of rows (equal per-adapter batches, and
  always during evaluation), two batched matmuls over all groups, so the cost does not grow
  with a Python loop over adapters (kernel launches are what a loop costs there):

      h = bmm(x.view(G, m*T, d_in), A[slots]^T)               (G, m*T, r_max)
      y += (bmm(h, B[slots]^T) * s[slots]).view(R, T, d_out)

- on the CPU (and for unequal groups), per group `linear(linear(x_g, A_k[:r_k]), B_k[:, :r_k]) * s_k`
  on the adapter's own rank, with B_k's columns made contiguous: the very calls PEFT makes,
  so an adapter's forward and gradients are bit-identical to training it alone with PEFT
  (the padded bmm rounds differently). That makes co-trained and single-tenant runs agree
  even where training is chaotic enough to amplify the last bit. All groups are one autograd
  node (`PerAdapterLora`) whose backward makes autograd's own matmuls: the loop then costs
  no more than the union batch does.

The base may be an `nn.Linear` (weight (d_out, d_in)) or GPT-2's `Conv1D` (weight
(d_in, d_out), y = x W + b); the LoRA term is the same for both. A and B are always fp32:
a bf16/fp16 base gets its input cast up for the LoRA term and the sum cast back, so the
layer's output has the base output's dtype.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an `nn.Linear` or a transformers `Conv1D` (whose weight is stored transposed)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    d_in, d_out = layer.weight.shape
    return d_in, d_out


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
    per_adapter: bool = False  # always compute the LoRA term group by group, PEFT's way (set on the CPU)

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
        self.slot_index = torch.tensor(self.slots, dtype=torch.long, device=device)
        self.in_slot_order = self.slots == list(range(len(self.slots)))

    def clear(self) -> None:
        self.set([], [], [], torch.device("cpu"))

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
        """`context_fn` for torch.utils.checkpoint: replay a layer's recompute as its forward ran.

        Gradient checkpointing recomputes a layer during backward, after `routed()` has
        cleared the routing, and the recompute would draw fresh dropout masks from the
        adapters' generators. So at forward time we keep the routing and each generator's
        state, and the recompute runs under them, then puts back what it found: the
        gradients and every later random draw are those of a run without checkpointing.
        """
        return contextlib.nullcontext(), self._replaying(self._snapshot(), self._generator_states())

    def _snapshot(self) -> tuple[Any, ...]:
        return self.slots, self.rows, self.ranks, self.dropout, self.generators, self.slot_index, self.in_slot_order

    def _restore(self, snapshot: tuple[Any, ...]) -> None:
        (self.slots, self.rows, self.ranks, self.dropout, self.generators, self.slot_index,
         self.in_slot_order) = snapshot

    def _generator_states(self) -> list[tuple[torch.Generator, torch.Tensor]]:
        return [(g, g.get_state()) for g, p in zip(self.generators, self.dropout) if g is not None and p > 0]

    @contextlib.contextmanager
    def _replaying(self, snapshot: tuple[Any, ...], states: list[tuple[torch.Generator, torch.Tensor]]) -> Iterator[None]:
        routing = self._snapshot()  # in backward: usually the cleared routing
        now = [(generator, generator.get_state()) for generator, _ in states]  # the forward's generators, as they are now
        self._restore(snapshot)
        for generator, state in states:
            generator.set_state(state)
        try:
            yield
        finally:
            self._restore(routing)
            for generator, state in now:
                generator.set_state(state)

    @property
    def uniform(self) -> bool:
        return len(set(self.rows)) == 1


class MultiLoraLinear(nn.Module):
    """A frozen `nn.Linear` (or `Conv1D`) plus S LoRA slots applied to their own rows (see module doc)."""

    def __init__(self, base: nn.Module, num_slots: int, max_rank: int, routing: Routing):
        super().__init__()
        self.base = base
        for parameter in self.base.parameters():
            parameter.requires_grad_(False)
        self.in_features, self.out_features = linear_features(base)
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.zeros(num_slots, max_rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(num_slots, self.out_features, max_rank, **factory))
        # alpha / rank per slot; 0 where the slot is empty or its adapter does not target this layer.
        self.register_buffer("scale", torch.zeros(num_slots, **factory), persistent=False)
        self.routing = routing

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight (dtype/device checks)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        routing = self.routing
        if not routing.slots:
            return result
        lora_input = self._dropout(x.to(self.lora_A.dtype))  # fp32, whatever the base's dtype
        if routing.uniform and not routing.per_adapter:
            groups, shape = len(routing.slots), lora_input.shape
            grouped = lora_input.reshape(groups, -1, shape[-1])
            if routing.in_slot_order and groups == self.lora_A.size(0):
                lora_a, lora_b, scale = self.lora_A, self.lora_B, self.scale  # every slot, in order: no gather
            else:
                index = routing.slot_index
                lora_a, lora_b, scale = self.lora_A[index], self.lora_B[index], self.scale[index]
            hidden = torch.bmm(grouped, lora_a.transpose(1, 2))
            delta = torch.bmm(hidden, lora_b.transpose(1, 2)) * scale.view(groups, 1, 1)
            return result + delta.reshape(*shape[:-1], -1).to(result.dtype)
        delta = PerAdapterLora.apply(lora_input, self.lora_A, self.lora_B, self.scale, routing)
        return result + delta.to(result.dtype)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        if not any(p > 0 for p in routing.dropout):  # only training steps set dropout
            return x
        pieces, start = [], 0
        for rows, p, generator in zip(routing.rows, routing.dropout, routing.generators):
            piece = x[start : start + rows]
            if p > 0:
                piece = piece * (_keep_mask(piece, generator) >= p) / (1.0 - p)
            pieces.append(piece)
            start += rows
        return torch.cat(pieces)


def _keep_mask(piece: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform noise for one adapter's rows that does not depend on its neighbours.

    The adapter's own generator gives one seed per call (so its stream advances the same
    whatever the batch), and the noise is drawn position-major, so a token's mask is the same
    however far the fused batch is padded past it.
    """
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device if generator else "cpu"))
    local = torch.Generator(device=piece.device).manual_seed(seed)
    if piece.dim() < 3:
        return torch.rand(piece.shape, generator=local, device=piece.device, dtype=piece.dtype)
    rows, length = piece.shape[0], piece.shape[1]
    noise = torch.rand((length, rows, *piece.shape[2:]), generator=local, device=piece.device, dtype=piece.dtype)
    return noise.transpose(0, 1)


class PerAdapterLora(torch.autograd.Function):
    """Each group's `linear(linear(x_g, A_k[:r_k]), B_k[:, :r_k]) * s_k`, as one autograd node.

    Forward and backward make exactly the matmuls autograd makes for PEFT's two `linear`
    calls (the same operands, layouts and order: see `_mm_grads`), so results and gradients
    are bit-identical to PEFT's; one node instead of a dozen per adapter and layer is what
    saves the time, which on the CPU is mostly the autograd bookkeeping of small matmuls.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor,
                routing: Routing) -> torch.Tensor:
        # Times a Python float, as PEFT's `* scaling` is; on a GPU the 0-dim tensor (reading
        # the values out would be a host sync).
        scales = scale.tolist() if scale.device.type == "cpu" else scale
        tokens_per_row = math.prod(x.shape[1:-1])
        flat_parts = x.reshape(-1, x.size(-1)).split([rows * tokens_per_row for rows in routing.rows])
        groups, tensors = [], []
        delta = out_parts = None
        for index, (flat, slot, rank) in enumerate(zip(flat_parts, routing.slots, routing.ranks)):
            a, b = lora_a[slot, :rank], lora_b[slot, :, :rank].contiguous()  # PEFT's own (r, d_in), (d_out, r)
            hidden = flat.mm(a.t())
            product = hidden.mm(b.t())
            if delta is None:  # in the matmul's dtype (bf16 under autocast)
                # Each group's term is written straight into its rows of the output (no concatenation).
                delta = product.new_empty(sum(part.size(0) for part in flat_parts), product.size(1))
                out_parts = delta.split([part.size(0) for part in flat_parts])
            torch.mul(product, scales[slot], out=out_parts[index])
            groups.append((slot, rank))
            tensors += [flat, a, b, hidden]
        # Saved the official way, so that activation checkpointing can drop and recompute them.
        ctx.save_for_backward(*tensors)
        ctx.groups, ctx.scales, ctx.shapes = groups, scales, (lora_a.shape, lora_b.shape)
        ctx.input_shape = x.shape
        # The backward runs under the forward's autocast (bf16 on a GPU), as autograd's own
        # recorded casts would make it (what torch.amp.custom_bwd does, for any device).
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return delta.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return PerAdapterLora._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        tensors = ctx.saved_tensors
        grad_a, grad_b = (grad_output.new_zeros(shape) for shape in ctx.shapes)
        flats = tensors[0::4]
        grad_parts = grad_output.reshape(-1, grad_output.size(-1)).split([flat.size(0) for flat in flats])
        # Without autocast, each group's input gradient is written straight into its rows (no
        # concatenation); an `out=` matmul would skip autocast's cast, so under it they are joined.
        into = None
        if ctx.needs_input_grad[0] and not torch.is_autocast_enabled(grad_output.device.type):
            into = grad_output.new_empty(sum(flat.size(0) for flat in flats), ctx.input_shape[-1])
        into_parts = into.split([flat.size(0) for flat in flats]) if into is not None else [None] * len(flats)
        grad_x_parts = []
        for index, (grad_part, (slot, rank)) in enumerate(zip(grad_parts, ctx.groups)):
            flat, a, b, hidden = tensors[4 * index : 4 * index + 4]
            grad_delta = grad_part * ctx.scales[slot]
            grad_hidden, grad_b_t = _mm_grads(grad_delta, hidden, b.t())
            grad_flat, grad_a_t = _mm_grads(grad_hidden, flat, a.t(), into_parts[index])
            grad_b[slot].narrow(1, 0, rank).add_(grad_b_t.t())
            grad_a[slot].narrow(0, 0, rank).add_(grad_a_t.t())
            grad_x_parts.append(grad_flat)
        if not ctx.needs_input_grad[0]:
            return None, grad_a, grad_b, None, None
        grad_x = into if into is not None else torch.cat(grad_x_parts)
        return grad_x.view(ctx.input_shape), grad_a, grad_b, None, None


def _mm_grads(grad: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor,
              out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `mat1.mm(mat2)` exactly as autograd computes them (torch's
    mm_mat1_backward / mm_mat2_backward: a column-major operand gets its gradient in column
    order, which is a different matmul and so a different rounding). With `out`, mat1's
    gradient is written there (the same matmul, into a given row-major buffer)."""
    if mat1.stride(0) == 1 and mat1.stride(1) == mat1.size(0):
        grad_mat1 = mat2.mm(grad.t()).t()
        if out is not None:
            out.copy_(grad_mat1)
    elif out is not None:
        grad_mat1 = torch.mm(grad, mat2.t(), out=out)
    else:
        grad_mat1 = grad.mm(mat2.t())
    if mat2.stride(0) == 1 and mat2.stride(1) == mat2.size(0):
        grad_mat2 = grad.t().mm(mat1).t()
    else:
        grad_mat2 = mat1.t().mm(grad)
    return grad_mat1, grad_mat2
