"""Per-slot AdamW over stacked LoRA parameters, and the learning-rate schedule.

Every parameter has shape (S, ...), one row per slot, and a `Block` layout: the slot's LoRA
matrix is the first rank * width entries of its row (see multi_lora.py). Each slot has its
own lr, weight decay, betas, eps, step count and gradient-norm clip, and the update for
slot k is exactly `torch.optim.AdamW` on that slot's matrices. A slot that is not `active`
in a step does not change at all: no weight-decay drift, no moment decay, no step count.

On the CPU each active slot goes through torch's fused AdamW kernel (one call per slot, on
its own blocks of every parameter, which are contiguous and laid out as PEFT's): bit-
identical to `clip_grad_norm_` + `AdamW(fused=True)` on the adapter alone, with no padding
processed. On a GPU the update is a handful of masked tensor ops, AdamW's formula op by op,
whatever the number of slots (finding the active slots would be a host sync) and whatever the
number of layers: there every parameter, gradient and moment is a view into one flat
(S, total) buffer of its kind (`flatten`), parameter i owning columns [offset_i, offset_i + n_i)
of every slot's row, so the update and the gradient norms run once over the buffers (~20
kernels a step, not ~20 per stacked tensor). Gradients accumulate into their views in place
(autograd adds into a gradient that exists), and `zero_grad` zeroes the buffer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch

from mlora_cli.data.batches import to_device
from mlora_cli.model.blocks import Block
from mlora_cli.model.clip_norms import slot_norms
from mlora_cli.model.routing import on_device
from mlora_cli.model.slots import SlotRanks

FLAT_CHUNK_ELEMENTS = 2**22  # entries per chunk of the masked update over the flat buffers (16 MiB in fp32)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based), as LambdaLR would use."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def clip_stacks(grads: list[torch.Tensor | None], coefficients: torch.Tensor) -> None:
    """Each stacked gradient's slot rows times the slot's coefficient, in place."""
    for grad in grads:
        if grad is not None:
            grad.mul_(coefficients.view(-1, *([1] * (grad.dim() - 1))))


class GradBlocks(NamedTuple):
    """What `grad_norms` made for the `step` that follows it."""

    grads: list[torch.Tensor | None]  # the gradients it read (the step checks they are still these)
    by_slot: dict[int, tuple[list[int], list[torch.Tensor]]]  # slot -> (its parameters, its gradient blocks)


# With flat buffers autograd adds each gradient into its view in place, as wanted; its note that a view of a wider
# buffer is not a dense layout (so other gradients would be made contiguous) says nothing about this case.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


class FlatBuffers(NamedTuple):
    """The (S, total) buffers of the masked update (see the module doc); parameter i is columns of each."""

    params: torch.Tensor
    grads: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


class SlotAdamW:
    """`params[i]` has shape (S, ...) and slot blocks laid out as `layouts[i]`.

    `ranks` (shared with the engine) holds the rank in use by each slot; rank entries below a
    slot's frozen rank never change (O-LoRA keeps earlier tasks' LoRA frozen inside the same
    slot).
    """

    def __init__(self, params: list[torch.Tensor], num_slots: int, layouts: list[Block], ranks: SlotRanks):
        self.params = params
        self.layouts = layouts
        self.num_slots = num_slots
        self.ranks = ranks
        device = params[0].device
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        if not all(p.is_contiguous() for p in params):
            raise ValueError("stacked parameters must be contiguous")

        def per_slot(value: float) -> torch.Tensor:
            return torch.full((num_slots,), value, dtype=torch.float64, device=device)

        self.steps = torch.zeros(num_slots, dtype=torch.long)
        # On a GPU the step counts advance on the device (which slots stepped is known there only); the host
        # copy above is brought up to date when it is read (`host_steps`), at a checkpoint, not every step.
        self.device_steps: torch.Tensor | None = None
        self.weight_decay = per_slot(0.0)
        self.beta1 = per_slot(0.9)
        self.beta2 = per_slot(0.999)
        self.eps = per_slot(1e-8)
        self.max_grad_norm = per_slot(math.inf)
        # Set by `flatten` (the masked update's layout): the flat buffers the tensors above are views into.
        self.flat: FlatBuffers | None = None
        # Views of a slot's blocks of the parameters and moments, made once per (slot, rank,
        # parameters) and reused (the tensors are only ever updated in place): views cost more
        # to make than the fused kernel takes on small adapters.
        self._state_views: dict[tuple[int, int, tuple[int, ...]], tuple[list[torch.Tensor], ...]] = {}
        # The gradient blocks `grad_norms` made, kept for the `step` that follows it.
        self._grad_blocks: GradBlocks | None = None
        # The update's form (see the module doc): fused kernel per slot, or masked over all slots.
        self.per_slot_fused = device.type == "cpu"

    @property
    def per_slot_fused(self) -> bool:
        return self._per_slot_fused

    @per_slot_fused.setter
    def per_slot_fused(self, value: bool) -> None:
        """True: the CPU's fused kernel per slot; False: the masked update over flat buffers (made now)."""
        if value and self.flat is not None:
            raise ValueError("the masked update's flat buffers are in place; the per-slot update needs its own engine")
        self._per_slot_fused = value
        if not value:
            self.flatten()

    def flatten(self) -> None:
        """Make every parameter, its gradient and its moments views into flat (S, total) buffers (module doc)."""
        if self.flat is not None:
            return
        sizes = [p[0].numel() for p in self.params]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        like = self.params[0]
        buffers = [torch.zeros(self.num_slots, sum(sizes), dtype=like.dtype, device=like.device) for _ in range(4)]
        self.flat = FlatBuffers(*buffers)
        for i, (p, offset, size) in enumerate(zip(self.params, offsets, sizes)):
            views = [buffer[:, offset : offset + size].view(p.shape) for buffer in buffers]
            with torch.no_grad():
                views[0].copy_(p)
                views[2].copy_(self.exp_avg[i])
                views[3].copy_(self.exp_avg_sq[i])
                if p.grad is not None:
                    views[1].copy_(p.grad)
            p.data = views[0]  # the same Parameter object: the layers keep theirs
            p.grad = views[1]
            self.exp_avg[i], self.exp_avg_sq[i] = views[2], views[3]
        self._state_views.clear()

    def zero_grad(self) -> None:
        """No gradients: dropped, or with flat buffers zeroed in place (their views are the gradients)."""
        if self.flat is not None:
            self.flat.grads.zero_()
            return
        for p in self.params:
            p.grad = None

    def block(self, index: int, tensor: torch.Tensor, slot: int) -> torch.Tensor:
        """Slot `slot`'s block of parameter `index` (or of a tensor shaped like it), as PEFT lays it out."""
        return self.layouts[index].of(tensor[slot], self.ranks.in_use[slot])

    def _flat_blocks(self, tensors: list[torch.Tensor], indices: list[int], slot: int, rank: int) -> list[torch.Tensor]:
        """Slot `slot`'s blocks of `tensors[i]` (contiguous, shaped like the parameters) as 1-d views:
        the fused kernel, clipping and norms are elementwise or whole-tensor reductions, which see
        a contiguous tensor as its flat entries."""
        return [self.layouts[i].entries(tensors[i], slot, rank) for i in indices]

    def _gradients(self) -> list[torch.Tensor | None]:
        """The parameters' gradients, each made contiguous if it is not (blocks are views of rows); flat buffers'
        views are left as they are (their rows are contiguous, which is what a block needs)."""
        for p in self.params if self.flat is None else ():
            if p.grad is not None and not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
        return [p.grad for p in self.params]

    def trainable(self) -> Iterator[torch.Tensor]:
        """Per parameter in turn, a bool mask that broadcasts to it: False on frozen ranks' entries."""
        device = self.params[0].device
        # Host numbers, through pinned memory (a pageable copy would wait for the GPU's queued kernels).
        ranks = on_device(self.ranks.in_use, device, torch.int32).view(-1, 1).clamp(min=1)
        frozen = to_device(self.ranks.frozen.to(torch.int32), device).view(-1, 1)
        for p, layout in zip(self.params, self.layouts):
            if layout.rank_first:  # each rank is a run of `width` entries: one flag per rank
                rank_of = torch.arange(p[0].numel() // layout.width, dtype=torch.int32, device=device)
                yield (rank_of >= frozen).view(p.size(0), -1, *([1] * (p.dim() - 2)))
            else:  # (width, rank): the rank is the column
                rank_of = torch.arange(p[0].numel(), dtype=torch.int32, device=device) % ranks
                yield (rank_of >= frozen).view(p.shape)

    def reset_slot(
        self,
        slot: int,
        weight_decay: float,
        beta1: float,
        beta2: float,
        eps: float,
        max_grad_norm: float | None,
    ) -> None:
        """Fresh optimizer state for a new adapter in `slot`."""
        self.restart_moments(slot)
        self.weight_decay[slot] = weight_decay
        self.beta1[slot], self.beta2[slot], self.eps[slot] = beta1, beta2, eps
        self.max_grad_norm[slot] = math.inf if max_grad_norm is None else max_grad_norm

    def restart_moments(self, slot: int) -> None:
        """Zero a slot's moments and step count (a fresh optimizer for a fresh LoRA)."""
        for state in (*self.exp_avg, *self.exp_avg_sq):
            state[slot].zero_()
        self.set_steps(slot, 0)

    def set_steps(self, slot: int, steps: int) -> None:
        self.host_steps()[slot] = steps
        if self.device_steps is not None:
            self.device_steps[slot] = steps

    def host_steps(self) -> torch.Tensor:
        """The step count per slot on the host (copied from the device where a GPU keeps it: a sync)."""
        if self.device_steps is not None:
            self.steps.copy_(self.device_steps)
        return self.steps

    def slot_state(self, slot: int) -> dict[str, object]:
        return {
            "exp_avg": [m[slot].clone() for m in self.exp_avg],
            "exp_avg_sq": [v[slot].clone() for v in self.exp_avg_sq],
            "step": int(self.host_steps()[slot]),
            "frozen_rank": int(self.ranks.frozen[slot]),
        }

    def load_slot_state(self, slot: int, state: dict[str, object]) -> None:
        for target, source in zip(self.exp_avg, state["exp_avg"]):  # type: ignore[call-overload]
            target[slot].copy_(source)
        for target, source in zip(self.exp_avg_sq, state["exp_avg_sq"]):  # type: ignore[call-overload]
            target[slot].copy_(source)
        self.set_steps(slot, int(state["step"]))  # type: ignore[call-overload]
        self.ranks.frozen[slot] = int(state["frozen_rank"])  # type: ignore[call-overload]

    @torch.no_grad()
    def grad_norms(self, in_use: list[tuple[int, list[bool]]] | None = None) -> torch.Tensor:
        """The L2 norm of each slot's whole gradient, shape (S,).

        With `in_use` = [(slot, whether each parameter belongs to the slot's adapter)], those
        slots' norms are computed as `clip_grad_norm_` computes them on the adapter's own
        tensors (the norm of the per-tensor norms), bit for bit: each block is the adapter's
        own contiguous tensor. The default is one vectorized sum of squares over the stacks
        (the unused rest of every row is zero and adds nothing).
        """
        total = torch.zeros(self.num_slots, dtype=torch.float32, device=self.params[0].device)
        if in_use is None and self.flat is not None:  # the unused rest of every row is zero and adds nothing
            return self.flat.grads.float().pow(2).sum(1).sqrt()
        if in_use is None:
            for p in self.params:
                if p.grad is not None:
                    total += p.grad.float().pow(2).flatten(1).sum(1)
            return total.sqrt()
        grads = self._gradients()
        rows = [grad.view(grad.size(0), -1).unbind(0) if grad is not None else () for grad in grads]
        blocks = {}
        for slot, owned in in_use:
            rank = self.ranks.in_use[slot]
            indices = [i for i, (grad, mine) in enumerate(zip(grads, owned)) if mine and grad is not None]
            # A slot's block is the start of its row (Block): the row itself where the slot has the largest rank.
            blocks[slot] = (indices, [rows[i][slot] if rank * self.layouts[i].width == rows[i][slot].numel()
                                      else rows[i][slot][: rank * self.layouts[i].width] for i in indices])
        # clip_grad_norm_: the norm of the per-tensor norms, per slot.
        norms = slot_norms(grads, blocks, self.ranks.in_use, self.layouts)
        if norms:
            total[list(norms)] = torch.stack(list(norms.values()))
        self._grad_blocks = GradBlocks(grads, blocks)
        return total

    @torch.no_grad()
    def step(self, active: torch.Tensor, lrs: torch.Tensor, grad_norms: torch.Tensor) -> None:
        """One AdamW step for the slots where `active` (bool, (S,)) is true.

        `lrs` holds each slot's lr for this step; `grad_norms` comes from `grad_norms()`.
        Clipping matches `torch.nn.utils.clip_grad_norm_` per slot.
        """
        device = self.params[0].device
        active = active.to(device)
        if device.type == "cpu":
            self.steps += active.long()
        else:  # counted where `active` lives: reading it on the host would wait for the step's kernels
            if self.device_steps is None:
                self.device_steps = self.steps.to(device)
            self.device_steps += active.long()
        # clip_grad_norm_'s own fp32 arithmetic: max_norm / (norm + 1e-6), clamped to 1.
        clip = ((grad_norms.float() + 1e-6).reciprocal() * self.max_grad_norm.float()).clamp(max=1.0)
        grad_blocks, self._grad_blocks = self._grad_blocks, None
        if self.per_slot_fused:
            self._fused_step(active, lrs, clip, grad_blocks)
            return
        # On a GPU, one masked update of the whole stacks, AdamW's formula op by op: no host
        # sync to find the active slots, and frozen O-LoRA ranks keep their values.
        any_frozen = bool(self.ranks.frozen.any())
        step = (self.steps if self.device_steps is None else self.device_steps).to(
            device=device, dtype=torch.float64).clamp(min=1)
        lrs = lrs.to(device=device, dtype=torch.float64)
        bias_correction1 = 1 - self.beta1**step
        bias_correction2_sqrt = (1 - self.beta2**step).sqrt()
        step_size = lrs / bias_correction1
        decay = 1 - lrs * self.weight_decay
        trainable: list[torch.Tensor | None] = list(self.trainable()) if any_frozen else [None] * len(self.params)
        if self.flat is not None:  # the whole update once over the flat buffers
            flat_mask = None
            if any_frozen:  # O-LoRA only
                flat_mask = torch.cat([mask.expand(p.shape).reshape(p.size(0), -1)
                                       for p, mask in zip(self.params, trainable)], dim=1)
            # In column chunks: the update makes ~8 temporaries the size of what it updates, which over the whole
            # (S, total) buffers would be several times the optimizer state. Elementwise: the same numbers.
            flat = (self.flat.params, self.flat.grads, self.flat.exp_avg, self.flat.exp_avg_sq, flat_mask)
            width = max(1, FLAT_CHUNK_ELEMENTS // self.num_slots)
            stacks = [tuple(t[:, start : start + width] if t is not None else None for t in flat)
                      for start in range(0, self.flat.params.size(1), width)]
        else:
            stacks = [(p, p.grad, m, v, unfrozen) for p, m, v, unfrozen in
                      zip(self.params, self.exp_avg, self.exp_avg_sq, trainable)]
        for p, p_grad, m, v, unfrozen in stacks:
            if p_grad is None:
                continue

            def col(t: torch.Tensor, like: torch.Tensor = p) -> torch.Tensor:
                return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

            grad = p_grad * col(clip)
            mask = col(active.float()).bool()
            if unfrozen is not None:
                mask = mask & unfrozen
            new_p = p * col(decay)
            new_m = m.lerp(grad, col(1 - self.beta1))
            # AdamW's `v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)` as torch rounds it
            # (and 1 - beta2 in fp64: in fp32 it is off by 1e-5).
            new_v = (v * col(self.beta2)).addcmul(grad * col(1 - self.beta2), grad)
            denom = new_v.sqrt() / col(bias_correction2_sqrt) + col(self.eps)
            new_p = new_p - col(step_size) * new_m / denom
            p.copy_(torch.where(mask, new_p, p))
            m.copy_(torch.where(mask, new_m, m))
            v.copy_(torch.where(mask, new_v, v))

    def _fused_step(self, active: torch.Tensor, lrs: torch.Tensor, clip: torch.Tensor,
                    grad_blocks: GradBlocks | None) -> None:
        """On the CPU: each active slot through torch's fused AdamW kernel, on its own blocks.

        This is exactly `clip_grad_norm_` followed by `torch.optim.AdamW(fused=True)` on the
        adapter's own tensors: the blocks are those tensors, entry for entry, so the kernel
        and the clipping see nothing else. Frozen O-LoRA ranks are put back as they were
        after the kernel has run over them.
        """
        grads = self._gradients()
        # The blocks `grad_norms` made, if they are of these very gradients.
        reusable = grad_blocks is not None and all(a is b for a, b in zip(grad_blocks.grads, grads))
        made = grad_blocks.by_slot if reusable else {}
        scales = clip.tolist()
        slots = active.nonzero().flatten().tolist()
        # As clip_grad_norm_ scales the gradients: where several slots clip, one multiply per stacked gradient by
        # each slot's coefficient (the same products as per block; 1.0, no change, where a slot does not clip or
        # does not step).
        by_stack = sum(scales[slot] < 1.0 for slot in slots) > 1
        if by_stack:
            clip_stacks(grads, torch.where(active, clip, 1.0))
        for slot in slots:
            rank = self.ranks.in_use[slot]
            if slot in made:
                indices, grad_views = made[slot]
            else:
                indices = [i for i, grad in enumerate(grads) if grad is not None]
                grad_views = self._flat_blocks(grads, indices, slot, rank)  # type: ignore[arg-type]
            if not indices:
                continue
            key = (slot, rank, tuple(indices))
            if key not in self._state_views:
                self._state_views[key] = tuple(self._flat_blocks(tensors, indices, slot, rank)
                                               for tensors in (self.params, self.exp_avg, self.exp_avg_sq))
            params, exp_avgs, exp_avg_sqs = self._state_views[key]
            frozen = int(self.ranks.frozen[slot])
            kept = []
            if frozen:
                for i in indices:
                    for tensors in (self.params, self.exp_avg, self.exp_avg_sq):
                        block = self.block(i, tensors[i], slot)
                        view = block.narrow(0 if self.layouts[i].rank_first else 1, 0, frozen)
                        kept.append((view, view.clone()))
            if scales[slot] < 1.0 and not by_stack:
                torch._foreach_mul_(grad_views, clip[slot])
            step = torch.tensor(float(self.steps[slot]))
            torch._fused_adamw_(
                params, grad_views, exp_avgs, exp_avg_sqs, [], [step] * len(grad_views),
                lr=float(lrs[slot]), beta1=float(self.beta1[slot]), beta2=float(self.beta2[slot]),
                weight_decay=float(self.weight_decay[slot]), eps=float(self.eps[slot]), amsgrad=False, maximize=False,
            )
            for view, saved in kept:
                view.copy_(saved)
