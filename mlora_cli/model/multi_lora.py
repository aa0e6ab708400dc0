"""The fused multi-adapter LoRA linear layer.

A batch of R rows holds the rows of several adapters, grouped contiguously: group g has
`rows[g]` rows and belongs to slot `slots[g]`. For input x (R, T, d_in) the layer returns

    y = x W^T + b                                            (frozen base, once for all rows)
    y[rows of g] += (dropout_k(x[rows of g]) A_k^T) B_k^T * s_k   with k = slots[g], s_k = alpha_k / r_k

A_k is (r_k, d_in) and B_k is (d_out, r_k), exactly PEFT's lora_A / lora_B weights, and the
LoRA term is evaluated in PEFT's order (scale last). Every slot's A and B live in two stacked
parameters, one row per slot, sized for the largest rank:

    lora_A: (S, r_max, d_in)      lora_B: (S, d_out * r_max)

Slot k's A_k and B_k are the first r_k * d_in and d_out * r_k entries of its rows, viewed as
(r_k, d_in) and (d_out, r_k) (`Block`): PEFT's own contiguous tensors, element for element.
So the optimizer, the gradient norms and clipping work on exactly an adapter's own entries,
as PEFT's do, with no padding to skip. The rest of a row is unused. Rows never mix: each
group only reads its own slot's A and B, and the loss of an adapter only reaches its own
slot's gradients, so co-training is exact (see tests/test_multi_lora.py). Two ways to
compute the LoRA term, same math:

- on a GPU, two batched matmuls over all groups, so the cost does not grow with a Python
  loop over adapters (kernel launches are what a loop costs there):

      h = bmm(x.view(G, m*T, d_in), A[slots, :r]^T)           (G, m*T, r),  r = the largest r_k
      y += bmm(h, (B_pad[slots] * s[slots])^T).view(R, T, d_out)

  with each B_k zero-padded to (d_out, r) (one gather per distinct rank) and scaled in fp32 (under
  autocast, bmm then rounds B_k s_k to bf16 once): padded rows of A and columns of B are zero, so
  they add nothing. Groups of unequal rows (a decode step
  after some rows ended; adapters with other batch or group sizes) are zero-padded to the
  longest, m = max rows, by one `index_copy` in and one `index_select` out, when that at most
  doubles the rows (set with the routing, `model.routing`); past that the loop below wastes less.

- on the CPU (and for groups too unequal to pad), per group `linear(linear(x_g, A_k), B_k) * s_k` on
  the adapter's own blocks: the very calls PEFT makes, on tensors laid out as PEFT's, so an
  adapter's forward and gradients are bit-identical to training it alone with PEFT
  (the padded bmm rounds differently). That makes co-trained and single-tenant runs agree
  even where training is chaotic enough to amplify the last bit. All groups are one autograd
  node (`PerAdapterLora`) whose backward makes autograd's own matmuls. Consecutive groups of one
  rank and equal rows make each of those matmuls batched (one `bmm`, or one per part of the inner
  dimension where `mm` splits it between threads) where that was checked to round as the groups' own
  `mm`s (`model.exact_batch`), which costs about what the union batch's one matmul does;
  without gradients, unequal ones as one `grouped_mm` (a loop of the same `mm`s in C++).

The base may be an `nn.Linear` (weight (d_out, d_in)) or GPT-2's `Conv1D` (weight
(d_in, d_out), y = x W + b); the LoRA term is the same for both. A and B are stored in fp32.
Without autocast the LoRA term is computed in fp32 (a bf16/fp16 base gets its input cast up
and the sum cast back, so the layer's output has the base output's dtype). Under autocast
(`model.autocast`) its matmuls run in the autocast dtype like the base's, with fp32 weights
cast by autocast, and the scale is applied in that dtype too (no fp32 copy of x or of the
term is made); gradients of A and B still land in their fp32 stacks.
"""

from __future__ import annotations

import torch
from torch import nn

from mlora_cli.model.blocks import Block
from mlora_cli.model.per_adapter import PerAdapterLora, UnitViews, per_adapter_terms
from mlora_cli.model.routing import Routing

# Profiler range (only entered while torch.profiler records): the LoRA term's forward (per_adapter has the backward's).
LORA_FORWARD = "mlora: LoRA term"


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an `nn.Linear` or a transformers `Conv1D` (whose weight is stored transposed)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    d_in, d_out = layer.weight.shape
    return d_in, d_out


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
        self.lora_B = nn.Parameter(torch.zeros(num_slots, self.out_features * max_rank, **factory))
        self.a_layout, self.b_layout = (Block(self.in_features, rank_first=True),
                                        Block(self.out_features, rank_first=False))
        # alpha / rank per slot; 0 where the slot is empty or its adapter does not target this layer.
        self.register_buffer("scale", torch.zeros(num_slots, **factory), persistent=False)
        self.routing = routing
        self.unit_views: UnitViews = {}  # the CPU path's views of this layer's runs, kept across routings

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight (dtype/device checks)
        return self.base.weight

    def a_block(self, slot: int, rank: int, stack: torch.Tensor | None = None) -> torch.Tensor:
        """Slot `slot`'s A as (rank, d_in), a view into `stack` (default: lora_A; or its gradient, a moment)."""
        return self.a_layout.of((self.lora_A if stack is None else stack)[slot], rank)

    def b_block(self, slot: int, rank: int, stack: torch.Tensor | None = None) -> torch.Tensor:
        """Slot `slot`'s B as (d_out, rank), a view into `stack` (default: lora_B)."""
        return self.b_layout.of((self.lora_B if stack is None else stack)[slot], rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if not self.routing.slots:
            return result
        if not torch.autograd.profiler._is_profiler_enabled:
            return result + self.lora_term(x).to(result.dtype)
        with torch.profiler.record_function(LORA_FORWARD):  # what a profile of a step counts as the LoRA term
            return result + self.lora_term(x).to(result.dtype)

    def lora_term(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA term of every routed group (module doc), in the matmuls' dtype."""
        routing = self.routing
        # Under autocast the matmuls cast their inputs to the autocast dtype anyway: an fp32 copy would be wasted.
        autocasting = torch.is_autocast_enabled(x.device.type)
        lora_input = self._dropout(x if autocasting else x.to(self.lora_A.dtype))
        if routing.batched:
            groups, shape = len(routing.slots), lora_input.shape
            grouped = self._grouped(lora_input, groups)
            rank = max(routing.ranks)
            every_slot = routing.in_slot_order and groups == self.lora_A.size(0)  # no gather needed
            lora_a = self.lora_A[:, :rank] if every_slot else self.lora_A[routing.slot_index, :rank]
            scale = self.scale if every_slot else self.scale[routing.slot_index]
            hidden = torch.bmm(grouped, lora_a.transpose(1, 2))
            # s_k folded into B_k in fp32 (a (G, d_out, r) product): under autocast an exact scale, where scaling the
            # bf16 product would round s_k to bf16 first (16 / 12 -> 1.3359); and no pass over R x T x d_out.
            scaled_b = self._padded_b(rank, every_slot) * scale.view(groups, 1, 1)
            delta = torch.bmm(hidden, scaled_b.transpose(1, 2))
            if routing.padded_rows is not None:  # each row's term back from its padded place
                delta = delta.reshape(groups * max(routing.rows), -1).index_select(0, routing.padded_rows)
            return delta.reshape(*shape[:-1], -1)
        layouts = (self.a_layout, self.b_layout)
        if not torch.is_grad_enabled():  # sampling, evaluation: the same matmuls, no autograd node
            return per_adapter_terms(lora_input, self.lora_A, self.lora_B, self.scale, routing, layouts,
                                     views=self.unit_views)[0]
        return PerAdapterLora.apply(lora_input, self.lora_A, self.lora_B, self.scale, routing, layouts, self.unit_views)

    def _grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """x as (groups, rows of a group x tokens, d_in); unequal groups zero-padded to the longest (one copy)."""
        padded_rows = self.routing.padded_rows
        if padded_rows is None:
            return x.reshape(groups, -1, x.size(-1))
        per_row = x.reshape(x.size(0), -1)
        padded = per_row.new_zeros(groups * max(self.routing.rows), per_row.size(1)).index_copy(0, padded_rows, per_row)
        return padded.view(groups, -1, x.size(-1))

    def _padded_b(self, rank: int, every_slot: bool) -> torch.Tensor:
        """(G, d_out, rank): each routed group's B, zero-padded to `rank` columns, in group order."""
        d_out = self.out_features
        by_rank, inverse = self.routing.by_rank()
        if every_slot and len(by_rank) == 1:  # one rank, all slots in order: the blocks as they lie
            return self.lora_B[:, : d_out * rank].view(self.lora_B.size(0), d_out, rank)
        padded = []
        for group_rank, slots in by_rank:
            blocks = self.lora_B[:, : d_out * group_rank].index_select(0, slots).view(len(slots), d_out, group_rank)
            padded.append(nn.functional.pad(blocks, (0, rank - group_rank)))
        stacked = torch.cat(padded) if len(padded) > 1 else padded[0]
        return stacked if inverse is None else stacked[inverse]

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """x * keep / (1 - p), as nn.Dropout scales, each adapter's rows with its own mask and p: the scaled masks
        are written into one tensor, then one multiply (no product and copy per adapter).

        A bf16 / fp16 x (under autocast) is multiplied by its 0/1 mask in its own dtype (exact), then by
        1 / (1 - p) in fp32 and rounded once, as PEFT does it (it casts x to its fp32 weights' dtype before
        dropout; the matmul's autocast rounds the product). A scaled mask in bf16 would round the scale itself
        first (1 / 0.95 -> 1.0547, 0.2% off for every kept entry), and one in fp32 would be kept for backward at
        4 bytes an entry: the 0/1 mask is kept at x's 2."""
        routing = self.routing
        if not any(p > 0 for p in routing.dropout):  # only training steps set dropout
            return x
        half = x.element_size() < 4
        masks, start = torch.empty_like(x), 0
        for rows, p, generator in zip(routing.rows, routing.dropout, routing.generators):
            part = masks[start : start + rows]
            if p == 0:
                part.fill_(1.0)
            elif half:
                part.copy_(_keep_mask(part, p, generator))
            else:
                torch.mul(_keep_mask(part, p, generator), 1.0 / (1.0 - p), out=part)
            start += rows
        if not half:
            return x * masks
        assert routing.dropout_scales is not None  # set with the routing when any p > 0
        scales = routing.dropout_scales.view(-1, *([1] * (x.dim() - 1)))
        return ((x * masks).float() * scales).to(x.dtype)


def _keep_mask(piece: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """The 0/1 keep mask (keep with probability 1 - p) of one adapter's rows (shaped like `piece`), independent of
    its neighbours.

    The adapter's own generator gives one seed per call (so its stream advances the same
    whatever the batch), and the mask is drawn position-major, so a token's mask is the same
    however far the fused batch is padded past it. One `bernoulli_` per adapter and layer: on
    the CPU torch draws it with MKL's vectorised generator (skip-ahead streams: the same mask at
    any thread count), far faster than uniform noise compared to p.
    """
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device if generator else "cpu"))
    local = torch.Generator(device=piece.device).manual_seed(seed)
    if piece.dim() < 3:
        return torch.empty(piece.shape, device=piece.device, dtype=piece.dtype).bernoulli_(1.0 - p, generator=local)
    rows, length = piece.shape[0], piece.shape[1]
    mask = torch.empty((length, rows, *piece.shape[2:]), device=piece.device, dtype=piece.dtype)
    return mask.bernoulli_(1.0 - p, generator=local).transpose(0, 1)
